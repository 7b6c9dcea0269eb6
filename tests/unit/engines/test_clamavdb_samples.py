"""Builds ClamAV databases for the tests: containers, a test key, PE files, samples.

ClamAV's own key cannot sign our test containers, so signed ones (``.cvd``, ``.cld``) are
signed with :data:`TEST_KEY` and loaded with ``cvd_key=TEST_PUBLIC, info_key=TEST_PUBLIC``;
the real key is checked against ClamAV's own signed test files (``clamav_testdata/``).
``.cud`` (unsigned) containers load with the defaults, in our engine and in clamd alike.

:func:`generated_database` returns signature files with an entry of every supported kind
and the samples each must detect (and near misses that must stay clean).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import tarfile
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from avgate.engines.clamavdb import load_database, read_container, verify_md5_sig

# A 2048-bit RSA test key (openssl genrsa), e = 65537.
TEST_N = int(
    "ebb87d57077d635eaad508e529e12bc4424ca2327d1c902dd056b28edb86754792cdaf299424e9ff72e69275"
    "7a4bd4a5d78d9d61f68c0eb85adeb8e84ec840fff8b0b4b7a5f9eb85d57167c43eb323e03c3a157d3af78d72"
    "3125b27ddde3e19e68e59f2b7d0711c8f5ba393ff813ed64f72f196f2982a75dd841c26094017f1912467086"
    "e2dd27912692d898ffa89c3bff1b80be15bff2e70ea4f3532e4b49d6a8a9c80bbc8f98451e28b0994a159944"
    "279330fd09b089ab4589b0065e69e9e3e70b7096990619b0e09e6a22ac3fc44321ee50691297a2506c0c87d4"
    "9842c3a0b1017f8de81e2577272964e6ec4db44197e8e90a9ac5ae077d44f2f3f51d83f3", 16)
TEST_D = int(
    "503777dc0a8df6a78c2e34393c4fc6e3a2864eba2cce70184f2a79d858c78098cb5218b667164ad566262618"
    "39769dd6942cbaaed046a869bf6ec4f135823b708092ade54363f1ed190e5f382ef82a90d01e1a1b045aa335"
    "8599250d6559fbf93b0c4d66f0c4db9e0e5581cf0d9ec66e521a22a72c32acbf286d747706571e076464b2f9"
    "818e328253bc71c2eba23f1968e87ef6069c0ba13c53ba39091b580653ed0714fdce1562098ce371237166a2"
    "3defee7c8e891ec2fe5fcf2387bbc66ed3b2d3aed5ff1a30eaff34fc1e44fc29d7344cb51ca302cb9dbbfb9a"
    "3ba19b5d99b0c61f78008975966d03867618ce8de5c556a67d39c10683c35f2e430cea51", 16)
TEST_PUBLIC = (TEST_N, 65537)


def md5hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


_NCODEC = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/"


def encode_sig(value: int) -> str:
    """ClamAV's signature text: 6 bits a character, least significant first."""
    out = []
    while value:
        out.append(_NCODEC[value & 63])
        value >>= 6
    return "".join(out) or "a"


def sign_md5(md5_hex: str, key: tuple[int, int] = (TEST_N, TEST_D)) -> str:
    n, d = key
    return encode_sig(pow(int(md5_hex, 16), d, n))


