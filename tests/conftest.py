"""Shared fixtures. Keep each fixture small and documented; helpers live in their own modules."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.clamd_daemon import ClamdDaemon, find_clamd, start_clamd

# -- real clamd ---------------------------------------------------------------------------


def _clamd_binary() -> str:
    """The clamd binary, or skip (unprivileged dev machine) / fail (root: CI installs it)."""
    binary = find_clamd()
    if binary is None:
        if os.geteuid() == 0:
            pytest.fail("clamd is not installed; CI must install it "
                        "(apt-get install clamav-daemon) or set AVGATE_CLAMD")
        pytest.skip("clamd not installed (apt-get install clamav-daemon, or set AVGATE_CLAMD)")
    return binary


@pytest.fixture(scope="session")
def clamd() -> Iterator[ClamdDaemon]:
    """A real clamd with our test signatures (StreamMaxLength 10 MiB), shared by the session.

    Tests that pause, kill or restart it must leave it running and answering again.
    """
    daemon = start_clamd(_clamd_binary())
    try:
        yield daemon
    finally:
        daemon.cleanup()


@pytest.fixture
def clamd_alive(clamd: ClamdDaemon) -> ClamdDaemon:
    """The session clamd, restarted first if an earlier test left it dead or paused."""
    clamd.resume()
    if not (clamd.ping() and clamd.ping(unix=True)):
        clamd.restart()
    return clamd
