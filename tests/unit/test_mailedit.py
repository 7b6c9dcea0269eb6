"""Message editing: headers and subject textually, part replacement via the email package."""

from __future__ import annotations

import email
import email.policy
from email.header import decode_header, make_header
from email.message import EmailMessage

import pytest

from avgate import config, mailedit
from avgate.mailedit import HeaderFilter, add_headers, edit_message, prefix_subject, strip_headers
from avgate.policy import Decision, Disposition
from avgate.result import Finding, ScanResult, ScanStatus
from avgate.scan import ScanService

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
CLEAN = ScanResult(ScanStatus.CLEAN)
PLAIN = b"From: a@example.org\r\nSubject: Hello there\r\n\r\nbody \xff\r\n\r\n.\r\nend"


def decision(**kw: object) -> Decision:
    return Decision(disposition=Disposition.ACCEPT, **kw)  # type: ignore[arg-type]


def subject_of(data: bytes) -> str:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    return str(make_header(decode_header(msg["Subject"])))


def test_headers_added_on_top_rest_byte_identical() -> None:
    out = edit_message(PLAIN, decision(headers=(("X-Virus-Scanned", "avgate 0.1"),
                                                ("X-Virus-Status", "Clean"))), CLEAN)
    assert out == b"X-Virus-Scanned: avgate 0.1\r\nX-Virus-Status: Clean\r\n" + PLAIN


def test_lf_messages_get_lf_headers() -> None:
    data = PLAIN.replace(b"\r\n", b"\n")
    out = add_headers(data, [("X-A", "1")])
    assert out == b"X-A: 1\n" + data


def test_header_values_cannot_inject_and_are_encoded() -> None:
    out = add_headers(b"Subject: s\n\nb", [("X-Virus-Status", "Infected (a\r\nBcc: x@y)"),
                                            ("X-Note", "Vírus")])
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert msg["Bcc"] is None
    assert msg["X-Virus-Status"] == "Infected (a Bcc: x@y)"
    assert msg["X-Note"] == "Vírus"
    assert out.isascii() or out.endswith(b"b")
    with pytest.raises(ValueError):
        add_headers(b"\n", [("Bad Name", "v")])


def test_subject_prefix_plain() -> None:
    out = edit_message(PLAIN, decision(subject_prefix="***VIRUS*** "), CLEAN)
    assert out == PLAIN.replace(b"Subject: Hello", b"Subject: ***VIRUS*** Hello")
    # a second pass does not prefix twice
    assert prefix_subject(out, "***VIRUS*** ") == out


def test_subject_prefix_before_encoded_words() -> None:
    data = (b"Subject: =?UTF-8?B?R3LDvMOfZQ==?=\r\n =?UTF-8?Q?_aus_K=C3=B6ln?=\r\n"
            b"From: a@b\r\n\r\nbody")
    out = prefix_subject(data, "[SPAM]")
    assert subject_of(out) == "[SPAM] Grüße aus Köln"
    # the encoded words themselves are untouched
    assert b"=?UTF-8?B?R3LDvMOfZQ==?=\r\n =?UTF-8?Q?_aus_K=C3=B6ln?=" in out
    out2 = prefix_subject(data, "[VÍRUS]")
    assert subject_of(out2) == "[VÍRUS] Grüße aus Köln"
    out3 = prefix_subject(PLAIN, "[VÍRUS]")
    assert subject_of(out3) == "[VÍRUS] Hello there"


def test_missing_subject_is_added() -> None:
    out = prefix_subject(b"From: a@b\n\nbody\n", "***VIRUS*** ")
    assert out == b"Subject: ***VIRUS***\nFrom: a@b\n\nbody\n"


def _multipart() -> bytes:
    msg = EmailMessage()
    msg["From"] = "a@example.org"
    msg["To"] = "b@example.org"
    msg["Subject"] = "report"
    msg.set_content("Please see the attachments.\n")
    msg.add_attachment(b"harmless", maintype="application", subtype="octet-stream",
                       filename="ok.bin")
    msg.add_attachment(EICAR, maintype="application", subtype="octet-stream",
                       filename="eicar.com")
    return msg.as_bytes(policy=email.policy.SMTP)


async def _scan(data: bytes) -> ScanResult:
    service = ScanService.from_config(config.defaults())
    try:
        return await service.scan_bytes(data)
    finally:
        await service.close()


