"""Real parts for the HTTP proxy tests: Debian's nginx as the origin (started here, on a free
loopback port, unprivileged single-process mode, its own temp dir), a small Python origin
where a fault is needed (paced bodies, an origin that never answers, one that records what
reached it), ``avgate serve`` with an ``[http_proxy]`` section, and real Squid as a parent.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.clamd_daemon import EICAR, MARKER, free_port, write_signatures
from tests.helpers import require_binary, wait_until
from tests.integration.avgate_proc import AvgateServe
from tests.integration.icap.conftest import stop, wait_port

CLEAN_SIZE = 3 * 1024 * 1024
PACED_SIZE = 1536 * 1024  # sent over PACE_SECONDS by the Python origin
PACE_SECONDS = 3.0


def _random(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


FILES: dict[str, bytes] = {
    "clean.bin": _random(CLEAN_SIZE, 1),
    "small.txt": b"hello from nginx\n",
    "eicar.com": EICAR,
    # the test body signature in the middle of 2 MiB: found only if the whole body is scanned
    "marker.bin": _random(1 << 20, 2) + MARKER + _random(1 << 20, 3),
    "image.png": EICAR,  # EICAR labelled image/png
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- nginx -----------------------------------------------------------------------------------
@dataclass
class Nginx:
    port: int
    root: Path
    workdir: Path

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def access_log(self) -> str:
        path = self.workdir / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="session", name="nginx")
def nginx_fixture() -> Iterator[Nginx]:
    """Debian's nginx on a free loopback port: one process (``master_process off``, so it
    never changes user), everything under a temp dir."""
    binary = require_binary("nginx", "nginx")
    workdir = Path(tempfile.mkdtemp(prefix="avgate-nginx-"))
    root = workdir / "www"
    root.mkdir()
    for name, data in FILES.items():
        (root / name).write_bytes(data)
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(f"""daemon off;
master_process off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {workdir}/access.log;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    types {{ application/octet-stream bin com; text/plain txt; image/png png; }}
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location /echo {{ return 200 "host=$host\\n"; }}
    }}
}}
""")
    log = workdir / "nginx.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, "-p", str(workdir), "-c", str(conf), "-e",
                                 str(workdir / "error.log")], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc, 20, "nginx", workdir / "error.log")
        yield Nginx(port, root, workdir)
    finally:
        stop(proc, signal.SIGQUIT)
        shutil.rmtree(workdir, ignore_errors=True)


# -- a Python origin for faults --------------------------------------------------------------
@dataclass
class Seen:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class FaultOrigin:
    port: int
    seen: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def requests_to(self, prefix: str) -> list[Seen]:
        return [s for s in list(self.seen) if s.path.startswith(prefix)]


def paced_body(kind: str) -> bytes:
    """The paced objects: ``clean`` or ``marker`` (the signature at the start: a keep-back
    client receives the start, then the cut)."""
    body = _random(PACED_SIZE, 4)
    return MARKER + body[len(MARKER):] if kind == "marker" else body


@pytest.fixture(scope="session", name="fault_origin")
def fault_origin_fixture() -> Iterator[FaultOrigin]:
    state = FaultOrigin(0)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _record(self) -> bytes:
            n = int(self.headers.get("Content-Length", "0") or 0)
            body = self.rfile.read(n) if n else b""
            state.seen.append(Seen(self.command, self.path, list(self.headers.items()), body))
            return body

        def _reply(self, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._record()
            if self.path.startswith("/paced/"):
                self._paced(paced_body(self.path.rsplit("/", 1)[1]))
            elif self.path.startswith("/hang"):
                state.release.wait(30)
            elif self.path.startswith("/huge-headers"):
                self.send_response(200)
                for i in range(400):
                    self.send_header(f"X-Filler-{i}", "x" * 1000)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path.startswith("/close-mid-body"):
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                self.wfile.write(b"x" * 1000)
                self.wfile.flush()
                self.close_connection = True
            else:
                self._reply(b"ok\n")

        def do_POST(self) -> None:
            body = self._record()
            self._reply(b"stored %d bytes\n" % len(body))

        do_PUT = do_POST

        def _paced(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            steps = 40
            piece = len(body) // steps + 1
            for i in range(0, len(body), piece):
                self.wfile.write(body[i:i + piece])
                self.wfile.flush()
                time.sleep(PACE_SECONDS / steps)  # the fault under test: a slow origin

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()


# -- avgate serve with [http_proxy] ----------------------------------------------------------
@dataclass
class Proxy:
    serve: AvgateServe
    root: Path

    @property
    def port(self) -> int:
        return self.serve.port("http_proxy")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_events(self) -> list[dict[str, object]]:
        import json

        path = self.root / "scan.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wait_event(self, pred: Callable[[dict[str, object]], bool],
                   timeout: float = 10) -> dict[str, object]:
        found: list[dict[str, object]] = []

        def check() -> bool:
            found[:] = [e for e in self.log_events() if pred(e)]
            return bool(found)

        assert wait_until(check, timeout), self.log_events()[-5:]
        return found[-1]


def start_proxy(root: Path, http_proxy: str, extra: str = "") -> Proxy:
    write_signatures(root / "sigs")
    config = root / "avgate.toml"
    config.write_text(f"""
