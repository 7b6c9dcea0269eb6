"""RESPMOD answered before the verdict ([icap.trickle]), in-process over real sockets: when
the answer begins, what leaves before the verdict, the cut of an infected object, what still
gets a block page, patience, objects declared over max_body_size, and errors inside an answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from avgate import config
from avgate.frontends import icap as fe
from avgate.frontends.listen import ListenOptions
from avgate.gateway import Gateway
from avgate.limits import KiB, MiB
from avgate.policy import Policy
from avgate.protocols import icap as proto
from tests.corpus import MARKER, MARKER_NAME, MARKER_NDB
from tests.helpers import async_wait_until

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_scope="module")]

REQ_HDR = b"GET http://origin.test/f HTTP/1.1\r\nHost: origin.test\r\n\r\n"
KEEP_BACK = 32 * KiB  # the default


def respmod(length: int | None, *, preview: int | None = None, allow_204: bool = False) -> bytes:
    """A RESPMOD head as Squid sends it for a large object (no ``Allow: 204``)."""
    lines = [b"HTTP/1.1 200 OK", b"Content-Type: application/octet-stream"]
    if length is not None:
        lines.append(b"Content-Length: %d" % length)
    res_hdr = b"\r\n".join(lines) + b"\r\n\r\n"
    headers = [("Host", "t")]
    if allow_204:
        headers.append(("Allow", "204"))
    if preview is not None:
        headers.append(("Preview", str(preview)))
    return proto.encode_request("RESPMOD", "icap://t/avscan", headers, req_hdr=REQ_HDR,
                                res_hdr=res_hdr, body="res-body")


Start = Callable[..., Awaitable[fe.IcapServer]]


def _config(tmp: Path, policy: dict[str, Any] | None = None, **icap: Any) -> config.Config:
    return config.from_dict({
        "icap": {"listen": "127.0.0.1:0", "idle_timeout": 2, **icap},
        "engines": [{"type": "embedded", "name": "e", "clamav_db": "",
                     "signatures": str(tmp / "marker.ndb")}],
        "limits": {"max_scan_size": 8 * MiB}, **({"policy": policy} if policy else {}),
    }, base_dir=str(tmp))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[fe.IcapServer]:
    """One in-process ICAP server for the module (starting scan workers takes seconds);
    the embedded engine knows the test marker."""
    tmp = tmp_path_factory.mktemp("trickle")
    (tmp / "marker.ndb").write_text(MARKER_NDB)
    gw = Gateway.from_config(_config(tmp))
    await gw.start()
    [srv] = await fe.start(gw, ListenOptions())
    assert isinstance(srv, fe.IcapServer)
    yield srv
    await srv.aclose()
    await gw.close()


@pytest_asyncio.fixture(loop_scope="module")
async def start(server: fe.IcapServer) -> AsyncIterator[Start]:
    """``await start(**icap)``: the server with these [icap] keys (``policy=`` for
    [policy]), as a reload would set them; back to the defaults after the test."""
    gw = server.gateway
    base, policy = gw.config, gw.policy

    async def configure(policy: dict[str, Any] | None = None, **icap: Any) -> fe.IcapServer:
        cfg = _config(Path(base.base_dir), policy, **icap)
        gw.config = dataclasses.replace(base, icap=cfg.icap, policy=cfg.policy)
        gw.policy = Policy.from_settings(cfg.policy)
        return server

    yield configure
    gw.config, gw.policy = base, policy


class Client:
    """One ICAP connection; what the server sent is parsed as it arrives."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.parser = proto.IcapParser("client")
        self.raw = bytearray()
        self.events: list[object] = []
        self.closed = False
        self.error: proto.IcapProtocolError | None = None
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, srv: fe.IcapServer) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", srv.port))

    async def _read(self) -> None:
        try:
            while data := await self.reader.read(1 << 16):
                self.raw += data
                self.parser.receive_data(data)
                try:
                    self.events.extend(self.parser)
                except proto.IcapProtocolError as exc:
                    self.error = exc
        except ConnectionResetError:  # closed while we were still sending
            pass
        self.closed = True
        self.parser.receive_data(b"")
        try:
            self.events.extend(self.parser)
        except proto.IcapProtocolError as exc:  # closed in the middle of the body
            self.error = exc

    async def send(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.writer.write(piece)
            await self.writer.drain()

    @property
    def body(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, proto.BodyChunk))

    @property
    def responses(self) -> list[proto.Response]:
        return [e for e in self.events if isinstance(e, proto.Response)]

    @property
    def complete(self) -> bool:
        return any(isinstance(e, proto.BodyEnd) for e in self.events)

    async def until(self, predicate: Callable[[], object]) -> None:
        assert await async_wait_until(predicate, timeout=10), (bytes(self.raw[:300]),
                                                               len(self.body))

    async def close(self) -> None:
        self.writer.close()
        self._task.cancel()


