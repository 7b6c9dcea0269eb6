"""The proxy in the test's own event loop, with a real Gateway (embedded engine, scan
workers) and a loopback origin written for each fault: over ``max_scan_size`` (policy:
pass, logged), a scan slower than ``patience`` (policy's error path: 503), trickling off
(nothing before the verdict), a scanner error (503), an HTTP/1.0 client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from avgate import config
from avgate.frontends.http_proxy.proxy import ProxyServer
from avgate.frontends.http_proxy.settings import HttpProxySettings
from avgate.frontends.listen import ListenOptions
from avgate.gateway import Gateway
from avgate.observability import ScanLog
from avgate.policy import Policy
from avgate.result import ScanResult, ScanStatus
from avgate.scan import ScanService
from tests.clamd_daemon import EICAR

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Env:
    gateway: Gateway
    server: ProxyServer
    origin_port: int
    log_path: Path

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.origin_port}{path}"

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.log_path.read_text().splitlines() if x.strip()]


BODIES = {"/small": b"small clean body\n", "/big": bytes(range(256)) * 40,
          "/eicar": EICAR}


ORIGIN_CONNECTIONS: list[int] = []  # one entry per connection the origin accepted


async def _origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    ORIGIN_CONNECTIONS.append(1)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            if path == "/stall":  # 1000 of 100000 bytes, then silence until the proxy leaves
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"s" * 1000)
                await writer.drain()
                await reader.read()
                return
            body = BODIES.get(path, b"")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def scanner(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ScanService]:
    """One started scan service (embedded engine, one scan worker) for the module: the
    workers start once; each test builds its own Gateway (config, policy, log) on it."""
    gateway = Gateway.from_config(config.loads("[scan]\nworkers = 1\n"))
    await gateway.start()
    yield gateway.scanner
    await gateway.close()


@pytest_asyncio.fixture(loop_scope="module")
async def make_env(scanner: ScanService,
                   tmp_path: Path) -> AsyncIterator[Callable[[str], Awaitable[Env]]]:
    made: list[tuple[ProxyServer, asyncio.Server]] = []

    async def make(toml: str) -> Env:
        origin = await asyncio.start_server(_origin, "127.0.0.1", 0)
        cfg = config.loads(f"""