def sign_sha256(sha256: bytes, salt: bytes = b"s" * 32,
                key: tuple[int, int] = (TEST_N, TEST_D)) -> str:
    """The inverse of ClamAV's cli_versig2 (PSS-like encoding, SHA-256)."""
    n, d = key
    blk = 256 - 32 - 1
    digest = hashlib.sha256(bytes(8) + sha256 + salt).digest()
    db = bytes(blk - 33) + b"\x01" + salt
    stream = b"".join(hashlib.sha256(digest + i.to_bytes(4, "big")).digest()
                      for i in range((blk + 31) // 32))
    masked = bytearray(a ^ b for a, b in zip(db, stream[:blk], strict=True))
    masked[0] &= 0x7F
    em = bytes(masked) + digest + b"\xbc"
    return encode_sig(pow(int.from_bytes(em, "big"), d, n))


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build_container(kind: str, files: dict[str, bytes], *, version: int = 1,
                    stime: int = 1_700_000_000, flevel: int = 90, sigs: int | None = None,
                    key: tuple[int, int] | None = (TEST_N, TEST_D)) -> bytes:
    """A ``.cvd`` / ``.cld`` / ``.cud`` holding ``files`` (``key`` None: unsigned)."""
    sigs = sum(1 for d in files.values() for _ in d.splitlines()) if sigs is None else sigs
    head = f"ClamAV-VDB:14 Nov 2023 22-13 +0000:{version}:{sigs}:{flevel}"
    info = f"{head}:X:X:avgate-tests:{stime}\n" + "".join(
        f"{name}:{len(data)}:{hashlib.sha256(data).hexdigest()}\n"
        for name, data in files.items())
    stem = "test"
    if kind != "cud" and key is not None:
        info += "DSIG:" + sign_sha256(hashlib.sha256(info.encode()).digest(), key=key) + "\n"
    members = [("COPYING", b"test database\n"), (f"{stem}.info", info.encode()),
               *files.items()]
    tar = _tar(members)
    body = tar if kind == "cld" else gzip.compress(tar, mtime=0)
    md5 = md5hex(body)
    dsig = sign_md5(md5, key) if kind == "cvd" and key is not None else "X"
    header = f"{head}:{md5}:{dsig}:avgate-tests:{stime}".encode().ljust(512, b" ")
    return header + body


def make_pe(sections: list[bytes], ep_section: int = 0, ep_offset: int = 0) -> bytes:
    """A minimal valid PE32: FileAlignment 0x200, SectionAlignment 0x1000, raw sizes
    aligned (so ClamAV's aligned section bounds equal the header's)."""
    count = len(sections)
    dos = b"MZ" + bytes(58) + struct.pack("<I", 64)
    coff = struct.pack("<HHIIIHH", 0x14C, count, 0, 0, 0, 224, 0x102)
    headers_size = 0x200
    raw, table, offset, rva = [], b"", headers_size, 0x1000
    for index, data in enumerate(sections):
        size = (len(data) + 0x1FF) // 0x200 * 0x200
        table += struct.pack("<8sIIIIIIHHI", b".s%d" % index, max(len(data), 1), rva, size,
                             offset, 0, 0, 0, 0, 0x60000020)
        raw.append(data.ljust(size, b"\0"))
        offset += size
        rva += 0x1000
    entry = 0x1000 * (ep_section + 1) + ep_offset
    optional = struct.pack("<HBBIIIIIIIIIHHHHHHIIIIHHIIIIII", 0x10B, 1, 0, 0, 0, 0, entry,
                           0x1000, 0, 0x400000, 0x1000, 0x200, 4, 0, 0, 0, 4, 0, 0, rva,
                           headers_size, 0, 2, 0, 0x100000, 0x1000, 0x100000, 0x1000, 0, 16)
    optional += bytes(16 * 8)
    head = (dos + b"PE\0\0" + coff + optional + table).ljust(headers_size, b"\0")
    return head + b"".join(raw)


def _blob(seed: str, size: int) -> bytes:
    out = b""
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}/{counter}".encode()).digest()
        counter += 1
    return out[:size]


def _mark(tag: str) -> bytes:
    return f"<avgate-sig-{tag}>".encode()


@dataclass(frozen=True)
class DbSample:
    label: str
    data: bytes
    name: str | None  # the signature that must detect it (None: must stay clean)
    #: clamd's verdict differs by design (an entry we count as unsupported): its name
    clamd_name: str | None = None


def generated_database() -> tuple[dict[str, bytes], list[DbSample]]:
    """Signature files with an entry of every supported kind, and their samples."""
    samples: list[DbSample] = []
    hdb: list[str] = []
    hsb: list[str] = []
    mdb: list[str] = []
    ndb: list[str] = []
    ldb: list[str] = []
    fp: list[str] = []

    def sample(label: str, data: bytes, name: str | None, clamd: str | None = None) -> None:
        samples.append(DbSample(label, data, name, clamd if clamd is not None else name))

    # file hashes: md5, sha1, sha256, sha256 of any size
    for kind, size_text in (("md5", "s"), ("sha1", "s"), ("sha256", "s"), ("sha256", "*")):
        data = _blob(f"hash-{kind}-{size_text}", 700)
        name = f"Test.Hash.{kind}{'-any' if size_text == '*' else ''}"
        digest = hashlib.new(kind, data).hexdigest()
        line = f"{digest}:{len(data) if size_text == 's' else '*'}:{name}:73\n"
        (hdb if kind == "md5" else hsb).append(line)
        sample(name, data, name)
        sample(name + " other size", data + b"!", None)
    # PE section hash
    section = _blob("section", 0x200)
    mdb.append(f"512:{md5hex(section)}:Test.Section.md5\n")
    sample("pe section", make_pe([_blob("text", 0x200), section]), "Test.Section.md5")
    sample("pe other section", make_pe([_blob("text", 0x200), _blob("other", 0x200)]), None)
    # body signatures with each offset form
    forms: tuple[tuple[str, str, Callable[[bytes], bytes]], ...] = (
        ("star", "*", lambda m: _blob("a", 300) + m + _blob("b", 99)),
        ("abs", "100", lambda m: _blob("c", 100) + m + _blob("d", 50)),
        ("range", "90,20", lambda m: _blob("e", 101) + m + _blob("f", 50)),
        ("eof", "EOF-40", lambda m: _blob("g", 200) + m + _blob("h", 40 - len(m))),
    )
    for tag, offset, build in forms:
        name = f"Test.Body.{tag}"
        mark = _mark(tag)
        ndb.append(f"{name}:0:{offset}:{mark.hex()}\n")
        sample(name, build(mark), name)
    sample("body abs elsewhere", _blob("c", 101) + _mark("abs") + _blob("d", 50), None)
    pe_marks = {tag: _mark(tag) for tag in ("ep", "s1", "sl", "se1")}
    ndb.append(f"Test.Body.ep:1:EP+16:{pe_marks['ep'].hex()}\n")
    ndb.append(f"Test.Body.s1:1:S1+4:{pe_marks['s1'].hex()}\n")
    ndb.append(f"Test.Body.sl:1:SL+8:{pe_marks['sl'].hex()}\n")
    ndb.append(f"Test.Body.se1:1:SE1:{pe_marks['se1'].hex()}\n")
    text = bytes(16) + pe_marks["ep"] + bytes(64)
    sample("Test.Body.ep", make_pe([text, _blob("x", 64)], 0, 0), "Test.Body.ep")
    sample("body ep moved", make_pe([text, _blob("x", 64)], 0, 4), None)
    sample("Test.Body.s1", make_pe([bytes(64), bytes(4) + pe_marks["s1"], b"z" * 9]),
           "Test.Body.s1")
    sample("Test.Body.sl", make_pe([bytes(64), b"y" * 9, bytes(8) + pe_marks["sl"]]),
           "Test.Body.sl")
    sample("Test.Body.se1", make_pe([bytes(64), _blob("q", 100) + pe_marks["se1"]]),
           "Test.Body.se1")
    sample("body s1 in section 0", make_pe([bytes(4) + pe_marks["s1"], bytes(64)]), None)
    # logical signatures
    a, b, c, d = (_mark(f"ldb-{x}") for x in "abcd")
    ldb.append(f"Test.Ldb.and;Engine:51-255,Target:0;0&1;{a.hex()};{b.hex()}\n")
    sample("Test.Ldb.and", a + _blob("i", 50) + b, "Test.Ldb.and")
    sample("ldb and half", a + _blob("i", 50), None)
    ldb.append(f"Test.Ldb.or;Target:0;0|1;{c.hex()};{d.hex()}\n")
    sample("Test.Ldb.or", _blob("j", 20) + d, "Test.Ldb.or")
    e = _mark("ldb-count")
    ldb.append(f"Test.Ldb.count;Target:0;0>2;{e.hex()}\n")
    sample("Test.Ldb.count", e + b"." + e + b"." + e, "Test.Ldb.count")
    sample("ldb count 2", e + b"." + e, None)
    f, g = _mark("ldb-f"), _mark("ldb-g")
    ldb.append(f"Test.Ldb.exact;Target:0;(0|1)=3;{f.hex()};{g.hex()}\n")
    sample("Test.Ldb.exact", f + b"." + f + b"." + g, "Test.Ldb.exact")
    sample("ldb exact 4", f + b"." + f + b"." + g + b"." + g, None)
    h, i, j = _mark("ldb-h"), _mark("ldb-i"), _mark("ldb-j")
    ldb.append(f"Test.Ldb.nested;Target:0;0&(1|2);{h.hex()};{i.hex()};{j.hex()}\n")
    sample("Test.Ldb.nested", j + b"-" + h, "Test.Ldb.nested")
    sample("ldb nested half", i + b"-" + j, None)
    k = b"avgate-nocase-marker"
    ldb.append(f"Test.Ldb.nocase;Target:0;0;{k.hex()}::i\n")
    sample("Test.Ldb.nocase", b"xx " + k.upper() + b" yy", "Test.Ldb.nocase")
    w = b"avgate-wide-marker"
    ldb.append(f"Test.Ldb.wide;Target:0;0;{w.hex()}::w\n")
    sample("Test.Ldb.wide", b"xx" + w.decode().encode("utf-16-le") + b"yy", "Test.Ldb.wide")
    sample("ldb wide as ascii", b"xx " + w + b" yy", None)
    m, n = _mark("ldb-pe-ep"), _mark("ldb-pe-any")
    ldb.append(f"Test.Ldb.pe;Target:1;0&1;EP+0:{m.hex()};{n.hex()}\n")
    sample("Test.Ldb.pe", make_pe([m + bytes(32), n]), "Test.Ldb.pe")
    sample("ldb pe not pe", m + bytes(32) + n, None)
    # allow list and ignored names: the sample matches a body signature, and is clean
    allowed = _mark("allowed") + _blob("fp", 80)
    ndb.append(f"Test.Body.allowed:0:*:{_mark('allowed').hex()}\n")
    fp.append(f"{md5hex(allowed)}:{len(allowed)}:Test.Body.allowed\n")
    sample("allow-listed", allowed, None)
    sample("not allow-listed", allowed + b"!", "Test.Body.allowed")
    ndb.append(f"Test.Body.ignored:0:*:{_mark('ignored').hex()}\n")
    sample("ignored name", _blob("ig", 30) + _mark("ignored"), None)
    # unsupported by us, loaded by ClamAV: counted, and clamd detects the sample
    p = _mark("pcre-trigger")
    ldb.append(f"Test.Ldb.pcre;Target:0;0&1;{p.hex()};0/avgate-pcre-[0-9]+x/\n")
    sample("ldb pcre", p + b" avgate-pcre-123x", None, "Test.Ldb.pcre")
    files = {  # the ignore list first: ClamAV applies it only to what it loads after it
        "test.ign2": b"Test.Body.ignored\n",
        "test.hdb": "".join(hdb).encode(), "test.hsb": "".join(hsb).encode(),
        "test.mdb": "".join(mdb).encode(), "test.ndb": "".join(ndb).encode(),
        "test.ldb": "".join(ldb).encode(), "test.fp": "".join(fp).encode(),
        "test.cfg": b"DOCUMENT:0x0:1:1:0\n",
    }
    return files, samples


#: what generated_database() loads and counts as unsupported, per file
EXPECTED_UNSUPPORTED = {("test.ldb", "pcre"): 1}


# -- tests of the builder itself --------------------------------------------------------------

def test_test_key_signs_like_clamav() -> None:
    md5 = md5hex(b"x")
    assert verify_md5_sig(md5, sign_md5(md5), TEST_PUBLIC)
    assert not verify_md5_sig(md5, sign_md5(md5))  # not ClamAV's key


@pytest.mark.parametrize("kind", ["cvd", "cld", "cud"])
def test_built_containers_verify(kind: str) -> None:
    files, _ = generated_database()
    data = build_container(kind, files, version=7)
    container = read_container(data, f"x.{kind}", cvd_key=TEST_PUBLIC, info_key=TEST_PUBLIC)
    assert container.header.version == 7
    assert dict(container.members)["test.ndb"] == files["test.ndb"]


def test_generated_database_loads_everything_it_should(tmp_path: object) -> None:
    from pathlib import Path
    root = Path(str(tmp_path))
    files, _ = generated_database()
    (root / "test.cud").write_bytes(build_container("cud", files))
    db = load_database([root])
    unsupported = {(f.split("/")[-1], r): n for (f, r), n in db.stats.unsupported.items()}
    assert unsupported == EXPECTED_UNSUPPORTED
    assert db.versions() == "test:1"
