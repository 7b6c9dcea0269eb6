"""ClamdEngine against a real clamd (tests/clamd_daemon.py), over TCP and the unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from avgate.engines.base import EngineContext, build_engine
from avgate.engines.clamd import ClamdEngine, ClamdEngineSettings
from avgate.engines.command import CommandEngine, CommandEngineSettings
from avgate.result import ScanStatus
from avgate.spool import Spool
from tests.clamd_daemon import EICAR, EICAR_NAME, MARKER, MARKER_NAME, ClamdDaemon
from tests.helpers import async_wait_until

pytestmark = [pytest.mark.clamd, pytest.mark.timeout(60)]

CTX = EngineContext()


@pytest.fixture(params=["tcp", "unix"])
async def engine(request: pytest.FixtureRequest, clamd_alive: ClamdDaemon
                 ) -> AsyncIterator[ClamdEngine]:
    address = clamd_alive.tcp if request.param == "tcp" else clamd_alive.unix
    eng = build_engine(ClamdEngineSettings(servers=address, connect_timeout=2,
                                           scan_timeout=20), CTX)
    assert isinstance(eng, ClamdEngine)
    await eng.start()
    yield eng
    await eng.close()


def _make_file(path: Path, size: int, *, random: bool = False, tail: bytes = b"") -> Path:
    """A file of ``size`` bytes (random or sparse zeros) followed by ``tail``."""
    with open(path, "wb") as f:
        if random:
            for _ in range(size // (64 * 1024)):
                f.write(os.urandom(64 * 1024))
        else:
            f.truncate(size)
            f.seek(size)
        f.write(tail)
    return path


async def test_eicar_is_found(engine: ClamdEngine) -> None:
    result = await engine.scan(Spool.from_bytes(EICAR))
    assert result.status is ScanStatus.INFECTED
    assert [(f.name, f.engine, f.part) for f in result.findings] == [(EICAR_NAME, "clamd", "")]
    assert result.engines[0].version.startswith("ClamAV ")


async def test_body_marker_is_found(engine: ClamdEngine) -> None:
    result = await engine.scan(Spool.from_bytes(b"Subject: hi\r\n\r\nsome " + MARKER + b" text"))
    assert result.status is ScanStatus.INFECTED
    assert result.virus == MARKER_NAME


async def test_clean(engine: ClamdEngine) -> None:
    spool = Spool.from_bytes(b"just an ordinary message\n" * 100)
    result = await engine.scan(spool)
    assert result.status is ScanStatus.CLEAN and not result.findings
    assert result.sha256 == spool.sha256


async def test_empty_object_is_clean(engine: ClamdEngine) -> None:
    result = await engine.scan(Spool.from_bytes(b""))
    assert result.status is ScanStatus.CLEAN


async def test_large_object_is_streamed_in_chunks(engine: ClamdEngine, tmp_path: Path) -> None:
    # 4 MiB on disk with the marker at the very end: only found if every chunk arrived
    path = _make_file(tmp_path / "big.bin", 4 * 1024 * 1024, random=True, tail=MARKER)
    spool = Spool.from_path(path)
    assert not spool.in_memory
    result = await engine.scan(spool)
    assert result.status is ScanStatus.INFECTED and result.virus == MARKER_NAME
    assert result.size == 4 * 1024 * 1024 + len(MARKER)


async def test_over_stream_max_length_is_skipped_not_clean(engine: ClamdEngine,
                                                           clamd_alive: ClamdDaemon,
                                                           tmp_path: Path) -> None:
    path = _make_file(tmp_path / "huge.bin", clamd_alive.stream_max_length + 1024 * 1024)
    result = await engine.scan(Spool.from_path(path))
    assert result.status is ScanStatus.SKIPPED
    assert "StreamMaxLength" in result.reason and "size limit exceeded" in result.reason


async def test_version_and_db_version(engine: ClamdEngine) -> None:
    # our test clamd has no official database: VERSION is just "ClamAV x.y.z"
    assert engine.version().startswith("ClamAV 1.")
    assert engine.db_version() == engine.version()
    assert engine.info().version == engine.version()


async def test_health_reports_each_server(clamd_alive: ClamdDaemon) -> None:
    eng = ClamdEngine(ClamdEngineSettings(
        servers=(clamd_alive.tcp, clamd_alive.unix, "unix:/nonexistent/clamd.sock"),
        connect_timeout=1), CTX)
    health: dict[str, Any] = await eng.health()
    assert health["ok"] is True
    by_server = {s["server"]: s for s in health["servers"]}
    assert by_server[clamd_alive.tcp]["ok"] and by_server[clamd_alive.unix]["ok"]
    assert not by_server["unix:/nonexistent/clamd.sock"]["ok"]
    assert by_server["unix:/nonexistent/clamd.sock"]["down"] is True


async def test_real_clamd_through_a_socks5_proxy(clamd_alive: ClamdDaemon) -> None:
    """Sun's SOCKS set-up: an authenticating SOCKS5 proxy in front of a real clamd; the proxy
    resolves clamd's name (``localhost`` here) and relays every byte."""
    from tests.unit.engines.socks5_server import Socks5Server

    proxy = await Socks5Server(user="sun", password="pw-1").start()  # noqa: S106 - test proxy
    try:
        port = int(clamd_alive.tcp.rsplit(":", 1)[1])
        eng = ClamdEngine(ClamdEngineSettings(
            servers=({"url": f"tcp://localhost:{port}", "socks": proxy.url()},),
            connect_timeout=2, scan_timeout=20), CTX)
        await eng.start()
        assert eng.version().startswith("ClamAV 1.")  # VERSION went through the proxy
        infected = await eng.scan(Spool.from_bytes(b"x" * 100_000 + MARKER + b" text"))
        clean = await eng.scan(Spool.from_bytes(b"nothing to see here"))
        health = await eng.health()
        await eng.close()
        wrong = ClamdEngine(ClamdEngineSettings(
            servers=(clamd_alive.tcp,), socks=proxy.url(password="nope"),  # noqa: S106
            connect_timeout=2),
            CTX)
        refused = await wrong.scan(Spool.from_bytes(EICAR))
    finally:
        await proxy.stop()
    assert infected.status is ScanStatus.INFECTED and infected.virus == MARKER_NAME
    assert clean.status is ScanStatus.CLEAN
    assert health["ok"] and health["servers"][0]["socks"].startswith("socks5://sun:***@")
    assert ("localhost", port) in proxy.targets and proxy.relayed > 100_000
    assert refused.status is ScanStatus.ERROR and "SOCKS proxy" in refused.reason
    assert "nope" not in refused.reason


