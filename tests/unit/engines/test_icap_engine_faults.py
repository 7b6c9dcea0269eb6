"""ICAP engine fault injection with tiny fake servers: refused, hang, garbage, close, 5xx,
and the reply variants (X-Violations-Found, modified body) → one ScanResult each."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from avgate.engines.base import EngineContext
from avgate.engines.icap import IcapEngine, parse_url
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


def engine(port: int, **kw: object) -> IcapEngine:
    return IcapEngine("fake", EngineContext(limits=Limits(scan_timeout=5)),
                      url=f"icap://127.0.0.1:{port}/avscan", connect_timeout=1,
                      scan_timeout=kw.pop("scan_timeout", 1), **kw)  # type: ignore[arg-type]


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


@pytest.mark.parametrize("reply", [b"garbage\r\n\r\n", b"ICAP/1.0 500 Server Error\r\n\r\n",
                                   b"", b"ICAP/1.0 200 OK\r\nEncapsulated: res-hdr=0, res-b"])
async def test_garbage_close_and_5xx_are_errors(reply: bytes) -> None:
    async def answer(_: bytes) -> bytes:
        return reply
    result, _ = await scan_with(answer)
    assert result.status is ScanStatus.ERROR, result


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
    e = IcapEngine("fake", EngineContext(limits=Limits(max_scan_size=10)),
                   url=f"icap://127.0.0.1:{free_port()}/avscan")
    result = await e.scan(Spool.from_bytes(b"x" * 11))
    assert result.status is ScanStatus.SKIPPED


def test_config_and_url_parsing() -> None:
    assert parse_url("icap://h/svc") == ("h", 1344, "svc")
    assert parse_url("icap://h:11344/virus_scan?x=1") == ("h", 11344, "virus_scan?x=1")
    for bad in ({"url": "http://h/x"}, {"url": "icap://h"}, {},
                {"url": "icap://h/x", "preview": -1}, {"url": "icap://h/x", "scan_timeout": 0}):
        with pytest.raises(ConfigError):
            IcapEngine.from_config(bad, EngineContext())
    e = IcapEngine.from_config({"url": "icap://h/x", "preview": 0, "connect_timeout": 2},
                               EngineContext())
    assert e.max_preview == 0 and e.connect_timeout == 2
