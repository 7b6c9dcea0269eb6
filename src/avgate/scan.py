"""The scan service: content in, engines, verdict cache, one ScanResult out.

Front-ends never talk to engines directly: they spool what they receive and call
:meth:`ScanService.scan`. Decomposition is each engine's business (the embedded engine
decomposes; clamd and ICAP servers get the raw object and decompose on their own).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from .banned import BannedCheck
from .config import Config
from .context import Context
from .engines.base import BaseEngine, EngineContext, build_engine
from .errors import SpoolError
from .limits import DEFAULT_LIMITS, DEFAULT_SPOOL_MEMORY, DEFAULT_WORKER_MEMORY, Limits
from .result import LimitKind, ScanResult, ScanStatus, merge
from .settings import SecretUrl, Section, Size
from .spool import Spool
from .workers import default_size

if TYPE_CHECKING:
    from .cache import RedisVerdictCache

#: results worth remembering: deterministic for the same bytes and signatures
_CACHEABLE = frozenset({ScanStatus.CLEAN, ScanStatus.INFECTED, ScanStatus.SKIPPED,
                        ScanStatus.UNKNOWN})


class ScanSettings(Section):
    """``[scan]``: mode, verdict cache, spool, scan workers."""

    mode: Literal["first_infected", "all"] = "first_infected"
    cache: bool = True
    cache_size: int = Field(10_000, gt=0)  # entries of the in-process cache
    # "redis": verdicts also shared by every gateway using `redis` (avgate.cache)
    cache_backend: Literal["memory", "redis"] = "memory"
    redis: SecretUrl = "redis://127.0.0.1:6379/0"  # redis:// or rediss:// URL (password: in it)
    cache_ttl: int = Field(86400, gt=0)  # seconds a shared verdict is kept
    cache_wait: float = Field(30.0, ge=0)  # seconds to wait for another gateway's scan
    spool_memory: Size = DEFAULT_SPOOL_MEMORY  # bytes kept in memory before a temp file
    spool_dir: str | None = None
    workers: int = Field(0, ge=0)  # scan worker processes; 0: one per core
    worker_memory: Size = DEFAULT_WORKER_MEMORY  # address-space cap of each scan worker


class VerdictCache:
    """Bounded LRU of results keyed by (sha256, engine DB versions)."""

    def __init__(self, max_entries: int = 10_000, shared: RedisVerdictCache | None = None
                 ) -> None:
        self.max_entries = max_entries
        self.shared = shared  # the verdicts of every gateway, behind this one (avgate.cache)
        self._data: OrderedDict[tuple[str, str], ScanResult] = OrderedDict()
        self.hits = 0
        self.misses = 0

    async def scan_once(self, key: tuple[str, str],
                        scan: Callable[[], Awaitable[ScanResult]]) -> ScanResult:
        """A miss here: ``scan()``, or the shared cache's verdict (its single flight)."""
        if self.shared is None:
            return await scan()
        start = time.perf_counter()
        result = await self.shared.scan_once(key, scan)
        return result.with_(elapsed=time.perf_counter() - start) if result.cached else result

    async def aclose(self) -> None:
        if self.shared is not None:
            await self.shared.close()

    def get(self, key: tuple[str, str]) -> ScanResult | None:
        result = self._data.get(key)
        if result is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return result

    def put(self, key: tuple[str, str], result: ScanResult) -> None:
        self._data[key] = result
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


def _shared_cache(config: Config) -> RedisVerdictCache | None:
    """The Redis cache ``[scan] cache_backend = "redis"`` names (None for "memory")."""
    scan = config.scan
    if scan.cache_backend != "redis":
        return None
    from .cache import RedisVerdictCache

    # a dead owner's lock outlives no scan: the object's whole budget, and a little
    # verdicts depend on the mode and the limits too: gateways share only with their likes
    return RedisVerdictCache(scan.redis, ttl=scan.cache_ttl, wait=scan.cache_wait,
                             lock_timeout=config.limits.scan_timeout + 10,
                             namespace=f"{scan.mode}|{config.limits.model_dump_json()}")


