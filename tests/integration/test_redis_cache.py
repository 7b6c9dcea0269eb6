"""The shared verdict cache on a real redis-server (started for this module): verdicts shared
between gateways, single flight across them, what is never shared, and Redis going away.

Each "gateway" is a ScanService of its own (its own local cache and in-process single flight,
as a separate process would have) over an in-test engine that counts its scans.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from avgate import cache as cache_mod
from avgate import config as config_mod
from avgate.cache import RedisVerdictCache, redis_key
from avgate.engines.base import BaseEngine, EngineContext
from avgate.result import Finding, LimitKind, ScanResult, ScanStatus
from avgate.scan import ScanService, VerdictCache
from avgate.spool import Spool
from tests.helpers import async_wait_until
from tests.redis_instance import RedisInstance, running_redis


class CountingEngine(BaseEngine):
    """Counts scans; ``gate`` (when set) holds every scan until it is set."""

    type_name = "counting"

    def __init__(self, status: ScanStatus = ScanStatus.CLEAN, version: str = "1") -> None:
        super().__init__("counting", EngineContext())
        self.status = status
        self.calls = 0
        self.dbv = version
        self.gate: asyncio.Event | None = None

    @classmethod
    def from_settings(cls, settings: Any, ctx: EngineContext) -> BaseEngine:
        raise NotImplementedError

    def db_version(self) -> str:
        return self.dbv

    async def _scan(self, spool: Spool, deadline: float) -> ScanResult:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.status is ScanStatus.INFECTED:
            return ScanResult(self.status, (Finding("Eicar-Test-Signature", self.name),))
        limit = LimitKind.SIZE if self.status is ScanStatus.SKIPPED else None
        return ScanResult(self.status, reason="" if self.status is ScanStatus.CLEAN else "r",
                          limit=limit)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisInstance]:
    with running_redis() as instance:
        yield instance


@pytest.fixture
def redis(redis_server: RedisInstance) -> Iterator[RedisInstance]:
    if redis_server.proc is None:  # a test stopped it
        redis_server.start()
    redis_server.flush()
    yield redis_server


def gateway(url: str, engine: CountingEngine, wait: float = 10.0) -> ScanService:
    shared = RedisVerdictCache(url, ttl=60, wait=wait, lock_timeout=30)
    return ScanService([engine], cache=VerdictCache(100, shared))


def shared(service: ScanService) -> RedisVerdictCache:
    assert service.cache is not None and service.cache.shared is not None
    return service.cache.shared


def payload() -> bytes:
    return b"attachment " + secrets.token_bytes(16)


async def test_a_verdict_found_by_one_gateway_serves_the_others(redis: RedisInstance) -> None:
    engines = [CountingEngine(ScanStatus.INFECTED) for _ in range(3)]
    services = [gateway(redis.url, e) for e in engines]
    data = payload()
    try:
        first = await services[0].scan_bytes(data)
        others = [await s.scan_bytes(data) for s in services[1:]]
    finally:
        for s in services:
            await s.close()
    assert [e.calls for e in engines] == [1, 0, 0]
    assert not first.cached and all(r.cached for r in others)
    assert {r.status for r in others} == {ScanStatus.INFECTED}
    assert others[0].virus == "Eicar-Test-Signature" and others[0].sha256 == first.sha256


async def test_gateways_scanning_at_once_reach_the_engine_once(redis: RedisInstance) -> None:
    engines = [CountingEngine() for _ in range(3)]
    gate = asyncio.Event()
    for e in engines:
        e.gate = gate
    services = [gateway(redis.url, e) for e in engines]
    data = payload()
    try:
        tasks = [asyncio.ensure_future(s.scan_bytes(data)) for s in services]
        # one owner scans; the other two wait on its lock in Redis
        assert await async_wait_until(lambda: sum(e.calls for e in engines) == 1 and sum(
            shared(s).waits for s in services) == 2)
        gate.set()
        results = await asyncio.gather(*tasks)
    finally:
        for s in services:
            await s.close()
    assert sum(e.calls for e in engines) == 1
    assert sorted(r.cached for r in results) == [False, True, True]


@pytest.mark.parametrize("status", [ScanStatus.ERROR, ScanStatus.UNKNOWN, ScanStatus.SKIPPED])
async def test_only_clean_and_infected_are_shared(redis: RedisInstance,
                                                  status: ScanStatus) -> None:
    a, b = CountingEngine(status), CountingEngine(status)
    sa, sb = gateway(redis.url, a), gateway(redis.url, b)
    data = payload()
    try:
        assert (await sa.scan_bytes(data)).status is status
        assert (await sb.scan_bytes(data)).status is status
    finally:
        await sa.close()
        await sb.close()
    assert (a.calls, b.calls) == (1, 1)
    import redis as redis_py

    client = redis_py.Redis.from_url(redis.url)
    try:
        assert client.keys(cache_mod.KEY_PREFIX + "*") == []  # nothing stored, no lock left
    finally:
        client.close()


async def test_waiters_scan_themselves_when_the_owner_fails(redis: RedisInstance) -> None:
    owner, waiter = CountingEngine(ScanStatus.ERROR), CountingEngine(ScanStatus.CLEAN)
    owner.gate = asyncio.Event()
    so, sw = gateway(redis.url, owner), gateway(redis.url, waiter)
    data = payload()
    try:
        first = asyncio.ensure_future(so.scan_bytes(data))
        assert await async_wait_until(lambda: owner.calls == 1)
        second = asyncio.ensure_future(sw.scan_bytes(data))
        assert await async_wait_until(lambda: shared(sw).waits == 1)
        owner.gate.set()  # the owner's verdict is an error: not shared, its lock goes
        assert (await first).status is ScanStatus.ERROR
        result = await second
    finally:
        await so.close()
        await sw.close()
    assert result.status is ScanStatus.CLEAN and not result.cached and waiter.calls == 1


async def test_waiters_give_up_after_cache_wait(redis: RedisInstance) -> None:
    slow, impatient = CountingEngine(), CountingEngine()
    slow.gate = asyncio.Event()
    ss, si = gateway(redis.url, slow), gateway(redis.url, impatient, wait=0.3)
    data = payload()
    try:
        first = asyncio.ensure_future(ss.scan_bytes(data))
        assert await async_wait_until(lambda: slow.calls == 1)
        result = await si.scan_bytes(data)  # does not wait for the slow owner
        assert impatient.calls == 1 and not result.cached
        slow.gate.set()
        await first
    finally:
        await ss.close()
        await si.close()


async def test_a_signature_update_is_a_new_key(redis: RedisInstance) -> None:
    old, new = CountingEngine(version="1"), CountingEngine(version="2")
    so, sn = gateway(redis.url, old), gateway(redis.url, new)
    data = payload()
    try:
        await so.scan_bytes(data)
        assert not (await sn.scan_bytes(data)).cached
    finally:
        await so.close()
        await sn.close()
    assert (old.calls, new.calls) == (1, 1)


async def test_junk_in_redis_is_a_miss_not_a_verdict(redis: RedisInstance,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import hashlib

    import redis as redis_py

    engine = CountingEngine(ScanStatus.INFECTED)
    service = gateway(redis.url, engine)
    data = payload()
    key = redis_key((hashlib.sha256(data).hexdigest(), service.db_versions()))
    client = redis_py.Redis.from_url(redis.url)
    try:
        client.set(key, b'{"status": "clean", "findings": "not a list"}')
        result = await service.scan_bytes(data)
        assert result.status is ScanStatus.INFECTED and engine.calls == 1
        assert cache_mod.decode(client.get(key)).status is ScanStatus.INFECTED  # replaced
    finally:
        client.close()
        await service.close()
    assert "ignoring a bad entry" in capsys.readouterr().err


async def test_redis_down_means_local_scans_one_warning_then_recovery(
        redis: RedisInstance, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_mod, "RETRY_AFTER", 0.2)
    engine = CountingEngine()
    service = gateway(redis.url, engine)
    try:
        redis.stop()
        results = [await service.scan_bytes(payload()) for _ in range(3)]
        assert [r.status for r in results] == [ScanStatus.CLEAN] * 3 and engine.calls == 3
        again = payload()
        await service.scan_bytes(again)
        assert (await service.scan_bytes(again)).cached  # the local cache still works
        err = capsys.readouterr().err
        assert err.count("unavailable") == 1, err  # one warning for the outage
        redis.start()
        cache = shared(service)

        async def scans_share() -> bool:
            await service.scan_bytes(payload())
            return cache.available and "is back" in capsys.readouterr().err

        assert await async_wait_until_async(scans_share)
    finally:
        await service.close()


async def async_wait_until_async(check: Any, within: float = 10.0) -> bool:
    """:func:`async_wait_until` for a coroutine predicate."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.05)
    return bool(await check())


