"""clamd through a SOCKS5 proxy (Sun's SOCKS_HOST/PORT/USERNAME/PASSWORD): ``socks`` per
engine or per server. The proxy is an in-test SOCKS5 server that really relays to a fake
clamd (tests/integration/test_clamd_engine.py does the same with a real clamd)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from avgate import config
from avgate.engines.base import EngineContext
from avgate.engines.clamd import ClamdEngine, ClamdEngineSettings, redact_socks
from avgate.errors import ConfigError
from avgate.result import ScanStatus
from avgate.spool import Spool
from tests.unit.engines.socks5_server import Socks5Server
from tests.unit.engines.test_clamd_faults import FakeClamd, closed_port_url

pytestmark = pytest.mark.timeout(20)

PASSWORD = "s3cret-Pw"  # noqa: S105 - must never show up in results, reports, config show
SAMPLE = Spool.from_bytes(b"an object to scan " * 100)


@pytest.fixture
async def clamd() -> AsyncIterator[FakeClamd]:
    f = await FakeClamd("found", virus="Via.Proxy").start()
    yield f
    await f.stop()


@pytest.fixture
async def proxies() -> AsyncIterator[list[Socks5Server]]:
    started: list[Socks5Server] = []
    yield started
    for p in started:
        await p.stop()


async def proxy(proxies: list[Socks5Server], **kw: Any) -> Socks5Server:
    p = await Socks5Server(**kw).start()
    proxies.append(p)
    return p


def engine(*servers: Any, **kw: Any) -> ClamdEngine:
    kw.setdefault("connect_timeout", 2)
    kw.setdefault("scan_timeout", 2)
    return ClamdEngine(ClamdEngineSettings(servers=servers, **kw), EngineContext())


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def test_scan_through_an_authenticating_proxy(clamd: FakeClamd,
                                                     proxies: list[Socks5Server]) -> None:
    p = await proxy(proxies, user="avgate", password=PASSWORD)
    result = await engine(clamd.url, socks=p.url()).scan(SAMPLE)
    assert result.status is ScanStatus.INFECTED and result.virus == "Via.Proxy"
    assert p.logins == [("avgate", PASSWORD)]
    assert p.targets == [("127.0.0.1", port_of(clamd.url))]
    assert clamd.received == SAMPLE.size  # every byte went through the proxy
    assert p.relayed > SAMPLE.size


async def test_the_proxy_resolves_the_host_name(clamd: FakeClamd,
                                                proxies: list[Socks5Server]) -> None:
    # socks5h behaviour: clamd's name may only resolve on the proxy's side
    p = await proxy(proxies)
    url = f"tcp://localhost:{port_of(clamd.url)}"
    result = await engine(url, socks=p.url()).scan(SAMPLE)
    assert result.status is ScanStatus.INFECTED
    assert p.targets == [("localhost", port_of(clamd.url))]


async def test_per_server_proxy_overrides_the_engines(clamd: FakeClamd,
                                                      proxies: list[Socks5Server]) -> None:
    engine_proxy = await proxy(proxies)
    server_proxy = await proxy(proxies, user="u", password=PASSWORD)
    eng = engine({"url": clamd.url, "socks": server_proxy.url()}, socks=engine_proxy.url())
    assert (await eng.scan(SAMPLE)).status is ScanStatus.INFECTED
    assert len(server_proxy.targets) == 1 and engine_proxy.targets == []
    # socks = "" on a server: direct, whatever the engine says
    direct = engine({"url": clamd.url, "socks": ""}, socks=engine_proxy.url())
    assert (await direct.scan(SAMPLE)).status is ScanStatus.INFECTED
    assert engine_proxy.targets == []
    # without a proxy anywhere nothing changes
    assert (await engine(clamd.url).scan(SAMPLE)).status is ScanStatus.INFECTED


@pytest.mark.parametrize(("fault", "password", "reason"), [
    ("", "wrong", "SOCKS proxy"),
    ("refuse", PASSWORD, "SOCKS proxy"),
    ("close", PASSWORD, "SOCKS proxy"),
    ("garbage", PASSWORD, "SOCKS proxy"),
])
async def test_proxy_failures_are_errors(clamd: FakeClamd, proxies: list[Socks5Server],
                                         fault: str, password: str, reason: str) -> None:
    """clamd never answered: error (tempfail), not unknown — and no password in the reason."""
    p = await proxy(proxies, user="avgate", password=PASSWORD, fault=fault)
    result = await engine(clamd.url, socks=p.url(password=password)).scan(SAMPLE)
    assert result.status is ScanStatus.ERROR, result
    assert reason in result.reason and f"127.0.0.1:{p.port}" in result.reason
    assert PASSWORD not in result.reason and f":{password}@" not in result.reason
    assert clamd.connections == 0


async def test_proxy_down_is_an_error_and_fails_over(clamd: FakeClamd) -> None:
    dead = closed_port_url().replace("tcp://", f"socks5://u:{PASSWORD}@")
    result = await engine(clamd.url, socks=dead).scan(SAMPLE)
    assert result.status is ScanStatus.ERROR and "cannot connect" in result.reason
    assert PASSWORD not in result.reason
    # a second server reached directly takes over
    eng = engine({"url": clamd.url, "socks": dead}, clamd.url)
    assert (await eng.scan(SAMPLE)).status is ScanStatus.INFECTED


async def test_health_names_the_proxy_without_its_password(
        clamd: FakeClamd, proxies: list[Socks5Server]) -> None:
    p = await proxy(proxies, user="avgate", password=PASSWORD)
    eng = engine(clamd.url, "unix:/nonexistent/clamd.sock", socks=p.url())
    health = await eng.health()
    assert health["ok"] is True
    first, second = health["servers"]
    assert first["socks"] == f"socks5://avgate:***@127.0.0.1:{p.port}" and first["ok"]
    assert "socks" not in second  # unix sockets are reached directly
    assert PASSWORD not in json.dumps(health) and PASSWORD not in repr(eng.servers)


def test_config_keys_and_redaction() -> None:
    url = f"socks5://sun:{PASSWORD}@proxy.example:1080"
    cfg = config.from_dict({"engines": [{
        "type": "clamd", "socks": url,
        "servers": ["tcp://10.0.0.1:3310", {"url": "tcp://10.0.0.2:3310", "socks": ""},
                    "unix:/run/clamav/clamd.ctl"]}]})
    settings = cfg.engines[0]
    assert isinstance(settings, ClamdEngineSettings)
    servers = settings.server_list()
    assert [s.socks for s in servers] == [url, "", ""]
    shown = json.dumps(cfg.to_dict())
    assert PASSWORD not in shown and PASSWORD not in repr(settings)
    assert "socks5://sun:***@proxy.example:1080" in shown
    # config show keeps the plain form for servers without their own proxy
    assert cfg.to_dict()["engines"][0]["servers"] == [
        "tcp://10.0.0.1:3310", {"url": "tcp://10.0.0.2:3310", "socks": ""},
        "unix:/run/clamav/clamd.ctl"]
    assert redact_socks("socks5://[::1]:1080") == "socks5://[::1]:1080"


@pytest.mark.parametrize(("table", "message"), [
    ({"socks": "http://proxy:3128"}, "expected socks5://"),
    ({"socks": f"socks5://u:{PASSWORD}@proxy"}, "missing proxy port"),
    ({"socks": f"socks5://u:{PASSWORD}@:1080"}, "missing proxy host"),
    ({"socks": "socks5://user@proxy:1080"}, "both user and password"),
    ({"socks": f"socks5://u:{PASSWORD}@proxy:1080/x"}, "nothing after"),
    ({"servers": [{"url": "unix:/run/clamd.ctl", "socks": "socks5://p:1080"}]},
     "tcp:// servers only"),
    ({"servers": [{"url": "tcp://h:1", "proxy": "x"}]}, "proxy"),
    ({"servers": [{"socks": "socks5://p:1080"}]}, "url"),
    ({"servers": ["tcp://h:1", 5]}, "expected a URL string or a table"),
])
def test_bad_socks_config_names_the_key_never_the_password(table: dict[str, Any],
                                                           message: str) -> None:
    with pytest.raises(ConfigError, match=message) as exc:
        config.from_dict({"engines": [{"type": "clamd", **table}]})
    assert str(exc.value).startswith("<config>: engines[0]")
    assert PASSWORD not in str(exc.value)


def test_default_has_no_proxy() -> None:
    settings = ClamdEngineSettings()
    assert settings.socks is None
    assert all(not s.socks for s in settings.server_list())
