"""BaseEngine: the budget (one deadline), error → result, and per-engine metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from avgate import observability
from avgate.engines.base import BaseEngine, EngineContext
from avgate.errors import EngineUnavailable
from avgate.limits import Limits
from avgate.result import ScanResult, ScanStatus
from avgate.scan import ScanService
from avgate.spool import Spool

pytestmark = pytest.mark.timeout(10)


class FakeEngine(BaseEngine):
    type_name = "fake"

    def __init__(self, name: str, behaviour: str, delay: float = 0.0,
                 limits: Limits | None = None) -> None:
        super().__init__(name, EngineContext(limits=limits or Limits()))
        self.behaviour = behaviour
        self.delay = delay
        self.deadlines: list[float] = []

    @classmethod
    def from_settings(cls, settings: Any, ctx: EngineContext) -> BaseEngine:
        raise NotImplementedError

    async def _scan(self, spool: Spool, deadline: float) -> ScanResult:
        self.deadlines.append(deadline)
        await asyncio.sleep(self.delay)
        if self.behaviour == "down":
            raise EngineUnavailable("refused")
        return ScanResult(ScanStatus.CLEAN)


def sample(name: str, engine: str) -> float:
    return observability.registry.get_sample_value(name, {"engine": engine}) or 0.0


async def test_metrics_are_per_engine_not_from_the_merged_result() -> None:
    """An erroring engine counts its own error and time; the clean engine beside it counts
    no error and its own (longer) time, not the merged result's."""
    slow = FakeEngine("metrics-clean", "ok", delay=0.2)
    down = FakeEngine("metrics-down", "down")
    before = {(m, e): sample(m, e) for m in ("avgate_engine_errors_total",
                                             "avgate_engine_latency_seconds_count",
                                             "avgate_engine_latency_seconds_sum")
              for e in (slow.name, down.name)}
    service = ScanService([down, slow], mode="all")
    result = await service.scan_bytes(b"object")
    assert result.status is ScanStatus.ERROR

    def delta(metric: str, engine: BaseEngine) -> float:
        return sample(metric, engine.name) - before[(metric, engine.name)]

    assert delta("avgate_engine_errors_total", down) == 1
    assert delta("avgate_engine_errors_total", slow) == 0
    assert delta("avgate_engine_latency_seconds_count", down) == 1
    assert delta("avgate_engine_latency_seconds_count", slow) == 1
    assert delta("avgate_engine_latency_seconds_sum", down) < 0.1
    assert delta("avgate_engine_latency_seconds_sum", slow) >= 0.2


async def test_one_deadline_per_scan_from_the_scan_timeout() -> None:
    eng = FakeEngine("deadline", "ok", limits=Limits(scan_timeout=7))
    loop = asyncio.get_running_loop()
    start = loop.time()
    await eng.scan(Spool.from_bytes(b"x"))
    [deadline] = eng.deadlines
    assert start + 7 <= deadline <= loop.time() + 7


async def test_scan_timeout_is_an_error_result() -> None:
    eng = FakeEngine("timeout", "ok", delay=5, limits=Limits(scan_timeout=0.05))
    result = await eng.scan(Spool.from_bytes(b"x"))
    assert result.status is ScanStatus.ERROR
    assert result.reason == "timeout: scan timeout after 0.05s"
