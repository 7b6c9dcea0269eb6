"""ClamAV's own database: ``.cvd``/``.cld``/``.cud`` containers and the signature formats in them.

Containers (``libclamav/cvd.c``): a 512-byte header, space padded::

    ClamAV-VDB:build time:version:signatures:functionality level:MD5:dsig:builder:stime

then a tar (``.cld``, patched by freshclam, whose first member is ``COPYING``) or a tar.gz
(``.cvd``, ``.cud``). What is verified, exactly as ClamAV 1.4 does it:

* ``.cvd``: the MD5 of everything after the header equals the header's MD5, and the header's
  digital signature (ClamAV's RSA key, :data:`CVD_KEY`: ``dsig^e mod n`` is that MD5) holds;
* ``.cvd`` and ``.cld``: the ``.info`` member carries a ``DSIG:`` line, an RSA-PSS-style
  signature (:data:`INFO_KEY`, SHA-256) over the lines before it; every other member must be
  listed in ``.info`` with its exact size and SHA-256, and ``.info``'s header must repeat the
  container's version, signature count, functionality level and build time;
* ``.cud`` (unsigned, like ClamAV's ``CL_DB_UNSIGNED``): the ``.info`` sizes and SHA-256
  are checked, there is no signature to check.

Anything that fails is a :class:`~avgate.errors.SignatureError` naming the file: the whole
database is refused (a reload keeps the old one). Tar reading is bounded: member sizes,
member count and the uncompressed total are checked before anything is read.

Signature files (in a container or loose in the database directory):

========================  ==============================================================
``.hdb .hsb .hsu``        file hashes ``digest:size:name`` (md5/sha1/sha256; size may be
                          ``*``) → compact sorted tables (:class:`HashSignatures`)
``.mdb .msb .mdu``        PE section hashes ``size:digest:name`` → the same tables, matched
                          against each section YARA-X's ``pe`` module finds
``.ndb .ndu``             body signatures → one YARA-X rule each (see :mod:`.signatures`)
``.ldb .ldu``             logical signatures → one YARA-X rule each (:func:`translate_ldb`)
``.fp .sfp``              allow list: a part with this hash has no findings
``.ign .ign2``            signature names never to load
``.cfg``                  engine configuration (DCONF): skipped, counted
``.info``                 the container's manifest: used for verification
========================  ==============================================================

Known differences from ClamAV (checked against clamd in tests/integration/test_clamav_db.py):
a logical signature is evaluated only when one of its own subsignatures matched (ClamAV
evaluates it once any pattern of the database matched, so ``0<2`` could fire with no match of
its own); the ignore lists apply to every file, whatever the order (ClamAV: to files loaded
after them); section hashes are computed for every PE YARA-X parses, with ClamAV's
FileAlignment rounding of the bounds (ClamAV skips PEs whose headers it finds broken, and it
unpacks UPX, FSG, ... first, which we do not). Entries for other functionality levels than
ClamAV 1.4's (:data:`FLEVEL`) are skipped and counted, as ClamAV skips them.

Updates: freshclam writes the files, the engine's reload watch picks them up; or
:func:`update_from_mirror` (``avgate update --mirror URL``) fetches newer ``.cvd`` files from
a private HTTP(S) mirror, verifies them as a load does and renames them into place.

``*u`` files are ClamAV's PUA (potentially unwanted application) signatures: loaded only
with ``pua = true`` (clamd's ``DetectPUA``), else counted as skipped. Every entry that is
not loaded is counted per file and reason in :class:`DbStats` (never silently dropped):
unsupported features (PCRE, byte compare, bytecode, phishing, icon, ... files), lines we
cannot parse, ignored names.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tarfile
import urllib.request
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SignatureError
from ..settings import Section
from .signatures import (
    BodySignature,
    HashSignatures,
    NameTable,
    TranslationError,
    parse_hash_line,
    target_condition,
    translate_hexsig,
    translate_offset,
)

HEADER_SIZE = 512
#: the functionality level we load signatures for: ClamAV 1.4's (CL_FLEVEL); entries for
#: other levels are skipped (counted), as ClamAV 1.4 skips them
FLEVEL = 215
CONTAINER_SUFFIXES = frozenset({".cvd", ".cld", ".cud"})
#: ClamAV's CVD signing key (libclamav/dsig.c CLI_NSTR, CLI_ESTR)
CVD_KEY = (int(
    "1186409955516453426030700016584531897515277744120277437465994057432431426074641447673610"
    "6064065584474976078889002228342492276248891756555100246777110966959818941043469903453223"
    "2228621591089508178591428456220796841621637175567590476666928698770143328137383952820383"
    "197532047771780196576957695822641224262693037"), 100001027)
#: ClamAV's .info signing key (libclamav/readdb.c INFO_NSTR, INFO_ESTR), 2048 bits
INFO_KEY = (int(
    "1108889498304854547365955610662719492392894179179504762059165869741358104332271591217249"
    "6806525381055880964520618400224333320534660299233983755341740679502866829909679955734391"
    "3926683783612215242053966310901051516412708572770803107343209516537005089417174191687239"
    "4250789070290470270758745162169105075430785038339986534648720379846417853739221140278648"
    "1359824461197231102895415093770394216666324484593935762408468516826633192140826667923494"
    "8220458053478099328484548458869717064243605586678627758760720594377033653802091016977385"
    "77515476935085469455279994113145977994084618328482151013142393373316337519977244732747977"),
    100002049)
_NCODEC = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/"
_NDECODE = {c: i for i, c in enumerate(_NCODEC)}

#: bounds on what a container may hold (ClamAV's daily.cld unpacks to a few hundred MB)
MAX_MEMBER_SIZE = 1 << 30
MAX_TOTAL_SIZE = 2 << 30
MAX_MEMBERS = 1000

HASH_FILES = frozenset({".hdb", ".hsb", ".hsu", ".hdu"})
SECTION_FILES = frozenset({".mdb", ".msb", ".mdu", ".msu"})
BODY_FILES = frozenset({".ndb", ".ndu"})
LOGICAL_FILES = frozenset({".ldb", ".ldu"})
FP_FILES = frozenset({".fp", ".sfp"})
IGNORE_FILES = frozenset({".ign", ".ign2"})
PUA_FILES = frozenset({".hdu", ".hsu", ".mdu", ".msu", ".ndu", ".ldu"})
#: files read and knowingly not used
SKIPPED_FILES = frozenset({".cfg", ".info"})
#: ClamAV files we know and cannot use: every entry in them is counted as unsupported
UNSUPPORTED_FILES = {
    ".cbc": "bytecode", ".pdb": "phishing", ".gdb": "phishing", ".wdb": "phishing",
    ".ftm": "file type magic", ".crb": "authenticode", ".cat": "authenticode",
    ".idb": "icon", ".cdb": "container metadata", ".imp": "import table hash",
    ".yar": "yara in clamav db", ".yara": "yara in clamav db", ".zmd": "zip metadata",
    ".rmd": "rar metadata", ".db": "old format", ".cvd": "nested container",
    ".pwdb": "password", ".sdb": "old format"}
DATABASE_SUFFIXES = (HASH_FILES | SECTION_FILES | BODY_FILES | LOGICAL_FILES | FP_FILES
                     | IGNORE_FILES | SKIPPED_FILES | CONTAINER_SUFFIXES)


# -- container header and signatures -------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CvdHeader:
    """The 512-byte container header (also repeated as the first line of ``.info``)."""

    build_time: str
    version: int
    sigs: int
    flevel: int
    md5: str
    dsig: str
    builder: str
    stime: int

    def same_db(self, other: CvdHeader) -> bool:
        return (self.version, self.sigs, self.flevel, self.stime) == (
            other.version, other.sigs, other.flevel, other.stime)


def parse_header(raw: bytes, where: str) -> CvdHeader:
    """Parse a header (the 512 bytes, or an ``.info`` first line)."""
    text = raw.decode("latin-1").rstrip(" \n\0")
    if not text.startswith("ClamAV-VDB:"):
        raise SignatureError(f"{where}: not a ClamAV database (no ClamAV-VDB header)")
    fields = text.split(":")
    if len(fields) < 8:
        raise SignatureError(f"{where}: header has {len(fields)} fields, expected 9")
    numbers = []
    for index, label in ((2, "version"), (3, "signature count"), (4, "functionality level"),
                         (8, "build time")):
        value = fields[index] if index < len(fields) else "0"
        if not value.isdigit():
            raise SignatureError(f"{where}: header: bad {label} {value!r}")
        numbers.append(int(value))
    return CvdHeader(fields[1], numbers[0], numbers[1], numbers[2], fields[5], fields[6],
                     fields[7], numbers[3])


def _decode_sig(dsig: str, length: int, key: tuple[int, int]) -> bytes | None:
    """ClamAV's signature number (6 bits a character, least significant first) ^ e mod n."""
    value = 0
    for i, ch in enumerate(dsig):
        digit = _NDECODE.get(ch)
        if digit is None:
            return None
        value |= digit << (6 * i)
    n, e = key
    plain = pow(value, e, n)
    if plain.bit_length() > 8 * length:
        return None
    return plain.to_bytes(length, "big")


