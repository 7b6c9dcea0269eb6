"""ClamAV signature files: parsing, and translation of body signatures to YARA-X.

Supported formats (one signature a line; blank lines and ``#`` comments are skipped):

``.hdb``  ``md5:size:name[:flevel]``
``.hsb``  ``digest:size:name[:flevel]`` — sha1 or sha256 (md5 is accepted too; the hash kind
          is taken from the digest length, as ClamAV does). In both files ``size`` may be ``*``
          (unknown size): such a hash is computed for every part.
``.ndb``  ``name:target:offset:hexsig[:min_flevel[:max_flevel]]``

Hash signatures stay hashes (:class:`HashSignatures`: per hash kind one sorted blob of
fixed-width ``digest | size | name index`` records, bisected; millions of signatures are a few
bytes objects, not millions of Python objects); each digest is computed only for parts whose
size some signature of that kind has.

Body (``.ndb``) signatures become one YARA-X rule each, named ``r<N>`` (ClamAV names such as
``Win.Trojan.X-1`` are not identifiers); :class:`SignatureSet` keeps the index → name table so
findings report the ClamAV name exactly as written in the file.

Hex signature translation::

    ClamAV          YARA-X
    aa              aa
    ??  a?  ?a      ??  a?  ?a
    *               [-]
    {n}             [n]
    {n-m}  [n-m]    [n-m]
    {-n}            [0-n]
    {n-}            [n-]
    (aa|bb|ccdd)    ( aa | bb | cc dd )

Rejected (:class:`SignatureError` naming file, line and signature, never silently dropped):
negated alternatives ``!(..)``, the ``(B)``/``(L)`` boundary anchors, jumps inside
alternatives, odd-length hex, and anything else YARA-X cannot compile.

Offsets: ``*`` (anywhere); ``n`` → ``$a at n``; ``n,m`` → ``$a in (n..n+m)``;
``EOF-n`` → ``$a at filesize-n``; ``EOF-n,m`` → ``$a in (filesize-n..filesize-n+m)``.
With target 1 (PE), through YARA-X's ``pe`` module: ``EP+n``/``EP-n`` → ``$a at
pe.entry_point + n`` (a file offset, as ClamAV's), ``Sx+n`` → section ``x``'s raw data offset
+ n, ``SL+n`` → the last section's, ``SEx`` → anywhere inside section ``x``; with target 6
(ELF) ``EP±n`` uses ``elf.entry_point``. Rules using them need ``import "pe"``/``"elf"`` in
their source. Other targets with these offsets, and ``VI``/macro offsets, are rejected.

Target types: 0 (any) matches any part. 1 (PE), 2 (OLE2), 6 (ELF) and 9 (Mach-O) are applied
as a check of the file magic at offset 0 (``MZ``, ``D0 CF 11 E0``, ``7F 45 4C 46``, the Mach-O
and fat magics) — a slight widening, since ClamAV also validates the headers. Every other
target (3 HTML, 4 mail, 5 graphics, 7 ASCII text, 10 PDF, ...) is applied as *any*: a
documented widening that may match in parts of another type, never one that misses. Note that
ClamAV matches targets 3 and 7 against normalised text (lower-cased, whitespace folded); we
match the raw bytes, so such signatures should be written in lower case to hit lower-case data.
``min_flevel``/``max_flevel`` are validated as numbers and otherwise ignored.
"""

from __future__ import annotations

import bisect
import hashlib
import re
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SignatureError

#: file extensions this module understands
SIGNATURE_SUFFIXES = frozenset({".hdb", ".hsb", ".ndb"})
#: the YARA namespace holding translated body signatures
NDB_NAMESPACE = "clamav"

_HASH_KINDS = {32: "md5", 40: "sha1", 64: "sha256"}
_HEX_RE = re.compile(r"^[0-9a-fA-F]+$")
_HEXCHARS = frozenset("0123456789abcdefABCDEF")

# Conditions for the target types we can check cheaply from the file magic.
_TARGET_CONDITIONS = {
    1: "uint16(0) == 0x5A4D",  # PE: "MZ"
    2: "uint32be(0) == 0xD0CF11E0",  # OLE2 compound document
    6: "uint32be(0) == 0x7F454C46",  # ELF
    9: "uint32be(0) == 0xFEEDFACE or uint32be(0) == 0xFEEDFACF or "  # Mach-O 32/64 BE,
       "uint32be(0) == 0xCEFAEDFE or uint32be(0) == 0xCFFAEDFE or "  # LE,
       "uint32be(0) == 0xCAFEBABE",  # universal (fat) binary
}


