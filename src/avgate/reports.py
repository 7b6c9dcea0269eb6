"""False-positive / false-negative reports for any file or message (``avgate report``).

``avgate report --false-positive FILE`` (or ``--false-negative FILE``; ``-`` reads stdin)
rescans the object with the configured engines first — so the report states today's verdict,
engines and signature versions, not a remembered one — then sends it to the configured
address as a message/rfc822 attachment, with :func:`avgate.smtpclient.send` through
``[quarantine] next_hop``:

* false positives go to ``[quarantine] report_fp_to``, false negatives to ``report_fn_to``;
  either falls back to ``report_to`` (the one address ``avgate quarantine report`` uses);
* a message (the object starts with a header block) is attached verbatim; any other file is
  first wrapped in a small message that carries it as an ``application/octet-stream``
  attachment (base64), so the vendor's desk receives one message/rfc822 either way.

Exit codes: 0 sent, 2 error (no address configured, unreadable file, SMTP failure). Reports
of quarantined records stay ``avgate quarantine report ID``.
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import sys
import time
from email.utils import formatdate
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .quarantine.release import report_message

if TYPE_CHECKING:
    from .config import Config
    from .result import ScanResult

KINDS = ("false-positive", "false-negative")
EXIT_OK, EXIT_ERROR = 0, 2
MAX_REPORT_SIZE = 50 * 1024 * 1024  # a report is an attachment, not a transfer channel
# a header line at the very start: "Name: value" (RFC 5322 field name), else not a message
_HEADER_RE = re.compile(rb"^[!-9;-~]{1,76}:[ \t]?[^\r\n]*\r?\n")


def looks_like_message(data: bytes) -> bool:
    """True when ``data`` starts with an RFC 5322 header block (attached as it is)."""
    head = data[:8192]
    if not _HEADER_RE.match(head):
        return False
    return b"\n\n" in head or b"\r\n\r\n" in head or len(data) == len(head)


def wrap_file(name: str, data: bytes, report_from: str) -> bytes:
    """A minimal message carrying a non-message file as its only attachment."""
    boundary = "avgate-file-" + secrets.token_hex(12)
    safe = re.sub(r'[^A-Za-z0-9._+-]', "_", Path(name).name)[:100] or "object"
    b64 = base64.encodebytes(data).replace(b"\n", b"\r\n")
    head = "\r\n".join([
        f"From: {report_from}",
        f"Subject: {safe}",
        f"Date: {formatdate(time.time(), localtime=False)}",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/mixed; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: application/octet-stream",
        "Content-Transfer-Encoding: base64",
        f'Content-Disposition: attachment; filename="{safe}"',
        "", ""]).encode()
    return head + b64 + f"--{boundary}--\r\n".encode()


def build_file_report(name: str, data: bytes, result: ScanResult, kind: str,
                      report_from: str, report_to: str) -> bytes:
    """multipart/mixed: a text summary (rescan verdict, engines, hashes), then the object as
    message/rfc822 — verbatim when it is a message, wrapped (:func:`wrap_file`) otherwise."""
    from . import __version__

    if kind not in KINDS:
        raise ValueError(f"unknown report kind {kind!r}")
    label = kind.replace("-", " ")
    inner = data if looks_like_message(data) else wrap_file(name, data, report_from)
    findings = ", ".join(f"{f.name} ({f.engine})" for f in result.findings) or "-"
    engines = ", ".join(f"{e.name} {e.version}" for e in result.engines) or "-"
    shown = name.encode("ascii", "backslashreplace").decode()
    shown = re.sub(r"[\x00-\x1f\x7f]", "?", shown)
    summary = "\r\n".join([
        f"avgate {label} report (avgate {__version__})",
        "",
        f"Object:        {shown}",
        f"Attached as:   {'the message itself' if inner is data else 'a file in a message'}",
        f"Rescan status: {result.status.value}",
        f"Findings:      {findings}",
        f"Reason:        {result.reason or '-'}",
        f"Engines:       {engines}",
        f"SHA-256:       {result.sha256}",
        f"Size:          {len(data)}",
        "",
    ])
    what = result.virus if result.findings else result.status.value
    subject = f"[avgate] {label}: {what} ({result.sha256[:16]})"
    return report_message(report_from, report_to, subject, summary, inner, "reported.eml")


async def send_report(cfg: Config, name: str, data: bytes, kind: str,
                      to: str | None = None) -> tuple[ScanResult, str, bytes]:
    """Rescan ``data``, build the report and send it; (rescan result, address, report).

    Raises QuarantineError (no address, SMTP failure) and InvalidAddress."""
    from .errors import QuarantineError
    from .quarantine.addresses import parse_address, parse_sender
    from .quarantine.release import send
    from .scan import ScanService

    settings = cfg.quarantine
    address = to or settings.report_address(kind)
    if not address:
        key = "report_fp_to" if kind == "false-positive" else "report_fn_to"
        raise QuarantineError(f"[quarantine] {key} (or report_to) is not configured")
    address = parse_address(address)
    sender = parse_sender(settings.report_from)
    service = ScanService.from_config(cfg)
    await service.start()
    try:
        result = await service.scan_bytes(data)
    finally:
        await service.close()
    message = build_file_report(name, data, result, kind, sender, address)
    await send(settings.next_hop, sender, [address], message)
    return result, address, message


def _read(path: str) -> bytes:
    if path == "-":
        data = sys.stdin.buffer.read(MAX_REPORT_SIZE + 1)
    else:
        with open(path, "rb") as f:
            data = f.read(MAX_REPORT_SIZE + 1)
    if len(data) > MAX_REPORT_SIZE:
        raise OSError(f"{path}: larger than {MAX_REPORT_SIZE} bytes, not sent")
    return data


def report_cli(
    ctx: typer.Context,
    false_positive: Annotated[str | None, typer.Option(
        "--false-positive", metavar="FILE",
        help="Report FILE (or - for stdin) as wrongly detected.")] = None,
    false_negative: Annotated[str | None, typer.Option(
        "--false-negative", metavar="FILE",
        help="Report FILE (or - for stdin) as a missed detection.")] = None,
    to: Annotated[str | None, typer.Option(
        "--to", help="Send to this address instead of the configured one.")] = None,
    config: Annotated[str | None, typer.Option("--config", "-c",
                                               help="Config file (TOML).")] = None,
) -> None:
    """Rescan a file or message, then send it as a false-positive / false-negative report
    (message/rfc822) to [quarantine] report_fp_to / report_fn_to."""
    from .cli_quarantine import load_config, safe
    from .errors import AvgateError
    from .quarantine.addresses import InvalidAddress

    if (false_positive is None) == (false_negative is None):
        typer.echo("avgate: give exactly one of --false-positive FILE, --false-negative FILE",
                   err=True)
        raise typer.Exit(EXIT_ERROR)
    kind, path = (("false-positive", false_positive) if false_positive is not None
                  else ("false-negative", str(false_negative)))
    cfg = load_config(config, ctx)
    try:
        data = _read(path)
        result, address, _ = asyncio.run(send_report(cfg, path, data, kind, to))
    except (OSError, AvgateError, InvalidAddress) as exc:
        typer.echo(safe(f"avgate: {exc}"), err=True)
        raise typer.Exit(EXIT_ERROR) from None
    verdict = (f"{result.status.value} ({result.virus})" if result.findings
               else result.status.value)
    typer.echo(safe(f"{path}: rescanned: {verdict}; {kind} report sent to {address}"))
