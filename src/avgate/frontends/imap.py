r"""IMAP proxy: mail clients read (FETCH) and upload (APPEND) through avgate, scanned.

Settings: :class:`ImapProxySettings` (``[imap_proxy]``); runs only when the section is
present. Framing (lines and literals) is :mod:`avgate.protocols.imap`; this module relays
both directions at once (IMAP servers speak unasked: untagged updates, IDLE), with one task
per direction and a lock that keeps every response whole on the client's connection.

Downloads
    A FETCH literal of a whole message (``BODY[]``, the answer to ``BODY.PEEK[]``,
    ``RFC822``, ``BINARY[]``) is spooled (memory, then a file), scanned
    (``Context(frontend="imap_proxy")``) and then sent on unchanged, or, when the policy
    rejects or discards it, replaced by a notice message (the literal's size recalculated);
    a scanner failure (tempfail) ends the session with ``* BYE [UNAVAILABLE]`` before the
    message is sent (IMAP clients cache bodies: a temporary notice would stay forever).
    A part or partial fetch (``BODY[2]``, ``BODY[]<0>``, ``BODY[TEXT]``) is scanned as the
    bytes the client gets (base64 decoded first when it is base64): infected → replaced by
    a short notice (base64 when the part was); clean → *unknown* for the policy (the whole
    message never passed; the default policy lets it through and the scan log says
    unknown, a rule with ``status = "unknown"`` can refuse it). Header sections pass
    unscanned. Accepted messages are never changed (IMAP clients check sizes). A message
    over ``max_message_size`` is replaced by a short note (never passed unscanned).
Uploads
    ``APPEND`` (and MULTIAPPEND): every message literal is spooled and scanned before
    anything is sent to the server; infected → ``tag NO [avgate] Virus found: NAME (RefID
    ...)``, scanner failure → ``tag NO [UNAVAILABLE] ...``; nothing reaches the server.
Literals
    The proxy answers the client's synchronizing literals itself (``+ Ready``), and sends
    literals on with LITERAL+ when the server offers it, else waiting for the server's ``+``.
    Sizes over ``max_message_size`` (APPEND) or ``max_literal`` (other commands) are refused.
TLS
    ``STARTTLS`` towards the client with ``tls_cert``/``tls_key`` (data sent after it before
    the handshake closes the connection); towards the server when it offers STARTTLS
    (``server_tls``). Capability lists are filtered: COMPRESS, CATENATE, URLAUTH and the
    server's STARTTLS/LOGINDISABLED are removed; STARTTLS is added when we offer it.
Credentials (LOGIN, AUTHENTICATE) pass through and are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging
import re
import ssl
from dataclasses import dataclass
from typing import Literal as TypingLiteral

from pydantic import Field, field_validator, model_validator

from ..decision import Decision, Disposition
from ..errors import SpoolError
from ..gateway import Gateway, Outcome
from ..policy import Context
from ..protocols import imap as proto
from ..result import ScanResult, ScanStatus
from ..settings import Listen, Section, Size
from ..spool import Spool
from .listen import ListenOptions
from .pop3 import (
    ProxyListener,
    build_notice,
    check_server_address,
    close_writers,
    header_block,
    reply_text,
    stream_buffered,
)

__all__ = ["ImapProxy", "ImapProxySettings", "start"]

log = logging.getLogger("avgate.imap")
FRONTEND = "imap_proxy"
_RECV = 256 * 1024
_B64 = re.compile(rb"[A-Za-z0-9+/=\r\n]+")


class ImapProxySettings(Section):
    """``[imap_proxy]``: the IMAP proxy.

    - ``listen`` (default ``127.0.0.1:10143``), ``server`` (``host:port``, required)
    - ``tls_cert``/``tls_key`` (STARTTLS to clients; ``tls = "implicit"``: IMAPS, TLS from
      the first byte), ``server_tls`` (``auto`` | ``require`` | ``off`` | ``implicit``),
      ``server_ca_file``, ``server_verify`` — as for the POP3 proxy
    - ``notice_from``: sender of the notice that replaces an infected message
    - ``max_message_size``: largest message scanned on FETCH/APPEND (default 100 MiB; an
      APPEND over it is refused, a FETCH over it is replaced by a notice)
    - ``max_literal``: largest literal of any other command (default 1 MiB)
    - ``max_line_length`` (default 64 KiB), ``max_connections`` (256), ``idle_timeout``
      (client, default 1800 s: RFC 9051's 30 minutes), ``server_timeout`` (120 s)
    """

    listen: Listen = Field(default="127.0.0.1:10143", validate_default=True)
    server: str
    tls_cert: str | None = None
    tls_key: str | None = None
    tls: TypingLiteral["starttls", "implicit"] = "starttls"
    server_tls: TypingLiteral["auto", "require", "off", "implicit"] = "auto"
    server_ca_file: str | None = None
    server_verify: bool = True
    notice_from: str = "postmaster@localhost"
    max_message_size: Size = 100 * 1024 * 1024
    max_literal: Size = 1024 * 1024
    max_line_length: int = Field(proto.DEFAULT_MAX_LINE, ge=1024)
    max_connections: int = Field(256, gt=0)
    idle_timeout: float = Field(1800.0, gt=0)
    server_timeout: float = Field(120.0, gt=0)

    @field_validator("server", mode="before")
    @classmethod
    def _server_is_host_port(cls, value: object) -> object:
        return check_server_address(value)

    @model_validator(mode="after")
    def _tls_pair(self) -> ImapProxySettings:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls == "implicit" and not self.tls_cert:
            raise ValueError("tls = \"implicit\" needs tls_cert and tls_key")
        return self

    @property
    def server_address(self) -> tuple[str, int]:
        from ..smtpclient import parse_next_hop

        return parse_next_hop(self.server, None)


class SessionEnd(Exception):
    """End the session."""


@dataclass
class _Verdict:
    """A scanned object: the gateway's outcome, and the result and decision that apply
    (a part's clean result is unknown here, see :meth:`ImapSession.process`)."""

    gateway: Gateway
    outcome: Outcome
    result: ScanResult
    decision: Decision

    def log(self, actions: tuple[str, ...] | None = None, **protocol: str) -> None:
        """The scan-log line, with what the client got (``imap=``)."""
        extra: dict[str, str] = {}
        if self.result is not self.outcome.result:
            extra = {"status": self.result.status.value, "reason": self.result.reason,
                     "rule": self.decision.rule}
        done = actions or self.decision.actions
        if self.outcome.quarantine_id and "quarantine" not in done:
            done = (*done, "quarantine")
        self.gateway.log_outcome(self.outcome, actions=done, **extra, **protocol)


@dataclass
class _Part:
    """One segment of a client command, with its literal (bytes or a spool)."""

    text: bytes
    literal: proto.Literal | None = None
    data: bytes = b""
    spool: Spool | None = None


class ImapSession:
    """One client connection and its connection to the real server."""

    def __init__(self, proxy: ImapProxy, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.settings = s = proxy.settings
        self.reader, self.writer = reader, writer
        self.client = proto.Reader(s.max_line_length, max(s.max_message_size, s.max_literal))
        self.upstream = proto.Reader(s.max_line_length, max(s.max_message_size, 1 << 31))
        self.server_reader: asyncio.StreamReader | None = None
        self.server_writer: asyncio.StreamWriter | None = None
        self.client_tls = writer.get_extra_info("ssl_object") is not None  # implicit TLS
        self.literal_plus = False
        self.out = asyncio.Lock()  # one writer at a time on the client connection
        self.waiter: tuple[bytes, asyncio.Future[bool]] | None = None
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")
        self.busy = False

    # -- plumbing --------------------------------------------------------------------------
    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        async with asyncio.timeout(self.settings.idle_timeout):
            await self.writer.drain()

    async def say(self, data: bytes) -> None:
        async with self.out:
            await self.send(data)

    async def to_server(self, data: bytes) -> None:
        assert self.server_writer is not None
        self.server_writer.write(data)
        async with asyncio.timeout(self.settings.server_timeout):
            await self.server_writer.drain()

    async def client_event(self) -> proto.Event:
        while True:
            try:
                event = self.client.next_event()
            except proto.ImapProtocolError as exc:
                await self.say(f"* BYE {exc.reply_hint}\r\n".encode())
                raise SessionEnd from exc
            if event is not proto.NEED_DATA:
                if isinstance(event, proto.ConnectionClosed):
                    raise SessionEnd("client closed")
                return event
            async with asyncio.timeout(self.settings.idle_timeout):
                data = await self.reader.read(_RECV)
            self.client.receive_data(data)

    async def server_event(self, limit: float | None = None) -> proto.Event:
        """The next event from the server, waiting at most ``limit`` seconds for bytes."""
        assert self.server_reader is not None
        while True:
            try:
                event = self.upstream.next_event()
            except proto.ImapProtocolError as exc:
                log.warning("imap proxy: %s: server %s: %s", self.peer, self.settings.server,
                            exc)
                raise SessionEnd from exc
            if event is not proto.NEED_DATA:
                if isinstance(event, proto.ConnectionClosed):
                    raise SessionEnd("server closed")
                return event
            async with asyncio.timeout(limit):
                data = await self.server_reader.read(_RECV)
            self.upstream.receive_data(data)

    async def server_line(self) -> bytes:
        """A whole line without literals (greeting, our own commands' answers)."""
        event = await self.server_event(self.settings.server_timeout)
        if not isinstance(event, proto.Segment) or event.literal is not None:
            raise SessionEnd("unexpected literal from the server")
        return event.text

    # -- the session -----------------------------------------------------------------------
    async def run(self) -> None:
        try:
            try:
                greeting = await self.connect()
            except (SessionEnd, ConnectionError, TimeoutError, ssl.SSLError, OSError) as exc:
                log.warning("imap proxy: %s: server %s: %s", self.peer, self.settings.server,
                            exc or type(exc).__name__)
                await self.say(b"* BYE [UNAVAILABLE] Mail server unavailable, try again "
                               b"later\r\n")
                return
            await self.say(greeting)
            if not greeting.upper().startswith((b"* OK", b"* PREAUTH")):
                return
            tasks = [asyncio.ensure_future(self.client_pump()),
                     asyncio.ensure_future(self.server_pump())]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        except (SessionEnd, ConnectionError, TimeoutError, ssl.SSLError, OSError):
            return
        finally:
            await self.close()

    def hang_up(self) -> None:
        """Close both connections now (the listener is shutting down)."""
        for writer in (self.writer, self.server_writer):
            if writer is not None:
                writer.close()

    async def close(self) -> None:
        await close_writers(self.writer, self.server_writer)

    async def connect(self) -> bytes:
        host, port = self.settings.server_address
        async with asyncio.timeout(self.settings.server_timeout):
            implicit = self.settings.server_tls == "implicit"
            self.server_reader, self.server_writer = await asyncio.open_connection(
                host, port, ssl=self.proxy.server_tls if implicit else None,
                server_hostname=host if implicit else None)
        greeting = await self.server_line()
        caps = await self.capabilities(greeting)
        if "STARTTLS" in caps and self.settings.server_tls in ("auto", "require"):
            await self.to_server(b"avgate1 STARTTLS\r\n")
            while not (line := await self.server_line()).startswith(b"avgate1 "):
                pass
            if not line.upper().startswith(b"AVGATE1 OK"):
                raise SessionEnd("server refused STARTTLS")
            if self.upstream.buffered or stream_buffered(self.server_reader):
                raise SessionEnd("server sent data after STARTTLS (response injection)")
            assert self.server_writer is not None
            async with asyncio.timeout(self.settings.server_timeout):
                await self.server_writer.start_tls(self.proxy.server_tls,
                                                   server_hostname=host)
            caps = await self.capabilities(b"")
        elif self.settings.server_tls == "require":
            raise SessionEnd("server without STARTTLS")
        self.literal_plus = "LITERAL+" in caps
        # the greeting's capability list was the server's: the client asks us again
        return re.sub(rb" ?\[CAPABILITY [^\]]*\]", b"", greeting)

    async def capabilities(self, greeting: bytes) -> set[str]:
        m = re.search(rb"\[CAPABILITY ([^\]]*)\]", greeting, re.IGNORECASE)
        if m:
            return {c.decode("latin-1").upper() for c in m.group(1).split()}
        await self.to_server(b"avgate0 CAPABILITY\r\n")
        caps: set[str] = set()
        while True:
            line = await self.server_line()
            if line.upper().startswith(b"* CAPABILITY "):
                caps = {c.decode("latin-1").upper() for c in line.split()[2:]}
            if line.startswith(b"avgate0 "):
                return caps

    # -- server → client -----------------------------------------------------------------
    async def server_pump(self) -> None:
        while True:
            event = await self.server_event()
            assert isinstance(event, proto.Segment)
            if event.first and event.text.startswith(b"+") and self.waiter is not None:
                _tag, fut = self.waiter
                if not fut.done():
                    fut.set_result(True)
                continue
            if event.first and self.waiter is not None:
                tag, fut = self.waiter
                if event.text.startswith(tag + b" ") and not fut.done():
                    fut.set_result(False)  # refused before the literal
            async with self.out:
                await self.relay_response(event)

    async def relay_response(self, event: proto.Segment) -> None:
        """One logical response line (and its literals) to the client."""
        fetch = re.match(rb"\* \d+ FETCH ", event.text, re.IGNORECASE) is not None
        starttls = self.proxy.client_tls is not None and not self.client_tls
        while True:
            if event.literal is None:
                await self.send(proto.rewrite_capabilities(event.text, starttls=starttls))
                return
            section = proto.body_section(event.text) if fetch else None
            if section is not None and not section[1].startswith(("HEADER", "MIME")) \
                    and event.literal.size:
                await self.scanned_literal(event.text, event.literal, section)
            else:
                await self.send(event.text + proto.literal_header(event.literal))
                while not isinstance(ev := await self.server_event(
                        self.settings.server_timeout), proto.LiteralEnd):
                    assert isinstance(ev, proto.LiteralData)
                    await self.send(ev.data)
            nxt = await self.server_event(self.settings.server_timeout)
            assert isinstance(nxt, proto.Segment)
            event = nxt

    async def scanned_literal(self, text: bytes, literal: proto.Literal,
                              section: tuple[str, str, bool]) -> None:
        whole = section[1] == "" and not section[2]
        s = self.settings
        spool = self.proxy.gateway.new_spool()
        try:
            over = literal.size > s.max_message_size
            while not isinstance(ev := await self.server_event(s.server_timeout),
                                 proto.LiteralEnd):
                assert isinstance(ev, proto.LiteralData)
                if not over:
                    spool.write(ev.data)
            if over:
                note = (b"This message is larger than avgate's IMAP proxy scans "
                        b"(max_message_size) and was not shown.\r\n")
                await self.send(text + proto.literal_header(literal, len(note)) + note)
                return
            spool.finish()
            scan = spool if whole else await asyncio.to_thread(_decoded, spool)
            what = "" if whole else f"{section[0]}[{section[1]}]{'<...>' if section[2] else ''}"
            try:
                verdict = await self.process(scan, what)
            finally:
                if scan is not spool:
                    scan.close()
            d = verdict.decision
            if d.disposition is Disposition.TEMPFAIL:
                verdict.log(imap="BYE")
                await self.send(f"* BYE [UNAVAILABLE] {reply_text(d)}\r\n".encode())
                raise SessionEnd("scanner unavailable")
            if d.disposition in (Disposition.REJECT, Disposition.DISCARD):
                notice = await asyncio.to_thread(self._notice, spool, verdict, whole)
                verdict.log(actions=("replace",), imap="notice")
                await self.send(text + proto.literal_header(literal, len(notice)) + notice)
                return
            verdict.log(actions=("accept",), imap="passed")
            await self.send(text + proto.literal_header(literal))
            if spool.in_memory:
                await self.send(spool.getvalue())
            else:
                with spool.open() as f:
                    while chunk := f.read(_RECV):
                        await self.send(chunk)
        finally:
            spool.close()

    async def process(self, spool: Spool, part: str = "") -> _Verdict:
        """Scan and decide. ``part``: the FETCH item when only a part or a range of the
        message passes (``BODY[2]``): a clean part is *unknown* for the policy (the whole
        message was never seen), so a rule can refuse what was not fully scanned."""
        gateway = self.proxy.gateway
        ctx = Context(FRONTEND, listener=FRONTEND, client_addr=self.peer, size=spool.size)
        outcome = await gateway.process(spool, ctx, defer_log=True)
        if not part or outcome.result.status is not ScanStatus.CLEAN:
            return _Verdict(gateway, outcome, outcome.result, outcome.decision)
        result = dataclasses.replace(outcome.result, status=ScanStatus.UNKNOWN,
                                     reason=f"partial fetch {part}: the whole message "
                                            "was not seen")
        decision = gateway.policy.decide(result, ctx, refid=outcome.refid)
        return _Verdict(gateway, outcome, result, decision)

    def _notice(self, spool: Spool, verdict: _Verdict, whole: bool) -> bytes:
        if whole:
            return build_notice(header_block(spool), verdict.result, verdict.decision,
                                sender=self.settings.notice_from, proxy="IMAP proxy")
        result = verdict.result
        why = (f"contained a virus ({', '.join(result.virus_names)})" if result.infected
               else f"could not be scanned ({result.reason or result.status.value})")
        text = (f"This part {why} and was removed by avgate "
                f"(RefID {verdict.decision.refid}).\r\n").encode()
        with spool.open() as f:
            head = f.read(4096)
        if head and _B64.fullmatch(head):  # the client decodes it: give it base64 too
            return base64.encodebytes(text).replace(b"\n", b"\r\n")
        return text

    # -- client → server -----------------------------------------------------------------
    async def client_pump(self) -> None:
        while True:
            first = await self.client_event()
            assert isinstance(first, proto.Segment)
            tag, command = proto.parse_tag(first.text)
            self.busy = True
            try:
                if command == b"STARTTLS" and first.literal is None:
                    await self.client_starttls(tag)
                    continue
                if first.literal is None:
                    if proto.clean_text(first):  # the common case: one line, no literal
                        await self.to_server(first.text)
                    else:
                        await self.say(tag + b" BAD Invalid characters in command\r\n")
                    continue
                parts = await self.read_command(first, command == b"APPEND")
                try:
                    if not all(proto.clean_text(proto.Segment(p.text, p.literal))
                               for p in parts):
                        await self.say(tag + b" BAD Invalid characters in command\r\n")
                        continue
                    if command == b"APPEND" and not await self.append_allowed(tag, parts):
                        continue
                    await self.forward(tag, parts)
                finally:
                    for part in parts:
                        if part.spool is not None:
                            part.spool.close()
            finally:
                self.busy = False

    async def read_command(self, first: proto.Segment, append: bool) -> list[_Part]:
        """The rest of a command with literals; the client's literals answered by us."""
        parts: list[_Part] = []
        event: proto.Segment = first
        s = self.settings
        while True:
            part = _Part(event.text, event.literal)
            parts.append(part)
            if event.literal is None:
                return parts
            message = append and not (len(parts) == 1 and event.text.rstrip().upper()
                                      .endswith(b"APPEND"))
            limit = s.max_message_size if message else s.max_literal
            if event.literal.size > limit:
                tag = proto.parse_tag(first.text)[0]
                await self.say(tag + b" NO [TOOBIG] Literal too large for the proxy\r\n")
                raise SessionEnd("literal over the limit")  # its bytes may follow: hang up
            if event.literal.sync:
                await self.say(b"+ Ready for literal data\r\n")
            chunks: list[bytes] = []
            if message:
                part.spool = self.proxy.gateway.new_spool()
            while not isinstance(ev := await self.client_event(), proto.LiteralEnd):
                assert isinstance(ev, proto.LiteralData)
                if part.spool is not None:
                    part.spool.write(ev.data)
                else:
                    chunks.append(ev.data)
            if part.spool is not None:
                part.spool.finish()
            part.data = b"".join(chunks)
            nxt = await self.client_event()
            assert isinstance(nxt, proto.Segment)
            event = nxt

    async def append_allowed(self, tag: bytes, parts: list[_Part]) -> bool:
        for part in parts:
            if part.spool is None:
                continue
            verdict = await self.process(part.spool)
            d = verdict.decision
            if d.disposition is Disposition.TEMPFAIL:
                verdict.log(imap="NO temporary")
                await self.say(tag + f" NO [UNAVAILABLE] {reply_text(d)}\r\n".encode())
                return False
            if d.disposition in (Disposition.REJECT, Disposition.DISCARD):
                verdict.log(imap="NO")
                await self.say(tag + f" NO [avgate] {reply_text(d)}\r\n".encode())
                return False
            verdict.log(actions=("accept",), imap="APPEND")
        return True

    async def forward(self, tag: bytes, parts: list[_Part]) -> None:
        for part in parts:
            if part.literal is None:
                await self.to_server(part.text)
                return
            size = part.spool.size if part.spool is not None else len(part.data)
            if self.literal_plus:
                await self.to_server(part.text + proto.literal_header(part.literal, size,
                                                                      sync=False))
            else:
                fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
                self.waiter = (tag, fut)
                try:
                    await self.to_server(part.text + proto.literal_header(part.literal, size,
                                                                          sync=True))
                    if not await asyncio.wait_for(fut, self.settings.server_timeout):
                        return  # the server refused the command; its answer went on
                finally:
                    self.waiter = None
            if part.spool is None:
                await self.to_server(part.data)
            elif part.spool.in_memory:
                await self.to_server(part.spool.getvalue())
            else:
                with part.spool.open() as f:
                    while chunk := f.read(_RECV):
                        await self.to_server(chunk)

    async def client_starttls(self, tag: bytes) -> None:
        ctx = self.proxy.client_tls
        if ctx is None or self.client_tls:
            await self.say(tag + b" BAD STARTTLS not available\r\n")
            return
        async with self.out:
            if self.client.buffered or stream_buffered(self.reader):
                await self.send(tag + b" BAD Data after STARTTLS\r\n")
                raise SessionEnd("command injection after STARTTLS")
            await self.send(tag + b" OK Begin TLS negotiation now\r\n")
            if self.client.buffered or stream_buffered(self.reader):
                raise SessionEnd("command injection after STARTTLS")
            async with asyncio.timeout(self.settings.idle_timeout):
                await self.writer.start_tls(ctx)
            self.client_tls = True


def _decoded(spool: Spool) -> Spool:
    """A part as the client will store it: base64 decoded when it is base64, else as is."""
    data = spool.getvalue()
    if data and _B64.fullmatch(data[:1 << 20]):
        try:
            return Spool.from_bytes(base64.b64decode(data))
        except (binascii.Error, ValueError, SpoolError):
            pass
    return Spool.from_bytes(data)


# -- the listener -----------------------------------------------------------------------------
class ImapProxy(ProxyListener):
    """``[imap_proxy]``'s listener (:class:`~.pop3.ProxyListener` does the rest)."""

    settings: ImapProxySettings
    what = "imap_proxy"
    label = "IMAP proxy"
    starttls = "STARTTLS"
    busy = b"* BYE [UNAVAILABLE] Too many connections\r\n"

    def new_session(self, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> ImapSession:
        return ImapSession(self, reader, writer)


async def start(gateway: Gateway, options: ListenOptions) -> list[ImapProxy]:
    """Open ``[imap_proxy] listen`` (serve's entry point)."""
    settings = gateway.config.imap_proxy
    if settings is None:
        return []
    proxy = ImapProxy(gateway, settings, options)
    await proxy.start()
    return [proxy]