def verify_md5_sig(md5_hex: str, dsig: str, key: tuple[int, int] = CVD_KEY) -> bool:
    """libclamav ``cli_versig``: the header signature over the archive's MD5."""
    if not re.fullmatch(r"[0-9a-f]{32}", md5_hex):
        return False
    plain = _decode_sig(dsig, 16, key)
    return plain is not None and plain.hex() == md5_hex


def verify_sha256_sig(sha256: bytes, dsig: str, key: tuple[int, int] = INFO_KEY) -> bool:
    """libclamav ``cli_versig2``: the ``.info`` signature (PSS-like, SHA-256, 2048-bit)."""
    pad_len, hash_len, salt_len = 256, 32, 32
    blk_len = pad_len - hash_len - 1
    decoded = _decode_sig(dsig, pad_len, key)
    if decoded is None or decoded[-1] != 0xBC:
        return False
    mask, digest2 = decoded[:blk_len], decoded[blk_len:blk_len + hash_len]
    stream = b"".join(hashlib.sha256(digest2 + i.to_bytes(4, "big")).digest()
                      for i in range((blk_len + hash_len - 1) // hash_len))
    data = bytearray(a ^ b for a, b in zip(stream[:blk_len], mask, strict=True))
    data[0] &= 0x7F
    start = data.find(1)
    if start < 0 or len(data) - start - 1 != salt_len:
        return False
    salt = bytes(data[start + 1:])
    return hashlib.sha256(bytes(8) + sha256 + salt).digest() == digest2


# -- containers ----------------------------------------------------------------------------

@dataclass(slots=True)
class Container:
    """A verified container: its header, members in order, and what was verified."""

    name: str
    header: CvdHeader
    members: list[tuple[str, bytes]]
    verified: str


def _bounded_gunzip(data: bytes, where: str, limit: int) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as exc:
        raise SignatureError(f"{where}: corrupt gzip data: {exc}") from None
    if len(out) > limit:
        raise SignatureError(f"{where}: archive unpacks to more than {limit} bytes")
    if not d.eof:
        raise SignatureError(f"{where}: truncated gzip data")
    return out


def read_tar(data: bytes, where: str, *, max_member: int = MAX_MEMBER_SIZE,
             max_members: int = MAX_MEMBERS) -> list[tuple[str, bytes]]:
    """Members of a tar (plain files only, no paths: what ClamAV accepts), sizes bounded."""
    members: list[tuple[str, bytes]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if len(members) >= max_members:
                    raise SignatureError(f"{where}: more than {max_members} members")
                if "/" in info.name or not info.name or info.name in (".", ".."):
                    raise SignatureError(f"{where}: member name {info.name!r} not allowed")
                if not info.isreg():
                    raise SignatureError(f"{where}: member {info.name!r} is not a file")
                if info.size > max_member:
                    raise SignatureError(f"{where}: member {info.name!r} is {info.size} bytes"
                                         f" (limit {max_member})")
                if info.offset_data + info.size > len(data):
                    raise SignatureError(f"{where}: member {info.name!r} is truncated")
                members.append((info.name, data[info.offset_data:info.offset_data + info.size]))
    except tarfile.TarError as exc:
        raise SignatureError(f"{where}: corrupt tar archive: {exc}") from None
    return members


Key = tuple[int, int]


def read_container(data: bytes, name: str, *, cvd_key: Key | None = None,
                   info_key: Key | None = None,
                   max_total: int = MAX_TOTAL_SIZE) -> Container:
    """Parse and verify one ``.cvd``/``.cld``/``.cud`` (kind from ``name``'s suffix); the
    keys default to ClamAV's (:data:`CVD_KEY`, :data:`INFO_KEY`)."""
    cvd_key = CVD_KEY if cvd_key is None else cvd_key
    info_key = INFO_KEY if info_key is None else info_key
    kind = Path(name).suffix.lower()
    if kind not in CONTAINER_SUFFIXES:
        raise SignatureError(f"{name}: not a .cvd, .cld or .cud file")
    if len(data) < HEADER_SIZE:
        raise SignatureError(f"{name}: truncated header ({len(data)} bytes)")
    header = parse_header(data[:HEADER_SIZE], name)
    body = data[HEADER_SIZE:]
    verified = []
    if kind == ".cvd":
        md5 = hashlib.md5(body, usedforsecurity=False).hexdigest()
        if md5 != header.md5:
            raise SignatureError(f"{name}: MD5 mismatch (header {header.md5}, data {md5})")
        if not verify_md5_sig(md5, header.dsig, cvd_key):
            raise SignatureError(f"{name}: digital signature verification failed")
        verified.append("MD5 and header signature")
    tar = _bounded_gunzip(body, name, max_total) if body[:2] == b"\x1f\x8b" else body
    members = read_tar(tar, name)
    verified.append(_verify_info(name, kind, header, members, info_key))
    return Container(name, header, members, ", ".join(verified))


def _verify_info(name: str, kind: str, header: CvdHeader, members: list[tuple[str, bytes]],
                 info_key: tuple[int, int]) -> str:
    """Check the ``.info`` manifest (ClamAV's cli_loadinfo + cli_tgzload second pass)."""
    infos = [(n, d) for n, d in members if n.lower().endswith(".info")]
    if not infos:
        raise SignatureError(f"{name}: no .info member")
    info_name, info = infos[0]
    where = f"{name}/{info_name}"
    lines = info.decode("latin-1").split("\n")
    signed = kind != ".cud"
    listed: dict[str, tuple[int, str]] = {}
    info_header: CvdHeader | None = None
    digest = hashlib.sha256()
    dsig_ok = False
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if signed and line.startswith("DSIG:"):
            if not verify_sha256_sig(digest.digest(), line[5:].strip(), info_key):
                raise SignatureError(f"{where}: incorrect digital signature")
            dsig_ok = True
            break
        if not line and lineno == len(lines):
            break
        digest.update(line.encode("latin-1") + b"\n")
        if line.startswith("ClamAV-VDB:"):
            info_header = parse_header(line.encode("latin-1"), where)
            continue
        fields = line.split(":")
        if info_header is None or len(fields) != 3 or not fields[1].isdigit() or \
                not re.fullmatch(r"[0-9a-fA-F]{64}", fields[2]):
            raise SignatureError(f"{where}:{lineno}: bad line {line[:80]!r}")
        listed[fields[0]] = (int(fields[1]), fields[2].lower())
    if signed and not dsig_ok:
        raise SignatureError(f"{where}: no digital signature (DSIG line)")
    if info_header is None or not info_header.same_db(header):
        raise SignatureError(f"{where}: header does not match the container's")
    for member, content in members:
        if member == info_name or member == "COPYING" or not _db_ext(member):
            continue
        if member not in listed:
            raise SignatureError(f"{name}: {member} is not listed in {info_name}")
        size, sha = listed[member]
        if len(content) != size or hashlib.sha256(content).hexdigest() != sha:
            raise SignatureError(f"{name}: {member} does not match its size/SHA-256 in "
                                 f"{info_name}")
    return (f"{info_name} signature, " if signed else "") + "member sizes and SHA-256"


def _db_ext(member: str) -> bool:
    suffix = Path(member).suffix.lower()
    return suffix in DATABASE_SUFFIXES or suffix in UNSUPPORTED_FILES


# -- statistics ----------------------------------------------------------------------------

@dataclass(slots=True)
class DbStats:
    """What was loaded and what was not, per file (``main.cvd/main.hdb``) and reason."""

    loaded: Counter[str] = field(default_factory=Counter)
    #: (file, reason) → count: unsupported features, unparseable lines
    unsupported: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: (file, reason) → count: knowingly not used (PUA off, ignored names, .cfg lines)
    skipped: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: container name → (version, what was verified)
    containers: dict[str, tuple[int, str]] = field(default_factory=dict)

    def total_loaded(self) -> int:
        return sum(self.loaded.values())

    def total_unsupported(self) -> int:
        return sum(self.unsupported.values())

    def lines(self) -> list[str]:
        """Human-readable report, one line per container and per file."""
        out = [f"{name}: version {version}, verified: {how}"
               for name, (version, how) in sorted(self.containers.items())]
        files = sorted(set(self.loaded) | {f for f, _ in self.unsupported}
                       | {f for f, _ in self.skipped})
        for f in files:
            parts = [f"{self.loaded[f]} loaded"]
            bad = {r: n for (g, r), n in self.unsupported.items() if g == f}
            if bad:
                parts.append(f"{sum(bad.values())} unsupported (" + ", ".join(
                    f"{r} {n}" for r, n in sorted(bad.items())) + ")")
            skip = {r: n for (g, r), n in self.skipped.items() if g == f}
            if skip:
                parts.append(f"{sum(skip.values())} skipped (" + ", ".join(
                    f"{r} {n}" for r, n in sorted(skip.items())) + ")")
            out.append(f"{f}: " + ", ".join(parts))
        out.append(f"total: {self.total_loaded()} loaded, {self.total_unsupported()} "
                   f"unsupported, {sum(self.skipped.values())} skipped")
        return out


# -- logical signatures --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LogicalSignature:
    """One ``.ldb`` line and its YARA-X translation (a rule body without the name)."""

    name: str
    where: str
    strings: tuple[str, ...]
    condition: str

    def yara_rule(self, ident: str) -> str:
        strings = (" strings: " + " ".join(self.strings)) if self.strings else ""
        return f"rule {ident} {{{strings} condition: {self.condition} }}"


class Unsupported(TranslationError):
    """A feature we do not translate; ``kind`` is the short reason counted in the stats."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


_TDB_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def _tdb(block: str) -> tuple[int, list[str]]:
    """Target description block → (target, extra conditions)."""
    target, conditions = 0, []
    for item in block.split(","):
        key, _, value = item.partition(":")
        m = _TDB_RANGE.fullmatch(value)
        if key == "Target" and value.isdigit():
            target = int(value)
        elif key == "Engine" and m:
            pass  # functionality levels: every level we read is one we support or count
        elif key == "FileSize" and m:
            low, high = int(m.group(1)), int(m.group(2) or m.group(1))
            conditions.append(f"filesize >= {low} and filesize <= {high}")
        elif key == "NumberOfSections" and m:
            low, high = int(m.group(1)), int(m.group(2) or m.group(1))
            conditions.append(f"pe.number_of_sections >= {low} and "
                              f"pe.number_of_sections <= {high}")
        elif key in ("Target", "Engine", "FileSize", "NumberOfSections"):
            raise TranslationError(f"bad target description {item!r}")
        else:
            raise Unsupported("target-block", f"{key or item!r} in the target description")
    extra = target_condition(target)
    if extra:
        conditions.insert(0, extra)
    return target, conditions


def _subsig(index: int, text: str, target: int) -> tuple[str, str | None]:
    """One subsignature → (YARA-X string definition, offset condition or None)."""
    if re.match(r"\d+\(", text):
        raise Unsupported("byte-compare", text[:40])
    if text.startswith("$"):
        raise Unsupported("macro", text[:40])
    if text.startswith("fuzzy_img#"):
        raise Unsupported("fuzzy-image", text[:40])
    if "/" in text:
        raise Unsupported("pcre", text[:40])
    body, _, modifiers = text.partition("::")
    offset = "*"
    if ":" in body:
        offset, body = body.split(":", 1)
    var = f"$s{index}"
    if not modifiers:
        try:
            definition = f"{var} = {{ {translate_hexsig(body)} }}"
        except TranslationError as exc:
            raise Unsupported("hexsig", str(exc)) from None
    else:
        unknown = set(modifiers) - set("iwaf")
        if unknown:
            raise Unsupported("modifier", f"::{modifiers}")
        if not re.fullmatch(r"([0-9a-fA-F]{2})+", body):
            raise Unsupported("modifier", "::modifiers on a signature with wildcards")
        escaped = "".join(f"\\x{body[i:i + 2]}" for i in range(0, len(body), 2))
        words = {"i": "nocase", "w": "wide", "a": "ascii", "f": "fullword"}
        mods = " ".join(words[c] for c in "iwaf" if c in modifiers)
        definition = f'{var} = "{escaped}" {mods}'
    try:
        where = None if offset == "*" else translate_offset(offset, target, var)
    except TranslationError as exc:
        raise Unsupported("offset", str(exc)) from None
    return definition, where


class _Expr:
    """Recursive-descent parser of ClamAV logical expressions over subsignature indices."""

    def __init__(self, text: str, count: int, places: list[str | None]) -> None:
        self.text, self.pos, self.count, self.places = text, 0, count, places
        self.used: set[int] = set()

    def parse(self) -> str:
        out = self.expr()
        if self.pos != len(self.text):
            raise TranslationError(f"unexpected {self.text[self.pos:]!r} in expression")
        return out

    def _peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _number(self) -> int:
        m = re.compile(r"\d+").match(self.text, self.pos)
        if not m:
            raise TranslationError(f"expected a number at {self.text[self.pos:]!r}")
        self.pos = m.end()
        return int(m.group())

    def expr(self) -> str:
        terms, ops = [self.term()], set()
        while self._peek() in ("&", "|"):
            ops.add(self._peek())
            self.pos += 1
            terms.append(self.term())
        if len(ops) > 1:
            raise TranslationError("& and | mixed without parentheses")
        if len(terms) == 1:
            return terms[0]
        joiner = " and " if ops == {"&"} else " or "
        return "(" + joiner.join(terms) + ")"

    def term(self) -> str:
        start = self.pos
        indices: list[int]
        if self._peek() == "(":
            self.pos += 1
            inner = self.expr()
            if self._peek() != ")":
                raise TranslationError("unclosed '(' in expression")
            self.pos += 1
            group = self.text[start + 1:self.pos - 1]
            indices = ([int(x) for x in group.split("|")]
                       if re.fullmatch(r"\d+(\|\d+)*", group) else [])
        else:
            index = self._number()
            if index >= self.count:
                raise TranslationError(f"subsignature {index} does not exist")
            self.used.add(index)
            inner = self.places[index] or f"$s{index}"
            indices = [index]
        if self._peek() not in ("=", ">", "<"):
            return inner
        op = self._peek()
        self.pos += 1
        wanted = self._number()
        distinct = None
        if self._peek() == ",":
            self.pos += 1
            distinct = self._number()
        if not indices or any(self.places[i] is not None for i in indices):
            raise Unsupported("expression", "a count over a group with & or with offsets")
        total = " + ".join(f"#s{i}" for i in indices)
        cond = f"({total}) {'==' if op == '=' else op} {wanted}"
        if distinct is not None:
            if len(indices) == 1:
                raise Unsupported("expression", "distinct count on one subsignature")
            cond += f" and {distinct} of ({', '.join(f'$s{i}' for i in indices)})"
        return f"({cond})"


def translate_ldb(line: str, where: str) -> LogicalSignature:
    """``Name;TargetDescriptionBlock;LogicalExpression;Subsig0;Subsig1...`` → YARA-X.

    Raises :class:`Unsupported` (a feature we do not translate) or
    :class:`TranslationError` (a malformed line).
    """
    fields = line.split(";")
    if len(fields) < 4 or not fields[0]:
        raise TranslationError("expected Name;TargetDescription;Expression;Subsig0...")
    name, tdb, expression, subsigs = fields[0], fields[1], fields[2], fields[3:]
    if len(subsigs) > 64:
        raise TranslationError(f"{len(subsigs)} subsignatures (ClamAV allows 64)")
    target, conditions = _tdb(tdb)
    definitions, places = [], []
    for index, text in enumerate(subsigs):
        definition, place = _subsig(index, text, target)
        definitions.append(definition)
        places.append(place)
    parser = _Expr(expression.replace(" ", ""), len(subsigs), places)
    condition = parser.parse()
    # Strings the expression does not mention would make YARA-X refuse the rule; ClamAV
    # ignores them too.
    definitions = [d for i, d in enumerate(definitions) if i in parser.used
                   or f"$s{i}" in condition or f"#s{i}" in condition]
    if definitions:
        # ClamAV evaluates a logical signature only once some pattern matched: an
        # expression such as 0<2 or 0=0 never matches a part where none of ours did.
        condition = f"({condition}) and any of them"
    if conditions:
        condition = " and ".join([f"({c})" for c in conditions] + [condition])
    return LogicalSignature(name, where, tuple(definitions), condition)


# -- loading -------------------------------------------------------------------------------

@dataclass(slots=True)
class Database:
    """Everything loaded from ClamAV databases: compact hash tables, rules to compile."""

    names: NameTable = field(default_factory=NameTable)
    hashes: HashSignatures = field(init=False)
    sections: HashSignatures = field(init=False)
    allow: HashSignatures = field(init=False)
    bodies: list[BodySignature] = field(default_factory=list)
    logical: list[LogicalSignature] = field(default_factory=list)
    ignored: set[str] = field(default_factory=set)
    stats: DbStats = field(default_factory=DbStats)
    #: (file label, raw bytes length, sha256) of what was read, for db_version
    fingerprint: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.hashes = HashSignatures(self.names)
        self.sections = HashSignatures(self.names)
        self.allow = HashSignatures(self.names)

    def freeze(self) -> None:
        for table in (self.hashes, self.sections, self.allow):
            table.freeze()

    def versions(self) -> str:
        """``main:62 daily:27600 ...`` (empty without containers)."""
        return " ".join(f"{Path(n).stem}:{v}"
                        for n, (v, _) in sorted(self.stats.containers.items()))


def database_files(root: Path) -> list[Path]:
    """The database files of a directory as ClamAV picks them: a ``.cld`` wins over the
    ``.cvd`` of the same name when its version is not older (checked at load)."""
    if not root.is_dir():
        return [root]
    files = sorted(p for p in root.iterdir() if p.is_file() and (
        p.suffix.lower() in DATABASE_SUFFIXES or p.suffix.lower() in UNSUPPORTED_FILES))
    return files


def _container_version(path: Path) -> int:
    with path.open("rb") as f:
        return parse_header(f.read(HEADER_SIZE), str(path)).version


def load_database(paths: Iterable[Path], *, pua: bool = False,
                  cvd_key: Key | None = None, info_key: Key | None = None) -> Database:
    """Read, verify and parse every database file under ``paths`` (directories or files).

    Raises :class:`SignatureError` when a file cannot be read or a container does not
    verify; entries we cannot use are counted in ``Database.stats``.
    """
    entries: list[tuple[str, bytes]] = []  # (label, content) of every signature file
    db = Database()
    for root in paths:
        if not root.exists():
            raise SignatureError(f"{root}: no such database file or directory")
        files = database_files(root)
        chosen = _pick_containers(files)
        for path in files:
            if path not in chosen:
                db.stats.skipped[(path.name, "older duplicate container")] += 1
                continue
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise SignatureError(f"{path}: cannot read: {exc.strerror or exc}") from exc
            db.fingerprint.append(f"{path} {len(raw)} {hashlib.sha256(raw).hexdigest()}")
            if path.suffix.lower() in CONTAINER_SUFFIXES:
                container = read_container(raw, str(path), cvd_key=cvd_key, info_key=info_key)
                db.stats.containers[path.name] = (container.header.version, container.verified)
                entries.extend((f"{path.name}/{n}", d) for n, d in container.members
                               if n != "COPYING")
            else:
                entries.append((path.name, raw))
    # Ignore lists apply to every file, whatever the order they come in.
    for label, raw in entries:
        if Path(label).suffix.lower() in IGNORE_FILES:
            _load_ignore(db, label, raw)
    for label, raw in entries:
        _load_entry(db, label, raw, pua)
    db.freeze()
    return db


def _pick_containers(files: list[Path]) -> set[Path]:
    """Every file, except the older of a ``.cvd``/``.cld`` pair (as ClamAV does)."""
    chosen = set(files)
    by_stem: dict[str, list[Path]] = {}
    for p in files:
        if p.suffix.lower() in (".cvd", ".cld"):
            by_stem.setdefault(p.stem, []).append(p)
    for pair in by_stem.values():
        if len(pair) == 2:
            older = min(pair, key=lambda p: (_container_version(p), p.suffix.lower() == ".cvd"))
            chosen.discard(older)
    return chosen


def _lines(raw: bytes) -> Iterator[tuple[int, str]]:
    # lazily: a 4-million-line .hdb must not become a list of 4 million strings
    for lineno, line in enumerate(io.StringIO(raw.decode("latin-1"), newline=None), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield lineno, line


def _load_ignore(db: Database, label: str, raw: bytes) -> None:
    for _, line in _lines(raw):
        if label.lower().endswith(".ign"):
            parts = line.split(":")  # old format: db:line:name
            name = parts[2] if len(parts) >= 3 else line
        else:
            name = line.split(":")[0]  # .ign2: name[:md5 of the signature line]
        db.ignored.add(name)
        db.stats.skipped[(label, "names to ignore, not signatures")] += 1


def _load_entry(db: Database, label: str, raw: bytes, pua: bool) -> None:
    suffix = Path(label).suffix.lower()
    if suffix in IGNORE_FILES:
        return
    if suffix in PUA_FILES and not pua:
        db.stats.skipped[(label, "pua = false")] += sum(1 for _ in _lines(raw))
        return
    if suffix in SKIPPED_FILES:
        if suffix == ".cfg":
            db.stats.skipped[(label, "engine configuration")] += sum(1 for _ in _lines(raw))
        return
    if suffix in UNSUPPORTED_FILES or suffix not in DATABASE_SUFFIXES:
        reason = UNSUPPORTED_FILES.get(suffix, "unknown file type")
        db.stats.unsupported[(label, reason)] += max(1, sum(1 for _ in _lines(raw))) \
            if suffix != ".cbc" else 1
        return
    if suffix in HASH_FILES:
        raw = _load_hashes_fast(db, label, raw)
    for lineno, line in _lines(raw):
        try:
            _load_line(db, suffix, label, lineno, line)
        except Unsupported as exc:
            db.stats.unsupported[(label, exc.kind)] += 1
        except (TranslationError, SignatureError):
            db.stats.unsupported[(label, "malformed")] += 1


def _load_hashes_fast(db: Database, label: str, raw: bytes) -> bytes:
    """Load the plain ``digest:size:name[:flevel]`` lines of a hash file with the least work
    a line (millions of them); return the other lines (comments, ``*`` sizes, anything
    odd, ignored names) for the careful path, which counts and reports them."""
    rest = bytearray()
    tables = db.hashes.tables
    kinds = {32: tables["md5"], 40: tables["sha1"], 64: tables["sha256"]}
    add_name = db.names.add
    ignored = db.ignored
    count = 0
    for line in io.BytesIO(raw):
        fields = line.rstrip(b"\r\n").split(b":")
        table = kinds.get(len(fields[0]))
        if (table is None or not 3 <= len(fields) <= 4 or not fields[1].isdigit()
                or not fields[2] or (len(fields) == 4 and not (
                    fields[3].isdigit() and int(fields[3]) <= FLEVEL))):
            rest += line
            continue
        try:
            digest = bytes.fromhex(fields[0].decode("latin-1"))
        except ValueError:
            rest += line
            continue
        name = fields[2].decode("latin-1")
        if ignored and name in ignored:
            rest += line
            continue
        table.add(digest, int(fields[1]), add_name(name))
        count += 1
    db.stats.loaded[label] += count
    return bytes(rest)


def _flevel_range(suffix: str, line: str) -> tuple[str, str]:
    """(min, max) functionality level of an entry, as text ('' when absent)."""
    if suffix in LOGICAL_FILES:
        m = re.search(r"(?:^|,)Engine:(\d+)(?:-(\d+))?", line.split(";")[1] if ";" in line else "")
        return (m.group(1), m.group(2) or "") if m else ("", "")
    fields = line.split(":")
    if suffix in BODY_FILES:
        return (fields[4] if len(fields) > 4 else "", fields[5] if len(fields) > 5 else "")
    return (fields[3] if len(fields) > 3 else "", "")


def _load_line(db: Database, suffix: str, label: str, lineno: int, line: str) -> None:
    low, high = _flevel_range(suffix, line)
    if (low.isdigit() and int(low) > FLEVEL) or (high.isdigit() and int(high) < FLEVEL):
        db.stats.skipped[(label, "functionality level")] += 1
        return
    if suffix in HASH_FILES or suffix in FP_FILES:
        kind, size, digest, name = parse_hash_line(line, label, lineno)
        if name in db.ignored:
            db.stats.skipped[(label, "ignored")] += 1
            return
        (db.allow if suffix in FP_FILES else db.hashes).add(kind, size, digest, name)
    elif suffix in SECTION_FILES:
        size_text, digest, *rest = line.split(":")
        if not rest or not rest[0]:
            raise TranslationError("expected size:digest:name")
        kind, size, digest, name = parse_hash_line(
            ":".join([digest, size_text, *rest]), label, lineno)
        if size is None:
            raise Unsupported("section-any-size", "section hash with size *")
        if name in db.ignored:
            db.stats.skipped[(label, "ignored")] += 1
            return
        db.sections.add(kind, size, digest, name)
    elif suffix in BODY_FILES:
        fields = line.split(":")
        if fields[0] in db.ignored:
            db.stats.skipped[(label, "ignored")] += 1
            return
        if len(fields) < 4 or not fields[1].isdigit():
            raise TranslationError("expected name:target:offset:hexsig")
        target = int(fields[1])
        try:
            translate_offset(fields[2], target)
        except TranslationError as exc:
            raise Unsupported("offset", str(exc)) from None
        try:
            translate_hexsig(fields[3])
        except TranslationError as exc:
            raise Unsupported("hexsig", str(exc)) from None
        db.bodies.append(BodySignature(fields[0], target, fields[2], fields[3], label, lineno))
    elif suffix in LOGICAL_FILES:
        name = line.split(";", 1)[0]
        if name in db.ignored:
            db.stats.skipped[(label, "ignored")] += 1
            return
        db.logical.append(translate_ldb(line, f"{label}:{lineno}: {name}"))
    db.stats.loaded[label] += 1


# -- updates from a private mirror ---------------------------------------------------------

def _http_get(url: str, limit: int, timeout: float) -> bytes:
    """GET ``url`` (http/https only), at most ``limit`` bytes (more is an error, except for
    a header read, which stops at ``limit``)."""
    if not url.startswith(("http://", "https://")):
        raise SignatureError(f"{url}: the mirror must be an http:// or https:// URL")
    request = urllib.request.Request(url, headers={  # noqa: S310 - scheme checked above
        "User-Agent": "avgate-update", "Range": f"bytes=0-{limit - 1}"}
        if limit == HEADER_SIZE else {"User-Agent": "avgate-update"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            data: bytes = response.read(limit + 1)
    except (OSError, ValueError) as exc:
        raise SignatureError(f"{url}: download failed: {exc}") from None
    if limit == HEADER_SIZE:
        return data[:HEADER_SIZE]
    if len(data) > limit:
        raise SignatureError(f"{url}: larger than {limit} bytes")
    return data


def _local_version(datadir: Path, stem: str) -> int:
    versions = [0]
    for suffix in (".cvd", ".cld"):
        path = datadir / f"{stem}{suffix}"
        if path.exists():
            try:
                versions.append(_container_version(path))
            except (OSError, SignatureError):
                pass  # a broken local file is replaced by whatever the mirror has
    return max(versions)


def update_from_mirror(mirror: str, datadir: Path,
                       databases: Iterable[str] = ("main", "daily", "bytecode"), *,
                       timeout: float = 60.0, max_size: int = MAX_TOTAL_SIZE,
                       cvd_key: Key | None = None, info_key: Key | None = None) -> list[str]:
    """Fetch each database's ``.cvd`` from ``mirror`` when it is newer than the local copy,
    verify it exactly as loading does, and move it into ``datadir`` atomically (a temp file
    in the same directory, then rename; an older ``.cld`` of the same name is removed).

    Returns one line per database. Raises :class:`SignatureError` when a download fails or
    does not verify: nothing of that database is replaced (the ones before it stay updated).
    """
    lines = []
    base = mirror.rstrip("/")
    for stem in databases:
        url = f"{base}/{stem}.cvd"
        remote = parse_header(_http_get(url, HEADER_SIZE, timeout), url).version
        local = _local_version(datadir, stem)
        if remote <= local:
            lines.append(f"{stem}: version {local} is up to date (mirror: {remote})")
            continue
        data = _http_get(url, max_size, timeout)
        container = read_container(data, f"{stem}.cvd", cvd_key=cvd_key, info_key=info_key)
        if container.header.version != remote:
            raise SignatureError(f"{url}: version changed during the download")
        target = datadir / f"{stem}.cvd"
        tmp = datadir / f".{stem}.cvd.avgate-update"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        with contextlib.suppress(FileNotFoundError):
            (datadir / f"{stem}.cld").unlink()
        lines.append(f"{stem}: updated {local or 'nothing'} -> {remote} "
                     f"({container.verified})")
    return lines


class UpdateSettings(Section):
    """``[update]``: where ``avgate update`` fetches ClamAV's database. ``mirror``: a private
    mirror URL serving ``main/daily/bytecode.cvd`` (the files are verified as a load verifies
    them); none: ``avgate update`` runs freshclam. ``--mirror`` on the command line wins."""

    mirror: str | None = None
