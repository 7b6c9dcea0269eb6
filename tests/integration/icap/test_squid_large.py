"""A large download through real Squid and avgate, from an origin paced like a real network.

Squid 5.7 stalls RESPMOD for good once its 64 KiB virgin-body pipe fills while the ICAP
transaction is not consuming (Squid bug class fixed upstream in 2025, see README): with a
Preview, that is the wait for "100 Continue"; with an origin on loopback, even the ICAP
hand-off itself. The documented set-up for Squid 5.x is no preview (avgate `[icap] preview = 0`
or Squid `icap_preview_enable off`) — used here — and then a multi-megabyte object from an
origin at network pace streams through and comes back byte-identical.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from .conftest import AvgateIcap, Squid, start_avgate, stop

pytestmark = pytest.mark.timeout(120)

BIG = bytes(range(256)) * 4096 * 3  # 3 MiB, far over the preview and Squid's 64 KiB pipe


@pytest.fixture(scope="module")
def avgate_icap() -> Iterator[AvgateIcap]:
    """Overrides the conftest's: the same server, but offering no preview."""
    srv = start_avgate("preview = 0")
    try:
        yield srv
    finally:
        stop(srv.proc)


@pytest.fixture(scope="module")
def paced_origin() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(BIG)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            for i in range(0, len(BIG), 8192):  # ~8 MB/s: a fast WAN, not loopback
                self.wfile.write(BIG[i:i + 8192])
                self.wfile.flush()
                time.sleep(0.001)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/large.bin"
    finally:
        server.shutdown()
        server.server_close()


def test_large_download_passes_byte_identical(squid: Squid, paced_origin: str) -> None:
    with httpx.Client(proxy=squid.proxy, timeout=60, trust_env=False) as client:
        for _ in range(3):
            r = client.get(paced_origin)
            assert r.status_code == 200, r.text[:300]
            assert r.content == BIG