class TranslationError(ValueError):
    """A hex signature or offset that cannot be expressed in YARA-X (reason in the message)."""


# -- hex signatures ---------------------------------------------------------------------------

def _jump(body: str, closing: str) -> str:
    """Translate the inside of ``{..}`` / ``[..]`` to a YARA-X jump."""
    m = re.fullmatch(r"(\d*)(-?)(\d*)", body)
    if not m or not (m.group(1) or m.group(3)):
        raise TranslationError(f"bad jump {{{body}}}" if closing == "}" else f"bad jump [{body}]")
    low = int(m.group(1) or 0)
    high = int(m.group(3)) if m.group(3) else None
    if not m.group(2):  # {n}: exactly n
        high = low
    if high is not None and low > high:
        raise TranslationError(f"bad jump range {low}-{high}")
    if high == 0:
        return ""  # {0}, {-0}, {0-0} match nothing; YARA-X refuses zero-length jumps
    if high is None:
        return f"[{low}-]"
    return f"[{low}]" if low == high else f"[{low}-{high}]"


def _bytes_only(text: str, where: str) -> list[str]:
    """Split ``text`` into hex byte tokens (``aa``, ``a?``, ``?a``, ``??``); nothing else."""
    if not text:
        raise TranslationError(f"empty {where}")
    bad = [c for c in text if c not in _HEXCHARS and c != "?"]
    if bad:
        raise TranslationError(f"unsupported token {bad[0]!r} in {where} {text!r} "
                               "(only bytes and nibble wildcards)")
    if len(text) % 2:
        raise TranslationError(f"odd number of hex digits in {where} {text!r}")
    return [text[i:i + 2].lower() for i in range(0, len(text), 2)]


def translate_hexsig(hexsig: str) -> str:
    """Translate a ClamAV body signature to the inside of a YARA-X hex string.

    Raises :class:`TranslationError` for anything not in the table of the module docstring.
    """
    out: list[str] = []
    i, n = 0, len(hexsig)
    while i < n:
        c = hexsig[i]
        if c in _HEXCHARS or c == "?":
            pair = hexsig[i:i + 2]
            if len(pair) < 2:
                raise TranslationError("odd number of hex digits")
            if pair[1] not in _HEXCHARS and pair[1] != "?":
                raise TranslationError(f"unsupported character {pair[1]!r} at position {i + 1}"
                                       " (or an odd number of hex digits before it)")
            out.append(pair.lower())
            i += 2
        elif c == "*":
            out.append("[-]")
            i += 1
        elif c in "{[":
            closing = "}" if c == "{" else "]"
            end = hexsig.find(closing, i)
            if end < 0:
                raise TranslationError(f"unclosed {c!r} at position {i}")
            jump = _jump(hexsig[i + 1:end], closing)
            if jump:
                out.append(jump)
            i = end + 1
        elif c == "!":
            raise TranslationError("negated alternatives !(...) are not supported")
        elif c == "(":
            end = hexsig.find(")", i)
            if end < 0:
                raise TranslationError(f"unclosed '(' at position {i}")
            body = hexsig[i + 1:end]
            if body in ("B", "L"):
                raise TranslationError(f"anchor ({body}) is not supported")
            alternatives = body.split("|")
            if len(alternatives) < 2:
                raise TranslationError(f"alternative ({body}) needs at least two choices")
            translated = [" ".join(_bytes_only(alt, "alternative")) for alt in alternatives]
            out.append("( " + " | ".join(translated) + " )")
            i = end + 1
        else:
            raise TranslationError(f"unsupported character {c!r} at position {i}")
    if not out:
        raise TranslationError("empty signature")
    # YARA-X (like ClamAV) needs fixed bytes at both ends to anchor the search.
    if out[0].startswith("[") or out[-1].startswith("["):
        raise TranslationError("a signature cannot start or end with a jump")
    return " ".join(out)


# Where the entry point and sections are, from YARA-X's own pe/elf modules (file offsets).
_EP = {1: "pe.entry_point", 6: "elf.entry_point"}
_SECTION = "pe.sections[{0}].raw_data_offset"
_LAST_SECTION = "pe.sections[pe.number_of_sections - 1].raw_data_offset"


def _place(var: str, start: str, span: str | None) -> str:
    if span is None:
        return f"{var} at {start}"
    end = str(int(start) + int(span)) if start.isdigit() else f"{start} + {int(span)}"
    return f"{var} in ({start}..{end})"


