"""SMTP filter front-end: aiosmtpd in, aiosmtplib out, the Gateway in between.

One aiosmtpd server per ``[[smtp.listeners]]`` table. Each client connection gets its own
:class:`FilterHandler` and, unless the listener is verdict-only (``next_hop = "discard"``),
its own session with the next hop, opened at the first ``MAIL FROM`` — before-queue proxy
semantics, as Postfix's ``smtpd_proxy_filter`` expects:

* ``MAIL FROM`` and every ``RCPT TO`` are forwarded to the next hop as the client sends them,
  and the next hop's reply is the client's reply. Per-recipient refusals are therefore exact:
  a recipient the next hop refuses is refused to the client at RCPT time, and DATA (one
  reply for all recipients in SMTP) concerns only recipients the next hop already accepted.
* ``DATA`` is read to the end into a :class:`~avgate.spool.Spool` (memory, then a temp file)
  through the sans-IO :class:`~avgate.protocols.smtp.DataReceiver` (end-of-data, smuggling,
  size and line limits), then :meth:`Gateway.process` scans, decides, quarantines and logs.
* The client's DATA reply is sent only when the outcome is final: accept → the message
  (with the decision's edits) is relayed and the next hop's reply is passed on (250 only
  when the next hop said 250; its 5xx as is; a 4xx, a timeout or a lost connection → 451);
  reject/tempfail → the decision's reply; discard → 250 (quarantined first when the
  decision says so — the Gateway writes it before answering).
* Verdict-only listener: no next hop; clean (accepted) → ``250 2.0.0 Ok: clean`` and the
  data is dropped; infected → the policy's reply (e.g. ``550 5.7.1 FilterVerdictPositive``).

XFORWARD: the listener advertises and accepts XFORWARD (Postfix sends it to content filters
and proxy filters that announce it) and passes the client's attributes — or, without them,
its own view of the client — to the next hop when the next hop advertises XFORWARD
(``xforward = true``, the default), so the final MTA logs the real client. With
``xclient = true`` XCLIENT is sent instead when the next hop offers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosmtplib
from aiosmtpd.smtp import SMTP as _AioSMTP
from aiosmtpd.smtp import Envelope as _AioEnvelope
from aiosmtpd.smtp import Session as _AioSession

from ..errors import ConfigError, SpoolError
from ..policy import Context, Disposition
from ..protocols.smtp import (
    DEFAULT_MAX_LINE_LENGTH,
    UNAVAILABLE,
    XCLIENT_ATTRS,
    XFORWARD_ATTRS,
    DataReceiver,
    Reply,
    normalize_line_endings,
    parse_reply,
    parse_xattrs,
    relay_mail_options,
    reply_from,
    xattr_commands,
)

if TYPE_CHECKING:
    from ..gateway import Gateway
    from ..spool import Spool

log = logging.getLogger("avgate.smtp")

DEFAULT_MAX_MESSAGE_SIZE = 10_240_000  # Postfix's message_size_limit
DEFAULT_MAX_CONNECTIONS = 100
DEFAULT_IDLE_TIMEOUT = 300.0  # RFC 5321 4.5.3.2.7 server timeout
DEFAULT_RELAY_TIMEOUT = 120.0
DRAIN_TIMEOUT = 30.0

REPLY_NEXT_HOP_DOWN = "451 4.4.1 Next hop unavailable, try again later"
REPLY_NEXT_HOP_FAILED = "451 4.4.2 Next hop did not accept the message, try again later"
REPLY_TOO_MANY = "421 4.7.0 Too many connections, try again later"
REPLY_SPOOL_FAILED = "451 4.3.0 Cannot spool the message, try again later"
REPLY_INTERNAL = "451 4.3.0 Internal error, try again later"
REPLY_NO_TRANSACTION = "503 5.5.1 Error: need MAIL command"

_session_ids = itertools.count(1)


# -- settings -----------------------------------------------------------------------------
def parse_hostport(value: str, what: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"{what}: expected host:port, got {value!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    """One ``[[smtp.listeners]]`` table with defaults applied."""

    name: str
    host: str
    port: int
    next_hop: tuple[str, int] | None  # None: verdict-only ("discard")
    direction: str = "inbound"
    tls_cert: str | None = None
    tls_key: str | None = None
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_line_length: int = DEFAULT_MAX_LINE_LENGTH
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    relay_timeout: float = DEFAULT_RELAY_TIMEOUT
    hostname: str = ""
    bare_lf: str = "reject"
    xforward: bool = True
    xclient: bool = False

    @classmethod
    def from_table(cls, table: dict[str, Any], base_dir: str = ".") -> ListenerSettings:
        name = str(table.get("name", "smtp"))
        what = f"smtp listener {name!r}"
        host, port = parse_hostport(str(table.get("listen", "127.0.0.1:10025")), f"{what} listen")
        hop_s = str(table.get("next_hop", "127.0.0.1:10026"))
        hop = None if hop_s == "discard" else parse_hostport(hop_s, f"{what} next_hop")
        cert, key = table.get("tls_cert"), table.get("tls_key")
        if bool(cert) != bool(key):
            raise ConfigError(f"{what}: tls_cert and tls_key go together")
        if cert and key:
            cert, key = str(Path(base_dir, cert)), str(Path(base_dir, key))
        return cls(
            name=name, host=host, port=port, next_hop=hop,
            direction=str(table.get("direction", "inbound")),
            tls_cert=cert, tls_key=key,
            max_message_size=int(table.get("max_message_size", DEFAULT_MAX_MESSAGE_SIZE)),
            max_line_length=int(table.get("max_line_length", DEFAULT_MAX_LINE_LENGTH)),
            max_connections=int(table.get("max_connections", DEFAULT_MAX_CONNECTIONS)),
            idle_timeout=float(table.get("idle_timeout", DEFAULT_IDLE_TIMEOUT)),
            relay_timeout=float(table.get("relay_timeout", DEFAULT_RELAY_TIMEOUT)),
            hostname=str(table.get("hostname") or socket.gethostname()),
            bare_lf=str(table.get("bare_lf", "reject")),
            xforward=bool(table.get("xforward", True)),
            xclient=bool(table.get("xclient", False)),
        )

    def tls_context(self) -> ssl.SSLContext | None:
        if not self.tls_cert or not self.tls_key:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"smtp listener {self.name!r}: cannot load tls_cert/tls_key: "
                              f"{exc}") from exc
        return ctx


# -- next hop -------------------------------------------------------------------------------
class NextHopError(Exception):
    """The next hop could not be reached or broke the conversation."""


def _path(address: str) -> str:
    """Envelope address as an SMTP path (``<>`` for the null sender)."""
    return "<>" if address in ("", "<>") else f"<{address}>"


class NextHop:
    """One SMTP client session to the next hop (aiosmtplib), reused for the connection."""

    def __init__(self, host: str, port: int, timeout: float, local_hostname: str) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.local_hostname = local_hostname
        self.smtp: aiosmtplib.SMTP | None = None
        self.in_transaction = False

    @property
    def keywords(self) -> dict[str, str]:
        assert self.smtp is not None
        return {k.upper(): v for k, v in self.smtp.esmtp_extensions.items()}

    async def _command(self, *args: bytes) -> Reply:
        assert self.smtp is not None
        try:
            resp = await self.smtp.execute_command(*args, timeout=self.timeout)
        except (aiosmtplib.SMTPException, OSError) as exc:
            await self.close()
            raise NextHopError(str(exc) or type(exc).__name__) from exc
        return reply_from(resp.code, resp.message)

    async def begin(self, attrs: dict[str, str], *, xforward: bool, xclient: bool) -> None:
        """Connect and greet if needed, end any open transaction, pass the client attributes."""
        if self.smtp is None or not self.smtp.is_connected:
            smtp = aiosmtplib.SMTP(hostname=self.host, port=self.port, timeout=self.timeout,
                                   local_hostname=self.local_hostname, start_tls=False,
                                   use_tls=False)
            try:
                await smtp.connect()
                await smtp.ehlo()
            except (aiosmtplib.SMTPException, OSError) as exc:
                smtp.close()
                raise NextHopError(str(exc) or type(exc).__name__) from exc
            self.smtp = smtp
            self.in_transaction = False
        if self.in_transaction:
            await self.rset()
        kws = self.keywords
        if xclient and "XCLIENT" in kws:
            for line in xattr_commands("XCLIENT", _xclient_attrs(attrs), kws["XCLIENT"].split()):
                reply = await self._command(line.encode())
                if reply.code == 220:  # XCLIENT answers with a new greeting: greet again
                    await self._ehlo()
        elif xforward and "XFORWARD" in kws:
            for line in xattr_commands("XFORWARD", attrs, kws["XFORWARD"].split()):
                await self._command(line.encode())  # a refusal only loses log detail

    async def _ehlo(self) -> None:
        assert self.smtp is not None
        try:
            await self.smtp.ehlo(timeout=self.timeout)
        except (aiosmtplib.SMTPException, OSError) as exc:
            await self.close()
            raise NextHopError(str(exc) or type(exc).__name__) from exc

    async def mail(self, sender: str, options: list[str]) -> Reply:
        args = [b"FROM:" + _path(sender).encode("utf-8", "surrogateescape")]
        args += [o.encode() for o in options]
        reply = await self._command(b"MAIL", *args)
        self.in_transaction = reply.positive
        return reply

    async def rcpt(self, recipient: str) -> Reply:
        return await self._command(b"RCPT", b"TO:" + _path(recipient).encode(
            "utf-8", "surrogateescape"))

    async def data(self, message: bytes) -> Reply:
        """Send the message; the reply (any code) or NextHopError when the session broke."""
        assert self.smtp is not None
        self.in_transaction = False
        try:
            # aiosmtplib dot-stuffs and normalises exactly like protocols.smtp.encode_data;
            # we normalise first so what we scanned-and-edited is what goes on the wire
            resp = await self.smtp.data(normalize_line_endings(message), timeout=self.timeout)
        except aiosmtplib.SMTPDataError as exc:
            return reply_from(exc.code, exc.message)
        except (aiosmtplib.SMTPException, OSError) as exc:
            await self.close()
            raise NextHopError(str(exc) or type(exc).__name__) from exc
        return reply_from(resp.code, resp.message)

    async def rset(self) -> None:
        self.in_transaction = False
        if self.smtp is not None and self.smtp.is_connected:
            with contextlib.suppress(NextHopError):
                reply = await self._command(b"RSET")
                if not reply.positive:
                    await self.close()

    async def close(self) -> None:
        smtp, self.smtp = self.smtp, None
        self.in_transaction = False
        if smtp is None:
            return
        if smtp.is_connected:
            try:
                await asyncio.wait_for(smtp.quit(), timeout=min(self.timeout, 5.0))
            except (TimeoutError, aiosmtplib.SMTPException, OSError):
                pass
        smtp.close()


def _xclient_attrs(attrs: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in attrs.items() if k in XCLIENT_ATTRS}


# -- the aiosmtpd side ------------------------------------------------------------------------
class FilterSMTP(_AioSMTP):
    """aiosmtpd's SMTP with DATA streamed into a Spool, XFORWARD, and a connection limit."""

    def __init__(self, handler: FilterHandler, listener: SMTPListener, **kw: Any) -> None:
        self.listener = listener
        self.filter = handler
        super().__init__(handler, **kw)

    async def _handle_client(self) -> None:
        listener = self.listener
        if listener.active >= listener.settings.max_connections:
            await self.push(REPLY_TOO_MANY)
            if self.transport is not None:
                self.transport.close()
            return
        listener.active += 1
        listener.sessions.add(self)
        try:
            await super()._handle_client()
        finally:
            listener.active -= 1
            listener.sessions.discard(self)
            listener.spawn(self.filter.aclose())

    async def smtp_XFORWARD(self, arg: str | None) -> None:
        """XFORWARD (Postfix): the upstream MTA tells us who its client was."""
        if not self.listener.settings.xforward:
            await self.push('502 5.5.1 Error: command "XFORWARD" not implemented')
            return
        assert self.envelope is not None
        if self.envelope.mail_from:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        try:
            self.filter.xforward.update(parse_xattrs(arg or ""))
        except ValueError as exc:
            await self.push(f"501 5.5.4 Syntax: XFORWARD attribute=value... ({exc})")
            return
        await self.push("250 2.0.0 Ok")

    async def smtp_DATA(self, arg: str | None) -> None:
        """Read DATA into a Spool, then answer only once the outcome is final."""
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        settings = self.listener.settings
        receiver = DataReceiver(max_size=settings.max_message_size,
                                max_line_length=settings.max_line_length,
                                bare_lf=settings.bare_lf)
        spool = self.listener.gateway.new_spool()
        spool_failed = False
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            while not receiver.done:
                try:
                    chunk = await self._reader.readuntil(b"\r\n")
                except asyncio.LimitOverrunError as exc:
                    # a long line: take what is buffered, never past a separator
                    chunk = await self._reader.read(exc.consumed)
                except asyncio.IncompleteReadError:
                    return  # client went away mid-DATA: nothing is relayed
                self._reset_timeout()
                content = receiver.feed(chunk)
                if content and not spool_failed:
                    try:
                        spool.write(content)
                    except SpoolError as exc:
                        log.error("%s: %s", settings.name, exc)
                        spool_failed = True
            problem = receiver.problem
            if problem is not None or spool_failed:
                await self.filter.abort()
                self._set_post_data_state()  # type: ignore[no-untyped-call]
                await self.push(problem.reply if problem is not None else REPLY_SPOOL_FAILED)
                return
            # Scanning and relaying have their own timeouts: the idle timer must not cut
            # the connection while the client waits for our answer.
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            self.listener.processing += 1
            try:
                reply = await self.filter.deliver(self.session, self.envelope, spool)
            except Exception:
                log.exception("%s: delivery failed", settings.name)
                await self.filter.abort()
                reply = REPLY_INTERNAL
            finally:
                self.listener.processing -= 1
                self._reset_timeout()
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(reply)
        finally:
            spool.close()


