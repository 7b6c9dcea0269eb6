"""ClamdEngine against a real clamd (tests/clamd_daemon.py), over TCP and the unix socket."""

from __future__ import annotations

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
