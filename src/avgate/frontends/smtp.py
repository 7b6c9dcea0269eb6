"""SMTP filter front-end: aiosmtpd in, a lean pooled SMTP client out, the Gateway between.

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

XFORWARD/XCLIENT: what a client says about itself is trusted only from the listener's
allow-lists, ``xforward_hosts`` and ``xclient_hosts`` (addresses or networks; default
loopback, 127.0.0.1 and ::1, where Postfix connects from), as Postfix's
``smtpd_authorized_xforward_hosts`` / ``smtpd_authorized_xclient_hosts``: they are
advertised in EHLO only to those clients, and anyone else gets
``550 5.7.0 Error: insufficient authorization`` — their attributes are neither used (policy
direction, scan log, quarantine) nor passed on. XFORWARD describes one transaction; XCLIENT
replaces the client for the rest of the session (a new greeting, then EHLO again; ``LOGIN``
counts as authenticated). The client's attributes — or, without them, avgate's own view of
the client — go to the next hop when it advertises XFORWARD (``xforward = true``, the
default), so the final MTA logs the real client. With ``xclient = true`` XCLIENT is sent
instead when the next hop offers it.

Per-session limits (a client must not make one session hold unbounded memory or last for
ever): ``max_recipients`` per transaction (1000, Postfix's ``smtpd_recipient_limit``;
``452 4.5.3``, the transaction goes on with the recipients accepted so far; after as many
again the refusals count as errors), ``max_junk_commands`` (100, Postfix's
``smtpd_junk_command_limit``: HELO/EHLO, NOOP, RSET, VRFY, HELP, XFORWARD, XCLIENT since the
last message), ``max_errors`` (20, Postfix's ``smtpd_hard_error_limit``: 4xx/5xx replies to
commands since the last message); past the last two the session ends with a 421. Command
lines are held to 512 bytes (MAIL: 548 with SIZE and SMTPUTF8) by aiosmtpd, DATA lines to
``max_line_length``, the message to ``max_message_size``, and ``max_connections`` (100)
concurrent sessions are served.

Reload and workers (``avgate serve``): the Gateway (scanner, policy, store, log) is read per
message through ``listener.gateway`` (serve's GatewayRef). Of a listener's own table,
``direction``, ``bare_lf``, ``xforward``, ``xclient``, the allow-lists and the per-session
limits follow a reload (:attr:`SMTPListener.live`); the listen address, ``next_hop``, TLS,
``hostname`` and the other limits (``max_message_size``, ``max_line_length``,
``max_connections``, ``idle_timeout``, ``relay_timeout``) are the listener's and need a
restart. With ``[serve] workers`` > 1 every worker binds the listen port with SO_REUSEPORT.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import ipaddress
import itertools
import logging
import os
import re
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AnyStr

from aiosmtpd.smtp import SMTP as _AioSMTP
from aiosmtpd.smtp import Envelope as _AioEnvelope
from aiosmtpd.smtp import Session as _AioSession
from aiosmtpd.smtp import syntax

from ..errors import ConfigError, SpoolError
from ..policy import Context, Disposition
from ..protocols.smtp import (
    DEFAULT_MAX_LINE_LENGTH,
    UNAVAILABLE,
    XCLIENT_ATTRS,
    XFORWARD_ATTRS,
    DataEncoder,
    DataReceiver,
    Reply,
    ehlo_keywords,
    encode_data,
    parse_reply,
    parse_xattrs,
    relay_mail_options,
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
DEFAULT_MAX_RECIPIENTS = 1000  # Postfix's smtpd_recipient_limit
DEFAULT_MAX_JUNK_COMMANDS = 100  # Postfix's smtpd_junk_command_limit
DEFAULT_MAX_ERRORS = 20  # Postfix's smtpd_hard_error_limit
DEFAULT_TRUSTED_HOSTS = ("127.0.0.1", "::1")  # xforward_hosts, xclient_hosts
DRAIN_TIMEOUT = 30.0

REPLY_NEXT_HOP_DOWN = "451 4.4.1 Next hop unavailable, try again later"
REPLY_NEXT_HOP_FAILED = "451 4.4.2 Next hop did not accept the message, try again later"
REPLY_TOO_MANY = "421 4.7.0 Too many connections, try again later"
REPLY_SPOOL_FAILED = "451 4.3.0 Cannot spool the message, try again later"
REPLY_INTERNAL = "451 4.3.0 Internal error, try again later"
REPLY_NO_TRANSACTION = "503 5.5.1 Error: need MAIL command"
REPLY_NOT_AUTHORIZED = "550 5.7.0 Error: insufficient authorization"  # Postfix's words
REPLY_TOO_MANY_RCPTS = "452 4.5.3 Error: too many recipients"
REPLY_TOO_MANY_COMMANDS = "421 4.7.0 Error: too many commands without a message, closing"
REPLY_TOO_MANY_ERRORS = "421 4.7.0 Error: too many errors, closing"

_session_ids = itertools.count(1)
#: Fields of a listener's table that follow a reload (the others need a restart).
RELOADABLE_SETTINGS = ("direction", "bare_lf", "xforward", "xclient", "xforward_hosts",
                       "xclient_hosts", "max_recipients", "max_junk_commands", "max_errors")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_PATH = re.compile(  # <dot-atom@domain>, then nothing or parameters (no comment)
    rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>[ \t]*((?:[^ \t(\r\n].*)?)\Z",
    re.DOTALL)


# -- settings -----------------------------------------------------------------------------
def parse_hostport(value: str, what: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"{what}: expected host:port, got {value!r}")
    return host.strip("[]"), int(port)


def parse_networks(value: Any, what: str) -> tuple[Network, ...]:
    """An allow-list: a list of addresses or networks (``"10.0.0.0/8"``, ``"::1"``)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(f"{what}: expected a list of addresses or networks")
    nets: list[Network] = []
    for item in items:
        try:
            nets.append(ipaddress.ip_network(str(item).strip("[]"), strict=False))
        except ValueError as exc:
            raise ConfigError(f"{what}: {item!r} is not an address or network") from exc
    return tuple(nets)


