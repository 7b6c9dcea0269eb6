"""The proxy itself: client connections (h11 server side) and the scan of every body.

One :class:`ProxyServer` per listening socket; one :class:`_Client` per client connection,
a loop of requests on one ``h11.Connection``. Per request:

1. the head (``header_timeout`` from its first byte, ``max_header_size``,
   ``max_request_line``; ``Content-Length`` together with ``Transfer-Encoding`` is refused
   with 400, the connection closed) and its target (absolute ``http://`` URL, or CONNECT
   ``host:port``; the loop checks: our own ``Via`` pseudonym in ``Via``, or a target that is
   this listener → 508);
2. who may go where: a client outside ``allowed_clients`` is refused at connect time, a
   remote client may not reach loopback destinations (the gateway's own services), then
   the ACLs (:mod:`.acl`): deny → 403; a CONNECT is tunnelled or refused;
3. a request body (upload) is spooled and scanned before anything is forwarded: refused →
   403 and the origin never sees the request;
4. the request goes upstream (direct or through ``parent``), the response body is spooled
   (up to ``[limits] max_scan_size``) and scanned; while it arrives, ``[http_proxy.trickle]``
   decides how much may reach the client before the verdict (:mod:`avgate.trickle`; in
   every mode the last ``keep_back`` bytes wait for it).
   Accepted: the body, byte-identical. Refused before anything was sent: the block page
   (403 with the virus name), or 503 when the scanner failed. Refused after part of the
   body was sent (trickling): the client connection is cut, so the client never gets a
   complete object; the log says ``cut``.

Over ``max_scan_size`` the object is not scanned: a ``skipped`` result with a *size* limit
goes to the policy (default for the web: pass, logged) and the rest streams through.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import h11

from ...context import Context
from ...errors import AvgateError, ConfigError
from ...limits import KiB
from ...observability import record_scan, scan_event
from ...policy import Decision, Disposition
from ...result import LimitKind, ScanResult, ScanStatus
from ...trickle import Gate, Relay
from ..icap_pages import read_block_page
from ..listen import DEFAULT_BACKLOG, Address, Listener, ListenOptions, bind
from . import pages
from .acl import SNIFF_BYTES, Acl, Request, Subject, compile_acls, first_match
from .headers import (
    ProxyTarget,
    TargetError,
    check_head,
    content_length,
    forward_headers,
    header,
    is_loopback,
    media_type,
    via_loop,
)
from .settings import HttpProxySettings, parse_parent
from .upstream import Pool, Upstream, UpstreamError

if TYPE_CHECKING:
    from ...gateway import Gateway, Outcome
    from ...spool import Spool

log = logging.getLogger("avgate.http_proxy")

__all__ = ["ProxyServer", "start"]

READ_SIZE = 64 * KiB
SEND_CHUNK = 64 * KiB
Headers = list[tuple[bytes, bytes]]


class _Close(Exception):
    """End the client connection now (the answer, if any, was written)."""


@dataclass
class _Exchange:
    """One request/response, for the access log."""

    client: str
    method: str
    url: str = ""
    status: int = 0
    bytes: int = 0
    verdict: str = ""
    acl: str = ""
    started: float = dataclasses.field(default_factory=time.perf_counter)
    cut: bool = False


class ProxyServer:
    """One listening proxy socket; ``describe()`` and ``aclose()`` for ``avgate serve``."""

    def __init__(self, gateway: Gateway, settings: HttpProxySettings,
                 options: ListenOptions) -> None:
        self.gateway = gateway
        self._started_with = settings
        self.options = options
        self.address: Address = settings.listen.resolve(options.base_dir)
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[Any]] = set()
        self._busy: set[asyncio.Task[Any]] = set()
        self._closing = False
        self.pool = Pool()  # idle upstream connections, shared by every client
        self._acls: tuple[HttpProxySettings | None, tuple[Acl, ...]] = (None, ())
        self._page: tuple[HttpProxySettings | None, str] = (None, pages.DEFAULT_BLOCK_PAGE)
        self._allowed: tuple[HttpProxySettings | None,
                             tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]] = (None, ())
        self.via = settings.via or _hostname()

    @property
    def settings(self) -> HttpProxySettings:
        """``[http_proxy]`` of the config in use now (follows a reload)."""
        current = self.gateway.config.http_proxy
        return current if isinstance(current, HttpProxySettings) else self._started_with

    def acls(self, settings: HttpProxySettings) -> tuple[Acl, ...]:
        if self._acls[0] is not settings:
            self._acls = (settings, compile_acls(settings.acl))
        return self._acls[1]

    def block_page(self, settings: HttpProxySettings) -> str:
        if self._page[0] is settings:
            return self._page[1]
        try:
            page = read_block_page(settings.block_page, self.gateway.config.base_dir)
        except ConfigError as exc:
            log.warning("http_proxy: keeping the previous block page: %s", exc)
            page = self._page[1]
        self._page = (settings, page)
        return page

    async def start(self) -> ProxyServer:
        s = self.settings
        self._page = (s, read_block_page(s.block_page, self.gateway.config.base_dir))
        sock = bind(self.address, what="http_proxy listen", options=self.options)
        if not self.address.is_unix and self.address.port == 0:  # tests: a free port
            self.address = dataclasses.replace(self.address, port=sock.getsockname()[1])
        self._server = await asyncio.start_server(self._connection, sock=sock,
                                                  backlog=DEFAULT_BACKLOG, limit=READ_SIZE)
        return self

    @property
    def port(self) -> int:
        return self.address.port

    def describe(self) -> str:
        return f"http://{self.address} (HTTP proxy)"

    async def aclose(self) -> None:
        """Stop accepting; close idle connections; let requests in flight finish (at most
        ``[serve] drain_timeout``)."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task in self._clients - self._busy:
            task.cancel()
        busy = [t for t in self._busy if not t.done()]
        if busy:
            await asyncio.wait(busy, timeout=self.options.drain_timeout)
        for task in list(self._clients):
            task.cancel()
        self.pool.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        s = self.settings
        if len(self._clients) >= s.max_connections or self._closing:
            writer.write(_raw_response(503, "too many connections to the proxy"))
            await _close(writer)
            return
        peer = writer.get_extra_info("peername")
        client = peer[0] if isinstance(peer, tuple) else ""
        if not self.client_allowed(s, client):
            writer.write(_raw_response(403, "this client may not use the proxy"))
            await _close(writer)
            glog = self.gateway.log
            if glog is not None:
                glog.log({"event": "access", "frontend": "http_proxy", "client": client,
                          "method": "-", "url": "", "status": 403, "bytes": 0,
                          "verdict": "refused", "error": "client not in allowed_clients"})
            return
        self._clients.add(task)
        conn = _Client(self, reader, writer, client, task)
        try:
            await conn.run()
        except asyncio.CancelledError:
            pass
        finally:
            self._clients.discard(task)
            self._busy.discard(task)
            await _close(writer)

    def client_allowed(self, settings: HttpProxySettings, client: str) -> bool:
        """Whether ``client`` is in ``allowed_clients`` (always, when that is empty)."""
        if not settings.allowed_clients:
            return True
        if self._allowed[0] is not settings:
            self._allowed = (settings, tuple(ipaddress.ip_network(n, strict=False)
                                             for n in settings.allowed_clients))
        try:
            ip = ipaddress.ip_address(client)
        except ValueError:
            return False
        mapped = getattr(ip, "ipv4_mapped", None)
        return any(ip in n or (mapped is not None and mapped in n) for n in self._allowed[1])

    def is_self(self, target: ProxyTarget) -> bool:
        """Whether ``target`` is this listener (a request the proxy would send to itself)."""
        if self.address.is_unix or target.port != self.address.port:
            return False
        if target.host in ("localhost", self.address.host.lower(), _hostname().lower()):
            return True
        try:
            infos = socket.getaddrinfo(target.host, None, type=socket.SOCK_STREAM,
                                       flags=socket.AI_NUMERICHOST)
        except socket.gaierror:
            return False
        ip = ipaddress.ip_address(infos[0][4][0])
        return ip.is_loopback or ip.is_unspecified or str(ip) == self.address.host


