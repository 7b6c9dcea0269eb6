"""Milter front-end under attack: no peer makes one connection hold unbounded memory or a
connection slot forever (issue 11, section 5).

Measured before the fix: 1M headers in one message grew the process by 85 MiB while they
arrived (VmHWM 37 → 195 MiB) and the message was accepted; a packet could announce 64 MiB
and trickle in; connections queued past ``max_connections`` waited forever.

* ``max_headers`` / ``max_header_size`` / ``max_recipients``: past them nothing more of the
  message is kept and end-of-message is answered ``552`` (the sender's fault).
* ``max_packet`` defaults to 256 KiB; a partial packet must complete within
  ``packet_timeout`` of its first byte, however it trickles.
* A connection waiting for a slot is closed after ``queue_timeout``; when as many wait as
  are served, a new one is closed at once.

Samples are generated here; the MTA side is our own codec over a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from avgate import config
from avgate.frontends import milter as fe
from avgate.frontends.listen import ListenOptions
from avgate.gateway import Gateway
from avgate.protocols import milter as m

pytestmark = pytest.mark.timeout(90)

OFFER = m.OptNeg(6, 0x1FF, 0x1FFFFF)  # what Postfix 3.x offers


class Events:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    debug_enabled = False  # what front-ends test before a debug line

    def log(self, event: dict[str, Any], level: str = "info") -> None:
        self.events.append(event)


@pytest.fixture
async def start() -> AsyncIterator[Any]:
    started: list[tuple[Gateway, list[Any]]] = []

    async def factory(**milter: Any) -> fe.MilterListener:
        cfg = config.from_dict({"milter": {"listen": "127.0.0.1:0", **milter}})
        gw = Gateway.from_config(cfg)
        gw.log = Events()  # type: ignore[assignment]
        await gw.start()
        listeners = await fe.start(gw, ListenOptions())
        started.append((gw, listeners))
        return listeners[0]

    yield factory
    for gw, listeners in started:
        for listener in listeners:
            await listener.aclose()
        await gw.close()


class Mta:
    """Raw MTA side: negotiates, then sends whatever it is given."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w = r, w
        self.codec = m.MilterClient()

    @classmethod
    async def open(cls, port: int, negotiate: bool = True) -> Mta:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        mta = cls(r, w)
        if negotiate:
            w.write(m.encode(OFFER))
            assert isinstance(await mta.reply(), m.OptNeg)
        return mta

    async def send(self, *packets: m.Packet | bytes) -> None:
        self.w.write(b"".join(p if isinstance(p, bytes) else m.encode(p) for p in packets))
        await self.w.drain()

    async def reply(self, wait: float = 20) -> m.Packet | None:
        while (ev := self.codec.next_event()) is None:
            data = await asyncio.wait_for(self.r.read(1 << 16), wait)
            if not data:
                return None
            self.codec.receive_data(data)
        return ev

    async def final(self) -> m.Packet | None:
        """The end-of-message answer (header changes skipped)."""
        while True:
            ev = await self.reply()
            if ev is None or isinstance(ev, m.Accept | m.Reject | m.Tempfail | m.Discard
                                        | m.ReplyCode | m.Continue):
                return ev

    async def closed_within(self, seconds: float) -> bool:
        try:
            return await asyncio.wait_for(self.r.read(1 << 16), seconds) == b""
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    def close(self) -> None:
        self.w.close()


def envelope(rcpts: int = 1) -> list[m.Packet]:
    return [m.Mail(("<alice@example.test>",)),
            *(m.Rcpt((f"<r{i}@example.test>",)) for i in range(rcpts))]


MESSAGE_END = [m.Body(b"hello\r\n"), m.EndOfMessage()]


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# -- headers and recipients ---------------------------------------------------------------------
async def test_a_million_headers_are_refused_without_being_kept(start: Any) -> None:
    """1M ``X-H: v`` headers: answered 552 5.3.4 at end of message, memory flat; the
    connection then carries a normal message."""
    srv = await start()
    mta = await Mta.open(srv.port)
    await mta.send(*envelope())
    batch = m.encode(m.Header(b"X-H", b" v")) * 10_000
    before = peak = _rss()
    for i in range(100):
        await mta.send(batch)
        if i % 10 == 9:
            await asyncio.sleep(0)  # let the server catch up before sampling
            peak = max(peak, _rss())
    await mta.send(*MESSAGE_END)
    final = await mta.final()
    peak = max(peak, _rss())
    assert isinstance(final, m.ReplyCode), final
    assert final.reply.startswith("552 5.3.4"), final.reply
    assert peak - before < 20 * 2**20, f"RSS grew by {(peak - before) / 2**20:.1f} MiB"
    await mta.send(*envelope(), m.Header(b"Subject", b" ok"), *MESSAGE_END)
    assert isinstance(await mta.final(), m.Accept)  # the next message is not refused
    mta.close()
    [event] = [e for e in srv.gateway.log.events if e.get("event") == "limit"]
    assert "max_headers" in event["error"]