def trusted(addr: str, networks: tuple[Network, ...]) -> bool:
    """Whether a client address is in an allow-list (IPv4-mapped IPv6 counts as IPv4)."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def peer_addr(session: _AioSession | None) -> str:
    """The connected client's address ("" when unknown)."""
    peer = session.peer if session is not None else None
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


_DEFAULT_TRUSTED = parse_networks(list(DEFAULT_TRUSTED_HOSTS), "default")


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
    xforward_hosts: tuple[Network, ...] = _DEFAULT_TRUSTED
    xclient_hosts: tuple[Network, ...] = _DEFAULT_TRUSTED
    max_recipients: int = DEFAULT_MAX_RECIPIENTS
    max_junk_commands: int = DEFAULT_MAX_JUNK_COMMANDS
    max_errors: int = DEFAULT_MAX_ERRORS

    def trusts(self, addr: str, networks: tuple[Network, ...]) -> bool:
        """``addr`` is in ``networks`` (this listener's ``xforward_hosts`` or
        ``xclient_hosts``)."""
        return trusted(addr, networks)

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
            xforward_hosts=parse_networks(table.get("xforward_hosts", list(DEFAULT_TRUSTED_HOSTS)),
                                          f"{what} xforward_hosts"),
            xclient_hosts=parse_networks(table.get("xclient_hosts", list(DEFAULT_TRUSTED_HOSTS)),
                                         f"{what} xclient_hosts"),
            max_recipients=int(table.get("max_recipients", DEFAULT_MAX_RECIPIENTS)),
            max_junk_commands=int(table.get("max_junk_commands", DEFAULT_MAX_JUNK_COMMANDS)),
            max_errors=int(table.get("max_errors", DEFAULT_MAX_ERRORS)),
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


MAX_REPLY_SIZE = 64 * 1024  # a next-hop reply longer than this is a broken conversation
POOL_SIZE = 32  # idle next-hop connections kept per listener
POOL_IDLE = 10.0  # seconds an idle next-hop connection is kept
RELAY_CHUNK = 256 * 1024  # bytes read from a file spool per write to the next hop


