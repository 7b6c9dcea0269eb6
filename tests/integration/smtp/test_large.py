"""A large message through a real ``avgate serve`` process: relayed byte for byte (apart from
the added verdict headers), and the process's memory does not grow with the message size
(DATA is spooled to a temp file above ``scan.spool_memory`` and relayed from it in chunks)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from avgate import __version__
from avgate.protocols.smtp import encode_data
from tests.integration.smtp.conftest import closed_port

SIZE = 50 * 1024 * 1024
MAX_GROWTH = 24 * 1024 * 1024  # bytes of VmHWM growth allowed while relaying SIZE bytes


def _kib(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    m = re.search(rf"^{field}:\s+(\d+) kB", status, re.M)
    assert m, status
    return int(m.group(1)) * 1024


def _message(size: int) -> bytes:
    """CRLF lines of 76 characters (some starting with a dot), about ``size`` bytes."""
    head = (b"From: a@example.test\r\nTo: b@example.test\r\nSubject: big\r\n"
            b"Message-ID: <big@example.test>\r\n\r\n")
    line = (b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-+/\r\n"
            * 99 + b".starts with a dot and is stuffed on the wire...........................\r\n")
    return head + line * (size // len(line))


class BulkSink:
    """A next hop that keeps only the sha256 of each message's wire bytes (bulk reads)."""

    def __init__(self) -> None:
        self.wires: list[tuple[int, str]] = []  # (length, sha256) of DATA wire bytes
        self.server: asyncio.Server | None = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 bulk.test ESMTP\r\n")
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                line = await reader.readuntil(b"\r\n")
                cmd = line[:4].upper()
                if cmd == b"EHLO":
                    writer.write(b"250-bulk.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif cmd == b"DATA":
                    writer.write(b"354 go\r\n")
                    h, n, tail = hashlib.sha256(), 0, b""
                    while not (tail + b"").endswith(b"\r\n.\r\n"):
                        chunk = await reader.read(1 << 20)
                        if not chunk:
                            raise ConnectionError
                        h.update(chunk)
                        n += len(chunk)
                        tail = (tail + chunk)[-5:]
                    self.wires.append((n, h.hexdigest()))
                    writer.write(b"250 2.0.0 Ok: queued as BULK\r\n")
                elif cmd == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 Ok\r\n")
                await writer.drain()
        writer.close()

    async def start(self) -> BulkSink:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


async def _send(port: int, message: bytes) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> str:
        lines = []
        while True:
            line = (await asyncio.wait_for(reader.readline(), 30)).decode()
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return "".join(lines).strip()

    try:
        assert (await reply()).startswith("220")
        for cmd in ("EHLO client.test", "MAIL FROM:<a@example.test>", "RCPT TO:<b@example.test>",
                    "DATA"):
            writer.write(cmd.encode() + b"\r\n")
            r = await reply()
            assert r[:1] in "23", (cmd, r)
        wire = encode_data(message)
        for i in range(0, len(wire), 1 << 20):
            writer.write(wire[i:i + (1 << 20)])
            await writer.drain()
        return await reply()
    finally:
        writer.close()


async def test_large_message_relayed_byte_identical_with_bounded_memory(tmp_path: Path) -> None:
    sink = await BulkSink().start()
    port = closed_port()
    cfg = tmp_path / "avgate.toml"
    cfg.write_text(f"""
[limits]
max_scan_size = "1 MiB"   # skipped by the scanner: this measures the SMTP path alone

[policy]
size_action = "keep"      # mail over a size limit is refused by default; pass it here
refid_header = ""         # no per-message RefID header: the expected bytes are fixed

[[engines]]
type = "embedded"

[log]
path = "{tmp_path / 'scan.log'}"

[quarantine]
path = "{tmp_path / 'quarantine'}"

[[smtp.listeners]]
listen = "127.0.0.1:{port}"
next_hop = "127.0.0.1:{sink.port}"
max_message_size = {SIZE + (1 << 20)}
hostname = "avgate.test"
""")
    exe = shutil.which("avgate", path=os.path.dirname(sys.executable)) or "avgate"
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, waited for below
        [exe, "serve", "--config", str(cfg)], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError):
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout and \
                proc.stdout.read()
            await asyncio.sleep(0.05)
        # warm up (imports, first scan, first next-hop connection), then take the baseline
        small = _message(200 * 1024)
        assert (await _send(port, small)).startswith("250 2.0.0 Ok: queued")
        before = _kib(proc.pid, "VmHWM")

        message = _message(SIZE)
        started = time.monotonic()
        reply = await _send(port, message)
        elapsed = time.monotonic() - started
        assert reply.startswith("250 2.0.0 Ok: queued"), reply
        growth = _kib(proc.pid, "VmHWM") - before

        # byte for byte: the verdict headers, then the original message, dot-stuffed
        expected = encode_data(b"X-Virus-Scanned: avgate " + __version__.encode() +
                               b"\r\nX-Virus-Status: Skipped\r\n" + message)
        assert sink.wires[-1] == (len(expected), hashlib.sha256(expected).hexdigest())
        print(f"VmHWM growth {growth / 2**20:.1f} MiB, {elapsed:.2f} s")
        assert growth < MAX_GROWTH, f"VmHWM grew {growth / 2**20:.1f} MiB ({elapsed:.1f} s)"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        print(out.decode(errors="replace")[-3000:])  # shown when the test fails
        assert sink.server is not None
        sink.server.close()
