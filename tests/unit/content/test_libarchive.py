"""RAR (v4, v5), CAB, ISO 9660, cpio and LHA through libarchive; ARJ and UDF have no reader.

The samples are built byte by byte in tests/corpus.py (ISO 9660 by libarchive's writer):
EICAR inside each format, a clean twin, and hostile variants (encryption, truncation,
declared sizes near 2^32, entry counts).
"""

from __future__ import annotations

import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterable

import pytest

from avgate.content import Part, Problem, decompose, libarchive
from avgate.content.arj import arj_entries
from avgate.content.filetype import Kind, detect
from avgate.content.libarchive import rar5_encrypted
from avgate.limits import Limits
from avgate.result import LimitKind, ScanStatus
from tests.corpus import (
    CLEAN_TEXT,
    EICAR,
    MARKER,
    make_arj,
    make_cab,
    make_cpio,
    make_iso,
    make_lha,
    make_rar4,
    make_rar5,
    make_zip,
)

Builder = Callable[[Iterable[tuple[str, bytes]]], bytes]
BUILDERS: dict[str, tuple[Builder, Kind]] = {
    "rar5": (make_rar5, Kind.RAR),
    "rar4": (make_rar4, Kind.RAR),
    "cab": (make_cab, Kind.CAB),
    "iso9660": (make_iso, Kind.ISO9660),
    "cpio": (make_cpio, Kind.CPIO),
    "lha": (make_lha, Kind.LHA),
}


def run(data: bytes, limits: Limits | None = None) -> list[Part | Problem]:
    return list(decompose(data, limits or Limits(), "m"))


def parts(items: list[Part | Problem]) -> list[Part]:
    return [i for i in items if isinstance(i, Part)]


def problems(items: list[Part | Problem]) -> list[Problem]:
    return [i for i in items if isinstance(i, Problem)]


@pytest.mark.parametrize("fmt", BUILDERS)
def test_eicar_and_marker_inside_are_members(fmt: str) -> None:
    build, kind = BUILDERS[fmt]
    data = build([("docs/eicar.com", EICAR), ("notes.txt", b"x " + MARKER + b" y")])
    assert detect(data) is kind
    items = run(data)
    assert not problems(items)
    assert [(p.path, p.data, p.depth) for p in parts(items)[1:]] == [
        ("m/docs/eicar.com", EICAR, 1), ("m/notes.txt", b"x " + MARKER + b" y", 1)]


@pytest.mark.parametrize("fmt", BUILDERS)
def test_clean_twin(fmt: str) -> None:
    build, _ = BUILDERS[fmt]
    items = run(build([("readme.txt", CLEAN_TEXT)]))
    assert not problems(items)
    assert [p.data for p in parts(items)[1:]] == [CLEAN_TEXT]


@pytest.mark.parametrize("fmt", BUILDERS)
def test_members_are_decomposed_further(fmt: str) -> None:
    build, _ = BUILDERS[fmt]
    items = run(build([("inner.zip", make_zip([("eicar.com", EICAR)]))]))
    assert ("m/inner.zip/eicar.com", EICAR) in [(p.path, p.data) for p in parts(items)]


