"""SMTP client: the pipelined, pooled next-hop client, and one-shot sends.

Built on the sans-IO :mod:`avgate.protocols.smtp` (replies, commands, DATA encoding); this
module only moves bytes. Two users:

* the SMTP filter (:mod:`avgate.frontends.smtp`): a :class:`Pool` per listener and a
  :class:`NextHop` per client connection, which forwards MAIL/RCPT as the client sends them
  and streams the scanned message (before-queue proxy semantics);
* quarantine release and FP/FN reports (:mod:`avgate.quarantine.release`): :func:`send`, one
  transaction on a fresh connection.

Commands are written in groups with one ``write`` (RFC 2920 pipelining when the server
offers it) and replies are parsed from one buffer (:func:`~avgate.protocols.smtp.take_reply`).
aiosmtplib is not used: it wants the whole message as one ``bytes`` (and copies it twice to
normalise and stuff), cannot pipeline, and costs a task and a timeout per command — measured
4.1 → 1.3 ms CPU per relayed message. Every failure to reach the server or to follow the
conversation is :class:`NextHopError`; a refusal is a :class:`~avgate.protocols.smtp.Reply`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import cast

from .deadline import Deadline
from .frontends.listen import parse_listen
from .protocols.smtp import (
    XCLIENT_ATTRS,
    Reply,
    ehlo_keywords,
    encode_data,
    mail_command,
    rcpt_command,
    relay_mail_options,
    take_reply,
    xattr_commands,
)

POOL_SIZE = 32  # idle next-hop connections kept per listener
POOL_IDLE = 10.0  # seconds an idle next-hop connection is kept


class NextHopError(Exception):
    """The server could not be reached or broke the conversation."""


def parse_next_hop(value: str, default_port: int | None = 25) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); with a ``default_port`` a bare ``host``
    (or IPv6 address) is accepted too. ``ValueError`` says what is wrong."""
    text = value.strip()
    if default_port is not None:
        if text.count(":") > 1 and not text.startswith("["):
            text = f"[{text}]"  # a bare IPv6 address
        if ":" not in text or text.endswith("]"):
            text = f"{text}:{default_port}"
    try:
        address = parse_listen(text, "next_hop")
    except ValueError:
        address = None
    if address is None or address.is_unix or text.startswith(("inet:", "inet6:")):
        raise ValueError(f"expected host:port, got {value!r}")
    return address.host, address.port


class _ReplyProtocol(asyncio.Protocol):
    """Buffers what the server says; write flow control; no per-line stream machinery."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._drain: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (asyncio's or uvloop's, which does not subclass asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)

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

    def expire(self) -> None:
        """The exchange timed out (the transport is aborted): whoever waits wakes now."""
        self.closed = True
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def wait(self) -> None:
        """Until more bytes arrive or the connection ends."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def drain(self) -> None:
        if self._paused and not self.closed:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain
        if self.closed:
            raise ConnectionResetError("next hop closed the connection")

    def take(self) -> Reply | None:
        """The next complete reply (all its lines) if it is here, else None."""
        try:
            reply = take_reply(self.buf)
        except ValueError as exc:
            raise NextHopError(f"next hop: {exc}") from None
        if reply is None and self.closed:
            raise NextHopError("next hop closed the connection")
        return reply

    async def reply(self) -> Reply:
        """The next complete reply (all its lines)."""
        while (reply := self.take()) is None:
            await self.wait()
        return reply