async def test_header_block_over_max_header_size_is_refused(start: Any) -> None:
    srv = await start(max_header_size=64 * 1024)
    mta = await Mta.open(srv.port)
    big = m.Header(b"X-Big", b" " + b"b" * 10_000)
    await mta.send(*envelope(), *[big] * 7, *MESSAGE_END)
    final = await mta.final()
    assert isinstance(final, m.ReplyCode) and final.reply.startswith("552 5.3.4"), final
    await mta.send(*envelope(), *[big] * 6, *MESSAGE_END)  # 60 KB: under the limit
    assert isinstance(await mta.final(), m.Accept)
    mta.close()


async def test_too_many_recipients_are_refused(start: Any) -> None:
    srv = await start(max_recipients=5)
    mta = await Mta.open(srv.port)
    await mta.send(*envelope(rcpts=6), m.Header(b"Subject", b" x"), *MESSAGE_END)
    final = await mta.final()
    assert isinstance(final, m.ReplyCode) and final.reply.startswith("552 5.5.3"), final
    await mta.send(*envelope(rcpts=5), m.Header(b"Subject", b" x"), *MESSAGE_END)
    assert isinstance(await mta.final(), m.Accept)
    mta.close()


# -- packets ----------------------------------------------------------------------------------
async def test_default_max_packet_is_small_and_body_chunks_fit(start: Any) -> None:
    """A packet announcing one byte more than 256 KiB closes the connection at once; the
    largest body chunk an MTA sends (65535 bytes) and a 100 KiB header (Postfix's
    header_size_limit) pass."""
    srv = await start()
    mta = await Mta.open(srv.port)
    await mta.send(*envelope(), m.Header(b"X-Long", b" " + b"h" * 102_400),
                   m.Body(b"x" * 65535), m.EndOfMessage())
    assert isinstance(await mta.final(), m.Accept)
    await mta.send(struct.pack(">I", 256 * 1024 + 1) + b"B" + b"x" * 1000)
    assert await mta.closed_within(2)
    mta.close()


async def test_trickled_partial_packet_times_out(start: Any) -> None:
    """A 200 KB packet trickled one byte every 0.2 s: every byte resets the read timeout,
    but the packet must be whole within ``packet_timeout`` of its first byte."""
    srv = await start(timeout=30, packet_timeout=1)
    mta = await Mta.open(srv.port)
    await mta.send(struct.pack(">I", 200_000) + b"B" + b"x" * 100_000)
    started = time.monotonic()
    closed = False
    with contextlib.suppress(ConnectionError):
        for _ in range(25):  # 5 s of trickling
            mta.w.write(b"x")
            await mta.w.drain()
            if await mta.closed_within(0.2):
                closed = True
                break
    assert closed, "the trickled packet kept the connection open"
    assert time.monotonic() - started < 3
    mta.close()


async def test_stalled_partial_packet_times_out(start: Any) -> None:
    srv = await start(timeout=30, packet_timeout=0.5)
    mta = await Mta.open(srv.port)
    await mta.send(struct.pack(">I", 1000) + b"L" + b"X-Half")
    assert await mta.closed_within(3)
    mta.close()


# -- connection slots -------------------------------------------------------------------------
async def test_queued_connection_is_closed_after_queue_timeout(start: Any) -> None:
    """Before: a connection past max_connections waited for a slot forever."""
    srv = await start(max_connections=1, queue_timeout=0.5)
    first = await Mta.open(srv.port)
    waiting = await Mta.open(srv.port, negotiate=False)
    await waiting.send(OFFER)
    assert await waiting.closed_within(3)
    waiting.close()
    # the served connection is not affected; a new one gets the slot once it is free
    await first.send(*envelope(), m.Header(b"Subject", b" x"), *MESSAGE_END)
    assert isinstance(await first.final(), m.Accept)
    first.close()
    await asyncio.sleep(0.1)
    again = await Mta.open(srv.port)
    again.close()


async def test_connections_beyond_the_queue_are_closed_at_once(start: Any) -> None:
    srv = await start(max_connections=1, queue_timeout=30)
    first = await Mta.open(srv.port)
    queued = await Mta.open(srv.port, negotiate=False)
    refused = await Mta.open(srv.port, negotiate=False)
    assert await refused.closed_within(2)
    assert not await queued.closed_within(0.3)
    first.close()  # a slot frees up: the queued one is served
    await queued.send(OFFER)
    assert isinstance(await queued.reply(), m.OptNeg)
    queued.close()
    refused.close()
