"""decompose(): what it yields for every corpus sample, paths, ambiguities, corrupt input."""

from __future__ import annotations

import gzip
import io
import os
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import pytest

from avgate.content import Part, Problem, decompose, sanitize_name
from avgate.limits import Limits
from avgate.result import ScanStatus
from tests.corpus import (
    BOMB_SIZE,
    EICAR,
    EICAR_NAME,
    MARKER,
    MARKER_NAME,
    ZIP_PASSWORD,
    Sample,
    corpus,
    encode_base64,
    mail,
    make_7z,
    make_zip,
    sample,
)

LIMITS = Limits()


def run(data: bytes, limits: Limits = LIMITS, name: str = "m") -> list[Part | Problem]:
    return list(decompose(data, limits, name))


def parts(items: list[Part | Problem]) -> list[Part]:
    return [i for i in items if isinstance(i, Part)]


def problems(items: list[Part | Problem]) -> list[Problem]:
    return [i for i in items if isinstance(i, Problem)]


# -- the corpus -----------------------------------------------------------------------------
@pytest.mark.parametrize("s", corpus(), ids=lambda s: s.name)
def test_corpus_sample(s: Sample) -> None:
    items = run(s.data, name=s.name)
    root = items[0]
    assert isinstance(root, Part) and root.path == s.name and root.depth == 0
    assert root.data == s.data
    found = parts(items)
    if s.virus == EICAR_NAME:
        # Exact bytes: the EICAR md5 signature must match a part, not just contain it.
        assert any(p.data == EICAR for p in found)
    elif s.virus == MARKER_NAME:
        assert any(MARKER in p.data for p in found)
    else:
        # nothing decoded out of it carries a signature (the object itself may hold the
        # bytes in the clear: a hand-built "encrypted" RAR, an ARJ method we cannot read)
        assert not any(EICAR in p.data or MARKER in p.data for p in found if p is not root)
    statuses = {p.status for p in problems(items)}
    if s.expected in (ScanStatus.SKIPPED, ScanStatus.UNKNOWN):
        assert s.expected in statuses
    else:
        assert statuses == set()


def test_every_nested_part_is_deeper_than_its_container() -> None:
    for s in corpus():
        for p in parts(run(s.data, name=s.name))[1:]:
            assert p.depth >= 1
            assert p.path.startswith(s.name)


@pytest.mark.parametrize(("name", "path"), [
    ("mail-base64.eml", "x/2/eicar.com"),
    ("mail-qp.eml", "x/2/eicar.com"),
    ("mail-uuencode-body.eml", "x/1/eicar.com"),
    ("mail-nested-rfc822.eml", "x/2/2/eicar.com"),
    ("eicar-in-zip.zip", "x/inner.zip/eicar.com"),
    ("eicar.tar.gz", "x/data/dir/eicar.com"),
    ("eicar.7z", "x/eicar.com"),
    ("eicar.com.xz", "x/data"),
])
def test_eicar_path(name: str, path: str) -> None:
    found = [p for p in parts(run(sample(name).data, name="x")) if p.data == EICAR]
    assert [p.path for p in found] == [path]


def test_path_uses_the_archive_name_for_compressed_streams() -> None:
    paths = [p.path for p in parts(run(sample("eicar.tar.gz").data, name="a/b.tar.gz"))]
    assert paths == ["a/b.tar.gz", "a/b.tar.gz/b.tar", "a/b.tar.gz/b.tar/dir/eicar.com"]


def test_containers_are_yielded_as_well_as_members() -> None:
    inner = make_zip([("eicar.com", EICAR)])
    items = parts(run(make_zip([("inner.zip", inner)])))
    assert [(p.path, p.depth) for p in items] == [
        ("m", 0), ("m/inner.zip", 1), ("m/inner.zip/eicar.com", 2)]
    assert items[1].data == inner


def test_encrypted_sample_really_is_encrypted() -> None:
    data = sample("eicar-encrypted.zip").data
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.read("eicar.com", pwd=ZIP_PASSWORD) == EICAR
        with pytest.raises(RuntimeError):
            zf.read("eicar.com")  # no password
    assert EICAR not in data


def test_zip_bomb_inflates_to_its_declared_size_but_is_not_extracted() -> None:
    data = sample("zip-bomb.zip").data
    assert len(data) < 300_000
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        (info,) = zf.infolist()
    assert info.file_size == BOMB_SIZE
    raw = data[30 + len(info.filename):30 + len(info.filename) + info.compress_size]
    inflater, total, crc = zlib.decompressobj(-15), 0, 0
    while raw:
        chunk = inflater.decompress(raw, 1 << 24)
        total, crc = total + len(chunk), zlib.crc32(chunk, crc)
        raw = inflater.unconsumed_tail
    assert (total, crc) == (BOMB_SIZE, info.CRC)
    start = time.perf_counter()
    items = run(data)
    assert time.perf_counter() - start < 0.5
    assert [p.reason for p in problems(items)] == [
        "compression ratio limit (possible archive bomb)"]


# -- names and paths ------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "clean"), [
    ("../../evil.com", "evil.com"),
    ("/abs/evil.com", "abs/evil.com"),
    ("..\\..\\win\\evil.exe", "win/evil.exe"),
    ("a/./b/../c", "a/b/c"),
    ("bad\x00na\x1bme\x7f.txt", "badname.txt"),
    ("../..", "unnamed"),
    ("", "unnamed"),
])
def test_sanitize_name(raw: str, clean: str) -> None:
    assert sanitize_name(raw) == clean


