"""Trickling with a slow origin and a client read timeout (curl ``--speed-time``), and parent
proxy chaining through real Squid.

Keep-back: a paced clean download completes although it takes longer than the client's
read timeout; a paced infected one is cut (curl fails, the file is incomplete). Trickle
(Kernun) mode, through Squid as the parent: the same paced download completes, the bytes
before the verdict limited to ``chunk`` per ``interval``."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clamd_daemon import EICAR
from tests.helpers import require_binary
from tests.integration.http_proxy.conftest import (
    FILES,
    PACED_SIZE,
    FaultOrigin,
    Nginx,
    Proxy,
    SquidParent,
    paced_body,
    sha256,
    start_proxy,
)

READ_TIMEOUT = "2"  # the client gives up after 2 s without a byte; the origin takes 3 s


def paced_curl(proxy_url: str, url: str, out: Path) -> subprocess.CompletedProcess[bytes]:
    binary = require_binary("curl", "curl")
    return subprocess.run([binary, "-sS", "-x", proxy_url, "--speed-limit", "1",
                           "--speed-time", READ_TIMEOUT, "-o", str(out), url],
                          capture_output=True, timeout=60, check=False)


def test_keep_back_paced_downloads(proxy: Proxy, fault_origin: FaultOrigin,
                                   tmp_path: Path) -> None:
    """Both paced downloads at once (one origin pace for the two)."""
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}

    def fetch(kind: str) -> None:
        results[kind] = paced_curl(proxy.url, fault_origin.url(f"/paced/{kind}"),
                                   tmp_path / kind)

    threads = [threading.Thread(target=fetch, args=(k,)) for k in ("clean", "marker")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    clean, marker = results["clean"], results["marker"]
    assert clean.returncode == 0, clean.stderr
    assert sha256((tmp_path / "clean").read_bytes()) == sha256(paced_body("clean"))
    assert marker.returncode == 18, marker  # curl: transfer closed with data outstanding
    got = (tmp_path / "marker").stat().st_size
    assert 0 < got <= PACED_SIZE - 64 * 1024  # the tail was kept back
    cut = proxy.wait_event(lambda e: e.get("event") == "access" and e.get("cut") is True)
    assert cut["url"] == fault_origin.url("/paced/marker")


@pytest.fixture(scope="module")
def chained(nginx: Nginx, squid_parent: SquidParent,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    root = tmp_path_factory.mktemp("chained")
    p = start_proxy(root, f"""parent = "http://127.0.0.1:{squid_parent.port}"
[http_proxy.trickle]
mode = "trickle"
interval = 0.5
chunk = "4 KiB"
limit = "256 KiB"
[[http_proxy.acl]]
methods = "CONNECT"
ports = [{nginx.port}]
action = "pass"
""")
    try:
        yield p
    finally:
        p.serve.stop()


def test_parent_chaining_through_squid(chained: Proxy, nginx: Nginx,
                                       squid_parent: SquidParent, tmp_path: Path) -> None:
    curl = require_binary("curl", "curl")
    out = tmp_path / "c.bin"
    r = subprocess.run([curl, "-sS", "-x", chained.url, "-o", str(out), nginx.url("clean.bin")],
                       capture_output=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    assert sha256(out.read_bytes()) == sha256(FILES["clean.bin"])
    r = subprocess.run([curl, "-sS", "-x", chained.url, "-w", "\n%{http_code}",
                        nginx.url("eicar.com")], capture_output=True, timeout=30, check=False)
    assert r.stdout.endswith(b"403") and b"Eicar-Test-Signature" in r.stdout
    r = subprocess.run([curl, "-sS", "-x", chained.url, "-p", "-o", str(tmp_path / "t"),
                        nginx.url("eicar.com")], capture_output=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr  # CONNECT through the parent: a tunnel, no scan
    assert (tmp_path / "t").read_bytes() == EICAR
    log = squid_parent.access_log()
    assert nginx.url("clean.bin") in log and nginx.url("eicar.com") in log
    assert f"CONNECT 127.0.0.1:{nginx.port}" in log


def test_trickle_mode_paced_download_through_parent(chained: Proxy,
                                                    fault_origin: FaultOrigin,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "paced"
    r = paced_curl(chained.url, fault_origin.url("/paced/clean"), out)
    assert r.returncode == 0, r.stderr
    assert sha256(out.read_bytes()) == sha256(paced_body("clean"))
