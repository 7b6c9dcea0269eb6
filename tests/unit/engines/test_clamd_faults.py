"""ClamdEngine fault handling against fake clamd servers (fault injection only).

The fakes speak the protocol through avgate's own server-side codec, then misbehave on
purpose: refuse, hang, answer garbage, close mid-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from avgate import config
from avgate.engines.base import EngineContext, build_engine
from avgate.engines.clamd import VERSION_TTL, ClamdEngine, ClamdEngineSettings, ClamdServer
from avgate.errors import ConfigError
from avgate.limits import Limits
from avgate.protocols import clamd as proto
from avgate.result import ScanStatus
from avgate.spool import Spool
from tests.helpers import async_wait_until

pytestmark = pytest.mark.timeout(20)

CTX = EngineContext()
VERSION = "ClamAV 1.4.6/27000/Mon Nov 23 09:18:14 2024"


class FakeClamd:
    """A TCP fake clamd. ``behaviour`` says how it answers INSTREAM."""

    def __init__(self, behaviour: str = "ok", virus: str = "Fake.Virus") -> None:
        self.behaviour = behaviour
        self.virus = virus
        self.version = VERSION
        self.connections = 0
        self.received = 0  # stream bytes of the last INSTREAM
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"tcp://127.0.0.1:{port}"

    async def start(self) -> FakeClamd:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            await self._converse(reader, writer)
        except (ConnectionError, proto.ClamdProtocolError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _converse(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        parser = proto.ServerParser(stream_max_length=1 << 30)
        self.received = 0
        while True:
            data = await reader.read(65536)
            parser.receive_data(data)
            while (ev := parser.next_event()) is not proto.NEED_DATA:
                if isinstance(ev, proto.ConnectionClosed):
                    return
                if isinstance(ev, proto.Command) and ev.name == "PING":
                    writer.write(ev.reply(proto.PONG))
                    return
                if isinstance(ev, proto.Command) and ev.name == "VERSION":
                    writer.write(ev.reply(self.version))
                    return
                if isinstance(ev, proto.InstreamChunk):
                    self.received += len(ev.data)
                    if self.behaviour == "close_mid" and self.received > 100_000:
                        return  # drop the connection without a reply
                if isinstance(ev, proto.InstreamEnd):
                    await self._reply(ev.command, writer)
                    return

    async def _reply(self, command: proto.Command, writer: asyncio.StreamWriter) -> None:
        b = self.behaviour
        if b == "hang":
            await asyncio.Event().wait()
        replies = {
            "ok": command.reply(proto.ok_reply()),
            "found": command.reply(proto.found_reply(self.virus)),
            "garbage": b"HELLO THERE\0",
            "noterm": b"stream: OK",  # no terminator, then close
            "error": command.reply(proto.error_reply("Can't allocate memory", "stream")),
            "size": command.reply(proto.SIZE_LIMIT_EXCEEDED),
            "pong": command.reply(proto.PONG),
            "unknown_command": command.reply(proto.UNKNOWN_COMMAND),
            "binary": bytes(range(1, 256)) + b"\0",
            "endless": b"A" * (proto.DEFAULT_MAX_REPLY_LENGTH + 10),  # never terminated
            "silent": b"",  # close without a byte
        }
        writer.write(replies[b])
        await writer.drain()


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeClamd]]:
    """Started fakes are registered here and stopped after the test."""
    started: list[FakeClamd] = []
    yield started
    for fake in started:
        await fake.stop()


async def fake(fakes: list[FakeClamd], behaviour: str = "ok", **kw: Any) -> FakeClamd:
    f = await FakeClamd(behaviour, **kw).start()
    fakes.append(f)
    return f


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"  # nothing listens there now: connection refused


class FakeClock:
    """The engine's health/TTL clock, advanced by the test instead of sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def engine(*servers: str, clock: FakeClock | None = None, ctx: EngineContext = CTX,
           **kw: Any) -> ClamdEngine:
    kw.setdefault("connect_timeout", 0.5)
    kw.setdefault("scan_timeout", 0.5)
    return ClamdEngine(ClamdEngineSettings(servers=servers, **kw), ctx,
                       clock=clock or FakeClock())


SMALL = Spool.from_bytes(b"hello world")


# -- single server faults -----------------------------------------------------------------

