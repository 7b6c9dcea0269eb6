"""Each Limits value on its own: exactly at the limit passes, one over is refused."""

from __future__ import annotations

import gzip
import io
import tarfile
import zipfile
from collections.abc import Callable

import pytest

from avgate.content import RATIO_FLOOR, Part, Problem, decompose
from avgate.limits import Limits
from avgate.result import LimitKind, ScanStatus
from tests.corpus import EICAR, make_7z, make_tar, make_zip, zip_bomb

RATIO = "compression ratio limit (possible archive bomb)"


def run(data: bytes, limits: Limits) -> list[Part | Problem]:
    return list(decompose(data, limits, "m"))


def outcome(items: list[Part | Problem]) -> list[tuple[str, str]]:
    return [(i.path, i.reason if isinstance(i, Problem) else "part") for i in items]


# -- max_file_size --------------------------------------------------------------------------
@pytest.mark.parametrize("build", [make_zip, make_7z], ids=["zip", "7z"])
def test_max_file_size_member(build: Callable[[list[tuple[str, bytes]]], bytes]) -> None:
    # Compressible members, so the archive itself stays under the limit being tested.
    data = build([("big.bin", bytes(5000)), ("small.txt", b"ok")])
    assert len(data) < 4999
    assert outcome(run(data, Limits(max_file_size=5000)))[1:] == [
        ("m/big.bin", "part"), ("m/small.txt", "part")]
    items = run(data, Limits(max_file_size=4999))
    assert outcome(items)[1:] == [("m/big.bin", "file size limit"), ("m/small.txt", "part")]
    assert items[1] == Problem("m/big.bin", ScanStatus.SKIPPED, "file size limit",
                               LimitKind.SIZE)


def test_max_file_size_of_a_decompressed_stream() -> None:
    data = gzip.compress(bytes(range(256)) * 20, mtime=0)  # 5120 bytes
    assert outcome(run(data, Limits(max_file_size=5120)))[1:] == [("m/data", "part")]
    assert outcome(run(data, Limits(max_file_size=5119)))[1:] == [
        ("m/data", "file size limit")]


def test_max_file_size_root() -> None:
    assert outcome(run(b"x" * 100, Limits(max_file_size=100))) == [("m", "part")]
    assert run(b"x" * 101, Limits(max_file_size=100)) == [
        Problem("m", ScanStatus.SKIPPED, "file size limit", LimitKind.SIZE)]


# -- max_files ------------------------------------------------------------------------------
def test_max_files() -> None:
    data = make_zip([(f"f{i}.txt", b"%d" % i) for i in range(3)])
    assert [i.path for i in run(data, Limits(max_files=3))] == [
        "m", "m/f0.txt", "m/f1.txt", "m/f2.txt"]
    # One file too many: the archive's central directory is refused before anything is
    # extracted (a structural limit: the sender chose the shape).
    items = run(data, Limits(max_files=2))
    assert items[1:] == [Problem("m", ScanStatus.SKIPPED,
                                 "file count limit (more than max_files 2 files in the archive)",
                                 LimitKind.STRUCTURAL)]


def test_max_files_counts_parts_across_containers() -> None:
    # Each archive fits on its own; the running count stops the decomposition.
    data = make_tar([("a.zip", make_zip([("a1", b"1"), ("a2", b"2")])),
                     ("b.zip", make_zip([("b1", b"3"), ("b2", b"4")]))])
    items = run(data, Limits(max_files=4))
    assert outcome(items) == [("m", "part"), ("m/a.zip", "part"), ("m/a.zip/a1", "part"),
                              ("m/a.zip/a2", "part"), ("m/b.zip", "part"),
                              ("m/b.zip/b1", "file count limit")]
    assert items[-1] == Problem("m/b.zip/b1", ScanStatus.SKIPPED, "file count limit",
                                LimitKind.STRUCTURAL)


def test_max_files_stops_nested_decomposition_too() -> None:
    inner = make_zip([("a", b"1"), ("b", b"2")])
    data = make_zip([("inner.zip", inner), ("after.txt", b"3")])
    assert outcome(run(data, Limits(max_files=2))) == [
        ("m", "part"), ("m/inner.zip", "part"), ("m/inner.zip/a", "part"),
        ("m/inner.zip/b", "file count limit")]


# -- max_scan_size --------------------------------------------------------------------------
def test_max_scan_size() -> None:
    data = make_tar([("a.txt", b"a" * 300), ("b.txt", b"b" * 300)])
    total = len(data) + 600
    assert outcome(run(data, Limits(max_scan_size=total)))[1:] == [
        ("m/a.txt", "part"), ("m/b.txt", "part")]
    items = run(data, Limits(max_scan_size=total - 1))
    assert outcome(items)[1:] == [("m/a.txt", "part"), ("m/b.txt", "scan size limit")]
    assert sum(len(i.data) for i in items if isinstance(i, Part)) <= total - 1


def test_max_scan_size_stops_everything_after_it() -> None:
    data = make_zip([("a.txt", b"a" * 300), ("b.txt", b"b" * 10), ("c.txt", b"c" * 10)])
    items = run(data, Limits(max_scan_size=len(data) + 299))
    assert outcome(items) == [("m", "part"), ("m/a.txt", "scan size limit")]


def test_max_scan_size_root() -> None:
    assert run(b"x" * 11, Limits(max_scan_size=10)) == [
        Problem("m", ScanStatus.SKIPPED, "scan size limit", LimitKind.SIZE)]


