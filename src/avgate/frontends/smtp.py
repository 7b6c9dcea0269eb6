"""SMTP filter front-end: aiosmtpd in, the pooled SMTP client out, the Gateway between.

One server per ``[[smtp.listeners]]`` table (:class:`SmtpListenerSettings`). Each client
connection gets its own :class:`FilterHandler` and, unless the listener is verdict-only
(``mode = "verdict"``, the old ``next_hop = "discard"``), its own session with the next hop
(:class:`~avgate.smtpclient.NextHop`), opened at the first ``MAIL FROM`` — before-queue proxy
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

Where the listener sits (``mode``) feeds the policy through the Context: on an
``after_queue`` listener (Postfix ``content_filter``: the MTA has already accepted the mail)
``Context.after_queue`` is set and the policy turns every ``reject`` into quarantine
(``discard`` + ``quarantine``, rule ``RULE+after_queue``), answered 250 — a 5xx there would
make the MTA bounce the message, virus included, to a sender that virus mail forges
(amavisd-new's ``D_DISCARD``). Tempfails stay 4xx (the MTA keeps the mail and retries).
``before_queue`` (the default) and ``verdict`` give the policy's replies as they are.

XFORWARD/XCLIENT: what a client says about itself is trusted only from the listener's
allow-lists, ``xforward_hosts`` and ``xclient_hosts`` (Postfix's
``smtpd_authorized_xforward_hosts`` / ``smtpd_authorized_xclient_hosts``): they are
advertised in EHLO only to those clients, and anyone else gets
``550 5.7.0 Error: insufficient authorization`` — their attributes are neither used (policy
direction, scan log, quarantine) nor passed on. XFORWARD describes one transaction; XCLIENT
replaces the client for the rest of the session (a new greeting, then EHLO again; ``LOGIN``
counts as authenticated). The client's attributes — or, without them, avgate's own view of
the client — go to the next hop when it advertises XFORWARD (``xforward = true``), so the
final MTA logs the real client; with ``xclient = true`` XCLIENT is sent instead when the next
hop offers it. Per-session limits: see :class:`~avgate.frontends.smtpd.FilterSMTP`.

Reload and workers (``avgate serve``): the Gateway (scanner, policy, store, log) is read per
message through ``listener.gateway`` (serve's GatewayRef), and the listener's own settings
through :attr:`SMTPListener.current` (its table in ``gateway.config``) per connection,
command or message. ``listen``, ``next_hop``, ``relay_timeout``, ``hostname`` and TLS are
what the listener holds (socket, next-hop pool, TLS context) and need a restart (so does a
change to or from ``mode = "verdict"``; before_queue ↔ after_queue follows a reload). With
``[serve] workers`` > 1 every worker binds the listen port with SO_REUSEPORT.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import itertools
import logging
import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from aiosmtpd.smtp import Envelope as _AioEnvelope
from aiosmtpd.smtp import Session as _AioSession
from pydantic import BeforeValidator, Field, PlainSerializer, field_validator, model_validator

from ..context import Context, Envelope
from ..decision import Disposition
from ..errors import ConfigError
from ..protocols.smtp import (
    DEFAULT_MAX_LINE_LENGTH,
    UNAVAILABLE,
    XCLIENT_ATTRS,
    XFORWARD_ATTRS,
    DataEncoder,
    Reply,
    encode_data,
    parse_reply,
)
from ..settings import Listen, Section, Size
from ..smtpclient import NextHop, NextHopError, Pool, parse_next_hop
from .listen import Address, ListenOptions, bind
from .smtpd import FilterSMTP, peer_addr, trusted

if TYPE_CHECKING:
    from ..gateway import Gateway
    from ..spool import Spool

log = logging.getLogger("avgate.smtp")

REPLY_NEXT_HOP_DOWN = "451 4.4.1 Next hop unavailable, try again later"
REPLY_NEXT_HOP_FAILED = "451 4.4.2 Next hop did not accept the message, try again later"
RELAY_CHUNK = 256 * 1024  # bytes read from a file spool per write to the next hop

_session_ids = itertools.count(1)


# -- settings -----------------------------------------------------------------------------
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(value: Any) -> tuple[Network, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError("expected a list of addresses or networks")
    nets: list[Network] = []
    for item in items:
        if isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network):
            nets.append(item)
            continue
        try:
            if not isinstance(item, str):
                raise ValueError
            nets.append(ipaddress.ip_network(item.strip("[]"), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an address or network") from None
    return tuple(nets)


#: an allow-list of addresses or networks ("10.0.0.0/8", "::1"); shown as strings
Networks = Annotated[tuple[Any, ...], BeforeValidator(_networks),
                     PlainSerializer(lambda v: [str(n) for n in v], return_type=list[str])]
LOOPBACK = _networks(["127.0.0.1", "::1"])  # where Postfix connects from
#: where a listener sits: before the MTA's queue, after it, or answering a verdict only
ListenerMode = Literal["before_queue", "after_queue", "verdict"]


class SmtpListenerSettings(Section):
    """One ``[[smtp.listeners]]`` table.

    name: label in logs, policy (``listener``) and quarantine ("smtp", then "smtp1"...)
    mode: before_queue (default: Postfix ``smtpd_proxy_filter``, the client gets the policy's
    replies) | after_queue (``content_filter``: a reject is quarantined and answered 250,
    never bounced) | verdict (no next hop; ``next_hop = "discard"`` is the old spelling)
    listen: host:port to accept on; next_hop: host:port to relay to ("discard" for a
    verdict listener); direction: inbound | outbound | auto (policy ``direction``)
    tls_cert, tls_key: STARTTLS (both or neither; relative to the config file)
    max_message_size (Postfix's message_size_limit), max_line_length (DATA lines, without
    CRLF), max_connections (concurrent sessions), idle_timeout (RFC 5321 server timeout),
    relay_timeout (each next-hop exchange), hostname (greeting and EHLO; "" = this machine)
    bare_lf: reject | normalize (see avgate.protocols.smtp)
    xforward / xclient: send the client's attributes to the next hop by XFORWARD / XCLIENT
    xforward_hosts / xclient_hosts: who may send them to us (default loopback)
    max_recipients (Postfix's smtpd_recipient_limit), max_junk_commands
    (smtpd_junk_command_limit), max_errors (smtpd_hard_error_limit)
    """

    name: str = "smtp"
    mode: ListenerMode = "before_queue"
    listen: Listen = Address("tcp", "127.0.0.1", 10025)
    next_hop: str = "127.0.0.1:10026"
    direction: Literal["inbound", "outbound", "auto"] = "inbound"
    tls_cert: str | None = None
    tls_key: str | None = None
    max_message_size: Size = 10_240_000
    max_line_length: int = Field(DEFAULT_MAX_LINE_LENGTH, gt=0)
    max_connections: int = Field(100, gt=0)
    idle_timeout: float = Field(300.0, gt=0)
    relay_timeout: float = Field(120.0, gt=0)
    hostname: str = ""
    bare_lf: Literal["reject", "normalize"] = "reject"
    xforward: bool = True
    xclient: bool = False
    xforward_hosts: Networks = LOOPBACK
    xclient_hosts: Networks = LOOPBACK
    max_recipients: int = Field(1000, gt=0)
    max_junk_commands: int = Field(100, gt=0)
    max_errors: int = Field(20, gt=0)

    @field_validator("listen")
    @classmethod
    def _tcp(cls, value: Address) -> Address:
        if value.is_unix:
            raise ValueError("expected host:port (the SMTP filter listens on TCP)")
        return value

    @field_validator("next_hop")
    @classmethod
    def _next_hop(cls, value: str) -> str:
        if value != "discard":
            try:
                parse_next_hop(value, default_port=None)
            except ValueError:
                raise ValueError(f'expected host:port or "discard", got {value!r}') from None
        return value

    @model_validator(mode="before")
    @classmethod
    def _mode_of_next_hop(cls, data: Any) -> Any:
        """``next_hop = "discard"`` alone is the old spelling of ``mode = "verdict"``; a
        verdict listener alone gets ``next_hop = "discard"`` (it relays nothing)."""
        if isinstance(data, dict):
            if "mode" not in data and data.get("next_hop") == "discard":
                return {**data, "mode": "verdict"}
            if data.get("mode") == "verdict" and "next_hop" not in data:
                return {**data, "next_hop": "discard"}
        return data

    @model_validator(mode="after")
    def _mode_fits_next_hop(self) -> SmtpListenerSettings:
        if self.mode == "verdict" and self.next_hop != "discard":
            raise ValueError(f'mode = "verdict" relays nothing: leave next_hop out '
                             f'(got next_hop = {self.next_hop!r})')
        if self.mode != "verdict" and self.next_hop == "discard":
            raise ValueError(f'next_hop = "discard" is a verdict-only listener: '
                             f'set mode = "verdict", or a host:port for mode = "{self.mode}"')
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> SmtpListenerSettings:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        return self

    @property
    def relay_to(self) -> tuple[str, int] | None:
        """The next hop as (host, port); None for a verdict-only listener."""
        return None if self.mode == "verdict" else parse_next_hop(self.next_hop, None)


def tls_context(settings: SmtpListenerSettings, base_dir: str) -> ssl.SSLContext | None:
    """The STARTTLS context (paths relative to ``base_dir``), or None without TLS."""
    if not settings.tls_cert or not settings.tls_key:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(Path(base_dir, settings.tls_cert), Path(base_dir, settings.tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"smtp listener {settings.name!r}: cannot load tls_cert/tls_key: "
                          f"{exc}") from exc
    return ctx


# -- one client connection ------------------------------------------------------------------
class FilterHandler:
    """Per-connection aiosmtpd handler: envelope forwarding and the DATA outcome."""

    def __init__(self, listener: SMTPListener) -> None:
        self.listener = listener
        self.gateway = listener.gateway
        self.session_id = f"{listener.name}-{os.getpid()}-{next(_session_ids)}"
        self.xforward: dict[str, str] = {}  # from a trusted upstream, for one transaction
        self.xclient: dict[str, str] = {}  # from a trusted proxy, for the session
        self.next_hop = NextHop(listener.pool) if listener.pool is not None else None

    # aiosmtpd hooks --------------------------------------------------------------------------
    async def handle_EHLO(self, server: FilterSMTP, session: _AioSession, envelope: _AioEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        settings = self.listener.current
        addr = peer_addr(session)
        reply = _ehlo_reply(tuple(responses),
                            settings.xforward and trusted(addr, settings.xforward_hosts),
                            trusted(addr, settings.xclient_hosts))
        await self.abort()
        return [reply]

    async def handle_MAIL(self, server: FilterSMTP, session: _AioSession,
                          envelope: _AioEnvelope, address: str, options: list[str]) -> str:
        if self.next_hop is None:
            envelope.mail_from = address
            envelope.mail_options.extend(options)
            return "250 2.1.0 Ok"
        settings = self.listener.current
        try:
            reply = await self.next_hop.mail(address, options, self._client_attrs(session),
                                             xforward=settings.xforward,
                                             xclient=settings.xclient)
        except NextHopError as exc:
            log.warning("%s: next hop %s:%d: %s", self.listener.name, self.next_hop.host,
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
        await self.abort()
        return "221 2.0.0 Bye"

    # the outcome -------------------------------------------------------------------------------
    async def deliver(self, session: _AioSession | None, envelope: _AioEnvelope,
                      spool: Spool) -> str:
        """Scan, decide, relay: the client's DATA reply. Never 250 before it is final."""
        assert session is not None
        attrs = self._client_attrs(session)
        self.xforward = {}  # XFORWARD attributes describe one transaction
        client_addr = attrs.get("ADDR", "")
        client_addr = "" if client_addr in (UNAVAILABLE, "[TEMPUNAVAIL]") else client_addr
        if client_addr[:5].upper() == "IPV6:":  # Postfix's form of an IPv6 address
            client_addr = client_addr[5:]
        login = self.xclient.get("LOGIN", "")
        authenticated = bool(session.authenticated) or bool(login and not login.startswith("["))
        env = Envelope(sender="" if envelope.mail_from in (None, "<>") else
                       str(envelope.mail_from), recipients=tuple(envelope.rcpt_tos),
                       client_addr=client_addr, helo=attrs.get("HELO", session.host_name or ""),
                       listener=self.listener.name)
        policy = self.gateway.policy  # one policy for the decision and the header names
        settings = self.listener.current
        # after the queue a reject would bounce (see the module docstring): the policy holds
        ctx = Context("smtp", envelope=env, authenticated=authenticated, size=spool.size,
                      direction=policy.direction_for(settings.direction, client_addr,
                                                     authenticated),
                      after_queue=settings.mode == "after_queue")
        outcome = await self.gateway.process(spool, ctx, ids={"session": self.session_id})
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
        # incoming copies of every header we may write go: ours are the only verdict
        return await self._relay(_wire_pieces(spool, decision, outcome.result,
                                              policy.own_header_names()),
                                 decision.copy_to)

    async def _relay(self, pieces: Iterator[bytes], copy_to: tuple[str, ...]) -> str:
        hop = self.next_hop
        assert hop is not None
        if not hop.in_transaction:
            return REPLY_NEXT_HOP_FAILED
        try:
            refused, reply = await hop.data(copy_to, pieces)
            for extra, r in zip(copy_to, refused, strict=False):
                if not r.positive:
                    log.warning("%s: copy_to %s refused by next hop: %d %s", self.listener.name,
                                extra, r.code, r.text)
        except NextHopError as exc:
            log.warning("%s: next hop failed during DATA: %s", self.listener.name, exc)
            return REPLY_NEXT_HOP_FAILED
        if reply.code == 250 or reply.permanent:
            return reply.render()
        if reply.transient:
            return Reply(451, reply.lines).render()
        return REPLY_NEXT_HOP_FAILED  # 2xx other than 250, 3xx: not a clear acceptance

    def _client_attrs(self, session: _AioSession) -> dict[str, str]:
        """Who the client is (policy, log, next hop): XFORWARD from a trusted upstream, else
        the peer as a trusted XCLIENT proxy described it, else the peer."""
        if self.xforward:
            return dict(self.xforward)
        peer = session.peer
        addr, port = (str(peer[0]), str(peer[1])) if isinstance(peer, tuple) else ("", "")
        attrs = {"NAME": UNAVAILABLE, "ADDR": addr or UNAVAILABLE, "PORT": port or UNAVAILABLE,
                 "HELO": session.host_name or UNAVAILABLE,
                 "PROTO": "ESMTP" if session.extended_smtp else "SMTP"}
        attrs.update(self.xclient)
        return attrs

    async def abort(self) -> None:
        """End the next hop's open transaction (nothing is delivered): the connection goes
        back to the pool and gets its RSET with the next transaction's first commands."""
        if self.next_hop is not None:
            self.next_hop.release()

    def close(self) -> None:
        """The client connection is over: the next-hop connection goes back to the pool."""
        if self.next_hop is not None:
            self.next_hop.release()


def _wire_pieces(spool: Spool, decision: Any, result: Any,
                 remove: frozenset[str] = frozenset()) -> Iterator[bytes]:
    """The DATA content for the next hop, encoded (dot-stuffed, terminator), in pieces.

    Incoming header fields named in ``remove`` (the policy's own header names) are left
    out. The common case (verdict headers only) never holds the message twice: the headers
    are encoded, then the spool follows through a :class:`~avgate.mailedit.HeaderFilter`
    (which reads the header block only; one piece when the spool is in memory, file chunks
    otherwise). Subject prefixes and part replacement edit the message in memory
    (:func:`~avgate.mailedit.edit_message`).
    """
    from ..mailedit import HeaderFilter, add_headers, edit_message, replace_targets

    # a replace with nothing to replace (clean, error) keeps the streaming path
    if decision.subject_prefix or (decision.replace and replace_targets(result)):
        yield encode_data(edit_message(spool.getvalue(), decision, result, remove))
        return
    encoder = DataEncoder()
    strip = HeaderFilter(remove)
    head = b""
    if decision.headers:
        head = encoder.feed(add_headers(b"\r\n", decision.headers)[:-2])
    if spool.in_memory:  # one piece, the message copied once more (into the join)
        data = strip.feed(spool.getvalue())
        tail = strip.finish()
        yield b"".join((head, encoder.feed(data + tail if tail else data), encoder.finish()))
        return
    if head:
        yield head
    with spool.open() as f:
        while chunk := f.read(RELAY_CHUNK):
            yield encoder.feed(strip.feed(chunk))
    yield encoder.feed(strip.finish()) + encoder.finish()


@functools.lru_cache(maxsize=64)
def _ehlo_reply(responses: tuple[str, ...], xforward: bool, xclient: bool) -> str:
    """The EHLO reply from aiosmtpd's lines, as one string (aiosmtpd pushes each list item
    on its own: a send() each). We take no AUTH (aiosmtpd offers it after STARTTLS);
    XFORWARD/XCLIENT are advertised instead, to the clients allowed to use them. Cached: the
    lines are the same for every session of a listener."""
    out = [r for r in responses if not r[4:].upper().startswith("AUTH")]
    if xforward:
        out.insert(len(out) - 1, "250-XFORWARD " + " ".join(XFORWARD_ATTRS))
    if xclient:
        out.insert(len(out) - 1, "250-XCLIENT " + " ".join(XCLIENT_ATTRS))
    return "\r\n".join(out)


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

    def __init__(self, gateway: Gateway, settings: SmtpListenerSettings,
                 options: ListenOptions) -> None:
        self.gateway = gateway
        self.settings = settings  # as started: listen, next_hop, TLS, hostname are these
        self.name = settings.name
        self.options = options
        self.hostname = settings.hostname or socket.gethostname()
        self.server: asyncio.Server | None = None
        self.active = 0
        self.processing = 0
        self.sessions: set[FilterSMTP] = set()
        #: (the config's listener tables, this listener's among them): :attr:`current`
        self._current: tuple[tuple[SmtpListenerSettings, ...], SmtpListenerSettings] | None = None
        self._tls = tls_context(settings, options.base_dir)
        hop = settings.relay_to
        self.pool = (Pool(hop[0], hop[1], settings.relay_timeout, self.hostname)
                     if hop else None)

    @property
    def current(self) -> SmtpListenerSettings:
        """This listener's table in the config in use now (``gateway.config``, looked up on
        every read, so a reload is followed); the start-up settings when a reload removed
        it (that takes a restart)."""
        tables = self.gateway.config.smtp_listeners
        cached = self._current
        if cached is not None and cached[0] is tables:  # the same tables: the same answer
            return cached[1]
        found = self.settings
        for settings in tables:
            if settings.name == self.name:
                found = settings
                break
        self._current = (tables, found)
        return found

    @property
    def port(self) -> int:
        """The bound port (useful with ``listen = "127.0.0.1:0"``)."""
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def describe(self) -> str:
        s = self.settings
        hop = "discard (verdict only)" if s.relay_to is None else s.next_hop
        tls = ", STARTTLS" if self._tls else ""
        return f"{s.name} {s.listen.host}:{self.port} -> {hop} ({s.mode}, {s.direction}{tls})"

    def _protocol(self) -> FilterSMTP:
        s = self.current
        return FilterSMTP(FilterHandler(self), self, data_size_limit=s.max_message_size,
                          hostname=self.hostname, ident="avgate", tls_context=self._tls,
                          timeout=s.idle_timeout, decode_data=False,
                          enable_SMTPUTF8=True, loop=asyncio.get_running_loop())

    async def start(self) -> None:
        sock = bind(self.settings.listen, what=f"smtp listener {self.name!r}",
                    options=self.options)
        try:
            self.server = await asyncio.get_running_loop().create_server(self._protocol,
                                                                         sock=sock)
        except BaseException:
            sock.close()
            raise

    async def aclose(self) -> None:
        """Stop accepting, let messages being scanned/relayed finish (at most the drain
        timeout), then hang up."""
        if self.server is not None:
            self.server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.drain_timeout
        while self.processing and loop.time() < deadline:  # noqa: ASYNC110 - bounded drain poll
            await asyncio.sleep(0.05)  # bounded drain poll
        for proto in list(self.sessions):
            if proto.transport is not None:
                proto.transport.close()
        await asyncio.sleep(0)
        if self.pool is not None:
            self.pool.close()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), timeout=1.0)


async def start(gateway: Gateway, options: ListenOptions) -> list[SMTPListener]:
    """Start one SMTP listener per ``[[smtp.listeners]]`` table (serve's entry point)."""
    started: list[SMTPListener] = []
    try:
        for settings in gateway.config.smtp_listeners:
            listener = SMTPListener(gateway, settings, options)
            await listener.start()
            started.append(listener)
    except BaseException:
        for listener in started:
            await listener.aclose()
        raise
    return started


__all__ = ["FilterHandler", "FilterSMTP", "SMTPListener", "SmtpListenerSettings", "start",
           "tls_context"]
