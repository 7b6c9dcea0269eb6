"""ICAP front-end under attack: what the origin claims is not trusted, and no body makes the
server keep more than ``max_body_size`` of it (issue 11, section 5).

* ``skip_content_types`` used to trust the origin's Content-Type: EICAR served as
  ``image/png`` was answered ``204`` unscanned. Now the first bytes must carry the claimed
  type's signature, and a download (``Content-Disposition: attachment``) is always scanned.
* There was no body-size limit: every byte of a body went to the spool (memory, then disk)
  however large. Now nothing past ``max_body_size`` is kept; the object counts as skipped
  (a size limit) and the policy decides; passed objects still arrive intact.

Every sample is generated here. The server runs in-process on a loopback port.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest

from avgate import config
from avgate.frontends import icap as fe
from avgate.frontends.listen import ListenOptions
from avgate.gateway import Gateway
from avgate.limits import KiB, MiB
from avgate.protocols import icap as proto
from tests.clamd_daemon import EICAR

pytestmark = pytest.mark.timeout(60)

REQ_HDR = b"GET http://origin.test/f HTTP/1.1\r\nHost: origin.test\r\n\r\n"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"  # the signature and the first chunk header
OPTIONS_CLOSE = b"OPTIONS icap://t/avscan ICAP/1.0\r\nConnection: close\r\n\r\n"


class Events:
    """Stands in for the scan log: keeps every event."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    debug_enabled = False  # what front-ends test before a debug line

    def log(self, event: dict[str, Any], level: str = "info") -> None:
        self.events.append(event)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == kind]


def res_hdr(n: int, ctype: str, extra: str = "") -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {n}\r\n{extra}"
            "\r\n").encode()


def respmod(n: int, ctype: str = "application/octet-stream", *, allow_204: bool = True,
            preview: int | None = None, extra: str = "") -> bytes:
    headers = [("Host", "t")]
    if allow_204:
        headers.append(("Allow", "204"))
    if preview is not None:
        headers.append(("Preview", str(preview)))
    return proto.encode_request("RESPMOD", "icap://t/avscan", headers, req_hdr=REQ_HDR,
                                res_hdr=res_hdr(n, ctype, extra), body="res-body")


@dataclasses.dataclass
class Server:
    gateway: Gateway
    icap: fe.IcapServer
    log: Events
    spool_dir: Path

    @property
    def port(self) -> int:
        return self.icap.port


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Any]:
    started: list[Server] = []

    async def factory(policy: dict[str, Any] | None = None, **icap: Any) -> Server:
        table = {"listen": "127.0.0.1:0", "idle_timeout": 5, **icap}
        spool_dir = tmp_path / f"spool{len(started)}"
        spool_dir.mkdir()
        cfg = config.from_dict({
            "icap": table, "limits": {"max_scan_size": 8 * MiB},
            "scan": {"spool_memory": 64 * KiB, "spool_dir": str(spool_dir)},
            "policy": policy or {}})
        gw = Gateway.from_config(cfg)
        events = Events()
        gw.log = events  # type: ignore[assignment]
        await gw.start()
        [srv] = await fe.start(gw, ListenOptions())
        assert isinstance(srv, fe.IcapServer)
        server = Server(gw, srv, events, spool_dir)
        started.append(server)
        return server

    yield factory
    for s in started:
        await s.icap.aclose()
        await s.gateway.close()


