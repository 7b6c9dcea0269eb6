"""Getting objects out of quarantine: release (re-inject over SMTP) and FP/FN reports.

Both talk SMTP with :func:`avgate.smtpclient.send` (the client the SMTP filter relays with) to
the configured next hop (``[quarantine] next_hop``, default ``127.0.0.1:10026``: the MTA's
re-injection port, which does not scan again).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence
from email.utils import formatdate, make_msgid

from ..errors import QuarantineError
from ..smtpclient import NextHopError, describe_refused, parse_next_hop
from ..smtpclient import send as smtp_send
from .addresses import parse_addresses, parse_sender
from .base import AlreadyReleased, Record, Store, iso_utc

__all__ = ["AlreadyReleased", "build_report", "release", "report", "send"]

SMTP_TIMEOUT = 60.0


def parse_hostport(value: str, default_port: int = 25) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``host`` → (host, port)."""
    try:
        return parse_next_hop(value, default_port)
    except ValueError:
        raise QuarantineError(f"bad next hop {value!r}: expected host:port") from None


async def send(next_hop: str, sender: str, recipients: Sequence[str], data: bytes) -> None:
    """One SMTP transaction; raises QuarantineError when any recipient is refused."""
    if not recipients:
        raise QuarantineError("no recipients to send to")
    host, port = parse_hostport(next_hop)
    try:
        refused = await smtp_send(host, port, sender, recipients, data, timeout=SMTP_TIMEOUT)
    except NextHopError as exc:
        raise QuarantineError(f"SMTP to {next_hop} failed: {exc}") from exc
    if refused:
        raise QuarantineError("recipients refused: " + describe_refused(refused))


async def release(store: Store, record_id: str, next_hop: str,
                  to: Sequence[str] | None = None, force: bool = False) -> Record:
    """Send a record with its original envelope (or to ``to``); refuse a second release.

    Exactly once, across gateways sharing a store: the release is claimed first
    (:meth:`~.base.Store.claim_release`, one conditional update), sent, then recorded; a
    failed send drops the claim. Raises NotFound, AlreadyReleased (released before without
    ``force``, or being released right now), QuarantineError (SMTP failure), InvalidAddress
    (a ``to`` address, or a stored sender or recipient, that is not a plausible mailbox:
    nothing is sent).
    """
    claim = await asyncio.to_thread(store.claim_release, record_id, force)
    try:
        record = claim.record
        # every address is checked here, whoever asks (CLI, HTTP): a CR/LF or other junk
        # never reaches the SMTP client nor the store, whatever the SMTP library does with it
        recipients = parse_addresses(to if to else record.envelope.recipients)
        sender = parse_sender(record.envelope.sender)
        data = await asyncio.to_thread(store.read_raw, record_id)
        await send(next_hop, sender, recipients, data)
    except BaseException:
        await asyncio.shield(asyncio.to_thread(store.abort_release, claim))
        raise
    await asyncio.to_thread(store.finish_release, claim, recipients)
    return await asyncio.to_thread(store.get, record_id)


def report_message(report_from: str, report_to: str, subject: str, summary: str,
                   attachment: bytes, filename: str) -> bytes:
    """A multipart/mixed report: ``summary`` as text, then ``attachment`` (a message) as
    message/rfc822, verbatim.

    The attachment is written by hand, not through the email package, so the original bytes
    are not re-encoded (message/rfc822 must not be base64-encoded, RFC 2046 5.2.1).
    """
    boundary = "avgate-report-" + secrets.token_hex(12)
    while boundary.encode() in attachment:  # practically never; cheap to guarantee
        boundary = "avgate-report-" + secrets.token_hex(12)
    head = "\r\n".join([
        f"From: {report_from}",
        f"To: {report_to}",
        f"Subject: {subject}",
        f"Date: {formatdate(time.time(), localtime=False)}",
        f"Message-ID: {make_msgid('avgate-report')}",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/mixed; boundary="{boundary}"',
        "",
        "This is a MIME-formatted message.",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        summary,
        f"--{boundary}",
        "Content-Type: message/rfc822",
        "Content-Transfer-Encoding: 8bit",
        f'Content-Disposition: attachment; filename="{filename}"',
        "",
        "",
    ]).encode("utf-8")
    tail = b"" if attachment.endswith(b"\n") else b"\r\n"
    return head + attachment + tail + f"--{boundary}--\r\n".encode()


def build_report(record: Record, raw: bytes, kind: str, report_from: str,
                 report_to: str) -> bytes:
    """A report about a quarantined record, the original attached (:func:`report_message`)."""
    label = "false positive" if kind == "false-positive" else "false negative"
    summary = "\r\n".join([
        f"avgate {label} report",
        "",
        f"Quarantine id: {record.id}",
        f"Quarantined:   {iso_utc(record.created)}",
        f"Status:        {record.status}",
        f"Findings:      {', '.join(record.viruses) or '-'}",
        f"Rule:          {record.rule or '-'}",
        f"Front-end:     {record.frontend or '-'} ({record.envelope.listener or '-'})",
        f"Sender:        {record.envelope.sender or '<>'}",
        f"Recipients:    {', '.join(record.envelope.recipients) or '-'}",
        f"SHA-256:       {record.sha256}",
        f"Size:          {record.size}",
        "",
    ])
    subject = f"[avgate] {label}: {', '.join(record.viruses) or record.status} ({record.id})"
    return report_message(report_from, report_to, subject, summary, raw, f"{record.id}.eml")


async def report(store: Store, record_id: str, kind: str, next_hop: str,
                 report_from: str, report_to: str) -> bytes:
    """Send a false-positive/false-negative report about a record; return what was sent."""
    if kind not in ("false-positive", "false-negative"):
        raise ValueError(f"unknown report kind {kind!r}")
    if not report_to:
        raise QuarantineError("[quarantine] report_to is not configured")
    record = store.get(record_id)
    data = build_report(record, store.read_raw(record_id), kind, report_from, report_to)
    await send(next_hop, report_from, [report_to], data)
    return data
