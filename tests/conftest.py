"""Shared fixtures. Keep each fixture small and documented; helpers live in their own modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.clamd_daemon import ClamdDaemon, start_clamd
from tests.helpers import require_clamd

# -- real clamd ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def clamd() -> Iterator[ClamdDaemon]:
    """A real clamd with our test signatures (StreamMaxLength 10 MiB), shared by the session.

    Tests that pause, kill or restart it must leave it running and answering again.
    """
    daemon = start_clamd(require_clamd())
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
