"""Verdict-cache poisoning through the clamd listener: a file rewritten between avgate's
hashing read and the engine's read must never leave ``clean`` cached for the malicious bytes;
FILDES must read through the passed descriptor (no verdict oracle for unreadable files).

Before the fix: the listener hashed ``/proc/PID/fd/N`` (or the path) once and the engines read
the file again, so the cache got ``clean`` under the malicious bytes' sha256, and later the same
bytes through INSTREAM (or HTTP, SMTP) were answered ``OK`` from the cache; an O_PATH or
O_WRONLY descriptor to a 0600 file was reopened with avgate's own credentials and scanned.

The samples are generated here: random "malicious" bytes and a ClamAV .hdb signature for them,
and random clean bytes of the same length to swap in.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from avgate.spool import Spool
from tests.integration.clamd_listener.inprocess import InProcessClamd

NAME = "Avgate.Test.Poison"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("poison")


@pytest.fixture(scope="module")
def samples(root: Path) -> dict[int, bytes]:
    """One malicious sample per size (4 KiB: read on the event loop; 2 MiB: in a thread)."""
    out = {size: os.urandom(size) for size in (4096, 2 << 20)}
    lines = [f"{hashlib.md5(data, usedforsecurity=False).hexdigest()}:{len(data)}:{NAME}"
             for data in out.values()]
    (root / "sigs").mkdir()
    (root / "sigs" / "poison.hdb").write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def server(root: Path, samples: dict[int, bytes]) -> Iterator[InProcessClamd]:
    (root / "allowed").mkdir()
    srv = InProcessClamd(
        root, {"allowed_paths": [str(root / "allowed")], "idle_timeout": 5},
        scan={"cache": True},
        engines=[{"type": "embedded", "signatures": [str(root / "sigs")]}])
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture(autouse=True)
def fresh_cache(server: InProcessClamd) -> None:
    cache = server.gateway.scanner.cache
    if cache is not None:
        cache.clear()


def instream(data: bytes) -> bytes:
    body = b"".join(struct.pack(">I", len(data[i:i + 65536])) + data[i:i + 65536]
                    for i in range(0, len(data), 65536))
    return b"zINSTREAM\0" + body + b"\0\0\0\0"


def swap_before_engines(monkeypatch: pytest.MonkeyPatch, server: InProcessClamd,
                        path: Path, replacement: bytes) -> list[int]:
    """Rewrite ``path`` the moment the first engine is asked: after avgate hashed what it
    read, before the engine reads (the race an inotify watcher wins every time)."""
    swaps: list[int] = []
    for engine in server.gateway.scanner.engines:
        original = engine.scan

        async def scan(spool: Spool, original: Any = original) -> Any:
            if not swaps:
                path.write_bytes(replacement)  # noqa: ASYNC240 - before the engine, on purpose
                swaps.append(1)
            return await original(spool)

        monkeypatch.setattr(engine, "scan", scan)
    return swaps


@pytest.mark.parametrize("size", [4096, 2 << 20])
def test_fildes_swap_does_not_poison_the_cache(
        server: InProcessClamd, samples: dict[int, bytes], root: Path, size: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    malicious = samples[size]
    target = root / f"fildes-{size}.bin"
    target.write_bytes(malicious)
    swaps = swap_before_engines(monkeypatch, server, target, os.urandom(size))
    with open(target, "rb") as f, server.connect(unix=True) as s:
        socket.send_fds(s, [b"zFILDES\0\0"], [f.fileno()])
        reply = s.recv(4096)
    assert swaps, "the engines were never asked"
    # what was hashed is what was scanned: the malicious bytes
    assert re.fullmatch(rb"fd\[\d+\]: " + NAME.encode() + rb" FOUND\0", reply), reply
    # and the cache does not say clean for them
    assert server.talk(instream(malicious)) == f"stream: {NAME} FOUND\0".encode()


@pytest.mark.parametrize("command", ["SCAN", "CONTSCAN", "MULTISCAN"])
def test_path_scan_swap_does_not_poison_the_cache(
        server: InProcessClamd, samples: dict[int, bytes], root: Path, command: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    malicious = samples[4096]
    target = root / "allowed" / f"{command}.bin"
    target.write_bytes(malicious)
    swaps = swap_before_engines(monkeypatch, server, target, os.urandom(len(malicious)))
    reply = server.talk(f"z{command} {target}\0".encode())
    assert swaps
    assert reply == f"{target}: {NAME} FOUND\0".encode()
    assert server.talk(instream(malicious)) == f"stream: {NAME} FOUND\0".encode()


def test_clean_then_malicious_rewrite_is_not_answered_from_a_stale_verdict(
        server: InProcessClamd, samples: dict[int, bytes], root: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the other direction: the file is clean when hashed and malicious when the engine reads
    # it; then the snapshot (clean) is scanned and `clean` is cached for the clean bytes
    # only: the malicious bytes are still found
    malicious = samples[4096]
    clean = os.urandom(len(malicious))
    target = root / "allowed" / "flip.bin"
    target.write_bytes(clean)
    swap_before_engines(monkeypatch, server, target, malicious)
    assert server.talk(f"zSCAN {target}\0".encode()) == f"{target}: OK\0".encode()
    assert server.talk(instream(clean)) == b"stream: OK\0"
    assert server.talk(instream(malicious)) == f"stream: {NAME} FOUND\0".encode()


@pytest.mark.parametrize("flags", [os.O_PATH, os.O_WRONLY], ids=["O_PATH", "O_WRONLY"])
def test_fildes_of_an_unreadable_descriptor_is_an_error_not_a_verdict(
        server: InProcessClamd, samples: dict[int, bytes], root: Path, flags: int) -> None:
    # a root-only file: the client may hold an O_PATH (or write-only) descriptor to it, but
    # that gives no right to read it; reopening /proc/PID/fd/N as avgate would (an oracle)
    secret = root / "secret.bin"
    secret.write_bytes(samples[4096])
    os.chmod(secret, 0o600)
    fd = os.open(secret, flags)
    try:
        with server.connect(unix=True) as s:
            socket.send_fds(s, [b"zFILDES\0\0"], [fd])
            reply = s.recv(4096)
    finally:
        os.close(fd)
    assert reply.endswith(b" ERROR\0"), reply
    assert b"FOUND" not in reply and b": OK" not in reply, reply
    assert secret.read_bytes() == samples[4096]  # and nothing was written to it
