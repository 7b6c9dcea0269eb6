"""ICAP engine fault injection with tiny fake servers: refused, hang, garbage, close, 5xx,
and the reply variants (X-Violations-Found, modified body) → one ScanResult each."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from avgate import config
from avgate.engines.base import EngineContext, build_engine
from avgate.engines.icap import IcapEngine, IcapEngineSettings, parse_url
from avgate.errors import ConfigError
from avgate.limits import Limits
from avgate.protocols import icap as proto
from avgate.result import ScanStatus
from avgate.spool import Spool
from tests.clamd_daemon import free_port

pytestmark = pytest.mark.timeout(30)

OPTIONS_OK = proto.encode_response(200, [("Methods", "RESPMOD"), ("ISTag", '"fake-1"'),
                                         ("Preview", "4"), ("Allow", "204"),
                                         ("Options-TTL", "60")])
Handler = Callable[[bytes], Awaitable[bytes | None]]


async def fake_server(respmod: Handler) -> AsyncIterator[int]:
    """Answers OPTIONS with OPTIONS_OK; for RESPMOD reads until the body ends, then asks
    ``respmod(request bytes)`` what to send (None: hang, b"": close)."""
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            head = await r.readuntil(b"\r\n\r\n")
            if head.startswith(b"OPTIONS"):
                w.write(OPTIONS_OK)
                await w.drain()
                return
            # every test object is larger than the preview: no ieof here
            data = head + await r.readuntil(b"\r\n0\r\n\r\n")  # preview (or body) end
            if b"Preview:" in head:
                w.write(proto.CONTINUE)  # preview done, ask for the rest
                await w.drain()
                data += await r.readuntil(b"\r\n0\r\n\r\n")
            reply = await respmod(data)
            if reply is None:
                await asyncio.sleep(3600)
            w.write(reply)
            await w.drain()
        finally:
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def engine(*ports: int, **kw: Any) -> IcapEngine:
    kw.setdefault("connect_timeout", 1)
    kw.setdefault("scan_timeout", 1)
    settings = IcapEngineSettings(name="fake", url=tuple(
        f"icap://127.0.0.1:{port}/avscan" for port in ports), **kw)
    return IcapEngine(settings, EngineContext(limits=Limits(scan_timeout=5)))


async def scan_with(reply: Handler, data: bytes = b"some object data") -> tuple[object, IcapEngine]:
    gen = fake_server(reply)
    port = await gen.__anext__()
    try:
        e = engine(port)
        result = await e.scan(Spool.from_bytes(data))
        return result, e
    finally:
        await gen.aclose()


async def test_connection_refused_is_error() -> None:
    e = engine(free_port())
    result = await e.scan(Spool.from_bytes(b"x"))
    assert result.status is ScanStatus.ERROR and "cannot connect" in result.reason
    assert (await e.health())["ok"] is False


async def test_hang_is_timeout() -> None:
    async def hang(_: bytes) -> None:
        return None
    result, _ = await scan_with(hang)
    assert result.status is ScanStatus.ERROR and "within 1s" in result.reason


@pytest.mark.parametrize("reply", [b"ICAP/1.0 500 Server Error\r\n\r\n", b"",
                                   b"ICAP/1.0 200 OK\r\nEncapsulated: res-hdr=0, res-b"])
async def test_close_truncation_and_5xx_are_errors(reply: bytes) -> None:
    # no whole answer (closed, cut short) or the server's own error status: error
    async def answer(_: bytes) -> bytes:
        return reply
    result, _ = await scan_with(answer)
    assert result.status is ScanStatus.ERROR, result


@pytest.mark.parametrize(("reply", "reason"), [
    (b"garbage\r\n\r\n", "bad ICAP reply: malformed"),
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", "bad ICAP reply"),
    (bytes(range(1, 256)) * 4 + b"\r\n\r\n", "bad ICAP reply"),
    (b"ICAP/1.0 200 OK\r\nEncapsulated: null-body=0\r\n\r\n",
     "200 without an encapsulated HTTP response"),
    (b"ICAP/1.0 200 OK\r\nEncapsulated: bogus=0\r\n\r\n", "bad ICAP reply"),
])
async def test_unparseable_answers_are_unknown(reply: bytes, reason: str) -> None:
    """The server answered, we could not understand it: unknown, never clean nor error."""
    async def answer(_: bytes) -> bytes:
        return reply
    result, _ = await scan_with(answer)
    assert result.status is ScanStatus.UNKNOWN, result
    assert reason in result.reason  # type: ignore[attr-defined]


async def test_garbage_options_answer_is_unknown() -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"\x00\x01 SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        result = await engine(server.sockets[0].getsockname()[1]).scan(Spool.from_bytes(b"x"))
    finally:
        server.close()
    assert result.status is ScanStatus.UNKNOWN and "bad ICAP reply" in result.reason


async def test_204_is_clean_and_istag_is_db_version() -> None:
    seen: list[bytes] = []

    async def answer(req: bytes) -> bytes:
        seen.append(req)
        return proto.encode_response(204, [("ISTag", '"fake-1"')])
    result, e = await scan_with(answer, b"0123456789")
    assert result.status is ScanStatus.CLEAN
    assert e.db_version() == "fake-1"
    req = seen[0]
    assert b"Preview: 4\r\n" in req and b"Allow: 204\r\n" in req
    assert b"HTTP/1.1 200 OK\r\n" in req and b"Content-Length: 10\r\n" in req
    assert b"4\r\n0123\r\n0\r\n\r\n" in req and b"6\r\n456789\r\n0\r\n\r\n" in req


async def test_violations_found_names() -> None:
    async def answer(_: bytes) -> bytes:
        return proto.encode_response(
            200, [("X-Violations-Found", "1")], res_hdr=b"", body="null-body"
        ).replace(b"X-Violations-Found: 1\r\n",
                  b"X-Violations-Found: 1\r\n\tobj\r\n\tW32.Test.Virus\r\n\t7\r\n\t2\r\n")
    result, _ = await scan_with(answer)
    assert result.status is ScanStatus.INFECTED
    assert result.virus == "W32.Test.Virus"


async def test_modified_403_without_names_is_infected() -> None:
    async def answer(_: bytes) -> bytes:
        hdr = proto.encode_http_response(403, [("Content-Length", "7")])
        return proto.encode_response(200, [], res_hdr=hdr, body="res-body") \
            + proto.encode_body(b"blocked")
    result, _ = await scan_with(answer)
    assert result.status is ScanStatus.INFECTED and result.virus == "ICAP.Modified"


async def test_unmodified_echo_is_clean_and_changed_body_is_not() -> None:
    data = b"some object data"

    async def echo(_: bytes) -> bytes:
        hdr = proto.encode_http_response(200, [("Content-Length", str(len(data)))])
        return proto.encode_response(200, [], res_hdr=hdr, body="res-body") \
            + proto.encode_body(data)

    async def changed(_: bytes) -> bytes:
        hdr = proto.encode_http_response(200, [("Content-Length", "9")])
        return proto.encode_response(200, [], res_hdr=hdr, body="res-body") \
            + proto.encode_body(b"replaced!")
    assert (await scan_with(echo, data))[0].status is ScanStatus.CLEAN  # type: ignore[attr-defined]
    result, _ = await scan_with(changed, data)
    assert result.status is ScanStatus.INFECTED and result.virus == "ICAP.Modified"


async def test_over_max_scan_size_is_skipped() -> None:
    e = IcapEngine(IcapEngineSettings(url=f"icap://127.0.0.1:{free_port()}/avscan"),
                   EngineContext(limits=Limits(max_scan_size=10)))
    result = await e.scan(Spool.from_bytes(b"x" * 11))
    assert result.status is ScanStatus.SKIPPED


def test_config_and_url_parsing() -> None:
    assert parse_url("icap://h/svc") == ("h", 1344, "svc")
    assert parse_url("icap://h:11344/virus_scan?x=1") == ("h", 11344, "virus_scan?x=1")
    for bad, key in (({"url": "http://h/x"}, "url"), ({"url": "icap://h"}, "url"),
                     ({}, "url"), ({"url": []}, "url"),
                     ({"url": "icap://h/x", "preview": -1}, "preview"),
                     ({"url": "icap://h/x", "scan_timeout": 0}, "scan_timeout")):
        with pytest.raises(ConfigError, match=rf"engines\[0\]\.{key}"):
            config.from_dict({"engines": [{"type": "icap", **bad}]})
    [settings] = config.from_dict({"engines": [
        {"type": "icap", "url": "icap://h/x", "preview": 0, "connect_timeout": 2}]}).engines
    e = build_engine(settings, EngineContext())
    assert isinstance(e, IcapEngine)
    assert e.settings.preview == 0 and e.settings.connect_timeout == 2
    assert [s.icap_uri for s in e.servers] == ["icap://h:1344/x"]
    [settings] = config.from_dict({"engines": [
        {"type": "icap", "url": ["icap://a/x", "icap://b:11344/y"],
         "strategy": "round_robin"}]}).engines
    e = build_engine(settings, EngineContext())
    assert isinstance(e, IcapEngine)
    assert [s.icap_uri for s in e.servers] == ["icap://a:1344/x", "icap://b:11344/y"]


# -- several servers (the upstream helper shared with clamd) ---------------------------------

async def _clean(_: bytes) -> bytes:
    return proto.encode_response(204, [("ISTag", '"fake-1"')])


async def test_failover_to_the_second_server() -> None:
    gen = fake_server(_clean)
    port = await gen.__anext__()
    try:
        e = engine(free_port(), port)
        result = await e.scan(Spool.from_bytes(b"some object data"))
        assert result.status is ScanStatus.CLEAN, result
        assert e.servers[0].failures == 1 and e.upstreams.is_down(e.servers[0])
        assert e.servers[1].failures == 0 and e.db_version() == "fake-1"
        health = await e.health()
        assert health["ok"] is True
        assert [r["ok"] for r in health["servers"]] == [False, True]
        assert health["servers"][1]["istag"] == "fake-1"
    finally:
        await gen.aclose()


async def test_every_server_failing_names_each() -> None:
    ports = free_port(), free_port()
    e = engine(*ports)
    result = await e.scan(Spool.from_bytes(b"x"))
    assert result.status is ScanStatus.ERROR
    assert all(f"icap://127.0.0.1:{p}/avscan: cannot connect" in result.reason for p in ports)
    again = await e.scan(Spool.from_bytes(b"x"))  # both marked down: no waiting on them
    assert again.status is ScanStatus.ERROR and "marked down" in again.reason


async def test_hang_spends_the_budget_once() -> None:
    """A hung server with no per-attempt bound: the scan ends at [limits] scan_timeout
    (0.5 s), not at one timeout per server."""
    async def hang(_: bytes) -> None:
        return None
    gens = [fake_server(hang), fake_server(hang)]
    ports = [await g.__anext__() for g in gens]
    try:
        settings = IcapEngineSettings(name="fake", url=tuple(
            f"icap://127.0.0.1:{p}/avscan" for p in ports))
        e = IcapEngine(settings, EngineContext(limits=Limits(scan_timeout=0.5)))
        start = asyncio.get_running_loop().time()
        result = await e.scan(Spool.from_bytes(b"some object data"))
        assert asyncio.get_running_loop().time() - start < 1.5
        assert result.status is ScanStatus.ERROR and "1 server(s) not tried" in result.reason
    finally:
        for g in gens:
            await g.aclose()
