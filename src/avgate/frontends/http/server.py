"""The HTTP listener: one bound socket (:func:`avgate.frontends.listen.bind`) served by uvicorn
inside avgate's event loop, with the scan API and the quarantine API as one Starlette app.

Options that only a restart changes (listen address, TLS, ``max_connections``,
``idle_timeout``) are read at start; everything else per request. A listener beyond loopback
without tokens (or with scanning open) is warned about at start-up, on stderr and in the
scan log.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ...gateway import Gateway
from ..listen import Address, Listener, ListenOptions, bind
from .common import json_response
from .console import ConsoleApi
from .quarantine import QuarantineApi
from .scan import ScanApi
from .settings import HttpSettings


def build_app(gateway: Gateway) -> Starlette:
    """The whole API (every route of the OpenAPI document) over ``gateway``."""
    return Starlette(routes=[*ScanApi(gateway).routes(), *QuarantineApi(gateway).routes(),
                             *ConsoleApi(gateway).routes()],
                     exception_handlers={HTTPException: _http_error},
                     middleware=[Middleware(TraceRequests, gateway=gateway)])


class TraceRequests:
    """A debug line per request (``[log] level = "debug"``): method, path, status, time.
    Headers, query strings and bodies are left out (tokens, content); nothing at all is done
    at other levels."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        glog = self.gateway.log
        if scope["type"] != "http" or glog is None or not glog.debug_enabled:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            client = scope.get("client") or ("",)
            glog.debug({"event": "http_request", "frontend": "http", "client": client[0],
                        "method": scope["method"], "path": scope["path"][:200],
                        "status": status,
                        "ms": round((time.perf_counter() - started) * 1000, 3)})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return json_response({"error": exc.detail}, exc.status_code, exc.headers)


def exposure_warnings(settings: HttpSettings, listen: Address) -> list[str]:
    """What is wrong with listening on ``listen`` with these settings, if anything."""
    if listen.is_loopback:
        return []
    if not settings.tokens:
        return [f"the HTTP API listens on {listen}, which is not a loopback address, and "
                "[http] tokens is empty: anyone who can reach it can submit scans (the "
                "quarantine endpoints stay closed). Set tokens and scan_requires_token = "
                "true, or listen on 127.0.0.1."]
    if not settings.scan_requires_token:
        return [f"the HTTP API listens on {listen}, which is not a loopback address, and "
                "scan_requires_token is false: anyone who can reach it can submit scans."]
    return []


def _idle_protocol(idle_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol plus a read-idle timeout *inside* a request.

    uvicorn only times out idle keep-alive connections between requests; a client that stops
    half-way through a request head or body would hold its connection (and its spool) forever
    (slowloris). This closes a connection that has not sent a byte for ``idle_timeout`` while
    the server is waiting for it; a request whose scan is running is never cut.
    """

    class IdleTimeoutH11(H11Protocol):
        _avgate_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            self._arm()

        def data_received(self, data: bytes) -> None:
            self._arm()
            super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._avgate_timer is not None:
                self._avgate_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._avgate_timer is not None:
                self._avgate_timer.cancel()
            self._avgate_timer = self.loop.call_later(idle_timeout, self._idle)

        def _idle(self) -> None:
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                waiting = bool(self.conn.trailing_data[0])  # a request head half sent
            else:
                waiting = cycle.more_body  # the app waits for more of the body
            if waiting:
                if not self.transport.is_closing():
                    self.transport.close()
            else:
                self._arm()

    return IdleTimeoutH11


class _Server(uvicorn.Server):
    """uvicorn inside avgate's loop: signals belong to ``avgate serve``, not to uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpListener:
    """A uvicorn server running as a task; ``aclose`` lets in-flight requests finish."""

    def __init__(self, server: _Server, sock: socket.socket, where: Address,
                 tls: bool) -> None:
        self.server = server
        self.sock = sock
        self.where = where
        self.tls = tls
        self.task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return self.where.port

    def describe(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.where} (HTTP API)"

    async def start(self) -> None:
        self.task = asyncio.ensure_future(self.server.serve(sockets=[self.sock]))
        deadline = time.monotonic() + 10
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises what went wrong
                raise OSError(f"HTTP server on {self.where} stopped while starting")
            if time.monotonic() > deadline:
                raise OSError(f"HTTP server on {self.where} did not start")
            await asyncio.sleep(0.01)

    async def aclose(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)
        self.sock.close()


async def start(gateway: Gateway, options: ListenOptions) -> list[Listener]:
    """Start the HTTP API on ``[http] listen`` (none in a serve worker that does not own the
    unix sockets)."""
    settings = gateway.config.http or HttpSettings()
    if settings.listen.is_unix and not options.unix_sockets:
        return []
    sock = bind(settings.listen, what="http", options=options)
    where = settings.listen.resolve(options.base_dir)
    if not where.is_unix:  # port 0: the port the system chose
        where = Address("tcp", host=settings.listen.host, port=sock.getsockname()[1])
    cert = key = None
    if settings.tls_cert and settings.tls_key:  # HTTPS when both are set
        cert = str(Path(gateway.config.base_dir, settings.tls_cert))
        key = str(Path(gateway.config.base_dir, settings.tls_key))
    config = uvicorn.Config(
        build_app(gateway), lifespan="off", log_config=None, log_level="warning",
        access_log=False, server_header=False, proxy_headers=False,
        ssl_certfile=cert, ssl_keyfile=key,
        timeout_graceful_shutdown=int(options.drain_timeout) or 1,
        http=_idle_protocol(settings.idle_timeout),
        limit_concurrency=settings.max_connections)
    listener = HttpListener(_Server(config), sock, where, tls=cert is not None)
    try:
        await listener.start()
    except BaseException:
        sock.close()
        raise
    for warning in exposure_warnings(settings, where):
        print(f"avgate: http: WARNING: {warning}", file=sys.stderr, flush=True)
        log = gateway.log
        if log is not None:
            log.log({"event": "warning", "frontend": "http", "listener": str(where),
                     "warning": warning}, level="warning")
    return [listener]
