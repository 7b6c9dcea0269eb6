"""The scan worker pool: tasks run in other processes under hard time and memory budgets."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from avgate.workers import BudgetExceeded, WorkerError, WorkerPool
from tests.helpers import async_wait_until

MiB = 1 << 20


# -- task functions (run in the workers; module level so they pickle by reference) -----------
def add(a: int, b: int) -> int:
    return a + b


def pid() -> int:
    return os.getpid()


def spin(seconds: float) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:  # CPU-bound, like a decompression bomb
        pass
    return "done"


def allocate(nbytes: int) -> int:
    block = bytearray(nbytes)
    return len(block)


def crash() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def boom() -> None:
    raise ValueError("bad input")


_STATE: dict[str, str] = {}


def init(value: str) -> None:
    _STATE["value"] = value


def state() -> str:
    return _STATE["value"]


# -- tests ----------------------------------------------------------------------------------
@pytest.fixture
async def pool():
    p = WorkerPool(2, memory_limit=512 * MiB, initializer=init, initargs=("ready",))
    await p.start()
    yield p
    await p.close()


async def test_runs_tasks_in_other_processes(pool: WorkerPool) -> None:
    assert await pool.run(add, 2, 3, budget=5) == 5
    assert await pool.run(pid, budget=5) != os.getpid()
    assert await pool.run(state, budget=5) == "ready"  # the initializer ran in the worker


async def test_an_exception_in_the_task_is_a_worker_error(pool: WorkerPool) -> None:
    with pytest.raises(WorkerError, match="ValueError: bad input"):
        await pool.run(boom, budget=5)
    assert await pool.run(add, 1, 1, budget=5) == 2  # the worker is still usable


async def test_time_budget_kills_and_replaces_the_worker(pool: WorkerPool) -> None:
    start = time.monotonic()
    with pytest.raises(BudgetExceeded) as info:
        await pool.run(spin, 30.0, budget=0.5)
    assert info.value.kind == "time"
    assert time.monotonic() - start < 3
    assert pool.stats().killed == 1
    # both slots work again (the killed worker was replaced)
    results = await asyncio.gather(*(pool.run(add, i, 1, budget=10) for i in range(4)))
    assert results == [1, 2, 3, 4]


async def test_memory_cap_is_a_budget_not_a_crash(pool: WorkerPool) -> None:
    with pytest.raises(BudgetExceeded) as info:
        await pool.run(allocate, 2048 * MiB, budget=10)
    assert info.value.kind == "memory"
    assert await pool.run(allocate, 16 * MiB, budget=10) == 16 * MiB


async def test_a_worker_that_dies_is_replaced(pool: WorkerPool) -> None:
    with pytest.raises(BudgetExceeded) as info:
        await pool.run(crash, budget=10)
    assert info.value.kind == "died"
    assert await pool.run(add, 2, 2, budget=10) == 4


async def test_cancelling_a_task_kills_its_worker(pool: WorkerPool) -> None:
    task = asyncio.ensure_future(pool.run(spin, 30.0, budget=60))
    assert await async_wait_until(lambda: pool.stats().busy == 1)  # a worker is spinning
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.stats().killed == 1
    assert await pool.run(add, 1, 2, budget=10) == 3


async def test_the_event_loop_keeps_answering_while_workers_spin(pool: WorkerPool) -> None:
    tasks = [asyncio.ensure_future(pool.run(spin, 1.5, budget=10)) for _ in range(2)]
    assert await async_wait_until(lambda: pool.stats().busy == 2)
    worst = 0.0
    for _ in range(20):
        t = time.monotonic()
        await asyncio.sleep(0.05)
        worst = max(worst, time.monotonic() - t - 0.05)
    assert worst < 0.1, f"event loop blocked for {worst:.3f}s"
    assert await asyncio.gather(*tasks) == ["done", "done"]


async def test_waiting_for_a_free_worker_is_bounded(pool: WorkerPool) -> None:
    busy = [asyncio.ensure_future(pool.run(spin, 2.0, budget=10)) for _ in range(2)]
    assert await async_wait_until(lambda: pool.stats().busy == 2)
    with pytest.raises(TimeoutError):
        await pool.run(add, 1, 1, budget=10, wait=0.2)
    await asyncio.gather(*busy)


async def test_closed_pool_refuses_work() -> None:
    p = WorkerPool(1)
    await p.start()
    await p.close()
    with pytest.raises(WorkerError, match="closed"):
        await p.run(add, 1, 1, budget=5)


async def test_initializer_failure_is_reported() -> None:
    p = WorkerPool(1, initializer=boom_init)
    with pytest.raises(WorkerError, match="failed to initialise: RuntimeError: no signatures"):
        await p.start()


def boom_init() -> None:
    raise RuntimeError("no signatures")
