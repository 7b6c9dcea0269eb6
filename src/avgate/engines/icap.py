"""ICAP engine: any ICAP antivirus server (c-icap virus_scan, Kaspersky, Sophos, ...) as an engine.

Config (``[[engines]] type = "icap"``): ``url = "icap://host:1344/service"``, or a list of
such URLs (servers offering the same service, chosen like clamd's: see
:class:`IcapEngineSettings` and :mod:`avgate.engines.upstream`). The object goes out as the
body of an encapsulated ``HTTP/1.1 200 OK`` response in a RESPMOD request:

1. OPTIONS first, cached per server for its ``Options-TTL``: it gives the Preview size,
   whether ``204`` is allowed, and the ``ISTag`` (our :meth:`db_version`: it changes when the
   server's signatures change, which invalidates our verdict cache).
2. RESPMOD with a preview of ``min(Preview, preview)`` bytes (``ieof`` when the whole object
   fits); on ``100 Continue`` the rest is streamed from the spool in chunks.
3. The answer: ``204`` → clean; ``200`` with ``X-Infection-Found`` / ``X-Violations-Found`` /
   ``X-Virus-ID`` → infected with those names; ``200`` with a different HTTP status (a block
   page) or a changed body → infected ``ICAP.Modified``; ``200`` echoing the object → clean.

One connection per scan: ICAP servers close idle connections on their own schedule and a
stale pooled connection would cost a retry on the slow path; a loopback connect is cheap.
Errors: connect refused/reset → EngineUnavailable, no answer in time → EngineTimeout, the
connection closed before a whole answer or an ICAP error status → EngineProtocolError (all
``error``: no verdict came); an answer we cannot parse (garbage, a malformed ICAP or
encapsulated HTTP header, an answer that does not fit the request) →
:class:`~avgate.engines.base.UnparseableReply` (``unknown``: the server answered, we could
not understand it). Each moves the scan on to the next server, within the one budget of the
scan (``[limits] scan_timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field

from ..errors import EngineError, EngineProtocolError, EngineTimeout, EngineUnavailable
from ..protocols import icap as proto
from ..result import Finding, ScanResult, ScanStatus
from ..settings import StrTuple
from ..spool import Spool
from .base import EngineContext, UnparseableReply
from .upstream import Bound, Clock, Upstream, UpstreamEngine, UpstreamSettings, server_urls

DEFAULT_PORT = 1344
DEFAULT_OPTIONS_TTL = 300.0  # when the server sends no Options-TTL
CHUNK_SIZE = 64 * 1024
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
    fetched: float  # clock time

    def fresh(self, now: float) -> bool:
        return now - self.fetched < self.ttl


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


@dataclass(slots=True, eq=False)
class IcapServer(Upstream):
    """One ICAP server: its service URI, health state and last OPTIONS answer."""

    host: str = ""
    port: int = DEFAULT_PORT
    service: str = ""
    options: ServerOptions | None = None
    options_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def parse(cls, url: str) -> IcapServer:
        host, port, service = parse_url(url)
        return cls(url, host=host, port=port, service=service)

    @property
    def icap_uri(self) -> str:
        return f"icap://{self.host}:{self.port}/{self.service}"

    @property
    def label(self) -> str:
        """The server for log lines: the URI without its query (which may carry a key)."""
        return self.icap_uri.partition("?")[0]


class IcapEngineSettings(UpstreamSettings):
    """``[[engines]] type = "icap"``.

    url: ``icap://host[:port]/service`` (port 1344 by default), or a list of them
    preview: most bytes sent as preview (unset: what the server offers)
    strategy, connect_timeout, scan_timeout, retry_after, max_failures: see UpstreamSettings
    """

    type: Literal["icap"] = "icap"
    name: str = "icap"
    url: Annotated[StrTuple, AfterValidator(server_urls(parse_url))]
    preview: int | None = Field(None, ge=0)


class IcapEngine(UpstreamEngine[IcapServer]):
    """Scans by sending the object to an ICAP server in a RESPMOD request."""

    type_name: ClassVar[str] = "icap"
    Settings = IcapEngineSettings

    def __init__(self, settings: IcapEngineSettings, ctx: EngineContext, *,
                 clock: Clock = time.monotonic) -> None:
        super().__init__(settings, [IcapServer.parse(u) for u in settings.url], ctx, clock)
        self.settings = settings

    @classmethod
    def from_settings(cls, settings: IcapEngineSettings, ctx: EngineContext) -> IcapEngine:
        return cls(settings, ctx)

    # -- lifecycle / info ----------------------------------------------------------------
    async def start(self) -> None:
        """Ask every server for OPTIONS; one that is down now is not an error (scans say so)."""
        deadline = self.deadline()

        async def fetch(server: IcapServer) -> None:
            with contextlib.suppress(EngineError):
                await self._fetch_options(server, deadline)

        await asyncio.gather(*(fetch(s) for s in self.servers))

    def db_version(self) -> str:
        """The servers' ISTags (joined with ``|`` if they differ); re-asked in the background
        once a server's Options-TTL has passed. Changes too after a reply we could not parse
        (see ``cache_epoch``)."""
        now = self.clock()
        if any(s.options is None or not s.options.fresh(now) for s in self.servers):
            self._schedule_refresh()
        return "|".join(dict.fromkeys(s.options.istag for s in self.servers if s.options)) + \
            self.cache_epoch()

    def version(self) -> str:
        for s in self.servers:
            if s.options is not None:
                return f"{s.options.service} {s.options.istag}".strip()
        return ""

    async def health(self) -> dict[str, Any]:
        """OPTIONS to every server now; ``ok`` when at least one answers 200."""
        async def options(server: IcapServer) -> dict[str, Any]:
            opts = await self._fetch_options(server, self.deadline())
            return {"istag": opts.istag, "service": opts.service}

        ok, reports = await self.upstreams.health(options)
        return {"name": self.name, "type": self.type_name, "ok": ok, "servers": reports}

    # -- OPTIONS -------------------------------------------------------------------------
    async def _current_options(self, server: IcapServer, deadline: float) -> ServerOptions:
        opts = server.options
        if opts is not None and opts.fresh(self.clock()):
            return opts
        try:
            async with asyncio.timeout_at(deadline):
                await server.options_lock.acquire()  # one OPTIONS for many concurrent scans
        except TimeoutError:
            raise EngineTimeout("no OPTIONS reply in time") from None
        try:
            opts = server.options
            if opts is not None and opts.fresh(self.clock()):
                return opts
            return await self._fetch_options(server, deadline)
        finally:
            server.options_lock.release()

    async def _fetch_options(self, server: IcapServer, deadline: float) -> ServerOptions:
        started = time.perf_counter()
        try:
            opts = await self._fetch_options_on(server, deadline)
        except EngineError as exc:
            self.debug_request(server.label, "OPTIONS", started, error=str(exc))
            raise
        self.debug_request(server.label, "OPTIONS", started, status=200, istag=opts.istag,
                           preview=opts.preview, allow_204=opts.allow_204, ttl=opts.ttl)
        return opts

    async def _fetch_options_on(self, server: IcapServer, deadline: float) -> ServerOptions:
        request = proto.encode_request("OPTIONS", server.icap_uri,
                                       [("Host", server.host), ("User-Agent", "avgate"),
                                        ("Connection", "close")])
        reader, writer = await self._connect(server, deadline)
        try:
            async with asyncio.timeout_at(Bound.of(self.settings.scan_timeout, deadline).when):
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
            raise EngineProtocolError(f"service {server.service!r} does not offer RESPMOD "
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
            fetched=self.clock(),
        )
        server.options = opts
        return opts

    # -- scanning ------------------------------------------------------------------------
    async def _scan(self, spool: Spool, deadline: float) -> ScanResult:
        if spool.size > self.ctx.limits.max_scan_size:
            return ScanResult(ScanStatus.SKIPPED, reason=(
                f"size limit: {spool.size} bytes > max_scan_size "
                f"{self.ctx.limits.max_scan_size}"))

        async def attempt(server: IcapServer) -> ScanResult:
            return await self._scan_on(server, spool, deadline)

        return await self.upstreams.call(attempt, deadline)

    async def _scan_on(self, server: IcapServer, spool: Spool, deadline: float) -> ScanResult:
        opts = await self._current_options(server, deadline)
        preview = opts.preview
        limit = self.settings.preview
        if limit is not None:
            preview = limit if preview is None else min(preview, limit)
        started = time.perf_counter()
        note: dict[str, Any] = {"size": spool.size, "preview": preview}
        try:
            result = await self._respmod_on(server, spool, deadline, preview, opts.allow_204,
                                            note)
        except EngineError as exc:
            self.debug_request(server.label, "RESPMOD", started, **note, error=str(exc))
            raise
        self.debug_request(server.label, "RESPMOD", started, **note,
                           verdict=result.status.value,
                           **({"findings": [f.name for f in result.findings]}
                              if result.findings else {}))
        return result

    async def _respmod_on(self, server: IcapServer, spool: Spool, deadline: float,
                          preview: int | None, allow_204: bool, note: dict[str, Any]
                          ) -> ScanResult:
        reader, writer = await self._connect(server, deadline)
        bound = Bound.of(self.settings.scan_timeout, deadline)
        try:
            async with asyncio.timeout_at(bound.when):
                return await self._respmod(server, reader, writer, spool, preview,
                                           allow_204, note)
        except TimeoutError:
            raise EngineTimeout(f"no RESPMOD reply within {bound}") from None
        except OSError as exc:
            raise EngineUnavailable(f"connection lost: {exc.strerror or exc}") from exc
        finally:
            writer.close()

    async def _respmod(self, server: IcapServer, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, spool: Spool, preview: int | None,
                       allow_204: bool, note: dict[str, Any]) -> ScanResult:
        """One RESPMOD exchange; ``note`` gets the summary for the debug line (the ICAP
        status of each answer, whether the server asked for the rest after the preview)."""
        size = spool.size
        key = spool.sha256
        req_hdr = (f"GET http://avgate.invalid/{key} HTTP/1.1\r\n"
                   "Host: avgate.invalid\r\n\r\n").encode()
        res_hdr = proto.encode_http_response(200, [
            ("Content-Type", "application/octet-stream"), ("Content-Length", str(size))])
        headers = [("Host", server.host), ("User-Agent", "avgate"), ("Connection", "close")]
        if allow_204:
            headers.append(("Allow", "204"))
        sent = 0
        with spool.open() as f:
            if preview is not None:
                first = f.read(preview) if preview else b""
                sent = len(first)
                headers.append(("Preview", str(len(first))))
                head = proto.encode_request("RESPMOD", server.icap_uri, headers,
                                            req_hdr=req_hdr, res_hdr=res_hdr, body="res-body")
                end = proto.IEOF_CHUNK if sent >= size else proto.LAST_CHUNK
                writer.write(head + proto.encode_chunk(first) + end)
                await writer.drain()
                parser = proto.IcapParser("client")
                resp = await _response(reader, parser)
                note["status"] = resp.status
                if resp.status == 100:
                    if sent >= size:
                        raise UnparseableReply("100 Continue after a complete preview")
                    note["continue"] = True
                    await _send_rest(writer, f)
                    resp = await _response(reader, parser)
                    note["status"] = resp.status
            else:
                head = proto.encode_request("RESPMOD", server.icap_uri, headers,
                                            req_hdr=req_hdr, res_hdr=res_hdr, body="res-body")
                writer.write(head)
                await _send_rest(writer, f)
                parser = proto.IcapParser("client")
                resp = await _response(reader, parser)
                note["status"] = resp.status
        return await self._verdict(resp, reader, parser, key)

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
                raise UnparseableReply("200 without an encapsulated HTTP response")
            try:
                http_status = proto.HttpHead.parse(resp.res_hdr).status
            except proto.IcapProtocolError as exc:
                raise UnparseableReply(f"bad encapsulated HTTP header: {exc}") from exc
            if http_status == 200 and resp.has_body and digest.hexdigest() == sha256:
                return ScanResult(ScanStatus.CLEAN)  # echoed unmodified
            names = [MODIFIED_NAME]
        return ScanResult(ScanStatus.INFECTED,
                          findings=tuple(Finding(n, engine=self.name) for n in names))

    async def _connect(self, server: IcapServer, deadline: float
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        bound = Bound.of(self.settings.connect_timeout, deadline)
        try:
            async with asyncio.timeout_at(bound.when):
                return await asyncio.open_connection(server.host, server.port)
        except TimeoutError:
            raise EngineTimeout(f"connect timeout after {bound}") from None
        except OSError as exc:
            raise EngineUnavailable(
                f"cannot connect to {server.host}:{server.port}: {exc.strerror or exc}"
            ) from exc


async def _send_rest(writer: asyncio.StreamWriter, f: Any) -> None:
    while chunk := f.read(CHUNK_SIZE):
        writer.write(proto.encode_chunk(chunk))
        await writer.drain()  # one chunk in flight: a 1 GiB object never sits in memory
    writer.write(proto.LAST_CHUNK)
    await writer.drain()


def _status_error(resp: proto.Response, what: str) -> EngineError:
    text = f"{what}: ICAP {resp.status} {resp.reason}".strip()
    if resp.status == 503:
        return EngineUnavailable(text)
    return EngineProtocolError(text)


async def _next(reader: asyncio.StreamReader, parser: proto.IcapParser) -> proto.Event:
    """The next event of a response, reading as needed. Bytes the parser rejects are an
    unparseable reply (``unknown``); the connection closing before the reply is whole is
    a failed exchange (``error``)."""
    eof = False
    while True:
        try:
            ev = parser.next_event()
        except proto.IcapProtocolError as exc:
            if eof:
                raise EngineProtocolError(f"connection closed mid-reply ({exc})") from exc
            raise UnparseableReply(f"bad ICAP reply: {exc}") from exc
        if not isinstance(ev, type(proto.NEED_DATA)):
            return ev  # type: ignore[return-value]
        data = await reader.read(_READ_SIZE)
        if not data:
            if parser.idle:
                raise EngineProtocolError("connection closed without a reply")
            eof = True
        parser.receive_data(data)


async def _response(reader: asyncio.StreamReader, parser: proto.IcapParser) -> proto.Response:
    ev = await _next(reader, parser)
    if not isinstance(ev, proto.Response):
        raise UnparseableReply(f"expected an ICAP response, got {type(ev).__name__}")
    return ev


async def _drain(reader: asyncio.StreamReader, parser: proto.IcapParser) -> None:
    while not isinstance(await _next(reader, parser), proto.BodyEnd):
        pass
