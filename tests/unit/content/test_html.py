"""HTML: the normalised copy, data: URIs (HTML smuggling), sniffing, hostile pages
(avgate.content.html)."""

from __future__ import annotations

import base64
import time

import pytest

from avgate.content import Part, Problem, decompose
from avgate.content.filetype import Kind, detect, looks_like_html
from avgate.content.html import NORMALISED, decode_data_uri, normalise
from avgate.engines.embedded import EmbeddedEngine
from avgate.limits import Limits
from avgate.result import ScanStatus
from tests.corpus import (
    CLEAN_TEXT,
    EICAR,
    MARKER,
    Sample,
    document_samples,
    encode_uu,
    html_smuggling,
    mail,
)
from tests.unit.content.signatures import signature_engine

HTML_SAMPLES = [s for s in document_samples() if s.name.endswith(".html")]
# A body signature as clamd's HTML signatures are written: over the normalised (lower-case)
# text. The page spells it with entities, a comment and mixed case.
NORMALISED_TEXT = b"run the hidden loader now"
NORMALISED_NDB = f"Test.Html.Normalised:0:*:{NORMALISED_TEXT.hex()}\n"
OBFUSCATED = (b"<html><body><p>Run  the\n&#104;id<!-- split -->den L&#x4f;ADER"
              b"&nbsp;now</p></body></html>")


def run(data: bytes, limits: Limits | None = None) -> list[Part | Problem]:
    return list(decompose(data, limits or Limits(), "page.html"))


def parts(items: list[Part | Problem]) -> dict[str, bytes]:
    return {i.path: i.data for i in items if isinstance(i, Part)}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedEngine:
    return signature_engine(tmp_path_factory.mktemp("sigs"), NORMALISED_NDB)


@pytest.mark.parametrize("sample", HTML_SAMPLES, ids=lambda s: s.name)
def test_sample_verdict(engine: EmbeddedEngine, sample: Sample) -> None:
    result = engine.scan_bytes(sample.data)
    assert result.status is sample.expected, result.reason
    assert {f.name for f in result.findings} == ({sample.virus} if sample.virus else set())


def test_smuggled_file_from_attribute_and_script_string() -> None:
    found = parts(run(html_smuggling(EICAR)))
    assert found["page.html/data-uri1"] == EICAR  # <a href="data:...">
    assert found["page.html/data-uri2"] == EICAR  # link.href = 'data:...'


# -- normalisation --------------------------------------------------------------------------
def test_normalised_copy_matches_a_signature_the_page_hides(engine: EmbeddedEngine) -> None:
    copy = parts(run(OBFUSCATED))[f"page.html/{NORMALISED}"]
    assert NORMALISED_TEXT in copy
    result = engine.scan_bytes(OBFUSCATED)
    assert result.status is ScanStatus.INFECTED
    assert [(f.name, f.part) for f in result.findings] == [("Test.Html.Normalised", NORMALISED)]


def test_clean_twin_of_the_obfuscated_page(engine: EmbeddedEngine) -> None:
    clean = OBFUSCATED.replace(b"L&#x4f;ADER", b"report")
    assert engine.scan_bytes(clean).status is ScanStatus.CLEAN


@pytest.mark.parametrize(("page", "copy"), [
    ("<P>A  &amp;\tB</P>", b"<p>a & b</p>"),
    ("x<!-- a -->y<!--b-->z", b"xyz"),
    ("x<!-- never closed <p>hidden", b"x"),
    ("&lt;!-- not a comment --&gt;", b"<!-- not a comment -->"),
    ("caf\xe9 &#x263A; &eacute;", "caf\xe9 \u263a \xe9".encode()),
    ('<img src="data:image/png;base64,iVBORw0KGgo=">', b'<img src="data:image/png;base64,">'),
])
def test_normalise(page: str, copy: bytes) -> None:
    assert normalise(page) == copy


def test_bytes_that_are_no_utf8_are_kept() -> None:
    page = b"<html><body>\xff\xfe " + MARKER + b"</body></html>"
    copy = parts(run(page))[f"page.html/{NORMALISED}"]
    assert b"\xff\xfe " + MARKER.lower() in copy


def test_normalised_copy_is_not_normalised_again() -> None:
    items = run(html_smuggling(EICAR))
    paths = [i.path for i in items]
    assert paths.count(f"page.html/{NORMALISED}") == 1
    assert not any(p.startswith(f"page.html/{NORMALISED}/") for p in paths)


