"""The proxy's client side: one HTTP/1.1 connection to an origin server or a parent proxy,
framed by h11 (``h11.CLIENT``), with the connect and read timeouts of ``[http_proxy]``.

Errors are :class:`UpstreamError` with the HTTP status the client gets: 502 (refused,
reset, unparseable answer) or 504 (a timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import h11

from ...limits import KiB

__all__ = ["Upstream", "UpstreamError"]

READ_SIZE = 64 * KiB
#: the most an upstream response head may take (h11's incomplete-event bound)
MAX_RESPONSE_HEAD = 256 * KiB


class UpstreamError(Exception):
    """The upstream server failed; ``status`` is 502 or 504."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Upstream:
    """One connection to ``host:port`` (an origin, or the parent proxy)."""

    def __init__(self, host: str, port: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, read_timeout: float) -> None:
        self.key = (host, port)
        self.reader = reader
        self.writer = writer
        self.read_timeout = read_timeout
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        #: when the upstream last made progress (read a request, sent a byte): the read
        #: timeout counts from here, across next_event_until's wake-ups
        self.progress = time.monotonic()

    @classmethod
    async def open(cls, host: str, port: int, *, connect_timeout: float,
                   read_timeout: float) -> Upstream:
        try:
            async with asyncio.timeout(connect_timeout):
                reader, writer = await asyncio.open_connection(host, port, limit=READ_SIZE)
        except TimeoutError:
            raise UpstreamError(504, f"connecting to {host}:{port} timed out "
                                     f"after {connect_timeout:g} s") from None
        except socket.gaierror as exc:
            raise UpstreamError(502, f"cannot resolve {host}: {exc.strerror}") from None
        except OSError as exc:
            raise UpstreamError(502, f"cannot connect to {host}:{port}: "
                                     f"{exc.strerror or exc}") from None
        return cls(host, port, reader, writer, read_timeout)

    @property
    def reusable(self) -> bool:
        """The last exchange is complete and both ends keep the connection alive."""
        return (self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE
                and not self.writer.is_closing() and not self.reader.at_eof())

    def send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            self.writer.write(data)

    async def drain(self) -> None:
        try:
            async with asyncio.timeout(self.read_timeout):
                await self.writer.drain()
            self.progress = time.monotonic()
        except TimeoutError:
            raise UpstreamError(504, "upstream did not read the request within "
                                     f"{self.read_timeout:g} s") from None
        except OSError as exc:
            raise UpstreamError(502, f"upstream closed: {exc.strerror or exc}") from None

    async def next_event(self) -> h11.Event:
        """The next event of the response; ``UpstreamError`` on a timeout (``read_timeout``
        without a byte), a reset or an answer h11 cannot parse."""
        event = await self.next_event_until(None)
        assert event is not None
        return event

    async def next_event_until(self, until: float | None) -> h11.Event | None:
        """:meth:`next_event`, or None once ``time.monotonic()`` reaches ``until`` first
        (the read timeout counts from the upstream's last progress, whatever the wake-ups)."""
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamError(502, f"bad answer from upstream: {exc}") from None
            if event is not h11.NEED_DATA:
                assert isinstance(event, h11.Event)
                return event
            now = time.monotonic()
            if until is not None and now >= until:
                return None
            stall = self.progress + self.read_timeout
            try:
                async with asyncio.timeout(max(0.0, (stall if until is None
                                                     else min(stall, until)) - now)):
                    data = await self.reader.read(READ_SIZE)
            except TimeoutError:
                if until is not None and time.monotonic() < stall:
                    return None
                raise UpstreamError(504, "no data from upstream within "
                                         f"{self.read_timeout:g} s") from None
            except OSError as exc:
                raise UpstreamError(502, f"upstream connection failed: "
                                         f"{exc.strerror or exc}") from None
            self.progress = time.monotonic()
            self.conn.receive_data(data)

    def next_cycle(self) -> bool:
        """Ready the connection for another request; False if it cannot be reused."""
        if not self.reusable:
            return False
        try:
            self.conn.start_next_cycle()
        except h11.LocalProtocolError:
            return False
        return True

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 2)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.transport.abort()


class Pool:
    """Idle kept-alive upstream connections shared by all clients of one listener, keyed by
    (host, port): at most ``per_key`` idle per key and ``total`` in all (the oldest go
    first), each closed after ``idle`` seconds unused (origins close idle connections too;
    a stale one costs one retry on a fresh connection)."""

    def __init__(self, per_key: int = 8, total: int = 256, idle: float = 30.0) -> None:
        self.per_key = per_key
        self.total = total
        self.idle = idle
        self._idle: dict[tuple[str, int], list[tuple[float, Upstream]]] = {}
        self._swept = time.monotonic()

    def get(self, host: str, port: int) -> Upstream | None:
        """An idle connection to ``host:port`` ready for a request, or None."""
        conns = self._idle.get((host, port))
        now = time.monotonic()
        while conns:
            since, up = conns.pop()
            if now - since < self.idle and up.next_cycle():
                return up
            up.abort()
        return None

    def put(self, up: Upstream) -> None:
        """Keep ``up`` (its exchange complete) for the next request, or close it."""
        if not up.reusable:
            up.abort()
            return
        now = time.monotonic()
        if now - self._swept >= 1.0:
            self._sweep(now)
        conns = self._idle.setdefault(up.key, [])
        conns.append((now, up))
        while len(conns) > self.per_key:
            conns.pop(0)[1].abort()
        while len(self) > self.total:
            key = min((k for k, c in self._idle.items() if c),
                      key=lambda k: self._idle[k][0][0])
            self._idle[key].pop(0)[1].abort()
            if not self._idle[key]:
                del self._idle[key]

    def _sweep(self, now: float) -> None:
        """Close every connection idle for ``idle`` seconds (a browser visits many hosts:
        their connections must not linger until the next request to the same one)."""
        self._swept = now
        for key in list(self._idle):
            kept = []
            for since, up in self._idle[key]:
                if now - since < self.idle:
                    kept.append((since, up))
                else:
                    up.abort()
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]

    def close(self) -> None:
        for conns in self._idle.values():
            for _, up in conns:
                up.abort()
        self._idle.clear()

    def __len__(self) -> int:
        return sum(len(c) for c in self._idle.values())
