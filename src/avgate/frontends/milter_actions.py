"""Milter responses that apply a policy Decision to a message (no I/O).

Applying a Decision (``[milter] quarantine`` = "mta" | "store" | "both", default "both"):

=========================  ===============================================================
accept                     verdict headers (CHGHEADER on an existing one, else ADDHEADER),
                           subject prefix (CHGHEADER Subject), replaced parts
                           (REPLBODY + header changes), copy_to (ADDRCPT), then ACCEPT
reject / tempfail          REPLYCODE with the decision's reply ("550 5.7.1 ...")
discard                    DISCARD
quarantine                 "mta"/"both": QUARANTINE (Postfix: hold queue) + ACCEPT instead
                           of a discard; "store"/"both": kept in our quarantine store
                           (the gateway wrote it); "mta" removes our copy again
=========================  ===============================================================

Used by :mod:`avgate.frontends.milter` at end of message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from email.header import Header as EmailHeader

from ..gateway import Outcome
from ..policy import Disposition
from ..protocols import milter as m
from ..spool import Spool


@dataclasses.dataclass
class MessageView:
    """What end-of-message processing needs to know about the message as received."""

    headers: list[m.Header]
    head_len: int  # bytes of the rebuilt header block including the empty line
    leadspc: bool  # header values carry their leading space (SMFIP_HDR_LEADSPC)


def _count(headers: Iterable[m.Header], name: str) -> int:
    lname = name.lower().encode("utf-8", "surrogateescape")
    return sum(1 for h in headers if h.name.lower() == lname)


def _header_ops(view: MessageView, decision_headers: tuple[tuple[str, str], ...],
                subject_prefix: str, actions: int) -> list[m.Response]:
    ops: list[m.Response] = []
    lead = " " if view.leadspc else ""
    can_add = bool(actions & m.SMFIF_ADDHDRS)
    can_change = bool(actions & m.SMFIF_CHGHDRS)
    for name, value in decision_headers:
        n = _count(view.headers, name) if can_change else 0
        if n:
            # clamav-milter style: our verdict replaces what came in (a sender must not be
            # able to pre-set "X-Virus-Status: Clean"); extra copies are deleted, highest
            # index first so the remaining indexes stay valid.
            ops.extend(m.ChangeHeader(i, name, "") for i in range(n, 1, -1))
            ops.append(m.ChangeHeader(1, name, lead + value))
        elif can_add:
            # appended (ADDHEADER), like clamav-milter; INSHEADER would put it above the
            # MTA's own Received: line
            ops.append(m.AddHeader(name, lead + value))
    if subject_prefix:
        prefix = subject_prefix
        if not prefix.isascii():
            prefix = EmailHeader(prefix.strip(), "utf-8").encode() + " "
        subject = next((h for h in view.headers if h.name.lower() == b"subject"), None)
        if subject is not None and can_change:
            value = subject.value.decode("utf-8", "surrogateescape")
            stripped = value.lstrip(" \t")
            ops.append(m.ChangeHeader(1, "Subject",
                                      value[:len(value) - len(stripped)] + prefix + stripped))
        elif subject is None and can_add:
            ops.append(m.AddHeader("Subject", lead + prefix.rstrip()))
    return ops


def _split_headers(block: bytes) -> list[tuple[str, bytes]]:
    """(lower-case name, raw value) of each header in a CRLF header block."""
    out: list[tuple[str, bytes]] = []
    for line in block.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and out:
            out[-1] = (out[-1][0], out[-1][1] + b"\n" + line)
            continue
        name, _, value = line.partition(b":")
        out.append((name.strip().decode("latin-1"), value))
    return out


def _norm(value: bytes) -> bytes:
    return b" ".join(value.split())


def _replace_ops(original: bytes, head_len: int, edited: bytes, leadspc: bool
                 ) -> list[m.Response]:
    """REPLBODY chunks and header changes that turn ``original`` into ``edited``."""
    ops: list[m.Response] = []
    sep = edited.find(b"\r\n\r\n")
    new_head, new_body = (edited, b"") if sep < 0 else (edited[:sep + 2], edited[sep + 4:])
    old = _split_headers(original[:head_len])
    new = _split_headers(new_head)
    names = dict.fromkeys(n.lower() for n, _ in old + new)
    for lname in names:
        before = [(n, v) for n, v in old if n.lower() == lname]
        after = [(n, v) for n, v in new if n.lower() == lname]
        for i, (n, v) in enumerate(after[:len(before)]):
            if _norm(v) != _norm(before[i][1]):
                value = v.decode("utf-8", "surrogateescape")
                ops.append(m.ChangeHeader(i + 1, n, value if leadspc else value.lstrip(" ")))
        for n, v in after[len(before):]:
            value = v.decode("utf-8", "surrogateescape")
            ops.append(m.AddHeader(n, value if leadspc else value.lstrip(" ")))
        for i in range(len(before), len(after), -1):
            ops.append(m.ChangeHeader(i, before[i - 1][0], ""))
    if new_body != original[head_len:]:
        ops.extend(m.ReplaceBody(new_body[i:i + m.MAX_BODY_CHUNK])
                   for i in range(0, len(new_body), m.MAX_BODY_CHUNK))
        if not new_body:
            ops.append(m.ReplaceBody(b""))
    return ops


def responses_for(outcome: Outcome, view: MessageView, spool: Spool, *, actions: int,
                  quarantine_mode: str) -> tuple[list[m.Response], bool]:
    """The milter responses that apply ``outcome``; the flag says whether the MTA was asked
    to hold the message (SMFIR_QUARANTINE)."""
    d = outcome.decision
    if d.disposition is Disposition.REJECT:
        return [m.ReplyCode(m.milter_reply(d.reply, "550 5.7.1 Message rejected"))], False
    if d.disposition is Disposition.TEMPFAIL:
        return [m.ReplyCode(m.milter_reply(
            d.reply, "451 4.7.1 Message not accepted now, try again later"))], False
    hold = (d.quarantine and quarantine_mode in ("mta", "both")
            and bool(actions & m.SMFIF_QUARANTINE))
    reason = f"avgate: {outcome.result.virus or outcome.result.status.value}"
    if outcome.quarantine_id:
        reason += f" (quarantine id {outcome.quarantine_id})"
    if d.disposition is Disposition.DISCARD:
        if hold:  # the MTA keeps it on hold instead of dropping it
            return [m.Quarantine(reason), m.Accept()], True
        return [m.Discard()], False
    ops: list[m.Response] = []
    if d.replace and outcome.result.findings:
        if not actions & m.SMFIF_CHGBODY:
            # We may not rewrite the body here: never deliver the infected part instead.
            virus = outcome.result.virus or "unknown"
            return [m.ReplyCode(m.milter_reply(f"550 5.7.1 Virus found: {virus}"))], False
        from ..mailedit import replace_parts

        original = spool.getvalue()
        edited = replace_parts(original, outcome.result, d.notice)
        ops.extend(_replace_ops(original, view.head_len, edited, view.leadspc))
    ops.extend(_header_ops(view, d.headers, d.subject_prefix, actions))
    if d.copy_to and actions & m.SMFIF_ADDRCPT:
        ops.extend(m.AddRecipient(a if a.startswith("<") else f"<{a}>") for a in d.copy_to)
    if hold:
        ops.append(m.Quarantine(reason))
    ops.append(m.Accept())
    return ops, hold
