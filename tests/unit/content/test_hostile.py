"""Hostile containers at the content level: limits applied before listing, bypasses closed.

Every container reader checks entry counts, declared sizes and header sizes before a library
builds anything per entry; every Problem says which kind of limit it is (``LimitKind``) and
carries a fixed reason. The samples come from ``tests/unit/content/hostile.py``.
"""

from __future__ import annotations

import io
import random
import re
import struct
import tarfile
import time
import tracemalloc
import zipfile
from collections.abc import Callable

import py7zr
import pytest

from avgate.content import RATIO_FLOOR, Part, Problem, decompose, mime, mimeparse
from avgate.content.archives import zip_directory_problem
from avgate.content.filetype import HEADER_PROBE, Kind, detect, looks_like_mail, zip_at_end
from avgate.content.sevenzip import HEADER_BYTES_PER_FILE, sevenzip_header_problem
from avgate.limits import KiB, Limits
from avgate.result import LimitKind, ScanStatus
from tests.corpus import (
    EICAR,
    encode_uu,
    encrypted_zip,
    mail,
    make_7z,
    make_tar,
    make_zip,
    raw_zip,
    zip_bomb,
)
from tests.unit.content.hostile import (
    b64,
    begin_base64_text,
    corrupt_crc_7z,
    epilogue_mail,
    junk_prefixed_zip,
    long_first_header_mail,
    many_parts_mail,
    multipart_mail,
    preamble_mail,
    renamed_7z,
    self_extracting_zip,
    semicolon_parameter_mail,
    sevenzip,
    sevenzip_entry_bomb,
    sz_number,
    sz_raw_header,
    zip_entry_bomb,
)

LIMITS = Limits()
STRUCTURAL, SIZE = LimitKind.STRUCTURAL, LimitKind.SIZE


def run(data: bytes, limits: Limits = LIMITS, name: str = "m") -> list[Part | Problem]:
    return list(decompose(data, limits, name))


def problems(items: list[Part | Problem]) -> list[Problem]:
    return [i for i in items if isinstance(i, Problem)]


def found(items: list[Part | Problem], data: bytes = EICAR) -> list[str]:
    """Paths of the parts that are ``data`` (trailing blanks aside)."""
    return [i.path for i in items if isinstance(i, Part) and i.data.rstrip() == data]


def measured(call: Callable[[], object]) -> tuple[float, int]:
    """(seconds, peak bytes allocated by Python) for ``call()``: two runs, as tracemalloc
    slows Python code down several times."""
    start = time.perf_counter()
    call()
    elapsed = time.perf_counter() - start
    tracemalloc.start()
    try:
        call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return elapsed, peak


