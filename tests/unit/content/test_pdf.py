"""PDF: streams through every filter, embedded files by name, object streams, encryption,
malformed files, and the limits (avgate.content.pdf)."""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from avgate.content import Part, Problem, decompose
from avgate.content.filetype import Kind, detect
from avgate.content.pdf import Name, decode_stream
from avgate.engines.embedded import EmbeddedEngine
from avgate.limits import Limits, MiB
from avgate.result import LimitKind, ScanStatus
from tests.corpus import (
    CLEAN_TEXT,
    EICAR,
    MARKER,
    Sample,
    document_samples,
    encode_uu,
    lzw_encode,
    mail,
    make_pdf,
    make_zip,
    pdf_embedded_file,
    pdf_stream,
    pdf_with_stream,
)
from tests.unit.content.signatures import signature_engine

LIMITS = Limits()
PDF_SAMPLES = [s for s in document_samples() if s.name.endswith(".pdf") or "pdf" in s.name]


def run(data: bytes, limits: Limits = LIMITS) -> list[Part | Problem]:
    return list(decompose(data, limits, "doc.pdf"))


def parts(items: list[Part | Problem]) -> dict[str, bytes]:
    return {i.path: i.data for i in items if isinstance(i, Part)}


def problems(items: list[Part | Problem]) -> list[Problem]:
    return [i for i in items if isinstance(i, Problem)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedEngine:
    return signature_engine(tmp_path_factory.mktemp("sigs"))


# -- the samples through the engine ---------------------------------------------------------
@pytest.mark.parametrize("sample", PDF_SAMPLES, ids=lambda s: s.name)
def test_sample_verdict(engine: EmbeddedEngine, sample: Sample) -> None:
    result = engine.scan_bytes(sample.data)
    assert result.status is sample.expected, result.reason
    if sample.virus is None:
        assert result.findings == ()
    else:
        assert {f.name for f in result.findings} == {sample.virus}


def test_clean_twin_is_the_same_structure() -> None:
    infected, clean = (parts(run(pdf_embedded_file(n, d)))
                       for n, d in (("eicar.com", EICAR), ("report.txt", CLEAN_TEXT)))
    assert infected["doc.pdf/eicar.com"] == EICAR
    assert clean["doc.pdf/report.txt"] == CLEAN_TEXT


def test_embedded_file_and_object_stream_names() -> None:
    found = parts(run(next(s.data for s in PDF_SAMPLES if s.name == "eicar-objstm.pdf")))
    assert found["doc.pdf/eicar.com"] == EICAR  # named by the Filespec inside the ObjStm
    objstm = found["doc.pdf/obj4"]
    assert b"/FileAttachment" in objstm and b"(eicar.com)" in objstm


def test_detected_by_content_not_by_label() -> None:
    assert detect(pdf_with_stream(EICAR)) is Kind.PDF
    assert detect(b"junk before the header\n" + pdf_with_stream(EICAR)) is Kind.PDF
    assert detect(b"x" * 1100 + pdf_with_stream(EICAR)) is Kind.OTHER
    # "%PDF-" in a mail header does not make the mail a PDF
    assert detect(mail(subject="%PDF-1.7 invoice")) is Kind.MAIL


# -- filters --------------------------------------------------------------------------------
def decoded(raw: bytes, entries: bytes) -> bytes:
    """The one stream of a PDF whose stream dictionary is ``entries``."""
    found = parts(run(make_pdf([b"<< /Type /Catalog >>", pdf_stream(entries, raw)])))
    return found["doc.pdf/obj2"]


@pytest.mark.parametrize(("entries", "raw"), [
    (b"/Filter /FlateDecode", zlib.compress(EICAR)),
    (b"/Filter /Fl", zlib.compress(EICAR)),
    (b"/Filter /FlateDecode", zlib.compress(EICAR)[2:-4]),  # raw deflate: no zlib header
    (b"/Filter /ASCIIHexDecode", EICAR.hex().upper().encode() + b">"),
    (b"/Filter /AHx", b" ".join(EICAR.hex()[i:i + 2].encode() for i in range(0, 136, 2))),
    (b"/Filter /ASCII85Decode", base64.a85encode(EICAR, adobe=True)),
    (b"/Filter /A85", base64.a85encode(EICAR, wrapcol=10)),  # no <~, line breaks
    (b"/Filter /LZWDecode", lzw_encode(EICAR)),
    (b"/Filter /RunLengthDecode", bytes([67]) + EICAR),
    (b"/Filter [/ASCII85Decode /FlateDecode]", base64.a85encode(zlib.compress(EICAR))),
    (b"/Filter [/AHx /LZW /Fl]", lzw_encode(zlib.compress(EICAR)).hex().encode()),
    (b"/Filter /Fl#61teDecode", zlib.compress(EICAR)),  # a name written with #xx escapes
    (b"/Filter /DCTDecode", EICAR),  # an image codec: the bytes as they are
], ids=lambda v: v.decode("latin-1")[:40] if isinstance(v, bytes) and v.startswith(b"/") else "")
def test_filters(entries: bytes, raw: bytes) -> None:
    assert decoded(raw, entries) == EICAR


def test_run_length_repeats_and_stops_at_eod() -> None:
    raw = bytes([257 - 5]) + b"A" + bytes([1]) + b"BC" + b"\x80" + b"ignored"
    assert decode_stream(raw, {"Filter": Name("RunLengthDecode")}, 100) == (b"AAAAABC", None)


def test_ascii85_zero_groups_and_partial_final_group() -> None:
    raw = b"<~z" + base64.a85encode(b"abcdefg") + b"~>"
    assert decode_stream(raw, {"Filter": Name("ASCII85Decode")}, 100) == (
        b"\0\0\0\0abcdefg", None)


def test_lzw_without_early_change_and_table_resets() -> None:
    data = bytes(range(256)) * 40  # fills the 4096-entry table: the encoder clears it
    assert decode_stream(lzw_encode(data), {"Filter": Name("LZWDecode")}, len(data)) == (
        data, None)


def _png_rows(data: bytes, columns: int, kind: int, pixel: int = 1) -> bytes:
    """Rows of ``data`` filtered with PNG filter ``kind`` (an encoder for the test)."""
    out, prior = bytearray(), bytes(columns)
    for start in range(0, len(data), columns):
        row = data[start:start + columns]
        line = bytearray()
        for i, value in enumerate(row):
            a = row[i - pixel] if i >= pixel else 0
            b = prior[i]
            c = prior[i - pixel] if i >= pixel else 0
            if kind == 0:
                pred = 0
            elif kind == 1:
                pred = a
            elif kind == 2:
                pred = b
            elif kind == 3:
                pred = (a + b) >> 1
            else:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
            line.append((value - pred) & 0xFF)
        out += bytes([kind]) + line
        prior = row
    return bytes(out)


@pytest.mark.parametrize("kind", [0, 1, 2, 3, 4], ids=["none", "sub", "up", "avg", "paeth"])
def test_png_predictors(kind: int) -> None:
    raw = zlib.compress(_png_rows(EICAR, 17, kind, pixel=1))
    entries = b"/Filter /FlateDecode /DecodeParms << /Predictor 15 /Columns 17 >>"
    assert decoded(raw, entries) == EICAR


def test_png_predictor_with_three_colours() -> None:
    data = EICAR + b"\0" * 4  # 72 bytes: 3 rows of 8 RGB pixels
    raw = zlib.compress(_png_rows(data, 24, 4, pixel=3))
    entries = (b"/Filter /FlateDecode /DecodeParms << /Predictor 12 /Colors 3 "
               b"/BitsPerComponent 8 /Columns 8 >>")
    assert decoded(raw, entries) == data


def test_tiff_predictor() -> None:
    diffs = bytes([EICAR[0]]) + bytes((EICAR[i] - EICAR[i - 1]) & 0xFF for i in range(1, 68))
    raw = zlib.compress(diffs)
    entries = b"/Filter /FlateDecode /DecodeParms << /Predictor 2 /Columns 68 >>"
    assert decoded(raw, entries) == EICAR


def test_chained_filters_with_per_filter_parameters() -> None:
    raw = base64.a85encode(zlib.compress(_png_rows(EICAR, 4, 2)))
    entries = (b"/Filter [/ASCII85Decode /FlateDecode] "
               b"/DecodeParms [null << /Predictor 12 /Columns 4 >>]")
    assert decoded(raw, entries) == EICAR


def test_broken_stream_scanned_as_far_as_it_decodes() -> None:
    raw = zlib.compress(b"x " + MARKER + b" " + bytes(range(256)) * 64)[:-200]
    items = run(make_pdf([b"<< >>", pdf_stream(b"/Filter /FlateDecode", raw)]))
    assert MARKER in parts(items)["doc.pdf/obj2"]
    assert problems(items) == []  # a viewer gets no more from it either: nothing undecided


def test_stream_without_filter_that_is_zlib_is_inflated_too() -> None:
    found = parts(run(make_pdf([b"<< >>", pdf_stream(b"", zlib.compress(EICAR))])))
    assert found["doc.pdf/obj2~flate"] == EICAR


# -- malformed files ------------------------------------------------------------------------
def test_wrong_length_falls_back_to_endstream() -> None:
    for length in (b"5", b"100000", b"9 0 R"):
        pdf = (b"%PDF-1.4\n1 0 obj\n<< /Length " + length + b" /Filter /FlateDecode >>\n"
               b"stream\r\n" + zlib.compress(EICAR) + b"\r\nendstream\nendobj\n")
        assert parts(run(pdf))["doc.pdf/obj1"] == EICAR, length


def test_no_xref_no_trailer_no_endstream() -> None:
    pdf = b"%PDF-1.1\n7 0 obj <</Filter/FlateDecode>>stream\n" + zlib.compress(EICAR)
    assert parts(run(pdf))["doc.pdf/obj7"] == EICAR


def test_object_after_an_unterminated_string_is_still_found() -> None:
    pdf = (b"%PDF-1.4\n1 0 obj << /Title (never closed >>\nendobj\n"
           + b"2 0 obj\n" + pdf_stream(b"/Filter /FlateDecode", zlib.compress(EICAR))
           + b"\nendobj\n")
    assert parts(run(pdf))["doc.pdf/obj2"] == EICAR


def test_stream_whose_dictionary_does_not_parse_is_still_read() -> None:
    # A fake object header inside the dictionary cuts it short (objects are read up to the
    # next header); the stream is found by its "stream" keyword and inflated anyway.
    pdf = (b"%PDF-1.4\n1 0 obj\n<< /Title (see 2 0 obj) /Filter /FlateDecode >>\nstream\n"
           + zlib.compress(EICAR) + b"\nendstream\nendobj\n"
           + b"<< /NoHeaderAtAll true >>\nstream\n" + b"x " + MARKER + b"\nendstream\n")
    items = run(pdf)
    found = parts(items)
    assert EICAR in found.values()
    assert any(MARKER in data for path, data in found.items() if path != "doc.pdf")
    assert problems(items) == []


def test_endstream_inside_the_data_with_a_correct_length() -> None:
    data = b"abc endstream def " + MARKER
    assert parts(run(make_pdf([b"<< >>", pdf_stream(b"", data)])))["doc.pdf/obj2"] == data


def test_deep_nesting_and_junk_objects_do_not_raise() -> None:
    pdf = (b"%PDF-1.4\n1 0 obj " + b"[" * 5000 + b"\nendobj\n2 0 obj << /A << /B ) } { >> >>"
           b" endobj 3 0 obj <</Length -4>>stream\nxx\nendstream endobj\n"
           + b"4 0 obj\n" + pdf_stream(b"", EICAR) + b"\nendobj\n")
    items = run(pdf)
    assert parts(items)["doc.pdf/obj4"] == EICAR
    assert not [p for p in problems(items) if p.reason.startswith("cannot")]


def test_pdf_with_a_zip_appended_is_read_both_ways() -> None:
    polyglot = pdf_with_stream(b"a page") + make_zip([("eicar.com", EICAR)])
    assert detect(polyglot) is Kind.PDF
    assert parts(run(polyglot))["doc.pdf/eicar.com"] == EICAR


# -- limits ---------------------------------------------------------------------------------
def test_flate_bomb_is_refused_without_inflating_it() -> None:
    bomb = zlib.compress(b"\0" * (16 * MiB), 9)  # 16 KB
    limits = Limits(max_file_size=1 * MiB, max_scan_size=4 * MiB)
    start = time.perf_counter()
    items = run(make_pdf([b"<< >>", pdf_stream(b"/Filter /FlateDecode", bomb)]), limits)
    assert time.perf_counter() - start < 5
    [problem] = problems(items)
    assert problem.path == "doc.pdf/obj2" and problem.status is ScanStatus.SKIPPED
    assert problem.limit in (LimitKind.SIZE, LimitKind.STRUCTURAL)


def test_lzw_and_run_length_bombs_stop_at_the_cap() -> None:
    limits = Limits(max_file_size=128 * 1024, max_scan_size=1 * MiB, max_ratio=10)
    run_length = bytes([129, 0]) * 20_000  # 128 bytes per 2: 2.5 MB
    items = run(make_pdf([b"<< >>", pdf_stream(b"/Filter /RunLengthDecode", run_length)]),
                limits)
    assert [p.status for p in problems(items)] == [ScanStatus.SKIPPED]
    lzw = lzw_encode(b"\0" * (256 * 1024))  # 1.4 KB of codes
    items = run(make_pdf([b"<< >>", pdf_stream(b"/Filter /LZWDecode", lzw)]), limits)
    assert [p.status for p in problems(items)] == [ScanStatus.SKIPPED]


def test_object_count_limit() -> None:
    pdf = make_pdf([b"<< >>"] * 60)
    [problem] = problems(run(pdf, Limits(max_files=2)))
    assert problem.status is ScanStatus.SKIPPED and problem.limit is LimitKind.STRUCTURAL
    assert "PDF object count limit" in problem.reason


def test_many_streams_stop_at_max_files() -> None:
    pdf = make_pdf([pdf_stream(b"", b"s%d" % i) for i in range(30)])
    items = run(pdf, Limits(max_files=5))
    assert len(parts(items)) == 6
    assert problems(items)[-1].status is ScanStatus.SKIPPED


# -- encryption (PDFs encrypted by qpdf, a real implementation) -----------------------------
QPDF = shutil.which("qpdf")
needs_qpdf = pytest.mark.skipif(QPDF is None, reason="qpdf not installed (apt-get install qpdf)")


def encrypted(tmp_path: Path, user: str, *args: str) -> bytes:
    assert QPDF is not None
    plain, out = tmp_path / "plain.pdf", tmp_path / "enc.pdf"
    plain.write_bytes(pdf_embedded_file("eicar.com", EICAR))
    subprocess.run([QPDF, "--allow-weak-crypto", "--encrypt", user, "owner-pw", *args, "--",
                    str(plain), str(out)], check=True, timeout=30)
    return out.read_bytes()


@needs_qpdf
@pytest.mark.parametrize("args", [["40"], ["128", "--use-aes=n"], ["128", "--use-aes=y"],
                                  ["256"]], ids=["rc4-40", "rc4-128", "aes-128", "aes-256"])
def test_encrypted_with_empty_user_password_is_opened(tmp_path: Path, args: list[str],
                                                      engine: EmbeddedEngine) -> None:
    data = encrypted(tmp_path, "", *args)
    assert b"/Encrypt" in data and zlib.compress(EICAR) not in data
    found = parts(run(data))
    assert found["doc.pdf/eicar.com"] == EICAR  # the name string is decrypted too
    assert engine.scan_bytes(data).status is ScanStatus.INFECTED


@needs_qpdf
@pytest.mark.parametrize("args", [["128", "--use-aes=y"], ["256"]], ids=["aes-128", "aes-256"])
def test_encrypted_with_a_password_is_unknown(tmp_path: Path, args: list[str],
                                              engine: EmbeddedEngine) -> None:
    data = encrypted(tmp_path, "secret", *args)
    items = run(data)
    assert [(p.status, p.reason) for p in problems(items)] == [
        (ScanStatus.UNKNOWN, "encrypted PDF (needs a password)")]
    result = engine.scan_bytes(data)
    assert result.status is ScanStatus.UNKNOWN and "encrypted PDF" in result.reason


@needs_qpdf
def test_object_and_xref_streams_written_by_qpdf(tmp_path: Path) -> None:
    assert QPDF is not None
    plain, out = tmp_path / "plain.pdf", tmp_path / "objstm.pdf"
    plain.write_bytes(pdf_embedded_file("eicar.com", EICAR))
    subprocess.run([QPDF, "--object-streams=generate", str(plain), str(out)], check=True,
                   timeout=30)
    data = out.read_bytes()
    assert b"/ObjStm" in data and b"/XRef" in data and b"(eicar.com)" not in data
    assert parts(run(data))["doc.pdf/eicar.com"] == EICAR


def test_unreadable_encryption_dictionary_is_unknown() -> None:
    pdf = make_pdf([b"<< >>", pdf_stream(b"", EICAR)], trailer=b"/Encrypt 99 0 R ")
    [problem] = problems(run(pdf))
    assert problem.status is ScanStatus.UNKNOWN and "encrypted PDF" in problem.reason


def test_object_stream_without_usable_offsets() -> None:
    # found by the fuzzer: an object stream whose offsets are all past its end
    body = b"5 900 6 901 << /A 1 >>"
    objstm = pdf_stream(b"/Type /ObjStm /N 2 /First 12", body)
    items = run(make_pdf([b"<< >>", objstm]))
    assert parts(items)["doc.pdf/obj2"] == body and problems(items) == []


def test_predictor_row_length_from_the_file_is_not_allocated() -> None:
    entries = (b"/Filter /FlateDecode /DecodeParms << /Predictor 12 /Colors 32 "
               b"/BitsPerComponent 16 /Columns 16777216 >>")  # 1 GiB rows
    raw = zlib.compress(b"\x02" + EICAR)
    assert decoded(raw, entries) == EICAR  # one short row, Up from a zero row


def test_uuencoded_file_after_a_pdf_header_is_still_decoded() -> None:
    text = b"%PDF-1.4 is what the file below is not\r\n" + encode_uu(EICAR, "eicar.com")
    assert detect(text) is Kind.PDF
    assert parts(run(text))["doc.pdf/eicar.com"] == EICAR


def test_javascript_strings_are_parts() -> None:
    action = b"<< /S /JavaScript /JS (var x = '" + MARKER + b"'; app.alert\\(x\\);) >>"
    utf16 = b"<< /S /JavaScript /JS <FEFF" + "eval(1)".encode("utf-16-be").hex().encode() + b"> >>"
    found = parts(run(make_pdf([b"<< /Type /Catalog /OpenAction 2 0 R >>", action, utf16])))
    assert found["doc.pdf/js1"] == b"var x = '" + MARKER + b"'; app.alert(x);"
    assert found["doc.pdf/js2"] == b"eval(1)"
