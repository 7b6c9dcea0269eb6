"""ICAP engine: any ICAP antivirus server (c-icap virus_scan, Kaspersky, Sophos, ...) as an engine.

``url = "icap://host:1344/service"``. The object goes out as the body of an encapsulated
``HTTP/1.1 200 OK`` response in a RESPMOD request:

1. OPTIONS first, cached for the server's ``Options-TTL``: it gives the Preview size, whether
   ``204`` is allowed, and the ``ISTag`` (our :meth:`db_version`: it changes when the server's
   signatures change, which invalidates our verdict cache).
2. RESPMOD with a preview of ``min(Preview, preview)`` bytes (``ieof`` when the whole object
   fits); on ``100 Continue`` the rest is streamed from the spool in chunks.
3. The answer: ``204`` → clean; ``200`` with ``X-Infection-Found`` / ``X-Violations-Found`` /
   ``X-Virus-ID`` → infected with those names; ``200`` with a different HTTP status (a block
   page) or a changed body → infected ``ICAP.Modified``; ``200`` echoing the object → clean.

One connection per scan: ICAP servers close idle connections on their own schedule and a
stale pooled connection would cost a retry on the slow path; a loopback connect is cheap.
Errors: connect refused/reset → EngineUnavailable, no answer in time → EngineTimeout, an
answer we cannot parse (or an ICAP error status) → EngineProtocolError.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import (
    ConfigError,
    EngineError,
    EngineProtocolError,
    EngineTimeout,
    EngineUnavailable,
)
from ..limits import DEFAULT_CONNECT_TIMEOUT, Timeouts
from ..protocols import icap as proto
from ..result import Finding, ScanResult, ScanStatus
from ..spool import Spool
from .base import BaseEngine, EngineContext

DEFAULT_PORT = 1344
DEFAULT_OPTIONS_TTL = 300.0  # when the server sends no Options-TTL
DEFAULT_CHUNK_SIZE = 64 * 1024
MODIFIED_NAME = "ICAP.Modified"
_READ_SIZE = 64 * 1024


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """What an OPTIONS answer told us."""

    istag: str
    preview: int | None
    allow_204: bool
    ttl: float
    service: str
    methods: tuple[str, ...]
    fetched: float  # monotonic time

    def fresh(self, now: float) -> bool:
        return now - self.fetched < self.ttl


class IcapEngine(BaseEngine):
    """Scans by sending the object to an ICAP server in a RESPMOD request."""

    type_name: ClassVar[str] = "icap"
    config_keys: ClassVar[frozenset[str]] = frozenset({
        "url", "connect_timeout", "scan_timeout", "preview",
    })

    def __init__(self, name: str, ctx: EngineContext, *, url: str,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 scan_timeout: float | None = None, preview: int | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        super().__init__(name, ctx)
        self.url = url
        self.host, self.port, self.service = parse_url(url)
        self.icap_uri = f"icap://{self.host}:{self.port}/{self.service}"
        self.connect_timeout = connect_timeout
        self.scan_timeout = scan_timeout if scan_timeout is not None else ctx.limits.scan_timeout
        self.max_preview = preview  # None: whatever the server offers
        self.chunk_size = chunk_size
        # OPTIONS (connect + reply) and RESPMOD (connect + scan) within one scan
        self.timeouts = Timeouts(connect=connect_timeout,
                                 scan=3 * connect_timeout + self.scan_timeout)
        self.options: ServerOptions | None = None
        self._options_lock = asyncio.Lock()
        self._refresh: asyncio.Task[Any] | None = None

    @classmethod
    def from_config(cls, table: Mapping[str, Any], ctx: EngineContext) -> IcapEngine:
        """Build from an ``[[engines]]`` table with ``type = "icap"``."""
        name = str(table.get("name", "icap"))
        where = f"engines ({name})"
        url = table.get("url")
        if not isinstance(url, str):
            raise ConfigError(f"{where}: url: required, e.g. \"icap://127.0.0.1:1344/avscan\"")
        try:
            parse_url(url)
        except ValueError as exc:
            raise ConfigError(f"{where}: url: {exc}") from exc
        kw: dict[str, Any] = {"url": url}
        for key in ("connect_timeout", "scan_timeout"):
            if key in table:
                value = table[key]
                if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                    raise ConfigError(f"{where}: {key}: must be a number > 0")
                kw[key] = float(value)
        if "preview" in table:
            value = table["preview"]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{where}: preview: must be an integer >= 0")
            kw["preview"] = value
        return cls(name, ctx, **kw)

    # -- lifecycle / info ----------------------------------------------------------------
    async def start(self) -> None:
        """Ask for OPTIONS; a server that is down now is not an error (scans will say so)."""
        with contextlib.suppress(EngineError):
            await self._fetch_options()

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError, EngineError):
                await self._refresh
            self._refresh = None

    def db_version(self) -> str:
        """The server's ISTag; re-asked in the background once Options-TTL has passed."""
        opts = self.options
        if opts is None or not opts.fresh(time.monotonic()):
            self._schedule_refresh()
        return opts.istag if opts else ""

    def version(self) -> str:
        opts = self.options
        if opts is None:
            return ""
        return f"{opts.service} {opts.istag}".strip()

    def _schedule_refresh(self) -> None:
        if self._refresh is not None and not self._refresh.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._refresh = loop.create_task(self.start())

    async def health(self) -> dict[str, Any]:
        """OPTIONS now; ``ok`` when the server answers 200."""
        started = time.perf_counter()
        report: dict[str, Any] = {"name": self.name, "type": self.type_name, "url": self.url}
        try:
            opts = await self._fetch_options()
        except EngineError as exc:
            report.update(ok=False, error=str(exc))
        else:
            report.update(ok=True, istag=opts.istag, service=opts.service,
                          latency_ms=round((time.perf_counter() - started) * 1000, 3))
        return report

    # -- OPTIONS -------------------------------------------------------------------------
    async def _current_options(self) -> ServerOptions:
        opts = self.options
        if opts is not None and opts.fresh(time.monotonic()):
            return opts
        async with self._options_lock:  # one OPTIONS for many concurrent scans
            opts = self.options
            if opts is not None and opts.fresh(time.monotonic()):
                return opts
            return await self._fetch_options()

    async def _fetch_options(self) -> ServerOptions:
        request = proto.encode_request("OPTIONS", self.icap_uri,
                                       [("Host", self.host), ("User-Agent", "avgate"),
                                        ("Connection", "close")])
        reader, writer = await self._connect()
        try:
            async with asyncio.timeout(self.connect_timeout + self.scan_timeout):
                writer.write(request)
                await writer.drain()
                parser = proto.IcapParser("client")
                resp = await _response(reader, parser)
                if resp.has_body:
                    await _drain(reader, parser)
        except TimeoutError:
            raise EngineTimeout("no OPTIONS reply in time") from None
        except OSError as exc:
            raise EngineUnavailable(f"OPTIONS failed: {exc.strerror or exc}") from exc
        finally:
            writer.close()
        if resp.status != 200:
            raise _status_error(resp, "OPTIONS")
        h = resp.headers
        methods = tuple(m.upper() for m in h.list_values("methods"))
        if methods and "RESPMOD" not in methods:
            raise EngineProtocolError(f"service {self.service!r} does not offer RESPMOD "
                                      f"(Methods: {', '.join(methods)})")
        pv = h.get("preview")
        ttl = h.get("options-ttl")
        opts = ServerOptions(
            istag=h.get("istag").strip('"'),
            preview=int(pv) if pv.isdigit() else None,
            allow_204="204" in h.list_values("allow"),
            ttl=float(ttl) if ttl.isdigit() and int(ttl) > 0 else DEFAULT_OPTIONS_TTL,
            service=h.get("service"),
            methods=methods,
            fetched=time.monotonic(),
        )
        self.options = opts
        return opts

    # -- scanning ------------------------------------------------------------------------
    async def _scan(self, spool: Spool) -> ScanResult:
        if spool.size > self.ctx.limits.max_scan_size:
            return ScanResult(ScanStatus.SKIPPED, reason=(
                f"size limit: {spool.size} bytes > max_scan_size "
                f"{self.ctx.limits.max_scan_size}"))
        opts = await self._current_options()
        preview = opts.preview
        if self.max_preview is not None:
            preview = self.max_preview if preview is None else min(preview, self.max_preview)
        reader, writer = await self._connect()
        try:
            async with asyncio.timeout(self.scan_timeout):
                return await self._respmod(reader, writer, spool, preview, opts.allow_204)
        except TimeoutError:
            raise EngineTimeout(f"no RESPMOD reply within {self.scan_timeout:g}s") from None
        except OSError as exc:
            raise EngineUnavailable(f"connection lost: {exc.strerror or exc}") from exc
        finally:
            writer.close()

    async def _respmod(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       spool: Spool, preview: int | None, allow_204: bool) -> ScanResult:
        size = spool.size
        key = spool.sha256
        req_hdr = (f"GET http://avgate.invalid/{key} HTTP/1.1\r\n"
                   "Host: avgate.invalid\r\n\r\n").encode()
        res_hdr = proto.encode_http_response(200, [
            ("Content-Type", "application/octet-stream"), ("Content-Length", str(size))])
        headers = [("Host", self.host), ("User-Agent", "avgate"), ("Connection", "close")]
        if allow_204:
            headers.append(("Allow", "204"))
        sent = 0
        with spool.open() as f:
            if preview is not None:
                first = f.read(preview) if preview else b""
                sent = len(first)
                headers.append(("Preview", str(len(first))))
                head = proto.encode_request("RESPMOD", self.icap_uri, headers, req_hdr=req_hdr,
                                            res_hdr=res_hdr, body="res-body")
                end = proto.IEOF_CHUNK if sent >= size else proto.LAST_CHUNK
                writer.write(head + proto.encode_chunk(first) + end)
                await writer.drain()
                parser = proto.IcapParser("client")
                resp = await _response(reader, parser)
                if resp.status == 100:
                    if sent >= size:
                        raise EngineProtocolError("100 Continue after a complete preview")
                    await self._send_rest(writer, f)
                    resp = await _response(reader, parser)
            else:
                head = proto.encode_request("RESPMOD", self.icap_uri, headers, req_hdr=req_hdr,
                                            res_hdr=res_hdr, body="res-body")
                writer.write(head)
                await self._send_rest(writer, f)
                parser = proto.IcapParser("client")
                resp = await _response(reader, parser)
        return await self._verdict(resp, reader, parser, key)

    async def _send_rest(self, writer: asyncio.StreamWriter, f: Any) -> None:
        while chunk := f.read(self.chunk_size):
            writer.write(proto.encode_chunk(chunk))
            await writer.drain()  # one chunk in flight: a 1 GiB object never sits in memory
        writer.write(proto.LAST_CHUNK)
        await writer.drain()

    async def _verdict(self, resp: proto.Response, reader: asyncio.StreamReader,
                       parser: proto.IcapParser, sha256: str) -> ScanResult:
        if resp.status == 204:
            return ScanResult(ScanStatus.CLEAN)
        if resp.status != 200:
            raise _status_error(resp, "RESPMOD")
        digest = hashlib.sha256()
        if resp.has_body:
            while True:
                ev = await _next(reader, parser)
                if isinstance(ev, proto.BodyEnd):
                    break
                if isinstance(ev, proto.BodyChunk):
                    digest.update(ev.data)
        names = proto.threats_from_headers(resp.headers)
        if not names:
            if not resp.res_hdr:
                raise EngineProtocolError("200 without an encapsulated HTTP response")
            try:
                http_status = proto.HttpHead.parse(resp.res_hdr).status
            except proto.IcapProtocolError as exc:
                raise EngineProtocolError(f"bad encapsulated HTTP header: {exc}") from exc
            if http_status == 200 and resp.has_body and digest.hexdigest() == sha256:
                return ScanResult(ScanStatus.CLEAN)  # echoed unmodified
            names = [MODIFIED_NAME]
        return ScanResult(ScanStatus.INFECTED,
                          findings=tuple(Finding(n, engine=self.name) for n in names))

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await asyncio.open_connection(self.host, self.port)
        except TimeoutError:
            raise EngineTimeout(f"connect timeout after {self.connect_timeout:g}s") from None
        except OSError as exc:
            raise EngineUnavailable(
                f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from exc


def parse_url(url: str) -> tuple[str, int, str]:
    """``icap://host[:port]/service`` → (host, port, service)."""
    split = urllib.parse.urlsplit(url)
    if split.scheme != "icap" or not split.hostname:
        raise ValueError(f"expected icap://host:port/service, got {url!r}")
    try:
        port = split.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    service = split.path.lstrip("/")
    if split.query:
        service += "?" + split.query
    if not service:
        raise ValueError(f"missing service name in {url!r}")
    return split.hostname, port, service


def _status_error(resp: proto.Response, what: str) -> EngineError:
    text = f"{what}: ICAP {resp.status} {resp.reason}".strip()
    if resp.status == 503:
        return EngineUnavailable(text)
    return EngineProtocolError(text)


async def _next(reader: asyncio.StreamReader, parser: proto.IcapParser) -> proto.Event:
    """The next event of a response, reading as needed."""
    while True:
        try:
            ev = parser.next_event()
        except proto.IcapProtocolError as exc:
            raise EngineProtocolError(f"bad ICAP reply: {exc}") from exc
        if not isinstance(ev, type(proto.NEED_DATA)):
            return ev  # type: ignore[return-value]
        data = await reader.read(_READ_SIZE)
        if not data and parser.idle:
            raise EngineProtocolError("connection closed without a reply")
        parser.receive_data(data)


async def _response(reader: asyncio.StreamReader, parser: proto.IcapParser) -> proto.Response:
    ev = await _next(reader, parser)
    if not isinstance(ev, proto.Response):
        raise EngineProtocolError(f"expected an ICAP response, got {type(ev).__name__}")
    return ev


async def _drain(reader: asyncio.StreamReader, parser: proto.IcapParser) -> None:
    while not isinstance(await _next(reader, parser), proto.BodyEnd):
        pass
