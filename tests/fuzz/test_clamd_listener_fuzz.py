"""Garbage on avgate's clamd-protocol port: every connection ends with a well-formed reply
(or none), the server never hangs or dies, and a PING afterwards is answered.

Runs a real listener (TCP and unix socket) in a background event loop; each example opens
real connections. Bounded: ``AVGATE_FUZZ_EXAMPLES`` examples per property (default 200).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avgate import config
from avgate.frontends import clamd as fe
from avgate.frontends.listen import ListenOptions
from avgate.gateway import Gateway

EXAMPLES = int(os.environ.get("AVGATE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
STREAM_MAX = 4096


class _Server:
    def __init__(self, root: Path) -> None:
        (root / "allowed").mkdir()
        (root / "allowed" / "eicar.com").write_bytes(EICAR)
        self.unix_path = str(root / "clamd.sock")
        self.cfg = config.from_dict({
            "scan": {"cache": False},
            "quarantine": {"path": str(root / "q")},
            "clamd_listener": {"listen": "127.0.0.1:0", "unix_socket": self.unix_path,
                               "allowed_paths": [str(root / "allowed")],
                               "stream_max_length": STREAM_MAX, "idle_timeout": 2},
        })
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.gateway = Gateway.from_config(self.cfg)
        self.listeners = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        self.port = self.listeners[0].port

    async def _start(self) -> list[fe.ClamdListener]:
        await self.gateway.start()
        started = await fe.start(self.gateway, ListenOptions(base_dir=self.cfg.base_dir))
        return cast(list[fe.ClamdListener], started)

    async def _stop(self) -> None:
        for listener in self.listeners:
            await listener.aclose()
        await self.gateway.close()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    with tempfile.TemporaryDirectory() as tmp:
        srv = _Server(Path(tmp))
        try:
            yield srv
        finally:
            srv.close()


def _exchange(srv: _Server, chunks: list[bytes], unix: bool = False) -> bytes:
    if unix:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(srv.unix_path)
    else:
        s = socket.create_connection(("127.0.0.1", srv.port))
    s.settimeout(10)  # far above idle_timeout: a hang fails the example
    out = b""
    with s:
        try:
            for chunk in chunks:
                s.sendall(chunk)
            s.shutdown(socket.SHUT_WR)
        except OSError:  # the server closed first (error reply): its reply is still there
            pass
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            out += data
            assert len(out) < 1 << 20
    return out


def _check(srv: _Server, reply: bytes) -> None:
    if reply:
        assert reply.endswith((b"\0", b"\n")), reply[-80:]
    assert _exchange(srv, [b"zPING\0"]) == b"PONG\0"


COMMANDS = [b"PING", b"VERSION", b"STATS", b"INSTREAM", b"IDSESSION", b"END", b"FILDES",
            b"SCAN /", b"CONTSCAN ../../etc/passwd", b"MULTISCAN \0", b"ALLMATCHSCAN x",
            b"VERSIONCOMMANDS", b"SHUTDOWN", b"RELOAD", b"NOPE"]
command = st.builds(lambda p, c, t: p + c + t, st.sampled_from([b"z", b"n", b""]),
                    st.sampled_from(COMMANDS), st.sampled_from([b"\0", b"\n", b"\r\n", b""]))
chunk = st.builds(lambda n, d: struct.pack(">I", n) + d,
                  st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),
                  st.binary(max_size=64))
piece = st.one_of(st.binary(max_size=200), command, chunk)


@FUZZ
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=6))
def test_random_bytes(server: _Server, chunks: list[bytes]) -> None:
    _check(server, _exchange(server, chunks))


@FUZZ
@given(st.lists(piece, min_size=1, max_size=12))
def test_commands_chunks_and_garbage(server: _Server, pieces: list[bytes]) -> None:
    _check(server, _exchange(server, pieces))


@FUZZ
@given(st.lists(piece, min_size=1, max_size=8))
def test_unix_socket(server: _Server, pieces: list[bytes]) -> None:
    _check(server, _exchange(server, pieces, unix=True))