async def test_replace_infected_attachment() -> None:
    data = _multipart()
    result = await _scan(data)
    assert result.status is ScanStatus.INFECTED
    dec = decision(replace=True, notice="Removed {virus} ({filename}).",
                   headers=(("X-Virus-Status", "Infected"),), subject_prefix="[V]")
    out = edit_message(data, dec, result)
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert msg["X-Virus-Status"] == "Infected"
    assert msg["Subject"] == "[V] report"
    parts = list(msg.iter_parts())
    assert len(parts) == 3
    assert parts[0].get_content().rstrip() == "Please see the attachments."
    assert parts[1].get_filename() == "ok.bin"
    assert parts[1].get_content() == b"harmless"
    assert parts[2].get_content_type() == "text/plain"
    assert parts[2].get_content() == "Removed Eicar-Test-Signature (eicar.com)."
    assert b"\r\n" in out and b"\n" not in out.replace(b"\r\n", b"")
    # the edited message is clean now
    assert (await _scan(out)).status is ScanStatus.CLEAN


async def test_replace_whole_body_of_single_part_message() -> None:
    data = b"From: a@b\nSubject: s\nContent-Type: application/octet-stream\n\n" + EICAR + b"\n"
    result = await _scan(data)
    assert result.findings and result.findings[0].part == "1"
    out = edit_message(data, decision(replace=True, notice="Virus {virus} removed."), result)
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert msg["Subject"] == "s" and msg["From"] == "a@b"
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content().strip() == "Virus Eicar-Test-Signature removed."
    assert (await _scan(out)).status is ScanStatus.CLEAN


async def test_replace_attached_message() -> None:
    inner = EmailMessage()
    inner["Subject"] = "inner"
    inner.set_content(EICAR.decode() + "\n")
    outer = EmailMessage()
    outer["Subject"] = "fwd"
    outer.set_content("see attached\n")
    outer.add_attachment(inner)
    data = outer.as_bytes()
    result = await _scan(data)
    assert result.status is ScanStatus.INFECTED
    out = edit_message(data, decision(replace=True, notice="gone: {virus}"), result)
    msg = email.message_from_bytes(out, policy=email.policy.default)
    parts = list(msg.iter_parts())
    assert parts[0].get_content() == "see attached\n"
    assert parts[1].get_content() == "gone: Eicar-Test-Signature"
    assert (await _scan(out)).status is ScanStatus.CLEAN


def test_unresolvable_path_replaces_whole_body() -> None:
    data = _multipart()
    result = ScanResult(ScanStatus.INFECTED,
                        findings=(Finding("X", "e", "~boundary2/9/evil.exe"),))
    out = edit_message(data, decision(replace=True, notice="removed {virus}"), result)
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert not msg.is_multipart()
    assert msg.get_content().strip() == "removed X"
    assert msg["Subject"] == "report"
    assert EICAR not in out and b"harmless" not in out


# -- removing incoming verdict headers --------------------------------------------------------
OWN = ("X-Virus-Status", "x-virus-scanned", "X-QHPSI")
SPOOFED = (b"Received: from mx\r\n"
           b"X-Virus-Status: Clean\r\n"
           b"x-virus-scanned : by a friend\r\n"  # obsolete syntax still counts
           b"Subject: hi\r\n"
           b"X-QHPSI: clean,\r\n\tfolded\r\n  twice\r\n"
           b"X-Virus-Status-Extra: not ours\r\n"
           b"\r\n"
           b"X-Virus-Status: Clean (body text stays)\r\n")
STRIPPED = (b"Received: from mx\r\nSubject: hi\r\nX-Virus-Status-Extra: not ours\r\n\r\n"
            b"X-Virus-Status: Clean (body text stays)\r\n")


def test_strip_headers_removes_every_copy_and_its_continuation_lines() -> None:
    assert strip_headers(SPOOFED, OWN) == STRIPPED
    lf = SPOOFED.replace(b"\r\n", b"\n")
    assert strip_headers(lf, OWN) == STRIPPED.replace(b"\r\n", b"\n")
    assert strip_headers(SPOOFED, ()) is SPOOFED
    assert strip_headers(b"", OWN) == b""
    assert strip_headers(b"X-QHPSI: clean", OWN) == b""  # no body, no final line end


def test_a_bare_cr_ends_a_header_line_too() -> None:
    """Python's email parser (and some MUAs) read a bare CR as a line end: a verdict header
    hidden behind one is removed."""
    data = b"Subject: x\rX-Virus-Status: Clean\r\nTo: b\r\n\r\nbody\r"
    assert strip_headers(data, OWN) == b"Subject: x\rTo: b\r\n\r\nbody\r"
    # CR CR ends the header block, as it does for Python's parser
    assert strip_headers(b"A: 1\r\rX-QHPSI: clean\r\n", OWN) == b"A: 1\r\rX-QHPSI: clean\r\n"


