"""Real ICAP peers for the integration tests: c-icap (virus_scan → test clamd), ``avgate serve``
with only ``[icap]``, a loopback origin HTTP server, and Squid using avgate for RESPMOD/REQMOD.

Every daemon runs on a free loopback port with its own config and temp dir, and is stopped
after the module. A missing Debian package skips (non-root) or fails (root: CI installs them).
"""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.clamd_daemon import EICAR, ClamdDaemon, free_port
from tests.helpers import require_binary

CICAP_MODULES = "/usr/lib/x86_64-linux-gnu/c_icap"
ROOT = Path(__file__).resolve().parents[3]


def wait_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float,
              what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            detail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}: {detail}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout}s")


def stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# -- c-icap -----------------------------------------------------------------------------------
@dataclass
class CIcap:
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    def url(self, service: str = "avscan") -> str:
        return f"icap://127.0.0.1:{self.port}/{service}"


@pytest.fixture(scope="session")
def cicap(clamd: ClamdDaemon) -> Iterator[CIcap]:
    """Real c-icap with virus_scan (libc-icap-mod-virus-scan) using the test clamd."""
    binary = require_binary("c-icap", "c-icap")
    if not Path(CICAP_MODULES, "virus_scan.so").exists():
        if os.geteuid() == 0:
            pytest.fail("virus_scan.so missing: apt-get install libc-icap-mod-virus-scan")
        pytest.skip("libc-icap-mod-virus-scan not installed")
    workdir = Path(tempfile.mkdtemp(prefix="avgate-cicap-"))
    (workdir / "tmp").mkdir()
    port = free_port()
    conf = workdir / "c-icap.conf"
    user = "User root\nGroup root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"""PidFile {workdir}/c-icap.pid
CommandsSocket {workdir}/c-icap.ctl
{user}Timeout 60
MaxKeepAliveRequests 100
KeepAliveTimeout 60
StartServers 1
MaxServers 2
MinSpareThreads 2
MaxSpareThreads 8
ThreadsPerChild 8
Port 127.0.0.1:{port}
TmpDir {workdir}/tmp
MaxMemObject 131072
DebugLevel 1
ModulesDir {CICAP_MODULES}
ServicesDir {CICAP_MODULES}
TemplateDir /usr/share/c_icap/templates/
TemplateDefaultLanguage en
LoadMagicFile /etc/c-icap/c-icap.magic
ServerLog {workdir}/server.log
AccessLog {workdir}/access.log
Module common clamd_mod.so
clamd_mod.ClamdSocket {clamd.socket_path}
Service antivirus_module virus_scan.so
ServiceAlias avscan virus_scan?allow204=on&sizelimit=off&mode=simple
virus_scan.ScanFileTypes TEXT DATA EXECUTABLE ARCHIVE GIF JPEG MSOFFICE
virus_scan.MaxObjectSize 5M
virus_scan.DefaultEngine clamd
""")
    log = workdir / "c-icap.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, "-N", "-f", str(conf)], stdout=out,
                                stderr=subprocess.STDOUT)
    daemon = CIcap(port, workdir, proc)
    try:
        wait_port(port, proc, 20, "c-icap", log)
        yield daemon
    finally:
        stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


# -- avgate serve with only [icap] -----------------------------------------------------------
@dataclass
class AvgateIcap:
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"icap://127.0.0.1:{self.port}/avscan"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_avgate(extra_icap: str = "", extra: str = "") -> AvgateIcap:
    workdir = Path(tempfile.mkdtemp(prefix="avgate-icapsrv-"))
    port = free_port()
    config = workdir / "avgate.toml"
    config.write_text(f"""[icap]
listen = "127.0.0.1:{port}"
service = "avscan"
idle_timeout = 5
{extra_icap}

[quarantine]
path = "{workdir}/quarantine"

[[engines]]
type = "embedded"
name = "embedded"
{extra}
""")
    log = workdir / "serve.out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from avgate.cli import app; app()", "serve",
             "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, cwd=workdir, env=env)
    srv = AvgateIcap(port, workdir, proc, log)
    try:
        wait_port(port, proc, 30, "avgate serve", log)
    except BaseException:
        stop(proc)
        raise
    return srv


@pytest.fixture(scope="module")
def avgate_icap() -> Iterator[AvgateIcap]:
    """``avgate serve`` with only an [icap] listener and the embedded engine."""
    srv = start_avgate()
    try:
        yield srv
    finally:
        stop(srv.proc)
        if not os.environ.get("AVGATE_KEEP_TMP"):
            shutil.rmtree(srv.workdir, ignore_errors=True)


# -- origin HTTP server ----------------------------------------------------------------------
# 60 KiB: over the 1 KiB preview (so 100 Continue and more chunks), under 64 KiB: Squid 5.7
# stops reading a larger origin body until the ICAP server starts answering (seen with
# c-icap's virus_scan too), and we answer only after the verdict (no trickling).
CLEAN_BODY = bytes(range(256)) * 240
FILES = {
    "/clean.bin": CLEAN_BODY,
    "/small.txt": b"hello from the origin\n",
    "/eicar.com": EICAR,
    "/image.png": EICAR,  # served as image/png: still scanned with skip_content_types
}


@dataclass
class Origin:
    port: int
    uploads: list[bytes] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    """A loopback HTTP server serving FILES and recording POST bodies."""
    state = Origin(0)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            body = FILES.get(self.path.split("?")[0])
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            ctype = "image/png" if self.path.endswith(".png") else "application/octet-stream"
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            n = int(self.headers.get("Content-Length", "0"))
            data = self.rfile.read(n)
            state.uploads.append(data)
            reply = b"stored %d bytes\n" % len(data)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


# -- Squid --------------------------------------------------------------------------------
@dataclass
class Squid:
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes]

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def squid(avgate_icap: AvgateIcap) -> Iterator[Squid]:
    """Real Squid (private config, loopback only, no cache) adapting through avgate."""
    binary = require_binary("squid", "squid")
    workdir = Path(tempfile.mkdtemp(prefix="avgate-squid-"))
    port = free_port()
    user = ""
    if os.geteuid() == 0:
        # Squid drops root privileges to cache_effective_user: it must write its files
        shutil.chown(workdir, "proxy", "proxy")
        user = "cache_effective_user proxy\n"
    icap = f"icap://127.0.0.1:{avgate_icap.port}/avscan"
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
http_access allow localhost_src
http_access deny all
shutdown_lifetime 0 seconds
dns_nameservers 127.0.0.1
hosts_file /etc/hosts
forwarded_for off
via off
icap_enable on
icap_preview_enable on
icap_send_client_ip on
icap_service svc_resp respmod_precache bypass=0 {icap}
icap_service svc_req reqmod_precache bypass=0 {icap}
adaptation_access svc_resp allow all
adaptation_access svc_req allow all
""")
    if os.geteuid() == 0:
        shutil.chown(conf, "proxy", "proxy")
    log = workdir / "squid.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, "-N", "-f", str(conf)], stdout=out,
                                stderr=subprocess.STDOUT)
    sq = Squid(port, workdir, proc)
    try:
        wait_port(port, proc, 30, "squid", workdir / "cache.log")
        yield sq
    finally:
        stop(proc, signal.SIGINT)
        if not os.environ.get("AVGATE_KEEP_TMP"):
            shutil.rmtree(workdir, ignore_errors=True)
