"""Shared fixtures. Keep each fixture small and documented; helpers live in their own modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.clamd_daemon import ClamdDaemon, start_clamd
from tests.helpers import (
    missing_message,
    missing_requirements,
    require_clamd,
    strict_dependencies,
)

# -- the external pieces the tests drive ------------------------------------------------------


def pytest_sessionstart(session: pytest.Session) -> None:
    """Where the test packages must be there (CI, or root with apt-get: `make test` installs
    them), stop before the first test with one line naming what is missing and the package,
    instead of failing deep inside some test. Elsewhere the tests needing them skip."""
    if not strict_dependencies():
        return
    missing = missing_requirements()
    if missing:
        # a usage error: pytest prints it once, as "ERROR: ...", and exits with 4
        raise pytest.UsageError(missing_message(missing))


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
