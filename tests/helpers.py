"""Small helpers shared by every test folder: waiting for a condition with a deadline, and
finding the external tools the integration tests drive.

Tests synchronise on what they can observe (a log line, a file, a counter, a socket state),
polled here with a deadline, never on a fixed sleep: a sleep is either too short on a loaded
machine (a flaky test) or longer than needed everywhere else.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable

import pytest

POLL_INTERVAL = 0.05


def wait_until(predicate: Callable[[], object], timeout: float = 10.0,
               interval: float = POLL_INTERVAL) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (its last
    answer, asked once more at the deadline). For threads and blocking test code."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


async def async_wait_until(predicate: Callable[[], object], timeout: float = 10.0,  # noqa: ASYNC109
                           interval: float = POLL_INTERVAL) -> bool:
    """:func:`wait_until` for coroutines: the event loop keeps running while it polls (so
    servers and sinks living in the test's own loop make progress)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return bool(predicate())


def require_binary(name: str, package: str) -> str:
    """Path of an installed tool (``$PATH``, then /usr/sbin and /usr/bin). Missing: skip on
    an unprivileged dev machine, fail as root (CI installs every package it needs)."""
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)
    if found is None:
        if os.geteuid() == 0:
            pytest.fail(f"{name} is not installed; CI must install it (apt-get install "
                        f"{package})")
        pytest.skip(f"{name} not installed (apt-get install {package})")
    return found


def require_clamd() -> str:
    """The clamd binary (``$AVGATE_CLAMD``, PATH, the usual places); skip or fail as
    :func:`require_binary` does."""
    from tests.clamd_daemon import find_clamd

    binary = find_clamd()
    if binary is None:
        if os.geteuid() == 0:
            pytest.fail("clamd is not installed; CI must install it "
                        "(apt-get install clamav-daemon) or set AVGATE_CLAMD")
        pytest.skip("clamd not installed (apt-get install clamav-daemon, or set AVGATE_CLAMD)")
    return binary
