"""Archive and MIME bombs: refused by what they declare, before anything is listed.

Before the fix (issue 11, section 1): a 2 KB 7z whose Deflate-coded header lists 500,000
empty files took 69-77 s and 0.6-1.2 GiB in py7zr and came out ``skipped`` (delivered
with a tag); attached to a 3 KB mail it froze the SMTP front-end for 35 s. A zip whose
end record declares (or whose central directory holds) 30,000-100,000 entries took 1.2-2 s,
a 100,000-part message 1.9-3.4 s, and a 62 KB mail with one quoted parameter full of ";"
blocked for 2.7-7 s (quadratic in the email package). Now every container reader checks
entry counts and header sizes first; each is refused in milliseconds as a *structural* limit
(not passed by default on any front-end), and the parameter parser is linear. Two more found
on the way: a Content-Type folded over 20,000 "; boundary=x" lines (71 s, quadratic) and
a mail of 2,000,000 header lines (20 s, 570 MiB).

Every sample is generated here (see tests/unit/content/hostile.py).
"""

from __future__ import annotations

import io
import tarfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from avgate.engines.base import EngineContext, build_engine
from avgate.engines.embedded import EICAR_NAME, EmbeddedEngine, EmbeddedEngineSettings
from avgate.limits import Limits
from avgate.result import LimitKind, ScanResult, ScanStatus
from tests.corpus import EICAR, mail, make_zip
from tests.unit.content.hostile import (
    many_parts_mail,
    multipart_mail,
    semicolon_parameter_mail,
    sevenzip_entry_bomb,
    zip_entry_bomb,
)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedEngine:
    ctx = EngineContext(limits=Limits(), base_dir=str(tmp_path_factory.mktemp("bombs")))
    eng = build_engine(EmbeddedEngineSettings(), ctx)
    assert isinstance(eng, EmbeddedEngine)
    eng.load()
    return eng


def timed(engine: EmbeddedEngine, data: bytes) -> tuple[ScanResult, float]:
    """The verdict and the seconds it took (tracemalloc off: it slows Python code ~5x)."""
    start = time.perf_counter()
    result = engine.scan_bytes(data)
    return result, time.perf_counter() - start


def scan(engine: EmbeddedEngine, data: bytes) -> tuple[ScanResult, float, int]:
    """The verdict, the seconds it took and the peak Python allocation (bytes), from two
    runs: tracemalloc slows Python code down several times."""
    result, elapsed = timed(engine, data)
    tracemalloc.start()
    try:
        assert engine.scan_bytes(data) == result
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, elapsed, peak


def assert_structural(result: ScanResult, reason: str) -> None:
    assert result.status is ScanStatus.SKIPPED
    assert result.limit is LimitKind.STRUCTURAL
    assert reason in result.reason


MiB = 2**20


# -- section 1: entry bombs ------------------------------------------------------------------
@pytest.mark.parametrize("coding", ["deflate", "lzma", None])
def test_7z_with_500000_declared_entries(engine: EmbeddedEngine, coding: str | None) -> None:
    data = sevenzip_entry_bomb(500_000, coding)
    result, elapsed, peak = scan(engine, data)
    assert_structural(result, "entry count limit (500000 entries > 2 x max_files 10000)")
    assert elapsed < 1.0, elapsed  # was 69-77 s
    assert peak < 32 * MiB, peak  # was 0.6-1.2 GiB


def test_3kb_mail_carrying_the_7z_bomb_is_structural_not_skipped_and_delivered(
        engine: EmbeddedEngine) -> None:
    data = mail(attachments=[("bomb.7z", sevenzip_entry_bomb())])
    assert len(data) < 4096
    result, elapsed, peak = scan(engine, data)
    assert_structural(result, "bomb.7z: entry count limit (500000 entries")
    assert elapsed < 1.0 and peak < 32 * MiB


@pytest.mark.parametrize(("data", "reason"), [
    (lambda: zip_entry_bomb(100_000), "entry count limit (65535 entries > 2 x max_files"),
    (lambda: zip_entry_bomb(30_000, declared=1),
     "file count limit (more than max_files 10000 files in the archive)"),
], ids=["declared", "lying-count"])
def test_zip_entry_bombs(engine: EmbeddedEngine, data: Callable[[], bytes], reason: str) -> None:
    result, elapsed, peak = scan(engine, data())
    assert_structural(result, reason)
    assert elapsed < 0.5, elapsed  # was 1.2-2 s
    assert peak < 16 * MiB, peak


