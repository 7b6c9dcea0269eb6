"""ICAP server front-end (RFC 3507) for proxies such as Squid: OPTIONS, RESPMOD, REQMOD.

A thin asyncio adapter: each connection is an :class:`asyncio.Protocol` whose bytes go into
:class:`avgate.protocols.icap.IcapParser` as they arrive (no stream reader; one idle-deadline
timer per connection, moved rather than re-armed per read; reading pauses while more than
256 KiB wait behind a request in progress), the body streams into a
:class:`~avgate.spool.Spool`, and :meth:`Gateway.process` gives the decision, which is answered
in ICAP:

==========================  ===============================================================
decision                    ICAP answer
==========================  ===============================================================
accept                      ``204 No Content`` if the client allows it (``Allow: 204``, or
                            the whole body came in the preview), else ``200`` echoing the
                            object unmodified
infected (any disposition   ``200`` wrapping ``HTTP 403 Forbidden`` with the block page, plus
other than accept)          ``X-Infection-Found: Type=0; Resolution=2; Threat=NAME;`` and
                            ``X-Virus-ID: NAME``
tempfail (scanner error)    ``200`` wrapping ``HTTP 503 Service Unavailable`` (Retry-After):
                            never an ICAP 5xx, because a proxy configured with ``bypass=on``
                            would then pass the unscanned object to the user
reject (not infected)       ``200`` wrapping ``HTTP 403`` with the policy's reason
==========================  ===============================================================

Preview: the preview data is spooled too; otherwise ``100 Continue``. ``preview = 0``
offers no preview at all (OPTIONS carries no ``Preview`` header). Protocol errors (bad chunk
sizes, missing Encapsulated header, header over ``max_header_size``) get ``400`` and the
connection is closed; a connection silent for ``idle_timeout`` seconds is closed (without an
ICAP error once an answer has begun: that would land in the middle of its body).

Answering before the verdict (``[icap.trickle]``, :mod:`avgate.trickle`): a RESPMOD whose
client does not allow ``204`` gets ``200`` with the HTTP headers unchanged as soon as the
first bytes may leave (keep-back: once more than ``keep_back`` bytes arrived; trickle: after
the first ``interval``), then the body as the gate allows while it arrives and is scanned.
Clean: the rest and the last chunk. Infected or refused: the connection is closed without the
last chunk, so the proxy aborts the transfer; the client keeps a truncated object, never the
held-back tail (scan log: actions ``cut``, ``early_bytes``). A body that ends before
anything may leave is answered after its verdict as in the table. This is also what keeps
Squid 5.7 going: it stops reading the origin once its 64 KiB body buffer is full and, until
the ICAP answer begins, nothing wakes it again (Squid bug 5352); the default keep-back (32
KiB) is below that buffer. A response whose Content-Length is over ``max_body_size`` is
decided (unscanned) before its body is read, for the same reason.

``skip_content_types``: see :mod:`avgate.frontends.icap_skip` (the Content-Type is
trusted only when the body's first bytes agree).

``max_body_size`` (default: ``[limits] max_scan_size``, which follows a reload): the body
is spooled up to that many bytes (memory, then a temp file); past it nothing more is kept and
nothing is scanned. The object then counts as ``skipped`` with a *size* limit and the policy
decides (default for web content: pass with a tag). Passed: ``204`` when the client allows
it (the rest of the body is read and dropped), else the ``200`` echo streams the kept bytes
and then the rest as it arrives (memory and disk stay bounded, the object arrives intact);
after a preview, ``204`` at once. Refused: the refusal page once the body has been read.

Reload and workers (``avgate serve``): the Gateway (scanner, policy, store, log; the ISTag
follows the signatures) and ``[icap]`` (``gateway.config.icap``, see :class:`IcapSettings`)
are read per request through ``server.gateway`` (serve's GatewayRef), so a reload applies
from the next request (``max_header_size`` from the next connection; the ``block_page`` file
is read again); ``listen`` needs a restart. With ``[serve] workers`` > 1 every worker binds a
TCP ``listen`` with SO_REUSEPORT; a ``unix:`` socket is opened by worker 0 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
from email.utils import formatdate
from typing import TYPE_CHECKING, cast

from pydantic import Field, field_validator

from .. import __version__
from ..context import Context
from ..deadline import Deadline
from ..errors import AvgateError, ConfigError
from ..limits import KiB
from ..observability import record_scan, scan_event
from ..policy import Decision, Disposition
from ..protocols import icap as proto
from ..result import LimitKind, ScanResult, ScanStatus
from ..settings import Listen, Section, Size, StrTuple
from ..trickle import Gate, Relay, TrickleSettings
from .icap_pages import DEFAULT_BLOCK_PAGE, REFUSED_PAGE, UNAVAILABLE_PAGE, read_block_page, render
from .icap_skip import SNIFF_BYTES, claimed_type, media_agrees
from .listen import DEFAULT_BACKLOG, Address, Listener, ListenOptions, bind, parse_listen

log = logging.getLogger("avgate.icap")

if TYPE_CHECKING:
    from ..gateway import Gateway, Outcome
    from ..spool import Spool

#: request bytes buffered while the connection is busy before reading pauses
_READ_AHEAD = 256 * KiB
SEND_CHUNK = 64 * KiB


class IcapSettings(Section):
    """``[icap]``: the ICAP server (``avgate serve``).

    ``listen`` (``"127.0.0.1:1344"``, or ``unix:/path``), ``service`` (``"avscan"``: the
    path of ``icap://host:port/avscan``), ``preview`` (1024 bytes offered in OPTIONS; 0: no
    preview), ``max_connections`` (100, also announced in OPTIONS), ``options_ttl`` (3600 s),
    ``max_header_size`` (64 KiB of ICAP and HTTP headers per request),
    ``max_requests_per_connection`` (1000), ``idle_timeout`` (60 s), ``block_page`` (a
    template file for the virus page, relative to the config file; ``{url}`` and ``{virus}``
    are replaced), ``skip_content_types`` (glob patterns, see :mod:`.icap_skip`),
    ``max_body_size`` (default: ``[limits] max_scan_size``), ``trickle`` (the
    ``[icap.trickle]`` table, :class:`avgate.trickle.TrickleSettings`: what of a RESPMOD
    body goes back before the verdict).
    """

    listen: Listen = parse_listen("127.0.0.1:1344")
    service: str = "avscan"
    preview: int = Field(default=1024, ge=0)
    max_connections: int = Field(default=100, gt=0)
    options_ttl: int = Field(default=3600, gt=0)
    max_header_size: Size = proto.DEFAULT_MAX_HEADER_SIZE
    max_requests_per_connection: int = Field(default=1000, gt=0)
    idle_timeout: float = Field(default=60.0, gt=0)
    block_page: str | None = None  # a template file; None: DEFAULT_BLOCK_PAGE
    skip_content_types: StrTuple = ()
    max_body_size: Size | None = None  # None: [limits] max_scan_size
    trickle: TrickleSettings = TrickleSettings()

    @field_validator("skip_content_types")
    @classmethod
    def _lower(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(p.lower() for p in patterns)


class IcapServer:
    """One listening ICAP socket; ``describe()`` and ``aclose()`` for ``avgate serve``."""

    def __init__(self, gateway: Gateway, settings: IcapSettings,
                 options: ListenOptions) -> None:
        self.gateway = gateway
        self._started_with = settings  # only while a reload has removed [icap]
        self.options = options
        self.address: Address = settings.listen.resolve(options.base_dir)
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start()
        #: connections being served (``idle``: waiting for their next request)
        self._conns: set[_Conn] = set()
        self._closing = False
        self._istag_src = ""
        self._istag = ""
        #: encoded answers that are constant per ISTag (the 204), keyed by (ISTag, last)
        self._constant: dict[tuple[str, bool], bytes] = {}
        self._page: tuple[IcapSettings | None, str] = (None, DEFAULT_BLOCK_PAGE)

    @property
    def settings(self) -> IcapSettings:
        """``[icap]`` of the config in use now."""
        return self.gateway.config.icap or self._started_with

    def block_page(self, settings: IcapSettings) -> str:
        """The block page template of ``settings``: the file is read once per config (again
        after a reload); a file that cannot be read then keeps the previous page."""
        if self._page[0] is settings:
            return self._page[1]
        try:
            page = read_block_page(settings.block_page, self.gateway.config.base_dir)
        except ConfigError as exc:  # e.g. the block page file is gone
            log.warning("icap: keeping the previous block page: %s", exc)
            glog = self.gateway.log
            if glog is not None:
                glog.log({"event": "error", "frontend": "icap",
                          "error": f"keeping the previous block page: {exc}"}, level="warning")
            page = self._page[1]
        self._page = (settings, page)
        return page

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> IcapServer:
        s = self.settings
        # a block page that cannot be read stops the start (ConfigError)
        self._page = (s, read_block_page(s.block_page, self.gateway.config.base_dir))
        sock = bind(self.address, what="icap listen", options=self.options)
        if not self.address.is_unix and self.address.port == 0:  # tests: a free port
            self.address = dataclasses.replace(self.address, port=sock.getsockname()[1])
        self._loop = loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Conn(self), sock=sock,
                                                backlog=DEFAULT_BACKLOG)
        return self

    @property
    def port(self) -> int:
        return self.address.port

    def describe(self) -> str:
        return f"icap://{self.address}/{self.settings.service}"

    async def aclose(self) -> None:
        """Stop accepting; close idle connections; let requests in flight finish (at most
        ``[serve] drain_timeout``)."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            if conn.idle:
                conn.cancel()
        busy = [c.task for c in self._conns if c.task is not None and not c.task.done()]
        if busy:
            await asyncio.wait(busy, timeout=self.options.drain_timeout)
        for conn in list(self._conns):
            conn.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            if self.address.is_unix:
                with contextlib.suppress(OSError):
                    os.unlink(self.address.path)

    # -- ISTag -------------------------------------------------------------------------
    def istag(self) -> str:
        """Quoted, ≤ 32 characters, changes whenever an engine's signatures change."""
        src = self.gateway.scanner.db_versions()
        if src != self._istag_src:
            digest = hashlib.sha256(f"{__version__}|{src}".encode()).hexdigest()[:30]
            self._istag, self._istag_src = f'"{digest}"', src
        return self._istag

    def _common(self) -> list[tuple[str, str]]:
        return [("ISTag", self.istag()), ("Service", f"avgate/{__version__}")]

    def no_content(self, last: bool) -> bytes:
        """The ``204 No Content`` answer (``Connection: close`` when ``last``): the same
        bytes for every request until the ISTag changes, so it is encoded once per ISTag."""
        istag = self.istag()
        head = self._constant.get((istag, last))
        if head is None:
            if len(self._constant) >= 8:  # old ISTags: a reload changed the signatures
                self._constant.clear()
            headers = [("ISTag", istag), ("Service", f"avgate/{__version__}")]
            if last:
                headers.append(("Connection", "close"))
            head = self._constant[istag, last] = proto.encode_response(204, headers)
        return head

