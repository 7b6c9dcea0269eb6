"""ScanService: mode, merging and the verdict cache.

The engines here are in-test stand-ins that count calls: the service's logic (stop at first
infected, run all, cache keyed by DB version, never cache errors) is what is under test; real
engines have their own tests.
"""

import asyncio
from typing import Any

from avgate.engines.base import BaseEngine, EngineContext
from avgate.result import Finding, ScanResult, ScanStatus
from avgate.scan import ScanService, VerdictCache
from avgate.spool import Spool
from tests.helpers import async_wait_until


class CountingEngine(BaseEngine):
    type_name = "counting"

    def __init__(self, name: str, status: ScanStatus, version: str = "1") -> None:
        super().__init__(name, EngineContext())
        self.status = status
        self.calls = 0
        self.dbv = version

    @classmethod
    def from_settings(cls, settings: Any, ctx: EngineContext) -> BaseEngine:
        raise NotImplementedError

    def db_version(self) -> str:
        return self.dbv

    async def _scan(self, spool: Spool, deadline: float) -> ScanResult:
        self.calls += 1
        findings = (Finding(f"V.{self.name}", self.name),) if self.status is ScanStatus.INFECTED \
            else ()
        return ScanResult(self.status, findings, reason="r" if findings == () and
                          self.status is not ScanStatus.CLEAN else "")


async def test_first_infected_stops_early():
    a = CountingEngine("a", ScanStatus.INFECTED)
    b = CountingEngine("b", ScanStatus.CLEAN)
    svc = ScanService([a, b], mode="first_infected")
    r = await svc.scan_bytes(b"x")
    assert r.status is ScanStatus.INFECTED and r.virus == "V.a"
    assert (a.calls, b.calls) == (1, 0)


async def test_all_mode_runs_every_engine_and_infected_wins():
    a = CountingEngine("a", ScanStatus.ERROR)
    b = CountingEngine("b", ScanStatus.INFECTED)
    svc = ScanService([a, b], mode="all")
    r = await svc.scan_bytes(b"x")
    assert r.status is ScanStatus.INFECTED and (a.calls, b.calls) == (1, 1)
    assert [e.name for e in r.engines] == ["a", "b"]


async def test_error_never_merged_into_clean():
    svc = ScanService([CountingEngine("a", ScanStatus.CLEAN),
                       CountingEngine("b", ScanStatus.ERROR)], mode="all")
    assert (await svc.scan_bytes(b"x")).status is ScanStatus.ERROR


async def test_cache_hit_and_invalidation_on_db_change():
    a = CountingEngine("a", ScanStatus.CLEAN)
    svc = ScanService([a], cache=VerdictCache(10))
    r1 = await svc.scan_bytes(b"same")
    r2 = await svc.scan_bytes(b"same")
    assert a.calls == 1 and not r1.cached and r2.cached and r2.status is ScanStatus.CLEAN
    a.dbv = "2"  # a signature update
    await svc.scan_bytes(b"same")
    assert a.calls == 2


async def test_errors_not_cached():
    a = CountingEngine("a", ScanStatus.ERROR)
    svc = ScanService([a], cache=VerdictCache(10))
    await svc.scan_bytes(b"x")
    await svc.scan_bytes(b"x")
    assert a.calls == 2


async def test_cache_bounded():
    a = CountingEngine("a", ScanStatus.CLEAN)
    cache = VerdictCache(3)
    svc = ScanService([a], cache=cache)
    for i in range(10):
        await svc.scan_bytes(str(i).encode())
    assert len(cache) == 3


async def test_result_carries_sha256_and_size():
    svc = ScanService([CountingEngine("a", ScanStatus.CLEAN)])
    r = await svc.scan_bytes(b"abc")
    assert r.size == 3
    assert r.sha256 == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


class SlowEngine(CountingEngine):
    async def _scan(self, spool: Spool, deadline: float) -> ScanResult:
        await asyncio.sleep(0.05)
        return await super()._scan(spool, deadline)


async def test_concurrent_identical_objects_scanned_once():
    a = SlowEngine("a", ScanStatus.INFECTED)
    svc = ScanService([a], cache=VerdictCache(10))
    results = await asyncio.gather(*(svc.scan_bytes(b"mass mailing") for _ in range(16)))
    assert a.calls == 1
    assert all(r.status is ScanStatus.INFECTED for r in results)
    assert sum(not r.cached for r in results) == 1


async def test_concurrent_errors_shared_but_not_cached():
    a = SlowEngine("a", ScanStatus.ERROR)
    svc = ScanService([a], cache=VerdictCache(10))
    results = await asyncio.gather(*(svc.scan_bytes(b"x") for _ in range(4)))
    assert a.calls == 1 and all(r.status is ScanStatus.ERROR for r in results)
    await svc.scan_bytes(b"x")
    assert a.calls == 2


class GatedEngine(CountingEngine):
    """Counts scans as they start and holds each until ``release`` is set."""

    def __init__(self, name: str, status: ScanStatus) -> None:
        super().__init__(name, status)
        self.started = 0
        self.release = asyncio.Event()

    async def _scan(self, spool: Spool, deadline: float) -> ScanResult:
        self.started += 1
        await self.release.wait()
        return await super()._scan(spool, deadline)


async def test_waiters_rescan_when_the_first_scan_is_cancelled():
    a = GatedEngine("a", ScanStatus.CLEAN)
    svc = ScanService([a], cache=VerdictCache(10))
    first = asyncio.create_task(svc.scan_bytes(b"y"))
    assert await async_wait_until(lambda: a.started == 1, timeout=5)
    waiters = [asyncio.create_task(svc.scan_bytes(b"y")) for _ in range(3)]
    for _ in range(10):  # let the waiters run up to their wait (no timer involved)
        await asyncio.sleep(0)
    # single flight: while the first scan runs, identical objects do not reach the engine
    assert a.started == 1 and not any(w.done() for w in waiters)
    first.cancel()
    # one waiter scans again itself; the others wait for its verdict
    assert await async_wait_until(lambda: a.started == 2, timeout=5)
    a.release.set()
    results = await asyncio.gather(*waiters)
    assert first.cancelled()
    assert all(r.status is ScanStatus.CLEAN for r in results)
    assert a.started == 2 and a.calls == 1
    assert sorted(r.cached for r in results) == [False, True, True]
