"""While bombs are being scanned, every other listener keeps answering (issue 11, §1).

Before scan workers, a 60 KB mail with one quoted parameter full of ``;`` was decomposed on
the event loop (objects under 64 KiB were scanned inline) and froze every front-end for
8-9 s on this machine; a 3 KB mail carrying a 7z that declares 500,000 entries froze it
for 35 s. Now decomposition runs in scan worker processes and the loop only moves bytes.

The test runs a real ``avgate serve`` with two scan workers, keeps both busy with bombs sent
over the clamd protocol from four connections, and meanwhile measures a clamd ``zPING``
and an HTTP ``GET /healthz`` round trip: each must stay under 1 s (2-core machine).
"""

from __future__ import annotations

import http.client
import io
import socket
import struct
import threading
import time
import zipfile
from pathlib import Path

from tests.integration.avgate_proc import AvgateServe

DURATION = 4.0  # seconds of bombing while we measure
LIMIT = 1.0  # seconds: the round trip every listener must keep under


def semicolon_mail() -> bytes:
    """~60 KB: one quoted parameter full of ';' (quadratic in the email package)."""
    semi = b";" * 60_000
    return (b"From: a@example.org\r\nTo: b@example.net\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: text/plain; name="' + semi + b'"\r\n\r\nbody\r\n')


def many_member_zip() -> bytes:
    """~1 MB zip with 9,990 tiny members: just under max_files, ~1 s of worker CPU."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for i in range(9_990):
            z.writestr(f"{i}.txt", b"hello %d" % i)
    return buf.getvalue()


def instream(port: int, data: bytes, timeout: float = 60.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"zINSTREAM\0")
        for i in range(0, len(data), 65536):
            chunk = data[i:i + 65536]
            s.sendall(struct.pack(">I", len(chunk)) + chunk)
        s.sendall(struct.pack(">I", 0))
        reply = b""
        while not reply.endswith(b"\0"):
            got = s.recv(4096)
            if not got:
                break
            reply += got
        return reply


def ping(port: int) -> float:
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"zPING\0")
        assert s.recv(16) == b"PONG\0"
    return time.monotonic() - start


def healthz(port: int) -> float:
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        response.read()
        assert response.status in (200, 503)
    finally:
        conn.close()
    return time.monotonic() - start


def test_ping_and_healthz_answer_within_a_second_during_bombs(tmp_path: Path) -> None:
    cfg = tmp_path / "avgate.toml"
    cfg.write_text(f"""
[scan]
workers = 2
cache = false
[quarantine]
path = "{tmp_path}/q"
[log]
path = "{tmp_path}/scan.log"
[clamd_listener]
listen = "127.0.0.1:0"
[http]
listen = "127.0.0.1:0"
""")
    bombs = [semicolon_mail(), many_member_zip()]
    with AvgateServe(cfg) as serve:
        clamd_port = serve.port("clamd_listener")
        http_port = serve.port("http")
        stop = threading.Event()
        replies: list[bytes] = []

        def bomber(index: int) -> None:
            n = index
            while not stop.is_set():
                replies.append(instream(clamd_port, bombs[n % len(bombs)]))
                n += 1

        threads = [threading.Thread(target=bomber, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # the workers are busy now
        pings: list[float] = []
        checks: list[float] = []
        end = time.monotonic() + DURATION
        while time.monotonic() < end:
            pings.append(ping(clamd_port))
            checks.append(healthz(http_port))
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join(120)
    assert len(replies) >= 4, "the bombs did not keep the workers busy"
    assert all(r.endswith(b"\0") and b"stream:" in r for r in replies), replies[:3]
    assert max(pings) < LIMIT, f"clamd PING took {max(pings):.2f}s during the bombs"
    assert max(checks) < LIMIT, f"/healthz took {max(checks):.2f}s during the bombs"