async def test_fake_verdicts_pass_through(fakes: list[FakeClamd]) -> None:
    found = await fake(fakes, "found", virus="Win.Trojan.Agent-1")
    result = await engine(found.url).scan(SMALL)
    assert result.status is ScanStatus.INFECTED
    assert [(f.name, f.engine) for f in result.findings] == [("Win.Trojan.Agent-1", "clamd")]
    ok = await fake(fakes, "ok")
    assert (await engine(ok.url).scan(SMALL)).status is ScanStatus.CLEAN
    assert ok.received == len(b"hello world")


async def test_connection_refused_is_an_error() -> None:
    result = await engine(closed_port_url()).scan(SMALL)
    assert result.status is ScanStatus.ERROR
    assert "cannot connect" in result.reason


async def test_missing_unix_socket_is_an_error() -> None:
    result = await engine("unix:/nonexistent/clamd.sock").scan(SMALL)
    assert result.status is ScanStatus.ERROR and "cannot connect" in result.reason


async def test_hanging_server_times_out_quickly(fakes: list[FakeClamd]) -> None:
    hang = await fake(fakes, "hang")
    start = time.monotonic()
    result = await engine(hang.url, scan_timeout=0.2).scan(SMALL)
    assert result.status is ScanStatus.ERROR
    assert "no reply within 0.2s" in result.reason
    assert time.monotonic() - start < 2


@pytest.mark.parametrize(("behaviour", "reason"), [
    ("garbage", "unexpected INSTREAM reply 'HELLO THERE'"),
    ("pong", "unexpected INSTREAM reply 'PONG'"),
    ("unknown_command", "unexpected INSTREAM reply 'UNKNOWN COMMAND'"),
    ("binary", "unexpected INSTREAM reply"),
    ("endless", "longer than"),
])
async def test_unparseable_replies_are_unknown(fakes: list[FakeClamd], behaviour: str,
                                               reason: str) -> None:
    """clamd answered, but nothing we can read as a verdict: unknown (never clean), and not
    error — error is for no communication."""
    f = await fake(fakes, behaviour)
    result = await engine(f.url).scan(SMALL)
    assert result.status is ScanStatus.UNKNOWN, result
    assert reason in result.reason and f.url in result.reason


@pytest.mark.parametrize(("behaviour", "reason"), [
    ("noterm", "connection closed without a reply after b'stream: OK'"),
    ("silent", "connection closed without a reply"),
])
async def test_no_whole_reply_is_an_error(fakes: list[FakeClamd], behaviour: str,
                                          reason: str) -> None:
    # closed before the terminator: no reply came (a clamd crashing mid-reply), error
    f = await fake(fakes, behaviour)
    result = await engine(f.url).scan(SMALL)
    assert result.status is ScanStatus.ERROR
    assert reason in result.reason


async def test_garbage_then_refused_is_unknown_refused_then_garbage_too(
        fakes: list[FakeClamd]) -> None:
    # with several servers, one that answered garbage makes the scan unknown whatever the
    # order; each server is still named in the reason
    bad = await fake(fakes, "garbage")
    down = closed_port_url()
    for servers in ((bad.url, down), (down, bad.url)):
        result = await engine(*servers).scan(SMALL)
        assert result.status is ScanStatus.UNKNOWN, (servers, result)
        assert bad.url in result.reason and down in result.reason
    result = await engine(down, "unix:/nonexistent/clamd.sock").scan(SMALL)
    assert result.status is ScanStatus.ERROR


async def test_server_closing_mid_stream_is_an_error(fakes: list[FakeClamd]) -> None:
    f = await fake(fakes, "close_mid")
    result = await engine(f.url, stream_chunk_size=16384).scan(Spool.from_bytes(b"x" * 2_000_000))
    assert result.status is ScanStatus.ERROR
    assert "connection" in result.reason


async def test_error_reply_is_an_error_not_clean(fakes: list[FakeClamd]) -> None:
    f = await fake(fakes, "error")
    result = await engine(f.url).scan(SMALL)
    assert result.status is ScanStatus.ERROR
    assert "Can't allocate memory ERROR" in result.reason


async def test_size_limit_reply_is_skipped_not_clean(fakes: list[FakeClamd]) -> None:
    f = await fake(fakes, "size")
    result = await engine(f.url).scan(SMALL)
    assert result.status is ScanStatus.SKIPPED
    assert "StreamMaxLength" in result.reason