class _Client:
    """One client connection."""

    def __init__(self, server: ProxyServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, client: str, task: asyncio.Task[Any]) -> None:
        self.server = server
        self.gateway = server.gateway
        self.s = server.settings
        self.reader = reader
        self.writer = writer
        self.client = client
        self.task = task
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.s.max_header_size)
        self._pending_head: h11.Response | None = None  # trickling: sent with the first byte

    # -- the request loop ----------------------------------------------------------------
    async def run(self) -> None:
        served = 0
        try:
            while not self.server._closing:
                req = await self._read_head()
                if req is None:
                    return
                self.server._busy.add(self.task)
                self.s = self.server.settings  # per request: follows a reload
                served += 1
                ex = _Exchange(self.client, req.method.decode("ascii", "replace"),
                               req.target.decode("ascii", "replace"))
                try:
                    await self._request(req, ex)
                except _Close:
                    return
                except AvgateError as exc:  # spool failure (disk full, ...): nothing scanned
                    log.warning("http_proxy: %s", exc)
                    if self.conn.our_state is h11.SEND_RESPONSE:
                        ex.status, ex.verdict = 500, "error"
                        await self._page_raw(500, ex.url, str(exc))
                    return
                finally:
                    self._access_log(ex)
                    self.server._busy.discard(self.task)
                if (self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE
                        or served >= self.s.max_requests_per_connection):
                    return
                self.conn.start_next_cycle()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except h11.LocalProtocolError as exc:  # a bug of ours or a client gone mid-answer
            log.debug("http_proxy: %s", exc)

    async def _read(self, seconds: float) -> bytes:
        async with asyncio.timeout(seconds):
            return await self.reader.read(READ_SIZE)

    async def _read_head(self) -> h11.Request | None:
        """The next request head; None when the client closed (or was answered and must
        be closed)."""
        deadline: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._log_refused(exc.error_status_hint, str(exc))
                await self._page_raw(exc.error_status_hint, "", str(exc))
                return None
            if isinstance(event, h11.Request):
                return event
            if event is not h11.NEED_DATA:
                return None  # ConnectionClosed
            if deadline is None:
                timeout = self.s.idle_timeout
            else:
                timeout = deadline - loop.time()
            try:
                data = await self._read(max(timeout, 0.001))
            except TimeoutError:
                if deadline is not None:
                    self._log_refused(408, "request head not complete within header_timeout")
                    await self._page_raw(408, "", "the request head did not arrive in time")
                return None
            if deadline is None:
                deadline = loop.time() + self.s.header_timeout
            self.conn.receive_data(data)

    async def _request(self, req: h11.Request, ex: _Exchange) -> None:
        s = self.s
        headers: Headers = list(req.headers.raw_items())
        try:
            target = check_head(req.method, req.target, headers,
                                max_request_line=s.max_request_line,
                                max_header_size=s.max_header_size)
        except TargetError as exc:
            await self._fail(ex, exc.status, str(exc))
        ex.url = target.url
        if via_loop(headers, self.server.via) or self.server.is_self(target):
            await self._fail(ex, 508, "the request came back to this proxy (forwarding loop)")
        if is_loopback(target.host) and not is_loopback(self.client):
            # the gateway's own loopback services (HTTP API, clamd listener...) are not for
            # the clients a LAN-facing proxy serves
            await self._fail(ex, 403, "a remote client may not reach this machine's loopback "
                                      "addresses through the proxy", page="refused")
        info = Request(self.client, ex.method, target.host, target.port, target.url)
        acls = self.server.acls(s)
        if req.method == b"CONNECT":
            await self._connect(req, target, info, acls, ex)
            return
        acl = first_match(acls, info, None)
        if acl is not None and acl.action == "deny":
            ex.acl = acl.name
            await self._fail(ex, 403, f"denied by ACL {acl.name or '(unnamed)'}", page="refused")
        upload = await self._upload(req, headers, info, acls, ex)
        try:
            await self._forward(req, headers, target, info, acl, acls, upload, ex)
        finally:
            if upload is not None:
                upload.spool.close()

    # -- answers -------------------------------------------------------------------------
    async def _fail(self, ex: _Exchange, status: int, detail: str, *,
                    page: str = "error") -> NoReturn:
        """Answer ``status`` with a page and end the connection (raises :class:`_Close`)."""
        ex.status = status
        ex.verdict = ex.verdict or "refused"
        body = (pages.render(pages.REFUSED_PAGE, url=ex.url, reason=detail) if page == "refused"
                else pages.error_page(status, ex.url, detail))
        await self._send_page(status, body)
        ex.bytes = len(body)
        raise _Close

    async def _send_page(self, status: int, body: bytes, *, close: bool = True) -> None:
        headers = [("Content-Type", "text/html; charset=utf-8"),
                   ("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
        if close:
            headers.append(("Connection", "close"))
        if status == 503:
            headers.append(("Retry-After", "60"))
        if self.conn.our_state is not h11.SEND_RESPONSE:
            self.writer.write(_raw_response(status, "", body))
        else:
            self._send(h11.Response(status_code=status, headers=headers,
                                    reason=pages.REASONS.get(status, "Error").encode()))
            self._send(h11.Data(data=body))
            self._send(h11.EndOfMessage())
        await self._drain()

    async def _page_raw(self, status: int, url: str, detail: str) -> None:
        with contextlib.suppress(Exception):
            await self._send_page(status, pages.error_page(status, url, detail))

    def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            self.writer.write(data)

    async def _drain(self) -> None:
        try:
            async with asyncio.timeout(self.s.idle_timeout):
                await self.writer.drain()
        except TimeoutError:
            raise _Close from None  # the client does not read

    async def _refuse_download(self, outcome: Outcome, ex: _Exchange, resp: h11.Response,
                               started: bool, *, close: bool) -> None:
        """A refused download: cut when part of it already went out, else the block page
        (then the connection closes with ``close``; a cut always closes it)."""
        if started:
            self._log_scan(outcome, ex, status=resp.status_code, what="download", action="cut")
            self._cut(ex)
            raise _Close
        status, page = self._refusal(outcome, ex.url)
        ex.status, ex.bytes = status, len(page)
        self._log_scan(outcome, ex, status=status, what="download", action="block")
        await self._send_page(status, page, close=close)
        if close:
            raise _Close

    def _cut(self, ex: _Exchange) -> None:
        """End the connection before the body is complete (the client must see an error,
        never a complete object)."""
        ex.cut = True
        with contextlib.suppress(Exception):
            self.writer.transport.abort()

    # -- request bodies (uploads) --------------------------------------------------------
    async def _client_event(self) -> h11.Event:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _BadRequest(exc.error_status_hint, str(exc)) from None
            if event is not h11.NEED_DATA:
                assert isinstance(event, h11.Event)
                return event
            try:
                data = await self._read(self.s.idle_timeout)
            except TimeoutError:
                raise _BadRequest(408, "request body stalled") from None
            self.conn.receive_data(data)

    async def _upload(self, req: h11.Request, headers: Headers, info: Request,
                      acls: tuple[Acl, ...], ex: _Exchange) -> _Upload | None:
        """Read, spool and (by the ACLs) scan the request body; None when there is none.
        A refused upload is answered here (nothing is forwarded)."""
        if self.conn.they_are_waiting_for_100_continue:
            self._send(h11.InformationalResponse(status_code=100, headers=[]))
        limit = int(self.gateway.config.limits.max_scan_size)
        spool = self.gateway.new_spool()
        overflow: bytes | None = None
        head = b""
        try:
            try:
                event = await self._client_event()
                while isinstance(event, h11.Data):
                    if len(head) < SNIFF_BYTES:
                        head += bytes(event.data[:SNIFF_BYTES - len(head)])
                    room = limit - spool.size
                    if len(event.data) > room:
                        spool.write(event.data[:max(room, 0)])
                        overflow = bytes(event.data[max(room, 0):])
                        break
                    spool.write(event.data)
                    event = await self._client_event()
            except _BadRequest as exc:
                await self._fail(ex, exc.status, str(exc))
            declared = content_length(headers)
            chunked = header(headers, b"transfer-encoding") is not None
            if overflow is None and spool.size == 0 and not declared and not chunked:
                spool.close()
                return None
            spool.finish()
            up = _Upload(spool, overflow, declared)
            obj = Subject(media_type(headers), head,
                          declared if declared is not None else
                          (None if overflow is not None else spool.size))
            acl = first_match(acls, info, obj)
            assert acl is not None
            ex.acl = acl.name
            if acl.action == "deny":
                await self._fail(ex, 403, f"upload denied by ACL {acl.name or '(unnamed)'}",
                                 page="refused")
            if acl.action == "pass":
                return up
            if overflow is not None:
                result = ScanResult(ScanStatus.SKIPPED, size=spool.size + len(overflow),
                                    limit=LimitKind.SIZE,
                                    reason=f"size limit: upload over max_scan_size {limit} "
                                           "bytes, not scanned")
                outcome = self._decide_unscanned(result, ex, "outbound")
            else:
                ctx = Context(frontend="http_proxy", listener="http_proxy",
                              client_addr=self.client, size=spool.size, direction="outbound")
                outcome = await self.gateway.process(spool, ctx, ids={"url": ex.url},
                                                     defer_log=True)
            if self._accepted(outcome, acl):
                self._log_scan(outcome, ex, status=None, what="upload", action="accept")
                return up
            status, body = self._refusal(outcome, ex.url)
            ex.status, ex.verdict, ex.bytes = status, _verdict(outcome), len(body)
            self._log_scan(outcome, ex, status=status, what="upload", action="block")
            await self._send_page(status, body)
            raise _Close
        except BaseException:
            spool.close()
            raise

    # -- forwarding ----------------------------------------------------------------------
    async def _upstream(self, target: ProxyTarget, *,
                        fresh: bool = False) -> tuple[Upstream, bool]:
        """A connection for ``target`` (the parent's when one is set): an idle one from
        the listener's pool (True) unless ``fresh``, or a new one (False)."""
        s = self.s
        host, port = parse_parent(s.parent) if s.parent else (target.host, target.port)
        up = None if fresh else self.server.pool.get(host, port)
        if up is not None:
            up.read_timeout = s.read_timeout
            return up, True
        return await Upstream.open(host, port, connect_timeout=s.connect_timeout,
                                   read_timeout=s.read_timeout), False

    async def _forward(self, req: h11.Request, headers: Headers, target: ProxyTarget,
                       info: Request, acl: Acl | None, acls: tuple[Acl, ...],
                       upload: _Upload | None, ex: _Exchange) -> None:
        drop = frozenset({b"expect", b"content-length"})
        out = forward_headers(headers, via=self.server.via, version=_version(req),
                              host=target.authority, drop=drop)
        if upload is not None:
            if upload.overflow is None:
                out.append((b"content-length", str(upload.spool.size).encode()))
            elif upload.declared is not None:
                out.append((b"content-length", str(upload.declared).encode()))
            else:
                out.append((b"transfer-encoding", b"chunked"))
        path = target.url if self.s.parent else target.path
        up, event = await self._exchange(req, out, path, target, upload, ex)
        try:
            await self._response(req, event, up, info, acl, acls, ex)
        except UpstreamError as exc:
            up.abort()
            if self.conn.our_state is h11.SEND_RESPONSE:
                await self._fail(ex, exc.status, str(exc))
            self._cut(ex)
            ex.verdict = ex.verdict or "upstream-error"
            raise _Close from None
        except BaseException:
            up.abort()
            raise
        self.server.pool.put(up)  # kept alive for the next request to it, or closed

    async def _exchange(self, req: h11.Request, out: Headers, path: str, target: ProxyTarget,
                        upload: _Upload | None, ex: _Exchange) -> tuple[Upstream, h11.Response]:
        """Send the request upstream; the connection and the response head. A kept-alive
        connection the server closed meanwhile is replaced once."""
        for attempt in (1, 2):
            try:
                up, reused = await self._upstream(target, fresh=attempt == 2)
            except UpstreamError as exc:
                await self._fail(ex, exc.status, str(exc))
            try:
                up.send(h11.Request(method=req.method, target=path.encode("ascii"),
                                    headers=out))
                if upload is not None:
                    await self._send_upload(up, upload)
                up.send(h11.EndOfMessage())
                await up.drain()
                event = await up.next_event()
                while isinstance(event, h11.InformationalResponse):
                    event = await up.next_event()
            except UpstreamError as exc:
                await up.aclose()
                if reused and attempt == 1 and (upload is None or upload.overflow is None):
                    continue
                await self._fail(ex, exc.status, str(exc))
            except h11.LocalProtocolError as exc:
                await up.aclose()
                await self._fail(ex, 502, f"cannot forward the request: {exc}")
            if isinstance(event, h11.Response):
                return up, event
            await up.aclose()
            if reused and attempt == 1:
                continue
            await self._fail(ex, 502, "upstream closed without an answer")
        raise AssertionError("unreachable")

    async def _send_upload(self, up: Upstream, upload: _Upload) -> None:
        for chunk in upload.spool.chunks(SEND_CHUNK):
            up.send(h11.Data(data=chunk))
            await up.drain()
        if upload.overflow is None:
            return
        # passed over max_scan_size: the rest streams from the client as it arrives
        up.send(h11.Data(data=upload.overflow))
        try:
            event = await self._client_event()
            while isinstance(event, h11.Data):
                up.send(h11.Data(data=event.data))
                await up.drain()
                event = await self._client_event()
        except _BadRequest as exc:
            up.abort()
            raise UpstreamError(400, str(exc)) from None

    # -- responses -----------------------------------------------------------------------
    def _response_head(self, resp: h11.Response, *, length: int | None,
                       keep_length: bool) -> h11.Response:
        headers = forward_headers(list(resp.headers.raw_items()), via=self.server.via,
                                  version=b"1.1" if resp.http_version == b"1.1" else b"1.0",
                                  drop=frozenset() if keep_length
                                  else frozenset({b"content-length"}))
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        return h11.Response(status_code=resp.status_code, headers=headers,
                            reason=resp.reason)

    async def _response(self, req: h11.Request, resp: h11.Response, up: Upstream,
                        info: Request, acl: Acl | None, acls: tuple[Acl, ...],
                        ex: _Exchange) -> None:
        ex.status = resp.status_code
        raw = list(resp.headers.raw_items())
        if req.method == b"HEAD" or resp.status_code in (204, 304):
            self._send(self._response_head(resp, length=None, keep_length=True))
            event = await up.next_event()
            while not isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                event = await up.next_event()
            self._send(h11.EndOfMessage())
            await self._drain()
            ex.verdict = ex.verdict or "no-body"
            return
        declared = content_length(raw)
        first = bytearray()
        ended = False
        while len(first) < SNIFF_BYTES:
            event = await up.next_event()
            if not isinstance(event, h11.Data):
                ended = True  # EndOfMessage (or the upstream closed a close-delimited body)
                break
            first += event.data
        obj = Subject(media_type(raw), bytes(first[:SNIFF_BYTES]),
                      declared if declared is not None else (len(first) if ended else None))
        chosen = acl or first_match(acls, info, obj)
        assert chosen is not None
        ex.acl = chosen.name
        if chosen.action == "deny":
            up.abort()
            await self._fail(ex, 403, f"denied by ACL {chosen.name or '(unnamed)'}",
                             page="refused")
        body = _Incoming(up, bytes(first), ended)
        if chosen.action == "pass":
            ex.verdict = "pass"
            self._send(self._response_head(resp, length=None, keep_length=True))
            async for data in body.stream():
                self._send(h11.Data(data=data))
                ex.bytes += len(data)
                await self._drain()
            self._send(h11.EndOfMessage())
            await self._drain()
            return
        await self._scan_response(req, resp, body, declared, chosen, ex)

    async def _scan_response(self, req: h11.Request, resp: h11.Response, body: _Incoming,
                             declared: int | None, acl: Acl, ex: _Exchange) -> None:
        s = self.s
        limit = int(self.gateway.config.limits.max_scan_size)
        gate = Gate(s.trickle, declared, time.monotonic())  # the clock Upstream waits on
        # a close-delimited answer (HTTP/1.0 client, no length) cannot show a cut
        early = gate.active and (declared is not None or req.http_version == b"1.1")
        window = (None if gate.mode == "keep_back" else s.trickle.limit) if early else 0
        spool = self.gateway.new_spool()
        relay = Relay(spool, window)
        # the head goes out with the first byte released (never before: until then a
        # refusal can still be a block page)
        self._pending_head = (self._response_head(resp, length=None, keep_length=True)
                              if early else None)
        try:
            overflow: bytes | None = None
            async for data in body.stream(wake=gate.next_wakeup):
                if data:
                    if relay.received + len(data) > limit:
                        room = limit - relay.received
                        relay.add(data[:room])
                        overflow = data[room:]
                        break
                    relay.add(data)
                    gate.received(len(data))
                if early:
                    await self._release(relay, self._allowed(gate, relay), ex)
            spool.finish()
            if overflow is not None:
                started = early and self._pending_head is None
                self._pending_head = None
                await self._too_large(resp, body, relay, overflow, started, acl, ex)
                return
            outcome = await self._verdict(spool, gate, relay, early, ex)
            started = early and self._pending_head is None  # part of the body went out
            self._pending_head = None
            accepted = self._accepted(outcome, acl)
            ex.verdict = _verdict(outcome) if not accepted or outcome.result.status is not \
                ScanStatus.CLEAN else "clean"
            if accepted:
                # logged before the body goes out: a client that leaves midway does not
                # take the verdict's line with it
                self._log_scan(outcome, ex, status=resp.status_code, what="download",
                              action="accept")
                if not started:
                    self._send(self._response_head(resp, length=spool.size, keep_length=False))
                for data in relay.rest(SEND_CHUNK):
                    self._send(h11.Data(data=data))
                    ex.bytes += len(data)
                    await self._drain()
                self._send(h11.EndOfMessage())
                await self._drain()
                return
            await self._refuse_download(outcome, ex, resp, started, close=False)
        finally:
            self._pending_head = None
            spool.close()

    def _allowed(self, gate: Gate, relay: Relay) -> int:
        """How far the body may have gone out before the verdict (the gate holds the last
        ``keep_back`` bytes in every mode)."""
        return gate.releasable(time.monotonic())

    async def _release(self, relay: Relay, upto: int, ex: _Exchange) -> None:
        data = relay.take(upto)
        if data:
            if self._pending_head is not None:
                self._send(self._pending_head)
                self._pending_head = None
            self._send(h11.Data(data=data))
            ex.bytes += len(data)
            await self._drain()

    async def _verdict(self, spool: Spool, gate: Gate, relay: Relay, early: bool,
                       ex: _Exchange) -> Outcome:
        """Scan; while the scan runs, go on trickling; past ``patience`` the verdict is an
        error result the policy decides on."""
        ctx = Context(frontend="http_proxy", listener="http_proxy", client_addr=self.client,
                      size=spool.size)
        task = asyncio.ensure_future(self.gateway.process(spool, ctx, ids={"url": ex.url},
                                                          defer_log=True))
        try:
            while not task.done():
                now = time.monotonic()
                wake = gate.next_wakeup(now) if early else None
                until = gate.deadline if wake is None else min(wake, gate.deadline)
                if now >= gate.deadline:
                    break
                await asyncio.wait([task], timeout=max(until - now, 0.0))
                if early and not task.done():
                    await self._release(relay, self._allowed(gate, relay), ex)
            if task.done():
                return task.result()
        except BaseException:
            task.cancel()
            raise
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        result = ScanResult(ScanStatus.ERROR, size=spool.size,
                            reason=f"no verdict within patience ({self.s.trickle.patience:g} s)")
        return self._decide_unscanned(result, ex, "inbound")

    async def _too_large(self, resp: h11.Response, body: _Incoming, relay: Relay,
                         overflow: bytes, started: bool, acl: Acl, ex: _Exchange) -> None:
        limit = int(self.gateway.config.limits.max_scan_size)
        result = ScanResult(ScanStatus.SKIPPED, size=relay.received + len(overflow),
                            limit=LimitKind.SIZE,
                            reason=f"size limit: body over max_scan_size {limit} bytes, "
                                   "not scanned")
        outcome = self._decide_unscanned(result, ex, "inbound")
        if not self._accepted(outcome, acl):
            ex.verdict = _verdict(outcome)
            body.up.abort()
            await self._refuse_download(outcome, ex, resp, started, close=True)
        ex.verdict = "skipped"
        self._log_scan(outcome, ex, status=resp.status_code, what="download",
                              action="accept")
        if not started:
            self._send(self._response_head(resp, length=None, keep_length=True))
        for data in relay.rest(SEND_CHUNK):
            self._send(h11.Data(data=data))
            ex.bytes += len(data)
            await self._drain()
        self._send(h11.Data(data=overflow))
        ex.bytes += len(overflow)
        async for data in body.stream():
            self._send(h11.Data(data=data))
            ex.bytes += len(data)
            await self._drain()
        self._send(h11.EndOfMessage())
        await self._drain()

    # -- decisions -----------------------------------------------------------------------
    def _accepted(self, outcome: Outcome, acl: Acl) -> bool:
        accepts = acl.accepts(outcome.result.status)
        if accepts is None:
            return outcome.decision.disposition is Disposition.ACCEPT
        return accepts

    def _refusal(self, outcome: Outcome, url: str) -> tuple[int, bytes]:
        result, decision = outcome.result, outcome.decision
        if result.status is ScanStatus.INFECTED:
            return 403, pages.render(self.server.block_page(self.s),
                                     virus=result.virus or "unknown", url=url)
        if decision.disposition is Disposition.TEMPFAIL or result.status is ScanStatus.ERROR:
            return 503, pages.render(pages.UNAVAILABLE_PAGE, url=url,
                                     reason=result.reason or result.status.value)
        return 403, pages.render(pages.REFUSED_PAGE, url=url,
                                 reason=result.reason or decision.text or result.status.value)

    def _decide_unscanned(self, result: ScanResult, ex: _Exchange, direction: str) -> Outcome:
        """The policy's decision on a result the scanner did not make (over
        ``max_scan_size``, no verdict within ``patience``); logged by ``_log_scan``."""
        from ...gateway import Outcome

        ctx = Context(frontend="http_proxy", listener="http_proxy", client_addr=self.client,
                      size=result.size, direction=direction)
        decision = self.gateway.policy.decide(result, ctx)
        if decision.quarantine:  # nothing whole was kept: there is nothing to quarantine
            decision = Decision(Disposition.REJECT, "552 5.3.4 Object cannot be quarantined",
                                rule=f"{decision.rule}+quarantine-impossible",
                                refid=decision.refid)
        record_scan("http_proxy", result)
        event = scan_event(result, frontend="http_proxy", listener="http_proxy",
                           ids={"url": ex.url}, rule=decision.rule, actions=decision.actions,
                           refid=decision.refid)
        return Outcome(result, decision, event=event)

    def _log_scan(self, outcome: Outcome, ex: _Exchange, *, status: int | None, what: str,
                  action: str) -> None:
        """The deferred scan-log line, with what was done: ``accept`` (forwarded), ``block``
        (a page instead), ``cut`` (part sent, then the connection cut)."""
        done = [action]
        if outcome.quarantine_id:
            done.append("quarantine")
        if outcome.decision.shadow:
            done.append("shadow")
        self.gateway.log_outcome(outcome, actions=done, http_status=status, object=what,
                                 url=ex.url, acl=ex.acl or None)

    # -- CONNECT -------------------------------------------------------------------------
    async def _connect(self, req: h11.Request, target: ProxyTarget, info: Request,
                       acls: tuple[Acl, ...], ex: _Exchange) -> None:
        acl = first_match(acls, info, Subject())
        assert acl is not None
        ex.acl = acl.name
        if acl.action == "deny":
            await self._fail(ex, 403, f"CONNECT to {target.url} denied by ACL "
                                      f"{acl.name or '(unnamed)'}", page="refused")
        s = self.s
        try:
            if s.parent:
                host, port = parse_parent(s.parent)
                up = await Upstream.open(host, port, connect_timeout=s.connect_timeout,
                                         read_timeout=s.read_timeout)
                try:
                    up.send(h11.Request(method=b"CONNECT", target=req.target,
                                        headers=[(b"host", req.target)]))
                    await up.drain()
                    event = await up.next_event()
                except UpstreamError:
                    up.abort()
                    raise
                if not isinstance(event, h11.Response) or not 200 <= event.status_code < 300:
                    up.abort()
                    status = event.status_code if isinstance(event, h11.Response) else 502
                    raise UpstreamError(502, f"parent refused CONNECT ({status})")
                trailing = up.conn.trailing_data[0]
            else:
                up = await Upstream.open(target.host, target.port,
                                         connect_timeout=s.connect_timeout,
                                         read_timeout=s.read_timeout)
                trailing = b""
        except UpstreamError as exc:
            await self._fail(ex, exc.status, str(exc))
        ex.status, ex.verdict = 200, "tunnel"
        self._send(h11.Response(status_code=200, headers=[], reason=b"Connection established"))
        await self._drain()
        early = self.conn.trailing_data[0]
        try:
            if trailing:
                self.writer.write(trailing)
            if early:
                up.writer.write(early)
            sent = await _pipe(self.reader, self.writer, up.reader, up.writer, s.idle_timeout)
            ex.bytes = sent
        finally:
            up.abort()
        raise _Close

    # -- logs ----------------------------------------------------------------------------
    def _access_log(self, ex: _Exchange) -> None:
        glog = self.gateway.log
        if glog is None or not ex.status:
            return
        glog.log({"event": "access", "frontend": "http_proxy", "client": ex.client,
                  "method": ex.method, "url": ex.url, "status": ex.status, "bytes": ex.bytes,
                  "verdict": ex.verdict or "-", **({"acl": ex.acl} if ex.acl else {}),
                  **({"cut": True} if ex.cut else {}),
                  "ms": round((time.perf_counter() - ex.started) * 1000, 1)})

    def _log_refused(self, status: int, detail: str) -> None:
        glog = self.gateway.log
        if glog is not None:
            glog.log({"event": "access", "frontend": "http_proxy", "client": self.client,
                      "method": "-", "url": "", "status": status, "bytes": 0,
                      "verdict": "refused", "error": detail[:200]})


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Upload:
    spool: Spool
    overflow: bytes | None  # past max_scan_size (passed unscanned): streamed on
    declared: int | None


class _Incoming:
    """A response body as it arrives: the sniffed first bytes, then the upstream's data."""

    def __init__(self, up: Upstream, first: bytes, ended: bool) -> None:
        self.up = up
        self.first = first
        self.ended = ended

    async def stream(self, wake: Callable[[float], float | None] | None = None
                     ) -> AsyncIterator[bytes]:
        """Yield data as it arrives; with ``wake`` (``gate.next_wakeup``), also an empty
        ``b""`` whenever that time comes without data (so the caller can trickle)."""
        if self.first:
            first, self.first = self.first, b""
            yield first
        if self.ended:
            return
        while True:
            when = wake(time.monotonic()) if wake is not None else None
            event = await self.up.next_event_until(when)
            if event is None:
                yield b""
                continue
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                self.ended = True
                return


async def _pipe(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter,
                u_reader: asyncio.StreamReader, u_writer: asyncio.StreamWriter,
                idle: float) -> int:
    """Copy both ways until one side closes or nothing moves for ``idle`` seconds; the
    bytes sent to the client."""
    loop = asyncio.get_running_loop()
    last = [loop.time()]
    down = [0]

    async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await src.read(READ_SIZE):
                last[0] = loop.time()
                if count:
                    down[0] += len(data)
                dst.write(data)
                await dst.drain()
            with contextlib.suppress(OSError):
                if dst.can_write_eof():
                    dst.write_eof()

    tasks = [asyncio.ensure_future(copy(c_reader, u_writer, False)),
             asyncio.ensure_future(copy(u_reader, c_writer, True))]
    try:
        while True:
            done, _ = await asyncio.wait(tasks, timeout=idle,
                                         return_when=asyncio.ALL_COMPLETED)
            if len(done) == 2 or loop.time() - last[0] >= idle:
                break
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return down[0]


def _version(req: h11.Request) -> bytes:
    return b"1.1" if req.http_version == b"1.1" else b"1.0"


def _verdict(outcome: Outcome) -> str:
    return outcome.result.status.value


def _raw_response(status: int, detail: str, body: bytes | None = None) -> bytes:
    """A complete answer written without h11 (before or outside a request cycle)."""
    if body is None:
        body = pages.error_page(status, "", detail)
    reason = pages.REASONS.get(status, "Error")
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


async def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 5)


def _hostname() -> str:
    name = socket.gethostname() or "avgate"
    return "".join(c for c in name if c.isalnum() or c in "._-")[:64] or "avgate"


async def start(gateway: Gateway, options: ListenOptions) -> list[Listener]:
    """Start the ``[http_proxy]`` listener of ``gateway.config``."""
    current = gateway.config.http_proxy
    settings = current if isinstance(current, HttpProxySettings) else HttpProxySettings()
    if settings.listen.is_unix and not options.unix_sockets:
        return []
    try:
        return [await ProxyServer(gateway, settings, options).start()]
    except AvgateError:
        raise