class Connection:
    """One SMTP client connection: greeting and EHLO, then command groups and DATA."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.proto = _ReplyProtocol()
        self.keywords: dict[str, str] = {}
        self.dirty = False  # a transaction may be open: RSET before the next one
        self.idle_handle: asyncio.TimerHandle | None = None
        # the exchange timeout: one Deadline moved by each send() (an asyncio.timeout per
        # exchange, four per relayed message, cost ~4 % of the SMTP front-end's CPU); at the
        # deadline the connection is aborted
        self._deadline: Deadline | None = None  # made by the first send (it needs the loop)
        self._expired = False

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
        reply = await self.command(f"EHLO {local_hostname}".encode())
        if reply.code == 250:
            self.keywords = ehlo_keywords(reply.text)
            return
        reply = await self.command(f"HELO {local_hostname}".encode())
        if reply.code != 250:
            raise NextHopError(f"next hop refused EHLO/HELO: {reply.render()}")
        self.keywords = {}

    async def send(self, lines: list[bytes], payload: Iterable[bytes] = ()) -> list[Reply]:
        """Write ``lines`` (one write: a pipelined group), or else the ``payload`` pieces
        (DATA content, encoded) with write flow control; one reply per line, or one for the
        payload. A failure ends the connection: a reply may still be on its way."""
        transport = self.proto.transport
        if transport is None or self.proto.closed:
            raise NextHopError("next hop connection closed")
        loop = asyncio.get_running_loop()
        deadline = self._deadline
        if deadline is None:
            deadline = self._deadline = Deadline(loop, self._timed_out)
        deadline.set(loop.time() + self.timeout)
        proto = self.proto
        try:
            if lines:
                transport.write(b"\r\n".join(lines) + b"\r\n")
            for piece in payload:
                transport.write(piece)
                if proto._paused or proto.closed:  # else drain() has nothing to do
                    await proto.drain()
            replies = []
            for _ in lines or (b"",):  # proto.reply(), without two coroutines per reply
                while (reply := proto.take()) is None:
                    proto._waiter = waiter = loop.create_future()
                    try:
                        await waiter
                    finally:
                        proto._waiter = None
                replies.append(reply)
            return replies
        except (OSError, NextHopError) as exc:
            self.abort()
            if self._expired:
                raise NextHopError("TimeoutError") from exc
            if isinstance(exc, NextHopError):
                raise
            raise NextHopError(str(exc) or type(exc).__name__) from exc
        except asyncio.CancelledError:
            self.abort()
            raise
        finally:
            deadline.clear()

    def _timed_out(self) -> None:
        # the exchange took too long: the waiting send() gets NextHopError("TimeoutError")
        self._expired = True
        self.abort()
        self.proto.expire()

    async def command(self, line: bytes) -> Reply:
        return (await self.send([line]))[0]

    async def group(self, lines: list[bytes]) -> list[Reply]:
        """A command group: pipelined when offered, else one round trip per command."""
        if self.pipelining or len(lines) == 1:
            return await self.send(lines)
        return [await self.command(line) for line in lines]

    async def stream(self, pieces: Iterable[bytes]) -> Reply:
        """Write the DATA content (already encoded, terminator included); its reply."""
        return (await self.send([], pieces))[0]

    def _stop_idle(self) -> None:
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None

    def _stop_watch(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()

    def quit(self) -> None:
        """Say QUIT and hang up without waiting for the answer."""
        self._stop_idle()
        self._stop_watch()
        transport = self.proto.transport
        if transport is not None and not self.proto.closed:
            with contextlib.suppress(Exception):
                transport.write(b"QUIT\r\n")
            transport.close()
        self.proto.closed = True

    def abort(self) -> None:
        self._stop_idle()
        self._stop_watch()
        transport = self.proto.transport
        if transport is not None:
            transport.abort()
        self.proto.closed = True


class Pool:
    """Idle connections to one server, reused across client connections."""

    def __init__(self, host: str, port: int, timeout: float, local_hostname: str,
                 size: int = POOL_SIZE, idle: float = POOL_IDLE) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.local_hostname = local_hostname
        self.size, self.idle = size, idle
        self._idle: list[Connection] = []
        self.closed = False

    def take(self) -> Connection | None:
        """An idle connection that still looks usable, or None."""
        while self._idle:
            conn = self._idle.pop()
            conn._stop_idle()
            if conn.alive:
                return conn
            conn.abort()
        return None

    async def new(self) -> Connection:
        conn = Connection(self.host, self.port, self.timeout)
        await conn.open(self.local_hostname)
        return conn

    def give_back(self, conn: Connection) -> None:
        if self.closed or not conn.alive or len(self._idle) >= self.size:
            conn.quit()
            return
        conn.idle_handle = asyncio.get_running_loop().call_later(self.idle, self._expire, conn)
        self._idle.append(conn)

    def _expire(self, conn: Connection) -> None:
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

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.host, self.port = pool.host, pool.port
        self.conn: Connection | None = None
        self.in_transaction = False

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

    async def _begin(self, conn: Connection, sender: str, options: list[str],
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
        lines.append(mail_command(sender, relay_mail_options(options, kws)))
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
            return await conn.command(rcpt_command(recipient))
        except NextHopError:
            self.conn, self.in_transaction = None, False
            raise

    async def data(self, copy_to: tuple[str, ...], pieces: Iterable[bytes]
                   ) -> tuple[list[Reply], Reply]:
        """Extra recipients and DATA (one group), then the content; (rcpt replies, reply).
        A reply other than 354 to DATA is returned as the reply (nothing was sent)."""
        conn = self.conn
        if conn is None:
            raise NextHopError("no next-hop connection")
        self.in_transaction = False
        try:
            lines = [*map(rcpt_command, copy_to), b"DATA"]
            replies = await conn.group(lines)
            go = replies[-1]
            if go.code != 354:
                self.release()  # still dirty: RSET before the next transaction
                return replies[:-1], go
            reply = (await conn.send([], pieces))[0]
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


def _xclient_attrs(attrs: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in attrs.items() if k in XCLIENT_ATTRS}


async def send(host: str, port: int, sender: str, recipients: Sequence[str], message: bytes,
               *, timeout: float,  # noqa: ASYNC109 - per exchange, as Connection's
               local_hostname: str | None = None) -> dict[str, Reply]:
    """One transaction on a fresh connection: the refused recipients (the others got the
    message). ``NextHopError`` when the server cannot be reached, refuses the sender, every
    recipient or the message, or needs SMTPUTF8 for a non-ASCII address it does not offer.

    The message is sent as given (line endings normalised, dot-stuffed); MAIL FROM carries
    SIZE, and SMTPUTF8 when an address needs it.
    """
    if not recipients:
        raise NextHopError("no recipients to send to")
    conn = Connection(host, port, timeout)
    await conn.open(local_hostname or socket.gethostname())
    try:
        utf8 = not all(a.isascii() for a in (sender, *recipients))
        if utf8 and "SMTPUTF8" not in conn.keywords:
            raise NextHopError("a non-ASCII address needs SMTPUTF8, which the server does "
                               "not offer")
        wire = encode_data(message)
        options = relay_mail_options(["SMTPUTF8"] if utf8 else [], conn.keywords,
                                     size=len(wire))
        replies = await conn.group([mail_command(sender, options),
                                    *map(rcpt_command, recipients)])
        if not replies[0].positive:
            raise NextHopError(f"sender refused: {replies[0].render()}")
        refused = {r: reply for r, reply in zip(recipients, replies[1:], strict=True)
                   if not reply.positive}
        if len(refused) == len(recipients):
            raise NextHopError("recipients refused: " + describe_refused(refused))
        go = await conn.command(b"DATA")
        if go.code != 354:
            raise NextHopError(f"DATA refused: {go.render()}")
        reply = await conn.stream((wire,))
        if reply.code != 250:
            raise NextHopError(f"message refused: {reply.render()}")
        return refused
    finally:
        conn.quit()


def describe_refused(refused: Mapping[str, Reply]) -> str:
    """``rcpt (code text), ...`` for an error message."""
    return ", ".join(f"{r} ({reply.code} {reply.text})" for r, reply in refused.items())


__all__ = ["POOL_IDLE", "POOL_SIZE", "Connection", "NextHop", "NextHopError", "Pool",
           "describe_refused", "parse_next_hop", "send"]
