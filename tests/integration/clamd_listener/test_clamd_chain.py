"""avgate's clamd listener in front of a real clamd (the clamd engine), with the verdict
cache on: a mass-mailed object is scanned by clamd once, then answered from the cache."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clamd_daemon import ClamdDaemon
from tests.integration.avgate_proc import AvgateServe

from .conftest import EICAR

MESSAGE = EICAR  # the attachment every copy of the mass mail carries


def scan(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"zINSTREAM\0" + struct.pack(">I", len(data)) + data + b"\0\0\0\0")
        out = b""
        while chunk := s.recv(4096):
            out += chunk
    return out


@pytest.fixture
def chained(clamd_alive: ClamdDaemon, tmp_path: Path) -> Iterator[tuple[int, ClamdDaemon]]:
    config = tmp_path / "avgate.toml"
    config.write_text(f"""
[scan]
cache = true
[[engines]]
type = "clamd"
servers = ["{clamd_alive.tcp}"]
connect_timeout = 1
scan_timeout = 2
[log]
path = "{tmp_path / 'scan.log'}"
[clamd_listener]
listen = "127.0.0.1:0"
""")
    with AvgateServe(config) as serve:
        try:
            yield serve.port("clamd_listener"), clamd_alive
        finally:
            clamd_alive.resume()


def test_mass_mail_is_scanned_by_clamd_once(chained: tuple[int, ClamdDaemon]) -> None:
    port, clamd = chained
    found = b"stream: Eicar-Test-Signature.UNOFFICIAL FOUND\0"
    assert scan(port, MESSAGE) == found  # clamd's own verdict, passed through
    assert scan(port, b"clean body\n") == b"stream: OK\0"
    clamd.pause()  # from now on clamd answers nothing
    started = time.monotonic()
    for _ in range(200):
        assert scan(port, MESSAGE) == found
    assert scan(port, b"clean body\n") == b"stream: OK\0"
    assert time.monotonic() - started < 10
    # an object clamd has not seen needs clamd: it is an error now, never a guess
    reply = scan(port, MESSAGE + b"\r\nnew\r\n")
    assert reply.endswith(b" ERROR\0"), reply
