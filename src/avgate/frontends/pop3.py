r"""POP3 proxy: mail clients download through avgate, every message scanned on the way.

Settings: :class:`Pop3ProxySettings` (``[pop3_proxy]``). Runs only when the section is
present (it needs ``server``, the real POP3 server). The bytes ⇄ events work is
:mod:`avgate.protocols.pop3`; this module moves bytes between the two connections, one
command at a time, and calls ``gateway.process`` (``Context(frontend="pop3_proxy")``) for
every message a client downloads.

What happens to a command
    * ``RETR n`` and ``TOP n k`` with ``k > 0``: the server's body is dot-unstuffed into a
      spool (memory, then a temp file: bounded memory), scanned, and then the client gets
      the decision: accept → the message as received, byte for byte (re-stuffed; tagged only
      when a ``[[policy.rules]]`` rule with ``tag`` matched, or when the result is not
      clean, so undecided is never passed as if clean); reject/discard (the default for a
      virus) → a notice message in its place (same message number; ``From`` ``notice_from``,
      ``Subject: virus removed``, the virus name, the RefID and the original headers as
      text), or ``-ERR`` with ``infected = "error"``; tempfail (the default for a scanner
      error) → ``-ERR [SYS/TEMP] ...``: the message stays on the server and the client
      retries. ``TOP n 0`` (headers only) is passed unscanned. A message over
      ``max_message_size`` gets ``-ERR [SYS/PERM]`` (it stays on the server).
    * ``CAPA``: the server's list without what the proxy cannot frame (unknown extensions)
      and without the server's ``STLS``; ``STLS`` is added when the proxy has a certificate
      (``tls_cert``/``tls_key``) and the client is not on TLS yet.
    * ``STLS``: answered by the proxy (TLS towards the client with our certificate). Bytes
      the client sent after ``STLS`` before the handshake close the connection (the
      STARTTLS command-injection attack, CVE-2011-0411's class).
    * ``USER``/``PASS``/``APOP``/``AUTH`` (with the SASL exchange): passed through unchanged
      and never logged (:class:`~avgate.protocols.pop3.Command` hides their arguments).
      ``require_tls``: refused before ``STLS``.
    * Commands the codec cannot frame: ``-ERR`` from the proxy, the server never sees them.

Towards the server: after its greeting, ``CAPA``; when it offers ``STLS`` and
``server_tls`` is ``auto`` (default) or ``require``, TLS is started before the client's
first command (verified against ``server_ca_file`` or the system store unless
``server_verify = false``); ``require`` refuses a server without STLS; ``implicit`` speaks
TLS from the first byte (POP3S). ``tls = "implicit"`` does the same towards clients. The
greeting the client gets is the server's, unchanged (APOP needs its timestamp).

The server speaks only when asked: bytes from it beyond the answer to the command in
progress end the session (a response injected after ``STLS``, or one that would shift
every later answer by one).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import logging
import ssl
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.policy import SMTP, default
from pathlib import Path
from typing import Literal, Protocol

from pydantic import Field, field_validator, model_validator

from ..decision import Decision, Disposition
from ..errors import ConfigError, SpoolError
from ..gateway import Gateway, Outcome
from ..mailedit import HeaderFilter, add_headers, apply_decision, replace_targets
from ..policy import Context
from ..protocols import pop3 as proto
from ..result import ScanResult, ScanStatus
from ..settings import Listen, Section, Size
from ..spool import Spool
from .listen import Address, ListenOptions, bind

__all__ = ["Pop3Proxy", "Pop3ProxySettings", "ProxyListener", "build_notice",
           "check_server_address", "client_tls_context", "close_writers", "header_block",
           "reply_text", "server_tls_context", "start", "stream_buffered", "tags_to_add"]

log = logging.getLogger("avgate.pop3")

_RECV = 256 * 1024
_RELAY_CHUNK = 256 * 1024
_MAX_CAPA = 64 * 1024  # a CAPA body larger than this is not a capability list
_HEADER_PEEK = 64 * 1024  # the original headers quoted in a notice: at most this much
FRONTEND = "pop3_proxy"
#: commands that carry credentials: refused before STLS with ``require_tls``
LOGIN_VERBS = frozenset({"USER", "PASS", "APOP", "AUTH"})


def check_server_address(value: object) -> object:
    from ..smtpclient import parse_next_hop

    if not isinstance(value, str):
        raise ValueError(f'expected "host:port", got {value!r}')
    parse_next_hop(value, None)
    return value


class Pop3ProxySettings(Section):
    """``[pop3_proxy]``: the POP3 proxy.

    - ``listen`` (default ``127.0.0.1:10110``), ``server`` (the real server, ``host:port``;
      required)
    - ``tls_cert``/``tls_key``: offer STLS to clients with this certificate (both or neither;
      relative to the config file); ``require_tls``: refuse USER/PASS/APOP/AUTH before STLS;
      ``tls = "implicit"``: TLS from the first byte instead (POP3S, port 995)
    - ``server_tls``: ``auto`` (STLS when the server offers it; default) | ``require`` |
      ``off`` | ``implicit`` (the server speaks TLS from the first byte: POP3S);
      ``server_ca_file`` (default: the system's CAs), ``server_verify`` (default
      true; false accepts any certificate — a test server's)
    - ``infected``: ``notice`` (replace the message by a notice; default) | ``error``
      (answer ``-ERR``; the message stays on the server)
    - ``notice_from``: the notice's sender (default ``postmaster@localhost``)
    - ``max_message_size``: larger messages are refused with -ERR (default 100 MiB; the spool
      is on disk, this bounds it), ``max_line_length`` (commands and status lines, default
      4096), ``max_connections`` (default 256), ``idle_timeout`` (client, default 600 s:
      RFC 1939's ten minutes), ``server_timeout`` (connect and each server response,
      default 120 s)
    """

    listen: Listen = Field(default="127.0.0.1:10110", validate_default=True)
    server: str
    tls_cert: str | None = None
    tls_key: str | None = None
    require_tls: bool = False
    tls: Literal["starttls", "implicit"] = "starttls"
    server_tls: Literal["auto", "require", "off", "implicit"] = "auto"
    server_ca_file: str | None = None
    server_verify: bool = True
    infected: Literal["notice", "error"] = "notice"
    notice_from: str = "postmaster@localhost"
    max_message_size: Size = 100 * 1024 * 1024
    max_line_length: int = Field(proto.DEFAULT_MAX_LINE, ge=512)
    max_connections: int = Field(256, gt=0)
    idle_timeout: float = Field(600.0, gt=0)
    server_timeout: float = Field(120.0, gt=0)

    @field_validator("server", mode="before")
    @classmethod
    def _server_is_host_port(cls, value: object) -> object:
        return check_server_address(value)

    @model_validator(mode="after")
    def _tls_pair(self) -> Pop3ProxySettings:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if (self.require_tls or self.tls == "implicit") and not self.tls_cert:
            raise ValueError("require_tls and tls = \"implicit\" need tls_cert and tls_key")
        return self

    @property
    def server_address(self) -> tuple[str, int]:
        from ..smtpclient import parse_next_hop

        return parse_next_hop(self.server, None)


async def close_writers(*writers: asyncio.StreamWriter | None) -> None:
    """Close each connection; a TLS peer that never answers close_notify is not waited for
    long (then the transport is aborted)."""
    for writer in writers:
        if writer is not None:
            writer.close()
            try:
                async with asyncio.timeout(0.5):
                    await writer.wait_closed()
            except Exception:
                writer.transport.abort()


def client_tls_context(cert: str | None, key: str | None, base_dir: str,
                       what: str) -> ssl.SSLContext | None:
    """Our certificate towards clients (paths relative to ``base_dir``), or None."""
    if not cert or not key:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(Path(base_dir, cert), Path(base_dir, key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{what}: cannot load tls_cert/tls_key: {exc}") from exc
    return ctx


def server_tls_context(ca_file: str | None, verify: bool, base_dir: str,
                       what: str) -> ssl.SSLContext:
    """The context towards the real server."""
    try:
        ctx = ssl.create_default_context(
            cafile=str(Path(base_dir, ca_file)) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{what}: cannot load server_ca_file: {exc}") from exc
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- the notice message ------------------------------------------------------------------------
def header_block(spool: Spool) -> bytes:
    """The message's header block (at most ``_HEADER_PEEK`` bytes)."""
    with spool.open() as f:
        head = f.read(_HEADER_PEEK)
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = head.find(sep)
        if end >= 0:
            return head[:end + len(sep) // 2]
    return head


def build_notice(headers: bytes, result: ScanResult, decision: Decision, *,
                 sender: str, proxy: str) -> bytes:
    """A notice message (RFC 5322, CRLF) that takes an infected message's place: who and
    what, the virus names, the RefID, and the original header block as a text part
    (``text/rfc822-headers``, RFC 6522). Original ``To`` and ``Date`` are kept when they
    parse (the notice sorts where the message was)."""
    original = EmailMessage()
    with contextlib.suppress(Exception):  # unreadable headers: the notice goes without them
        parsed = BytesHeaderParser(policy=default).parsebytes(headers)
        if isinstance(parsed, EmailMessage):
            original = parsed
    msg = EmailMessage(policy=SMTP)
    msg["From"] = sender
    to = _safe_header(original, "To")
    if to:
        msg["To"] = to
    date = _safe_header(original, "Date")
    msg["Date"] = date if date and email.utils.parsedate_tz(date) else \
        email.utils.formatdate(localtime=True)
    msg["Subject"] = "virus removed"
    msg["Message-ID"] = email.utils.make_msgid("avgate")
    if decision.refid_header and decision.refid:
        msg[decision.refid_header] = decision.refid
    names = ", ".join(result.virus_names) or result.status.value
    subject = _safe_header(original, "Subject")
    lines = [
        textwrap.fill(f"A message in this mailbox contained a virus ({names}) and was "
                      f"removed by the avgate {proxy} on download. This notice is shown in "
                      "its place.", 72),
        "",
        f"Subject: {subject}" if subject else "",
        f"Reference (RefID): {decision.refid}",
        "",
        "The original message's headers are attached.",
    ]
    msg.set_content("\n".join(lines) + "\n")
    text = headers.decode("utf-8", "replace")
    msg.add_attachment(text, subtype="rfc822-headers", disposition="inline",
                       filename="original-headers.txt")
    return msg.as_bytes()


def _safe_header(msg: EmailMessage, name: str) -> str:
    try:
        value = msg.get(name)
        return " ".join(str(value).split()) if value is not None else ""
    except Exception:  # a broken header is left out, never fatal
        return ""


# -- sessions ------------------------------------------------------------------------------------
class SessionEnd(Exception):
    """End the session (the reason has been sent to the client, or cannot be)."""


@dataclass
class _Upstream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    codec: proto.ResponseReader
    tls: bool = False


class Pop3Session:
    """One client connection and its connection to the real server."""

    def __init__(self, proxy: Pop3Proxy, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.settings = proxy.settings
        self.reader = reader
        self.writer = writer
        self.client = proto.CommandReader(self.settings.max_line_length)
        self.client_tls = writer.get_extra_info("ssl_object") is not None  # implicit TLS
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")
        self.server: _Upstream | None = None
        self.busy = False

    # -- plumbing --------------------------------------------------------------------------
    async def send(self, data: bytes) -> None:
        """To the client; a client that does not read for ``idle_timeout`` is dropped."""
        self.writer.write(data)
        async with asyncio.timeout(self.settings.idle_timeout):
            await self.writer.drain()

    async def client_event(self) -> proto.ClientEvent:
        while True:
            try:
                event = self.client.next_event()
            except proto.Pop3ProtocolError as exc:
                await self.send(proto.status_line(False, str(exc.reply_hint)[5:]))
                raise SessionEnd from exc
            if event is not proto.NEED_DATA:
                return event
            async with asyncio.timeout(self.settings.idle_timeout):
                data = await self.reader.read(_RECV)
            self.client.receive_data(data)

    async def server_event(self) -> proto.ServerEvent:
        up = self._up
        while True:
            try:
                event = up.codec.next_event()
            except proto.Pop3ProtocolError as exc:
                log.warning("pop3 proxy: %s: server %s: %s", self.peer, self.settings.server,
                            exc)
                raise SessionEnd from exc
            if event is not proto.NEED_DATA:
                if isinstance(event, proto.ConnectionClosed):
                    raise SessionEnd("server closed the connection")
                return event
            async with asyncio.timeout(self.settings.server_timeout):
                data = await up.reader.read(_RECV)
            up.codec.receive_data(data)

    async def server_status(self) -> proto.StatusLine:
        event = await self.server_event()
        if not isinstance(event, proto.StatusLine):
            raise SessionEnd(f"unexpected {type(event).__name__} from the server")
        return event

    async def to_server(self, line: bytes, kind: proto.Kind) -> None:
        up = self._up
        if up.codec.buffered:  # POP3 servers speak only when asked
            raise SessionEnd("the server sent data nobody asked for")
        up.codec.expect(kind)
        up.writer.write(line)
        async with asyncio.timeout(self.settings.server_timeout):
            await up.writer.drain()

    @property
    def _up(self) -> _Upstream:
        assert self.server is not None
        return self.server

    # -- the session -----------------------------------------------------------------------
    async def run(self) -> None:
        try:
            try:
                greeting = await self.connect()
            except (ConnectionError, TimeoutError, ssl.SSLError, OSError) as exc:
                log.warning("pop3 proxy: %s: server %s: %s", self.peer, self.settings.server,
                            exc or type(exc).__name__)
                await self.send(proto.status_line(False, "[SYS/TEMP] Mail server "
                                                         "unavailable, try again later"))
                return
            await self.send(greeting.line)
            if not greeting.ok:
                return
            while True:
                event = await self.client_event()
                if isinstance(event, proto.ConnectionClosed):
                    return
                assert isinstance(event, proto.Command)  # not in SASL mode here
                self.busy = True
                try:
                    if not await self.command(event):
                        return
                finally:
                    self.busy = False
                if self.server is not None and self.server.codec.buffered:
                    raise SessionEnd("the server sent more than the response")
                if self.proxy.closing:
                    return
        except (SessionEnd, ConnectionError, TimeoutError, ssl.SSLError, OSError):
            return
        finally:
            await self.close()

    def _writers(self) -> tuple[asyncio.StreamWriter | None, ...]:
        return (self.writer, self.server.writer if self.server else None)

    def hang_up(self) -> None:
        """Close both connections now (the listener is shutting down)."""
        for writer in self._writers():
            if writer is not None:
                writer.close()

    async def close(self) -> None:
        await close_writers(*self._writers())

    async def connect(self) -> proto.StatusLine:
        host, port = self.settings.server_address
        try:
            async with asyncio.timeout(self.settings.server_timeout):
                implicit = self.settings.server_tls == "implicit"
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=self.proxy.server_tls if implicit else None,
                    server_hostname=host if implicit else None)
        except (OSError, TimeoutError) as exc:
            log.warning("pop3 proxy: cannot connect to %s: %s", self.settings.server, exc)
            await self.send(proto.status_line(False, "[SYS/TEMP] Mail server unavailable, "
                                                     "try again later"))
            raise SessionEnd from exc
        self.server = _Upstream(reader, writer, proto.ResponseReader(
            self.settings.max_line_length))
        greeting = await self.server_status()
        if greeting.ok and self.settings.server_tls in ("auto", "require"):
            await self.server_starttls()
        return greeting

    async def server_starttls(self) -> None:
        """CAPA, then STLS when the server offers it (``server_tls``)."""
        await self.to_server(proto.command_line("CAPA"), proto.Kind.MULTI)
        status = await self.server_status()
        caps: set[str] = set()
        if status.ok:
            caps = proto.capability_names((await self.read_body(_MAX_CAPA)).splitlines())
        if "STLS" not in caps:
            if self.settings.server_tls == "require":
                await self.send(proto.status_line(
                    False, "[SYS/PERM] The mail server does not offer STLS"))
                raise SessionEnd("server without STLS")
            return
        await self.to_server(proto.command_line("STLS"), proto.Kind.SINGLE)
        status = await self.server_status()
        if not status.ok:
            if self.settings.server_tls == "require":
                await self.send(proto.status_line(False, "[SYS/PERM] STLS refused by the "
                                                         "mail server"))
                raise SessionEnd("STLS refused")
            return
        up = self._up
        if up.codec.buffered or stream_buffered(up.reader):
            raise SessionEnd("server sent data after +OK to STLS (response injection)")
        async with asyncio.timeout(self.settings.server_timeout):
            await up.writer.start_tls(self.proxy.server_tls,
                                      server_hostname=self.settings.server_address[0])
        up.tls = True

    async def read_body(self, limit: int) -> bytes:
        """A multi-line body, whole (CAPA and the like: at most ``limit`` bytes)."""
        parts: list[bytes] = []
        size = 0
        while True:
            event = await self.server_event()
            if isinstance(event, proto.EndOfData):
                return b"".join(parts)
            if isinstance(event, proto.Data):
                size += len(event.data)
                if size > limit:
                    raise SessionEnd("multi-line response over its limit")
                parts.append(event.data)

    async def relay_body(self) -> None:
        """Stream a multi-line body to the client as it comes (LIST, UIDL, TOP n 0)."""
        stuffer = proto.DotStuffer()
        while True:
            event = await self.server_event()
            if isinstance(event, proto.EndOfData):
                await self.send(stuffer.finish())
                return
            if isinstance(event, proto.Data):
                await self.send(stuffer.feed(event.data))

    # -- commands --------------------------------------------------------------------------
    async def command(self, cmd: proto.Command) -> bool:
        """Handle one command; False ends the session."""
        verb = cmd.verb
        kind = proto.response_kind(cmd)
        if verb == "STLS":
            await self.client_starttls()
            return True
        if kind is None:
            await self.send(proto.status_line(False, f"Command not supported: {verb}"))
            return True
        if (self.settings.require_tls and not self.client_tls and verb in LOGIN_VERBS):
            await self.send(proto.status_line(False, "[AUTH] Issue STLS first "
                                                     "(TLS is required)"))
            return True
        if verb == "CAPA":
            await self.to_server(cmd.line, kind)
            status = await self.server_status()
            await self.send(status.line)
            if status.ok:
                body = await self.read_body(_MAX_CAPA)
                stls = self.proxy.client_tls is not None and not self.client_tls
                await self.send(proto.stuff(proto.filter_capabilities(body, stls=stls)))
            return True
        if verb == "RETR" or (verb == "TOP" and _top_lines(cmd) != 0):
            await self.to_server(cmd.line, kind)
            await self.scanned(cmd)
            return True
        await self.to_server(cmd.line, kind)
        if kind is proto.Kind.SASL:
            await self.sasl()
            return True
        status = await self.server_status()
        await self.send(status.line)
        if status.ok and kind is proto.Kind.MULTI:
            await self.relay_body()
        return verb != "QUIT"

    async def sasl(self) -> None:
        """Relay a SASL exchange (challenges down, answers up) until +OK/-ERR."""
        self.client.sasl = True
        up = self._up
        try:
            while True:
                event = await self.server_event()
                if isinstance(event, proto.StatusLine):
                    await self.send(event.line)
                    return
                if not isinstance(event, proto.Continuation):
                    raise SessionEnd("unexpected event in SASL")
                await self.send(event.line)
                answer = await self.client_event()
                if not isinstance(answer, proto.SaslLine):
                    raise SessionEnd("client left during SASL")
                up.writer.write(answer.line)  # the codec still expects the SASL reply
                async with asyncio.timeout(self.settings.server_timeout):
                    await up.writer.drain()
        finally:
            self.client.sasl = False

    async def client_starttls(self) -> None:
        ctx = self.proxy.client_tls
        if ctx is None or self.client_tls:
            await self.send(proto.status_line(False, "STLS not available"
                                              if ctx is None else "Already in TLS"))
            return
        if self.client.buffered or stream_buffered(self.reader):
            # plaintext sent after STLS would be read as if it came over TLS
            await self.send(proto.status_line(False, "Data after STLS; closing"))
            raise SessionEnd("command injection after STLS")
        await self.send(proto.status_line(True, "Begin TLS negotiation"))
        if self.client.buffered or stream_buffered(self.reader):
            raise SessionEnd("command injection after STLS")
        async with asyncio.timeout(self.settings.idle_timeout):
            await self.writer.start_tls(ctx)
        self.client_tls = True

    async def scanned(self, cmd: proto.Command) -> None:
        """RETR / TOP: spool, scan, answer by the decision."""
        status = await self.server_status()
        if not status.ok:
            await self.send(status.line)
            return
        s = self.settings
        spool = self.proxy.gateway.new_spool()
        try:
            over = False
            while True:
                event = await self.server_event()
                if isinstance(event, proto.EndOfData):
                    break
                if isinstance(event, proto.Data) and not over:
                    if spool.size + len(event.data) > s.max_message_size:
                        over = True  # read on to the end: the session stays in step
                        continue
                    spool.write(event.data)
            if over:
                await self.send(proto.status_line(False, "[SYS/PERM] Message too large "
                                                  "to scan; it stays on the server"))
                return
            spool.finish()
            await self.deliver(cmd, status, spool)
        except SpoolError as exc:
            log.warning("pop3 proxy: spool failed: %s", exc)
            await self.send(proto.status_line(False, "[SYS/TEMP] Cannot scan the message "
                                                     "now, try again later"))
        finally:
            spool.close()

    async def deliver(self, cmd: proto.Command, status: proto.StatusLine,
                      spool: Spool) -> None:
        """Answer ``cmd`` by the decision on ``spool`` (the scan-log line says what the
        client got: ``"pop3"`` is ``+OK``, ``notice``, ``-ERR`` or ``-ERR temporary``)."""
        gateway = self.proxy.gateway
        ctx = Context(FRONTEND, listener=self.proxy.name, client_addr=self.peer,
                      size=spool.size)
        outcome = await gateway.process(spool, ctx, defer_log=True)
        d = outcome.decision
        kept = tuple(a for a in d.actions if a in ("quarantine", "copy_to", "shadow"))
        if d.disposition is Disposition.TEMPFAIL:
            gateway.log_outcome(outcome, pop3="-ERR temporary")
            await self.send(proto.status_line(False, f"[SYS/TEMP] {reply_text(d)}"))
            return
        if d.disposition in (Disposition.REJECT, Disposition.DISCARD):
            if self.settings.infected == "error" and d.disposition is Disposition.REJECT:
                gateway.log_outcome(outcome, pop3="-ERR")
                await self.send(proto.status_line(False, f"[SYS/PERM] {reply_text(d)}"))
                return
            notice = await asyncio.to_thread(self._notice, spool, outcome)
            gateway.log_outcome(outcome, actions=("replace", *kept), pop3="notice")
            await self.send(proto.status_line(True, f"{len(notice)} octets (replaced by "
                                                    "avgate)") + proto.stuff(notice))
            return
        tags = tags_to_add(d, outcome.result)
        if d.subject_prefix or (d.replace and replace_targets(outcome.result)):
            # edits inside the message: parsed and rewritten off the event loop
            edited = await asyncio.to_thread(
                apply_decision, spool.getvalue(), dataclasses.replace(d, headers=tags),
                outcome.result, gateway.policy.own_header_names())
            gateway.log_outcome(outcome, actions=("accept", *edited.applied, *kept),
                                pop3="+OK")
            await self.send(status.line + proto.stuff(edited.data))
            return
        gateway.log_outcome(outcome, actions=("accept", *(("tag",) if tags else ()), *kept),
                            pop3="+OK")
        await self.send(status.line)
        await self.send_spool(spool, tags, gateway.policy.own_header_names() if tags else ())

    def _notice(self, spool: Spool, outcome: Outcome) -> bytes:
        return build_notice(header_block(spool), outcome.result, outcome.decision,
                            sender=self.settings.notice_from, proxy="POP3 proxy")

    async def send_spool(self, spool: Spool, headers: tuple[tuple[str, str], ...] = (),
                         remove: Iterable[str] = ()) -> None:
        """The spooled message, stuffed, in pieces (a message in a file is never read into
        memory whole); with ``headers``, those first and our own names' incoming copies
        removed (:class:`~avgate.mailedit.HeaderFilter` reads the header block only)."""
        stuffer = proto.DotStuffer()
        strip = HeaderFilter(remove) if headers else None
        if headers:
            await self.send(stuffer.feed(add_headers(b"\r\n", headers)[:-2]))
        for chunk in _chunks(spool):
            await self.send(stuffer.feed(strip.feed(chunk) if strip else chunk))
        await self.send(stuffer.feed(strip.finish() if strip else b"") + stuffer.finish())


def _chunks(spool: Spool) -> Iterator[bytes]:
    if spool.in_memory:
        yield spool.getvalue()
        return
    with spool.open() as f:
        while chunk := f.read(_RELAY_CHUNK):
            yield chunk


def tags_to_add(d: Decision, result: ScanResult) -> tuple[tuple[str, str], ...]:
    """The headers to add to an accepted message: a rule's tag; the built-in default's
    only for a result that is not clean (undecided is never passed as if clean). A clean
    message without a tagging rule goes out byte-identical."""
    if not d.headers:
        return ()
    if d.rule.startswith("default:") and result.status is ScanStatus.CLEAN:
        return ()
    return d.headers


def reply_text(d: Decision) -> str:
    """The policy's reply without its SMTP code and enhanced status code."""
    words = d.reply.split(" ", 2)
    if len(words) == 3 and words[1][:1].isdigit() and "." in words[1]:
        return words[2]
    return d.reply[4:] if len(d.reply) > 4 else "Message not available"


def _top_lines(cmd: proto.Command) -> int | None:
    args = cmd.arguments
    if len(args) == 2 and args[1].isdigit():
        return int(args[1])
    return None


def stream_buffered(reader: asyncio.StreamReader) -> int:
    """Bytes a StreamReader holds that nobody has read (asyncio has no public API for it)."""
    buf = getattr(reader, "_buffer", b"")
    return len(buf)


# -- the listener -----------------------------------------------------------------------------
class ProxySettings(Protocol):
    """What :class:`ProxyListener` reads of ``[pop3_proxy]`` / ``[imap_proxy]``."""

    @property
    def listen(self) -> Address: ...
    @property
    def server(self) -> str: ...
    @property
    def tls(self) -> Literal["starttls", "implicit"]: ...
    @property
    def tls_cert(self) -> str | None: ...
    @property
    def tls_key(self) -> str | None: ...
    @property
    def server_ca_file(self) -> str | None: ...
    @property
    def server_verify(self) -> bool: ...
    @property
    def max_connections(self) -> int: ...


class ProxySession(Protocol):
    busy: bool

    async def run(self) -> None: ...
    def hang_up(self) -> None: ...


class ProxyListener:
    """One listening socket of a mail proxy (POP3 here, IMAP in :mod:`.imap`): TLS contexts,
    the connection limit, one task per client, the drain on close. A subclass names itself
    (``what``, ``label``, ``starttls``), says how to refuse a client over the limit (``busy``)
    and makes its sessions (:meth:`new_session`)."""

    what = FRONTEND
    label = "POP3 proxy"
    starttls = "STLS"
    busy = proto.status_line(False, "[SYS/TEMP] Too many connections")

    def __init__(self, gateway: Gateway, settings: ProxySettings,
                 options: ListenOptions) -> None:
        self.gateway = gateway
        self.settings = settings
        self.options = options
        self.name = self.what
        base = gateway.config.base_dir
        self.client_tls = client_tls_context(settings.tls_cert, settings.tls_key, base,
                                             self.what)
        self.server_tls = server_tls_context(settings.server_ca_file, settings.server_verify,
                                             base, self.what)
        self.server: asyncio.Server | None = None
        self.sessions: set[ProxySession] = set()
        self._slots = asyncio.Semaphore(settings.max_connections)
        self._tasks: set[asyncio.Task[None]] = set()  # one per client connection
        self.closing = False

    def new_session(self, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> ProxySession:
        raise NotImplementedError

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def describe(self) -> str:
        tls = ((", TLS" if self.settings.tls == "implicit" else f", {self.starttls}")
               if self.client_tls else "")
        return (f"{self.settings.listen.host}:{self.port} -> {self.settings.server} "
                f"({self.label}{tls})")

    async def start(self) -> None:
        # bind() makes an IPPROTO_TCP socket: asyncio sets TCP_NODELAY on every connection
        sock = bind(self.settings.listen, what=self.what, options=self.options)
        try:
            implicit = self.settings.tls == "implicit"
            self.server = await asyncio.start_server(
                self._client, sock=sock, ssl=self.client_tls if implicit else None)
        except BaseException:
            sock.close()
            raise

    async def _client(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        if self._slots.locked():
            writer.write(self.busy)
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        async with self._slots:
            session = self.new_session(reader, writer)
            self.sessions.add(session)
            try:
                await session.run()
            except Exception:  # a bug must not pass silently; the client sees the close
                log.exception("%s: internal error", self.label)
            finally:
                self.sessions.discard(session)

    async def aclose(self) -> None:
        """Stop accepting; let transfers in progress finish (the drain timeout); hang up."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.drain_timeout
        while any(s.busy for s in self.sessions) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # bounded drain poll
        for session in list(self.sessions):
            session.hang_up()
        if self._tasks:  # the sessions notice the close; cancel what does not
            _done, pending = await asyncio.wait(set(self._tasks), timeout=5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self.server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self.server.wait_closed()


class Pop3Proxy(ProxyListener):
    """``[pop3_proxy]``'s listener."""

    settings: Pop3ProxySettings

    def new_session(self, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> Pop3Session:
        return Pop3Session(self, reader, writer)


async def start(gateway: Gateway, options: ListenOptions) -> list[Pop3Proxy]:
    """Open ``[pop3_proxy] listen`` (serve's entry point)."""
    settings = gateway.config.pop3_proxy
    if settings is None:
        return []
    proxy = Pop3Proxy(gateway, settings, options)
    await proxy.start()
    return [proxy]