# -- max_recursion --------------------------------------------------------------------------
def test_max_recursion() -> None:
    data = make_zip([("inner.zip", make_zip([("eicar.com", EICAR)]))])
    assert outcome(run(data, Limits(max_recursion=2))) == [
        ("m", "part"), ("m/inner.zip", "part"), ("m/inner.zip/eicar.com", "part")]
    items = run(data, Limits(max_recursion=1))
    assert outcome(items) == [("m", "part"), ("m/inner.zip", "part"),
                              ("m/inner.zip", "recursion limit")]
    assert items[-1].status is ScanStatus.UNKNOWN  # type: ignore[union-attr]


def test_max_recursion_in_mime() -> None:
    inner = (b"From: a@b\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=i\r\n"
             b"\r\n--i\r\n\r\ninner text\r\n--i--\r\n")
    data = (b"From: a@b\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=o\r\n"
            b"\r\n--o\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--o--\r\n")
    assert outcome(run(data, Limits(max_recursion=2))) == [("m", "part"), ("m/1/1", "part")]
    assert outcome(run(data, Limits(max_recursion=1))) == [("m", "part"),
                                                           ("m/1", "recursion limit")]


# -- max_ratio ------------------------------------------------------------------------------
def _zeros_zip(size: int) -> tuple[bytes, float]:
    data = make_zip([("zeros.bin", bytes(size))])
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.infolist()[0]
    return data, info.file_size / info.compress_size


def test_max_ratio_declared_sizes() -> None:
    data, ratio = _zeros_zip(2 * RATIO_FLOOR)
    assert outcome(run(data, Limits(max_ratio=ratio)))[1:] == [("m/zeros.bin", "part")]
    assert outcome(run(data, Limits(max_ratio=ratio * 0.999)))[1:] == [("m/zeros.bin", RATIO)]


def test_max_ratio_is_not_applied_to_small_members() -> None:
    data, ratio = _zeros_zip(RATIO_FLOOR)
    assert ratio > 250
    assert outcome(run(data, Limits(max_ratio=2)))[1:] == [("m/zeros.bin", "part")]


def test_max_ratio_while_streaming() -> None:
    data = gzip.compress(bytes(2 * RATIO_FLOOR), mtime=0)
    ratio = 2 * RATIO_FLOOR / len(data)
    assert outcome(run(data, Limits(max_ratio=ratio)))[1:] == [("m/data", "part")]
    assert outcome(run(data, Limits(max_ratio=ratio * 0.999)))[1:] == [("m/data", RATIO)]


def test_max_ratio_7z_judged_on_the_whole_archive() -> None:
    data = make_7z([("zeros.bin", bytes(2 * RATIO_FLOOR))])
    ratio = 2 * RATIO_FLOOR / len(data)
    assert outcome(run(data, Limits(max_ratio=ratio)))[1:] == [("m/zeros.bin", "part")]
    assert outcome(run(data, Limits(max_ratio=ratio * 0.999)))[1:] == [("m", RATIO)]


def test_lying_zip_header_cannot_blow_memory() -> None:
    data = zip_bomb(64 * RATIO_FLOOR, declared=1000)  # claims 1000 bytes, inflates to 64 MiB
    items = run(data, Limits(max_file_size=4 * RATIO_FLOOR))
    assert all(len(i.data) <= 4 * RATIO_FLOOR for i in items if isinstance(i, Part))
    (problem,) = [i for i in items if isinstance(i, Problem)]
    assert problem.status in (ScanStatus.UNKNOWN, ScanStatus.SKIPPED)


def test_gzip_bomb_is_stopped_at_the_cap() -> None:
    data = zip_bomb(64 * RATIO_FLOOR)  # reuse the crafted deflate stream inside a gzip
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.infolist()[0]
    start = 30 + len(info.filename)
    deflate = data[start:start + info.compress_size]
    gz = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + deflate + info.CRC.to_bytes(4, "little") \
        + (64 * RATIO_FLOOR).to_bytes(4, "little")
    items = run(gz, Limits())
    assert outcome(items) == [("m", "part"), ("m/data", RATIO)]


def test_tar_member_declared_size_is_checked_before_reading() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("huge.bin")
        info.size = 10_000
        tf.addfile(info, io.BytesIO(bytes(10_000)))
    items = run(buf.getvalue(), Limits(max_file_size=len(buf.getvalue()),
                                       max_scan_size=10**9))
    assert outcome(items)[1:] == [("m/huge.bin", "part")]
    items = run(buf.getvalue(), Limits(max_scan_size=len(buf.getvalue()) + 9_999))
    assert items[1:] == [Problem("m/huge.bin", ScanStatus.SKIPPED, "scan size limit",
                                 LimitKind.SIZE)]


def test_tar_member_declared_past_the_end_is_truncated_not_a_size_limit() -> None:
    # A header may claim any size; the member cannot hold more than the archive does. What
    # is there is scanned, then the truncation is reported (corrupt: no limit at all).
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("huge.bin")
        info.size = 10_000
        tf.addfile(info, io.BytesIO(EICAR + bytes(10_000 - len(EICAR))))
    items = run(buf.getvalue()[:2048], Limits(max_file_size=5000))  # truncated member
    assert [(i.path, i.data[:len(EICAR)]) for i in items if isinstance(i, Part)][1:] == [
        ("m/huge.bin", EICAR)]
    assert [i for i in items if isinstance(i, Problem)] == [
        Problem("m/huge.bin", ScanStatus.UNKNOWN, "corrupt archive: truncated member")]
