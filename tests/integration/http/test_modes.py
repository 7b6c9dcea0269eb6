"""HTTP API modes that need their own server: token-protected scanning, TLS, a failing
engine, and a large streamed upload with the server's memory measured."""

from __future__ import annotations

import os
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import EICAR, TOKEN, HttpEnv


def test_scan_requires_token(make_http: Callable[..., HttpEnv]) -> None:
    env = make_http(http=f'tokens = ["{TOKEN}"]\nscan_requires_token = true')
    with httpx.Client(base_url=env.base_url, timeout=30) as c:
        r = c.post("/v1/scan", content=EICAR)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert c.post("/v1/scan", content=b"x",
                      headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = c.post("/v1/scan", content=EICAR, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json()["status"] == "infected"
        # health, metrics and version stay open (monitoring)
        assert c.get("/healthz").status_code == 200


def test_failing_engine_is_503_with_enforce_and_unhealthy(
        make_http: Callable[..., HttpEnv]) -> None:
    # fault injection: the only engine is a clamd nobody listens on
    env = make_http("""
[[engines]]
type = "clamd"
servers = ["tcp://127.0.0.1:1"]
connect_timeout = 1
""")
    with httpx.Client(base_url=env.base_url, timeout=30) as c:
        r = c.post("/v1/scan", content=b"anything")
        assert r.status_code == 200 and r.json()["status"] == "error" and r.json()["reason"]
        r = c.post("/v1/scan?enforce=true", content=b"anything")
        assert r.status_code == 503
        assert r.json()["error"] == "Virus scanner unavailable"
        assert r.json()["status"] == "error"
        h = c.get("/healthz")
        assert h.status_code == 503 and h.json()["status"] == "unavailable"


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                        "-keyout", str(key), "-out", str(cert), "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                       capture_output=True, timeout=60)
    if r.returncode != 0:
        pytest.fail(f"openssl failed: {r.stderr.decode(errors='replace')}")
    return cert, key


def test_tls(make_http: Callable[..., HttpEnv], tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    env = make_http(http=f'tls_cert = "{cert}"\ntls_key = "{key}"')
    assert env.base_url.startswith("https://")
    trust = ssl.create_default_context(cafile=str(cert))
    with httpx.Client(base_url=env.base_url, timeout=30, verify=trust) as c:
        r = c.post("/v1/scan", content=EICAR)
        assert r.status_code == 200 and r.json()["status"] == "infected"
    plain = env.base_url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"{plain}/v1/scan", content=b"x", timeout=5)


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


# 300 MiB by default to keep the test quick; AVGATE_BIG_UPLOAD_MIB=1024 for the full GiB
UPLOAD = int(os.environ.get("AVGATE_BIG_UPLOAD_MIB", "300")) * 1024 * 1024


def test_large_streamed_upload_does_not_sit_in_memory(
        make_http: Callable[..., HttpEnv]) -> None:
    env = make_http(http='max_upload_size = "2 GiB"')
    assert env.serve.proc is not None
    pid = env.serve.proc.pid
    block = bytes(range(256)) * 4096  # 1 MiB, not all zeros

    def body() -> Iterator[bytes]:
        for _ in range(UPLOAD // len(block)):
            yield block

    with httpx.Client(base_url=env.base_url, timeout=60) as c:
        c.post("/v1/scan", content=b"warm-up")  # imports and first-request allocations
        before = _rss_kib(pid, "VmRSS")
        started = time.monotonic()
        r = c.post("/v1/scan", content=body())
        elapsed = time.monotonic() - started
    peak = _rss_kib(pid, "VmHWM")  # the process's peak resident set
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["size"] == UPLOAD
    assert result["status"] == "skipped"  # over max_scan_size: not scanned, never "clean"
    growth_mib = (peak - before) / 1024
    print(f"{UPLOAD >> 20} MiB upload: {elapsed:.1f}s, peak RSS growth {growth_mib:.1f} MiB")
    assert growth_mib < 64, f"RSS grew by {growth_mib:.1f} MiB during a {UPLOAD >> 20} MiB upload"


def test_enforce_follows_a_policy_reject(make_http: Callable[..., HttpEnv]) -> None:
    """enforce=true answers 403 for what the policy rejects, not only for infected objects
    (e.g. content that hit a structural limit)."""
    env = make_http("""
[[policy.rules]]
name = "no-big-clean"
status = "clean"
size = "100-"
action = "reject"
reply = "552 5.3.4 Not wanted here"
""")
    with httpx.Client(base_url=env.base_url, timeout=30) as c:
        r = c.post("/v1/scan?enforce=true", content=b"x" * 200)
        assert r.status_code == 403 and r.json()["status"] == "clean"
        assert r.json()["error"] == "Blocked by policy: Not wanted here"
        assert c.post("/v1/scan?enforce=true", content=b"x").status_code == 200
        assert c.post("/v1/scan", content=b"x" * 200).status_code == 200  # no enforce
        r = c.post("/v1/scan?enforce=true", files={"a": ("a.txt", b"small"),
                                                   "b": ("b.txt", b"y" * 200)})
        assert r.status_code == 403
        assert [x.get("error") for x in r.json()] == [None, "Blocked by policy: Not wanted here"]