class FilterHandler:
    """Per-connection aiosmtpd handler: envelope forwarding and the DATA outcome."""

    def __init__(self, listener: SMTPListener) -> None:
        self.listener = listener
        self.settings = listener.settings
        self.gateway = listener.gateway
        self.session_id = f"{self.settings.name}-{os.getpid()}-{next(_session_ids)}"
        self.xforward: dict[str, str] = {}
        hop = self.settings.next_hop
        self.next_hop = (NextHop(hop[0], hop[1], self.settings.relay_timeout,
                                 self.settings.hostname) if hop else None)

    # aiosmtpd hooks --------------------------------------------------------------------------
    async def handle_EHLO(self, server: FilterSMTP, session: _AioSession, envelope: _AioEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        # we take no AUTH (aiosmtpd offers it after STARTTLS); advertise XFORWARD instead
        out = [r for r in responses if not r[4:].upper().startswith("AUTH")]
        if self.settings.xforward:
            out.insert(len(out) - 1, "250-XFORWARD " + " ".join(XFORWARD_ATTRS))
        await self.abort()
        return out

    async def handle_MAIL(self, server: FilterSMTP, session: _AioSession,
                          envelope: _AioEnvelope, address: str, options: list[str]) -> str:
        if self.next_hop is None:
            envelope.mail_from = address
            envelope.mail_options.extend(options)
            return "250 2.1.0 Ok"
        try:
            await self.next_hop.begin(self._client_attrs(session), xforward=self.settings.xforward,
                                      xclient=self.settings.xclient)
            reply = await self.next_hop.mail(
                address, relay_mail_options(options, self.next_hop.keywords))
        except NextHopError as exc:
            log.warning("%s: next hop %s:%d: %s", self.settings.name, self.next_hop.host,
                        self.next_hop.port, exc)
            return REPLY_NEXT_HOP_DOWN
        if reply.positive:
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return _client_reply(reply)

    async def handle_RCPT(self, server: FilterSMTP, session: _AioSession,
                          envelope: _AioEnvelope, address: str, options: list[str]) -> str:
        if self.next_hop is None:
            envelope.rcpt_tos.append(address)
            return "250 2.1.5 Ok"
        if not self.next_hop.in_transaction:
            return REPLY_NEXT_HOP_DOWN
        try:
            reply = await self.next_hop.rcpt(address)
        except NextHopError:
            return REPLY_NEXT_HOP_DOWN
        if reply.positive:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        return _client_reply(reply)

    async def handle_RSET(self, server: FilterSMTP, session: _AioSession,
                          envelope: _AioEnvelope) -> str:
        await self.abort()
        return "250 2.0.0 Ok"

    async def handle_QUIT(self, server: FilterSMTP, session: _AioSession,
                          envelope: _AioEnvelope) -> str:
        await self.aclose()
        return "221 2.0.0 Bye"

    # the outcome -------------------------------------------------------------------------------
    async def deliver(self, session: _AioSession | None, envelope: _AioEnvelope,
                      spool: Spool) -> str:
        """Scan, decide, relay: the client's DATA reply. Never 250 before it is final."""
        from ..gateway import Envelope

        assert session is not None
        attrs = self._client_attrs(session)
        self.xforward = {}  # XFORWARD attributes describe one transaction
        client_addr = attrs.get("ADDR", "")
        client_addr = "" if client_addr == UNAVAILABLE else client_addr
        authenticated = bool(session.authenticated)
        sender = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
        recipients = tuple(envelope.rcpt_tos)
        ctx = Context(
            frontend="smtp", listener=self.settings.name,
            direction=self.gateway.policy.direction_for(self.settings.direction, client_addr,
                                                        authenticated),
            sender=sender, recipients=recipients, client_addr=client_addr,
            authenticated=authenticated, size=spool.size)
        env = Envelope(sender=sender, recipients=recipients, client_addr=client_addr,
                       helo=attrs.get("HELO", session.host_name or ""),
                       listener=self.settings.name)
        outcome = await self.gateway.process(spool, ctx, env, ids={"session": self.session_id})
        decision = outcome.decision
        if decision.disposition in (Disposition.REJECT, Disposition.TEMPFAIL):
            await self.abort()
            return _decision_reply(decision.reply, decision.disposition)
        if decision.disposition is Disposition.DISCARD:
            await self.abort()
            kept = f" (quarantined as {outcome.quarantine_id})" if outcome.quarantine_id else ""
            return f"250 2.0.0 Ok: discarded{kept}"
        if self.next_hop is None:  # verdict-only listener: the answer is the product
            return f"250 2.0.0 Ok: {outcome.result.status.value}"
        data = spool.getvalue()
        if decision.headers or decision.subject_prefix or decision.replace:
            from ..mailedit import edit_message

            data = edit_message(data, decision, outcome.result)
        return await self._relay(data, decision.copy_to)

    async def _relay(self, data: bytes, copy_to: tuple[str, ...]) -> str:
        hop = self.next_hop
        assert hop is not None
        if not hop.in_transaction:
            return REPLY_NEXT_HOP_FAILED
        try:
            for extra in copy_to:
                r = await hop.rcpt(extra)
                if not r.positive:
                    log.warning("%s: copy_to %s refused by next hop: %d %s", self.settings.name,
                                extra, r.code, r.text)
            reply = await hop.data(data)
        except NextHopError as exc:
            log.warning("%s: next hop failed during DATA: %s", self.settings.name, exc)
            return REPLY_NEXT_HOP_FAILED
        if reply.code == 250 or reply.permanent:
            return reply.render()
        if reply.transient:
            return Reply(451, reply.lines).render()
        return REPLY_NEXT_HOP_FAILED  # 2xx other than 250, 3xx: not a clear acceptance

    def _client_attrs(self, session: _AioSession) -> dict[str, str]:
        """What the next hop should log as the client: XFORWARD from upstream, else the peer."""
        if self.xforward:
            return dict(self.xforward)
        peer = session.peer
        addr, port = (str(peer[0]), str(peer[1])) if isinstance(peer, tuple) else ("", "")
        return {"NAME": UNAVAILABLE, "ADDR": addr or UNAVAILABLE, "PORT": port or UNAVAILABLE,
                "HELO": session.host_name or UNAVAILABLE,
                "PROTO": "ESMTP" if session.extended_smtp else "SMTP"}

    async def abort(self) -> None:
        """End the next hop's open transaction (nothing is delivered)."""
        if self.next_hop is not None and self.next_hop.in_transaction:
            await self.next_hop.rset()

    async def aclose(self) -> None:
        if self.next_hop is not None:
            await self.next_hop.close()


def _client_reply(reply: Reply) -> str:
    """A next-hop reply to a MAIL/RCPT, passed on (odd codes become a temporary failure)."""
    if reply.code in (250, 251, 252) or reply.transient or reply.permanent:
        return reply.render()
    return REPLY_NEXT_HOP_FAILED


def _decision_reply(reply: str, disposition: Disposition) -> str:
    try:
        parsed = parse_reply(reply)
    except ValueError:
        parsed = None
    want = "5" if disposition is Disposition.REJECT else "4"
    if parsed is None or str(parsed.code)[0] != want:
        return ("554 5.7.0 Message refused" if want == "5"
                else "451 4.7.1 Try again later")
    return parsed.render()


# -- listener --------------------------------------------------------------------------------
class SMTPListener:
    """One listening socket; what ``serve`` gets back from :func:`start`."""

    def __init__(self, gateway: Gateway, settings: ListenerSettings) -> None:
        self.gateway = gateway
        self.settings = settings
        self.server: asyncio.Server | None = None
        self.active = 0
        self.processing = 0
        self.sessions: set[FilterSMTP] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._tls = settings.tls_context()

    @property
    def port(self) -> int:
        """The bound port (useful with ``listen = "127.0.0.1:0"``)."""
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def describe(self) -> str:
        s = self.settings
        hop = "discard (verdict only)" if s.next_hop is None else f"{s.next_hop[0]}:{s.next_hop[1]}"
        tls = ", STARTTLS" if self._tls else ""
        return f"{s.name} {s.host}:{self.port} -> {hop} ({s.direction}{tls})"

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _protocol(self) -> FilterSMTP:
        s = self.settings
        return FilterSMTP(FilterHandler(self), self, data_size_limit=s.max_message_size,
                          hostname=s.hostname, ident="avgate", tls_context=self._tls,
                          timeout=s.idle_timeout, decode_data=False,
                          enable_SMTPUTF8=True, loop=asyncio.get_running_loop())

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.server = await loop.create_server(self._protocol, self.settings.host,
                                                   self.settings.port)
        except OSError as exc:
            raise ConfigError(f"smtp listener {self.settings.name!r}: cannot listen on "
                              f"{self.settings.host}:{self.settings.port}: {exc.strerror}"
                              ) from exc

    async def aclose(self, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        """Stop accepting, let messages being scanned/relayed finish, then hang up."""
        if self.server is not None:
            self.server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        while self.processing and loop.time() < deadline:  # noqa: ASYNC110 - bounded drain poll
            await asyncio.sleep(0.05)  # bounded drain poll
        for proto in list(self.sessions):
            if proto.transport is not None:
                proto.transport.close()
        await asyncio.sleep(0)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), timeout=1.0)


async def start(gateway: Gateway) -> list[SMTPListener]:
    """Start one SMTP listener per ``[[smtp.listeners]]`` table (serve's entry point)."""
    started: list[SMTPListener] = []
    try:
        for table in gateway.config.smtp_listeners:
            listener = SMTPListener(gateway, ListenerSettings.from_table(
                dict(table), gateway.config.base_dir))
            await listener.start()
            started.append(listener)
    except BaseException:
        for listener in started:
            await listener.aclose(drain_timeout=0)
        raise
    return started


__all__ = ["FilterHandler", "FilterSMTP", "ListenerSettings", "NextHop", "SMTPListener",
           "parse_hostport", "start"]
