"""Getting objects out of quarantine: release (re-inject over SMTP) and FP/FN reports.

Both talk SMTP with aiosmtplib to the configured next hop (``[quarantine] next_hop``, default
``127.0.0.1:10026``: the MTA's re-injection port, which does not scan again).
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import time
import unicodedata
from collections.abc import Iterable, Sequence
from email.utils import formatdate, make_msgid

import aiosmtplib

from ..errors import QuarantineError
from .store import QuarantineStore, Record, iso_utc

DEFAULT_NEXT_HOP = "127.0.0.1:10026"
SMTP_TIMEOUT = 60.0


class AlreadyReleased(QuarantineError):
    """A second release without ``force`` (the CLI answers it with exit code 1)."""


class InvalidAddress(QuarantineError):
    """An address that is not a plausible RFC 5321 mailbox (the HTTP API answers 400)."""


# -- addresses: the one parser for every address a release sends to or stores ------------
# RFC 5321 Mailbox (local-part "@" domain), with RFC 6531 UTF-8 allowed in atoms and labels.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"')
_LABEL = re.compile(r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\u0080-\U0010ffff-]{0,61}"
                    r"[A-Za-z0-9\u0080-\U0010ffff])?")
# control characters (C0, DEL, C1), format characters (bidi overrides...), surrogates and
# every kind of space or line break are never part of an address (a quoted local part may
# hold a plain space, checked by _QUOTED)
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})


def _bad(value: str, why: str) -> InvalidAddress:
    return InvalidAddress(f"invalid address {value!r}: {why}")


def parse_address(value: str) -> str:
    """A plausible mailbox ``local@domain`` (or ``postmaster``), else InvalidAddress.

    One pair of enclosing angle brackets is removed (``<a@b>`` → ``a@b``). CR, LF, NUL and
    every other control character are refused wherever they are, as is anything that is not
    a dot-string or quoted-string local part with a host name or address-literal domain.
    """
    if not isinstance(value, str):
        raise InvalidAddress(f"invalid address {value!r}: not a string")
    addr = value[1:-1] if value.startswith("<") and value.endswith(">") else value
    for ch in addr:
        if ch != " " and unicodedata.category(ch) in _FORBIDDEN_CATEGORIES:
            raise _bad(value, f"contains the control or space character U+{ord(ch):04X}")
    if not addr:
        raise _bad(value, "empty")
    if len(addr.encode("utf-8", "surrogatepass")) > 254:
        raise _bad(value, "longer than 254 bytes")
    if addr.lower() == "postmaster":
        return addr
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain:
        raise _bad(value, "expected local-part@domain")
    if len(local.encode("utf-8")) > 64:
        raise _bad(value, "local part longer than 64 bytes")
    if not (_DOT_STRING.fullmatch(local) or _QUOTED.fullmatch(local)):
        raise _bad(value, "malformed local part")
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        try:
            if literal[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            raise _bad(value, "malformed address literal") from None
        return addr
    labels = domain.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise _bad(value, "malformed domain")
    return addr


def parse_sender(value: str) -> str:
    """An envelope sender: ``""`` / ``<>`` (the null reverse-path) or a mailbox."""
    return "" if value in ("", "<>") else parse_address(value)


def parse_addresses(values: Iterable[str], limit: int | None = None) -> list[str]:
    """Every address through :func:`parse_address`; at least one (at most ``limit``)."""
    out = [parse_address(v) for v in values]
    if not out:
        raise InvalidAddress("no recipient address")
    if limit is not None and len(out) > limit:
        raise InvalidAddress(f"more than {limit} recipient addresses")
    return out


def parse_hostport(value: str, default_port: int = 25) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``host`` → (host, port)."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, ""
    if not host or (port and not port.isdigit()):
        raise QuarantineError(f"bad next hop {value!r}: expected host:port")
    return host, int(port) if port else default_port


async def send(next_hop: str, sender: str, recipients: Sequence[str], data: bytes) -> None:
    """One SMTP transaction; raises QuarantineError when any recipient is refused."""
    if not recipients:
        raise QuarantineError("no recipients to send to")
    host, port = parse_hostport(next_hop)
    try:
        smtp = aiosmtplib.SMTP(hostname=host, port=port, timeout=SMTP_TIMEOUT,
                               start_tls=False, use_tls=False)
        async with smtp:
            refused, _ = await smtp.sendmail(sender, list(recipients), data)
    except aiosmtplib.SMTPException as exc:
        raise QuarantineError(f"SMTP to {next_hop} failed: {exc}") from exc
    except OSError as exc:
        raise QuarantineError(f"cannot connect to {next_hop}: {exc}") from exc
    if refused:
        raise QuarantineError("recipients refused: " + ", ".join(
            f"{r} ({resp.code} {resp.message})" for r, resp in refused.items()))


async def release(store: QuarantineStore, record_id: str, next_hop: str,
                  to: Sequence[str] | None = None, force: bool = False) -> Record:
    """Send a record with its original envelope (or to ``to``); refuse a second release.

    Raises NotFound, QuarantineError (already released without ``force``, SMTP failure),
    InvalidAddress (a ``to`` address, or a stored sender or recipient, that is not a plausible
    mailbox: nothing is sent).
    """
    record = store.get(record_id)
    if record.released is not None and not force:
        raise AlreadyReleased(
            f"{record_id} was already released at {iso_utc(record.released)} "
            f"(use --force to release it again)")
    # every address is checked here, whoever asks (CLI, HTTP): a CR/LF or other junk never
    # reaches the SMTP client nor the store, whatever the SMTP library does with it
    recipients = parse_addresses(to if to else record.envelope.recipients)
    sender = parse_sender(record.envelope.sender)
    await send(next_hop, sender, recipients, store.read_raw(record_id))
    store.mark_released(record_id, recipients)
    return store.get(record_id)


def build_report(record: Record, raw: bytes, kind: str, report_from: str,
                 report_to: str) -> bytes:
    """A multipart/mixed report with the original attached as message/rfc822, verbatim.

    The attachment is written by hand, not through the email package, so the original bytes
    are not re-encoded (message/rfc822 must not be base64-encoded, RFC 2046 5.2.1).
    """
    label = "false positive" if kind == "false-positive" else "false negative"
    boundary = "avgate-report-" + secrets.token_hex(12)
    while boundary.encode() in raw:  # practically never; cheap to guarantee
        boundary = "avgate-report-" + secrets.token_hex(12)
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
    head = "\r\n".join([
        f"From: {report_from}",
        f"To: {report_to}",
        f"Subject: [avgate] {label}: {', '.join(record.viruses) or record.status} "
        f"({record.id})",
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
        f'Content-Disposition: attachment; filename="{record.id}.eml"',
        "",
        "",
    ]).encode("utf-8")
    tail = b"" if raw.endswith(b"\n") else b"\r\n"
    return head + raw + tail + f"--{boundary}--\r\n".encode()


async def report(store: QuarantineStore, record_id: str, kind: str, next_hop: str,
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