def test_config_selects_the_redis_backend() -> None:
    cfg = config_mod.from_dict({"scan": {"cache_backend": "redis",
                                         "redis": "redis://:secret@127.0.0.1:1/0",
                                         "cache_ttl": 600, "cache_wait": 5.0}})
    service = ScanService.from_config(cfg)
    assert shared(service).ttl == 600 and shared(service).wait == 5.0
    assert ScanService.from_config(config_mod.from_dict({})).cache.shared is None  # type: ignore[union-attr]
    assert cache_mod._safe_url("redis://:secret@h:1/0") == "redis://:***@h:1/0"
    with pytest.raises(Exception, match="cache_backend"):
        config_mod.from_dict({"scan": {"cache_backend": "memcached"}})


async def test_gateways_with_other_limits_or_mode_do_not_share(redis: RedisInstance) -> None:
    base = {"scan": {"cache_backend": "redis", "redis": redis.url}}
    namespaces = {shared(ScanService.from_config(config_mod.from_dict(d))).namespace
                  for d in (base, {**base, "limits": {"max_recursion": 4}},
                            {"scan": {**base["scan"], "mode": "all"}})}
    assert len(namespaces) == 3
    a, b = CountingEngine(), CountingEngine()
    sa = ScanService([a], cache=VerdictCache(10, RedisVerdictCache(redis.url, namespace="x")))
    sb = ScanService([b], cache=VerdictCache(10, RedisVerdictCache(redis.url, namespace="y")))
    data = payload()
    try:
        await sa.scan_bytes(data)
        assert not (await sb.scan_bytes(data)).cached
    finally:
        await sa.close()
        await sb.close()
    assert (a.calls, b.calls) == (1, 1)