async def test_engine_cpu_per_small_scan(clamd_alive: ClamdDaemon) -> None:
    """Client-side CPU for a 20 KB scan stays small (clamd's own work is not counted)."""
    eng = ClamdEngine(ClamdEngineSettings(servers=clamd_alive.unix), CTX)
    spool = Spool.from_bytes(os.urandom(20_000))
    for _ in range(5):
        await eng.scan(spool)
    n = 100
    cpu = time.process_time()
    for _ in range(n):
        assert (await eng.scan(spool)).status is ScanStatus.CLEAN
    per_scan = (time.process_time() - cpu) / n
    print(f"client CPU per 20 KB scan: {per_scan * 1e6:.0f} µs")
    assert per_scan < 0.002  # generous for a shared CI machine; typically ~200 µs


# -- command engine with the real clamdscan ----------------------------------------------

CLAMDSCAN = "/usr/bin/clamdscan"


@pytest.mark.skipif(not os.access(CLAMDSCAN, os.X_OK), reason="clamdscan not installed")
@pytest.mark.parametrize(("data", "status", "virus"), [
    (EICAR, ScanStatus.INFECTED, EICAR_NAME),
    (b"nothing to see", ScanStatus.CLEAN, ""),
])
async def test_command_engine_with_clamdscan(clamd_alive: ClamdDaemon, data: bytes,
                                             status: ScanStatus, virus: str) -> None:
    eng = build_engine(CommandEngineSettings(
        name="clamdscan", timeout=20,
        # clamdscan finds the socket in clamd's own config file
        command=f"{CLAMDSCAN} --no-summary --config-file={clamd_alive.config_path} {{path}}",
    ), CTX)
    assert isinstance(eng, CommandEngine)
    spool = Spool.from_bytes(data)
    try:
        result = await eng.scan(spool)
    finally:
        spool.close()
    assert result.status is status, result.reason
    assert result.virus == virus


# -- the shared corpus (tests/corpus.py), when present ----------------------------------

def _corpus() -> list[Any]:
    if importlib.util.find_spec("tests.corpus") is None:
        return []
    from tests import corpus as corpus_module

    return list(corpus_module.corpus())


@pytest.mark.parametrize("sample", _corpus() or [pytest.param(None, marks=pytest.mark.skip(
    reason="tests/corpus.py not available"))], ids=lambda s: getattr(s, "name", "none"))
async def test_corpus_through_real_clamd(sample: Any, clamd_alive: ClamdDaemon) -> None:
    eng = ClamdEngine(ClamdEngineSettings(servers=clamd_alive.unix, scan_timeout=30), CTX)
    result = await eng.scan(Spool.from_bytes(sample.data))
    expected = getattr(sample, "clamd_expected", None) or sample.expected
    assert result.status == expected, result.reason
    if sample.virus and result.status is ScanStatus.INFECTED:
        assert result.virus.startswith(sample.virus)


# -- IDSESSION reuse and FILDES ------------------------------------------------------------

