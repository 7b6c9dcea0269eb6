"""Our ICAP server in-process over real sockets: protocol errors → 400 and close (never a
hang), keep-alive and request limits, preview decisions, the unavailable page, streaming."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from avgate import config
from avgate.errors import ConfigError
from avgate.frontends import icap as fe
from avgate.frontends.listen import ListenOptions
from avgate.gateway import Gateway
from avgate.limits import MiB
from avgate.protocols import icap as proto
from tests.clamd_daemon import EICAR
from tests.helpers import async_wait_until

pytestmark = pytest.mark.timeout(60)

REQ_HDR = b"GET http://origin.test/f HTTP/1.1\r\nHost: origin.test\r\n\r\n"


def res_hdr(n: int, ctype: str = "application/octet-stream") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {n}\r\n\r\n".encode()


def respmod(body: bytes, *, allow_204: bool = True, preview: int | None = None,
            ctype: str = "application/octet-stream") -> bytes:
    headers = [("Host", "t")]
    if allow_204:
        headers.append(("Allow", "204"))
    if preview is not None:
        headers.append(("Preview", str(preview)))
    return proto.encode_request("RESPMOD", "icap://t/avscan", headers, req_hdr=REQ_HDR,
                                res_hdr=res_hdr(len(body), ctype), body="res-body")


async def make_server(base_dir: str = ".", **icap: object) -> tuple[Gateway, fe.IcapServer]:
    table = {"listen": "127.0.0.1:0", "idle_timeout": 2, **icap}
    cfg = config.from_dict({"icap": table, "limits": {"max_scan_size": 8 * MiB}},
                           base_dir=base_dir)
    gw = Gateway.from_config(cfg)
    await gw.start()
    [srv] = await fe.start(gw, ListenOptions())
    assert isinstance(srv, fe.IcapServer)
    return gw, srv


@pytest.fixture
async def server() -> AsyncIterator[fe.IcapServer]:
    gw, srv = await make_server(max_requests_per_connection=3, max_header_size=4096,
                                skip_content_types=["image/*"])
    yield srv
    await srv.aclose()
    await gw.close()


async def exchange(srv: fe.IcapServer, data: bytes) -> tuple[list[object], bool]:
    """Send ``data``, read until the server closes; (events, closed)."""
    if srv.address.is_unix:
        r, w = await asyncio.open_unix_connection(srv.address.path)
    else:
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
    w.write(data)
    await w.drain()
    p = proto.IcapParser("client")
    out: list[object] = []
    closed = False
    try:
        while True:
            chunk = await asyncio.wait_for(r.read(65536), 3)
            if not chunk:
                closed = True
                break
            p.receive_data(chunk)
            out.extend(p)
    except TimeoutError:
        pass
    w.close()
    return out, closed


def responses(evs: list[object]) -> list[proto.Response]:
    return [e for e in evs if isinstance(e, proto.Response)]


def body_of(evs: list[object]) -> bytes:
    return b"".join(e.data for e in evs if isinstance(e, proto.BodyChunk))


OPTIONS_CLOSE = b"OPTIONS icap://t/avscan ICAP/1.0\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("wire", [
    b"RESPMOD icap://t/avscan ICAP/1.0\r\nHost: t\r\n\r\n",  # no Encapsulated
    b"RESPMOD icap://t/avscan ICAP/1.0\r\nEncapsulated: res-body=0\r\n\r\nxyz\r\n",  # chunk size
    b"OPTIONS icap://t/avscan ICAP/1.0\r\nX-Big: " + b"a" * 10000 + b"\r\n\r\n",  # header size
    b"OPTIONS icap://t/avscan ICAP/1.0\r\nX-Big: " + b"a" * 10000,  # no end, over the limit
])
async def test_bad_input_gets_400_and_close(server: fe.IcapServer, wire: bytes) -> None:
    evs, closed = await exchange(server, wire)
    assert [r.status for r in responses(evs)] == [400]
    assert closed


async def test_incomplete_request_times_out_with_close(server: fe.IcapServer) -> None:
    evs, closed = await exchange(server, respmod(b"abc")[:-10])
    assert closed  # idle_timeout = 2 s; exchange() waits 3 s per read
    assert [r.status for r in responses(evs)] == [408]


async def test_keepalive_and_request_limit(server: fe.IcapServer) -> None:
    one = respmod(b"clean data") + proto.encode_body(b"clean data")
    evs, closed = await exchange(server, one * 4)  # limit is 3 per connection
    rs = responses(evs)
    assert [r.status for r in rs] == [204, 204, 204]
    assert rs[-1].headers.get("connection") == "close" and closed


async def test_unknown_service_404(server: fe.IcapServer) -> None:
    evs, closed = await exchange(server, b"OPTIONS icap://t/other ICAP/1.0\r\n\r\n")
    assert [r.status for r in responses(evs)] == [404] and closed


async def test_preview_continue_then_block(server: fe.IcapServer) -> None:
    body = EICAR  # the first 10 bytes in the preview, the signature completes after 100
    r, w = await asyncio.open_connection("127.0.0.1", server.port)
    w.write(respmod(body, preview=10) + proto.encode_chunk(body[:10]) + proto.LAST_CHUNK)
    assert await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 3) == proto.CONTINUE
    w.write(proto.encode_chunk(body[10:]) + proto.LAST_CHUNK)
    p = proto.IcapParser("client")
    evs: list[object] = []
    for _ in range(50):
        if any(isinstance(e, proto.BodyEnd) for e in evs):
            break
        data = await asyncio.wait_for(r.read(65536), 3)
        assert data, f"closed after {evs}"
        p.receive_data(data)
        evs.extend(p)
    w.close()
    resp = responses(evs)[0]
    assert resp.status == 200 and resp.headers.get("x-virus-id") == "Eicar-Test-Signature"
    assert resp.res_hdr.startswith(b"HTTP/1.1 403 Forbidden")
    page = b"".join(e.data for e in evs if isinstance(e, proto.BodyChunk))
    assert b"Eicar-Test-Signature" in page and b"http://origin.test/f" in page


async def test_preview_skip_content_type_early_204(server: fe.IcapServer) -> None:
    # a real PNG signature: the label alone is not trusted (tests/attacks/test_icap_limits.py)
    body = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + os.urandom(6800)
    wire = respmod(body, preview=16, ctype="image/png") + proto.encode_chunk(body[:16]) \
        + proto.LAST_CHUNK
    # the rest is never sent: the early 204 must come after the preview alone
    wire += b"OPTIONS icap://t/avscan ICAP/1.0\r\n\r\n"
    evs, _ = await exchange(server, wire)
    assert [r.status for r in responses(evs)] == [204, 200]


async def test_clean_without_allow_204_is_echoed(server: fe.IcapServer) -> None:
    body = os.urandom(200_000)
    evs, _ = await exchange(server, respmod(body, allow_204=False) + proto.encode_body(body)
                            + b"OPTIONS icap://t/avscan ICAP/1.0\r\nConnection: close\r\n\r\n")
    rs = responses(evs)
    assert rs[0].status == 200 and rs[0].res_hdr == res_hdr(len(body))
    echoed = b"".join(e.data for e in evs if isinstance(e, proto.BodyChunk))
    assert echoed == body


async def test_reqmod_upload_blocked(server: fe.IcapServer) -> None:
    req_hdr = (b"POST http://origin.test/up HTTP/1.1\r\nHost: origin.test\r\n"
               b"Content-Length: 68\r\n\r\n")
    wire = proto.encode_request("REQMOD", "icap://t/avscan", [("Allow", "204")], req_hdr=req_hdr,
                                body="req-body") + proto.encode_body(EICAR)
    evs, _ = await exchange(server, wire)
    resp = responses(evs)[0]
    assert resp.status == 200 and resp.headers.get("x-virus-id") == "Eicar-Test-Signature"
    assert resp.res_hdr.startswith(b"HTTP/1.1 403")


async def test_istag_changes_with_db_versions(server: fe.IcapServer) -> None:
    first = server.istag()
    assert first.startswith('"') and first.endswith('"') and len(first) <= 32
    server.gateway.scanner.db_versions = lambda: "embedded=changed"  # type: ignore[method-assign]
    assert server.istag() != first


async def test_204_answer_is_encoded_once_per_istag(server: fe.IcapServer) -> None:
    """The 204 bytes are built once per ISTag (and per Connection: close); a new ISTag
    gives a new answer at once."""
    keep, close = server.no_content(False), server.no_content(True)
    assert server.no_content(False) is keep  # cached, not built again
    parser = proto.IcapParser("client")
    parser.receive_data(keep + close)
    first, second = list(parser)
    assert isinstance(first, proto.Response) and isinstance(second, proto.Response)
    assert (first.status, second.status) == (204, 204)
    assert first.headers.get("istag") == server.istag() and first.keep_alive
    assert not second.keep_alive
    server.gateway.scanner.db_versions = lambda: "embedded=changed"  # type: ignore[method-assign]
    renewed = server.no_content(False)
    assert renewed != keep and server.istag().encode() in renewed
    wire = proto.encode_request("RESPMOD", "icap://t/avscan",
                                [("Host", "t"), ("Allow", "204"), ("Connection", "close")],
                                req_hdr=REQ_HDR, res_hdr=res_hdr(5), body="res-body")
    evs, closed = await exchange(server, wire + proto.encode_body(b"clean"))
    [resp] = responses(evs)
    assert closed and resp.status == 204 and not resp.keep_alive
    assert resp.headers.get("istag") == server.istag()


async def test_scanner_error_gives_503_page_not_a_pass() -> None:
    """failure_action tempfail (default): the proxy gets an HTTP 503 page, never the object."""
    cfg = config.from_dict({
        "icap": {"listen": "127.0.0.1:0"},
        "engines": [{"type": "icap", "name": "down", "url": "icap://127.0.0.1:1/x",
                     "connect_timeout": 1}]})
    gw = Gateway.from_config(cfg)
    await gw.start()
    [srv] = await fe.start(gw, ListenOptions())
    assert isinstance(srv, fe.IcapServer)
    try:
        body = b"would pass unscanned"
        evs, _ = await exchange(srv, respmod(body) + proto.encode_body(body)
                                + b"OPTIONS icap://t/avscan ICAP/1.0\r\nConnection: close\r\n\r\n")
        resp = responses(evs)[0]
        assert resp.status == 200 and resp.res_hdr.startswith(b"HTTP/1.1 503")
        assert body not in b"".join(e.data for e in evs if isinstance(e, proto.BodyChunk))
    finally:
        await srv.aclose()
        await gw.close()


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def test_large_object_streams_with_bounded_memory(server: fe.IcapServer) -> None:
    """~300 MB through the server: spooled to disk, skipped (> max_scan_size), 204; the
    process RSS grows by less than 64 MiB."""
    total = int(os.environ.get("AVGATE_ICAP_BIG_MB", "300")) * MiB
    piece = os.urandom(256 * 1024)
    r, w = await asyncio.open_connection("127.0.0.1", server.port)
    before = _rss()
    w.write(proto.encode_request("RESPMOD", "icap://t/avscan", [("Allow", "204")],
                                 res_hdr=res_hdr(total), body="res-body"))
    sent, peak = 0, 0
    while sent < total:
        w.write(proto.encode_chunk(piece))
        await w.drain()
        sent += len(piece)
        if sent % (32 * MiB) == 0:
            peak = max(peak, _rss())
    w.write(proto.LAST_CHUNK)
    await w.drain()
    line = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 30)
    peak = max(peak, _rss())
    w.close()
    assert line.startswith(b"ICAP/1.0 204")
    print(f"ICAP {total // MiB} MiB object: RSS growth {(peak - before) / MiB:.1f} MiB")
    assert peak - before < 64 * MiB, f"RSS grew by {(peak - before) / MiB:.1f} MiB"


def _reload(gw: Gateway, **icap: object) -> None:
    """What a SIGHUP does for the front-end: the gateway now carries another config."""
    cfg = gw.config
    assert cfg.icap is not None
    gw.config = dataclasses.replace(cfg, icap=cfg.icap.model_copy(update=icap))


async def test_service_follows_a_reload(server: fe.IcapServer) -> None:
    _reload(server.gateway, service="other")
    evs, _ = await exchange(server, b"OPTIONS icap://t/other ICAP/1.0\r\n"
                                    b"Connection: close\r\n\r\n")
    assert [r.status for r in responses(evs)] == [200]
    assert server.describe() == f"icap://127.0.0.1:{server.port}/other"


async def test_block_page_file_and_reload(tmp_path: Path) -> None:
    """``block_page`` is read from the config's directory; after a reload the file is read
    again, and one that cannot be read keeps the previous page (with a warning)."""
    (tmp_path / "block.html").write_text("<p>custom: {virus} at {url}</p>")
    gw, srv = await make_server(base_dir=str(tmp_path), block_page="block.html")
    events: list[dict[str, object]] = []

    class Log:
        debug_enabled = False  # what front-ends test before a debug line
        def log(self, event: dict[str, object], level: str = "info") -> None:
            events.append(event)

    gw.log = Log()  # type: ignore[assignment]
    infected = respmod(EICAR) + proto.encode_body(EICAR) + OPTIONS_CLOSE
    try:
        evs, _ = await exchange(srv, infected)
        first = b"<p>custom: Eicar-Test-Signature at http://origin.test/f</p>"
        assert body_of(evs) == first
        _reload(gw, block_page="gone.html")
        evs, _ = await exchange(srv, infected)
        assert body_of(evs) == first
        assert any("keeping the previous block page" in str(e.get("error")) for e in events)
        (tmp_path / "new.html").write_text("new page: {virus}")
        _reload(gw, block_page="new.html")
        evs, _ = await exchange(srv, infected)
        assert body_of(evs) == b"new page: Eicar-Test-Signature"
    finally:
        await srv.aclose()
        await gw.close()


async def test_unreadable_block_page_stops_the_start(tmp_path: Path) -> None:
    cfg = config.from_dict({"icap": {"listen": "127.0.0.1:0", "block_page": "missing.html"}},
                           base_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="block_page"):
        await fe.start(Gateway.from_config(cfg), ListenOptions())


async def test_unix_socket_listener(tmp_path: Path) -> None:
    path = tmp_path / "icap.sock"
    cfg = config.from_dict({"icap": {"listen": f"unix:{path}"}})
    assert await fe.start(Gateway.from_config(cfg), ListenOptions(unix_sockets=False)) == []
    assert not path.exists()  # another serve worker owns it
    gw, srv = await make_server(listen=f"unix:{path}")
    try:
        assert srv.describe() == f"icap://unix:{path}/avscan"
        evs, _ = await exchange(srv, OPTIONS_CLOSE)
        assert [r.status for r in responses(evs)] == [200]
    finally:
        await srv.aclose()
        await gw.close()
    assert not path.exists()


# -- the connection protocol: half-close, the idle deadline, bounded read-ahead ------------------
async def _read_answers(r: asyncio.StreamReader, count: int) -> list[object]:
    """Events of ``count`` ICAP answers (each up to its BodyEnd, or a 204's head)."""
    p = proto.IcapParser("client")
    out: list[object] = []
    done = 0
    while done < count:
        chunk = await asyncio.wait_for(r.read(65536), 10)
        assert chunk, f"closed after {done} of {count} answers"
        p.receive_data(chunk)
        for ev in p:
            out.append(ev)
            if isinstance(ev, proto.BodyEnd) or (
                    isinstance(ev, proto.Response) and not ev.has_body):
                done += 1
    return out


async def test_half_closed_client_still_gets_its_answer(server: fe.IcapServer) -> None:
    """A client that shuts its sending side after the request (``shutdown(SHUT_WR)``) is
    answered before the connection is closed."""
    r, w = await asyncio.open_connection("127.0.0.1", server.port)
    w.write(respmod(b"clean bytes") + proto.encode_body(b"clean bytes"))
    w.write_eof()
    evs = await _read_answers(r, 1)
    assert [x.status for x in responses(evs)] == [204]
    assert await asyncio.wait_for(r.read(), 5) == b""  # then closed, no error answer
    w.close()


async def test_slow_but_steady_client_is_not_cut_by_the_idle_timeout(
        server: fe.IcapServer) -> None:
    """``idle_timeout`` (2 s here) bounds each silence, not the request: a request whose
    parts come 0.8 s apart over 3 s is answered (the one deadline is moved, not fired)."""
    wire = respmod(b"x" * 40) + proto.encode_body(b"x" * 40)
    r, w = await asyncio.open_connection("127.0.0.1", server.port)
    step = len(wire) // 4 + 1
    for i in range(0, len(wire), step):
        w.write(wire[i:i + step])
        await w.drain()
        if i + step < len(wire):
            await asyncio.sleep(0.8)
    evs = await _read_answers(r, 1)
    assert [x.status for x in responses(evs)] == [204]
    w.close()


async def test_pipelined_requests_are_read_ahead_boundedly() -> None:
    """A second request sent at once behind the first, with a body far over the read-ahead
    bound, is held back while the first is served (reading pauses) and is then read on:
    both are answered, in order, byte-identical where echoed."""
    gw, srv = await make_server()
    try:
        big = os.urandom(fe._READ_AHEAD * 3)
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        w.write(respmod(EICAR) + proto.encode_body(EICAR)
                + respmod(big, allow_204=False) + proto.encode_body(big))
        evs = await _read_answers(r, 2)
        first = [e for e in evs if isinstance(e, proto.Response)]
        assert [x.status for x in first] == [200, 200]
        assert first[0].headers.get("x-virus-id")  # the first was blocked
        echoed = b"".join(e.data for e in evs[evs.index(first[1]):]
                          if isinstance(e, proto.BodyChunk))
        assert echoed == big
        w.close()
    finally:
        await srv.aclose()
        await gw.close()


async def test_reading_pauses_while_a_request_is_served() -> None:
    """While a request is being answered, what the client sends behind it is buffered only
    up to the read-ahead bound (then the transport stops reading), not without limit."""
    gw, srv = await make_server()
    entered = asyncio.Event()
    release = asyncio.Event()
    real = gw.process

    async def slow(*args: object, **kwargs: object) -> object:
        entered.set()
        await release.wait()
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    gw.process = slow  # type: ignore[method-assign,assignment]
    try:
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        w.write(respmod(b"a") + proto.encode_body(b"a"))
        await asyncio.wait_for(entered.wait(), 10)
        [conn] = list(srv._conns)
        flood = b"\r\n" * (4 * fe._READ_AHEAD)  # stray CRLFs: legal between requests
        w.write(flood)
        # the server reads up to the bound, then stops; the rest waits in the kernel
        assert await async_wait_until(lambda: conn._read_paused)
        assert conn.parser.buffered <= fe._READ_AHEAD + 256 * 1024
        release.set()
        evs = await _read_answers(r, 1)
        assert [x.status for x in responses(evs)] == [204]
        w.close()
    finally:
        release.set()
        await srv.aclose()
        await gw.close()


async def test_non_ascii_digits_are_bad_input_not_a_crash(server: fe.IcapServer) -> None:
    """``str.isdigit()`` takes "²" (latin-1 \\xb2), which ``int()`` refuses: a Content-Length
    of "²" is no length (the object is read and scanned as usual), a Preview of "²" is a 400
    — never an exception that ends the connection without an answer."""
    hdr = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: \xb2\r\n\r\n"

    def request(body: bytes, allow_204: bool) -> bytes:
        headers = [("Host", "t")] + ([("Allow", "204")] if allow_204 else [])
        return proto.encode_request("RESPMOD", "icap://t/avscan", headers, req_hdr=REQ_HDR,
                                    res_hdr=hdr, body="res-body") + proto.encode_body(body)

    evs, _ = await exchange(server, request(b"clean data", True) + OPTIONS_CLOSE)
    assert [r.status for r in responses(evs)] == [204, 200]
    evs, _ = await exchange(server, request(EICAR, False) + OPTIONS_CLOSE)
    rs = responses(evs)
    assert [r.status for r in rs] == [200, 200] and rs[0].headers.get("x-virus-id")
    evs, closed = await exchange(server, b"RESPMOD icap://t/avscan ICAP/1.0\r\nPreview: \xb2\r\n"
                                         b"Encapsulated: null-body=0\r\n\r\n")
    assert [r.status for r in responses(evs)] == [400] and closed
