"""Milter front-end (Postfix ``smtpd_milters``, Sendmail ``INPUT_MAIL_FILTER``), protocol v6.

A thin asyncio adapter over :mod:`avgate.protocols.milter`: one :class:`MilterSession`
(an ``asyncio.Protocol``) per MTA connection feeds bytes to the codec and handles the
events synchronously, except end-of-message, which runs :meth:`Gateway.process` in a task
while reading is paused (the MTA waits for that answer anyway).

We negotiate to receive only what we use and to answer only where we must: connect, HELO,
MAIL, RCPT, header and body events get no reply (SMFIP_NR_*), DATA/EOH/unknown-command
events are not sent at all; only OPTNEG and end-of-message are answered. Headers and body
are rebuilt into a Spool (memory, then a temp file) as they arrive.

Applying a Decision (``[milter] quarantine``): see :mod:`avgate.frontends.milter_actions`.
The scan log line of a message is written after its responses are built, with the actions
they carry out (``Gateway.log_outcome``), followed by one audit line per modification
(header added/changed/removed, body replaced, recipient added/removed, held) and, per MTA
connection, ``milter-start``/``milter-end`` lines; each audit line has its level
(``milter_actions.AUDIT_LEVELS``), so ``[log] level`` chooses how much is written.

A malformed packet, a read timeout (``[milter] timeout``) or an internal error closes the
connection; the MTA then applies its ``milter_default_action``. The limits are listed in
:class:`MilterSettings`.

Reload and workers (``avgate serve``): the Gateway (scanner, policy, store, log) and
``[milter]`` (``gateway.config.milter``) are read per message, so a reload applies from the
next message on every connection (``max_packet`` from the next connection); ``listen``
needs a restart. With ``[serve] workers`` > 1 every worker binds a TCP ``listen`` with
SO_REUSEPORT; a ``unix:`` socket is opened by worker 0 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import Field

from ..errors import AvgateError, ProtocolError
from ..gateway import Context, Envelope, Outcome
from ..limits import MiB
from ..protocols import milter as m
from ..settings import Group, Listen, Mode, Section, Size
from ..spool import Spool
from .listen import DEFAULT_BACKLOG, Address, Listener, ListenOptions, bind, parse_listen
from .milter_actions import AUDIT_LEVELS, MessageView, audit_events, responses_for

if TYPE_CHECKING:
    from ..gateway import Gateway

log = logging.getLogger("avgate.milter")


class MilterSettings(Section):
    """``[milter]``: the milter listener (``avgate serve``).

    =========================  ============================================================
    ``listen``                 ``"127.0.0.1:7357"``; also ``inet:7357@127.0.0.1``
                               (libmilter), ``unix:/path`` and ``local:/path`` (Sendmail)
    ``unix_socket_mode``,      a unix socket's permissions (``"0660"``) and group (name or
    ``unix_socket_group``      gid; default: the process's): put the MTA's user in the group
    ``quarantine``             ``"both"`` | ``"mta"`` | ``"store"`` (see :mod:`.milter_actions`)
    ``spool_memory``           bytes of a message kept in memory (default: ``[scan]``'s)
    ``timeout``                330 s without a byte from the MTA between packets (longer
                               than Postfix's smtpd_timeout, 300 s: the MTA keeps the
                               connection for the whole SMTP session and is silent while
                               its client is)
    ``max_packet``             256 KiB: a longer packet closes the connection before a byte
                               of it is buffered (see :mod:`avgate.protocols.milter`)
    ``packet_timeout``         30 s from the first byte of a packet to its last, however
                               the bytes trickle in (Postfix writes a packet at once and
                               gives up after its own ``milter_command_timeout``, 30 s)
    ``max_headers``,           1000 headers, 1 MiB of header block (as rebuilt: name, ": ",
    ``max_header_size``,       value, CRLF) per message; more, or more than
    ``max_recipients``         ``max_recipients`` (10000) recipients: nothing more of the
                               message is kept and end-of-message is answered ``552 5.3.4``
                               / ``552 5.5.3`` (the sender's fault, like Exim's
                               ``header_maxsize`` and Sendmail's ``MaxHeadersLength``;
                               Postfix bounds one header and the message, not their count)
    ``max_connections``        512 connections served at once; as many more wait for a
                               slot, each at most ``queue_timeout`` (30 s: Postfix's
                               ``milter_command_timeout`` would have given up on its OPTNEG
                               reply by then); connections beyond both are closed at once
    =========================  ============================================================
    """

    listen: Listen = parse_listen("127.0.0.1:7357")
    unix_socket_mode: Mode = 0o660
    unix_socket_group: Group | None = None
    quarantine: Literal["both", "mta", "store"] = "both"
    spool_memory: Size | None = None
    timeout: float = Field(default=330.0, gt=0)
    max_packet: Size = m.DEFAULT_MAX_PACKET
    packet_timeout: float = Field(default=30.0, gt=0)
    max_connections: int = Field(default=512, gt=0)
    queue_timeout: float = Field(default=30.0, gt=0)
    max_headers: int = Field(default=1000, gt=0)
    max_header_size: Size = 1 * MiB
    max_recipients: int = Field(default=10000, gt=0)


REPLY_TOO_MANY_HEADERS = "552 5.3.4 Too many message header fields"
REPLY_HEADERS_TOO_BIG = "552 5.3.4 Message header size exceeds limit"
REPLY_TOO_MANY_RECIPIENTS = "552 5.5.3 Too many recipients"
#: Headers buffered in memory before they go to the spool in one write.
_HEAD_FLUSH = 256 * 1024

WANTED_ACTIONS = (m.SMFIF_ADDHDRS | m.SMFIF_CHGHDRS | m.SMFIF_CHGBODY | m.SMFIF_ADDRCPT
                  | m.SMFIF_DELRCPT | m.SMFIF_QUARANTINE)
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


def _macro_name(name: str) -> str:
    return name[1:-1] if len(name) > 2 and name[0] == "{" and name[-1] == "}" else name


def _safe(s: str) -> str:
    # surrogateescape'd bytes cannot go to SQLite/JSON as text: show them as U+FFFD
    return s.encode("utf-8", "replace").decode("utf-8") if not s.isascii() else s


# -- the asyncio side --------------------------------------------------------------------------
class MilterSession(asyncio.Protocol):
    """One MTA connection: several messages in a row (ABORT/end of message reset)."""

    def __init__(self, server: MilterListener) -> None:
        self.server = server
        self.gateway = server.gateway
        #: ``[milter]`` of the config in use, read again for every message
        self.s = server.settings
        self.codec = m.MilterServer(max_packet=self.s.max_packet)
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self._busy = False  # end of message being processed: events wait in the codec
        # reading paused because bytes came while busy (lazily: an MTA waits for the end of
        # message reply, so mostly nothing comes and the epoll re-arm per message is saved)
        self._held = False
        self._eof = False  # the MTA shut its side while busy: close once answered
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._waiting = False  # over max_connections: not reading yet
        self._queued_at = 0.0
        self._packet_start: float | None = None  # first byte of a packet not complete yet
        self._opened = self.loop.time()
        self._messages = 0  # messages answered on this connection (for milter-end)
        self._admitted = False
        # connection state
        self.macros: dict[bytes, dict[str, str]] = {}
        self.connect: m.Connect | None = None
        self.helo = ""
        self.spool: Spool | None = None
        self._reset_message()

    # message state -----------------------------------------------------------------------
    def _reset_message(self, keep_macros: bool = False) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        self.s = self.server.settings  # a reload applies from the next message
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
        # a stream transport (asyncio's or uvloop's, which does not subclass asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)
        self._last = self.loop.time()
        admitted = self.server.admit(self)
        if admitted is None:  # every slot taken and the queue full
            self._event("warning", "overload",
                        f"{self.s.max_connections} connections served and as many "
                        "waiting: connection closed")
            transport.close()
            return
        self._admitted = True
        self._audit("milter-start")
        if not admitted:
            self._waiting = True
            self._queued_at = self._last
            self.transport.pause_reading()
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
        elif not self._held and self.transport is not None:
            # scanning: this read is held in the codec, nothing more until the answer
            self._held = True
            self.transport.pause_reading()

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
        if self._busy:  # the answer still goes out, then the connection closes
            self._eof = True
            return True
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if (self._task is None or self._task.done()) and self.spool is not None:
            self.spool.close()  # (nothing else of the message matters any more)
            self.spool = None
        # else: a scan in progress finishes (and is logged); its reply is dropped and the
        # MTA, which gave up on us, applies its milter_default_action.
        if self._admitted:
            self._audit("milter-end", messages=self._messages,
                        seconds=round(self.loop.time() - self._opened, 3))
        self.server.release(self)

    def _deadline(self) -> float:
        """When this connection is closed unless something happens first."""
        s = self.s
        if self._busy:  # scanning: bounded by the scan timeout, not ours
            return self.loop.time() + s.timeout
        if self._waiting:
            return self._queued_at + s.queue_timeout
        deadline = self._last + s.timeout
        if self._packet_start is not None:
            deadline = min(deadline, self._packet_start + s.packet_timeout)
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
                   f"{self.s.max_connections} connection slots")
        elif self._packet_start is not None and (
                now - self._packet_start >= self.s.packet_timeout):
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
        next_event = codec.next_event
        glog = self.gateway.log
        trace = glog is not None and glog.debug_enabled
        try:
            while not self._busy and not self._closed:
                # Any: dispatched on its exact type below (the codec makes no subclasses),
                # which saves an isinstance call per test
                event: Any = next_event()
                if event is None:
                    break
                if trace:
                    self._trace(event)
                self._packet_start = None  # a whole packet: the next one has its own clock
                # most frequent first: one packet per header, one per 64 KiB of body
                kind = type(event)
                if kind is m.Header:
                    self._header(event)
                elif kind is m.Body:
                    self._body(event.chunk)
                elif kind is m.Macro:
                    self._macro(event)
                elif kind is m.EndOfMessage:
                    self._end_of_message(event, out)
                    continue  # answered (or being scanned: the loop stops while busy)
                elif kind is m.OptNeg:
                    out.append(m.encode(codec.negotiate(
                        event, actions=WANTED_ACTIONS, protocol=WANTED_PROTOCOL,
                        macros=WANTED_MACROS)))
                    continue
                elif kind is m.Mail:
                    self._reset_message(keep_macros=True)  # MAIL's macros came just before
                    self.sender = event.sender
                elif kind is m.Rcpt:
                    self._rcpt(event)
                elif kind is m.Connect:
                    self.connect = event
                elif kind is m.Helo:
                    self.helo = event.name
                elif kind is m.Abort:
                    self._reset_message()
                elif kind is m.Quit:
                    self._flush(out)
                    self.close()
                    return
                elif kind is m.QuitNewConnection:
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

    def _trace(self, event: object) -> None:
        """A debug line for one milter command: its name and sizes, never header values,
        body bytes or macro values (they may carry authentication names)."""
        fields: dict[str, Any] = {}
        if isinstance(event, m.Header):
            fields["header"] = event.name.decode("utf-8", "replace")[:100]
        elif isinstance(event, m.Body):
            fields["size"] = len(event.chunk)
        elif isinstance(event, m.Macro):
            fields["macros"] = len(event.macros)
        self._debug("milter_command", command=type(event).__name__, **fields)

    def _debug(self, kind: str, **fields: Any) -> None:
        glog = self.gateway.log
        if glog is not None and glog.debug_enabled:
            glog.debug({"event": kind, "frontend": "milter", "listener": self.server.name,
                        **fields})

    def _flush(self, out: list[bytes]) -> None:
        glog = self.gateway.log
        if out and glog is not None and glog.debug_enabled:
            # each packet: 4 bytes of length, then the response code letter
            self._debug("milter_reply", replies="".join(chr(p[4]) for p in out[:64]
                                                        if len(p) > 4))
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
        limit = self.s.max_recipients
        if len(self.recipients) >= limit:
            self._refuse(REPLY_TOO_MANY_RECIPIENTS,
                         f"more than max_recipients = {limit} recipients")
            return
        self.recipients.append(event.recipient)

    def _header(self, event: m.Header) -> None:
        if self.in_body:  # headers after the body started: not a message we understand
            raise ProtocolError("header after body", reply_hint="close")
        if self.refused:
            return
        s = self.s
        # as rebuilt in the spool: name, ": ", value, CRLF
        self.header_bytes += len(event.name) + len(event.value) + 4
        if len(self.headers) >= s.max_headers:
            self._refuse(REPLY_TOO_MANY_HEADERS,
                         f"more than max_headers = {s.max_headers} header fields")
        elif self.header_bytes > s.max_header_size:
            self._refuse(REPLY_HEADERS_TOO_BIG,
                         f"header block over max_header_size = {s.max_header_size} bytes")
        else:
            self.headers.append(event)

    def _start_body(self) -> Spool:
        """Write the rebuilt header block and the empty line, enter the body."""
        spool = self.spool
        if spool is None:
            spool = self.spool = self._new_spool()
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
        self._busy = True  # further bytes pause reading (data_received)
        self._flush(out)
        self._task = self.loop.create_task(self._process())
        self.server.tasks.add(self._task)
        self._task.add_done_callback(self.server.tasks.discard)

    async def _process(self) -> None:
        spool = self.spool
        assert spool is not None
        try:
            replies, _hold, _outcome = await self._decide(spool)
            self._messages += 1
            if self._closed:
                return
            assert self.transport is not None
            glog = self.gateway.log
            if glog is not None and glog.debug_enabled:
                self._debug("milter_reply", replies=[type(r).__name__ for r in replies[:64]])
            self.transport.write(m.encode_all(replies))
        finally:
            self._reset_message()
            self._busy = False
            if not self._closed and self.transport is not None:
                self._last = self.loop.time()
                if self._held:
                    self._held = False
                    self.transport.resume_reading()
                self._pump()
                if self._eof and not self._busy:  # (busy: a next message came before EOF)
                    self.close()
                self._check_partial()

    async def _decide(self, spool: Spool) -> tuple[list[m.Response], bool, Outcome | None]:
        client_addr = ""
        if self.connect is not None and self.connect.family in ("4", "6"):
            client_addr = self.connect.address
        client_addr = client_addr or self.macro("client_addr")
        authenticated = bool(self.macro("auth_authen"))
        envelope = Envelope(sender=_safe(self.sender),
                            recipients=tuple(_safe(r) for r in self.recipients),
                            client_addr=client_addr, helo=_safe(self.helo),
                            listener=self.server.name)
        direction = self.gateway.policy.direction_for("auto", client_addr, authenticated)
        ctx = Context("milter", envelope=envelope, direction=direction,
                      authenticated=authenticated, size=spool.size)
        ids = self._ids()
        outcome: Outcome | None = None
        gateway = self.gateway  # the one that scanned logs it, even across a reload
        try:
            # "mta": the MTA's hold queue is the quarantine, so our store keeps no copy —
            # but only when the MTA granted SMFIF_QUARANTINE, else nothing would hold it
            mta_holds = (self.s.quarantine == "mta"
                         and bool(self.codec.actions & m.SMFIF_QUARANTINE))
            outcome = await gateway.process(spool, ctx, ids=ids,
                                            store_quarantine=not mta_holds, defer_log=True)
            view = MessageView(self.headers, self.head_len,
                               bool(self.codec.protocol & m.SMFIP_HDR_LEADSPC))
            applied = responses_for(outcome, view, spool, actions=self.codec.actions,
                                    quarantine_mode=self.s.quarantine,
                                    own_headers=gateway.policy.own_header_names())
            # the scan log records what the responses do, then each modification
            gateway.log_outcome(outcome, actions=applied.actions, reply=applied.reply or None)
            glog = gateway.log
            debug = glog is not None and glog.debug_enabled
            for level, fields in audit_events(applied.responses, debug=debug):
                self._audit(fields.pop("action"), level=level, ids=ids,
                            refid=outcome.refid, **fields)
            return applied.responses, applied.hold, outcome
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never acknowledge what we could not check
            reply = "451 4.3.0 Temporary failure in content scanning"
            self._event("error", "error", f"processing failed: {exc!r}", ids=ids)
            if outcome is not None:
                gateway.log_outcome(outcome, actions=("tempfail",), reply=reply)
            return [m.ReplyCode(reply)], False, None

    def _new_spool(self) -> Spool:
        scanner = self.gateway.scanner
        memory = self.s.spool_memory
        return Spool(memory_limit=scanner.spool_memory if memory is None else memory,
                     directory=scanner.spool_dir)

    def _ids(self) -> dict[str, str]:
        return {k: v for k, v in (("queue_id", self.macro("i")),
                                  ("mta", self.macro("j"))) if v}

    def _audit(self, action: str, level: str | None = None, **fields: Any) -> None:
        """One audit line (``event: "audit"``) at its level (``AUDIT_LEVELS``)."""
        glog = self.gateway.log
        if glog is None:
            return
        level = level or AUDIT_LEVELS[action]
        if level == "debug" and not glog.debug_enabled:
            return  # milter-start/-end on every connection: not even built when not written
        peer = ""
        if self.transport is not None:
            peer = str(self.transport.get_extra_info("peername") or "")
        glog.log({"event": "audit", "level": level, "action": action, "frontend": "milter",
                  "listener": self.server.name, "peer": peer,
                  **{k: v for k, v in fields.items() if v not in (None, "", {})}},
                 level=level)

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

    name = "milter"

    def __init__(self, gateway: Gateway, settings: MilterSettings,
                 options: ListenOptions) -> None:
        self.gateway = gateway
        self._started_with = settings  # only while a reload has removed [milter]
        self.options = options
        self.address: Address = settings.listen.resolve(options.base_dir)
        self.tasks: set[asyncio.Task[None]] = set()
        self.sessions: set[MilterSession] = set()
        self._active = 0
        # waiting for a slot, oldest first (a dict: O(1) removal when one gives up)
        self._queue: dict[MilterSession, None] = {}
        self._server: asyncio.AbstractServer | None = None

    @property
    def settings(self) -> MilterSettings:
        """``[milter]`` of the config in use now."""
        return self.gateway.config.milter or self._started_with

    @property
    def port(self) -> int:
        return self.address.port

    async def start(self) -> MilterListener:
        s = self.settings
        sock = bind(self.address, what="milter listen", options=self.options,
                    mode=s.unix_socket_mode, group=s.unix_socket_group)
        if not self.address.is_unix and self.address.port == 0:  # tests: a free port
            self.address = dataclasses.replace(self.address, port=sock.getsockname()[1])
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: MilterSession(self), sock=sock,
                                                backlog=DEFAULT_BACKLOG)
        return self

    def describe(self) -> str:
        return str(self.address) if self.address.is_unix else f"inet:{self.address}"

    # connection slots ----------------------------------------------------------------------
    def admit(self, session: MilterSession) -> bool | None:
        """True: served now; False: waits for a slot (at most ``queue_timeout``); None:
        refused (``max_connections`` served and as many waiting)."""
        limit = self.settings.max_connections
        if self._active < limit:
            self._active += 1
        elif len(self._queue) < limit:
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
        limit = self.settings.max_connections
        while self._queue and self._active < limit:
            nxt = next(iter(self._queue))
            del self._queue[nxt]
            self._active += 1
            nxt.resume()

    async def aclose(self) -> None:
        """Stop accepting, let messages being scanned finish, close the connections."""
        if self._server is not None:
            self._server.close()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=self.options.drain_timeout)
        for session in list(self.sessions):
            session.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        if self.address.is_unix and self._server is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.address.path)


async def start(gateway: Gateway, options: ListenOptions) -> list[Listener]:
    """Start the ``[milter]`` listener of ``gateway.config`` (none in a serve worker that
    does not own the unix sockets)."""
    settings = gateway.config.milter or MilterSettings()
    if settings.listen.is_unix and not options.unix_sockets:
        return []
    return [await MilterListener(gateway, settings, options).start()]