class CountingProxy:
    """A unix-socket relay in front of clamd's socket that counts connections. It relays
    bytes only: a descriptor passed with FILDES does not get through (clamd then answers
    ``No file descriptor received. ERROR``, a real refusal)."""

    def __init__(self, target: str, path: str) -> None:
        self.target = target
        self.path = path
        self.connections = 0
        self.closed = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"unix:{self.path}"

    async def start(self) -> CountingProxy:
        self._server = await asyncio.start_unix_server(self._handle, self.path)
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:  # the relays end on their own, none is cancelled
            writer.close()
        assert await async_wait_until(lambda: self.closed == self.connections)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_unix_connection(self.target)
        self._writers += (writer, up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError):
                dst.write_eof()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self.closed += 1
            writer.close()
            up_writer.close()


@pytest.fixture
async def proxy(clamd_alive: ClamdDaemon, tmp_path: Path) -> AsyncIterator[CountingProxy]:
    p = await CountingProxy(clamd_alive.socket_path, str(tmp_path / "proxy.sock")).start()
    yield p
    await p.stop()


MIXED = [(EICAR, ScanStatus.INFECTED), (b"clean text " * 100, ScanStatus.CLEAN),
         (b"x" * 1000 + MARKER, ScanStatus.INFECTED), (os.urandom(20_000), ScanStatus.CLEAN)]


async def _scan_mixed(eng: ClamdEngine, rounds: int) -> None:
    for _ in range(rounds):
        for data, status in MIXED:
            result = await eng.scan(Spool.from_bytes(data))
            assert result.status is status, result.reason


async def test_sessions_are_reused(proxy: CountingProxy) -> None:
    eng = ClamdEngine(ClamdEngineSettings(servers=proxy.url, session_pool=4, fildes="off",
                                          scan_timeout=20), CTX)
    await _scan_mixed(eng, 5)  # 20 scans, one after the other: one connection
    assert proxy.connections == 1 and eng.servers[0].sessions_opened == 1
    # 8 at once: the 4 sessions, then plain connections for the rest; none waits
    results = await asyncio.gather(*(eng.scan(Spool.from_bytes(EICAR)) for _ in range(8)))
    assert all(r.status is ScanStatus.INFECTED for r in results)
    assert eng.servers[0].sessions_opened == 4 and eng.servers[0].sessions <= 4
    assert proxy.connections == 1 + 3 + 4  # the first session, 3 new ones, 4 plain
    await eng.close()
    assert eng.servers[0].sessions == 0
    assert await async_wait_until(lambda: proxy.closed == proxy.connections)


async def test_idle_sessions_expire(proxy: CountingProxy) -> None:
    eng = ClamdEngine(ClamdEngineSettings(servers=proxy.url, session_idle_timeout=0.3,
                                          scan_timeout=20), CTX)
    await _scan_mixed(eng, 1)
    assert eng.servers[0].sessions == 1
    # the prune timer ENDs and closes it, without another scan
    assert await async_wait_until(lambda: proxy.closed == 1)
    assert eng.servers[0].sessions == 0 and not eng.servers[0].idle
    await _scan_mixed(eng, 1)
    assert proxy.connections == 2
    await eng.close()


