"""Milter front-end (Postfix ``smtpd_milters``, Sendmail ``INPUT_MAIL_FILTER``), protocol v6.

A thin asyncio adapter over :mod:`avgate.protocols.milter`: one :class:`MilterSession`
(an ``asyncio.Protocol``) per MTA connection feeds bytes to the codec and handles the
events synchronously, except end-of-message, which runs :meth:`Gateway.process` in a task
while reading is paused (the MTA waits for that answer anyway).

We negotiate to receive only what we use and to answer only where we must: connect, HELO,
MAIL, RCPT, header and body events get no reply (SMFIP_NR_*), DATA/EOH/unknown-command
events are not sent at all; only OPTNEG and end-of-message are answered. Headers and body
are rebuilt into a Spool (memory, then a temp file) as they arrive.

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

A malformed packet, a read timeout (``[milter] timeout``) or an internal error closes the
connection; the MTA then applies its ``milter_default_action``.

Limits (each bounds what one connection can make us hold; see README):

=========================  ===============================================================
``max_packet``             256 KiB: a longer packet closes the connection before a byte of
                           it is buffered (see :mod:`avgate.protocols.milter`)
``packet_timeout``         30 s from the first byte of a packet to its last, however the
                           bytes trickle in (Postfix writes a packet at once and gives up
                           after its own ``milter_command_timeout``, 30 s)
``timeout``                330 s without a byte from the MTA between packets
``max_headers``,           1000 headers, 1 MiB of header block per message; more, or more
``max_header_size``,       than ``max_recipients`` (10000) recipients: nothing more of the
``max_recipients``         message is kept and end-of-message is answered
                           ``552 5.3.4`` / ``552 5.5.3`` (the sender's fault, like Exim's
                           ``header_maxsize`` and Sendmail's ``MaxHeadersLength``)
``max_connections``        512 connections served at once; as many more wait for a slot,
                           each at most ``queue_timeout`` (30 s: Postfix's
                           ``milter_command_timeout`` would have given up on its OPTNEG
                           reply by then); connections beyond both are closed at once
=========================  ===============================================================

Reload and workers (``avgate serve``): the Gateway (scanner, policy, store, log) is read per
message through ``listener.gateway`` (serve's GatewayRef), and so are ``[milter] quarantine``
and ``spool_memory``; ``listen``, the timeouts and the limits are the listener's and need a
restart. With ``[serve] workers`` > 1 every worker binds a TCP
``listen`` with SO_REUSEPORT; a ``unix:`` socket is opened by worker 0 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import stat
from collections.abc import Iterable
from email.header import Header as EmailHeader
from typing import TYPE_CHECKING, Any

from ..errors import AvgateError, ProtocolError
from ..gateway import Envelope, Outcome
from ..policy import Context, Disposition
from ..protocols import milter as m
from ..spool import Spool

if TYPE_CHECKING:
    from ..gateway import Gateway

log = logging.getLogger("avgate.milter")

DEFAULT_LISTEN = "127.0.0.1:7357"
# Longer than Postfix's smtpd_timeout (300 s): the MTA keeps our connection open for the
# whole SMTP session and may legitimately be silent while its client is.
DEFAULT_TIMEOUT = 330.0
DEFAULT_MAX_CONNECTIONS = 512
#: A partial packet must complete within this many seconds of its first byte.
DEFAULT_PACKET_TIMEOUT = 30.0
#: How long a connection over ``max_connections`` may wait for a slot.
DEFAULT_QUEUE_TIMEOUT = 30.0
#: Per message: header count, header block bytes (as rebuilt: name, ": ", value, CRLF),
#: recipients. Postfix bounds one header (header_size_limit, 100 KiB) and the message
#: (message_size_limit, 10 MB), not their count; Exim refuses a header block over 1 MiB.
DEFAULT_MAX_HEADERS = 1000
DEFAULT_MAX_HEADER_SIZE = 1024 * 1024
DEFAULT_MAX_RECIPIENTS = 10000
REPLY_TOO_MANY_HEADERS = "552 5.3.4 Too many message header fields"
REPLY_HEADERS_TOO_BIG = "552 5.3.4 Message header size exceeds limit"
REPLY_TOO_MANY_RECIPIENTS = "552 5.5.3 Too many recipients"
DEFAULT_QUARANTINE = "both"
#: Headers buffered in memory before they go to the spool in one write.
_HEAD_FLUSH = 256 * 1024

WANTED_ACTIONS = (m.SMFIF_ADDHDRS | m.SMFIF_CHGHDRS | m.SMFIF_CHGBODY | m.SMFIF_ADDRCPT
                  | m.SMFIF_QUARANTINE)
#: Skip the events we do not use; no reply for the ones we only record; original header
#: spacing (HDR_LEADSPC) so the rebuilt message is the one the client sent.
WANTED_PROTOCOL = (m.SMFIP_NODATA | m.SMFIP_NOUNKNOWN | m.SMFIP_NOEOH
                   | m.SMFIP_NR_CONN | m.SMFIP_NR_HELO | m.SMFIP_NR_MAIL | m.SMFIP_NR_RCPT
                   | m.SMFIP_NR_HDR | m.SMFIP_NR_BODY | m.SMFIP_NR_DATA | m.SMFIP_NR_EOH
                   | m.SMFIP_NR_UNKN | m.SMFIP_HDR_LEADSPC)
#: Macros we read, per stage (sent only if the MTA lets us choose; Postfix's defaults
#: already include them).
WANTED_MACROS: tuple[tuple[int, str], ...] = (
    (m.SMFIM_CONNECT, "j {daemon_name} {client_addr}"),
    (m.SMFIM_HELO, ""),
    (m.SMFIM_ENVFROM, "i {auth_authen}"),
    (m.SMFIM_ENVRCPT, ""),
    (m.SMFIM_DATA, ""),
    (m.SMFIM_EOH, ""),
    (m.SMFIM_EOM, "i"),
)
# Stages whose macros belong to one message (forgotten at end of message / abort).
_MESSAGE_STAGES = (b"M", b"R", b"T", b"L", b"N", b"B", b"E")
# Newest first: a macro set at a later stage wins.
_LOOKUP_ORDER = (b"E", b"B", b"N", b"L", b"T", b"R", b"M", b"H", b"C")


def parse_listen(listen: str) -> tuple[str, str | None, int]:
    """("unix", path, 0) or ("inet", host, port) from "host:port", "[v6]:port",
    "inet:port@host", "inet6:port@host" or "unix:/path" (also "local:/path")."""
    if listen.startswith(("unix:", "local:")):
        return "unix", listen.split(":", 1)[1], 0
    if listen.startswith(("inet:", "inet6:")):
        kind, rest = listen.split(":", 1)
        port, _, host = rest.partition("@")
        return "inet", host or ("::1" if kind == "inet6" else "127.0.0.1"), int(port)
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"milter listen: expected host:port or unix:/path, got {listen!r}")
    return "inet", host.strip("[]"), int(port)


def _macro_name(name: str) -> str:
    return name[1:-1] if len(name) > 2 and name[0] == "{" and name[-1] == "}" else name


def _safe(s: str) -> str:
    # surrogateescape'd bytes cannot go to SQLite/JSON as text: show them as U+FFFD
    return s.encode("utf-8", "replace").decode("utf-8") if not s.isascii() else s


# -- applying a decision (no I/O) --------------------------------------------------------------
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
                  quarantine_mode: str = DEFAULT_QUARANTINE) -> tuple[list[m.Response], bool]:
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


# -- the asyncio side --------------------------------------------------------------------------
class MilterSession(asyncio.Protocol):
    """One MTA connection: several messages in a row (ABORT/end of message reset)."""

    def __init__(self, server: MilterListener) -> None:
        self.server = server
        self.gateway = server.gateway
        self.codec = m.MilterServer(max_packet=server.max_packet)
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self._busy = False  # end of message being processed: events wait in the codec
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._waiting = False  # over max_connections: not reading yet
        self._queued_at = 0.0
        self._packet_start: float | None = None  # first byte of a packet not complete yet
        # connection state
        self.macros: dict[bytes, dict[str, str]] = {}
        self.connect: m.Connect | None = None
        self.helo = ""
        self._reset_message()

    # message state -----------------------------------------------------------------------
    def _reset_message(self, keep_macros: bool = False) -> None:
        spool = getattr(self, "spool", None)
        if spool is not None:
            spool.close()
        self.spool: Spool | None = None
        self.sender = ""
        self.recipients: list[str] = []
        self.headers: list[m.Header] = []
        self.header_bytes = 0
        self.head_len = 0
        self.in_body = False
        # a per-message limit was hit: the reply for end of message; nothing more is kept
        self.refused = ""
        if keep_macros:
            return
        for stage in _MESSAGE_STAGES:
            self.macros.pop(stage, None)

    def macro(self, name: str) -> str:
        for stage in _LOOKUP_ORDER:
            values = self.macros.get(stage)
            if values and name in values:
                return values[name]
        return ""

    # asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._last = self.loop.time()
        admitted = self.server.admit(self)
        if admitted is None:  # every slot taken and the queue full
            self._event("warning", "overload",
                        f"{self.server.max_connections} connections served and as many "
                        "waiting: connection closed")
            transport.close()
            return
        if not admitted:
            self._waiting = True
            self._queued_at = self._last
            transport.pause_reading()
        self._schedule()

    def resume(self) -> None:
        """Called by the listener when a connection slot frees up."""
        self._waiting = False
        self._last = self.loop.time()
        if self.transport is not None and not self._closed:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self._last = self.loop.time()
        self.codec.receive_data(data)
        if not self._busy:
            self._pump()
            self._check_partial()

    def _check_partial(self) -> None:
        """After the complete packets were handled: a partial one left starts its clock."""
        if self._closed or self._busy:
            return
        if not self.codec.buffered:
            self._packet_start = None
            return
        if self._packet_start is None:
            self._packet_start = self._last
        if self._timer is None or self._timer.when() > self._deadline():
            self._schedule()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._task is None or self._task.done():
            self._reset_message()
        # else: a scan in progress finishes (and is logged); its reply is dropped and the
        # MTA, which gave up on us, applies its milter_default_action.
        self.server.release(self)

    def _deadline(self) -> float:
        """When this connection is closed unless something happens first."""
        srv = self.server
        if self._busy:  # scanning: bounded by the scan timeout, not ours
            return self.loop.time() + srv.timeout
        if self._waiting:
            return self._queued_at + srv.queue_timeout
        deadline = self._last + srv.timeout
        if self._packet_start is not None:
            deadline = min(deadline, self._packet_start + srv.packet_timeout)
        return deadline

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(self._deadline(), self._check_idle)

    def _check_idle(self) -> None:
        if self._closed:
            return
        now = self.loop.time()
        if self._busy or now < self._deadline():
            self._schedule()
            return
        if self._waiting:
            why = (f"waited {now - self._queued_at:.0f} s for one of "
                   f"{self.server.max_connections} connection slots")
        elif self._packet_start is not None and (
                now - self._packet_start >= self.server.packet_timeout):
            why = (f"a packet incomplete after {now - self._packet_start:.0f} s "
                   f"({self.codec.buffered} bytes received)")
        else:
            why = f"no data from the MTA for {now - self._last:.0f} s"
        self._event("warning", "timeout", why)
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.close()

    # events --------------------------------------------------------------------------------
    def _pump(self) -> None:
        """Handle every complete event; replies go out in one write."""
        out: list[bytes] = []
        codec = self.codec
        try:
            while not self._busy and not self._closed:
                event = codec.next_event()
                if event is None:
                    break
                self._packet_start = None  # a whole packet: the next one has its own clock
                # most frequent first: one packet per header, one per 64 KiB of body
                if isinstance(event, m.Header):
                    self._header(event)
                elif isinstance(event, m.Body):
                    self._body(event.chunk)
                elif isinstance(event, m.Macro):
                    self._macro(event)
                elif isinstance(event, m.EndOfMessage):
                    self._end_of_message(event, out)
                    continue  # answered (or being scanned: the loop stops while busy)
                elif isinstance(event, m.OptNeg):
                    out.append(m.encode(codec.negotiate(
                        event, actions=WANTED_ACTIONS, protocol=WANTED_PROTOCOL,
                        macros=WANTED_MACROS)))
                    continue
                elif isinstance(event, m.Mail):
                    self._reset_message(keep_macros=True)  # MAIL's macros came just before
                    self.sender = event.sender
                elif isinstance(event, m.Rcpt):
                    self._rcpt(event)
                elif isinstance(event, m.Connect):
                    self.connect = event
                elif isinstance(event, m.Helo):
                    self.helo = event.name
                elif isinstance(event, m.Abort):
                    self._reset_message()
                elif isinstance(event, m.Quit):
                    self._flush(out)
                    self.close()
                    return
                elif isinstance(event, m.QuitNewConnection):
                    self._reset_message()
                    self.macros.clear()
                    self.connect = None
                    self.helo = ""
                if codec.needs_reply(event):
                    out.append(_CONTINUE)
        except ProtocolError as exc:
            self._flush(out)
            self._event("warning", "protocol_error", str(exc))
            self.close()
            return
        except AvgateError as exc:  # spool failure: nothing we can keep, let the MTA decide
            self._event("error", "error", str(exc))
            self.close()
            return
        self._flush(out)

    def _flush(self, out: list[bytes]) -> None:
        if out and self.transport is not None and not self._closed:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def _macro(self, event: m.Macro) -> None:
        self.macros[event.stage] = {_macro_name(k): v for k, v in event.macros}

    def _refuse(self, reply: str, detail: str) -> None:
        """A per-message limit was hit: drop what we hold, answer ``reply`` at end of
        message, keep nothing more of this message."""
        if self.refused:
            return
        self.refused = reply
        self.headers = []
        self.recipients = []
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        self._event("warning", "limit", detail, reply=reply, ids=self._ids())

    def _rcpt(self, event: m.Rcpt) -> None:
        if self.refused:
            return
        if len(self.recipients) >= self.server.max_recipients:
            self._refuse(REPLY_TOO_MANY_RECIPIENTS,
                         f"more than max_recipients = {self.server.max_recipients} recipients")
            return
        self.recipients.append(event.recipient)

    def _header(self, event: m.Header) -> None:
        if self.in_body:  # headers after the body started: not a message we understand
            raise ProtocolError("header after body", reply_hint="close")
        if self.refused:
            return
        srv = self.server
        # as rebuilt in the spool: name, ": ", value, CRLF
        self.header_bytes += len(event.name) + len(event.value) + 4
        if len(self.headers) >= srv.max_headers:
            self._refuse(REPLY_TOO_MANY_HEADERS,
                         f"more than max_headers = {srv.max_headers} header fields")
        elif self.header_bytes > srv.max_header_size:
            self._refuse(REPLY_HEADERS_TOO_BIG,
                         f"header block over max_header_size = {srv.max_header_size} bytes")
        else:
            self.headers.append(event)

    def _start_body(self) -> Spool:
        """Write the rebuilt header block and the empty line, enter the body."""
        spool = self.spool
        if spool is None:
            spool = self.spool = self.server.new_spool()
        leadspc = bool(self.codec.protocol & m.SMFIP_HDR_LEADSPC)
        parts: list[bytes] = []
        size = 0
        for h in self.headers:
            value = h.value
            if b"\n" in value:  # folded: the MTA sends bare LF between the lines
                value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            # With HDR_LEADSPC the value keeps the client's own spacing; a value with none
            # ("Name:value") still gets one: some MTAs strip it anyway, and clamd's MIME
            # parser does not recognise "Content-Type:multipart/..." (it then misses base64
            # attachments). The rebuilt header block is only scanned, never sent back.
            sep = b":" if leadspc and value[:1] in (b" ", b"\t") else b": "
            parts += (h.name, sep, value, b"\r\n")
            size += len(h.name) + len(sep) + len(value) + 2
            if size > _HEAD_FLUSH:
                spool.write(b"".join(parts))
                parts.clear()
                size = 0
        parts.append(b"\r\n")
        spool.write(b"".join(parts))
        self.head_len = spool.size
        self.in_body = True
        return spool

    def _body(self, chunk: bytes) -> None:
        if self.refused:
            self.in_body = True  # headers after this are still a protocol error
            return
        spool = self.spool if self.in_body else self._start_body()
        assert spool is not None
        if chunk:
            spool.write(chunk)

    def _end_of_message(self, event: m.EndOfMessage, out: list[bytes]) -> None:
        self._body(event.chunk)
        if self.refused:  # nothing to scan: the sender's message broke a limit
            out.append(m.encode(m.ReplyCode(self.refused)))
            self._reset_message()
            return
        self._busy = True
        self._flush(out)
        assert self.transport is not None
        self.transport.pause_reading()
        self._task = self.loop.create_task(self._process())
        self.server.tasks.add(self._task)
        self._task.add_done_callback(self.server.tasks.discard)

    async def _process(self) -> None:
        spool = self.spool
        assert spool is not None
        try:
            replies, _hold, _outcome = await self._decide(spool)
            if self._closed:
                return
            assert self.transport is not None
            self.transport.write(m.encode_all(replies))
        finally:
            self._reset_message()
            self._busy = False
            if not self._closed and self.transport is not None:
                self._last = self.loop.time()
                self.transport.resume_reading()
                self._pump()
                self._check_partial()

    async def _decide(self, spool: Spool) -> tuple[list[m.Response], bool, Outcome | None]:
        client_addr = ""
        if self.connect is not None and self.connect.family in ("4", "6"):
            client_addr = self.connect.address
        client_addr = client_addr or self.macro("client_addr")
        authenticated = bool(self.macro("auth_authen"))
        policy = self.gateway.policy
        recipients = tuple(_safe(r) for r in self.recipients)
        sender = _safe(self.sender)
        ctx = Context(frontend="milter", listener=self.server.name,
                      direction=policy.direction_for("auto", client_addr, authenticated),
                      sender=sender, recipients=recipients, client_addr=client_addr,
                      authenticated=authenticated, size=spool.size)
        envelope = Envelope(sender=sender, recipients=recipients, client_addr=client_addr,
                            helo=_safe(self.helo), listener=self.server.name)
        ids = self._ids()
        try:
            # "mta": the MTA's hold queue is the quarantine, so our store keeps no copy —
            # but only when the MTA granted SMFIF_QUARANTINE, else nothing would hold it
            mta_holds = (self.server.quarantine_mode == "mta"
                         and bool(self.codec.actions & m.SMFIF_QUARANTINE))
            outcome = await self.gateway.process(spool, ctx, envelope, ids=ids,
                                                 store_quarantine=not mta_holds)
            view = MessageView(self.headers, self.head_len,
                               bool(self.codec.protocol & m.SMFIP_HDR_LEADSPC))
            replies, hold = responses_for(outcome, view, spool, actions=self.codec.actions,
                                          quarantine_mode=self.server.quarantine_mode)
            return replies, hold, outcome
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never acknowledge what we could not check
            self._event("error", "error", f"processing failed: {exc!r}", ids=ids)
            return [m.ReplyCode("451 4.3.0 Temporary failure in content scanning")], False, None

    def _ids(self) -> dict[str, str]:
        return {k: v for k, v in (("queue_id", self.macro("i")),
                                  ("mta", self.macro("j"))) if v}

    def _event(self, level: str, kind: str, message: str, **extra: Any) -> None:
        peer = ""
        if self.transport is not None:
            peer = str(self.transport.get_extra_info("peername") or "")
        event = {"event": kind, "frontend": "milter", "listener": self.server.name,
                 "peer": peer, "error": message, **extra}
        if self.gateway.log is not None:
            self.gateway.log.log(event, level=level)
        else:
            log.log(logging.WARNING if level == "warning" else logging.ERROR, "%s", event)


_CONTINUE = m.encode(m.Continue())


class MilterListener:
    """One listening socket; ``describe()`` and ``aclose()`` for ``avgate serve``."""

    def __init__(self, gateway: Gateway, listen: str, *, timeout: float = DEFAULT_TIMEOUT,
                 spool_memory: int | None = None, quarantine_mode: str = DEFAULT_QUARANTINE,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_packet: int = m.DEFAULT_MAX_PACKET, name: str = "milter",
                 drain_timeout: float = 30.0,
                 packet_timeout: float = DEFAULT_PACKET_TIMEOUT,
                 queue_timeout: float = DEFAULT_QUEUE_TIMEOUT,
                 max_headers: int = DEFAULT_MAX_HEADERS,
                 max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
                 max_recipients: int = DEFAULT_MAX_RECIPIENTS) -> None:
        self.gateway = gateway
        self.listen = listen
        self.kind, self.host, self.port = parse_listen(listen)
        self.timeout = timeout
        # follow a reload (see quarantine_mode, spool_memory); the values given here belong
        # to the config in use now
        self._spool_memory = spool_memory
        self._quarantine_mode = quarantine_mode
        self._config: Any = getattr(gateway, "config", None)
        self.max_connections = max_connections
        self.max_packet = max_packet
        self.packet_timeout = packet_timeout
        self.queue_timeout = queue_timeout
        self.max_headers = max_headers
        self.max_header_size = max_header_size
        self.max_recipients = max_recipients
        self.name = name
        self.drain_timeout = drain_timeout
        self.tasks: set[asyncio.Task[None]] = set()
        self.sessions: set[MilterSession] = set()
        self._active = 0
        # waiting for a slot, oldest first (a dict: O(1) removal when one gives up)
        self._queue: dict[MilterSession, None] = {}
        self._server: asyncio.AbstractServer | None = None

    def _follow_config(self) -> None:
        """Take ``[milter] quarantine``/``spool_memory`` from a reloaded config."""
        cfg = getattr(self.gateway, "config", None)
        if cfg is None or cfg is self._config:
            return
        self._config = cfg
        table = cfg.milter or {}
        self._quarantine_mode = str(table.get("quarantine", DEFAULT_QUARANTINE))
        self._spool_memory = table.get("spool_memory")

    @property
    def quarantine_mode(self) -> str:
        """``[milter] quarantine`` of the current config."""
        self._follow_config()
        return self._quarantine_mode

    @property
    def spool_memory(self) -> int | None:
        """``[milter] spool_memory`` of the current config (None: ``[scan]``'s)."""
        self._follow_config()
        return self._spool_memory

    def new_spool(self) -> Spool:
        scanner = self.gateway.scanner
        limit = self.spool_memory if self.spool_memory is not None else scanner.spool_memory
        return Spool(memory_limit=limit, directory=scanner.spool_dir)

    async def start(self) -> MilterListener:
        from ..serve import reuse_port

        loop = asyncio.get_running_loop()
        if self.kind == "unix":
            assert self.host is not None
            path = self.host
            # like clamav-milter's FixStaleSocket: a socket file left by a dead process
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    probe = socket.socket(socket.AF_UNIX)
                    try:
                        probe.connect(path)
                    except OSError:
                        os.unlink(path)
                    else:
                        raise OSError(f"milter socket {path} is in use by another process")
                    finally:
                        probe.close()
            self._server = await loop.create_unix_server(lambda: MilterSession(self), path,
                                                         backlog=256)
            # the MTA usually runs as another user (postfix): let it connect
            os.chmod(path, 0o666)  # noqa: S103
        else:
            cfg = getattr(self.gateway, "config", None)
            shared = cfg is not None and reuse_port(cfg)  # `serve` workers share the port
            self._server = await loop.create_server(lambda: MilterSession(self), self.host,
                                                    self.port, backlog=256, reuse_address=True,
                                                    reuse_port=shared)
            if self.port == 0:
                self.port = self._server.sockets[0].getsockname()[1]
        return self

    def describe(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.host}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"inet:{host}:{self.port}"

    # connection slots ----------------------------------------------------------------------
    def admit(self, session: MilterSession) -> bool | None:
        """True: served now; False: waits for a slot (at most ``queue_timeout``); None:
        refused (``max_connections`` served and as many waiting)."""
        if self._active < self.max_connections:
            self._active += 1
        elif len(self._queue) < self.max_connections:
            self._queue[session] = None
        else:
            return None
        self.sessions.add(session)
        return session not in self._queue

    def release(self, session: MilterSession) -> None:
        if session not in self.sessions:
            return  # refused at once: it held no slot
        self.sessions.discard(session)
        if session in self._queue:
            del self._queue[session]
            return
        self._active -= 1
        while self._queue and self._active < self.max_connections:
            nxt = next(iter(self._queue))
            del self._queue[nxt]
            self._active += 1
            nxt.resume()

    async def aclose(self) -> None:
        """Stop accepting, let messages being scanned finish, close the connections."""
        if self._server is not None:
            self._server.close()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=self.drain_timeout)
        for session in list(self.sessions):
            session.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        if self.kind == "unix" and self.host:
            with contextlib.suppress(OSError):
                os.unlink(self.host)


