"""The clamd listener's wait for client bytes (:class:`avgate.frontends.clamd.Readable`): one
reader registration and one deadline timer per connection, not one per wait."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from avgate.frontends import clamd as fe

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    yield ours, theirs
    ours.close()
    theirs.close()


async def test_wait_returns_true_on_bytes_and_false_at_the_deadline(
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    loop = asyncio.get_running_loop()
    r = fe.Readable(loop, ours)
    try:
        assert await r.wait(loop.time() + 0.05) is False  # nothing came
        loop.call_later(0.01, theirs.send, b"zPING\0")
        assert await r.wait(loop.time() + 5) is True
        assert ours.recv(100) == b"zPING\0"
        assert await r.wait(loop.time() - 1) is False  # a deadline already past
    finally:
        r.close()


async def test_the_reader_stays_registered_across_waits(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """After the bytes were read, the poll's report from before the read finds nothing new
    (a peek) and the reader stays; bytes that come while nobody waits stop it until the
    next wait, which then returns at once."""
    ours, theirs = pair
    loop = asyncio.get_running_loop()
    r = fe.Readable(loop, ours)
    registered: list[int] = []
    real_add = loop.add_reader

    def add_reader(fd: int, callback: object, *args: object) -> None:
        registered.append(fd)
        real_add(fd, callback, *args)  # type: ignore[arg-type]

    loop.add_reader = add_reader  # type: ignore[method-assign,assignment]
    try:
        for i in range(5):
            theirs.send(b"x%d" % i)
            assert await r.wait(loop.time() + 5) is True
            assert ours.recv(100) == b"x%d" % i
            for _ in range(3):
                await asyncio.sleep(0)  # the stale report runs, finds nothing
            assert r._reading
        assert registered == [ours.fileno()]  # once, not once per wait
        theirs.send(b"y")  # nobody waits: the reader is removed (level-triggered)
        assert await _until(lambda: not r._reading)
        assert await r.wait(loop.time() + 5) is True
        assert registered == [ours.fileno()] * 2
    finally:
        del loop.add_reader
        r.close()
    assert not r._reading and r._deadline._timer is None


async def test_a_later_wait_moves_the_deadline(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """The timer set by a first, short wait does not cut a second, longer one: it is moved
    when it fires early."""
    ours, theirs = pair
    loop = asyncio.get_running_loop()
    r = fe.Readable(loop, ours)
    try:
        loop.call_later(0.01, theirs.send, b"a")
        assert await r.wait(loop.time() + 0.1) is True
        ours.recv(10)
        for _ in range(3):
            await asyncio.sleep(0)  # the poll's report from before the read: nothing new
        first_timer = r._deadline._timer
        loop.call_later(0.3, theirs.send, b"b")  # after the first wait's deadline
        assert await r.wait(loop.time() + 5) is True
        assert r._deadline._timer is not None and r._deadline._timer is not first_timer
    finally:
        r.close()


async def test_eof_counts_as_readable(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    loop = asyncio.get_running_loop()
    r = fe.Readable(loop, ours)
    try:
        theirs.shutdown(socket.SHUT_WR)
        assert await r.wait(loop.time() + 5) is True
        assert ours.recv(10) == b""
    finally:
        r.close()


async def _until(predicate: object) -> bool:
    from tests.helpers import async_wait_until
    return await async_wait_until(predicate, timeout=5)  # type: ignore[arg-type]