def test_header_filter_in_pieces_equals_the_whole() -> None:
    for size in range(1, 12):
        f = HeaderFilter(OWN)
        out = [f.feed(SPOOFED[i:i + size]) for i in range(0, len(SPOOFED), size)]
        assert b"".join(out) + f.finish() == STRIPPED, size
        assert f.removed == 3


def test_header_filter_passes_the_body_through_untouched() -> None:
    """Past the header block pieces are returned as they are: the body is never examined."""
    f = HeaderFilter(OWN)
    head = SPOOFED.split(b"\r\n\r\n", 1)[0]
    assert f.feed(head + b"\r\n\r\n") == STRIPPED.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    piece = b"X-Virus-Status: Clean\r\n" * 1000
    assert f.feed(piece) is piece and f.done
    big = b"Subject: s\r\n\r\n" + b"X-Virus-Status: Clean\r\n" * 500_000
    assert strip_headers(big, OWN) is big  # nothing removed: not even copied


def test_long_lines_are_decided_by_their_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mailedit, "_LONG_LINE", 16)
    data = (b"X-Virus-Status: " + b"c" * 100 + b"\r\n\t" + b"d" * 100 + b"\r\n"
            b"Subject: " + b"s" * 100 + b"\r\n\r\nbody")
    for size in (1, 7, 50, 1000):
        f = HeaderFilter(OWN)
        out = [f.feed(data[i:i + size]) for i in range(0, len(data), size)]
        assert b"".join(out) + f.finish() == b"Subject: " + b"s" * 100 + b"\r\n\r\nbody"


def test_edit_message_removes_before_it_adds() -> None:
    out = edit_message(SPOOFED, decision(headers=(("X-Virus-Status", "Infected (EICAR)"),),
                                         subject_prefix="[V] "), CLEAN, remove=OWN)
    assert out == b"X-Virus-Status: Infected (EICAR)\r\n" + STRIPPED.replace(
        b"Subject: hi", b"Subject: [V] hi")


# -- replace on results that were not scanned (Kernun's REPLACE-AV-UNKNOWN) ------------------
def _policy_decision(status: str, result: ScanResult, action: list[str]) -> Decision:
    from avgate.policy import Context, Policy, PolicySettings

    settings = PolicySettings.model_validate(
        {"rules": [{"name": "r", "status": status, "action": action}]})
    return Policy(settings).decide(result, Context("smtp"), refid="REF1")


async def test_replace_on_unknown_replaces_the_part_not_scanned() -> None:
    from tests.corpus import encode_base64, encrypted_zip, mail

    archive = encrypted_zip("inner.exe", b"PK-secret-payload-" * 8)
    data = mail(attachments=[("ok.txt", b"harmless words\n"), ("secret.zip", archive)])
    result = await _scan(data)
    assert result.status is ScanStatus.UNKNOWN and result.details
    d = _policy_decision("unknown", result, ["accept", "replace", "tag"])
    assert d.replace and "replace" in d.actions
    edited = mailedit.apply_decision(data, d, result)
    assert edited.applied == ("replace", "tag") and edited.replaced == 1
    msg = email.message_from_bytes(edited.data, policy=email.policy.default)
    parts = list(msg.iter_parts())
    assert [p.get_filename() for p in parts] == [None, "ok.txt", "virus-removed.txt"]
    notice = parts[2].get_content()
    assert "could not be scanned" in notice and "secret.zip" in notice and "REF1" in notice
    assert encode_base64(archive)[:60] in data and encode_base64(archive)[:60] not in edited.data
    assert parts[1].get_content() == b"harmless words\n"
    # what is delivered now scans clean: nothing unscanned got through
    assert (await _scan(edited.data)).status is ScanStatus.CLEAN


def test_replace_on_unknown_without_part_paths_replaces_the_body() -> None:
    # an engine that only says "not scanned" (clamd over StreamMaxLength): no part paths
    data = b"From: a@b\r\nSubject: s\r\nContent-Type: text/plain\r\n\r\nopaque data\r\n"
    result = ScanResult(ScanStatus.SKIPPED, reason="size limit: over StreamMaxLength")
    d = _policy_decision("skipped", result, ["accept", "replace"])
    edited = mailedit.apply_decision(data, d, result)
    assert edited.applied == ("replace",)
    msg = email.message_from_bytes(edited.data, policy=email.policy.default)
    assert msg["Subject"] == "s" and b"opaque data" not in edited.data
    assert "over StreamMaxLength" in msg.get_content()


def test_replace_is_not_claimed_where_there_is_nothing_to_replace() -> None:
    d = _policy_decision("clean", CLEAN, ["accept", "replace", "tag"])
    assert not d.replace and "replace" not in d.actions
    edited = mailedit.apply_decision(PLAIN, d, CLEAN)
    assert "replace" not in edited.applied and edited.data.endswith(PLAIN)