def chunks(data: bytes, size: int = 16 * KiB) -> list[bytes]:
    return [proto.encode_chunk(data[i:i + size]) for i in range(0, len(data), size)]


async def test_keep_back_answers_with_the_first_bytes_and_holds_the_tail(start: Start) -> None:
    srv = await start()
    body = os.urandom(200 * KiB)
    c = await Client.connect(srv)
    await c.send(respmod(len(body)), *chunks(body[:100 * KiB]))
    await c.until(lambda: len(c.body) >= 100 * KiB - KEEP_BACK)
    [resp] = c.responses
    assert resp.status == 200 and b"Content-Length: %d" % len(body) in resp.res_hdr
    assert c.body == body[:100 * KiB - KEEP_BACK] and not c.complete
    await c.send(*chunks(body[100 * KiB:]), proto.LAST_CHUNK)
    await c.until(lambda: c.complete)
    assert c.body == body and not c.closed
    await c.close()


async def test_infected_after_the_answer_began_is_cut(start: Start,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    srv = await start()
    body = MARKER + os.urandom(300 * KiB)
    c = await Client.connect(srv)
    await c.send(respmod(len(body)), *chunks(body), proto.LAST_CHUNK)
    await c.until(lambda: c.closed)
    assert c.responses[0].status == 200 and not c.complete  # no last chunk: a cut
    assert 0 < len(c.body) <= len(body) - KEEP_BACK and body.startswith(c.body)
    assert c.error is not None
    assert any("transfer cut" in r.getMessage() and MARKER_NAME in r.getMessage()
               for r in caplog.records)
    await c.close()


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_object_within_the_keep_back_gets_the_block_page(start: Start,
                                                               declared: bool) -> None:
    srv = await start()
    body = b"a" * 1000 + MARKER + b"b" * 1000
    c = await Client.connect(srv)
    await c.send(respmod(len(body) if declared else None), *chunks(body), proto.LAST_CHUNK)
    await c.until(lambda: c.complete)
    [resp] = c.responses
    assert resp.res_hdr.startswith(b"HTTP/1.1 403") and MARKER_NAME.encode() in c.body
    await c.close()


async def test_preview_then_answer_only_after_body_data(start: Start) -> None:
    """After a preview: 100 Continue, and the answer starts only with later body data
    (Squid 5.7 would not read an answer that came with the 100)."""
    srv = await start()
    body = os.urandom(150 * KiB)
    c = await Client.connect(srv)
    await c.send(respmod(len(body), preview=1024), proto.encode_chunk(body[:1024]),
                 proto.LAST_CHUNK)
    await c.until(lambda: c.responses)
    assert [r.status for r in c.responses] == [100]
    await c.send(*chunks(body[1024:]), proto.LAST_CHUNK)
    await c.until(lambda: c.complete)
    assert [r.status for r in c.responses] == [100, 200] and c.body == body
    await c.close()


async def test_trickle_mode_sends_chunks_up_to_the_limit(start: Start) -> None:
    srv = await start(trickle={"mode": "trickle", "interval": 0.1, "chunk": 1000,
                               "limit": 3000})
    body = os.urandom(100 * KiB)
    c = await Client.connect(srv)
    await c.send(respmod(len(body)), *chunks(body[:50 * KiB]))
    await c.until(lambda: len(c.body) >= 3000)
    sizes = [len(e.data) for e in c.events if isinstance(e, proto.BodyChunk)]
    assert sizes[:3] == [1000, 1000, 1000]  # one chunk per interval
    await c.send(*chunks(body[50 * KiB:]), proto.LAST_CHUNK)
    await c.until(lambda: c.complete)
    assert c.body == body
    await c.close()


async def test_no_verdict_within_patience_cuts(start: Start) -> None:
    srv = await start(trickle={"patience": 0.001})  # counted from the end of the body
    body = os.urandom(MiB)  # no scan of 1 MiB is done within a millisecond
    c = await Client.connect(srv)
    await c.send(respmod(len(body)), *chunks(body), proto.LAST_CHUNK)
    await c.until(lambda: c.closed)
    assert c.responses[0].status == 200 and not c.complete
    await c.close()


async def test_error_inside_an_answer_closes_without_an_icap_error(start: Start) -> None:
    """The client stops sending after the answer began: idle_timeout closes the connection;
    no ICAP 408 is written into the middle of the body."""
    srv = await start(idle_timeout=0.5)
    c = await Client.connect(srv)
    await c.send(respmod(200 * KiB), *chunks(os.urandom(100 * KiB)))
    await c.until(lambda: c.closed)
    assert c.responses[0].status == 200 and not c.complete
    assert b"ICAP/1.0 408" not in c.raw
    await c.close()


async def test_allow_204_outside_a_preview_is_not_trickled(start: Start) -> None:
    srv = await start()
    body = os.urandom(200 * KiB)
    c = await Client.connect(srv)
    await c.send(respmod(len(body), allow_204=True), *chunks(body), proto.LAST_CHUNK)
    await c.until(lambda: c.responses)
    assert [r.status for r in c.responses] == [204]
    await c.close()


@pytest.mark.parametrize("action", ["accept", "reject"])
async def test_declared_over_max_body_size_is_decided_before_the_body(start: Start,
                                                                      action: str) -> None:
    """Content-Length over max_body_size: not scanned, so the policy decides at once; the
    answer (echo or refusal page) begins before the body is complete."""
    policy = {"rules": [{"status": "skipped", "action": action, "reply": "550 Too large"}]}
    srv = await start(policy=policy, max_body_size=64 * KiB)
    body = os.urandom(200 * KiB)
    c = await Client.connect(srv)
    await c.send(respmod(len(body)), *chunks(body[:16 * KiB]))
    await c.until(lambda: c.responses)
    resp = c.responses[0]
    if action == "accept":
        assert resp.res_hdr.startswith(b"HTTP/1.1 200")
        await c.send(*chunks(body[16 * KiB:]), proto.LAST_CHUNK)
        await c.until(lambda: c.complete)
        assert c.body == body
    else:
        assert resp.res_hdr.startswith(b"HTTP/1.1 403")
        await c.until(lambda: c.complete)
        assert b"Too large" in c.body
        await c.send(*chunks(body[16 * KiB:]), proto.LAST_CHUNK)  # read and dropped
    await c.close()


async def test_declared_over_max_body_size_after_a_preview_gets_204(start: Start) -> None:
    srv = await start(max_body_size=64 * KiB)
    c = await Client.connect(srv)
    await c.send(respmod(200 * KiB, preview=1024), proto.encode_chunk(os.urandom(1024)),
                 proto.LAST_CHUNK)
    await c.until(lambda: c.responses)
    assert [r.status for r in c.responses] == [204]
    await c.close()


@pytest.mark.parametrize("action", ["accept", "reject"])
async def test_undeclared_length_over_max_body_size_while_streaming(start: Start,
                                                                     action: str) -> None:
    """No Content-Length, the body crosses max_body_size after the answer began: passed,
    the rest streams through; refused, the transfer is cut."""
    policy = {"rules": [{"status": "skipped", "action": action, "reply": "550 Too large"}]}
    srv = await start(policy=policy, max_body_size=64 * KiB)
    body = os.urandom(200 * KiB)
    c = await Client.connect(srv)
    await c.send(respmod(None), *chunks(body), proto.LAST_CHUNK)
    if action == "accept":
        await c.until(lambda: c.complete)
        assert c.body == body
    else:
        await c.until(lambda: c.closed)
        assert not c.complete and body.startswith(c.body) and len(c.body) < 64 * KiB
    await c.close()
