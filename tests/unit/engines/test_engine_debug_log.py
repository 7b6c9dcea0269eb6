"""``[log] level = "debug"``: every engine request and its reply is summarised in the scan log
(command, server, sizes, reply, timing) — never the content, never a secret; nothing at all
at the default level."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from avgate import observability
from avgate.engines.base import EngineContext
from avgate.engines.clamd import ClamdEngine, ClamdEngineSettings
from avgate.engines.icap import IcapEngine, IcapEngineSettings
from avgate.limits import Limits
from avgate.observability import ScanLog
from avgate.protocols import icap as icap_proto
from avgate.result import ScanStatus
from avgate.spool import Spool
from tests.unit.engines.socks5_server import Socks5Server
from tests.unit.engines.test_clamd_faults import FakeClamd
from tests.unit.engines.test_icap_engine_faults import OPTIONS_OK, fake_server

pytestmark = pytest.mark.timeout(20)

BODY = b"CONFIDENTIAL-BODY-7f3a " * 50  # must never reach the log
PASSWORD = "pr0xy-Secret"  # noqa: S105 - a proxy password that must not be logged


@pytest.fixture
def log_at(tmp_path: Path) -> Iterator[Any]:
    """Opens the process's scan log at a level; returns a reader of its JSON lines."""
    opened: list[ScanLog] = []

    def open_log(level: str) -> Any:
        path = tmp_path / f"scan-{level}.log"
        opened.append(ScanLog(str(path), level))

        def lines() -> list[dict[str, Any]]:
            text = path.read_text()
            assert BODY[:20].decode() not in text and PASSWORD not in text
            return [json.loads(line) for line in text.splitlines()]
        return lines

    yield open_log
    for log in opened:
        log.close()
    assert observability.current_log() is None


def clamd_engine(*servers: str, **kw: Any) -> ClamdEngine:
    return ClamdEngine(ClamdEngineSettings(servers=servers, connect_timeout=2, scan_timeout=2,
                                           **kw), EngineContext())


async def test_clamd_dialogue_at_debug(log_at: Any) -> None:
    lines = log_at("debug")
    fake = await FakeClamd("found", virus="Debug.Test").start()
    url = fake.url
    try:
        eng = clamd_engine(fake.url)
        await eng.start()  # VERSION
        result = await eng.scan(Spool.from_bytes(BODY))
        await eng.health()  # PING
    finally:
        await fake.stop()
    assert result.status is ScanStatus.INFECTED
    events = lines()
    assert all(e["level"] == "debug" and "time" in e for e in events)
    requests = [e for e in events if e["event"] == "engine_request"]
    by_command = {e["command"]: e for e in requests}
    assert set(by_command) == {"VERSION", "INSTREAM", "PING"}
    instream = by_command["INSTREAM"]
    assert instream["server"] == url and instream["engine"] == "clamd"
    assert instream["size"] == len(BODY)
    assert instream["reply"] == "stream: Debug.Test FOUND"
    assert instream["elapsed_ms"] >= 0
    assert by_command["PING"]["reply"] == "PONG"
    assert by_command["VERSION"]["reply"].startswith("ClamAV ")
    [scan] = [e for e in events if e["event"] == "engine"]
    assert scan["status"] == "infected" and scan["findings"] == ["Debug.Test"]
    assert scan["size"] == len(BODY) and scan["sha256"] == Spool.from_bytes(BODY).sha256


async def test_failed_requests_are_logged_with_their_error(log_at: Any) -> None:
    lines = log_at("debug")
    fake = await FakeClamd("garbage").start()
    try:
        result = await clamd_engine(fake.url).scan(Spool.from_bytes(BODY))
    finally:
        await fake.stop()
    assert result.status is ScanStatus.UNKNOWN
    [request] = [e for e in lines() if e["event"] == "engine_request"]
    assert "unexpected INSTREAM reply 'HELLO THERE'" in request["error"]
    [scan] = [e for e in lines() if e["event"] == "engine"]
    assert scan["status"] == "unknown"


async def test_nothing_below_debug(log_at: Any) -> None:
    lines = log_at("info")
    fake = await FakeClamd("ok").start()
    try:
        assert not observability.debug_enabled()
        result = await clamd_engine(fake.url).scan(Spool.from_bytes(BODY))
    finally:
        await fake.stop()
    assert result.status is ScanStatus.CLEAN
    assert lines() == []


async def test_socks_password_is_not_logged(log_at: Any) -> None:
    lines = log_at("debug")
    fake = await FakeClamd("ok").start()
    proxy = await Socks5Server(user="u", password=PASSWORD).start()
    try:
        result = await clamd_engine(fake.url, socks=proxy.url()).scan(Spool.from_bytes(BODY))
    finally:
        await proxy.stop()
        await fake.stop()
    assert result.status is ScanStatus.CLEAN
    [request] = [e for e in lines() if e["event"] == "engine_request"]
    assert request["socks"] == f"socks5://u:***@127.0.0.1:{proxy.port}"


async def test_icap_dialogue_at_debug(log_at: Any) -> None:
    lines = log_at("debug")

    async def clean(_: bytes) -> bytes:
        return icap_proto.encode_response(204, [("ISTag", '"fake-1"')])

    gen = fake_server(clean)
    port = await gen.__anext__()
    try:
        eng = IcapEngine(IcapEngineSettings(name="icap", url=(
            f"icap://127.0.0.1:{port}/avscan?key={PASSWORD}",), connect_timeout=1,
            scan_timeout=1), EngineContext(limits=Limits(scan_timeout=5)))
        result = await eng.scan(Spool.from_bytes(BODY))
    finally:
        await gen.aclose()
    assert result.status is ScanStatus.CLEAN
    assert b"Preview: 4" in OPTIONS_OK
    by_command = {e["command"]: e for e in lines() if e["event"] == "engine_request"}
    assert by_command["OPTIONS"]["istag"] == "fake-1" and by_command["OPTIONS"]["preview"] == 4
    respmod = by_command["RESPMOD"]
    assert respmod["server"] == f"icap://127.0.0.1:{port}/avscan"  # no query: may hold a key
    assert (respmod["size"], respmod["preview"], respmod["status"], respmod["verdict"]) == (
        len(BODY), 4, 204, "clean")
    assert respmod["continue"] is True


async def test_debug_never_fails_the_caller(tmp_path: Path) -> None:
    assert observability.current_log() is None
    observability.debug({"event": "x"})  # no log open: nothing, no error
    log = ScanLog(str(tmp_path / "a.log"), "debug")
    try:
        assert observability.current_log() is log and observability.debug_enabled()
        log._stream.close()  # the stream went away under us (disk, rotation gone wrong)
        observability.debug({"event": "x"})
        await asyncio.sleep(0)
    finally:
        log.close()
    assert observability.current_log() is None
    # gateway.log.debug is the front-ends' way: the same method
    log = ScanLog(str(tmp_path / "b.log"), "debug", register=False)
    try:
        log.debug({"event": "smtp", "step": "MAIL"})
        assert observability.current_log() is None
    finally:
        log.close()
    [line] = [json.loads(x) for x in (tmp_path / "b.log").read_text().splitlines()]
    assert (line["event"], line["step"], line["level"]) == ("smtp", "MAIL", "debug")