@pytest.mark.parametrize("fmt", BUILDERS)
def test_truncated_archive_is_never_clean(fmt: str) -> None:
    build, _ = BUILDERS[fmt]
    data = build([("a.bin", bytes(range(256)) * 8)])
    cut = data[:len(data) // 2] if fmt != "iso9660" else data[:0x8800]
    items = run(cut)
    assert problems(items), "a truncated archive must say so"
    assert all(p.status is ScanStatus.UNKNOWN for p in problems(items))


@pytest.mark.parametrize("build", [make_rar5, make_rar4], ids=["rar5", "rar4"])
def test_encrypted_rar_member_is_unknown(build: Callable[..., bytes]) -> None:
    items = run(build([("eicar.com", EICAR)], encrypted=True))
    assert problems(items) == [Problem("m/eicar.com", ScanStatus.UNKNOWN, "encrypted")]
    assert len(parts(items)) == 1  # the ciphertext is not passed off as the member


def test_rar5_encryption_records_are_found_by_walking_the_headers() -> None:
    plain = make_rar5([("a", b"1"), ("b", b"2")])
    assert rar5_encrypted(plain) == set()
    assert rar5_encrypted(make_rar5([("a", b"1")], encrypted=True)) == {1}
    # an archive encryption header (type 4): nothing can be listed
    block = bytes([4, 0, 0])
    headers = b"Rar!\x1a\x07\x01\x00" + struct.pack("<L", zlib.crc32(b"\x03" + block)) + \
        b"\x03" + block
    assert rar5_encrypted(headers) == {0}
    assert run(headers)[1:] == [Problem("m", ScanStatus.UNKNOWN, "encrypted")]
    assert rar5_encrypted(b"Rar!\x1a\x07\x01\x00\xff\xff") == set()  # garbage: no crash


def test_udf_has_no_reader() -> None:
    udf = bytearray(0x9000)
    udf[0x8001:0x8006] = b"BEA01"
    udf[0x8801:0x8806] = b"NSR02"
    assert detect(bytes(udf)) is Kind.UDF
    assert run(bytes(udf))[1:] == [Problem("m", ScanStatus.UNKNOWN, "no reader for UDF")]
    bridge = bytearray(make_iso([("a.txt", b"x")]))
    bridge[0x8801:0x8806] = b"BEA01"  # a UDF bridge disc is read as ISO 9660
    assert detect(bytes(bridge)) is Kind.ISO9660


def test_without_libarchive_the_format_is_unknown_not_clean(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(libarchive, "_lib", False)  # as when libarchive13 is missing
    assert not libarchive.reader_available()
    items = run(make_rar5([("eicar.com", EICAR)]))
    assert items[1:] == [Problem("m", ScanStatus.UNKNOWN, "no reader for RAR")]
    assert run(make_cab([("a", b"b")]))[1:] == [
        Problem("m", ScanStatus.UNKNOWN, "no reader for CAB")]


def test_detection_needs_more_than_two_magic_bytes() -> None:
    assert detect(b"\x60\xea" + bytes(100)) is Kind.OTHER  # no ARJ header CRC
    assert detect(b"070707 is a number in this text" + bytes(100)) is Kind.OTHER
    assert detect(b"\xc7\x71" + bytes(100)) is Kind.OTHER  # binary cpio: no file type
    assert detect(b"MSCF\x00\x00\x00\x00" + bytes(40)) is Kind.OTHER  # no version 1.3
    assert detect(b"Rar!\x1a\x07\x01\x00") is Kind.RAR


def _cpio_with_size(declared: int, data: bytes) -> bytes:
    fields = (1, 0o100644, 0, 0, 1, 0, declared, 0, 0, 0, 0, 6, 0)
    return (b"070701" + b"".join(b"%08X" % f for f in fields) + b"a.com\x00"
            + data + bytes(512))


def test_declared_size_near_4_gib_is_bounded() -> None:
    # cpio's size field says 4 GiB - 16; the archive holds 68 bytes and padding. A format
    # without compression is no bomb: no size limit refuses it; libarchive cannot read it.
    data = _cpio_with_size(0xFFFFFFF0, EICAR)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        items = run(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0 and peak < 16 * 2**20
    assert len(parts(items)) == 1
    assert problems(items) == [Problem("m/a.com", ScanStatus.UNKNOWN,
                                       "corrupt cpio archive: unreadable (truncated or damaged)")]


def test_member_over_the_scan_size_is_skipped() -> None:
    data = make_cpio([("big.bin", bytes(5000)), ("eicar.com", EICAR)])
    items = run(data, Limits(max_scan_size=len(data) + 4999))
    assert [(p.path, p.reason, p.limit) for p in problems(items)] == [
        ("m/big.bin", "scan size limit", LimitKind.SIZE)]
    assert len(parts(items)) == 1  # a scan-size refusal stops the whole decomposition


def test_entry_count_is_bounded() -> None:
    data = make_cpio([(f"f{i}", b"x") for i in range(12)])
    items = run(data, Limits(max_files=5))
    reasons = [p.reason for p in problems(items)]
    assert reasons and all("limit" in r for r in reasons)
    assert all(p.limit is LimitKind.STRUCTURAL for p in problems(items))
    assert len(parts(items)) <= 6


# -- ARJ: stored members read by avgate.content.arj, compressed ones unknown --------------------
# Written by arj 3.10.22 (Debian's "arj a -m1"): eicar.com stored (it does not compress),
# notes.txt compressed with method 1. Kept as a test vector: the reader must take real output.
ARJ_TOOL_OUTPUT = bytes.fromhex(
    "60ea2d00220b01021000021b36e00e6b36e00e6b000000000000000000000000000000000000736d616c6c2e61726a00"
    "000aa1f435000060ea39002e0b01021000003612e00e6b44000000440000003ccf51680000a41100000000000012e00e"
    "6b12e00e6b0000000065696361722e636f6d00006a73542f000058354f2150254041505b345c505a58353428505e2937"
    "434329377d2445494341522d5354414e444152442d414e544956495255532d544553542d46494c452124482b482a60ea"
    "39002e0b01021001003636e00e6b2d000000600400004bd976540000a41100000000000036e00e6b36e00e6b00000000"
    "6e6f7465732e74787400005a9614d70000001a434e6d7f87680790d102077c644177f806a4d01ac3c700004f0e0538df"
    "5b3a821e6ede1596eb75badffb8060ea0000")


def test_arj_tool_output() -> None:
    assert detect(ARJ_TOOL_OUTPUT) is Kind.ARJ
    items = run(ARJ_TOOL_OUTPUT)
    assert [(p.path, p.data) for p in parts(items)[1:]] == [("m/eicar.com", EICAR)]
    assert problems(items) == [
        Problem("m/notes.txt", ScanStatus.UNKNOWN, "no reader for ARJ method 1")]


def test_arj_stored_members_and_clean_twin() -> None:
    items = run(make_arj([("docs/eicar.com", EICAR), ("b.txt", CLEAN_TEXT)]))
    assert not problems(items)
    assert [(p.path, p.data) for p in parts(items)[1:]] == [
        ("m/docs/eicar.com", EICAR), ("m/b.txt", CLEAN_TEXT)]
    assert not problems(run(make_arj([("readme.txt", CLEAN_TEXT)])))


def test_arj_encrypted_truncated_and_bad_crc() -> None:
    assert problems(run(make_arj([("a.com", EICAR)], flags=0x01))) == [
        Problem("m/a.com", ScanStatus.UNKNOWN, "encrypted")]
    cut = make_arj([("a.com", EICAR)])[:-20]
    items = run(cut)
    assert [p.data for p in parts(items)[1:]] == [EICAR[:-16]]
    assert [p.reason for p in problems(items)] == ["corrupt archive: truncated member"]
    data = bytearray(make_arj([("a.com", EICAR)]))
    data[-10] ^= 0xFF  # inside the member's data
    assert [p.reason for p in problems(run(bytes(data)))] == ["corrupt archive: bad CRC-32"]
    data = bytearray(make_arj([("a.com", EICAR)]))
    data[60] ^= 0xFF  # inside the member's header
    assert [p.reason for p in problems(run(bytes(data)))] == [
        "corrupt archive: ARJ: bad header CRC-32"]


def test_arj_entry_count_is_bounded() -> None:
    data = make_arj([(f"f{i}", b"x") for i in range(30)])
    items = run(data, Limits(max_files=5))
    assert [p.limit for p in problems(items)] == [LimitKind.STRUCTURAL]
    assert len(list(arj_entries(data, 100))) == 30
