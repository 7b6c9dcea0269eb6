"""ClamdEngine IDSESSION faults against a fake clamd (fault injection only; the real clamd
tests are in tests/integration/test_clamd_engine.py).

The fake speaks IDSESSION through avgate's server-side codec. Its first session reply is
right; from the second on it misbehaves as told: a reply with another request's id, garbage,
an ERROR (MaxQueue), or it closes. A reused session that misbehaves must never give the
scan its verdict: the scan is redone on a fresh plain connection, where the fake answers
right.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from avgate.engines.base import EngineContext
from avgate.engines.clamd import ClamdEngine, ClamdEngineSettings
from avgate.protocols import clamd as proto
from avgate.result import ScanStatus
from avgate.spool import Spool

pytestmark = pytest.mark.timeout(20)

VIRUS = "Fake.Virus"


class SessionFake:
    """A unix-socket fake clamd: FOUND for objects holding b"virus", OK otherwise."""

    def __init__(self, path: str, fault: str) -> None:
        self.path = path
        self.fault = fault
        self.plain = 0  # connections without IDSESSION
        self.sessions = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> SessionFake:
        self._server = await asyncio.start_unix_server(self._handle, self.path)
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        parser = proto.ServerParser()
        data = bytearray()
        in_session = False
        with contextlib.suppress(ConnectionError, proto.ClamdProtocolError):
            while chunk := await reader.read(65536):
                parser.receive_data(chunk)
                while (ev := parser.next_event()) is not proto.NEED_DATA:
                    if isinstance(ev, proto.Command) and ev.name == "FILDES":
                        # a clamd without descriptor passing (fault "no_fildes")
                        writer.write(ev.reply(proto.UNKNOWN_COMMAND))
                        await writer.drain()
                        writer.close()
                        return
                    if isinstance(ev, proto.Command) and ev.name == "IDSESSION":
                        in_session = True
                        self.sessions += 1
                    elif isinstance(ev, proto.InstreamChunk):
                        data += ev.data
                    elif isinstance(ev, proto.InstreamEnd):
                        verdict = (proto.found_reply(VIRUS) if b"virus" in data
                                   else proto.ok_reply())
                        data.clear()
                        if not in_session:
                            self.plain += 1
                            writer.write(ev.command.reply(verdict))
                            await writer.drain()
                            writer.close()
                            return
                        if not await self._session_reply(ev.command, verdict, writer):
                            writer.close()
                            return
        writer.close()

    async def _session_reply(self, command: proto.Command, verdict: str,
                             writer: asyncio.StreamWriter) -> bool:
        """Answer inside the session; False: close it."""
        assert command.session_id is not None
        if command.session_id == 1 or self.fault in ("none", "no_fildes"):
            writer.write(command.reply(verdict))
            await writer.drain()
            return True
        # the fault: a clean verdict the scan must not take
        wrong = {
            "other_id": proto.format_reply(proto.ok_reply(), proto.Prefix.Z,
                                           command.session_id + 5),
            "old_id": proto.format_reply(proto.ok_reply(), proto.Prefix.Z, 1),
            "no_id": proto.format_reply(proto.ok_reply(), proto.Prefix.Z),
            "garbage": b"\x01\x02 HELLO\0",
            "max_queue": command.reply(proto.error_reply("Max queue size exceeded")),
            "close": b"",
            "ok_then_garbage": command.reply(proto.ok_reply()) + b"??\0",
        }[self.fault]
        writer.write(wrong)
        await writer.drain()
        return self.fault == "ok_then_garbage"


@pytest.fixture
async def fake_factory(tmp_path: Path) -> AsyncIterator[Any]:
    fakes: list[SessionFake] = []

    async def make(fault: str) -> SessionFake:
        fake = await SessionFake(str(tmp_path / f"{fault}.sock"), fault).start()
        fakes.append(fake)
        return fake

    yield make
    for fake in fakes:
        await fake.stop()


def engine(fake: SessionFake, **kw: Any) -> ClamdEngine:
    kw.setdefault("fildes", "off")
    return ClamdEngine(ClamdEngineSettings(servers=f"unix:{fake.path}", connect_timeout=1,
                                           scan_timeout=2, **kw), EngineContext())


VIRUS_SPOOL = Spool.from_bytes(b"a virus inside")


async def test_the_fake_reuses_one_session_when_it_behaves(fake_factory: Any) -> None:
    fake = await fake_factory("none")
    eng = engine(fake)
    for _ in range(5):
        assert (await eng.scan(VIRUS_SPOOL)).status is ScanStatus.INFECTED
    assert (fake.sessions, fake.plain) == (1, 0)
    await eng.close()


@pytest.mark.parametrize("fault", ["other_id", "old_id", "no_id", "garbage", "max_queue",
                                   "close"])
async def test_a_misbehaving_reused_session_never_gives_the_verdict(fake_factory: Any,
                                                                    fault: str) -> None:
    fake = await fake_factory(fault)
    eng = engine(fake)
    assert (await eng.scan(VIRUS_SPOOL)).status is ScanStatus.INFECTED  # session request 1
    result = await eng.scan(VIRUS_SPOOL)  # request 2: the fault's clean answer is refused
    assert result.status is ScanStatus.INFECTED and result.virus == VIRUS, result.reason
    assert fake.plain == 1  # redone on a plain connection
    assert eng.servers[0].sessions == 0 and eng.servers[0].failures == 0
    # the next scan opens a new session
    assert (await eng.scan(VIRUS_SPOOL)).status is ScanStatus.INFECTED
    assert fake.sessions == 2
    await eng.close()


async def test_unasked_bytes_after_a_reply_retire_the_session(fake_factory: Any) -> None:
    fake = await fake_factory("ok_then_garbage")
    eng = engine(fake)
    await eng.scan(VIRUS_SPOOL)
    assert (await eng.scan(VIRUS_SPOOL)).status is ScanStatus.CLEAN  # a matched reply
    # "??" came after it: the session is not used again
    assert (await eng.scan(VIRUS_SPOOL)).status is ScanStatus.INFECTED
    assert fake.sessions == 2
    await eng.close()


async def test_a_hanging_session_times_out_within_the_budget(tmp_path: Path) -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass

    server = await asyncio.start_unix_server(hang, str(tmp_path / "hang.sock"))
    try:
        eng = ClamdEngine(ClamdEngineSettings(servers=f"unix:{tmp_path}/hang.sock",
                                              scan_timeout=0.3), EngineContext())
        result = await eng.scan(VIRUS_SPOOL)
        assert result.status is ScanStatus.ERROR and "no reply within 0.3s" in result.reason
        assert eng.servers[0].sessions == 0  # the session was closed, not pooled
    finally:
        server.close()
        await server.wait_closed()


def test_settings() -> None:
    s = ClamdEngineSettings()
    assert (s.session_pool, s.session_idle_timeout, s.fildes) == (16, 20.0, "disk")
    with pytest.raises(ValueError, match="fildes"):
        ClamdEngineSettings(fildes="yes")
    with pytest.raises(ValueError, match="session_pool"):
        ClamdEngineSettings(session_pool=-1)
    assert ClamdEngineSettings(fildes_max_size="1 MiB").fildes_max_size == 1 << 20


async def test_no_descriptor_means_instream(fake_factory: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """memfd_create failing (EMFILE, a kernel without memfd) is no scan failure: the object
    is streamed instead."""
    def no_memfd(*args: object) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr("avgate.engines.clamd.os.memfd_create", no_memfd)
    fake = await fake_factory("none")
    eng = engine(fake, fildes="always")
    result = await eng.scan(VIRUS_SPOOL)
    assert result.status is ScanStatus.INFECTED, result.reason
    assert fake.sessions == 1 and not eng.servers[0].fildes_refused
    await eng.close()


@pytest.mark.parametrize("pool", [0, 4])
async def test_unknown_fildes_falls_back_to_instream(fake_factory: Any, pool: int) -> None:
    fake = await fake_factory("no_fildes")
    eng = engine(fake, fildes="always", session_pool=pool)
    for _ in range(3):
        result = await eng.scan(VIRUS_SPOOL)
        assert result.status is ScanStatus.INFECTED, result.reason
    assert eng.servers[0].fildes_refused == "UNKNOWN COMMAND"
    assert eng.servers[0].failures == 0
    # once refused, INSTREAM only: on sessions when there are any
    assert (fake.sessions, fake.plain) == ((2, 1) if pool else (0, 3))
    await eng.close()
