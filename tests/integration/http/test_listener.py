"""The HTTP listener in-process: bound by ``listen.bind``, options from ``serve``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from avgate import config as config_mod
from avgate.frontends import http as fe
from avgate.frontends.listen import ListenError, ListenOptions
from avgate.gateway import Gateway


@pytest.fixture
async def make_gateway(tmp_path: Path) -> AsyncIterator[Callable[..., Gateway]]:
    """Gateways with an ``[http]`` section of the given keys (closed afterwards)."""
    made: list[Gateway] = []

    def make(**http: Any) -> Gateway:
        cfg = config_mod.from_dict({"http": http, "scan": {"cache": False},
                                    "quarantine": {"path": str(tmp_path / "q")}})
        made.append(Gateway.from_config(cfg))
        return made[-1]

    yield make
    for gateway in made:
        await gateway.close()


async def test_unix_socket_listener(tmp_path: Path,
                                    make_gateway: Callable[..., Gateway]) -> None:
    path = tmp_path / "http.sock"
    gateway = make_gateway(listen=f"unix:{path}")
    await gateway.start()
    # a serve worker that does not own the unix sockets opens nothing
    assert await fe.start(gateway, ListenOptions(unix_sockets=False)) == []
    assert not path.exists()
    (listener,) = await fe.start(gateway, ListenOptions())
    try:
        assert listener.describe() == f"http://unix:{path} (HTTP API)"
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        async with httpx.AsyncClient(transport=transport, base_url="http://avgate") as c:
            r = await c.post("/v1/scan", content=b"over a unix socket")
        assert r.status_code == 200 and r.json()["status"] == "clean"
        # a live socket is never taken over: the second listener fails and says why
        with pytest.raises(ListenError, match="another process is listening"):
            await fe.start(gateway, ListenOptions())
    finally:
        await listener.aclose()


async def test_reuse_port_lets_workers_share_the_port(
        make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway(listen="127.0.0.1:0")
    (first,) = await fe.start(gateway, ListenOptions(reuse_port=True))
    assert isinstance(first, fe.HttpListener)
    port = first.port
    shared = make_gateway(listen=f"127.0.0.1:{port}")
    try:
        (second,) = await fe.start(shared, ListenOptions(reuse_port=True))
        await second.aclose()
        with pytest.raises(ListenError, match=f"http: cannot listen on 127.0.0.1:{port}"):
            await fe.start(shared, ListenOptions())  # without SO_REUSEPORT: in use
    finally:
        await first.aclose()


async def test_drain_timeout_comes_from_the_options(
        make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway(listen="127.0.0.1:0")
    (listener,) = await fe.start(gateway, ListenOptions(drain_timeout=7.5))
    assert isinstance(listener, fe.HttpListener)
    try:
        assert listener.server.config.timeout_graceful_shutdown == 7
    finally:
        await listener.aclose()


async def test_settings_are_read_per_request(make_gateway: Callable[..., Gateway]) -> None:
    """After a reload (here: a new ``gateway.config``) the next request uses the new tokens."""
    gateway = make_gateway(listen="127.0.0.1:0", tokens=["first-token"],
                           scan_requires_token=True)
    await gateway.start()
    (listener,) = await fe.start(gateway, ListenOptions())
    assert isinstance(listener, fe.HttpListener)
    url = f"http://127.0.0.1:{listener.port}"
    try:
        async with httpx.AsyncClient(base_url=url) as c:
            def scan(token: str) -> Any:
                return c.post("/v1/scan", content=b"x",
                              headers={"Authorization": f"Bearer {token}"})

            assert (await scan("first-token")).status_code == 200
            reloaded = config_mod.from_dict({"http": {"listen": "127.0.0.1:0",
                                                      "tokens": ["second-token"],
                                                      "scan_requires_token": True}})
            gateway.config = reloaded
            assert (await scan("first-token")).status_code == 401
            assert (await scan("second-token")).status_code == 200
    finally:
        await listener.aclose()
