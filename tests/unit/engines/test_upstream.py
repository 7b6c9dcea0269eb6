"""The upstream helper shared by the clamd and ICAP engines: order, mark down, retry, budget.

No sockets and no sleeping: attempts are coroutines, the health clock is a counter.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from avgate.engines.base import EngineSettings
from avgate.engines.upstream import Bound, Upstream, Upstreams, UpstreamSettings
from avgate.errors import EngineProtocolError, EngineTimeout, EngineUnavailable

pytestmark = pytest.mark.timeout(10)


class Settings(UpstreamSettings):
    type: str = "test"
    name: str = "test"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass(slots=True, eq=False)
class Server(Upstream):
    answer: str = "ok"  # "ok", "refuse", "garbage", "hang"


def upstreams(*answers: str, clock: Clock | None = None, **kw: Any) -> Upstreams[Server]:
    servers = [Server(f"s{i}", answer=a) for i, a in enumerate(answers)]
    return Upstreams(servers, Settings(**kw), clock=clock or Clock())


tried: list[str] = []


async def attempt(server: Server) -> str:
    tried.append(server.url)
    if server.answer == "refuse":
        raise EngineUnavailable("refused")
    if server.answer == "garbage":
        raise EngineProtocolError("garbage")
    if server.answer == "hang":
        await asyncio.sleep(3600)
    return server.url


def far() -> float:
    return asyncio.get_running_loop().time() + 60


@pytest.fixture(autouse=True)
def _reset() -> None:
    tried.clear()


def test_settings_are_engine_settings_with_shared_defaults() -> None:
    s = Settings()
    assert isinstance(s, EngineSettings)
    assert (s.strategy, s.connect_timeout, s.scan_timeout, s.retry_after, s.max_failures) == (
        "failover", 5.0, None, 10.0, 1)


def test_needs_a_server() -> None:
    with pytest.raises(ValueError, match="at least one server"):
        Upstreams([], Settings())


async def test_failover_order_and_mark_down() -> None:
    clock = Clock()
    ups = upstreams("refuse", "ok", "ok", clock=clock, retry_after=5)
    assert await ups.call(attempt, far()) == "s1"
    assert tried == ["s0", "s1"]
    assert ups.is_down(ups.servers[0]) and ups.servers[0].last_error == "refused"
    tried.clear()
    assert await ups.call(attempt, far()) == "s1"
    assert tried == ["s1"]  # s0 skipped while down
    clock.now += 5
    ups.servers[0].answer = "ok"
    tried.clear()
    assert await ups.call(attempt, far()) == "s0"  # tried again after retry_after, and up
    assert ups.servers[0].failures == 0 and not ups.is_down(ups.servers[0])


async def test_round_robin_rotates() -> None:
    ups = upstreams("ok", "ok", "ok", strategy="round_robin")
    assert [await ups.call(attempt, far()) for _ in range(4)] == ["s0", "s1", "s2", "s0"]


async def test_max_failures_are_consecutive() -> None:
    ups = upstreams("garbage", "ok", max_failures=2)
    await ups.call(attempt, far())
    assert not ups.is_down(ups.servers[0]) and ups.servers[0].failures == 1
    await ups.call(attempt, far())
    assert ups.is_down(ups.servers[0])


async def test_every_failure_named_and_last_type_raised() -> None:
    ups = upstreams("refuse", "garbage")
    with pytest.raises(EngineProtocolError) as exc:
        await ups.call(attempt, far())
    assert str(exc.value) == "s0: refused; s1: garbage"
    with pytest.raises(EngineUnavailable, match=r"all 2 server\(s\) marked down"):
        await ups.call(attempt, far())
    assert tried == ["s0", "s1"]  # the second call waited on none of them


async def test_no_server_tried_once_the_budget_is_spent() -> None:
    ups = upstreams("hang", "ok", "ok")

    async def bounded(server: Server) -> str:
        bound = Bound.of(None, deadline)
        try:
            async with asyncio.timeout_at(bound.when):
                return await attempt(server)
        except TimeoutError:
            raise EngineTimeout(f"no reply within {bound}") from None

    deadline = asyncio.get_running_loop().time() + 0.05
    with pytest.raises(EngineTimeout) as exc:
        await ups.call(bounded, deadline)
    assert tried == ["s0"]
    assert "s0: no reply within 0.05s" in str(exc.value)
    assert "2 server(s) not tried" in str(exc.value)


async def test_bound_is_the_earlier_of_limit_and_deadline() -> None:
    now = asyncio.get_running_loop().time()
    near = Bound.of(1.0, now + 60)
    assert near.seconds == 1.0 and str(near) == "1s"
    cut = Bound.of(30.0, now + 2)
    assert cut.when == now + 2 and 1.9 <= cut.seconds <= 2
    assert Bound.of(None, now + 3).when == now + 3
    assert Bound.of(5.0, now - 1).seconds == 0


async def test_health_probes_every_server_and_marks_them() -> None:
    clock = Clock()
    ups = upstreams("refuse", "ok", clock=clock)
    ups.failed(ups.servers[1], EngineUnavailable("earlier"))
    assert ups.is_down(ups.servers[1])

    async def probe(server: Server) -> dict[str, Any]:
        await attempt(server)
        return {"extra": server.url}

    ok, reports = await ups.health(probe, lambda s: {"answer": s.answer})
    assert ok is True
    assert [(r["server"], r["ok"], r["down"]) for r in reports] == [
        ("s0", False, True), ("s1", True, False)]  # a down server is probed, and comes back
    assert reports[0]["error"] == "refused" and reports[1]["extra"] == "s1"
    assert "latency_ms" in reports[1] and reports[0]["answer"] == "refuse"