# -- data: URIs -----------------------------------------------------------------------------
@pytest.mark.parametrize(("params", "payload", "data"), [
    (";base64", base64.b64encode(EICAR).decode(), EICAR),
    (";base64", base64.b64encode(EICAR).decode().rstrip("="), EICAR),  # no padding
    (";base64", "WDVP\n IVAl\tQEFQ", b"X5O!P%@AP"),  # blanks inside (forgiving base64)
    (";charset=utf-8;base64", "WDVPIVA%6CQEFQ", b"X5O!P%@AP"),  # percent-decoded first
    ("", "X5O%21P%25%40AP", b"X5O!P%@AP"),
    ("", "plain text", b"plain text"),
    (";base64", "a", None),  # one character: no byte
])
def test_decode_data_uri(params: str, payload: str, data: bytes | None) -> None:
    assert decode_data_uri(params, payload) == data


@pytest.mark.parametrize("page", [
    '<a href="data:application/octet-stream;base64,{b64}">x</a>',
    "<a href='DATA:application/x-msdownload;BASE64,{b64}'>x</a>",
    "<a href=data:;base64,{b64}>x</a>",
    '<a href="data&colon;application/octet-stream;base64&comma;{b64}">x</a>',  # references
    '<div style="background: url(data:application/octet-stream;base64,{b64})"></div>',
    "<script>var u = \"data:application/octet-stream;base64,{b64}\";</script>",
    "<!--[if IE]><iframe src='data:text/html;base64,{b64}'></iframe><![endif]-->",
    '<object data="data:application/octet-stream;base64,{b64_lines}"></object>',
])
def test_data_uri_places(page: str) -> None:
    b64 = base64.b64encode(EICAR).decode()
    lines = "\n".join(b64[i:i + 20] for i in range(0, len(b64), 20))
    html = ("<html><body>" + page.format(b64=b64, b64_lines=lines) + "</body></html>").encode()
    assert parts(run(html))["page.html/data-uri1"] == EICAR


def test_base64_script_string_for_atob() -> None:
    payload = EICAR * 3  # 204 bytes: 272 base64 characters
    page = (b"<html><script>const b = atob('" + base64.b64encode(payload) + b"');\n"
            b"const short = 'QUJD'; const url = URL.createObjectURL(new Blob([b]));"
            b"</script></html>")
    found = parts(run(page))
    assert found["page.html/base64-string1"] == payload
    assert "page.html/base64-string2" not in found  # 'QUJD' is too short to be a file


def test_text_that_is_no_data_uri() -> None:
    page = b"<html><body>metadata:one,two; data: none; xdata:a,b</body></html>"
    assert [p for p in parts(run(page)) if "data-uri" in p] == []


def test_utf16_page() -> None:
    page = ('<html><a href="data:application/octet-stream;base64,'
            + base64.b64encode(EICAR).decode() + '">x</a></html>')
    data = b"\xff\xfe" + page.encode("utf-16-le")
    assert detect(data) is Kind.HTML
    assert parts(run(data))["page.html/data-uri1"] == EICAR


def test_html_part_of_a_mail() -> None:
    message = mail(attachments=[("invoice.html", html_smuggling(EICAR))],
                   content_type="text/html")
    found = parts(list(decompose(message, Limits(), "m")))
    assert found["m/2/invoice.html/data-uri1"] == EICAR


# -- sniffing -------------------------------------------------------------------------------
@pytest.mark.parametrize(("data", "html"), [
    (b"<!DOCTYPE html><p>x", True),
    (b"\xef\xbb\xbf\n  <HTML lang=en>", True),
    (b"Dear customer, <script>location='x'</script>", True),  # text first: still a page
    (b"<svg/onload=alert(1)>", True),
    (b"<body>", True),
    (b"x" * 2000 + b"<html>", False),  # only the first KiB is looked at
    (b"if (a<b) { return <bold>; }", False),
    (CLEAN_TEXT, False),
])
def test_sniff(data: bytes, html: bool) -> None:
    assert looks_like_html(data) is html


# -- hostile pages --------------------------------------------------------------------------
def test_many_unclosed_comments_are_linear() -> None:
    page = b"<html>" + b"<!--" * 500_000  # 2 MB
    start = time.perf_counter()
    run(page)
    assert time.perf_counter() - start < 5


def test_many_data_uris_stop_at_max_files() -> None:
    page = b"<html>" + b'<img src="data:,x">' * 100
    items = run(page, Limits(max_files=10))
    assert len(parts(items)) == 11
    [problem] = [i for i in items if isinstance(i, Problem)]
    assert problem.status is ScanStatus.SKIPPED and "file count limit" in problem.reason


def test_uuencoded_file_in_a_page_is_still_decoded() -> None:
    page = b"<p>Hello</p>\r\n" + encode_uu(EICAR, "eicar.com")
    assert detect(page) is Kind.HTML
    assert parts(run(page))["page.html/eicar.com"] == EICAR


def test_undecodable_bytes_inside_a_data_uri() -> None:
    # found by the fuzzer: a byte that is no UTF-8 inside a data: URI payload
    page = b"<html>data:;base64,\xff data:,%41\xfe"
    found = parts(run(page))
    assert found["page.html/data-uri1"] == b"A\xfe"