def test_tar_listing_stops_at_the_entry_limit(engine: EmbeddedEngine) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(20_001):  # 10 MB of directory headers
            info = tarfile.TarInfo(f"d{i}")
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
    # Garbage after the limit: never read (it would be a corrupt archive otherwise).
    data = buf.getvalue()[:-1024] + b"\xff" * 4096
    result, elapsed = timed(engine, data)  # tarfile spends ~30 us an entry
    assert_structural(result, "entry count limit (20001 entries > 2 x max_files 10000)")
    assert elapsed < 2.0, elapsed


def test_mail_with_100000_parts(engine: EmbeddedEngine) -> None:
    result, elapsed, peak = scan(engine, many_parts_mail(100_000))
    assert_structural(result, "file count limit (100000 MIME parts > max_files 10000)")
    assert elapsed < 0.5, elapsed  # was 1.9-3.4 s
    assert peak < 16 * MiB, peak


def test_boundary_parameters_in_one_folded_field(engine: EmbeddedEngine) -> None:
    # Found on the way: 280 KB, one Content-Type folded over 20,000 lines of "; boundary=x"
    # (each looked back over every line before it): 71 s before, quadratic.
    data = (b"From: a\r\nContent-Type: multipart/mixed" + b";\r\n boundary=x" * 20_000
            + b"\r\n\r\n--x\r\n\r\n" + EICAR + b"\r\n--x--\r\n")
    result, elapsed = timed(engine, data)
    assert result.status is ScanStatus.INFECTED
    assert elapsed < 1.0, elapsed


def test_mail_of_two_million_header_lines(engine: EmbeddedEngine) -> None:
    # Found on the way: 12 MB of "A: b" header lines became 2M (name, value) pairs (and a
    # regex backtracking stack per line): 20 s and 570 MiB before.
    data = b"From: a@example.org\r\n" + b"A: b\r\n" * 2_000_000 + b"\r\nbody\r\n"
    result, elapsed, peak = scan(engine, data)
    assert_structural(result, "header line limit (more than 300000)")
    assert elapsed < 3.0, elapsed
    assert peak < 64 * MiB, peak


def test_quoted_parameter_full_of_semicolons(engine: EmbeddedEngine) -> None:
    data = semicolon_parameter_mail(62_000)
    result, elapsed = timed(engine, data)
    assert result.status is ScanStatus.INFECTED  # the attachment is decoded and found
    assert elapsed < 0.5, elapsed  # was 2.7-7 s


# -- section 4: attacker-chosen limits are structural -----------------------------------------
def test_eicar_as_mime_part_10002(engine: EmbeddedEngine) -> None:
    data = multipart_mail([b"x"] * 10_001 + [EICAR])
    assert_structural(engine.scan_bytes(data), "file count limit (10002 MIME parts")


def test_zip_with_10001_members(engine: EmbeddedEngine) -> None:
    data = make_zip([(f"f{i}.txt", b"") for i in range(10_000)] + [("eicar.com", EICAR)])
    assert_structural(engine.scan_bytes(data), "file count limit (more than max_files 10000")


def test_nesting_deeper_than_max_recursion(engine: EmbeddedEngine) -> None:
    data = EICAR
    for level in range(18):
        data = make_zip([(f"level{level}.zip" if level else "eicar.com", data)])
    result = engine.scan_bytes(data)
    assert result.status is ScanStatus.UNKNOWN and result.limit is LimitKind.STRUCTURAL
    assert "recursion limit" in result.reason


def test_size_limits_stay_size_limits(tmp_path: Path) -> None:
    ctx = EngineContext(limits=Limits(max_file_size=1000), base_dir=str(tmp_path))
    eng = build_engine(EmbeddedEngineSettings(), ctx)
    assert isinstance(eng, EmbeddedEngine)
    eng.load()
    data = make_zip([("big.bin", bytes(range(256)) * 8), ("eicar.com", EICAR)])
    assert eng.scan_bytes(data).findings[0].name == EICAR_NAME  # infected wins
    result = eng.scan_bytes(make_zip([("big.bin", bytes(range(256)) * 8)]))
    assert (result.status, result.limit) == (ScanStatus.SKIPPED, LimitKind.SIZE)