class _HopProtocol(asyncio.Protocol):
    """Buffers what the next hop says; write flow control; no per-line stream machinery."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._drain: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def drain(self) -> None:
        if self._paused and not self.closed:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain
        if self.closed:
            raise ConnectionResetError("next hop closed the connection")

    async def reply(self) -> Reply:
        """The next complete reply (all its lines)."""
        while True:
            buf = self.buf
            pos = 0
            while True:
                nl = buf.find(b"\n", pos)
                if nl < 0:
                    break
                if nl - pos < 4 or buf[pos + 3] != 45:  # not "ddd-": the last line
                    raw = bytes(buf[:nl + 1])
                    del buf[:nl + 1]
                    return _parse_hop_reply(raw)
                pos = nl + 1
            if len(buf) > MAX_REPLY_SIZE:
                raise NextHopError("next hop reply too long")
            if self.closed:
                raise NextHopError("next hop closed the connection")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


def _parse_hop_reply(raw: bytes) -> Reply:
    text = raw.decode("utf-8", "replace")
    try:
        return parse_reply(text)
    except ValueError as exc:
        raise NextHopError(f"bad reply from next hop: {text[:100]!r}") from exc


class HopConnection:
    """One SMTP client connection to the next hop (lean client on asyncio.Protocol).

    Commands are written in groups with one ``write`` (RFC 2920 pipelining when the next hop
    offers it), replies are parsed from one buffer. aiosmtplib is not used on this path: it
    wants the whole message as one ``bytes`` (and copies it twice to normalise and stuff),
    cannot pipeline, and costs a task/timeout per command.
    """

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.proto = _HopProtocol()
        self.keywords: dict[str, str] = {}
        self.dirty = False  # a transaction may be open: RSET before the next one
        self.idle_handle: asyncio.TimerHandle | None = None

    @property
    def alive(self) -> bool:
        return not self.proto.closed and not self.proto.buf

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.keywords

    async def open(self, local_hostname: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                await loop.create_connection(lambda: self.proto, self.host, self.port)
                greeting = await self.proto.reply()
                if greeting.code != 220:
                    raise NextHopError(f"next hop greeting: {greeting.render()}")
                await self.ehlo(local_hostname)
        except (OSError, TimeoutError, NextHopError) as exc:
            self.abort()
            raise NextHopError(str(exc) or type(exc).__name__) from exc

    async def ehlo(self, local_hostname: str) -> None:
        reply = (await self.send([f"EHLO {local_hostname}".encode()]))[0]
        if reply.code == 250:
            self.keywords = ehlo_keywords(reply.text)
            return
        reply = (await self.send([f"HELO {local_hostname}".encode()]))[0]
        if reply.code != 250:
            raise NextHopError(f"next hop refused EHLO/HELO: {reply.render()}")
        self.keywords = {}

    async def send(self, lines: list[bytes], payload: bytes = b"") -> list[Reply]:
        """Write ``lines`` (one write: a pipelined group) and read one reply per line."""
        transport = self.proto.transport
        if transport is None or self.proto.closed:
            raise NextHopError("next hop connection closed")
        try:
            async with asyncio.timeout(self.timeout):
                transport.write(b"\r\n".join(lines) + b"\r\n" + payload if lines else payload)
                return [await self.proto.reply() for _ in lines or (b"",)]
        except (OSError, TimeoutError) as exc:
            self.abort()
            raise NextHopError(str(exc) or type(exc).__name__) from exc
        except (NextHopError, asyncio.CancelledError):
            self.abort()  # a reply may still be on its way: this connection is done
            raise

    async def command(self, line: bytes) -> Reply:
        return (await self.send([line]))[0]

    async def group(self, lines: list[bytes]) -> list[Reply]:
        """A command group: pipelined when offered, else one round trip per command."""
        if self.pipelining or len(lines) == 1:
            return await self.send(lines)
        return [await self.command(line) for line in lines]

    async def stream(self, pieces: Any) -> Reply:
        """Write the DATA content (already encoded, terminator included); its reply."""
        transport = self.proto.transport
        if transport is None or self.proto.closed:
            raise NextHopError("next hop connection closed")
        try:
            async with asyncio.timeout(self.timeout):
                for piece in pieces:
                    transport.write(piece)
                    await self.proto.drain()
                return await self.proto.reply()
        except (OSError, TimeoutError) as exc:
            self.abort()
            raise NextHopError(str(exc) or type(exc).__name__) from exc
        except (NextHopError, asyncio.CancelledError):
            self.abort()  # a reply may still be on its way: this connection is done
            raise

    def quit(self) -> None:
        """Say QUIT and hang up without waiting for the answer."""
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        transport = self.proto.transport
        if transport is not None and not self.proto.closed:
            with contextlib.suppress(Exception):
                transport.write(b"QUIT\r\n")
            transport.close()
        self.proto.closed = True

    def abort(self) -> None:
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        transport = self.proto.transport
        if transport is not None:
            transport.abort()
        self.proto.closed = True


class HopPool:
    """Idle next-hop connections of one listener, reused across client connections."""

    def __init__(self, host: str, port: int, timeout: float, local_hostname: str,
                 size: int = POOL_SIZE, idle: float = POOL_IDLE) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.local_hostname = local_hostname
        self.size, self.idle = size, idle
        self._idle: list[HopConnection] = []
        self.closed = False

    def take(self) -> HopConnection | None:
        """An idle connection that still looks usable, or None."""
        while self._idle:
            conn = self._idle.pop()
            if conn.idle_handle is not None:
                conn.idle_handle.cancel()
                conn.idle_handle = None
            if conn.alive:
                return conn
            conn.abort()
        return None

    async def new(self) -> HopConnection:
        conn = HopConnection(self.host, self.port, self.timeout)
        await conn.open(self.local_hostname)
        return conn

    def give_back(self, conn: HopConnection) -> None:
        if self.closed or not conn.alive or len(self._idle) >= self.size:
            conn.quit()
            return
        conn.idle_handle = asyncio.get_running_loop().call_later(self.idle, self._expire, conn)
        self._idle.append(conn)

    def _expire(self, conn: HopConnection) -> None:
        conn.idle_handle = None
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)
        conn.quit()

    def close(self) -> None:
        self.closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.quit()


class NextHop:
    """The next-hop side of one client connection: a pooled connection per transaction."""

    def __init__(self, pool: HopPool) -> None:
        self.pool = pool
        self.host, self.port = pool.host, pool.port
        self.conn: HopConnection | None = None
        self.in_transaction = False

    @property
    def keywords(self) -> dict[str, str]:
        assert self.conn is not None
        return self.conn.keywords

    async def mail(self, sender: str, options: list[str], attrs: dict[str, str], *,
                   xforward: bool, xclient: bool) -> Reply:
        """Start a transaction: (RSET,) client attributes and MAIL FROM, one group when the
        next hop pipelines. A pooled connection that turns out dead is replaced by a fresh
        one (nothing was accepted on it yet); a fresh one failing is NextHopError."""
        self.release()
        for attempt in (0, 1):
            conn = self.pool.take() if attempt == 0 else None
            fresh = conn is None
            if conn is None:
                conn = await self.pool.new()
            self.conn = conn
            try:
                return await self._begin(conn, sender, options, attrs, xforward=xforward,
                                         xclient=xclient)
            except NextHopError:
                self.conn = None
                conn.abort()
                if fresh:
                    raise
        raise NextHopError("unreachable")  # pragma: no cover

    async def _begin(self, conn: HopConnection, sender: str, options: list[str],
                     attrs: dict[str, str], *, xforward: bool, xclient: bool) -> Reply:
        lines: list[bytes] = []
        if conn.dirty:
            lines.append(b"RSET")
        kws = conn.keywords
        if xclient and "XCLIENT" in kws:
            if lines:
                rset = (await conn.group(lines))[0]
                if not rset.positive:
                    raise NextHopError(f"RSET refused: {rset.render()}")
                lines = []
            for line in xattr_commands("XCLIENT", _xclient_attrs(attrs), kws["XCLIENT"].split()):
                if (await conn.command(line.encode())).code == 220:
                    await conn.ehlo(self.pool.local_hostname)  # XCLIENT answers with a greeting
            kws = conn.keywords
        elif xforward and "XFORWARD" in kws:
            lines += [x.encode() for x in xattr_commands("XFORWARD", attrs,
                                                         kws["XFORWARD"].split())]
        opts = relay_mail_options(options, kws)
        lines.append(b" ".join([b"MAIL FROM:" + _path(sender).encode("utf-8", "surrogateescape"),
                                *(o.encode() for o in opts)]))
        replies = await conn.group(lines)
        if conn.dirty:
            if not replies[0].positive:
                raise NextHopError(f"RSET refused: {replies[0].render()}")
            conn.dirty = False
        reply = replies[-1]  # XFORWARD refusals only lose log detail
        self.in_transaction = reply.positive
        conn.dirty = reply.positive
        return reply

    async def rcpt(self, recipient: str) -> Reply:
        conn = self.conn
        if conn is None:
            raise NextHopError("no next-hop connection")
        try:
            return await conn.command(b"RCPT TO:" + _path(recipient).encode(
                "utf-8", "surrogateescape"))
        except NextHopError:
            self.conn, self.in_transaction = None, False
            raise

    async def data(self, copy_to: tuple[str, ...], pieces: Any) -> tuple[list[Reply], Reply]:
        """Extra recipients and DATA (one group), then the content; (rcpt replies, reply).
        A reply other than 354 to DATA is returned as the reply (nothing was sent)."""
        conn = self.conn
        if conn is None:
            raise NextHopError("no next-hop connection")
        self.in_transaction = False
        try:
            lines = [b"RCPT TO:" + _path(x).encode("utf-8", "surrogateescape") for x in copy_to]
            replies = await conn.group([*lines, b"DATA"])
            go = replies[-1]
            if go.code != 354:
                self.release()  # still dirty: RSET before the next transaction
                return replies[:-1], go
            reply = await conn.stream(pieces)
        except NextHopError:
            self.conn = None
            raise
        conn.dirty = False  # the DATA reply ended the transaction, whatever it said
        self.release()
        return replies[:-1], reply

    def release(self) -> None:
        """End this client's use of the connection (an open transaction is RSET lazily)."""
        conn, self.conn = self.conn, None
        self.in_transaction = False
        if conn is not None:
            self.pool.give_back(conn)

    async def close(self) -> None:
        self.release()


