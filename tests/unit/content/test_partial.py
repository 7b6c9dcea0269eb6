"""message/partial (RFC 2046 5.2.2) and message/external-body: fragments alone are unknown,
a complete set is reassembled and scanned (avgate.content.mime)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from avgate.content import Part, Problem, decompose
from avgate.content.mime import REASON_EXTERNAL, REASON_PARTIAL
from avgate.engines.embedded import EmbeddedEngine
from avgate.limits import Limits
from avgate.result import ScanStatus
from tests.corpus import (
    CLEAN_TEXT,
    EICAR,
    MARKER,
    Sample,
    document_samples,
    external_body_mail,
    mail,
    partial_mails,
    partial_set_mail,
)
from tests.unit.content.signatures import signature_engine

PARTIAL_SAMPLES = [s for s in document_samples() if "partial" in s.name or "external" in s.name]
INNER = mail(attachments=[("eicar.com", EICAR)])


def run(data: bytes, limits: Limits | None = None) -> list[Part | Problem]:
    return list(decompose(data, limits or Limits(), "m"))


def parts(items: list[Part | Problem]) -> dict[str, bytes]:
    return {i.path: i.data for i in items if isinstance(i, Part)}


def problems(items: list[Part | Problem]) -> list[tuple[str, ScanStatus, str]]:
    return [(i.path, i.status, i.reason) for i in items if isinstance(i, Problem)]


def digest(fragments: list[bytes], order: list[int] | None = None,
           boundary: bytes = b"frag-b") -> bytes:
    """The fragments (message/partial messages) as parts of one multipart/mixed message,
    each directly (no message/rfc822 wrapper), in ``order`` (1-based)."""
    out = (b"From: a@example.org\r\nTo: b@example.org\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
           b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n')
    for n in order or range(1, len(fragments) + 1):
        body = fragments[n - 1].split(b"\r\n\r\n", 1)[1]
        ctype = fragments[n - 1].split(b"Content-Type: ", 1)[1].split(b"\r\n", 1)[0]
        out += b"--" + boundary + b"\r\nContent-Type: " + ctype + b"\r\n\r\n" + body + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedEngine:
    return signature_engine(tmp_path_factory.mktemp("sigs"))


@pytest.mark.parametrize("sample", PARTIAL_SAMPLES, ids=lambda s: s.name)
def test_sample_verdict(engine: EmbeddedEngine, sample: Sample) -> None:
    result = engine.scan_bytes(sample.data)
    assert result.status is sample.expected, result.reason
    assert {f.name for f in result.findings} == ({sample.virus} if sample.virus else set())
    if sample.expected is ScanStatus.UNKNOWN:
        assert "content not present" in result.reason


def test_three_fragments_reassembled_in_order() -> None:
    items = run(partial_set_mail(INNER))
    found = parts(items)
    assert found["m/partial1"] == INNER
    assert found["m/partial1/2/eicar.com"] == EICAR
    assert problems(items) == []


@pytest.mark.parametrize("order", [[3, 1, 2], [2, 3, 1], [1, 2, 3]])
def test_fragments_as_direct_parts_in_any_order(order: list[int]) -> None:
    items = run(digest(partial_mails(INNER), order))
    assert parts(items)["m/partial1"] == INNER
    assert problems(items) == []


def test_a_missing_fragment_makes_each_present_one_unknown(engine: EmbeddedEngine) -> None:
    data = partial_set_mail(INNER, keep=[1, 3])
    items = run(data)
    assert "m/partial1" not in parts(items)
    assert problems(items) == [("m/1", ScanStatus.UNKNOWN, REASON_PARTIAL),
                               ("m/2", ScanStatus.UNKNOWN, REASON_PARTIAL)]
    result = engine.scan_bytes(data)
    assert result.status is ScanStatus.UNKNOWN


def test_a_fragment_alone_is_unknown_even_when_its_part_is_clean(
        engine: EmbeddedEngine) -> None:
    clean = mail(attachments=[("report.txt", CLEAN_TEXT * 20)])
    for fragment in partial_mails(clean):
        result = engine.scan_bytes(fragment)
        assert result.status is ScanStatus.UNKNOWN
        assert result.reason == REASON_PARTIAL


def test_the_clean_twin_reassembled_is_clean(engine: EmbeddedEngine) -> None:
    clean = mail(attachments=[("report.txt", CLEAN_TEXT * 20)])
    assert engine.scan_bytes(partial_set_mail(clean)).status is ScanStatus.CLEAN


def test_the_first_fragment_alone_is_still_read_as_far_as_it_goes() -> None:
    inner = mail(attachments=[("doc.txt", b"x " + MARKER + b" y")],
                 encoding="quoted-printable") + b"\r\n" + b"padding line\r\n" * 200
    items = run(partial_mails(inner)[0])
    assert any(MARKER in data for data in parts(items).values())
    assert problems(items) == [("m", ScanStatus.UNKNOWN, REASON_PARTIAL)]


@pytest.mark.parametrize(("change", "why"), [
    (lambda f: f.replace(b"number=2", b"number=4"), "a number past total"),
    (lambda f: f.replace(b"total=3", b"total=4"), "totals that disagree"),
    (lambda f: f.replace(b"number=2", b"number=1"), "number 1 twice, different bodies"),
    (lambda f: f.replace(b'id="frag-1@example.org"; ', b""), "no id"),
    (lambda f: f.replace(b"number=2", b"number=x2"), "a number that is none"),
])
def test_inconsistent_sets_are_unknown(change: Callable[[bytes], bytes], why: str) -> None:
    fragments = partial_mails(INNER)
    fragments[1] = change(fragments[1])
    items = run(digest(fragments))
    assert "m/partial1" not in parts(items), why
    assert {status for _, status, _ in problems(items)} == {ScanStatus.UNKNOWN}, why


def test_two_sets_in_one_message() -> None:
    other = mail(attachments=[("m.txt", b"x " + MARKER)])
    fragments = partial_mails(INNER, 2) + partial_mails(other, 2, "frag-2@example.org")
    found = parts(run(digest(fragments, [3, 1, 4, 2])))
    assert found["m/partial1"] == other and found["m/partial2"] == INNER


def test_mixed_case_type_is_still_a_fragment() -> None:
    fragment = partial_mails(INNER)[0].replace(b"message/partial", b"Message/PARTIAL")
    assert problems(run(fragment)) == [("m", ScanStatus.UNKNOWN, REASON_PARTIAL)]


def test_external_body_is_unknown(engine: EmbeddedEngine) -> None:
    items = run(external_body_mail())
    assert problems(items) == [("m", ScanStatus.UNKNOWN, REASON_EXTERNAL)]
    nested = mail(attachments=[("x.txt", CLEAN_TEXT)])
    nested = nested.replace(b"Content-Type: application/octet-stream",
                            b"Content-Type: message/external-body; access-type=anon-ftp;"
                            b' site="ftp.example.org"; name="x.exe"')
    result = engine.scan_bytes(nested)
    assert result.status is ScanStatus.UNKNOWN and REASON_EXTERNAL in result.reason


def test_fragment_part_keeps_its_declared_type() -> None:
    items = run(digest(partial_mails(INNER)[:2]))
    fragments = [i for i in items if isinstance(i, Part) and i.path in ("m/1", "m/2")]
    assert [f.content_type for f in fragments] == ["message/partial"] * 2