def test_traversal_members_are_labels_only_and_nothing_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.mkdir(tmp_path / "tmp")
    items = run(sample("zip-path-traversal.zip").data, name="z.zip")
    assert [p.path for p in parts(items) if p.data == EICAR] == ["z.zip/evil.com",
                                                                 "z.zip/abs/evil.com"]
    for s in corpus():
        run(s.data, name=s.name)
    run(make_7z([("dir/a.txt", b"a"), ("b.txt", b"b")]))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["tmp", "work"]


# -- MIME details ---------------------------------------------------------------------------
def test_duplicate_boundary_scans_the_last_boundary_reading() -> None:
    items = parts(run(sample("mail-duplicate-boundary.eml").data))
    python_view = [p for p in items if "~boundary2" not in p.path]
    other_view = [p for p in items if p.path.startswith("m~boundary2/")]
    assert not any(EICAR in p.data for p in python_view)  # what the email package sees
    assert [p.path for p in other_view if p.data == EICAR] == ["m~boundary2/2/invoice.com"]


def test_duplicate_boundary_does_not_rescan_identical_parts() -> None:
    body = (b"From: a@b\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="X"; boundary="X"\r\n\r\n'
            b"--X\r\nContent-Type: text/plain\r\n\r\nsame\r\n--X--\r\n")
    assert [p.path for p in parts(run(body))] == ["m", "m/1"]


def test_single_boundary_messages_are_parsed_once() -> None:
    data = mail(attachments=[("a.txt", b"alpha"), ("b.txt", b"beta")],
                boundary="boundary-with-boundary-in-it")
    paths = [p.path for p in parts(run(data))]
    assert paths == ["m", "m/preamble", "m/1", "m/2/a.txt", "m/3/b.txt"]


def test_duplicate_transfer_encoding_decodes_both() -> None:
    payload = encode_base64(EICAR)
    body = (b"From: a@b\r\nMIME-Version: 1.0\r\nContent-Transfer-Encoding: 7bit\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + payload)
    found = {p.path: p.data for p in parts(run(body))}
    assert found["m/1"] == payload
    assert found["m/1~cte2"] == EICAR


def test_base64_padding_in_the_middle_decodes_the_rest_too() -> None:
    hidden = b"QUE=\r\n" + encode_base64(EICAR)  # Python stops after the padded "AA"
    body = (b"From: a@b\r\nMIME-Version: 1.0\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + hidden)
    found = {p.path: p.data for p in parts(run(body))}
    assert EICAR not in found["m/1"]
    assert found["m/1"] == b"AA"
    assert found["m/1~b64"] == b"AA" + EICAR


def test_rfc2231_and_rfc2047_filenames() -> None:
    body = (b"From: a@b\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n"
            b"\r\n--b\r\nContent-Disposition: attachment; filename*=UTF-8''%E2%82%ACvil.com\r\n"
            b"\r\nx\r\n--b\r\nContent-Disposition: attachment;"
            b" filename=\"=?utf-8?b?w6l2aWwuZXhl?=\"\r\n\r\ny\r\n--b--\r\n")
    assert [p.path for p in parts(run(body))][1:] == ["m/1/\u20acvil.com", "m/2/\u00e9vil.exe"]


def test_text_that_is_not_mail_is_not_parsed_as_mail() -> None:
    text = b"Note: this is a plain file.\n\nFrom: nobody\n"
    assert [p.path for p in parts(run(text))] == ["m"]


def test_deep_multipart_nesting_is_a_recursion_problem() -> None:
    levels = 50
    body = b"".join(b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
                    for i in range(levels))
    data = (b"From: a@b\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"
            + body + b"--b%d\r\n\r\ndeep\r\n" % levels)
    items = run(data, Limits(max_recursion=5))
    assert [p.reason for p in problems(items)] == ["recursion limit"]
    assert all(p.depth <= 5 for p in parts(items))


# -- corrupt and odd archives ---------------------------------------------------------------
def test_truncated_zip_is_corrupt_but_still_scanned_raw() -> None:
    # cut inside the member's deflate stream (at [:60] the whole member is there and is
    # read from its local header: no longer a problem, see test_lenient_zip.py)
    data = make_zip([("a.txt", b"hello world" * 100)])[:45]
    items = run(data)
    assert items[0] == Part("m", data, 0)
    (problem,) = problems(items)
    assert problem.status is ScanStatus.UNKNOWN and problem.reason.startswith("corrupt archive")


def test_truncated_gzip_yields_what_decompressed_and_a_problem() -> None:
    data = gzip.compress(EICAR + bytes(range(256)) * 40, mtime=0)[:-30]
    items = run(data, name="f.gz")
    assert any(p.data.startswith(EICAR) for p in parts(items)[1:])
    assert [p.reason for p in problems(items)] == ["corrupt archive: truncated stream"]


def test_concatenated_gzip_streams_are_one_member() -> None:
    data = gzip.compress(b"first,", mtime=0) + gzip.compress(b"second", mtime=0)
    assert parts(run(data, name="f.gz"))[1].data == b"first,second"


def test_encrypted_7z_is_unknown() -> None:
    import py7zr

    buf = io.BytesIO()
    with py7zr.SevenZipFile(buf, "w", password="secret") as archive:  # noqa: S106
        archive.writestr(EICAR, "eicar.com")
    items = run(buf.getvalue())
    assert [(p.status, p.reason) for p in problems(items)] == [(ScanStatus.UNKNOWN, "encrypted")]
    assert not any(EICAR in p.data for p in parts(items))