[log]
path = "{root / 'scan.log'}"
[quarantine]
path = "{root / 'quarantine'}"
[[engines]]
type = "embedded"
name = "embedded"
signatures = ["{root / 'sigs'}"]
[http_proxy]
listen = "127.0.0.1:0"
via = "avgate-test"
{http_proxy}
{extra}
""")
    serve = AvgateServe(config).start()
    return Proxy(serve, root)


@pytest.fixture(scope="session", name="proxy")
def proxy_fixture(nginx: Nginx, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """``avgate serve`` with the proxy: short timeouts for the hostile-input tests, keep-back
    trickling, CONNECT allowed to the nginx port as well as 443."""
    root = tmp_path_factory.mktemp("proxy")
    p = start_proxy(root, f"""read_timeout = 3
idle_timeout = 4
header_timeout = 1.5
max_header_size = "16 KiB"
max_request_line = "4 KiB"
[http_proxy.trickle]
mode = "keep_back"
keep_back = "64 KiB"
[[http_proxy.acl]]
name = "tunnel-to-nginx"
methods = "CONNECT"
ports = [443, {nginx.port}]
action = "pass"
[[http_proxy.acl]]
name = "no-delete"
methods = "DELETE"
action = "deny"
""")
    try:
        yield p
    finally:
        p.serve.stop()


# -- Squid as a parent -----------------------------------------------------------------------
@dataclass
class SquidParent:
    port: int
    workdir: Path

    def access_log(self) -> str:
        path = self.workdir / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="session", name="squid_parent")
def squid_parent_fixture() -> Iterator[SquidParent]:
    """Real Squid, loopback only, no cache, no adaptation: the parent proxy."""
    binary = require_binary("squid", "squid")
    workdir = Path(tempfile.mkdtemp(prefix="avgate-squidparent-"))
    port = free_port()
    user = ""
    if os.geteuid() == 0:
        shutil.chown(workdir, "proxy", "proxy")  # squid drops root for its files
        user = "cache_effective_user proxy\n"
    conf = workdir / "squid.conf"
    conf.write_text(f"""http_port 127.0.0.1:{port}
{user}pid_filename {workdir}/squid.pid
cache_log {workdir}/cache.log
access_log {workdir}/access.log
cache_store_log none
cache deny all
cache_mem 8 MB
coredump_dir {workdir}
acl localhost_src src 127.0.0.1/32
acl to_loopback_ports port 1-65535
http_access allow localhost_src
http_access deny all
shutdown_lifetime 0 seconds
dns_nameservers 127.0.0.1
hosts_file /etc/hosts
forwarded_for off
""")
    if os.geteuid() == 0:
        shutil.chown(conf, "proxy", "proxy")
    log = workdir / "squid.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, "-N", "-f", str(conf)], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc, 30, "squid", workdir / "cache.log")
        yield SquidParent(port, workdir)
    finally:
        stop(proc, signal.SIGINT)
        shutil.rmtree(workdir, ignore_errors=True)
