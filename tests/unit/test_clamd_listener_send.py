"""The clamd listener's reply path: a reply the socket takes at once goes out without a
timer; a larger one is finished with the idle timeout armed (a client that does not read is
given up on)."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import pytest

from avgate.frontends import clamd as fe
from avgate.frontends.clamd_accounting import Conn

pytestmark = pytest.mark.timeout(30)


def _listener() -> fe.ClamdListener:
    gateway = SimpleNamespace(config=SimpleNamespace(clamd_listener=None))
    listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    return fe.ClamdListener(gateway, listen)  # type: ignore[arg-type]


def _pair(idle_timeout: float) -> tuple[Conn, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.setblocking(False)
    theirs.setblocking(False)
    settings = fe.ClamdListenerSettings(idle_timeout=idle_timeout)
    return Conn(ours, True, "local", "uid:0", settings), theirs


async def test_small_reply_at_once_and_large_reply_whole() -> None:
    listener = _listener()
    conn, theirs = _pair(5.0)
    loop = asyncio.get_running_loop()
    try:
        await listener._send(conn, b"stream: OK\0")
        assert theirs.recv(100) == b"stream: OK\0"
        big = bytes(range(256)) * 4096  # 1 MiB: far over the socket buffer
        sender = asyncio.ensure_future(listener._send(conn, big))
        got = bytearray()
        while len(got) < len(big):
            got += await loop.sock_recv(theirs, 65536)
        await sender
        assert bytes(got) == big
    finally:
        conn.sock.close()
        theirs.close()
        listener.sock.close()


async def test_reply_not_read_times_out() -> None:
    listener = _listener()
    conn, theirs = _pair(0.3)
    try:
        with pytest.raises(TimeoutError):
            await listener._send(conn, b"x" * (4 << 20))
    finally:
        conn.sock.close()
        theirs.close()
        listener.sock.close()