class _Conn(asyncio.Protocol):
    """One client connection: an :class:`asyncio.Protocol` that feeds the sans-IO parser
    as bytes arrive, and a task that serves its requests in a row on that parser.

    No stream reader and no timer per read: the task waits on one future that
    ``data_received`` completes, and the idle deadline is one timer handle per connection,
    moved (not re-armed) while data keeps coming. Writes go straight to the transport;
    :meth:`_drain` waits only while the transport has paused writing.
    """

    def __init__(self, server: IcapServer) -> None:
        self.server = server
        self.s = server.settings
        self.gateway = server.gateway
        # the server's loop: asyncio.get_running_loop() costs a getpid() system call
        assert server._loop is not None  # (connections exist only after start())
        self.loop = server._loop
        self.parser = proto.IcapParser("server", max_header_size=self.s.max_header_size)
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.client = ""
        #: waiting for the next request (``aclose`` ends such connections at once)
        self.idle = True
        #: the answer to the request in progress has begun: an error can only close
        self.answered = False
        self._waiter: asyncio.Future[None] | None = None  # the task waits for bytes
        self._drainer: asyncio.Future[None] | None = None  # the task waits to write
        self._closed: asyncio.Future[None] | None = None  # the task waits for the close
        #: the wait for bytes in progress ends here (idle_timeout)
        self._deadline = Deadline(self.loop, self._idle_expired)
        self._eof = False  # the client shut its side (or the connection is gone)
        self._lost = False
        self._write_paused = False
        self._read_paused = False

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (asyncio's or uvloop's, which does not subclass asyncio.Transport)
        self.transport = transport = cast(asyncio.Transport, transport)
        server = self.server
        if len(server._conns) >= self.s.max_connections or server._closing:
            transport.write(proto.encode_response(
                503, [*server._common(), ("Connection", "close")]))
            transport.close()
            return
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if isinstance(peer, tuple) else ""
        server._conns.add(self)
        self.task = self.loop.create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        self.parser.receive_data(data)
        waiter = self._waiter
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(None)
        elif self.parser.buffered > _READ_AHEAD and self.transport is not None:
            # busy (scanning, or writing to a slow client): hold the client back; the next
            # wait for bytes reads on
            self.transport.pause_reading()
            self._read_paused = True

    def eof_received(self) -> bool:
        self._eof = True
        self._wake(self._waiter)
        return True  # keep our side open: the answer may still be written

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = self._lost = True
        self._deadline.cancel()
        self._wake(self._waiter, ConnectionResetError("connection lost"))
        self._wake(self._drainer, ConnectionResetError("connection lost"))
        self._wake(self._closed)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake(self._drainer)

    @staticmethod
    def _wake(fut: asyncio.Future[None] | None, exc: BaseException | None = None) -> None:
        if fut is not None and not fut.done():
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    # -- I/O for the task ------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def _drain(self) -> None:
        """Wait while the transport holds more than its high-water mark."""
        if self._lost:
            raise ConnectionResetError("connection lost")
        if self._write_paused:
            self._drainer = self.loop.create_future()
            try:
                await self._drainer
            finally:
                self._drainer = None

    async def _wait_data(self) -> None:
        """Wait for more bytes, at most ``idle_timeout`` (TimeoutError)."""
        loop = self.loop
        self._deadline.set(loop.time() + self.s.idle_timeout)
        if self._read_paused:
            self._read_paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        self._waiter = loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
            self._deadline.clear()

    def _idle_expired(self) -> None:
        self._wake(self._waiter, TimeoutError())

    async def _serve(self) -> None:
        try:
            await self.run()
        except asyncio.CancelledError:
            pass  # aclose() ends idle connections (and busy ones after the grace period)
        finally:
            self.server._conns.discard(self)
            self._deadline.cancel()
            transport = self.transport
            if transport is not None:
                transport.close()  # what is written still goes out first
                if transport.get_write_buffer_size() and not self._lost:
                    # like the stream writer's wait_closed: aclose() waits for the flush
                    self._closed = self.loop.create_future()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._closed, 5)

    async def run(self) -> None:
        served = 0
        try:
            while not self.server._closing:
                self.idle = True
                ev = await self._event(idle=True)
                if ev is None:
                    return
                self.idle = False
                if not isinstance(ev, proto.Request):
                    raise proto.IcapProtocolError(f"unexpected {type(ev).__name__}")
                self.s = self.server.settings  # per request: follows a reload
                self.answered = False
                served += 1
                last = (served >= self.s.max_requests_per_connection or not ev.keep_alive
                        or self.server._closing)
                keep = await self._request(ev, last)
                await self._drain()
                if not keep or last:
                    return
        except proto.IcapProtocolError as exc:
            await self._error(exc.status, str(exc))
        except TimeoutError:
            if not self.parser.idle:
                await self._error(408, "idle timeout in the middle of a request")
        except ConnectionError:
            pass
        except AvgateError as exc:  # spool failure (disk full, ...): nothing was scanned
            await self._error(500, str(exc))

    async def _event(self, idle: bool = False) -> proto.Event | None:
        """The next parser event, waiting for bytes as needed; None on a clean close
        between requests."""
        parser = self.parser
        while True:
            ev = parser.next_event()
            if ev is not proto.NEED_DATA:
                return ev  # type: ignore[return-value]
            if self._eof:
                if self._lost:
                    raise ConnectionResetError("connection lost")
                if parser.idle:
                    return None
                parser.receive_data(b"")  # the parser says where the message was cut
                ev = parser.next_event()
                if ev is not proto.NEED_DATA:
                    return ev  # type: ignore[return-value]
                raise ConnectionResetError("connection closed in the middle of a request")
            await self._wait_data()

    async def _rest_of_body(self, *, forward: bool) -> None:
        """Read the body's remaining chunks to its end, each sent back at once when
        ``forward`` (an accepted object streamed through), else dropped."""
        ev = await self._event()
        while isinstance(ev, proto.BodyChunk):
            if forward:
                self._write(proto.encode_chunk(ev.data))
                await self._drain()
            ev = await self._event()
        if not isinstance(ev, proto.BodyEnd):
            raise proto.IcapProtocolError(f"unexpected {type(ev).__name__} in body")

    async def _error(self, status: int, message: str) -> None:
        if self.answered:  # no ICAP error inside an answer: closing cuts it
            log.warning("icap: answer cut: %s", message[:200])
            return
        detail = message[:200].replace("\r", " ").replace("\n", " ")
        headers = [*self.server._common(), ("Connection", "close"), ("X-Avgate-Error", detail)]
        with contextlib.suppress(Exception):
            self._write(proto.encode_response(status, headers))
            await self._drain()

    # -- requests ----------------------------------------------------------------------
    async def _request(self, req: proto.Request, last: bool) -> bool:
        """Serve one request; False when the connection must be closed."""
        glog = self.gateway.log
        if glog is not None and glog.debug_enabled:  # the request head only: no URLs' bodies
            glog.debug({"event": "icap_request", "frontend": "icap", "method": req.method[:20],
                        "service": req.service[:40], "body": req.body, "preview": req.preview,
                        "allow_204": "204" in req.headers.get("allow", "")})
        if req.method not in ("OPTIONS", "REQMOD", "RESPMOD"):
            await self._error(501, f"method {req.method[:20]} not implemented")
            return False
        if req.service != self.s.service:
            await self._error(404, f"no service {req.service[:40]!r} (try /{self.s.service})")
            return False
        if req.method == "OPTIONS":
            await self._drain_body(req)
            self._write(self._options(last))
            return True
        return await self._modify(req, last)

    def _options(self, last: bool) -> bytes:
        s = self.s
        headers = [("Methods", "RESPMOD, REQMOD"), *self.server._common(),
                   ("Max-Connections", str(s.max_connections)),
                   ("Options-TTL", str(s.options_ttl)), ("Allow", "204"),
                   ("Date", formatdate(usegmt=True))]
        if s.preview:
            headers += [("Preview", str(s.preview)), ("Transfer-Preview", "*")]
        if last:
            headers.append(("Connection", "close"))
        return proto.encode_response(200, headers)

    async def _drain_body(self, req: proto.Request) -> None:
        if not req.has_body:
            return
        while not isinstance(await self._event(), proto.BodyEnd):
            pass

    def _max_body_size(self) -> int:
        if self.s.max_body_size is not None:
            return self.s.max_body_size
        return int(self.gateway.config.limits.max_scan_size)

    async def _modify(self, req: proto.Request, last: bool) -> bool:
        http = req.res_hdr if req.method == "RESPMOD" else req.req_hdr
        claimed = claimed_type(http, self.s.skip_content_types)
        may_204 = req.allow_204
        body = _Body(self.gateway.new_spool(), self._max_body_size())
        spool = body.spool
        try:
            if req.has_body:
                in_preview = req.preview is not None
                declared = _declared_length(req)
                gate = self._gate(req, declared, may_204)
                # over max_body_size by its Content-Length: decided without reading the body
                over = declared if declared is not None and declared > body.limit else None
                if over is not None and not in_preview and not may_204:
                    await self._declared_too_large(req, body, over, last)
                    return True
                if gate is not None and not in_preview:
                    return await self._trickle(req, body, gate, claimed, last)
                ev = await self._spool_body(body)
                if isinstance(ev, proto.PreviewEnd) and not body.over:
                    if ev.ieof:
                        may_204 = True  # the whole object was in the preview
                        await self._event()  # the BodyEnd that follows
                    elif over is not None:
                        self.parser.skip_body()
                        await self._declared_too_large(req, body, over, last,
                                                       after_preview=True)
                        return True
                    elif claimed and media_agrees(claimed, body.head):
                        self.parser.skip_body()
                        self._log_skip(req, claimed)
                        self._write(self._no_content(last))
                        return True
                    else:
                        self._write(proto.CONTINUE)
                        self.parser.continue_body()
                        in_preview = False
                        if gate is not None:
                            return await self._trickle(req, body, gate, claimed, last)
                        ev = await self._spool_body(body)
                if body.over:
                    await self._too_large(req, body, in_preview, may_204, last)
                    return True
                if not isinstance(ev, proto.BodyEnd | proto.PreviewEnd):
                    raise proto.IcapProtocolError(f"unexpected {type(ev).__name__} in body")
            elif req.preview is not None:
                may_204 = True
            spool.finish()
            if not req.has_body:  # nothing to scan (a GET in REQMOD)
                await self._accept(req, spool, may_204, last)
                return True
            if claimed and media_agrees(claimed, body.head):
                self._log_skip(req, claimed)
                await self._accept(req, spool, may_204, last)
                return True
            ctx = Context(frontend="icap", listener="icap", client_addr=self.client,
                          size=spool.size)
            url = _url_of(req)
            outcome = await self.gateway.process(spool, ctx, ids={"url": url} if url else None,
                                                 defer_log=True)
            sent: _Sent | None = None
            try:
                sent = await self._answer(req, spool, outcome, may_204, last)
            finally:
                self._log_outcome(outcome, sent)
            return True
        finally:
            spool.close()

    # -- answering before the verdict ([icap.trickle]) --------------------------------------
    def _gate(self, req: proto.Request, declared: int | None, allow_204: bool
              ) -> Gate | None:
        """The trickle gate of a RESPMOD body that may be answered before its verdict; None
        when nothing of it could leave early (another method, trickling off, a body declared
        smaller than ``keep_back`` or ``min_size``) or when the client allows ``204``
        outside a preview (it keeps the whole body, so it does not stall, and 204 spares
        sending it back; Squid allows it only for bodies it can buffer whole). Such an object
        gets the usual answer after its verdict (a block page when infected)."""
        settings = self.s.trickle
        if (req.method != "RESPMOD" or not req.has_body or settings.mode == "off"
                or allow_204):
            return None
        gate = Gate(settings, declared, self.loop.time())
        return gate if gate.active else None

    async def _trickle(self, req: proto.Request, body: _Body, gate: Gate, claimed: str,
                       last: bool) -> bool:
        """Serve a RESPMOD body that ``gate`` lets out in part before its verdict.

        The answer starts with the first bytes that may leave: ``200`` with the HTTP headers
        unchanged, then the body as chunks, as ``gate`` allows, while it arrives and is
        scanned; clean: the rest and the last chunk. Anything else: the connection is closed
        without the last chunk, so the proxy aborts the transfer and the client is left with
        a truncated object (its Content-Length, sent unchanged, says so too). A body that
        ends before anything could leave gets the usual answer after the verdict (a block
        page when infected). False when the connection must be closed.
        """
        loop = self.loop
        window = None if gate.mode == "keep_back" else self.s.trickle.limit
        relay = Relay(self.gateway.new_spool(), window)
        stream = _Stream(req, relay)
        try:
            relay.add(body.spool.getvalue())  # the preview (bounded by [icap] preview)
            gate.received(relay.received)
            head = body.head
            overflow: bytes | None = None
            while True:
                ev = await self._event_until(gate.next_wakeup(loop.time()))
                if isinstance(ev, proto.BodyChunk):
                    stream.flowing = True
                    data = ev.data
                    if len(head) < SNIFF_BYTES:
                        head += data[:SNIFF_BYTES - len(head)]
                    room = body.limit - relay.received
                    if len(data) > room:
                        relay.add(data[:max(room, 0)])
                        overflow = data[max(room, 0):]
                        break
                    relay.add(data)
                    gate.received(len(data))
                elif isinstance(ev, proto.BodyEnd):
                    break
                elif ev is not None:
                    raise proto.IcapProtocolError(f"unexpected {type(ev).__name__} in body")
                await self._release(stream, gate.releasable(loop.time()), last)
            relay.spool.finish()
            if overflow is not None:
                return await self._trickle_too_large(stream, overflow, body.limit, last)
            if claimed and media_agrees(claimed, head):
                self._log_skip(req, claimed)
                if not stream.answered:
                    await self._accept(req, relay.spool, False, last)
                    return True
                await self._send_rest(stream)
                return True
            outcome = await self._trickle_verdict(stream, gate, last)
            stream.early = relay.sent
            if not stream.answered:  # nothing could leave before the verdict
                sent: _Sent | None = None
                try:
                    sent = await self._answer(req, relay.spool, outcome, False, last)
                finally:
                    self._log_outcome(outcome, sent)
                return True
            if outcome.decision.disposition is Disposition.ACCEPT:
                try:
                    await self._send_rest(stream)
                finally:
                    self._log_outcome(outcome, (200, None, False), early=stream.early)
                return True
            self._cut(stream, outcome)
            return False
        finally:
            relay.spool.close()

    async def _event_until(self, when: float | None) -> proto.Event | None:
        """The next parser event, or None when the loop clock reaches ``when`` first."""
        if when is None:
            return await self._event()
        try:
            async with asyncio.timeout_at(when) as cm:
                return await self._event()
        except TimeoutError:
            if cm.expired():  # not the idle timeout inside _event
                return None
            raise

    async def _release(self, stream: _Stream, upto: int, last: bool) -> None:
        """Send the body up to offset ``upto``; the first bytes start the answer (never
        before the client sent body data after ``100 Continue``: Squid 5.7 leaves an answer
        that arrives together with the ``100`` unread)."""
        if upto <= stream.relay.sent or not stream.flowing:
            return
        if not stream.answered:
            self._write(self._echo_head(stream.req, last))
            stream.answered = self.answered = True
        data = stream.relay.take(upto)
        if data:
            self._write(proto.encode_chunk(data))
        await self._drain()

    async def _send_rest(self, stream: _Stream) -> None:
        """Everything not sent yet (the spool is finished), then the last chunk."""
        for data in stream.relay.rest(SEND_CHUNK):
            self._write(proto.encode_chunk(data))
            await self._drain()
        self._write(proto.LAST_CHUNK)

    async def _trickle_verdict(self, stream: _Stream, gate: Gate, last: bool) -> Outcome:
        """Scan; meanwhile go on trickling. No verdict within ``patience``: an error result
        that the policy decides on (by default tempfail: a 503 page, or the transfer is cut
        when the answer has begun)."""
        loop = self.loop
        spool = stream.relay.spool
        ctx = Context(frontend="icap", listener="icap", client_addr=self.client,
                      size=spool.size)
        url = _url_of(stream.req)
        stream.flowing = True  # the body is complete: the client has read the 100 long ago
        gate.complete(loop.time())
        task = asyncio.ensure_future(self.gateway.process(
            spool, ctx, ids={"url": url} if url else None, defer_log=True))
        try:
            while not task.done():
                now = loop.time()
                if now >= gate.deadline:
                    break
                wake = gate.next_wakeup(now)
                until = gate.deadline if wake is None else min(wake, gate.deadline)
                await asyncio.wait([task], timeout=until - now)
                if not task.done():
                    await self._release(stream, gate.releasable(loop.time()), last)
            if task.done():
                return task.result()
        finally:
            task.cancel()
        result = ScanResult(ScanStatus.ERROR, size=spool.size,
                            reason=f"no verdict within [icap.trickle] patience "
                                   f"({self.s.trickle.patience:g} s)")
        return self._decide_unscanned(stream.req, result)

    async def _trickle_too_large(self, stream: _Stream, overflow: bytes, limit: int,
                                 last: bool) -> bool:
        """Over ``max_body_size`` while streaming: unscanned, the policy decides. Passed: the
        rest streams through (the answer starts now if it had not). Refused: the transfer is
        cut, or, when nothing was sent yet, the refusal page once the body is read."""
        relay, req = stream.relay, stream.req
        result = ScanResult(
            ScanStatus.SKIPPED, size=relay.received + len(overflow), limit=LimitKind.SIZE,
            reason=f"size limit: body over max_body_size {limit} bytes, not scanned")
        outcome = self._decide_unscanned(req, result)
        accept = outcome.decision.disposition is Disposition.ACCEPT
        stream.early = relay.sent
        if not accept and stream.answered:
            self._cut(stream, outcome)
            return False
        sent: _Sent | None = None
        try:
            if accept and not stream.answered:
                self._write(self._echo_head(req, last))
                stream.answered = self.answered = True
            for data in relay.rest(SEND_CHUNK) if accept else ():
                self._write(proto.encode_chunk(data))
                await self._drain()
            if accept:
                self._write(proto.encode_chunk(overflow))
            await self._rest_of_body(forward=accept)
            if accept:
                self._write(proto.LAST_CHUNK)
                sent = (200, None, False)
            else:
                sent = await self._answer(req, relay.spool, outcome, False, last)
        finally:
            self._log_outcome(outcome, sent, early=stream.early if accept else None)
        return True

    def _cut(self, stream: _Stream, outcome: Outcome) -> None:
        """Refused after the answer began: the caller closes the connection without the last
        chunk; logged (scan log: actions ``cut``, ``early_bytes``; and a warning)."""
        result = outcome.result
        what = result.virus or result.reason or result.status.value
        log.warning("icap: %s: %s after %d of %d bytes were sent, transfer cut",
                    _url_of(stream.req) or "response", what, stream.relay.sent,
                    stream.relay.received)
        self._log_outcome(outcome, (200, None, False), early=stream.early, cut=True)

    async def _spool_body(self, body: _Body) -> proto.Event:
        """Body chunks into ``body`` until another event (returned), or until the chunk
        that crosses ``max_body_size`` (returned; its tail is ``body.overflow``)."""
        ev = await self._event()
        while isinstance(ev, proto.BodyChunk):
            if not body.add(ev.data):
                return ev
            ev = await self._event()
        assert ev is not None
        return ev

    async def _declared_too_large(self, req: proto.Request, body: _Body, declared: int,
                                  last: bool, after_preview: bool = False) -> None:
        """The response declares a length over ``max_body_size``: it will not be scanned, so
        the policy decides at once, before the body is read (a proxy that waits for an early
        answer, like Squid 5.7, never stalls on it). Passed: ``204`` after a preview, else
        the object streams back as it arrives; refused: the refusal page at once (the rest of
        the body is read and dropped)."""
        result = ScanResult(
            ScanStatus.SKIPPED, size=declared, limit=LimitKind.SIZE,
            reason=f"size limit: Content-Length {declared} over max_body_size {body.limit} bytes, "
                   "not scanned")
        outcome = self._decide_unscanned(req, result)
        accept = outcome.decision.disposition is Disposition.ACCEPT
        sent: _Sent | None = None
        try:
            if after_preview:
                if accept:
                    self._write(self._no_content(last))
                    sent = 204, None, False
                else:
                    sent = await self._answer(req, body.spool, outcome, True, last)
                return
            self.answered = True  # from here an error can only close the connection
            if accept:
                self._write(self._echo_head(req, last))
            else:
                sent = await self._answer(req, body.spool, outcome, False, last)
            await self._rest_of_body(forward=accept)
            if accept:
                self._write(proto.LAST_CHUNK)
                sent = (200, None, False)
        finally:
            self._log_outcome(outcome, sent)

    async def _too_large(self, req: proto.Request, body: _Body, in_preview: bool,
                         may_204: bool, last: bool) -> None:
        """The body is over ``max_body_size``: not scanned; the policy decides on a
        ``skipped`` (size) result; the rest of the body is dropped or streamed back."""
        assert body.overflow is not None
        seen = body.spool.size + len(body.overflow)
        result = ScanResult(
            ScanStatus.SKIPPED, size=seen, limit=LimitKind.SIZE,
            reason=f"size limit: body over max_body_size {body.limit} bytes, not scanned")
        outcome = self._decide_unscanned(req, result)
        sent: _Sent | None = None
        try:
            sent = await self._answer_too_large(req, body, outcome, in_preview, may_204, last)
        finally:
            self._log_outcome(outcome, sent)

    async def _answer_too_large(self, req: proto.Request, body: _Body, outcome: Outcome,
                                in_preview: bool, may_204: bool, last: bool) -> _Sent:
        accept = outcome.decision.disposition is Disposition.ACCEPT
        if in_preview:
            # answer after the preview, without 100 Continue: nothing to echo
            ev = await self._event()
            while isinstance(ev, proto.BodyChunk):
                ev = await self._event()
            if not isinstance(ev, proto.PreviewEnd):
                raise proto.IcapProtocolError(f"unexpected {type(ev).__name__} in preview")
            if ev.ieof:
                await self._event()  # the BodyEnd that follows
            else:
                self.parser.skip_body()
            if accept:
                self._write(self._no_content(last))
                return 204, None, False
            return await self._answer(req, body.spool, outcome, True, last)
        if accept and not may_204:
            await self._stream_back(req, body, last)
            return 200, None, False
        ev = await self._event()
        while isinstance(ev, proto.BodyChunk):  # read and drop
            ev = await self._event()
        if not isinstance(ev, proto.BodyEnd):
            raise proto.IcapProtocolError(f"unexpected {type(ev).__name__} in body")
        if accept:
            self._write(self._no_content(last))
            return 204, None, False
        return await self._answer(req, body.spool, outcome, may_204, last)

    async def _stream_back(self, req: proto.Request, body: _Body, last: bool) -> None:
        """Echo an object passed unscanned: the kept bytes, then the rest as it arrives."""
        assert body.overflow is not None
        body.spool.finish()  # flushes the temp file before it is read back
        self._write(self._echo_head(req, last))
        self.answered = True
        for chunk in body.spool.chunks(SEND_CHUNK):
            self._write(proto.encode_chunk(chunk))
            await self._drain()
        self._write(proto.encode_chunk(body.overflow))
        ev = await self._event()
        while isinstance(ev, proto.BodyChunk):
            self._write(proto.encode_chunk(ev.data))
            await self._drain()
            ev = await self._event()
        if not isinstance(ev, proto.BodyEnd):
            raise proto.IcapProtocolError(f"unexpected {type(ev).__name__} in body")
        self._write(proto.LAST_CHUNK)

    def _decide_unscanned(self, req: proto.Request, result: ScanResult) -> Outcome:
        """Policy for an object that was not scanned (over max_body_size); its scan-log
        line is written by ``_log_outcome`` once the answer is sent."""
        from ..gateway import Outcome

        ctx = Context(frontend="icap", listener="icap", client_addr=self.client,
                      size=result.size)
        decision = self.gateway.policy.decide(result, ctx)
        if decision.quarantine:
            # the object was not kept whole: there is nothing to quarantine, and a rule
            # that wants a copy must not get a delivery without one
            decision = Decision(Disposition.REJECT,
                                "552 5.3.4 Object over max_body_size cannot be quarantined",
                                rule=f"{decision.rule}+quarantine-impossible",
                                refid=decision.refid)
        url = _url_of(req)
        record_scan("icap", result)
        event = scan_event(result, frontend="icap", listener="icap",
                           ids={"url": url} if url else None, rule=decision.rule,
                           actions=decision.actions, refid=decision.refid)
        return Outcome(result, decision, event=event)

    def _log_outcome(self, outcome: Outcome, sent: _Sent | None, *, early: int | None = None,
                     cut: bool = False) -> None:
        """The scan-log line in ICAP's terms: what was done (the disposition; ICAP neither
        tags nor rewrites here), the ICAP status, the HTTP status of a page sent instead of
        the object, and whether that page was the virus block page. ``sent`` None: the
        client went away before the answer was written. Answered before the verdict:
        ``early_bytes`` went out before it; ``cut``: the transfer was then cut."""
        d = outcome.decision
        done = [d.disposition.value]
        if outcome.quarantine_id:
            done.append("quarantine")
        if d.shadow:
            done.append("shadow")
        if cut:
            done.append("cut")
        icap_status, http_status, block_page = sent if sent is not None else (None, None, False)
        self.gateway.log_outcome(outcome, actions=done, icap_status=icap_status,
                                 http_status=http_status, block_page=block_page,
                                 answered=sent is not None, early_bytes=early,
                                 cut=cut or None)

    def _log_skip(self, req: proto.Request, media: str) -> None:
        log = self.gateway.log
        if log is not None:
            log.log({"event": "icap-skip", "frontend": "icap", "url": _url_of(req),
                     "reason": f"content type {media} in skip_content_types, "
                               "signature matches"})

    def _no_content(self, last: bool) -> bytes:
        return self.server.no_content(last)

    async def _answer(self, req: proto.Request, spool: Spool, outcome: Outcome,
                      may_204: bool, last: bool) -> _Sent:
        """Answer the decision; (ICAP status, HTTP status of the page sent or None, whether
        it was the block page)."""
        result, decision = outcome.result, outcome.decision
        if decision.disposition is Disposition.ACCEPT:
            return await self._accept(req, spool, may_204, last), None, False
        url = _url_of(req)
        extra: list[tuple[str, str]] = []
        if result.status is ScanStatus.INFECTED:
            virus = result.virus or "unknown"
            safe = virus.replace(";", "_")
            extra = [("X-Infection-Found", f"Type=0; Resolution=2; Threat={safe};"),
                     ("X-Virus-ID", safe)]
            status, body = 403, render(self.server.block_page(self.s), virus=virus, url=url)
        elif decision.disposition is Disposition.TEMPFAIL:
            status = 503
            body = render(UNAVAILABLE_PAGE, url=url,
                          reason=result.reason or decision.text or result.status.value)
        else:
            status = 403
            body = render(REFUSED_PAGE, url=url,
                          reason=decision.text or result.reason or result.status.value)
        http_headers = [("Content-Type", "text/html; charset=utf-8"),
                        ("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
        if status == 503:
            http_headers.append(("Retry-After", "60"))
        headers = self.server._common() + extra
        if last:
            headers.append(("Connection", "close"))
        res_hdr = proto.encode_http_response(status, http_headers)
        self._write(proto.encode_response(200, headers, res_hdr=res_hdr, body="res-body")
                          + proto.encode_body(body))
        return 200, status, bool(extra)

    async def _accept(self, req: proto.Request, spool: Spool, may_204: bool,
                      last: bool) -> int:
        """Pass the object: 204, or 200 echoing it; the ICAP status sent."""
        if may_204:
            self._write(self._no_content(last))
            return 204
        head = self._echo_head(req, last)
        if not req.has_body:
            self._write(head)
            return 200
        if spool.size <= SEND_CHUNK:
            self._write(head + proto.encode_body(spool.getvalue()))
            return 200
        self._write(head)
        for chunk in spool.chunks(SEND_CHUNK):
            self._write(proto.encode_chunk(chunk))
            await self._drain()
        self._write(proto.LAST_CHUNK)
        return 200


    def _echo_head(self, req: proto.Request, last: bool) -> bytes:
        """ICAP 200 head echoing the HTTP headers unmodified (the body follows)."""
        headers = self.server._common()
        if last:
            headers.append(("Connection", "close"))
        if req.method == "RESPMOD":
            return proto.encode_response(200, headers, res_hdr=req.res_hdr, body=req.body)
        return proto.encode_response(200, headers, req_hdr=req.req_hdr, body=req.body)


#: what an answer sent: ICAP status, HTTP status of a page sent instead of the object (None
#: when the object passed), whether that page was the virus block page
_Sent = tuple[int, int | None, bool]


class _Stream:
    """A RESPMOD answered (or to be answered) before its verdict."""

    __slots__ = ("answered", "early", "flowing", "relay", "req")

    def __init__(self, req: proto.Request, relay: Relay) -> None:
        self.req = req
        self.relay = relay
        self.answered = False  # the 200 head went out: only a cut can refuse it now
        self.flowing = False  # body data came after the preview (the 100 was read)
        self.early = 0  # body bytes sent before the verdict


class _Body:
    """The body of one request as it is received: spooled up to ``limit`` bytes."""

    __slots__ = ("head", "limit", "overflow", "spool")

    def __init__(self, spool: Spool, limit: int) -> None:
        self.spool = spool
        self.limit = limit
        self.head = b""  # the first SNIFF_BYTES, for skip_content_types
        self.overflow: bytes | None = None  # the part of the crossing chunk past the limit

    @property
    def over(self) -> bool:
        return self.overflow is not None

    def add(self, data: bytes) -> bool:
        """Spool ``data``; False (and nothing more kept) once it crosses the limit."""
        if len(self.head) < SNIFF_BYTES:
            self.head += data[:SNIFF_BYTES - len(self.head)]
        room = self.limit - self.spool.size
        if len(data) <= room:
            self.spool.write(data)
            return True
        if room > 0:
            self.spool.write(memoryview(data)[:room])
        self.overflow = data[max(room, 0):]
        return False


def _declared_length(req: proto.Request) -> int | None:
    """The Content-Length of a RESPMOD's encapsulated response; None when there is none or
    it is not a number."""
    if req.method != "RESPMOD" or not req.res_hdr:
        return None
    try:
        value = proto.HttpHead.parse(req.res_hdr).headers.get("content-length").strip()
    except proto.IcapProtocolError:
        return None
    # (isascii: str.isdigit() also takes "²", which int() refuses)
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 18 else None


def _url_of(req: proto.Request) -> str:
    """The request target of the encapsulated HTTP request ("" when there is none): only
    its start line is read (the URL is for the scan log; the headers are not needed)."""
    if not req.req_hdr:
        return ""
    return proto.request_target(req.req_hdr.split(b"\r\n", 1)[0].decode("latin-1"))


async def start(gateway: Gateway, options: ListenOptions) -> list[Listener]:
    """Start the ``[icap]`` listener of ``gateway.config`` (none in a serve worker that does
    not own the unix sockets)."""
    settings = gateway.config.icap or IcapSettings()
    if settings.listen.is_unix and not options.unix_sockets:
        return []
    return [await IcapServer(gateway, settings, options).start()]