async def start(gateway: Gateway) -> list[MilterListener]:
    """Start the ``[milter]`` listener(s) of ``gateway.config``."""
    from ..serve import serves_unix_sockets

    table: dict[str, Any] = dict(gateway.config.milter or {})
    listens = table.get("listen", DEFAULT_LISTEN)
    if isinstance(listens, str):
        listens = [listens]
    if not serves_unix_sockets():  # another `serve` worker owns the unix sockets
        listens = [x for x in listens if parse_listen(x)[0] != "unix"]
    drain = float((gateway.config.serve or {}).get("drain_timeout", 30.0))
    listeners: list[MilterListener] = []
    for listen in listens:
        listener = MilterListener(
            gateway, listen,
            timeout=float(table.get("timeout", DEFAULT_TIMEOUT)),
            spool_memory=table.get("spool_memory"),
            quarantine_mode=table.get("quarantine", DEFAULT_QUARANTINE),
            max_connections=int(table.get("max_connections", DEFAULT_MAX_CONNECTIONS)),
            max_packet=int(table.get("max_packet", m.DEFAULT_MAX_PACKET)),
            drain_timeout=drain,
            packet_timeout=float(table.get("packet_timeout", DEFAULT_PACKET_TIMEOUT)),
            queue_timeout=float(table.get("queue_timeout", DEFAULT_QUEUE_TIMEOUT)),
            max_headers=int(table.get("max_headers", DEFAULT_MAX_HEADERS)),
            max_header_size=int(table.get("max_header_size", DEFAULT_MAX_HEADER_SIZE)),
            max_recipients=int(table.get("max_recipients", DEFAULT_MAX_RECIPIENTS)),
        )
        try:
            listeners.append(await listener.start())
        except BaseException:
            for started in listeners:
                await started.aclose()
            raise
    return listeners
