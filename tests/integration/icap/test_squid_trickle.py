"""Keep-back trickling through real Squid 5.7 (Debian 12) with its stock ICAP set-up.

Squid 5.7 stops reading the origin once its 64 KiB virgin-body buffer is full and, until
the ICAP answer begins, nothing wakes it again (Squid bug 5352): an ICAP server that answers
only after the whole body hangs every download of more than ~64 KiB from a fast origin.
avgate answers a RESPMOD with the first bytes that may leave (``[icap.trickle]``, default
keep-back of 32 KiB, less than Squid's buffer), so Squid goes on reading. Checked here with
Squid's default preview and avgate's defaults: 9/9 fetches of 200 KiB, 1 MiB and 20 MiB
objects arrive byte-identical; a paced download reaches the client while it arrives; an
infected large download is cut (curl: incomplete transfer, non-zero exit) and never complete.
"""

from __future__ import annotations

import hashlib
import http.server
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.corpus import MARKER, MARKER_NAME, MARKER_NDB
from tests.helpers import require_binary, wait_until

from .conftest import AvgateIcap, Squid, start_avgate, stop

pytestmark = pytest.mark.timeout(180)

KiB, MiB = 1024, 1024 * 1024
_rng = random.Random(14)
FILES = {f"/f{n}.bin": _rng.randbytes(n) for n in (200 * KiB, MiB, 20 * MiB)}
INFECTED = MARKER + _rng.randbytes(4 * MiB)  # the signature at the start, then padding
SMALL_INFECTED = b"x" * 1000 + MARKER + b"y" * 1000  # under the keep-back: a block page
PACED = _rng.randbytes(2 * MiB)
PACE = (128 * KiB, 0.1)  # bytes per step, seconds between steps: ~1.6 s for PACED
KEEP_BACK = 32 * KiB  # [icap.trickle] keep_back default


@pytest.fixture(scope="module")
def avgate_icap() -> Iterator[AvgateIcap]:
    """Overrides the conftest's: defaults plus the test marker signature."""
    db = Path(tempfile.mkdtemp(prefix="avgate-trickle-db-"))
    (db / "marker.ndb").write_text(MARKER_NDB)
    srv = start_avgate(extra=f'signatures = "{db / "marker.ndb"}"')
    try:
        yield srv
    finally:
        stop(srv.proc)
        shutil.rmtree(srv.workdir, ignore_errors=True)
        shutil.rmtree(db, ignore_errors=True)


@pytest.fixture(scope="module")
def origin() -> Iterator[str]:
    """Loopback origin: FILES at loopback speed, /infected.bin, /small-infected.bin and
    /paced.bin (PACED in steps of PACE)."""
    bodies = {**FILES, "/infected.bin": INFECTED, "/small-infected.bin": SMALL_INFECTED,
              "/paced.bin": PACED}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            body = bodies.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            try:
                if self.path != "/paced.bin":
                    self.wfile.write(body)
                    return
                step, pause = PACE
                for i in range(0, len(body), step):
                    self.wfile.write(body[i:i + step])
                    self.wfile.flush()
                    time.sleep(pause)
            except ConnectionError:
                pass  # a cut transfer: Squid closes its origin side

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Fetch:
    rc: int
    body: bytes
    first_byte: float  # seconds until the response began (curl time_starttransfer)
    total: float


Fetcher = Callable[..., Fetch]  # (url, time limit=30 s) -> Fetch, through Squid with curl


@pytest.fixture(scope="module")
def fetch(squid: Squid, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fetcher]:
    curl = require_binary("curl", "curl")
    out = tmp_path_factory.mktemp("curl") / "body"

    def run(url: str, limit: float = 30) -> Fetch:
        out.unlink(missing_ok=True)
        r = subprocess.run([curl, "-sS", "-o", str(out), "-x", squid.proxy, "-m", str(limit),
                            "-w", "%{time_starttransfer} %{time_total}", url],
                           capture_output=True, timeout=limit + 10)
        first, total = (float(x) for x in r.stdout.split())
        body = out.read_bytes() if out.exists() else b""
        return Fetch(r.returncode, body, first, total)

    yield run


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("path", list(FILES))
def test_nine_of_nine_downloads_complete_byte_identical(fetch: Fetcher, origin: str,
                                                        path: str) -> None:
    expected = sha(FILES[path])
    results = [fetch(origin + path, 15) for _ in range(9)]
    summary = [(f.rc, len(f.body), round(f.total, 2)) for f in results]
    assert all(f.rc == 0 and sha(f.body) == expected for f in results), summary


def test_paced_download_reaches_the_client_while_it_arrives(fetch: Fetcher,
                                                            origin: str) -> None:
    """The answer begins with the first bytes past the keep-back, not after the scan: the
    client's first byte comes long before the end of a ~1.6 s transfer."""
    f = fetch(origin + "/paced.bin")
    assert f.rc == 0 and sha(f.body) == sha(PACED)
    assert f.first_byte < f.total - 0.8, (f.first_byte, f.total)


def test_infected_large_download_is_cut(fetch: Fetcher, origin: str,
                                        avgate_icap: AvgateIcap) -> None:
    """Infected after the answer began: the ICAP connection is closed without the last
    chunk; Squid aborts the client transfer: curl gets a truncated prefix of the object
    (never its held-back tail) and exits non-zero; avgate logs the cut."""
    f = fetch(origin + "/infected.bin")
    assert f.rc != 0, "curl must see an incomplete transfer"
    assert len(f.body) <= len(INFECTED) - KEEP_BACK
    assert f.body == INFECTED[:len(f.body)]  # the original bytes, not a page
    wait_until(lambda: '"cut"' in avgate_icap.output(), timeout=10)
    line = next(ln for ln in avgate_icap.output().splitlines() if '"cut"' in ln)
    assert MARKER_NAME in line and "early_bytes" in line


def test_small_infected_download_still_gets_the_block_page(fetch: Fetcher,
                                                           origin: str) -> None:
    """An object that ends within the keep-back is answered after its verdict: the
    browser gets the 403 block page."""
    f = fetch(origin + "/small-infected.bin")
    assert f.rc == 0
    assert MARKER_NAME.encode() in f.body and MARKER not in f.body
