"""milter_actions helpers without a socket: header edits and audit lines."""

from __future__ import annotations

from avgate.frontends import milter_actions as ma
from avgate.protocols import milter as m

ALL = m.SMFIF_ADDHDRS | m.SMFIF_CHGHDRS


def view(*headers: tuple[bytes, bytes]) -> ma.MessageView:
    return ma.MessageView([m.Header(n, v) for n, v in headers], 0, leadspc=True)


def test_incoming_copies_counted_by_name_whatever_the_case() -> None:
    """Two incoming X-Virus-Status (any case): the second deleted, the first changed; a
    forged header of another style deleted, highest index first; absent ones added."""
    v = view((b"x-virus-status", b" Clean"), (b"Subject", b" hi"),
             (b"X-VIRUS-STATUS", b" Clean"), (b"X-Spam-Flag", b" NO"),
             (b"x-spam-flag", b" NO"))
    ops = ma._header_ops(v, (("X-Virus-Status", "Infected"), ("X-Virus-Scanned", "avgate")),
                         "", ALL, own=frozenset({"x-virus-status", "x-spam-flag"}))
    assert ops == [m.ChangeHeader(2, "X-Spam-Flag", ""), m.ChangeHeader(1, "X-Spam-Flag", ""),
                   m.ChangeHeader(2, "X-Virus-Status", ""),
                   m.ChangeHeader(1, "X-Virus-Status", " Infected"),
                   m.AddHeader("X-Virus-Scanned", " avgate")]


def test_without_chgheaders_nothing_is_counted_or_changed() -> None:
    v = view((b"X-Virus-Status", b" Clean"))
    ops = ma._header_ops(v, (("X-Virus-Status", "Infected"),), "", m.SMFIF_ADDHDRS,
                         own=frozenset({"x-virus-status"}))
    assert ops == [m.AddHeader("X-Virus-Status", " Infected")]


def test_debug_audit_lines_are_not_built_when_not_written() -> None:
    responses: list[m.Response] = [m.AddHeader("X-Virus-Status", " Clean"),
                                   m.AddRecipient("<copy@example>"), m.Accept()]
    assert [e["action"] for _, e in ma.audit_events(responses)] == [
        "header-added", "recipient-added"]
    assert ma.audit_events(responses, debug=False) == [
        ("info", {"action": "recipient-added", "recipient": "<copy@example>"})]