def _xclient_attrs(attrs: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in attrs.items() if k in XCLIENT_ATTRS}


# -- the aiosmtpd side ------------------------------------------------------------------------
class FilterSMTP(_AioSMTP):
    """aiosmtpd's SMTP with DATA streamed into a Spool, XFORWARD/XCLIENT from trusted
    clients, a connection limit and per-session limits (recipients, junk commands, errors).

    The StreamReader's limit (aiosmtpd's ``line_length_limit``) is raised so that DATA is read
    in large pieces (``readuntil`` of the rest of the end-of-data marker, see
    :attr:`DataReceiver.separator`); command lines are still held to aiosmtpd's
    ``command_size_limit`` (500 reply), DATA lines to ``max_line_length``. The idle timer is
    one timer per connection that is re-armed lazily: a command or received DATA bytes only
    move a deadline, instead of a cancel and a new ``call_later`` per line.

    aiosmtpd keeps its per-command line limits in one dict shared by every connection and
    raises MAIL's by 36 bytes at each EHLO (unbounded: a client could lengthen MAIL lines
    for everyone by repeating EHLO): here each session has its own, computed afresh at each
    EHLO.
    """

    line_length_limit = 64 * 1024

    def __init__(self, handler: FilterHandler, listener: SMTPListener, **kw: Any) -> None:
        self.listener = listener
        self.filter = handler
        self._deadline = 0.0
        self._busy = False  # scanning/relaying: the idle timer must not cut the connection
        self._in_data = False
        self._junk = 0  # junk commands since the last message
        self._errors = 0  # error replies since the last message
        self._overshoot = 0  # RCPTs refused for the recipient limit in this transaction
        self._count_errors = True
        self._warned = False
        self.command_size_limits = collections.defaultdict(lambda: _AioSMTP.command_size_limit)
        super().__init__(handler, **kw)

    # per-session limits ------------------------------------------------------------------------
    async def push(self, status: AnyStr) -> None:
        """Every reply; error replies to commands are counted (``max_errors``)."""
        first = status[:1]
        if self._count_errors and first in ("4", "5", b"4", b"5") and status[:3] not in (
                "421", b"421"):
            self._errors += 1
            if self._errors > self.listener.live.max_errors:
                log.warning("%s: %s: too many errors, closing", self.listener.settings.name,
                            peer_addr(self.session))
                await self._hangup(REPLY_TOO_MANY_ERRORS)
                return
        await super().push(status)

    async def _hangup(self, reply: str) -> None:
        await _AioSMTP.push(self, reply)
        if self.transport is not None:
            self.transport.close()

    async def _junk_command(self) -> bool:
        """Count a command that does not move a message forward; True: the session is over."""
        self._junk += 1
        if self._junk <= self.listener.live.max_junk_commands:
            return False
        log.warning("%s: %s: too many commands without a message, closing",
                    self.listener.settings.name, peer_addr(self.session))
        await self._hangup(REPLY_TOO_MANY_COMMANDS)
        return True

    def _refused(self, command: str, key: str) -> None:
        """Log an unauthorised XFORWARD/XCLIENT once per session (a misconfigured upstream
        shows up; a client repeating it does not flood the log)."""
        if not self._warned:
            self._warned = True
            log.warning("%s: %s refused from %s (not in %s)", self.listener.settings.name,
                        command, peer_addr(self.session), key)

    def _message_done(self) -> None:
        """A message was transferred (whatever its outcome): the session limits start over."""
        self._junk = self._errors = 0

    def _set_post_data_state(self) -> None:
        self._overshoot = 0  # a new transaction
        super()._set_post_data_state()  # type: ignore[no-untyped-call]

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if not await self._junk_command():
            await super().smtp_HELO(hostname)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if await self._junk_command():
            return
        self.command_size_limits.pop("MAIL", None)  # SIZE/SMTPUTF8 are added afresh
        await super().smtp_EHLO(hostname)

    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str) -> None:
        if not await self._junk_command():
            await super().smtp_NOOP(arg)

    @syntax("RSET")
    async def smtp_RSET(self, arg: str) -> None:
        if not await self._junk_command():
            await super().smtp_RSET(arg)

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:
        if not await self._junk_command():
            await super().smtp_VRFY(arg)

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str) -> None:
        if not await self._junk_command():
            await super().smtp_HELP(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        envelope = self.envelope
        limit = self.listener.live.max_recipients
        if envelope is not None and envelope.mail_from and len(envelope.rcpt_tos) >= limit:
            # RFC 5321 4.5.3.1.10: 452, the client sends the rest in another transaction.
            # Pipelining clients may send many more: those are free up to as many again.
            self._overshoot += 1
            if self._overshoot > limit:
                await self.push(REPLY_TOO_MANY_RCPTS)
            else:
                await _AioSMTP.push(self, REPLY_TOO_MANY_RCPTS)
            return
        await super().smtp_RCPT(arg)

    def _reset_timeout(self, duration: float | None = None) -> None:
        loop = self.loop
        self._deadline = loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = loop.call_at(self._deadline, self._timeout_check)

    def _timeout_check(self) -> None:
        now = self.loop.time()
        if self._busy or now < self._deadline:
            when = now + self._timeout_duration if self._busy else self._deadline
            self._timeout_handle = self.loop.call_at(when, self._timeout_check)
            return
        self._timeout_cb()  # type: ignore[no-untyped-call]

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parser, with a fast path for a plain ``<dot-atom@domain>``
        (aiosmtpd's builds a typing.Protocol class and runs the RFC 5322 header parser per
        call); anything else goes to aiosmtpd's parser. Same results."""
        m = _PLAIN_PATH.match(arg)
        if m is not None and not self.local_part_limit:
            return m.group(1), m.group(2)
        return super()._getaddr(arg)

    def data_received(self, data: bytes) -> None:
        if self._in_data:  # the client is sending: that is activity
            self._deadline = self.loop.time() + self._timeout_duration
        super().data_received(data)

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
        """XFORWARD (Postfix): a trusted upstream MTA tells us who its client was."""
        if await self._junk_command():
            return
        settings = self.listener.live
        if not settings.xforward:
            await self.push('502 5.5.1 Error: command "XFORWARD" not implemented')
            return
        if not trusted(peer_addr(self.session), settings.xforward_hosts):
            self._refused("XFORWARD", "xforward_hosts")
            await self.push(REPLY_NOT_AUTHORIZED)
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

    async def smtp_XCLIENT(self, arg: str | None) -> None:
        """XCLIENT (Postfix): a trusted proxy replaces the client for the rest of the
        session; answered with a new greeting, after which the client says EHLO again."""
        if await self._junk_command():
            return
        settings = self.listener.live
        if not trusted(peer_addr(self.session), settings.xclient_hosts):
            self._refused("XCLIENT", "xclient_hosts")
            await self.push(REPLY_NOT_AUTHORIZED)
            return
        assert self.envelope is not None and self.session is not None
        if self.envelope.mail_from:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        try:
            attrs = parse_xattrs(arg or "", XCLIENT_ATTRS)
        except ValueError as exc:
            await self.push(f"501 5.5.4 Syntax: XCLIENT attribute=value... ({exc})")
            return
        self.filter.xclient.update(attrs)
        self.filter.xforward = {}
        await self.filter.abort()
        self._set_rset_state()  # type: ignore[no-untyped-call]
        self.session.host_name = None
        self.session.extended_smtp = False
        await self.push(f"220 {self.hostname} {self.__ident__}")

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
        settings = self.listener.live
        receiver = DataReceiver(max_size=settings.max_message_size,
                                max_line_length=settings.max_line_length,
                                bare_lf=settings.bare_lf)
        spool = self.listener.gateway.new_spool()
        spool_failed = False
        reader = self._reader
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            self._in_data = True
            while not receiver.done:
                # up to the rest of the end-of-data marker: never past it, so pipelined
                # commands after the data stay in the reader
                sep = receiver.separator
                try:
                    if sep is None:
                        chunk = await reader.readexactly(1)
                    else:
                        chunk = await reader.readuntil(sep)
                except asyncio.LimitOverrunError as exc:
                    # no marker within the limit: take what cannot be part of one
                    chunk = await reader.read(exc.consumed)
                except asyncio.IncompleteReadError:
                    return  # client went away mid-DATA: nothing is relayed
                content = receiver.feed(chunk)
                if content and not spool_failed:
                    try:
                        spool.write(content)
                    except SpoolError as exc:
                        log.error("%s: %s", settings.name, exc)
                        spool_failed = True
            self._in_data = False
            self._reset_timeout()
            self._message_done()
            problem = receiver.problem
            if problem is not None or spool_failed:
                await self.filter.abort()
                self._set_post_data_state()
                await self._data_reply(problem.reply if problem is not None
                                       else REPLY_SPOOL_FAILED)
                return
            # Scanning and relaying have their own timeouts: the idle timer must not cut
            # the connection while the client waits for our answer.
            self._busy = True
            self.listener.processing += 1
            try:
                reply = await self.filter.deliver(self.session, self.envelope, spool)
            except Exception:
                log.exception("%s: delivery failed", settings.name)
                await self.filter.abort()
                reply = REPLY_INTERNAL
            finally:
                self.listener.processing -= 1
                self._busy = False
                self._reset_timeout()
            self._set_post_data_state()
            await self._data_reply(reply)
        finally:
            self._in_data = False
            spool.close()

    async def _data_reply(self, reply: str) -> None:
        """The answer to a transferred message: never counted as a command error."""
        self._count_errors = False
        try:
            await self.push(reply)
        finally:
            self._count_errors = True


class FilterHandler:
    """Per-connection aiosmtpd handler: envelope forwarding and the DATA outcome."""

    def __init__(self, listener: SMTPListener) -> None:
        self.listener = listener
        self.gateway = listener.gateway
        self.session_id = f"{listener.settings.name}-{os.getpid()}-{next(_session_ids)}"
        self.xforward: dict[str, str] = {}  # from a trusted upstream, for one transaction
        self.xclient: dict[str, str] = {}  # from a trusted proxy, for the session
        self.next_hop = NextHop(listener.pool) if listener.pool is not None else None

    @property
    def settings(self) -> ListenerSettings:
        """The listener's settings as of the current config (reloadable fields followed)."""
        return self.listener.live

    # aiosmtpd hooks --------------------------------------------------------------------------
    async def handle_EHLO(self, server: FilterSMTP, session: _AioSession, envelope: _AioEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        # we take no AUTH (aiosmtpd offers it after STARTTLS); advertise XFORWARD/XCLIENT
        # instead, to the clients allowed to use them
        out = [r for r in responses if not r[4:].upper().startswith("AUTH")]
        settings = self.settings
        addr = peer_addr(session)
        if settings.xforward and trusted(addr, settings.xforward_hosts):
            out.insert(len(out) - 1, "250-XFORWARD " + " ".join(XFORWARD_ATTRS))
        if trusted(addr, settings.xclient_hosts):
            out.insert(len(out) - 1, "250-XCLIENT " + " ".join(XCLIENT_ATTRS))
        await self.abort()
        return out

    async def handle_MAIL(self, server: FilterSMTP, session: _AioSession,
                          envelope: _AioEnvelope, address: str, options: list[str]) -> str:
        if self.next_hop is None:
            envelope.mail_from = address
            envelope.mail_options.extend(options)
            return "250 2.1.0 Ok"
        settings = self.settings
        try:
            reply = await self.next_hop.mail(address, options, self._client_attrs(session),
                                             xforward=settings.xforward,
                                             xclient=settings.xclient)
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
        await self.abort()
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
        client_addr = "" if client_addr in (UNAVAILABLE, "[TEMPUNAVAIL]") else client_addr
        if client_addr[:5].upper() == "IPV6:":  # Postfix's form of an IPv6 address
            client_addr = client_addr[5:]
        login = self.xclient.get("LOGIN", "")
        authenticated = bool(session.authenticated) or bool(login and not login.startswith("["))
        sender = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
        recipients = tuple(envelope.rcpt_tos)
        settings = self.settings  # the direction follows a reload, like the policy
        ctx = Context(
            frontend="smtp", listener=settings.name,
            direction=self.gateway.policy.direction_for(settings.direction, client_addr,
                                                        authenticated),
            sender=sender, recipients=recipients, client_addr=client_addr,
            authenticated=authenticated, size=spool.size)
        env = Envelope(sender=sender, recipients=recipients, client_addr=client_addr,
                       helo=attrs.get("HELO", session.host_name or ""),
                       listener=settings.name)
        policy = self.gateway.policy  # one policy for the decision and the header names
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
        # incoming copies of every header we may write go: ours are the only verdict
        return await self._relay(_wire_pieces(spool, decision, outcome.result,
                                              policy.own_header_names()),
                                 decision.copy_to)

    async def _relay(self, pieces: Any, copy_to: tuple[str, ...]) -> str:
        hop = self.next_hop
        assert hop is not None
        if not hop.in_transaction:
            return REPLY_NEXT_HOP_FAILED
        try:
            refused, reply = await hop.data(copy_to, pieces)
            for extra, r in zip(copy_to, refused, strict=False):
                if not r.positive:
                    log.warning("%s: copy_to %s refused by next hop: %d %s", self.settings.name,
                                extra, r.code, r.text)
        except NextHopError as exc:
            log.warning("%s: next hop failed during DATA: %s", self.settings.name, exc)
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

    async def aclose(self) -> None:
        if self.next_hop is not None:
            await self.next_hop.close()


def _wire_pieces(spool: Spool, decision: Any, result: Any,
                 remove: frozenset[str] = frozenset()) -> Iterator[bytes]:
    """The DATA content for the next hop, encoded (dot-stuffed, terminator), in pieces.

    Incoming header fields named in ``remove`` (the policy's own header names) are left
    out. The common case (verdict headers only) never holds the message twice: the headers
    are encoded, then the spool follows through a :class:`~avgate.mailedit.HeaderFilter`
    (which reads the header block only; one piece when the spool is in memory, file chunks
    otherwise). Subject prefixes and part replacement edit the message in memory
    (:func:`~avgate.mailedit.edit_message`), as before.
    """
    from ..mailedit import HeaderFilter, add_headers, edit_message

    if decision.subject_prefix or decision.replace:
        yield encode_data(edit_message(spool.getvalue(), decision, result, remove))
        return
    encoder = DataEncoder()
    strip = HeaderFilter(remove)
    head = b""
    if decision.headers:
        head = encoder.feed(add_headers(b"\r\n", decision.headers)[:-2])
    if spool.in_memory:
        data = strip.feed(spool.getvalue())
        yield head + encoder.feed(data + strip.finish()) + encoder.finish()
        return
    if head:
        yield head
    with spool.open() as f:
        while chunk := f.read(RELAY_CHUNK):
            yield encoder.feed(strip.feed(chunk))
    yield encoder.feed(strip.finish()) + encoder.finish()


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
        hop = settings.next_hop
        self.pool = (HopPool(hop[0], hop[1], settings.relay_timeout, settings.hostname)
                     if hop else None)
        # ``settings`` was made from the config in use now: derived again after a reload
        self._live_config: Any = getattr(gateway, "config", None)
        self._live = settings

    @property
    def live(self) -> ListenerSettings:
        """:attr:`settings` with the fields that follow a reload taken from the current
        config (``gateway.config``; derived once per config object)."""
        cfg = getattr(self.gateway, "config", None)
        if cfg is not self._live_config and cfg is not None:
            self._live = self._settings_for(cfg)
            self._live_config = cfg
        return self._live

    def _settings_for(self, cfg: Any) -> ListenerSettings:
        name = self.settings.name
        table = next((t for t in getattr(cfg, "smtp_listeners", ())
                      if str(t.get("name", "smtp")) == name), None)
        if table is None:  # not in this config (a reload removed it: that needs a restart)
            return self._live
        try:
            new = ListenerSettings.from_table(dict(table), cfg.base_dir)
        except ConfigError as exc:
            log.warning("%s: keeping the previous settings: %s", name, exc)
            return self._live
        return dataclasses.replace(self.settings,
                                   **{f: getattr(new, f) for f in RELOADABLE_SETTINGS})

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
        from ..serve import reuse_port

        loop = asyncio.get_running_loop()
        cfg = getattr(self.gateway, "config", None)
        shared = cfg is not None and reuse_port(cfg)  # several `serve` workers share the port
        try:
            self.server = await loop.create_server(self._protocol, self.settings.host,
                                                   self.settings.port, reuse_port=shared)
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
        if self.pool is not None:
            self.pool.close()
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


__all__ = ["FilterHandler", "FilterSMTP", "HopConnection", "HopPool", "ListenerSettings",
           "NextHop", "SMTPListener",
           "parse_hostport", "start"]