async def converse(port: int, head: bytes, pieces: Iterable[bytes], *,
                   on_piece: Any = None, wait: float = 10) -> list[object]:
    """Send ``head``, the body ``pieces`` as chunks, the last chunk and an OPTIONS with
    ``Connection: close``, reading the answers concurrently (as Squid does) until the
    server closes. Returns the events read."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    parser = proto.IcapParser("client")
    out: list[object] = []

    async def read() -> None:
        while data := await r.read(1 << 16):
            parser.receive_data(data)
            out.extend(parser)

    reader = asyncio.create_task(read())
    try:
        w.write(head)
        for piece in pieces:
            w.write(proto.encode_chunk(piece))
            await w.drain()
            if on_piece is not None:
                on_piece()
        w.write(proto.LAST_CHUNK + OPTIONS_CLOSE)
        await w.drain()
        await asyncio.wait_for(reader, wait)
    finally:
        reader.cancel()
        w.close()
    return out


def responses(evs: list[object]) -> list[proto.Response]:
    return [e for e in evs if isinstance(e, proto.Response)]


def body_of(evs: list[object]) -> bytes:
    return b"".join(e.data for e in evs if isinstance(e, proto.BodyChunk))


# -- skip_content_types: the bytes must agree ----------------------------------------------------
@pytest.mark.parametrize("preview", [None, 16], ids=["no-preview", "preview"])
async def test_eicar_labelled_image_png_is_scanned(start: Any, preview: int | None) -> None:
    """Before: ``204`` (EICAR delivered). The label says PNG, the bytes do not: scanned."""
    srv = await start(skip_content_types=["image/*", "video/*"])
    r, w = await asyncio.open_connection("127.0.0.1", srv.port)
    w.write(respmod(len(EICAR), "image/png", preview=preview))
    if preview is not None:
        w.write(proto.encode_chunk(EICAR[:preview]) + proto.LAST_CHUNK)
        assert await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5) == proto.CONTINUE
        w.write(proto.encode_chunk(EICAR[preview:]) + proto.LAST_CHUNK + OPTIONS_CLOSE)
    else:
        w.write(proto.encode_body(EICAR) + OPTIONS_CLOSE)
    evs: list[object] = []
    parser = proto.IcapParser("client")
    while data := await asyncio.wait_for(r.read(1 << 16), 5):
        parser.receive_data(data)
        evs.extend(parser)
    w.close()
    first = responses(evs)[0]
    assert first.status == 200 and first.headers.get("x-virus-id") == "Eicar-Test-Signature"
    assert first.res_hdr.startswith(b"HTTP/1.1 403")
    assert not srv.log.of("icap-skip")


async def test_real_png_is_still_skipped_after_the_preview(start: Any) -> None:
    """The option keeps working for what it is for: a real PNG gets 204 after the preview
    alone (the rest of the body is never sent)."""
    srv = await start(skip_content_types=["image/*"])
    body = PNG + os.urandom(100_000)
    r, w = await asyncio.open_connection("127.0.0.1", srv.port)
    w.write(respmod(len(body), "image/png", preview=16)
            + proto.encode_chunk(body[:16]) + proto.LAST_CHUNK)
    line = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
    w.close()
    assert line.startswith(b"ICAP/1.0 204")
    assert [e["event"] for e in srv.log.events] == ["icap-skip"]


@pytest.mark.parametrize(("ctype", "prefix", "extra", "skipped"), [
    ("image/png", PNG, "", True),
    ("image/jpeg", b"\xff\xd8\xff\xe0\x00\x10JFIF", "", True),
    ("image/gif", b"GIF89a", "", True),
    ("video/mp4", b"\x00\x00\x00\x18ftypmp42", "", True),
    ("image/jpeg", PNG, "", False),  # a PNG is not a JPEG
    ("image/svg+xml", b"<svg xmlns='http://www.w3.org/2000/svg'>", "", False),  # no signature
    ("image/png", PNG, "Content-Disposition: attachment; filename=setup.exe\r\n", False),
    ("image/png", b"MZ\x90\x00", "", False),
])
async def test_skip_needs_signature_and_no_download(start: Any, ctype: str, prefix: bytes,
                                                    extra: str, skipped: bool) -> None:
    srv = await start(skip_content_types=["image/*", "video/*"])
    body = prefix + b"\x00" * 200
    evs = await converse(srv.port, respmod(len(body), ctype, extra=extra), [body])
    assert [r.status for r in responses(evs)] == [204, 200]
    assert bool(srv.log.of("icap-skip")) is skipped
    assert bool(srv.log.of("scan")) is not skipped


# -- max_body_size: nothing past the limit is kept -------------------------------------------
def _spooled(spool_dir: Path) -> int:
    return max((p.stat().st_size for p in spool_dir.iterdir() if p.is_file()), default=0)


@pytest.mark.parametrize("allow_204", [True, False], ids=["204", "echo"])
async def test_body_over_max_body_size_is_not_kept_and_passes_intact(
        start: Any, allow_204: bool) -> None:
    """12 MiB through a server with ``max_body_size = 1 MiB``: the spool file never holds
    more than 1 MiB (before: all 12 MiB), the object counts as skipped (size limit) and,
    passed by the default policy, arrives intact (204, or the 200 echo streamed)."""
    srv = await start(max_body_size=1 * MiB)
    piece = os.urandom(256 * KiB)
    pieces = [piece] * 48
    total = len(piece) * len(pieces)
    peak = [0]

    def sample() -> None:
        peak[0] = max(peak[0], _spooled(srv.spool_dir))

    evs = await converse(srv.port, respmod(total, allow_204=allow_204), pieces,
                         on_piece=sample, wait=30)
    rs = responses(evs)
    assert peak[0] <= 1 * MiB, f"spooled {peak[0]} bytes"
    if allow_204:
        assert [r.status for r in rs] == [204, 200]
    else:
        assert [r.status for r in rs] == [200, 200]
        assert rs[0].res_hdr == res_hdr(total, "application/octet-stream")
        echoed = body_of(evs)
        assert len(echoed) == total and echoed == piece * len(pieces)
    [scan] = srv.log.of("scan")
    assert scan["status"] == "skipped" and "max_body_size" in scan["reason"]


async def test_body_over_the_limit_refused_by_policy_gets_the_page(start: Any) -> None:
    """A policy that refuses unscanned objects: the refusal page once the body is read,
    and the connection goes on serving."""
    srv = await start(max_body_size=64 * KiB,
                      policy={"rules": [{"status": "skipped", "action": "reject",
                                         "reply": "550 5.7.1 Too large to scan"}]})
    body = os.urandom(300 * KiB)
    evs = await converse(srv.port, respmod(len(body), allow_204=False),
                         [body[i:i + 50_000] for i in range(0, len(body), 50_000)])
    rs = responses(evs)
    assert [r.status for r in rs] == [200, 200]
    assert rs[0].res_hdr.startswith(b"HTTP/1.1 403")
    page = body_of(evs)
    assert b"Too large to scan" in page and body[:1000] not in page


async def test_body_over_the_limit_in_the_preview_is_answered_after_it(start: Any) -> None:
    """The limit crossed inside a (client-announced, huge) preview: answered right after the
    preview, without asking for the rest."""
    srv = await start(max_body_size=4 * KiB)
    preview = os.urandom(40 * KiB)
    r, w = await asyncio.open_connection("127.0.0.1", srv.port)
    w.write(respmod(10 * MiB, preview=len(preview), allow_204=False)
            + proto.encode_chunk(preview) + proto.LAST_CHUNK)
    line = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
    w.close()
    assert line.startswith(b"ICAP/1.0 204")
    assert _spooled(srv.spool_dir) == 0