async def test_large_object_arrives_complete_in_chunks(fakes: list[FakeClamd]) -> None:
    f = await fake(fakes, "ok")
    data = bytes(range(256)) * 4000 + b"tail"  # not a multiple of the chunk size
    result = await engine(f.url, stream_chunk_size=10_000).scan(Spool.from_bytes(data))
    assert result.status is ScanStatus.CLEAN
    assert f.received == len(data)


# -- several servers ----------------------------------------------------------------------

async def test_failover_uses_the_next_server_verdict(fakes: list[FakeClamd]) -> None:
    second = await fake(fakes, "found", virus="From.Second")
    clock = FakeClock()
    eng = engine(closed_port_url(), second.url, clock=clock)
    result = await eng.scan(SMALL)
    assert result.status is ScanStatus.INFECTED and result.virus == "From.Second"
    assert eng.servers[0].down_until > clock()  # marked down after 1 failure
    assert eng.servers[1].failures == 0


@pytest.mark.parametrize("behaviour", ["garbage", "hang", "close_mid"])
async def test_failover_after_bad_reply(fakes: list[FakeClamd], behaviour: str) -> None:
    bad = await fake(fakes, behaviour)
    good = await fake(fakes, "found", virus="Good.Answer")
    eng = engine(bad.url, good.url, scan_timeout=0.2)
    result = await eng.scan(Spool.from_bytes(b"y" * 300_000))
    assert result.status is ScanStatus.INFECTED and result.virus == "Good.Answer"
    assert bad.connections == 1 and good.connections == 1


async def test_all_servers_failing_reports_each() -> None:
    a, b = closed_port_url(), "unix:/nonexistent/clamd.sock"
    result = await engine(a, b).scan(SMALL)
    assert result.status is ScanStatus.ERROR
    assert a in result.reason and b in result.reason


async def test_error_reply_does_not_fail_over(fakes: list[FakeClamd]) -> None:
    # the server is alive and gave a verdict about this object: not a server failure
    bad = await fake(fakes, "error")
    good = await fake(fakes, "ok")
    eng = engine(bad.url, good.url)
    assert (await eng.scan(SMALL)).status is ScanStatus.ERROR
    assert good.connections == 0 and eng.servers[0].failures == 0


async def test_round_robin_distributes(fakes: list[FakeClamd]) -> None:
    servers = [await fake(fakes, "ok") for _ in range(3)]
    eng = engine(*(s.url for s in servers), strategy="round_robin")
    for _ in range(6):
        assert (await eng.scan(SMALL)).status is ScanStatus.CLEAN
    assert [s.connections for s in servers] == [2, 2, 2]


async def test_failover_strategy_sticks_to_the_first(fakes: list[FakeClamd]) -> None:
    servers = [await fake(fakes, "ok") for _ in range(2)]
    eng = engine(*(s.url for s in servers))
    for _ in range(4):
        await eng.scan(SMALL)
    assert [s.connections for s in servers] == [4, 0]


async def test_down_server_is_skipped_until_retry_after(fakes: list[FakeClamd]) -> None:
    bad = await fake(fakes, "garbage")
    good = await fake(fakes, "ok")
    clock = FakeClock()
    eng = engine(bad.url, good.url, retry_after=30, clock=clock)
    assert (await eng.scan(SMALL)).status is ScanStatus.CLEAN
    assert bad.connections == 1
    clock.advance(29.9)
    assert (await eng.scan(SMALL)).status is ScanStatus.CLEAN
    assert bad.connections == 1  # skipped while down
    clock.advance(0.2)
    bad.behaviour = "found"  # it recovered
    result = await eng.scan(SMALL)
    assert bad.connections == 2 and result.status is ScanStatus.INFECTED
    assert eng.servers[0].failures == 0 and eng.servers[0].down_until == 0


async def test_max_failures_counts_consecutive_failures(fakes: list[FakeClamd]) -> None:
    bad = await fake(fakes, "garbage")
    good = await fake(fakes, "ok")
    eng = engine(bad.url, good.url, max_failures=2, retry_after=60)
    await eng.scan(SMALL)
    await eng.scan(SMALL)
    assert bad.connections == 2  # one failure was not enough to mark it down
    await eng.scan(SMALL)
    assert bad.connections == 2


