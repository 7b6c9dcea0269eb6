"""avgate.deadline.Deadline: one timer per connection for a deadline that keeps moving."""

from __future__ import annotations

import asyncio

from avgate.deadline import Deadline


async def test_fires_once_at_the_deadline_it_was_moved_to() -> None:
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    d = Deadline(loop, lambda: fired.append(loop.time()))
    start = loop.time()
    d.set(start + 0.05)
    first = d._timer
    d.set(start + 0.15)  # moved later: the same timer, re-armed when it fires early
    assert d._timer is first
    await asyncio.sleep(0.3)
    assert len(fired) == 1 and fired[0] >= start + 0.15


async def test_moving_it_earlier_replaces_the_timer() -> None:
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    d = Deadline(loop, lambda: fired.append(loop.time()))
    start = loop.time()
    d.set(start + 5)
    d.set(start + 0.05)
    await asyncio.sleep(0.2)
    assert len(fired) == 1 and fired[0] < start + 1
    d.cancel()


async def test_cleared_or_cancelled_it_does_not_fire() -> None:
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    cleared = Deadline(loop, lambda: fired.append("cleared"))
    cleared.set(loop.time() + 0.05)
    cleared.clear()
    cancelled = Deadline(loop, lambda: fired.append("cancelled"))
    cancelled.set(loop.time() + 0.05)
    cancelled.cancel()
    assert cancelled._timer is None
    await asyncio.sleep(0.15)
    assert fired == [] and cleared._timer is None  # the disarmed timer dropped itself
    cleared.set(loop.time() + 0.01)  # armed again after a clear: fires
    await asyncio.sleep(0.1)
    assert fired == ["cleared"]