async def test_clamd_restart_breaks_the_session_not_the_scan(
        clamd_alive: ClamdDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    eng = ClamdEngine(ClamdEngineSettings(servers=clamd_alive.unix, scan_timeout=20,
                                          fildes="off"), CTX)
    await _scan_mixed(eng, 1)
    clamd_alive.restart()
    # the idle session is dead: noticed before use, a new one is opened
    await _scan_mixed(eng, 1)
    assert eng.servers[0].sessions_opened == 2
    clamd_alive.restart()
    # not noticed before use (the check is skipped): the scan breaks on the dead session
    # and is redone on a plain connection, with the right verdict
    monkeypatch.setattr("avgate.engines.clamd.Session.alive", lambda self: True)
    for data, status in MIXED:
        assert (await eng.scan(Spool.from_bytes(data))).status is status
    assert eng.servers[0].sessions_opened == 3
    assert eng.servers[0].failures == 0  # a broken session is no server failure
    await eng.close()


async def test_an_idle_session_clamd_closed_is_marked_dead_by_its_reader(
        clamd_alive: ClamdDaemon) -> None:
    """The session's reader stays registered while it is idle in the pool: clamd closing
    it is noticed without a scan; a reply's leftover poll report does not kill a live one."""
    eng = ClamdEngine(ClamdEngineSettings(servers=clamd_alive.unix, scan_timeout=20,
                                          fildes="off"), CTX)
    await _scan_mixed(eng, 2)
    [session] = eng.servers[0].idle
    for _ in range(3):
        await asyncio.sleep(0)
    assert not session.dead and eng.servers[0].sessions_opened == 1
    clamd_alive.restart()
    assert await async_wait_until(lambda: session.dead)
    await _scan_mixed(eng, 1)
    assert eng.servers[0].sessions_opened == 2 and eng.servers[0].failures == 0
    await eng.close()


async def test_a_session_reply_is_bounded_by_its_own_scan_timeout(tmp_path: Path) -> None:
    """A session reply that never comes ends the scan after that scan's own scan_timeout
    (not at an earlier scan's deadline, not never), as an error, never clean."""
    path = str(tmp_path / "mute.sock")
    handlers_done = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal handlers_done
        answered = False
        try:
            while data := await reader.read(65536):
                if not answered and data.endswith(b"\0\0\0\0"):  # the first INSTREAM's end
                    writer.write(b"1: stream: OK\0")  # the second is never answered
                    answered = True
        finally:
            writer.close()
            handlers_done += 1

    server = await asyncio.start_unix_server(handle, path)
    eng = ClamdEngine(ClamdEngineSettings(servers=f"unix:{path}", scan_timeout=0.3,
                                          fildes="off", max_failures=100), CTX)
    try:
        assert (await eng.scan(Spool.from_bytes(b"clean"))).status is ScanStatus.CLEAN
        await asyncio.sleep(0.2)  # the first reply's timer is due 0.1 s into the next scan
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await eng.scan(Spool.from_bytes(b"never answered"))
        elapsed = loop.time() - started
        assert result.status is ScanStatus.ERROR and "no reply within" in result.reason
        assert 0.25 <= elapsed < 5
        assert eng.servers[0].sessions_opened == 1  # both went on the one session
    finally:
        await eng.close()
        server.close()
    assert await async_wait_until(lambda: handlers_done == 1)


@pytest.fixture
def fd_passed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the objects that went out by FILDES."""
    from avgate.engines import clamd as clamd_module

    sizes: list[int] = []
    real = clamd_module._spool_fd

    def spy(spool: Spool) -> int:
        sizes.append(spool.size)
        return real(spool)

    monkeypatch.setattr(clamd_module, "_spool_fd", spy)
    return sizes


@pytest.mark.parametrize("pool", [0, 4])
async def test_fildes_verdicts(clamd_alive: ClamdDaemon, tmp_path: Path, pool: int,
                               fd_passed: list[int]) -> None:
    eng = ClamdEngine(ClamdEngineSettings(servers=clamd_alive.unix, session_pool=pool,
                                          fildes="always", scan_timeout=20), CTX)
    for data, status in MIXED:
        # in memory (sealed memfd) and on disk (the spool's own file)
        on_disk = Spool(memory_limit=16, directory=str(tmp_path))
        on_disk.write(data)
        for spool in (Spool.from_bytes(data), on_disk.finish()):
            assert spool.in_memory is (spool is not on_disk)
            result = await eng.scan(spool)
            assert result.status is status, result.reason
            assert result.sha256 == spool.sha256
    assert fd_passed == [len(d) for d, _ in MIXED for _ in (1, 2)]
    assert not eng.servers[0].fildes_refused
    await eng.close()


async def test_fildes_disk_mode_streams_memory_spools(clamd_alive: ClamdDaemon,
                                                      fd_passed: list[int]) -> None:
    eng = ClamdEngine(ClamdEngineSettings(servers=clamd_alive.unix, fildes="disk"), CTX)
    assert (await eng.scan(Spool.from_bytes(EICAR))).status is ScanStatus.INFECTED
    big = Spool(memory_limit=16)
    big.write(b"y" * 100 + MARKER)
    assert (await eng.scan(big.finish())).status is ScanStatus.INFECTED
    assert fd_passed == [100 + len(MARKER)]
    await eng.close()


@pytest.mark.parametrize("pool", [0, 4])
async def test_fildes_refused_falls_back_to_instream(proxy: CountingProxy, pool: int,
                                                     fd_passed: list[int]) -> None:
    # the relay drops the descriptor: clamd answers "No file descriptor received. ERROR"
    eng = ClamdEngine(ClamdEngineSettings(servers=proxy.url, session_pool=pool,
                                          fildes="always", scan_timeout=20), CTX)
    await _scan_mixed(eng, 2)
    assert fd_passed == [len(EICAR)]  # tried once, then INSTREAM for good
    assert "No file descriptor received" in eng.servers[0].fildes_refused
    assert eng.servers[0].failures == 0
    await eng.close()


async def test_fildes_is_never_tried_over_tcp(clamd_alive: ClamdDaemon,
                                              fd_passed: list[int]) -> None:
    eng = ClamdEngine(ClamdEngineSettings(servers=clamd_alive.tcp, fildes="always"), CTX)
    await _scan_mixed(eng, 1)
    assert fd_passed == []
    await eng.close()