async def test_all_servers_down_fails_fast(fakes: list[FakeClamd]) -> None:
    bad = await fake(fakes, "garbage")
    eng = engine(bad.url, retry_after=60)
    assert (await eng.scan(SMALL)).status is ScanStatus.UNKNOWN
    result = await eng.scan(SMALL)
    assert result.status is ScanStatus.ERROR and "marked down" in result.reason
    assert bad.connections == 1


# -- version, health ----------------------------------------------------------------------

async def test_version_and_db_version_follow_the_server(fakes: list[FakeClamd]) -> None:
    f = await fake(fakes, "ok")
    clock = FakeClock()
    eng = engine(f.url, clock=clock)
    assert eng.version() == "" and eng.db_version() == ""  # before start
    await eng.start()
    # the refresh db_version() scheduled before start is over: nothing else is pending
    assert await async_wait_until(lambda: eng._refresh is None or eng._refresh.done(), 5)
    assert eng.version() == VERSION
    assert eng.db_version() == "27000/Mon Nov 23 09:18:14 2024"
    f.version = "ClamAV 1.4.6/27001/Tue Nov 24 09:00:00 2024"  # freshclam + RELOAD
    connections = f.connections
    clock.advance(VERSION_TTL - 1)
    assert eng.db_version().startswith("27000/")  # still fresh: no query
    await asyncio.sleep(0)
    assert f.connections == connections and (eng._refresh is None or eng._refresh.done())
    clock.advance(2)
    eng.db_version()  # stale: schedules a background refresh
    assert await async_wait_until(lambda: eng.db_version().startswith("27001/"), 5)
    assert eng.db_version() == "27001/Tue Nov 24 09:00:00 2024"
    assert eng.info().version.startswith("ClamAV 1.4.6/27001/")
    await eng.close()


async def test_start_tolerates_a_down_server(fakes: list[FakeClamd]) -> None:
    f = await fake(fakes, "ok")
    eng = engine(closed_port_url(), f.url)
    await eng.start()
    assert eng.version() == VERSION
    assert "VERSION" in eng.servers[0].last_error


async def test_health_pings_each_server(fakes: list[FakeClamd]) -> None:
    ok = await fake(fakes, "ok")
    refused = closed_port_url()
    health = await engine(ok.url, refused).health()
    assert health["ok"] is True
    reports = {r["server"]: r for r in health["servers"]}
    assert reports[ok.url]["ok"] and "latency_ms" in reports[ok.url]
    assert not reports[refused]["ok"] and "cannot connect" in reports[refused]["error"]
    assert (await engine(refused).health())["ok"] is False


# -- config -------------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "expected"), [
    ("tcp://127.0.0.1:3310", ("127.0.0.1", 3310, "")),
    ("tcp://[::1]:3310", ("::1", 3310, "")),
    ("clamd.example:3310", ("clamd.example", 3310, "")),
    ("unix:/run/clamav/clamd.ctl", ("", 0, "/run/clamav/clamd.ctl")),
    ("unix:///run/clamav/clamd.ctl", ("", 0, "/run/clamav/clamd.ctl")),
    ("/run/clamav/clamd.ctl", ("", 0, "/run/clamav/clamd.ctl")),
])
def test_server_urls(url: str, expected: tuple[str, int, str]) -> None:
    s = ClamdServer.parse(url)
    assert (s.host, s.port, s.path) == expected


@pytest.mark.parametrize(("table", "key"), [
    ({"servers": []}, "servers"),
    ({"servers": ["http://x:1"]}, "http://x:1"),
    ({"servers": ["tcp://x"]}, "missing port"),
    ({"servers": ["unix:relative"]}, "absolute"),
    ({"strategy": "random"}, "strategy"),
    ({"connect_timeout": 0}, "connect_timeout"),
    ({"scan_timeout": "fast"}, "scan_timeout"),
    ({"max_failures": 0}, "max_failures"),
    ({"stream_chunk_size": 0}, "stream_chunk_size"),
    ({"stream_chunk_size": "2 GiB"}, "stream_chunk_size"),
    ({"bogus": 1}, "bogus"),
])
def test_config_errors_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key) as exc:
        config.from_dict({"engines": [{"type": "clamd", **table}]})
    assert str(exc.value).startswith("<config>: engines[0]")


