"""The SMTP client (:mod:`avgate.smtpclient`) against recording sinks: one-shot sends (as
quarantine release uses them) and the pooled next-hop session (as the SMTP filter does)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from avgate.smtpclient import Connection, NextHop, NextHopError, Pool, parse_next_hop, send
from tests.integration.smtp.conftest import RawSink, Sink, closed_port

pytestmark = pytest.mark.timeout(60)

MSG = b"Subject: hi\n\nline one\n.leading dot\n8bit \xe9\xff\nno final newline"
WIRE = b"Subject: hi\r\n\r\nline one\r\n.leading dot\r\n8bit \xe9\xff\r\nno final newline\r\n"


async def _send(s: Sink, sender: str = "a@example.test",
                rcpts: tuple[str, ...] = ("b@example.test",), msg: bytes = MSG) -> dict[str, int]:
    refused = await send("127.0.0.1", s.port, sender, rcpts, msg, timeout=10,
                         local_hostname="client.test")
    return {r: reply.code for r, reply in refused.items()}


async def test_send_delivers_the_message_as_given(sink: Sink) -> None:
    assert await _send(sink, rcpts=("b@example.test", "c@example.test")) == {}
    [got] = sink.messages
    assert got.sender == "a@example.test"
    assert got.recipients == ["b@example.test", "c@example.test"]
    assert got.data == WIRE  # line endings normalised, dot-stuffing undone by the server


async def test_send_null_sender(sink: Sink) -> None:
    await _send(sink, sender="")
    assert sink.messages[0].sender in ("", "<>")


async def test_send_wire_is_dot_stuffed_with_one_terminator(raw_sink: RawSink) -> None:
    host, port = parse_next_hop(raw_sink.address)
    await send(host, port, "a@example.test", ["b@example.test"], MSG + b"\r\n.\r\nQUIT\r\n",
               timeout=10)
    [wire] = raw_sink.wire
    body = wire.partition(b"DATA\r\n")[2]
    assert body.count(b"\r\n.\r\n") == 1 and body.endswith(b"\r\n.\r\n")
    assert b"\r\n..leading dot\r\n" in body and b"\r\n..\r\nQUIT\r\n" in body
    assert b"SIZE=" not in wire  # the raw sink does not offer SIZE


async def test_send_returns_the_refused_recipients(sink: Sink) -> None:
    sink.refuse = {"x@example.test"}
    sink.defer = {"y@example.test"}
    refused = await _send(sink, rcpts=("x@example.test", "b@example.test", "y@example.test"))
    assert refused == {"x@example.test": 550, "y@example.test": 450}
    assert sink.messages[0].recipients == ["b@example.test"]


async def test_send_fails_when_every_recipient_is_refused(sink: Sink) -> None:
    sink.refuse = {"x@example.test"}
    with pytest.raises(NextHopError, match=r"recipients refused: x@example.test \(550"):
        await _send(sink, rcpts=("x@example.test",))
    assert sink.messages == []


async def test_send_fails_when_the_message_is_refused(sink: Sink) -> None:
    sink.data_reply = "554 5.7.1 no thanks"
    with pytest.raises(NextHopError, match=r"message refused: 554 5\.7\.1 no thanks"):
        await _send(sink)


async def test_send_to_nobody_fails_before_connecting() -> None:
    with pytest.raises(NextHopError, match="no recipients"):
        await send("127.0.0.1", closed_port(), "a@example.test", [], MSG, timeout=5)


async def test_send_unreachable() -> None:
    with pytest.raises(NextHopError):
        await send("127.0.0.1", closed_port(), "a@example.test", ["b@example.test"], MSG,
                   timeout=5)


async def test_non_ascii_addresses_need_smtputf8(sink: Sink) -> None:
    with pytest.raises(NextHopError, match="SMTPUTF8"):
        await _send(sink, rcpts=("jörg@bücher.example",))
    assert sink.messages == []
    sink.utf8 = True
    await _send(sink, rcpts=("jörg@bücher.example",))
    assert sink.messages[0].recipients == ["jörg@bücher.example"]


@pytest.mark.parametrize(("text", "want"), [
    ("127.0.0.1:10026", ("127.0.0.1", 10026)), ("[::1]:25", ("::1", 25)),
    ("mx.example", ("mx.example", 25)), ("[::1]", ("::1", 25)), ("::1", ("::1", 25)),
    (" mx.example:2525 ", ("mx.example", 2525)),
])
def test_parse_next_hop(text: str, want: tuple[str, int]) -> None:
    assert parse_next_hop(text) == want


@pytest.mark.parametrize("text", ["host:port", "unix:/run/x.sock", "inet:25@host", "", "a:99999",
                                  "mx.example"])
def test_parse_next_hop_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="expected host:port"):
        parse_next_hop(text, default_port=None)


async def test_pooled_next_hop_reuses_one_connection(sink: Sink) -> None:
    pool = Pool("127.0.0.1", sink.port, timeout=10, local_hostname="client.test")
    try:
        for i in range(3):
            hop = NextHop(pool)
            assert (await hop.mail(f"s{i}@example.test", [], {}, xforward=False,
                                   xclient=False)).code == 250
            assert (await hop.rcpt("b@example.test")).code == 250
            if i == 1:  # abandoned transaction: RSET before the next one
                await hop.close()
                continue
            _, reply = await hop.data((), [b"Subject: x\r\n\r\nbody\r\n.\r\n"])
            assert reply.code == 250
            await hop.close()
    finally:
        pool.close()
    assert sink.connections == 1
    assert [m.sender for m in sink.messages] == ["s0@example.test", "s2@example.test"]


class _SlowServer:
    """Greets and answers EHLO at once, then answers each command line after ``delay``."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> int:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"220 slow.test ESMTP\r\n")
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while line := await r.readline():
                    if line.upper().startswith(b"EHLO"):
                        w.write(b"250-slow.test\r\n250 PIPELINING\r\n")
                    else:
                        await asyncio.sleep(self.delay)
                        w.write(b"250 2.0.0 Ok\r\n")
                    await w.drain()
            w.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_the_timeout_is_per_exchange_not_per_connection() -> None:
    """Each exchange has ``timeout`` seconds: five answers 0.2 s apart on a connection with
    a 0.5 s timeout all arrive (1 s in all), however the timer is kept."""
    async with _SlowServer(0.2) as port:
        conn = Connection("127.0.0.1", port, timeout=0.5)
        await conn.open("client.test")
        try:
            for i in range(5):
                reply = await conn.command(f"NOOP {i}".encode())
                assert reply.code == 250
        finally:
            conn.quit()


async def test_an_exchange_over_the_timeout_fails_and_ends_the_connection() -> None:
    async with _SlowServer(5.0) as port:
        conn = Connection("127.0.0.1", port, timeout=0.3)
        await conn.open("client.test")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(NextHopError, match="TimeoutError"):
            await conn.command(b"NOOP")
        assert 0.25 <= loop.time() - started < 2.0
        assert not conn.alive
        with pytest.raises(NextHopError, match="closed"):
            await conn.command(b"NOOP")