class ScanService:
    """Runs the configured engines over an object and merges their verdicts."""

    def __init__(self, engines: Sequence[BaseEngine], *, mode: str = "first_infected",
                 cache: VerdictCache | None = None, spool_memory: int = 1 << 20,
                 spool_dir: str | None = None, limits: Limits = DEFAULT_LIMITS,
                 banned: BannedCheck | None = None) -> None:
        if not engines:
            raise ValueError("ScanService needs at least one engine")
        self.engines = list(engines)
        self.mode = mode
        self.cache = cache
        self.spool_memory = spool_memory
        self.spool_dir = spool_dir
        self.limits = limits
        self.banned = banned  # the banned-type check (avgate.banned), run when a ctx is given
        self._started = False
        self._inflight: dict[tuple[str, str], asyncio.Future[ScanResult]] = {}

    @classmethod
    def from_config(cls, config: Config) -> ScanService:
        workers = config.scan.workers
        serve_workers = config.serve.workers
        if not workers and serve_workers > 1:
            # every serve process has its own scan workers: share the cores between them
            workers = max(1, default_size() // serve_workers)
        ctx = EngineContext(limits=config.limits, base_dir=config.base_dir,
                            workers=workers, worker_memory=config.scan.worker_memory)
        engines = [build_engine(table, ctx) for table in config.engines]
        cache = VerdictCache(config.scan.cache_size, _shared_cache(config)
                             ) if config.scan.cache else None
        banned = BannedCheck.from_config(config, workers)
        if banned is not None:
            banned.share_with(engines)  # one decomposition for the embedded engine and it
        return cls(engines, mode=config.scan.mode, cache=cache,
                   spool_memory=config.scan.spool_memory, spool_dir=config.scan.spool_dir,
                   limits=config.limits, banned=banned)

    async def start(self) -> None:
        if not self._started:
            starting = [e.start() for e in self.engines]
            if self.banned is not None:  # its workers now, not on the first object
                starting.append(self.banned.start())
            await asyncio.gather(*starting)
            self._started = True

    async def close(self) -> None:
        closing = [e.close() for e in self.engines]
        if self.banned is not None:
            closing.append(self.banned.close())
        if self.cache is not None:
            closing.append(self.cache.aclose())
        await asyncio.gather(*closing, return_exceptions=True)
        self._started = False

    async def __aenter__(self) -> ScanService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def new_spool(self) -> Spool:
        """A spool with the service's memory threshold and directory."""
        return Spool(memory_limit=self.spool_memory, directory=self.spool_dir)

    def db_versions(self) -> str:
        """All engines' DB versions in one string: the cache key's second half, the ICAP ISTag
        (the ICAP front-end remembers the ISTag built from it)."""
        return "|".join(f"{e.name}={e.db_version()}" for e in self.engines)

    async def health(self) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(e.health() for e in self.engines)))

    async def scan(self, spool: Spool, ctx: Context | None = None) -> ScanResult:
        """Scan one finished spool with every engine (per ``mode``); given the object's
        ``ctx`` (the Gateway's), the banned-type check (avgate.banned) runs beside them."""
        if ctx is not None and self.banned is not None and self.banned.applies(ctx):
            return await self.banned.scan(self._scan, spool, ctx)
        return await self._scan(spool)

    async def _scan(self, spool: Spool) -> ScanResult:
        """The engines' verdict on one spool (cached by content and signature versions)."""
        start = time.perf_counter()
        spool.finish()
        if spool.size > self.limits.max_scan_size:
            # Over the limit no engine is asked (Kernun: over max-checked-size → SKIPPED):
            # a clamd would truncate at StreamMaxLength and call the rest clean.
            return ScanResult(ScanStatus.SKIPPED, limit=LimitKind.SIZE, sha256=spool.sha256,
                              size=spool.size, elapsed=time.perf_counter() - start,
                              reason=f"size limit: {'more than ' if spool.truncated else ''}"
                                     f"{spool.size} bytes > max_scan_size "
                                     f"{self.limits.max_scan_size}")
        key = (spool.sha256, self.db_versions()) if self.cache is not None else None
        if key is not None:
            assert self.cache is not None
            hit = self.cache.get(key)
            if hit is not None:
                return hit.with_(cached=True, elapsed=time.perf_counter() - start)
        if key is not None:
            # single flight: identical objects arriving together (a mass mailing) are
            # scanned once; the others wait for that verdict instead of asking the engines
            while (pending := self._inflight.get(key)) is not None:
                try:
                    result = await asyncio.shield(pending)
                except asyncio.CancelledError:
                    if not pending.cancelled():
                        raise  # we were cancelled ourselves
                    continue  # the scan we waited for was cancelled: do it ourselves
                except Exception:  # noqa: S112 - the owner's failure is its own; scan anew
                    continue
                return result.with_(cached=True, elapsed=time.perf_counter() - start)
            future: asyncio.Future[ScanResult] = asyncio.get_running_loop().create_future()
            self._inflight[key] = future
            try:
                assert self.cache is not None
                result = await self.cache.scan_once(
                    key, lambda: self._scan_engines(spool, start))
            except BaseException:
                future.cancel()
                raise
            else:
                future.set_result(result)
            finally:
                del self._inflight[key]
            if result.status in _CACHEABLE:
                assert self.cache is not None
                self.cache.put(key, result)
            return result
        return await self._scan_engines(spool, start)

    async def _scan_engines(self, spool: Spool, start: float) -> ScanResult:
        if not self._started:
            await self.start()
        if self.mode == "all" and len(self.engines) > 1:
            results = list(await asyncio.gather(*(e.scan(spool) for e in self.engines)))
        else:
            results = []
            for engine in self.engines:
                r = await engine.scan(spool)
                results.append(r)
                if r.status is ScanStatus.INFECTED:
                    break
        return merge(results, sha256=spool.sha256, size=spool.size,
                     elapsed=time.perf_counter() - start)

    async def scan_bytes(self, data: bytes) -> ScanResult:
        with Spool.from_bytes(data) as spool:
            return await self.scan(spool)

    async def scan_path(self, path: str | Path) -> ScanResult:
        """Scan a file: snapshot it once (hashing as it is read), then scan the snapshot.

        The file is never read twice, so a file rewritten meanwhile cannot get its old
        verdict cached for its new bytes. Files over max_scan_size are read only that far.
        """
        try:
            spool = await asyncio.to_thread(
                Spool.from_path, path, max_size=self.limits.max_scan_size,
                memory_limit=self.spool_memory, directory=self.spool_dir)
        except SpoolError as exc:
            return ScanResult.error(str(exc))
        with spool:
            return await self.scan(spool)
