"""The scanning HTTP proxy with real clients (curl, wget, httpx) and a real origin (nginx):
clean objects arrive byte-identical, EICAR and the test signature are blocked, uploads are
scanned before they are forwarded, CONNECT follows the ACLs, upstream failures become
502/504 pages, and every request gets an access-log line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from tests.clamd_daemon import EICAR
from tests.helpers import require_binary
from tests.integration.http_proxy.conftest import (
    CLEAN_SIZE,
    FILES,
    FaultOrigin,
    Nginx,
    Proxy,
    sha256,
)


def curl(proxy: Proxy, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    binary = require_binary("curl", "curl")
    return subprocess.run([binary, "-sS", "-x", proxy.url, *args], capture_output=True,
                          timeout=timeout, check=False)


def test_clean_download_is_byte_identical_curl(proxy: Proxy, nginx: Nginx,
                                                tmp_path: Path) -> None:
    out = tmp_path / "clean.bin"
    r = curl(proxy, "-o", str(out), "-w", "%{http_code}", nginx.url("clean.bin"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"200"
    assert sha256(out.read_bytes()) == sha256(FILES["clean.bin"])
    scan = proxy.wait_event(lambda e: e.get("event") == "scan"
                            and e.get("ids", {}).get("url") == nginx.url("clean.bin"))  # type: ignore[union-attr]
    assert scan["status"] == "clean" and scan["actions"] == ["accept"]
    assert scan["frontend"] == "http_proxy" and scan["size"] == CLEAN_SIZE
    access = proxy.wait_event(lambda e: e.get("event") == "access"
                              and e.get("url") == nginx.url("clean.bin"))
    assert access["status"] == 200 and access["bytes"] == CLEAN_SIZE
    assert access["verdict"] == "clean" and access["method"] == "GET"
    assert isinstance(access["ms"], float)
    assert access["client"] == "127.0.0.1"


def test_wget_download(proxy: Proxy, nginx: Nginx, tmp_path: Path) -> None:
    wget = require_binary("wget", "wget")
    out = tmp_path / "w.bin"
    r = subprocess.run([wget, "-q", "-e", "use_proxy=yes", "-e", f"http_proxy={proxy.url}",
                        "-O", str(out), nginx.url("clean.bin")], capture_output=True,
                       timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    assert sha256(out.read_bytes()) == sha256(FILES["clean.bin"])
    r = subprocess.run([wget, "-q", "-e", "use_proxy=yes", "-e", f"http_proxy={proxy.url}",
                        "-O", str(tmp_path / "e"), nginx.url("eicar.com")],
                       capture_output=True, timeout=30, check=False)
    assert r.returncode == 8  # wget: the server answered with an error (403)


def test_httpx_keep_alive_and_via(proxy: Proxy, nginx: Nginx) -> None:
    with httpx.Client(proxy=proxy.url, timeout=20) as client:
        first = client.get(nginx.url("small.txt"))
        second = client.get(nginx.url("small.txt"))
        head = client.head(nginx.url("clean.bin"))
    assert first.status_code == second.status_code == 200
    assert first.content == second.content == FILES["small.txt"]
    assert "avgate-test" in first.headers["via"]
    assert head.status_code == 200 and head.headers["content-length"] == str(CLEAN_SIZE)
    assert head.content == b""


def test_eicar_download_gets_the_block_page(proxy: Proxy, nginx: Nginx) -> None:
    r = curl(proxy, "-w", "\n%{http_code}", nginx.url("eicar.com"))
    body, _, code = r.stdout.rpartition(b"\n")
    assert code == b"403"
    assert b"Eicar-Test-Signature" in body and EICAR not in body
    scan = proxy.wait_event(lambda e: e.get("event") == "scan"
                            and e.get("ids", {}).get("url") == nginx.url("eicar.com"))  # type: ignore[union-attr]
    assert scan["status"] == "infected" and scan["actions"] == ["block"]
    assert scan["http_status"] == 403


def test_label_does_not_exempt_from_scanning(proxy: Proxy, nginx: Nginx) -> None:
    r = curl(proxy, "-o", "/dev/null", "-w", "%{http_code}", nginx.url("image.png"))
    assert r.stdout == b"403"


def test_large_infected_download_is_cut_with_keep_back(proxy: Proxy, nginx: Nginx,
                                                       tmp_path: Path) -> None:
    """Keep-back sends the start at once; the signature in the middle → the connection is
    cut before the end: the client never has the whole file."""
    out = tmp_path / "m.bin"
    r = curl(proxy, "-o", str(out), nginx.url("marker.bin"))
    assert r.returncode != 0
    assert out.stat().st_size < len(FILES["marker.bin"])
    scan = proxy.wait_event(lambda e: e.get("event") == "scan"
                            and e.get("ids", {}).get("url") == nginx.url("marker.bin"))  # type: ignore[union-attr]
    assert scan["status"] == "infected" and scan["actions"] == ["cut"]


def test_infected_upload_is_refused_and_never_forwarded(proxy: Proxy,
                                                        fault_origin: FaultOrigin) -> None:
    r = curl(proxy, "-w", "\n%{http_code}", "--data-binary", EICAR,
             fault_origin.url("/upload-eicar"))
    assert r.stdout.endswith(b"403")
    assert b"Eicar-Test-Signature" in r.stdout
    clean = b"just some clean form data\n" * 1000
    r = curl(proxy, "-w", "\n%{http_code}", "-H", "Expect: 100-continue", "--data-binary",
             clean, fault_origin.url("/upload-clean"))
    assert r.stdout.endswith(b"200"), r
    assert fault_origin.requests_to("/upload-eicar") == []
    [seen] = fault_origin.requests_to("/upload-clean")
    assert seen.body == clean
    scan = proxy.wait_event(lambda e: e.get("event") == "scan" and e.get("object") == "upload"
                            and e.get("status") == "infected")
    assert scan["actions"] == ["block"]


def test_chunked_upload_is_scanned_and_forwarded(proxy: Proxy,
                                                 fault_origin: FaultOrigin) -> None:
    with httpx.Client(proxy=proxy.url, timeout=20) as client:
        r = client.put(fault_origin.url("/upload-chunked"),
                       content=iter([b"part one,", b" part two"]))
        assert r.status_code == 200
        bad = client.put(fault_origin.url("/upload-chunked-eicar"), content=iter([EICAR]))
        assert bad.status_code == 403
    [seen] = fault_origin.requests_to("/upload-chunked")
    assert seen.body == b"part one, part two"
    assert fault_origin.requests_to("/upload-chunked-eicar") == []


def test_connect_follows_the_acl(proxy: Proxy, nginx: Nginx, tmp_path: Path) -> None:
    out = tmp_path / "t.bin"
    # allowed port: tunnelled, not inspected (the EICAR file arrives through a tunnel)
    r = curl(proxy, "-p", "-o", str(out), nginx.url("eicar.com"))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == EICAR
    # any other port: refused
    r = curl(proxy, "-p", "-o", "/dev/null", "http://127.0.0.1:9/")
    assert r.returncode != 0
    assert b"403" in r.stderr
    access = proxy.wait_event(lambda e: e.get("event") == "access"
                              and e.get("method") == "CONNECT" and e.get("status") == 403)
    assert access["acl"] == "default:connect"


def test_acl_deny_method(proxy: Proxy, nginx: Nginx) -> None:
    r = curl(proxy, "-X", "DELETE", "-w", "\n%{http_code}", nginx.url("small.txt"))
    assert r.stdout.endswith(b"403")
    assert b"no-delete" in r.stdout


def test_upstream_errors_are_502_and_504(proxy: Proxy, fault_origin: FaultOrigin) -> None:
    from tests.clamd_daemon import free_port

    r = curl(proxy, "-w", "\n%{http_code}", f"http://127.0.0.1:{free_port()}/")
    assert r.stdout.endswith(b"502")
    r = curl(proxy, "-w", "\n%{http_code}", fault_origin.url("/hang"))  # read_timeout = 1.5
    assert r.stdout.endswith(b"504")
    r = curl(proxy, "-w", "\n%{http_code}", fault_origin.url("/huge-headers"))
    assert r.stdout.endswith(b"502")
    r = curl(proxy, "-w", "\n%{http_code}", "http://no-such-host.invalid/")
    assert r.stdout.endswith(b"502")


def test_origin_closing_mid_body(proxy: Proxy, fault_origin: FaultOrigin,
                                 tmp_path: Path) -> None:
    out = tmp_path / "partial"
    r = curl(proxy, "-o", str(out), "-w", "%{http_code}", fault_origin.url("/close-mid-body"))
    # 1000 of 100000 bytes, all kept back: nothing of the object went out, so the client
    # gets a 502 page (had part of it gone out, the connection would be cut instead)
    assert (r.returncode, r.stdout) == (0, b"502"), r
    assert b"x" * 100 not in out.read_bytes()


@pytest.mark.parametrize("target", ["/", "https://127.0.0.1/"])
def test_non_proxy_requests(proxy: Proxy, target: str) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        answer = s.recv(65536)
    assert answer.split(b"\r\n", 1)[0] in (b"HTTP/1.1 400 Bad Request",
                                          b"HTTP/1.1 501 Not Implemented")
