"""Store scans on a Dask cluster: ``avgate scan --cluster tcp://scheduler:8786 PATH...``.

The CLI lists the store as it does for a local scan (:func:`avgate.ondemand.iter_targets`:
directories, Maildirs, mbox files — an mbox message travels as its byte range), cuts the
listing into partitions (``PARTITION_FILES`` objects or ``PARTITION_BYTES`` bytes), and submits
each partition to the cluster; a Dask worker scans it with avgate's own scan service, built
from the same config file (its text travels with the task, so every worker scans with exactly
the client's settings and engines). Results come back as partitions finish; the output, the
scan log, ``--since/--state`` and ``--action`` are the local scan's (actions run on the
client, which sees the same storage; quarantine goes to the configured store, PostgreSQL when
several machines share it).

Exactly once: a partition is one Dask task. A worker that dies mid-partition loses the task,
the scheduler runs it again elsewhere (``retries``), and its result is delivered once, so every
object appears once in the report. What cannot be guaranteed: an object scanned twice (once
by the dead worker) — harmless, it is only read.

Paths must be on storage every worker sees (NFS, CephFS...) under the same names: before any
work is submitted, every worker is asked whether it sees each command-line path, and the scan
stops with the list of what is missing where.

Why Dask (distributed): task retries on worker loss, a scheduler that balances work across
machines, and a client API that streams results (``as_completed``) — what this needs, kept by
a large community; writing a work queue with failure detection by hand is what not to do.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import AvgateError
from .ondemand import Target, mbox_body
from .result import ScanResult

if TYPE_CHECKING:
    from .scan import ScanService

PARTITION_FILES = 64
PARTITION_BYTES = 64 * 1024 * 1024
RETRIES = 3  # runs of a partition after its worker died, before the scan gives up on it


class ClusterError(AvgateError):
    """The cluster cannot run this scan (unreachable, paths not shared, no distributed)."""


@dataclass(frozen=True, slots=True)
class Item:
    """What a worker needs to scan one object: a file path, or an mbox message's byte range."""

    label: str
    path: str
    start: int = -1  # mbox: offset of the From_ line; -1: the whole file
    end: int = -1
    digest: str = ""  # mbox: sha256 of the raw span (a changed mbox is an error, not a guess)


def item_for(target: Target) -> Item:
    if target.mbox is not None:
        m = target.mbox
        return Item(target.label, os.path.abspath(m.mbox), m.start, m.end, m.digest)
    if target.path is None:
        raise ClusterError("stdin cannot be scanned on a cluster (give paths)")
    return Item(target.label, os.path.abspath(target.path))


def partitions(targets: Iterable[Target], files: int = PARTITION_FILES
               ) -> Iterator[list[tuple[Target, Item]]]:
    """Cut the listing into partitions of at most ``files`` objects / PARTITION_BYTES."""
    batch: list[tuple[Target, Item]] = []
    size = 0
    for target in targets:
        item = item_for(target)
        if item.start >= 0:
            weight = item.end - item.start
        else:
            try:
                weight = os.stat(item.path).st_size
            except OSError:
                weight = 0
        if batch and (len(batch) >= files or size + weight > PARTITION_BYTES):
            yield batch
            batch, size = [], 0
        batch.append((target, item))
        size += weight
    if batch:
        yield batch


# -- on the worker --------------------------------------------------------------------------
_lock = threading.Lock()
_worker: dict[str, tuple[asyncio.AbstractEventLoop, ScanService]] = {}


def _service(source: str, text: str) -> tuple[asyncio.AbstractEventLoop, ScanService]:
    """This worker process's scan service for a config (built once, on its own loop thread)."""
    key = hashlib.sha256(f"{source}\0{text}".encode()).hexdigest()
    with _lock:
        found = _worker.get(key)
        if found is not None:
            return found
        from . import config as config_mod
        from .scan import ScanService

        cfg = config_mod.loads(text, source)
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="avgate-scan", daemon=True).start()
        service = ScanService.from_config(cfg)
        asyncio.run_coroutine_threadsafe(service.start(), loop).result()
        _worker[key] = (loop, service)
        return loop, service