[quarantine]
path = "{tmp_path / 'q'}"
{toml}
""")
        log_path = tmp_path / "scan.log"
        gateway = Gateway(cfg, scanner, Policy.from_settings(cfg.policy),
                          log=ScanLog(str(log_path)))
        settings = cfg.http_proxy
        assert isinstance(settings, HttpProxySettings)
        server = await ProxyServer(gateway, settings, ListenOptions()).start()
        made.append((server, origin))
        return Env(gateway, server, origin.sockets[0].getsockname()[1], log_path)

    yield make
    for server, origin in made:
        await server.aclose()
        origin.close()


async def test_over_max_scan_size_passes_by_policy(
        make_env: Callable[[str], Awaitable[Env]]) -> None:
    env = await make_env('[limits]\nmax_scan_size = 4000\n'
                         '[http_proxy]\nlisten = "127.0.0.1:0"\n')
    async with httpx.AsyncClient(proxy=env.proxy, timeout=20) as client:
        r = await client.get(env.url("/big"))
    assert r.status_code == 200 and r.content == BODIES["/big"]
    [scan] = [e for e in env.events() if e["event"] == "scan"]
    assert scan["status"] == "skipped" and "max_scan_size" in scan["reason"]
    assert scan["actions"] == ["accept"]
    [access] = [e for e in env.events() if e["event"] == "access"]
    assert access["verdict"] == "skipped" and access["bytes"] == len(BODIES["/big"])


async def test_over_max_scan_size_refused_by_policy(
        make_env: Callable[[str], Awaitable[Env]]) -> None:
    env = await make_env('[limits]\nmax_scan_size = 4000\n[policy]\nsize_action = "reject"\n'
                         '[http_proxy]\nlisten = "127.0.0.1:0"\n[http_proxy.trickle]\n'
                         'mode = "off"\n')
    async with httpx.AsyncClient(proxy=env.proxy, timeout=20) as client:
        r = await client.get(env.url("/big"))
        upload = await client.post(env.url("/small"), content=b"u" * 5000)
    assert r.status_code == 403 and b"max_scan_size" in r.content
    assert upload.status_code == 403


async def test_no_verdict_within_patience_takes_the_error_path(
        make_env: Callable[[str], Awaitable[Env]], monkeypatch: pytest.MonkeyPatch) -> None:
    env = await make_env('[http_proxy]\nlisten = "127.0.0.1:0"\n'
                         '[http_proxy.trickle]\npatience = 0.5\n')
    release = asyncio.Event()

    async def stuck(*args: object) -> ScanResult:
        await release.wait()
        raise AssertionError("never reached: cancelled after patience")

    monkeypatch.setattr(env.gateway.scanner, "scan", stuck)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with httpx.AsyncClient(proxy=env.proxy, timeout=20) as client:
        r = await client.get(env.url("/small"))
    assert r.status_code == 503 and b"patience" in r.content
    assert loop.time() - started < 5


async def test_scanner_error_is_503_never_the_object(
        make_env: Callable[[str], Awaitable[Env]], monkeypatch: pytest.MonkeyPatch) -> None:
    env = await make_env('[http_proxy]\nlisten = "127.0.0.1:0"\n')

    async def broken(*args: object) -> ScanResult:
        return ScanResult(ScanStatus.ERROR, reason="engine down")

    monkeypatch.setattr(env.gateway.scanner, "scan", broken)
    async with httpx.AsyncClient(proxy=env.proxy, timeout=20) as client:
        r = await client.get(env.url("/small"))
    assert r.status_code == 503 and BODIES["/small"] not in r.content
    assert r.headers["retry-after"] == "60"


async def test_trickle_off_sends_nothing_before_the_verdict(
        make_env: Callable[[str], Awaitable[Env]], monkeypatch: pytest.MonkeyPatch) -> None:
    env = await make_env('[http_proxy]\nlisten = "127.0.0.1:0"\n'
                         '[http_proxy.trickle]\nmode = "off"\n')
    verdict = asyncio.Event()
    real = env.gateway.scanner.scan

    async def gated(*args: Any) -> ScanResult:
        await verdict.wait()
        return await real(*args)

    monkeypatch.setattr(env.gateway.scanner, "scan", gated)
    reader, writer = await asyncio.open_connection("127.0.0.1", env.server.port)
    writer.write(f"GET {env.url('/big')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await reader.read(1)  # nothing, not even the head
    verdict.set()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"content-length: %d" % len(BODIES["/big"]) in head.lower()
    body = await reader.readexactly(len(BODIES["/big"]))
    assert body == BODIES["/big"]
    writer.close()


async def test_http10_client_and_keep_alive_upstream(
        make_env: Callable[[str], Awaitable[Env]]) -> None:
    env = await make_env('[http_proxy]\nlisten = "127.0.0.1:0"\n')
    reader, writer = await asyncio.open_connection("127.0.0.1", env.server.port)
    writer.write(f"GET {env.url('/eicar')} HTTP/1.0\r\n\r\n".encode())
    await writer.drain()
    answer = await reader.read()  # HTTP/1.0: the proxy closes after the answer
    assert answer.startswith(b"HTTP/1.1 403") and b"Eicar-Test-Signature" in answer
    writer.close()
    async with httpx.AsyncClient(proxy=env.proxy, timeout=20) as client:
        for _ in range(3):
            r = await client.get(env.url("/small"))
            assert r.content == BODIES["/small"]


async def test_allowed_clients(make_env: Callable[[str], Awaitable[Env]]) -> None:
    env = await make_env('[http_proxy]\nlisten = "127.0.0.1:0"\n'
                         'allowed_clients = ["192.0.2.0/24"]\n')
    async with httpx.AsyncClient(proxy=env.proxy, timeout=20) as client:
        r = await client.get(env.url("/small"))
    assert r.status_code == 403 and b"may not use the proxy" in r.content
    [access] = [e for e in env.events() if e["event"] == "access"]
    assert access["error"] == "client not in allowed_clients"
    env2 = await make_env('[http_proxy]\nlisten = "127.0.0.1:0"\n'
                          'allowed_clients = ["127.0.0.0/8"]\n')
    async with httpx.AsyncClient(proxy=env2.proxy, timeout=20) as client:
        r = await client.get(env2.url("/small"))
    assert r.status_code == 200


async def test_stalled_origin_times_out_while_trickling(
        make_env: Callable[[str], Awaitable[Env]]) -> None:
    """Trickle wake-ups every 0.2 s must not reset the upstream read timeout (1 s)."""
    env = await make_env('[http_proxy]\nlisten = "127.0.0.1:0"\nread_timeout = 1.0\n'
                         '[http_proxy.trickle]\nmode = "trickle"\ninterval = 0.2\n'
                         'chunk = 64\nkeep_back = 100\n')
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await asyncio.open_connection("127.0.0.1", env.server.port)
    writer.write(f"GET {env.url('/stall')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    async with asyncio.timeout(10):
        got = await reader.read()  # until the proxy closes
    writer.close()
    assert got.startswith(b"HTTP/1.1 200")  # trickling had started ...
    body = got.split(b"\r\n\r\n", 1)[1]
    assert 0 < len(body) < 1000  # ... (64 bytes per 0.2 s) and was cut after read_timeout
    assert loop.time() - started < 5
    [access] = [e for e in env.events() if e["event"] == "access"]
    assert access["cut"] is True


async def test_trickle_never_hands_over_a_whole_small_object(
        make_env: Callable[[str], Awaitable[Env]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow scan of a 68-byte object in trickle mode: the schedule (4 KiB per 0.1 s)
    would release all of it; the last keep_back bytes always wait, so the verdict still
    gets the block page."""
    env = await make_env('[http_proxy]\nlisten = "127.0.0.1:0"\n'
                         '[http_proxy.trickle]\nmode = "trickle"\ninterval = 0.1\n'
                         'chunk = "4 KiB"\n')
    real = env.gateway.scanner.scan

    async def slow(*args: Any) -> ScanResult:
        await asyncio.sleep(0.6)  # the fault under test: a scan slower than the schedule
        return await real(*args)

    monkeypatch.setattr(env.gateway.scanner, "scan", slow)
    async with httpx.AsyncClient(proxy=env.proxy, timeout=20) as client:
        r = await client.get(env.url("/eicar"))
    assert r.status_code == 403 and b"Eicar-Test-Signature" in r.content


def _own_address() -> str | None:
    """This machine's address on its default route (not loopback), if it has one."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: only picks the source address
        except OSError:
            return None
        addr: str = s.getsockname()[0]
    return None if addr.startswith("127.") else addr


async def test_remote_client_cannot_reach_loopback(
        make_env: Callable[[str], Awaitable[Env]]) -> None:
    own = _own_address()
    if own is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    env = await make_env(f'[http_proxy]\nlisten = "{own}:0"\n')
    reader, writer = await asyncio.open_connection(own, env.server.port)
    writer.write(f"GET {env.url('/small')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 403") and b"loopback" in answer


async def test_upstream_connections_are_shared_between_clients(
        make_env: Callable[[str], Awaitable[Env]]) -> None:
    env = await make_env('[http_proxy]\nlisten = "127.0.0.1:0"\n')
    before = len(ORIGIN_CONNECTIONS)
    for _ in range(3):  # three clients, one after the other, each on its own connection
        async with httpx.AsyncClient(proxy=env.proxy, timeout=20) as client:
            r = await client.get(env.url("/small"))
            assert r.content == BODIES["/small"]
    assert len(ORIGIN_CONNECTIONS) - before == 1
    assert len(env.server.pool) == 1
