"""Lenient zip: the central directory (CD) and every local header are both read.

Each case is first shown to fool a CD-only reader (Python's zipfile, as unzip reads), then
shown to be found by decomposition; identical reads are done once, and an interpretation that
does not decode is ``unknown`` only when no other one could be read.
"""

from __future__ import annotations

import io
import struct
import time
import zipfile
import zlib

import pytest

from avgate.content import Part, Problem, decompose
from avgate.limits import Limits
from avgate.result import LimitKind, ScanStatus
from tests.corpus import (
    CLEAN_TEXT,
    EICAR,
    _deflate,
    _local_entry,
    make_zip,
    raw_zip,
    zip_corrupt_extra,
    zip_duplicate_names,
    zip_local_only,
    zip_method_mismatch,
    zip_streamed,
)


def run(data: bytes, limits: Limits | None = None) -> list[Part | Problem]:
    return list(decompose(data, limits or Limits(), "m"))


def parts(items: list[Part | Problem]) -> list[Part]:
    return [i for i in items if isinstance(i, Part)]


def problems(items: list[Part | Problem]) -> list[Problem]:
    return [i for i in items if isinstance(i, Problem)]


def eicar_paths(items: list[Part | Problem]) -> list[str]:
    return [p.path for p in parts(items) if p.data == EICAR]


def test_member_only_a_local_header_describes() -> None:
    data = zip_local_only("eicar.com", EICAR)
    assert zipfile.ZipFile(io.BytesIO(data)).namelist() == ["readme.txt"]
    items = run(data)
    assert eicar_paths(items) == ["m/eicar.com"] and not problems(items)
    assert [p.path for p in parts(items)[1:]] == ["m/readme.txt", "m/eicar.com"]


def test_cd_and_local_header_disagree_on_the_method() -> None:
    data = zip_method_mismatch("eicar.com", EICAR)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.read("eicar.com") == _deflate(EICAR)  # the CD's view: deflate output
    items = run(data)
    assert eicar_paths(items) == ["m/eicar.com"] and not problems(items)
    # both interpretations are scanned: the CD's (stored) and the local header's (deflated)
    assert sorted(p.data for p in parts(items)[1:]) == sorted([_deflate(EICAR), EICAR])


def test_corrupt_extra_field_loses_nothing() -> None:
    data = zip_corrupt_extra("eicar.com", EICAR)
    with pytest.raises(zipfile.BadZipFile, match="Corrupt extra field"):
        zipfile.ZipFile(io.BytesIO(data))
    items = run(data)
    assert eicar_paths(items) == ["m/eicar.com"] and not problems(items)


def test_streamed_zip_with_data_descriptor_and_no_cd() -> None:
    data = zip_streamed("eicar.com", EICAR)
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(data))
    items = run(data)
    assert eicar_paths(items) == ["m/eicar.com"] and not problems(items)


def test_stored_member_with_data_descriptor() -> None:
    local = _local_entry("eicar.com", EICAR, zipfile.ZIP_STORED, crc=0, size=0, csize=0,
                         flags=0x8)
    data = local + struct.pack("<4sLLL", b"PK\x07\x08", zlib.crc32(EICAR), len(EICAR),
                               len(EICAR))
    items = run(data)
    assert eicar_paths(items) == ["m/eicar.com"] and not problems(items)


def test_duplicate_names_are_both_scanned() -> None:
    items = run(zip_duplicate_names(EICAR))
    assert [(p.path, p.data) for p in parts(items)[1:]] == [
        ("m/invoice.pdf", CLEAN_TEXT), ("m/invoice.pdf", EICAR)]


def test_an_ordinary_zip_is_read_once() -> None:
    data = make_zip([("a.txt", b"alpha"), ("b/", b""), ("b/c.txt", b"gamma")])
    items = run(data)
    assert [(p.path, p.data) for p in parts(items)[1:]] == [
        ("m/a.txt", b"alpha"), ("m/b/c.txt", b"gamma")]
    assert not problems(items)


def test_a_stored_zip_inside_is_left_to_the_recursion() -> None:
    inner = make_zip([("eicar.com", EICAR)], zipfile.ZIP_STORED)
    outer = make_zip([("inner.zip", inner)], zipfile.ZIP_STORED)
    items = run(outer)
    # the inner zip's local header lies inside the outer member's data: read once, nested
    assert eicar_paths(items) == ["m/inner.zip/eicar.com"]


def test_local_name_differs_from_cd_name_same_bytes_read_once() -> None:
    data = bytearray(make_zip([("eicar.com", EICAR)]))
    at = data.find(b"eicar.com")
    data[at:at + 5] = b"EVIL!"
    assert eicar_paths(run(bytes(data))) == ["m/eicar.com"]


def test_unreadable_interpretation_is_not_reported_when_another_reads() -> None:
    # the CD says deflated, the local header (and the data) stored: CD view fails to inflate
    data = bytearray(raw_zip([("eicar.com", zipfile.ZIP_STORED, 0, zlib.crc32(EICAR),
                                len(EICAR), EICAR)]))
    cd = data.find(b"PK\x01\x02")
    struct.pack_into("<H", data, cd + 10, zipfile.ZIP_DEFLATED)
    items = run(bytes(data))
    assert eicar_paths(items) == ["m/eicar.com"] and not problems(items)


