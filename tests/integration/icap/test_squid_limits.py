"""Real Squid through avgate with the ICAP limits of issue 11 set low.

* ``max_body_size = "1MiB"``: a 3 MiB download (origin at network pace) is over it. avgate
  keeps only the first MiB, does not scan, and the default policy passes the object (a size
  limit on web content passes with a tag): it must come back byte-identical, streamed.
* ``skip_content_types = ["image/*"]``: EICAR served as ``image/png`` is still scanned and
  blocked (the label is not trusted); a real PNG passes.

Preview off, as documented for Squid 5.x (see test_squid_large.py).
"""

from __future__ import annotations

import http.server
import shutil
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.clamd_daemon import EICAR

from .conftest import AvgateIcap, Squid, start_avgate, stop

pytestmark = pytest.mark.timeout(120)

BIG = bytes(range(256)) * 4096 * 3  # 3 MiB: three times max_body_size
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8
FILES = {"/large.bin": (BIG, "application/octet-stream"),
         "/eicar.png": (EICAR, "image/png"),
         "/real.png": (PNG, "image/png")}


@pytest.fixture(scope="module")
def avgate_icap() -> Iterator[AvgateIcap]:
    """Overrides the conftest's: no preview, a 1 MiB body limit, images skipped."""
    srv = start_avgate('preview = 0\nmax_body_size = "1MiB"\nskip_content_types = ["image/*"]')
    try:
        yield srv
    finally:
        stop(srv.proc)
        shutil.rmtree(srv.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def origin() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            body, ctype = FILES[self.path]
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            for i in range(0, len(body), 8192):  # ~8 MB/s: a fast WAN, not loopback
                self.wfile.write(body[i:i + 8192])
                self.wfile.flush()
                time.sleep(0.001)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_download_over_max_body_size_passes_byte_identical(
        squid: Squid, origin: str, avgate_icap: AvgateIcap) -> None:
    with httpx.Client(proxy=squid.proxy, timeout=60, trust_env=False) as client:
        for _ in range(2):
            r = client.get(f"{origin}/large.bin")
            assert r.status_code == 200, r.text[:300]
            assert r.content == BIG
    log = avgate_icap.output()
    assert '"status":"skipped"' in log and "max_body_size" in log, log[-2000:]


def test_eicar_labelled_png_is_blocked_real_png_passes(squid: Squid, origin: str) -> None:
    with httpx.Client(proxy=squid.proxy, timeout=30, trust_env=False) as client:
        blocked = client.get(f"{origin}/eicar.png")
        assert blocked.status_code == 403 and b"Eicar-Test-Signature" in blocked.content
        passed = client.get(f"{origin}/real.png")
        assert passed.status_code == 200 and passed.content == PNG