def translate_offset(offset: str, target: int = 0, var: str = "$a") -> str:
    """Translate a ClamAV offset to a YARA-X condition on ``var``.

    ``EP+n``/``EP-n`` need target 1 (PE) or 6 (ELF); ``Sx+n``, ``SL+n`` and ``SEx`` need
    target 1: they use YARA-X's ``pe``/``elf`` modules (the rule source must import them).
    """
    if offset == "*":
        return var
    m = re.fullmatch(r"(\d+)(?:,(\d+))?", offset)
    if m:
        return _place(var, m.group(1), m.group(2))
    m = re.fullmatch(r"EOF-(\d+)(?:,(\d+))?", offset)
    if m:
        return _place(var, f"filesize - {int(m.group(1))}", m.group(2))
    m = re.fullmatch(r"EP([+-])(\d+)(?:,(\d+))?", offset)
    if m and target in _EP:
        return _place(var, f"{_EP[target]} {m.group(1)} {int(m.group(2))}", m.group(3))
    m = re.fullmatch(r"(S(\d+)|SL)\+(\d+)(?:,(\d+))?", offset)
    if m and target == 1:
        base = _SECTION.format(int(m.group(2))) if m.group(2) else _LAST_SECTION
        return _place(var, f"{base} + {int(m.group(3))}", m.group(4))
    m = re.fullmatch(r"SE(\d+)", offset)
    if m and target == 1:
        index = int(m.group(1))
        return (f"{var} in ({_SECTION.format(index)}..{_SECTION.format(index)} + "
                f"pe.sections[{index}].raw_data_size)")
    if re.match(r"(EP|S\d+|SL|SE\d+)", offset):
        raise TranslationError(f"offset {offset!r} (entry point/section) needs target type 1 "
                               "(PE; 6 for EP) — not supported for this target")
    if re.match(r"(VI|\$)", offset):
        raise TranslationError(f"offset {offset!r} (version info/macro) is not supported")
    raise TranslationError(f"bad offset {offset!r}")


def target_condition(target: int) -> str | None:
    """The extra condition for a ClamAV target type (None: any file; see module docstring)."""
    return _TARGET_CONDITIONS.get(target)


# -- signature records ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BodySignature:
    """One ``.ndb`` line, translated."""

    name: str
    target: int
    offset: str
    hexsig: str
    path: str
    line: int

    def where(self) -> str:
        return f"{self.path}:{self.line}: {self.name}"

    def yara_rule(self, ident: str) -> str:
        """The YARA-X source of this signature as a rule named ``ident``."""
        try:
            hexstr = translate_hexsig(self.hexsig)
            condition = translate_offset(self.offset, self.target)
        except TranslationError as exc:
            raise SignatureError(f"{self.where()}: {exc}") from None
        extra = target_condition(self.target)
        if extra:
            condition = f"({extra}) and {condition}"
        return f"rule {ident} {{ strings: $a = {{ {hexstr} }} condition: {condition} }}"


_DIGEST_BYTES = {"md5": 16, "sha1": 20, "sha256": 32}
_SIZE = struct.Struct(">Q")
_NAME = struct.Struct(">I")
#: the size of a ``*`` (any size) hash signature in the sorted key
_ANY_SIZE = (1 << 64) - 1
#: sizes below this are kept in a bitmap (2 MiB a table, made only when used)
_SMALL = 1 << 24


