"""Milter responses that apply a policy Decision to a message (no I/O).

Applying a Decision (``[milter] quarantine`` = "mta" | "store" | "both", default "both"):

=========================  ===============================================================
accept                     verdict headers and the RefID header (CHGHEADER on an existing
                           one, else ADDHEADER), subject prefix (CHGHEADER Subject),
                           replaced parts — infected, or not scanned on a skipped/unknown
                           result — (REPLBODY + header changes), copy_to (ADDRCPT),
                           remove_recipients (DELRCPT), then ACCEPT
reject / tempfail          REPLYCODE with the decision's reply ("550 5.7.1 ...")
discard                    DISCARD
quarantine                 "mta"/"both": QUARANTINE (Postfix: hold queue) + ACCEPT instead
                           of a discard; "store"/"both": kept in our quarantine store
                           (the gateway wrote it); "mta" removes our copy again
=========================  ===============================================================

What the MTA did not grant is never pretended: ``replace`` without SMFIF_CHGBODY rejects
(the content must not be delivered unreplaced), ``remove_recipients`` without
SMFIF_DELRCPT tempfails (``451 4.3.5``), and :class:`Applied` lists only the actions the
responses carry out — that is what the scan log records. :func:`audit_events` turns the
responses into the scan log's audit lines (levels in :data:`AUDIT_LEVELS`).

Used by :mod:`avgate.frontends.milter` at end of message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from email.header import Header as EmailHeader
from typing import Any

from ..gateway import Outcome
from ..mailedit import replace_parts, replace_targets
from ..policy import Disposition
from ..protocols import milter as m
from ..spool import Spool


@dataclasses.dataclass
class MessageView:
    """What end-of-message processing needs to know about the message as received."""

    headers: list[m.Header]
    head_len: int  # bytes of the rebuilt header block including the empty line
    leadspc: bool  # header values carry their leading space (SMFIP_HDR_LEADSPC)


#: the scan-log level of each audit event (``[log] level`` chooses which are written)
AUDIT_LEVELS: dict[str, str] = {
    "milter-start": "debug",  # an MTA connection opened
    "milter-end": "debug",  # ... and closed (messages, seconds)
    "recipient-added": "info",
    "recipient-removed": "info",
    "header-added": "debug",
    "header-changed": "debug",
    "header-removed": "debug",
    "body-replaced": "info",
    "quarantined": "info",  # held by the MTA (SMFIR_QUARANTINE)
}

REPLY_CANNOT_REMOVE_RECIPIENTS = (
    "451 4.3.5 Recipients cannot be removed (the MTA did not grant SMFIF_DELRCPT)")


@dataclasses.dataclass
class Applied:
    """The responses for one message, and what they do: ``actions`` (the scan log's,
    only what was carried out), ``reply`` (the SMTP reply sent, if any), ``hold`` (the MTA
    was asked to hold the message)."""

    responses: list[m.Response]
    actions: tuple[str, ...]
    reply: str = ""
    hold: bool = False


def audit_events(responses: Iterable[m.Response], *, debug: bool = True
                 ) -> list[tuple[str, dict[str, Any]]]:
    """(level, event fields) of each modification in ``responses``, for the scan log;
    ``debug=False`` leaves out the debug-level ones (not written: not built either)."""
    out: list[tuple[str, dict[str, Any]]] = []

    def add(action: str, **fields: Any) -> None:
        level = AUDIT_LEVELS[action]
        if debug or level != "debug":
            out.append((level, {"action": action, **fields}))

    body = 0
    for r in responses:
        if isinstance(r, m.AddHeader):
            add("header-added", header=r.name, value=r.value.strip())
        elif isinstance(r, m.ChangeHeader):
            if r.value:
                add("header-changed", header=r.name, index=r.index, value=r.value.strip())
            else:
                add("header-removed", header=r.name, index=r.index)
        elif isinstance(r, m.AddRecipient):
            add("recipient-added", recipient=r.recipient)
        elif isinstance(r, m.DeleteRecipient):
            add("recipient-removed", recipient=r.recipient)
        elif isinstance(r, m.ReplaceBody):
            body += len(r.chunk)
        elif isinstance(r, m.Quarantine):
            add("quarantined", reason=r.reason)
    if any(isinstance(r, m.ReplaceBody) for r in responses):
        add("body-replaced", size=body)
    return out


def _name_counts(headers: Iterable[m.Header]) -> dict[bytes, int]:
    """How many headers of each name (ASCII lower case, as the MTA compares) there are."""
    counts: dict[bytes, int] = {}
    for h in headers:
        name = h.name.lower()
        counts[name] = counts.get(name, 0) + 1
    return counts


def _count(counts: dict[bytes, int], name: str) -> int:
    return counts.get(name.lower().encode("utf-8", "surrogateescape"), 0)


def _header_ops(view: MessageView, decision_headers: tuple[tuple[str, str], ...],
                subject_prefix: str, actions: int, own: frozenset[str] = frozenset()
                ) -> list[m.Response]:
    """Header edits: our verdict headers (replacing incoming copies), the Subject prefix,
    and the deletion of incoming copies of every other header avgate may write (``own``,
    :meth:`Policy.own_header_names`), as the SMTP and qmail front-ends do: a forged
    ``X-Virus-Status: Clean`` must not reach the recipient when this message gets no tag."""
    ops: list[m.Response] = []
    lead = " " if view.leadspc else ""
    can_add = bool(actions & m.SMFIF_ADDHDRS)
    can_change = bool(actions & m.SMFIF_CHGHDRS)
    counts = _name_counts(view.headers) if can_change else {}
    if can_change and own:
        ours = {name.lower() for name, _ in decision_headers}
        forged: dict[str, str] = {}  # lower-cased name → the name as it came in
        for h in view.headers:
            name = h.name.decode("utf-8", "surrogateescape")
            if name.lower() in own and name.lower() not in ours:
                forged.setdefault(name.lower(), name)
        for name in forged.values():
            # highest index first, so the remaining indexes stay valid
            ops.extend(m.ChangeHeader(i, name, "") for i in range(_count(counts, name), 0, -1))
    for name, value in decision_headers:
        n = _count(counts, name)
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


def _refuse(reply: str, disposition: str) -> Applied:
    return Applied([m.ReplyCode(m.milter_reply(reply))], (disposition,), reply)


def _angle(address: str) -> str:
    return address if address.startswith("<") else f"<{address}>"


def responses_for(outcome: Outcome, view: MessageView, spool: Spool, *, actions: int,
                  quarantine_mode: str, own_headers: frozenset[str] = frozenset()) -> Applied:
    """The milter responses that apply ``outcome``, and what they carry out."""
    d = outcome.decision
    if d.disposition is Disposition.REJECT:
        reply = d.reply or "550 5.7.1 Message rejected"
        return Applied([m.ReplyCode(m.milter_reply(reply, "550 5.7.1 Message rejected"))],
                       ("reject",), reply)
    if d.disposition is Disposition.TEMPFAIL:
        reply = d.reply or "451 4.7.1 Message not accepted now, try again later"
        return Applied([m.ReplyCode(m.milter_reply(
            reply, "451 4.7.1 Message not accepted now, try again later"))], ("tempfail",),
            reply)
    hold = (d.quarantine and quarantine_mode in ("mta", "both")
            and bool(actions & m.SMFIF_QUARANTINE))
    kept = hold or bool(outcome.quarantine_id)
    reason = f"avgate: {outcome.result.virus or outcome.result.status.value}"
    if outcome.refid:
        reason += f" (RefID {outcome.refid})"
    if outcome.quarantine_id:
        reason += f" (quarantine id {outcome.quarantine_id})"
    if d.disposition is Disposition.DISCARD:
        done = ("discard", "quarantine") if kept else ("discard",)
        if hold:  # the MTA keeps it on hold instead of dropping it
            return Applied([m.Quarantine(reason), m.Accept()], done, hold=True)
        return Applied([m.Discard()], done)
    if d.remove_recipients and not actions & m.SMFIF_DELRCPT:
        # a recipient the policy removes must not get the message
        return _refuse(REPLY_CANNOT_REMOVE_RECIPIENTS, "tempfail")
    done_list = ["accept"]
    if kept:
        done_list.append("quarantine")
    ops: list[m.Response] = []
    if d.replace and replace_targets(outcome.result):
        if not actions & m.SMFIF_CHGBODY:
            # We may not rewrite the body here: never deliver the part unreplaced instead.
            if outcome.result.infected:
                return _refuse(f"550 5.7.1 Virus found: {outcome.result.virus or 'unknown'}"
                               f" (RefID {d.refid})", "reject")
            return _refuse(f"554 5.7.0 Message content not scannable (RefID {d.refid})",
                           "reject")
        original = spool.getvalue()
        edited = replace_parts(original, outcome.result, d.notice, d.refid)
        body_ops = _replace_ops(original, view.head_len, edited, view.leadspc)
        if any(isinstance(op, m.ReplaceBody) for op in body_ops):
            done_list.append("replace")
        ops.extend(body_ops)
    header_ops = _header_ops(view, d.headers, d.subject_prefix, actions, own_headers)
    written = {op.name.lower() for op in header_ops
               if isinstance(op, m.AddHeader | m.ChangeHeader) and op.value}
    if written & {n.lower() for n, _ in d.headers if n != d.refid_header}:
        done_list.append("tag")
    if d.subject_prefix and "subject" in written:
        done_list.append("prefix_subject")
    ops.extend(header_ops)
    if d.copy_to and actions & m.SMFIF_ADDRCPT:
        ops.extend(m.AddRecipient(_angle(a)) for a in d.copy_to)
        done_list.append("copy_to")
    if d.remove_recipients:
        ops.extend(m.DeleteRecipient(_angle(a)) for a in d.remove_recipients)
        done_list.append("remove_recipients")
    if d.shadow:
        done_list.append("shadow")
    if hold:
        ops.append(m.Quarantine(reason))
    ops.append(m.Accept())
    return Applied(ops, tuple(done_list), hold=hold)
