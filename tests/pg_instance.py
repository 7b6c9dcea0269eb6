"""A private PostgreSQL server for the tests: ``initdb`` a cluster in a temp dir, run
``postgres`` on a loopback port and a socket dir of its own, as an unprivileged user.

PostgreSQL refuses to run as root: as root the cluster belongs to ``nobody`` and every
command runs through ``runuser``. The cluster lives under ``/tmp`` (not pytest's tmp_path,
whose parents are private to root). ``fsync = off``: the tests check transactions, not
power loss. :class:`PgInstance.stop`/``start`` let a test take the server away mid-load.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import pytest

from tests.helpers import PG_BINDIR, strict_dependencies, wait_until

USER = "avgate"  # the database superuser the tests connect as
_db_names = count(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_postgres() -> str:
    """The directory with initdb and postgres; skip (or fail on CI) without them."""
    if not (os.access(f"{PG_BINDIR}/initdb", os.X_OK) and os.access(f"{PG_BINDIR}/postgres",
                                                                    os.X_OK)):
        if strict_dependencies():
            pytest.fail("PostgreSQL is not installed; CI must install it "
                        "(apt-get install postgresql)")
        pytest.skip("PostgreSQL not installed (apt-get install postgresql)")
    return PG_BINDIR


class PgInstance:
    """One private cluster (see the module doc)."""

    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="avgate-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "run"
        self.port = _free_port()
        self.log = self.root / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._as: list[str] = []
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
            self._as = ["runuser", "-u", "nobody", "--"]
        self._run([f"{bindir}/initdb", "-D", str(self.data), "-U", USER, "-A", "trust",
                   "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"])
        self._run(["mkdir", "-p", str(self.sockets)])

    def _run(self, argv: list[str]) -> None:
        done = subprocess.run([*self._as, *argv], capture_output=True, timeout=120,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stderr.decode(errors='replace')}")

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.dsn(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def start(self) -> None:
        log = open(self.log, "ab")  # the server's stderr (an inherited fd: any user writes)
        self.proc = subprocess.Popen(
            [*self._as, f"{self.bindir}/postgres", "-D", str(self.data), "-p", str(self.port),
             "-k", str(self.sockets), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        if not wait_until(self.ready, timeout=60):
            self.stop()
            raise RuntimeError(f"postgres did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """Fast shutdown (SIGINT: open transactions are rolled back, clients cut off)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def new_database(self) -> str:
        """A fresh, empty database; its DSN."""
        import psycopg

        name = f"t{os.getpid()}_{next(_db_names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_postgres() -> Iterator[PgInstance]:
    """A started private cluster, removed afterwards."""
    instance = PgInstance(require_postgres())
    try:
        instance.start()
        yield instance
    finally:
        instance.close()