def test_config_defaults_and_values() -> None:
    eng = build_engine(ClamdEngineSettings(), CTX)
    assert isinstance(eng, ClamdEngine)
    assert [s.url for s in eng.servers] == ["tcp://127.0.0.1:3310", "unix:/run/clamav/clamd.ctl"]
    s = eng.settings
    assert (s.strategy, s.max_failures, s.retry_after, s.scan_timeout) == (
        "failover", 1, 10.0, None)
    [settings] = config.from_dict({"engines": [{
        "type": "clamd", "servers": "unix:/s", "strategy": "round_robin",
        "stream_chunk_size": "256 KiB", "scan_timeout": 30, "connect_timeout": 1.5,
        "retry_after": 5, "max_failures": 3}]}).engines
    eng = build_engine(settings, CTX)
    assert isinstance(eng, ClamdEngine)
    s = eng.settings
    assert (s.stream_chunk_size, s.scan_timeout, s.connect_timeout) == (262144, 30.0, 1.5)
    assert (s.strategy, s.max_failures, s.retry_after) == ("round_robin", 3, 5.0)
    assert [x.url for x in eng.servers] == ["unix:/s"]
    # one budget for the whole scan ([limits] scan_timeout), not one per server
    assert eng.timeouts.scan == CTX.limits.scan_timeout


def test_build_engine_wants_the_engines_settings() -> None:
    with pytest.raises(TypeError, match="ClamdEngineSettings"):
        build_engine(config.from_dict({}).engines[0].model_copy(update={"type": "clamd"}), CTX)


# -- one budget per scan ------------------------------------------------------------------

async def test_budget_is_spent_across_servers_not_multiplied(fakes: list[FakeClamd]) -> None:
    """Three hung servers, no per-attempt bound: the scan ends at [limits] scan_timeout, the
    first server is marked down and the others are not tried on an empty budget."""
    hung = [await fake(fakes, "hang") for _ in range(3)]
    ctx = EngineContext(limits=Limits(scan_timeout=0.4))
    eng = ClamdEngine(ClamdEngineSettings(servers=tuple(h.url for h in hung)), ctx,
                      clock=FakeClock())
    start = time.monotonic()
    result = await eng.scan(SMALL)
    assert time.monotonic() - start < 1.5
    assert result.status is ScanStatus.ERROR
    assert "no reply within 0." in result.reason  # what was left of 0.4 s after connecting
    assert "2 server(s) not tried" in result.reason
    assert [h.connections for h in hung] == [1, 0, 0]
    assert eng.servers[0].failures == 1 and eng.servers[1].failures == 0


async def test_per_attempt_timeout_leaves_budget_for_failover(fakes: list[FakeClamd]) -> None:
    hung = await fake(fakes, "hang")
    good = await fake(fakes, "found", virus="After.Failover")
    ctx = EngineContext(limits=Limits(scan_timeout=2))
    eng = engine(hung.url, good.url, scan_timeout=0.2, ctx=ctx)
    result = await eng.scan(SMALL)
    assert result.status is ScanStatus.INFECTED and result.virus == "After.Failover"


async def test_attempt_is_cut_at_the_deadline(fakes: list[FakeClamd]) -> None:
    """A per-attempt scan_timeout longer than the budget is cut at the budget."""
    hung = await fake(fakes, "hang")
    ctx = EngineContext(limits=Limits(scan_timeout=0.3))
    eng = engine(hung.url, scan_timeout=30, ctx=ctx)
    start = time.monotonic()
    result = await eng.scan(SMALL)
    assert result.status is ScanStatus.ERROR and "no reply within" in result.reason
    assert time.monotonic() - start < 1.5


async def test_unknown_from_garbage_is_not_served_from_the_verdict_cache(
        fakes: list[FakeClamd]) -> None:
    """The unknown of a garbage reply says nothing about the object: once clamd answers
    properly again the same object gets a real verdict, not the cached unknown."""
    from avgate.scan import ScanService, VerdictCache

    f = await fake(fakes, "garbage")
    eng = engine(f.url, max_failures=5)
    service = ScanService([eng], cache=VerdictCache(100))
    obj = Spool.from_bytes(b"a mass-mailed attachment")
    first = await service.scan(obj)
    assert first.status is ScanStatus.UNKNOWN and not first.cached
    f.behaviour = "found"
    second = await service.scan(Spool.from_bytes(b"a mass-mailed attachment"))
    assert second.status is ScanStatus.INFECTED and not second.cached
    third = await service.scan(Spool.from_bytes(b"a mass-mailed attachment"))
    assert third.status is ScanStatus.INFECTED and third.cached  # real verdicts still cached