def test_nothing_readable_is_unknown() -> None:
    data = raw_zip([("a.bin", zipfile.ZIP_DEFLATED, 0, 0, 10, b"\xff" * 8)])
    items = run(data)
    assert [(p.path, p.status) for p in problems(items)] == [("m/a.bin", ScanStatus.UNKNOWN)]
    assert problems(items)[0].reason.startswith("corrupt archive: ")


def test_encryption_in_either_view_is_unknown() -> None:
    data = bytearray(raw_zip([("eicar.com", zipfile.ZIP_STORED, 0, zlib.crc32(EICAR),
                                len(EICAR), EICAR)]))
    struct.pack_into("<H", data, 6, 0x1)  # the local header says encrypted, the CD does not
    items = run(bytes(data))
    assert Problem("m/eicar.com", ScanStatus.UNKNOWN, "encrypted") in problems(items)
    assert eicar_paths(items) == ["m/eicar.com"]  # the CD's plain view is still scanned


def test_cd_entry_without_a_local_header() -> None:
    data = bytearray(make_zip([("a.txt", b"alpha")]))
    data[0:4] = b"XXXX"
    items = run(bytes(data))
    assert [(p.path, p.reason) for p in problems(items)] == [
        ("m/a.txt", "corrupt archive: no local header where the central directory points")]


def test_junk_header_inside_member_data_is_ignored_but_between_members_is_not() -> None:
    junk = _local_entry("x", b"\xff" * 20, zipfile.ZIP_DEFLATED, crc=0, size=5, csize=20)
    inside = make_zip([("a.bin", b"prefix" + junk)], zipfile.ZIP_STORED)
    items = run(inside)
    assert not problems(items)  # part of a.bin's bytes, which were read
    between = junk + make_zip([("a.txt", b"alpha")])
    items = run(between)
    assert [p.status for p in problems(items)] == [ScanStatus.UNKNOWN]


def test_declared_sizes_near_4_gib_are_bounded() -> None:
    # a local-only stored member that claims 4 GiB - 16 bytes, and one deflated that claims
    # to inflate to that much: neither allocates it, neither is clean
    stored = _local_entry("s.com", EICAR, zipfile.ZIP_STORED, crc=zlib.crc32(EICAR),
                          size=0xFFFFFFF0, csize=0xFFFFFFF0)
    deflated = _local_entry("d.com", _deflate(EICAR), zipfile.ZIP_DEFLATED,
                            crc=zlib.crc32(EICAR), size=0xFFFFFFF0, csize=len(_deflate(EICAR)))
    start = time.perf_counter()
    items = run(deflated + stored)
    assert time.perf_counter() - start < 1.0
    assert eicar_paths(items) == ["m/s.com"]
    reasons = {(p.path, p.status, p.limit) for p in problems(items)}
    assert ("m/s.com", ScanStatus.UNKNOWN, None) in reasons  # truncated
    assert ("m/d.com", ScanStatus.SKIPPED, LimitKind.STRUCTURAL) in reasons  # ratio


def test_many_local_headers_hit_the_entry_count() -> None:
    entry = _local_entry("f", b"x", zipfile.ZIP_STORED, crc=zlib.crc32(b"x"), size=1, csize=1)
    items = run(entry * 12, Limits(max_files=5))
    assert [p.limit for p in problems(items)] == [LimitKind.STRUCTURAL]
    assert len(parts(items)) <= 6


def test_local_headers_past_the_entry_limit_are_refused_quickly() -> None:
    entry = _local_entry("f", b"", zipfile.ZIP_STORED, crc=0, size=0, csize=0)
    data = entry * 30_000  # 1 MB of empty members: max_files stops it at 10,000
    start = time.perf_counter()
    items = run(data)
    assert time.perf_counter() - start < 5.0
    assert problems(items)[-1].limit is LimitKind.STRUCTURAL


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA], ids=["bzip2", "lzma"])
def test_other_methods_are_read_from_the_raw_data(method: int) -> None:
    data = make_zip([("eicar.com", EICAR), ("b.txt", CLEAN_TEXT)], method)
    items = run(data)
    assert eicar_paths(items) == ["m/eicar.com"] and not problems(items)
    assert [p.data for p in parts(items)[1:]] == [EICAR, CLEAN_TEXT]


def test_unsupported_method_is_unknown() -> None:
    data = raw_zip([("a.bin", 98, 0, 0, 10, b"\x00" * 10)])  # PPMd
    assert problems(run(data)) == [
        Problem("m/a.bin", ScanStatus.UNKNOWN, "unsupported: compression method 98")]


def test_zip_magic_without_any_entry_is_corrupt_not_clean() -> None:
    # detect() calls it a zip; nothing in it reads: unknown (an empty archive stays clean)
    assert [p.reason for p in problems(run(b"PK\x07\x08" + b"garbage" * 4))] == [
        "corrupt archive: no zip entry found"]
    odd = b"PK\x03\x04" + bytes([20, 0, 0, 0, 0x34, 0x12]) + bytes(40)
    assert [p.reason for p in problems(run(odd))] == [
        "unsupported: compression method 4660"]
    assert not problems(run(b"PK\x05\x06" + bytes(18)))