async def _scan_item(service: ScanService, item: Item) -> ScanResult:
    if item.start < 0:
        return await service.scan_path(item.path)
    def read() -> bytes:
        with open(item.path, "rb") as f:
            f.seek(item.start)
            return f.read(item.end - item.start)

    try:
        raw = await asyncio.to_thread(read)
    except OSError as exc:
        return ScanResult.error(f"cannot read {item.path}: {exc.strerror or exc}")
    if hashlib.sha256(raw).hexdigest() != item.digest:
        return ScanResult.error("the mbox changed since it was listed")
    return await service.scan_bytes(mbox_body(raw))


def scan_partition(source: str, text: str, items: list[Item]) -> list[ScanResult]:
    """Run on a Dask worker: scan every item of a partition; one result per item, in order."""
    loop, service = _service(source, text)

    async def scan_all() -> list[ScanResult]:
        return list(await asyncio.gather(*(_scan_item(service, i) for i in items)))

    return asyncio.run_coroutine_threadsafe(scan_all(), loop).result()


def missing_paths(paths: list[str]) -> list[str]:
    """Run on each worker: the paths it does not see."""
    return [p for p in paths if not os.path.exists(p)]


# -- on the client --------------------------------------------------------------------------
async def cluster_scan(address: str, source: str, text: str, paths: list[str],
                       targets: Iterable[Target], *, partition: int = PARTITION_FILES,
                       in_flight: int = 0) -> AsyncIterator[tuple[Target, ScanResult]]:
    """Scan ``targets`` on the cluster at ``address``; yield (target, result) as partitions
    finish. ``source``/``text``: the config file's path and its text (the workers' config);
    ``paths``: the command-line paths, absolute (checked on every worker).
    Raises ClusterError before any work when the cluster or the paths are not usable."""
    try:
        from distributed import Client, as_completed
    except ImportError as exc:
        raise ClusterError("--cluster needs the Python package 'distributed' "
                           "(pip install 'avgate[cluster]')") from exc
    try:
        client = await Client(address, asynchronous=True,  # type: ignore[no-untyped-call]
                              timeout="5s")
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc
    try:
        workers = await client.run(missing_paths, paths)
        if not workers:
            raise ClusterError(f"the Dask cluster at {address} has no workers")
        lacking = {w: m for w, m in workers.items() if m}
        if lacking:
            where = "; ".join(f"{w}: {', '.join(m)}" for w, m in sorted(lacking.items()))
            raise ClusterError("these paths are not on storage every worker sees (scan on "
                               f"shared storage mounted under the same names): {where}")
        limit = in_flight or 4 * len(workers)
        pending: dict[Any, list[tuple[Target, Item]]] = {}
        queue = as_completed()  # type: ignore[no-untyped-call]
        source_parts = iter(partitions(targets, partition))

        def submit_next() -> bool:
            batch = next(source_parts, None)
            if batch is None:
                return False
            future = client.submit(scan_partition, source, text, [i for _, i in batch],
                                   pure=False, retries=RETRIES)
            pending[future] = batch
            queue.add(future)  # type: ignore[no-untyped-call]
            return True

        while len(pending) < limit and submit_next():
            pass
        async for future in queue:
            batch = pending.pop(future)
            try:
                results: list[ScanResult] = await future
            except Exception as exc:  # retries exhausted: every object of it is an error
                results = [ScanResult.error(f"cluster task failed: {type(exc).__name__}: "
                                            f"{exc}")] * len(batch)
            for (target, _), result in zip(batch, results, strict=True):
                yield target, result
            while len(pending) < limit and submit_next():
                pass
    finally:
        await client.close()