class _Table:
    """One hash kind: fixed-width records ``digest | size (8, big-endian) | name index (4)``
    in one bytes blob, sorted, with a 256-entry index on the first digest byte; and the
    sizes signatures have — a bitmap for sizes under 16 MiB (2 MiB, made on first use), a
    sorted ``array('Q')`` above — so that a part whose size no signature has costs no
    digest. Millions of signatures are a few blobs, not millions of Python objects."""

    __slots__ = (
        "_pending_sizes",
        "blob",
        "index",
        "key_width",
        "kind",
        "pending",
        "sizes",
        "small_sizes",
        "width",
        "wild",
    )

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.key_width = _DIGEST_BYTES[kind] + _SIZE.size
        self.width = self.key_width + _NAME.size
        self.pending = bytearray()
        self._pending_sizes: set[int] = set()
        self.blob = b""
        self.index = array("Q", [0] * 257)
        self.sizes = array("Q")  # sizes >= _SMALL
        self.small_sizes = bytearray()  # bitmap of sizes < _SMALL (empty: none yet)
        self.wild = False

    def __len__(self) -> int:
        return (len(self.blob) + len(self.pending)) // self.width

    def add(self, digest: bytes, size: int | None, name_index: int) -> None:
        if size is None:
            self.wild = True
            size = _ANY_SIZE
        else:
            if size < _SMALL:
                if not self.small_sizes:
                    self.small_sizes = bytearray(_SMALL // 8)
                self.small_sizes[size >> 3] |= 1 << (size & 7)
            else:
                self._pending_sizes.add(size)
        self.pending += digest + _SIZE.pack(size) + _NAME.pack(name_index)

    def freeze(self) -> None:
        """Merge what was added into the sorted blob (bucket by first digest byte, so the
        transient list of records is 1/256 of the table)."""
        if not self.pending:
            return
        w = self.width
        buckets: list[bytearray] = [bytearray() for _ in range(256)]
        for src in (self.blob, self.pending):
            view = memoryview(src)
            for i in range(0, len(src), w):
                buckets[src[i]] += view[i:i + w]
        out = bytearray()
        for i, bucket in enumerate(buckets):
            self.index[i] = len(out) // w
            records = sorted(bytes(bucket[j:j + w]) for j in range(0, len(bucket), w))
            out += b"".join(records)
        self.index[256] = len(out) // w
        self.blob = bytes(out)
        sizes = set(self.sizes)
        sizes.update(self._pending_sizes)
        self.sizes = array("Q", sorted(sizes))
        self.pending = bytearray()
        self._pending_sizes = set()

    def has_size(self, size: int) -> bool:
        if size < _SMALL:
            return bool(self.small_sizes) and bool(self.small_sizes[size >> 3] & (1 << (size & 7)))
        i = bisect.bisect_left(self.sizes, size)
        return i < len(self.sizes) and self.sizes[i] == size

    def find(self, digest: bytes, size: int) -> int | None:
        """The name index of the first signature added for (digest, size), or None."""
        key = digest + _SIZE.pack(size)
        w, k, blob = self.width, self.key_width, self.blob
        lo, hi = self.index[digest[0]], self.index[digest[0] + 1]
        while lo < hi:
            mid = (lo + hi) // 2
            if blob[mid * w:mid * w + k] < key:
                lo = mid + 1
            else:
                hi = mid
        if lo < self.index[256] and blob[lo * w:lo * w + k] == key:
            (name,) = _NAME.unpack_from(blob, lo * w + k)
            return int(name)
        return None

    def __getstate__(self) -> tuple[Any, ...]:
        self.freeze()
        return (self.kind, self.blob, self.index, self.sizes, bytes(self.small_sizes),
                self.wild)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        kind, blob, index, sizes, small, wild = state
        _Table.__init__(self, kind)
        self.blob, self.index, self.sizes, self.wild = blob, index, sizes, wild
        self.small_sizes = bytearray(small)


class NameTable:
    """Signature names in one blob, with an array of end offsets, looked up by index."""

    __slots__ = ("_last", "blob", "ends")

    def __init__(self) -> None:
        self.blob = bytearray()
        self.ends = array("Q")
        self._last = ""

    def add(self, name: str) -> int:
        if self.ends and name == self._last:
            return len(self.ends) - 1  # consecutive repeats (one name, many hashes) share
        self.blob += name.encode("latin-1", "replace")
        self.ends.append(len(self.blob))
        self._last = name
        return len(self.ends) - 1

    def __getitem__(self, index: int) -> str:
        start = self.ends[index - 1] if index else 0
        return self.blob[start:self.ends[index]].decode("latin-1")

    def __len__(self) -> int:
        return len(self.ends)

    def __getstate__(self) -> tuple[bytes, array[int]]:
        return bytes(self.blob), self.ends

    def __setstate__(self, state: tuple[bytes, array[int]]) -> None:
        blob, self.ends = state
        self.blob = bytearray(blob)
        self._last = ""


class HashSignatures:
    """Hash signatures keyed by ``(size, digest)`` in compact sorted tables (one per hash
    kind); a digest is computed only for parts whose size some signature of that kind has
    (or when a ``*``-size signature of that kind exists). The first name added for a
    hash wins."""

    __slots__ = ("names", "tables")

    def __init__(self, names: NameTable | None = None) -> None:
        self.names = names if names is not None else NameTable()
        self.tables = {kind: _Table(kind) for kind in _DIGEST_BYTES}

    def add(self, kind: str, size: int | None, digest: str, name: str) -> None:
        """Add one signature (``size`` None: unknown); ``digest`` in hex."""
        self.tables[kind].add(bytes.fromhex(digest), size, self.names.add(name))

    def freeze(self) -> None:
        for table in self.tables.values():
            table.freeze()

    def __len__(self) -> int:
        return sum(map(len, self.tables.values()))

    def lookup(self, data: bytes | memoryview, size: int | None = None) -> list[str]:
        """Names of the hash signatures matching ``data`` (``size``: its size as the
        signatures count it, when that is not ``len(data)``)."""
        size = len(data) if size is None else size
        names = []
        for kind, table in self.tables.items():
            if table.pending:
                table.freeze()
            if not table.wild and not table.has_size(size):
                continue  # the common case: no signature of this kind has this size
            digest = hashlib.new(kind, data, usedforsecurity=False).digest()
            found = table.find(digest, size)
            if found is None and table.wild:
                found = table.find(digest, _ANY_SIZE)
            if found is not None:
                names.append(self.names[found])
        return names


@dataclass(slots=True)
class SignatureSet:
    """Everything loaded from the ClamAV signature files of one engine."""

    hashes: HashSignatures = field(default_factory=HashSignatures)
    bodies: list[BodySignature] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def load_file(self, path: str | Path) -> bytes:
        """Parse one signature file into this set; return its raw content (for versioning)."""
        p = Path(path)
        suffix = p.suffix.lower()
        if suffix not in SIGNATURE_SUFFIXES:
            raise SignatureError(
                f"{p}: unsupported signature file type {suffix or '(none)'} "
                f"(supported: {', '.join(sorted(SIGNATURE_SUFFIXES))})")
        try:
            raw = p.read_bytes()
        except OSError as exc:
            raise SignatureError(f"{p}: cannot read: {exc.strerror or exc}") from exc
        # ClamAV databases are ASCII; latin-1 never fails, bad bytes then fail validation.
        lines = raw.decode("latin-1").splitlines()
        for lineno, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if suffix == ".ndb":
                self.bodies.append(parse_ndb_line(line, str(p), lineno))
            else:
                kind, size, digest, name = parse_hash_line(line, str(p), lineno)
                self.hashes.add(kind, size, digest, name)
        self.files.append(str(p))
        return raw


def parse_hash_line(line: str, path: str, lineno: int) -> tuple[str, int | None, str, str]:
    """Parse ``digest:size:name[:flevel]`` → (kind, size or None, lower-case digest, name)."""
    fields_ = line.split(":")
    name = fields_[2] if len(fields_) > 2 else "?"
    where = f"{path}:{lineno}: {name}"
    if len(fields_) not in (3, 4):
        raise SignatureError(f"{where}: expected digest:size:name[:flevel], got {line!r}")
    digest, size_text = fields_[0].lower(), fields_[1]
    kind = _HASH_KINDS.get(len(digest))
    if kind is None or not _HEX_RE.match(digest):
        raise SignatureError(f"{where}: {fields_[0]!r} is not an md5, sha1 or sha256 digest")
    if not name:
        raise SignatureError(f"{where}: empty signature name")
    if size_text == "*":
        size = None
    elif size_text.isdigit():
        size = int(size_text)
    else:
        raise SignatureError(f"{where}: bad size {size_text!r}")
    if len(fields_) == 4 and fields_[3] and not fields_[3].isdigit():
        raise SignatureError(f"{where}: bad flevel {fields_[3]!r}")
    return kind, size, digest, name


def parse_ndb_line(line: str, path: str, lineno: int) -> BodySignature:
    """Parse ``name:target:offset:hexsig[:min_flevel[:max_flevel]]`` (translated later)."""
    fields_ = line.split(":")
    name = fields_[0] or "?"
    where = f"{path}:{lineno}: {name}"
    if not 4 <= len(fields_) <= 6:
        raise SignatureError(
            f"{where}: expected name:target:offset:hexsig[:min_flevel[:max_flevel]]")
    if not fields_[0]:
        raise SignatureError(f"{where}: empty signature name")
    if not fields_[1].isdigit():
        raise SignatureError(f"{where}: bad target type {fields_[1]!r}")
    for level in fields_[4:]:
        if level and not level.isdigit():
            raise SignatureError(f"{where}: bad functionality level {level!r}")
    sig = BodySignature(name=fields_[0], target=int(fields_[1]), offset=fields_[2],
                        hexsig=fields_[3], path=path, line=lineno)
    sig.yara_rule("r0")  # translate now, so a bad signature fails with its line number
    return sig


def signature_files(path: Path) -> Iterator[Path]:
    """A file as given, or the supported signature files of a directory (sorted, recursive)."""
    if path.is_dir():
        yield from sorted(p for p in path.rglob("*")
                          if p.is_file() and p.suffix.lower() in SIGNATURE_SUFFIXES)
    else:
        yield path
