"""The clamd engine's session send: the request, the spool's own buffer and the terminator go
out with one ``sendmsg`` (nothing joined); a socket that takes only part of it gets the rest
as it drains, within the scan's bound; the spool's buffer is never held after the send (a
BytesIO with an export could not be closed)."""

from __future__ import annotations

import asyncio
import io
import socket

import pytest

from avgate.engines.clamd import _send_parts

pytestmark = pytest.mark.timeout(20)


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return a, b


async def _read_all(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < size:
        out += await loop.sock_recv(sock, 1000)
    return bytes(out)


async def test_parts_arrive_whole_and_in_order_through_a_small_socket_buffer() -> None:
    a, b = _pair()
    body = io.BytesIO(bytes(range(256)) * 4000)  # 1 MB: many partial sends
    parts: list[bytes | memoryview] = [b"HEAD", body.getbuffer(), b"", b"END"]
    expected = b"HEAD" + body.getvalue() + b"END"
    try:
        loop = asyncio.get_running_loop()
        reader = asyncio.ensure_future(_read_all(b, len(expected)))
        await _send_parts(a, parts, loop.time() + 10)
        assert await reader == expected
        assert parts == []  # consumed
        body.close()  # no export of the buffer is left (BufferError otherwise)
    finally:
        a.close()
        b.close()


async def test_a_peer_that_does_not_read_times_out_and_the_buffer_is_released() -> None:
    a, b = _pair()
    body = io.BytesIO(b"x" * (1 << 20))
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        with pytest.raises(TimeoutError) as info:
            await _send_parts(a, [b"HEAD", body.getbuffer(), b"END"], started + 0.3)
        assert 0.25 <= loop.time() - started < 5
        # the exception (and its traceback's frames) is still alive here: the buffer is not
        assert info.value is not None
        body.close()
        assert not loop.remove_writer(a.fileno())  # the wait left no writer behind
    finally:
        a.close()
        b.close()


async def test_a_socket_that_takes_everything_at_once_needs_no_wait() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        loop = asyncio.get_running_loop()
        await _send_parts(a, [b"zIDSESSION\0zINSTREAM\0", memoryview(b"\0\0\0\3abc"),
                              b"\0\0\0\0"], loop.time() - 1)  # a bound already past: unused
        assert b.recv(100) == b"zIDSESSION\0zINSTREAM\0\0\0\0\3abc\0\0\0\0"
    finally:
        a.close()
        b.close()