@pytest.fixture
def no_py7zr(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if py7zr is asked to open anything: the pre-check must decide."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("py7zr opened an archive the pre-check should have refused")
    monkeypatch.setattr(py7zr, "SevenZipFile", refuse)


@pytest.fixture
def no_zipfile(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("zipfile parsed a central directory the pre-check should refuse")
    monkeypatch.setattr(zipfile, "ZipFile", refuse)


@pytest.fixture
def no_mime_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a message the pre-count should refuse was parsed")
    monkeypatch.setattr(mimeparse, "parse", refuse)
    monkeypatch.setattr(mimeparse, "parse_email_package", refuse)


# -- 7z ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("coding", ["deflate", "lzma", "bzip2", "copy", None])
def test_7z_entry_bomb_is_refused_before_py7zr(coding: str | None, no_py7zr: None) -> None:
    data = sevenzip_entry_bomb(500_000, coding)
    elapsed, peak = measured(lambda: run(data))
    items = run(data)
    assert items[1:] == [Problem("m", ScanStatus.SKIPPED,
                                 "entry count limit (500000 entries > 2 x max_files 10000)",
                                 STRUCTURAL)]
    assert elapsed < 1.0
    # the decoded header (2 MB of names) is the largest thing held
    assert peak < 16 * 2**20


def test_7z_file_count_exactly_at_the_limit() -> None:
    data = sevenzip(sz_raw_header(50))
    assert sevenzip_header_problem("m", data, Limits(max_files=50)) is None
    items = run(data, Limits(max_files=50))
    assert len([i for i in items if isinstance(i, Part)]) == 51 and not problems(items)
    assert run(data, Limits(max_files=49))[1:] == [Problem(
        "m", ScanStatus.SKIPPED, "file count limit (more than max_files 49 files in the archive)",
        STRUCTURAL)]


def test_7z_directories_are_entries_not_files() -> None:
    data = sevenzip(sz_raw_header(20, directories=True))
    assert sevenzip_header_problem("m", data, Limits(max_files=10)) is None  # 20 <= 2 x 10
    problem = sevenzip_header_problem("m", data, Limits(max_files=9))
    assert problem is not None and problem.reason.startswith("entry count limit (20 entries")


def test_7z_declared_header_size_over_the_bound(no_py7zr: None) -> None:
    bound = 10 * HEADER_BYTES_PER_FILE + 64 * KiB
    data = sevenzip(sz_raw_header(3), declared=bound + 1)
    assert run(data, Limits(max_files=10))[1:] == [Problem(
        "m", ScanStatus.SKIPPED,
        f"7z header size limit ({bound + 1} bytes > {bound} for max_files 10)", STRUCTURAL)]


def test_7z_raw_header_over_the_bound(no_py7zr: None) -> None:
    data = sevenzip(sz_raw_header(2, name="n" * 40_000), coding=None)  # ~160 KB of names
    (problem,) = problems(run(data, Limits(max_files=1)))
    assert problem.reason.startswith("7z header size limit (") and problem.limit is STRUCTURAL


def test_7z_header_that_decodes_past_its_declared_size_is_cut_at_the_bound() -> None:
    header = sz_raw_header(30_000, name="abc")  # ~240 KB raw
    data = sevenzip(header, "deflate", declared=60 * KiB)  # a lie, under the bound
    (problem,) = problems(run(data, Limits(max_files=1)))
    assert problem.reason.startswith("7z header size limit (more than") or (
        problem.status is ScanStatus.UNKNOWN)


def test_7z_unknown_header_coding_is_not_let_through(no_py7zr: None) -> None:
    data = sevenzip(sz_raw_header(3), "deflate").replace(b"\x03\x04\x01\x08", b"\x03\x03\x04\x01")
    (problem,) = problems(run(data))
    assert problem == Problem("m", ScanStatus.SKIPPED, "7z header coding limit (not inspectable)",
                              STRUCTURAL)


@pytest.mark.parametrize("header", [
    b"\x01\x04\x07\x0b" + sz_number(10**9) + b"\x00",  # a billion folders
    b"\x01\x04\x06\x00" + sz_number(10**9) + b"\x00",  # a billion pack streams
    b"\x01\x04\x07\x0b\x01\x00\x01\x01\x00\x0c\x00\x00\x08\x0d" + sz_number(10**9) + b"\x00\x00",
], ids=["folders", "pack-streams", "substreams"])
def test_7z_stream_counts_are_bounded(header: bytes, no_py7zr: None) -> None:
    (problem,) = problems(run(sevenzip(header, coding=None)))
    assert problem.limit is STRUCTURAL and "count limit" in problem.reason


@pytest.mark.parametrize("mangle", [
    lambda d: d[:40],  # the next header is cut off
    lambda d: d[:12] + struct.pack("<Q", 10**12) + d[20:],  # ... or far outside the file
    lambda d: d[:-3],  # the raw header ends early
    lambda d: d[:-1] + b"\x42",  # no kEnd
    lambda d: d[:32] + b"\x99" + d[33:],  # an unknown header type
], ids=["cut", "offset", "truncated", "no-end", "type"])
def test_7z_malformed_header_is_unknown_never_clean(mangle: Callable[[bytes], bytes]) -> None:
    data = mangle(sevenzip(sz_raw_header(3), coding=None))
    bad = [p for p in problems(run(data)) if p.status is ScanStatus.UNKNOWN]
    assert bad and bad[0].limit is None and bad[0].reason.startswith("corrupt archive")


def _py7zr_archive(members: list[tuple[str, bytes]], **options: object) -> bytes:
    buf = io.BytesIO()
    with py7zr.SevenZipFile(buf, "w", **options) as archive:  # type: ignore[arg-type]
        for name, data in members:
            archive.writestr(data, name)
    return buf.getvalue()


@pytest.mark.parametrize("options", [
    {}, {"filters": [{"id": py7zr.FILTER_BZIP2}]}, {"filters": [{"id": py7zr.FILTER_DEFLATE}]},
    {"filters": [{"id": py7zr.FILTER_COPY}]}, {"filters": [{"id": py7zr.FILTER_PPMD}]},
    {"filters": [{"id": py7zr.FILTER_X86}, {"id": py7zr.FILTER_LZMA2}]},
], ids=["lzma2", "bzip2", "deflate", "copy", "ppmd", "bcj-lzma2"])
def test_ordinary_7z_archives_pass_the_pre_check(options: dict[str, object]) -> None:
    data = _py7zr_archive([(f"dir/f{i}.txt", b"%d" % i) for i in range(300)]
                          + [("eicar.com", EICAR), ("empty", b"")], **options)
    assert sevenzip_header_problem("m", data, LIMITS) is None
    items = run(data)
    assert found(items) == ["m/eicar.com"] and not problems(items)
    assert sevenzip_header_problem("m", data, Limits(max_files=301)) is not None


@pytest.mark.parametrize("header_encryption", [False, True])
def test_encrypted_7z_is_still_reported_encrypted(header_encryption: bool) -> None:
    data = _py7zr_archive([("eicar.com", EICAR)], password="pw",  # noqa: S106
                          header_encryption=header_encryption)
    assert [(p.status, p.reason, p.limit) for p in problems(run(data))] == [
        (ScanStatus.UNKNOWN, "encrypted", None)]


def test_7z_members_named_outside_the_archive_are_scanned() -> None:
    # py7zr refuses the whole archive for one such name; 7-Zip extracts them all.
    data = renamed_7z([("ok.txt", b"fine"), ("../evil.com", EICAR), ("C:x.com", EICAR),
                       ("/abs/e.com", EICAR)])
    items = run(data)
    assert found(items) == ["m/evil.com", "m/C:x.com", "m/abs/e.com"] and not problems(items)


def test_7z_bad_crc_does_not_hide_the_other_members() -> None:
    data = corrupt_crc_7z([("a.txt", b"A" * 40), ("eicar.com", EICAR)], "a.txt")
    items = run(data)
    assert found(items) == ["m/eicar.com"]
    assert problems(items) == [Problem("m/a.txt", ScanStatus.UNKNOWN,
                                       "corrupt archive: bad CRC-32")]


def test_7z_bomb_attached_to_a_small_mail() -> None:
    # The sample: a ~3 KB mail; delivered as "skipped" before, now structural.
    data = mail(attachments=[("bomb.7z", sevenzip_entry_bomb())])
    assert len(data) < 4096
    start = time.perf_counter()
    items = run(data)
    assert time.perf_counter() - start < 1.0
    assert problems(items) == [Problem(
        "m/2/bomb.7z", ScanStatus.SKIPPED,
        "entry count limit (500000 entries > 2 x max_files 10000)", STRUCTURAL)]


# -- zip --------------------------------------------------------------------------------------
def test_zip_declared_entry_count_is_refused_unparsed(no_zipfile: None) -> None:
    data = zip_entry_bomb(30_000)
    elapsed, peak = measured(lambda: run(data))
    assert run(data)[1:] == [Problem(
        "m", ScanStatus.SKIPPED, "entry count limit (30000 entries > 2 x max_files 10000)",
        STRUCTURAL)]
    assert elapsed < 0.5 and peak < 8 * 2**20


def test_zip_lying_entry_count_is_caught_by_walking_the_directory(no_zipfile: None) -> None:
    data = zip_entry_bomb(30_000, declared=1)  # zipfile would read all 30,000 anyway
    start = time.perf_counter()
    assert run(data)[1:] == [Problem(
        "m", ScanStatus.SKIPPED,
        "file count limit (more than max_files 10000 files in the archive)", STRUCTURAL)]
    assert time.perf_counter() - start < 0.5


def test_zip_file_count_exactly_at_the_limit() -> None:
    data = make_zip([(f"d{i}/", b"") for i in range(4)] + [(f"f{i}", b"x") for i in range(5)])
    assert zip_directory_problem("m", data, Limits(max_files=5)) is None  # 9 <= 2 x 5 entries
    assert len(run(data, Limits(max_files=5))) == 6
    problem = zip_directory_problem("m", data, Limits(max_files=4))
    assert problem is not None and problem.reason.startswith("entry count limit (9 entries")


def test_zip_central_directory_size_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    info = zipfile.ZipInfo("n" * 60_000)
    info.comment = b"c" * 60_000
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(info, b"x")
    monkeypatch.setattr(zipfile, "ZipFile", None)  # refused before zipfile is asked
    bound = 2 * 1 * 1024 + 64 * KiB
    (problem,) = problems(run(buf.getvalue(), Limits(max_files=1)))
    assert problem.reason.startswith("central directory size limit (")
    assert problem.reason.endswith(f"> {bound} for max_files 1)") and problem.limit is STRUCTURAL


@pytest.mark.parametrize("build", [junk_prefixed_zip, self_extracting_zip,
                                   lambda: b"\x00" * 70_000 + make_zip([("eicar.com", EICAR)])],
                         ids=["one-junk-byte", "sfx", "long-prefix"])
def test_zip_found_by_its_end_record(build: Callable[[], bytes]) -> None:
    data = build()
    assert detect(data) is Kind.ZIP
    items = run(data)
    assert found(items) == ["m/eicar.com"] and not problems(items)


def test_zip_end_record_needs_a_central_directory_behind_it() -> None:
    eocd = struct.pack("<4sHHHHLLH", b"PK\x05\x06", 0, 0, 1, 1, 46, 0, 0)
    assert not zip_at_end(b"text " * 20 + eocd)  # points at no central directory entry
    assert not zip_at_end(b"PK\x05\x06")  # too short
    assert detect(b"random bytes PK\x05\x06 and more") is Kind.OTHER
    assert zip_at_end(b"junk" + make_zip([("a", b"b")]))


def test_data_before_a_zip_is_searched_for_uuencoded_files() -> None:
    text = b"see below\r\n\r\n" + encode_uu(EICAR, "uu.com") + b"\r\n"
    items = run(text + make_zip([("a.txt", b"fine")]))
    assert found(items) == ["m/uu.com"]


def test_zip_member_with_bad_crc_is_scanned_then_reported() -> None:
    data = raw_zip([("eicar.com", zipfile.ZIP_STORED, 0, 1234, len(EICAR), EICAR)])
    items = run(data)
    assert found(items) == ["m/eicar.com"]
    assert problems(items) == [Problem("m/eicar.com", ScanStatus.UNKNOWN,
                                       "corrupt archive: bad CRC-32")]


def test_zip_member_whose_local_name_differs_is_scanned() -> None:
    data = bytearray(make_zip([("eicar.com", EICAR), ("b.txt", b"x")]))
    at = data.find(b"eicar.com")  # the local header's copy of the name
    data[at:at + 5] = b"EVIL!"
    items = run(bytes(data))
    assert found(items) == ["m/eicar.com"] and not problems(items)


def test_zip_declared_sizes_cannot_turn_a_small_member_into_a_size_limit() -> None:
    # A stored member cannot produce more than its stored bytes, whatever it declares.
    data = raw_zip([("eicar.com", zipfile.ZIP_STORED, 0, 0, 2**31, EICAR)])
    items = run(data, Limits(max_file_size=10_000))
    assert found(items) == ["m/eicar.com"]
    assert [p.limit for p in problems(items)] == [None]  # its CRC is wrong too: corrupt


# -- tar --------------------------------------------------------------------------------------
def _tar_of_directories(count: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(count):
            info = tarfile.TarInfo(f"d{i}")
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
    return buf.getvalue()


def test_tar_listing_stops_at_the_entry_limit() -> None:
    assert problems(run(_tar_of_directories(10), Limits(max_files=5))) == []
    assert problems(run(_tar_of_directories(11), Limits(max_files=5))) == [Problem(
        "m", ScanStatus.SKIPPED, "entry count limit (11 entries > 2 x max_files 5)", STRUCTURAL)]


# -- MIME -------------------------------------------------------------------------------------
def test_mime_part_count_is_refused_before_parsing(no_mime_parse: None) -> None:
    data = many_parts_mail(100_000)
    elapsed, peak = measured(lambda: run(data))
    items = run(data)
    assert items[1:] == [Problem("m", ScanStatus.SKIPPED,
                                 "file count limit (100000 MIME parts > max_files 10000)",
                                 STRUCTURAL)]
    assert elapsed < 0.5 and peak < 16 * 2**20


@pytest.mark.parametrize("fast", [True, False])
def test_mime_parsers_stop_at_the_part_limit_when_the_count_misses(
        fast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # Separator lines with trailing blanks are not counted, yet both parsers take them.
    data = many_parts_mail(200).replace(b"--b\r\n", b"--b \r\n")
    monkeypatch.setattr(mime, "FAST_PARSE", fast)
    assert mime.part_count_problem("m", data, 50) is None
    assert run(data, Limits(max_files=50))[1:] == [Problem(
        "m", ScanStatus.SKIPPED, "file count limit (more MIME parts than max_files 50)",
        STRUCTURAL)]
    assert len(run(data, Limits(max_files=200))) == 201


def test_mime_part_count_ignores_lines_that_only_look_like_separators() -> None:
    # a text part full of "-- comment" lines (an SQL dump) is no part bomb
    sql = b"".join(b"-- comment %d\r\nselect 1;\r\n" % i for i in range(200))
    data = (b"From: a@example.org\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=sep\r\n\r\n--sep\r\n"
            b"Content-Type: text/plain\r\n\r\n" + sql + b"--sep--\r\n")
    assert data.count(b"\n--") > 50
    assert mime.part_count_problem("m", data, 50) is None
    assert not problems(run(data, Limits(max_files=50)))


def test_quoted_parameter_full_of_semicolons_is_linear() -> None:
    data = semicolon_parameter_mail(62_000)
    start = time.perf_counter()
    items = run(data)
    assert time.perf_counter() - start < 0.5
    assert len(found(items)) == 1 and not problems(items)
    # ten times longer: still well under a second (the email package: minutes)
    start = time.perf_counter()
    run(semicolon_parameter_mail(620_000))
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(("first", "size"), [
    (b"Junk", 5_000), (b"X-Junk", 5_000), (b"Junk", 300_000), (b"A", 4_090),
])
def test_mail_whose_known_fields_start_late_is_mail(first: bytes, size: int) -> None:
    data = long_first_header_mail(size, first)
    assert looks_like_mail(data) and detect(data) is Kind.MAIL
    assert found(run(data)) == ["m/1"]


def test_folded_first_field_and_a_huge_header_block() -> None:
    folded = b"Junk: a\r\n" + b"\tfolded line\r\n" * 1000
    assert looks_like_mail(multipart_mail([EICAR], first_header=folded))
    # a header block of field lines past the probe counts as mail without a known field
    block = b"A: b\n" * (HEADER_PROBE // 5 + 10)
    assert looks_like_mail(block + b"\nbody") and not looks_like_mail(b"A: b\n" * 10 + b"\nbody")


@pytest.mark.parametrize("data", [
    b"Note: hello\n\nSubject: in the body does not count\n",
    b"Note: hello\nnot a field\nSubject: after the block\n",
    b"just text\nSubject: x\n",
])
def test_text_is_still_not_mail(data: bytes) -> None:
    assert not looks_like_mail(data)


def test_begin_base64_block_is_base64_decoded() -> None:
    items = run(begin_base64_text())
    assert found(items) == ["m/eicar.com"]
    # what follows "====" is not part of the file; uu blocks still work beside it
    text = begin_base64_text() + encode_uu(b"second file", "two.txt")
    parts = {i.path: i.data for i in run(text) if isinstance(i, Part)}
    assert parts["m/eicar.com"] == EICAR and parts["m/two.txt"] == b"second file"


def test_begin_base64_as_a_transfer_encoding() -> None:
    body = b"begin-base64 644 eicar.com\r\n" + b64(EICAR) + b"====\r\n"
    data = multipart_mail([b"x"]).replace(b"Content-Transfer-Encoding: base64\r\n\r\n"
                                          + b64(b"x"), b"Content-Transfer-Encoding: x-uue\r\n\r\n"
                                          + body)
    assert found(run(data)) == ["m/1"]


def test_preamble_and_epilogue_are_parts_of_their_own() -> None:
    assert found(run(preamble_mail())) == ["m/preamble"]
    assert found(run(epilogue_mail())) == ["m/epilogue"]
    paths = [i.path for i in run(multipart_mail([b"one", b"two"], preamble=b"pre\r\n",
                                                epilogue=b"epi\r\n")) if isinstance(i, Part)]
    assert paths == ["m", "m/preamble", "m/1", "m/2", "m/epilogue"]  # numbering unchanged


def test_blank_preamble_and_epilogue_are_not_parts() -> None:
    data = multipart_mail([b"one"], preamble=b" \r\n\t\r\n", epilogue=b"\r\n \r\n")
    assert [i.path for i in run(data) if isinstance(i, Part)] == ["m", "m/1"]


def test_nested_preamble_has_the_nested_path() -> None:
    inner = (b"Content-Type: multipart/mixed; boundary=in\r\n\r\n" + EICAR + b"\r\n"
             b"--in\r\n\r\nx\r\n--in--\r\n")
    data = multipart_mail([b"a"]).replace(b"--b0undary--", b"--b0undary\r\n" + inner
                                          + b"--b0undary--")
    assert found(run(data)) == ["m/2/preamble"]


# -- limit kinds and reasons ------------------------------------------------------------------
def _kinds(data: bytes, limits: Limits = LIMITS) -> set[tuple[ScanStatus, LimitKind | None]]:
    return {(p.status, p.limit) for p in problems(run(data, limits))}


def test_every_problem_says_which_limit() -> None:
    assert _kinds(zip_bomb()) == {(ScanStatus.SKIPPED, STRUCTURAL)}  # ratio
    big = make_zip([("big.bin", bytes(5000))])
    assert _kinds(big, Limits(max_file_size=4999)) == {(ScanStatus.SKIPPED, SIZE)}
    assert _kinds(big, Limits(max_scan_size=len(big) + 4999)) == {(ScanStatus.SKIPPED, SIZE)}
    nested = make_zip([("in.zip", make_zip([("a", b"1")]))])
    assert _kinds(nested, Limits(max_recursion=1)) == {(ScanStatus.UNKNOWN, STRUCTURAL)}
    inner = (b"From: a@b\r\nContent-Type: multipart/mixed; boundary=i\r\n"
             b"\r\n--i\r\n\r\ninner text\r\n--i--\r\n")
    deep = (b"From: a@b\r\nContent-Type: multipart/mixed; boundary=o\r\n"
            b"\r\n--o\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--o--\r\n")
    assert _kinds(deep, Limits(max_recursion=1)) == {(ScanStatus.UNKNOWN, STRUCTURAL)}
    assert _kinds(encrypted_zip("a", EICAR)) == {(ScanStatus.UNKNOWN, None)}
    # cut inside the deflate stream ([:60] holds the whole member: it is read)
    assert _kinds(make_zip([("a", bytes(range(100)))])[:60]) == {(ScanStatus.UNKNOWN, None)}
    zeros = make_7z([("z", bytes(2 * RATIO_FLOOR))])
    assert _kinds(zeros, Limits(max_ratio=2)) == {(ScanStatus.SKIPPED, STRUCTURAL)}
    noise = make_7z([("n", random.Random(7).randbytes(300_000))])
    assert _kinds(noise, Limits(max_scan_size=len(noise) + 100_000)) == {
        (ScanStatus.SKIPPED, SIZE)}
    tar = make_tar([("a", b"1"), ("b", b"2")])
    assert _kinds(tar, Limits(max_files=1)) == {(ScanStatus.SKIPPED, STRUCTURAL)}


_PRINTABLE = re.compile(r"[ -~]{1,300}")


def test_reasons_carry_no_archive_bytes() -> None:
    nasty = "\x1b[31mDELIVER\r\nX-Virus-Status: Clean\u202e.txt"
    samples = [
        make_zip([(nasty, b"x")])[:-30],  # a corrupt directory: zipfile's error text
        make_tar([(nasty, b"x" * 600)])[:700],
        raw_zip([(nasty, zipfile.ZIP_DEFLATED, 0, 0, 10, b"\xff" * 8)]),
        renamed_7z([("ab", b"x")])[:-5],
    ]
    for data in samples:
        for problem in problems(run(data)):
            assert _PRINTABLE.fullmatch(problem.reason), problem.reason
            assert "\r" not in problem.reason and "X-Virus" not in problem.reason


def test_many_boundary_parameters_in_one_folded_field_is_linear() -> None:
    # Each "boundary=" used to walk back over every continuation line before it.
    data = (b"From: a\r\nContent-Type: multipart/mixed" + b";\r\n boundary=x" * 20_000
            + b"\r\n\r\n--x\r\n\r\nbody\r\n--x--\r\n")
    start = time.perf_counter()
    run(data)
    assert time.perf_counter() - start < 1.0  # was 71 s


@pytest.mark.parametrize("fast", [True, False])
def test_header_lines_are_bounded_in_all(fast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mime, "FAST_PARSE", fast)
    monkeypatch.setattr(mime, "HEADER_LINES_BASE", 100)
    limits = Limits(max_files=5)  # 100 + 20 x 5 = 200 header lines in all
    assert mime.header_line_budget(5) == 200
    ok = b"From: a\r\n" + b"X-A: b\r\n" * 199 + b"\r\nbody\r\n"  # 200 lines
    assert not problems(run(ok, limits))
    too_many = b"From: a\r\n" + b"X-A: b\r\n" * 200 + b"\r\nbody\r\n"
    assert run(too_many, limits)[1:] == [Problem(
        "m", ScanStatus.SKIPPED, "header line limit (more than 200)", STRUCTURAL)]
    # spread over parts: the budget is for the whole message
    parts = b"".join(b"--b\r\n" + b"X-A: b\r\n" * 50 + b"\r\nx\r\n" for _ in range(4))
    spread = (b"From: a\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" + parts
              + b"--b--\r\n")
    assert [p.reason for p in problems(run(spread, limits))] == [
        "header line limit (more than 200)"]
