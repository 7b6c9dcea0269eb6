"""HTTP API (Starlette app, uvicorn server in the running event loop).

``[http]``: ``listen`` (default ``127.0.0.1:8080``), ``tokens`` (bearer tokens),
``scan_requires_token`` (default false), ``tls_cert``/``tls_key`` (HTTPS when both are set),
``max_upload_size`` (default 1 GiB).

Endpoints (the OpenAPI document at ``GET /openapi.json`` is :data:`OPENAPI` and describes
exactly these):

- ``POST /v1/scan[?enforce=true]``: the body is the object (any Content-Type), or
  ``multipart/form-data`` whose file fields (parts with a ``filename``) are each one object.
  Bodies are streamed into spools (memory up to ``[scan] spool_memory``, then a temp file):
  an upload never sits in memory whole. 200 with the result object (a JSON array of them,
  one per file field, for multipart) whatever the verdict; with ``enforce=true`` an
  infected object makes it 403 and adds ``"error": "Virus Detected in Attachment"``, a
  failed scan 503 with ``"error": "Virus scanner unavailable"``. A body larger than
  ``max_upload_size`` is **read to the end and discarded**, then answered 413, so that every
  client (including those that only read the response after sending everything) sees the
  413 and the connection stays usable.
- ``GET /healthz`` (200 when every engine is healthy, else 503), ``GET /metrics``
  (Prometheus text format), ``GET /v1/version``.
- Quarantine (bearer token always required): ``GET /v1/quarantine`` (filters ``virus``,
  ``sender``, ``recipient`` — globs —, ``status``, ``frontend``, ``since``; paged with
  ``limit``/``offset``), ``GET /v1/quarantine/{id}``, ``GET /v1/quarantine/{id}/raw``,
  ``POST /v1/quarantine/{id}/release`` (JSON body ``{"to": [...], "force": false}``,
  optional), ``DELETE /v1/quarantine/{id}``.

No CORS headers are sent (browsers on other origins cannot read the answers), and there is
deliberately no scan-by-path endpoint: a path from a network client is a traversal risk.
Every request reads ``gateway.<attr>`` afresh, so a reload (tokens, limits, engines) applies
to the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import uvicorn
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from .. import __version__
from ..errors import NotFound, QuarantineError
from ..gateway import Gateway, Outcome
from ..limits import parse_size
from ..policy import Context
from ..result import ScanStatus
from ..spool import Spool

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_IDLE_TIMEOUT = 60.0  # seconds a client may stay silent inside a request
DEFAULT_MAX_UPLOAD = parse_size("1 GiB")
INFECTED_ERROR = "Virus Detected in Attachment"
SCAN_ERROR = "Virus scanner unavailable"
MAX_TEXT_FIELD = 64 * 1024  # non-file multipart fields are read and ignored, up to this
MAX_PAGE = 1000


def _json(data: Any, status: int = 200,
          headers: Mapping[str, str] | None = None) -> Response:
    body = json.dumps(data, separators=(",", ":"), default=str, ensure_ascii=False)
    return Response(body, status, headers=headers, media_type="application/json")


def _error(status: int, message: str, **extra: Any) -> Response:
    headers = {"WWW-Authenticate": 'Bearer realm="avgate"'} if status == 401 else None
    return _json({"error": message, **extra}, status, headers)


class _Upload:
    """One file field of a multipart body, or the whole raw body."""

    def __init__(self, spool: Spool, field: str = "", filename: str = "",
                 content_type: str = "") -> None:
        self.spool = spool
        self.field = field
        self.filename = filename
        self.content_type = content_type


class _TooLarge(Exception):
    pass


class _MultipartCollector:
    """Callbacks for python-multipart's streaming parser: each file part → its own spool."""

    def __init__(self, gateway: Gateway, boundary: bytes) -> None:
        self.gateway = gateway
        self.uploads: list[_Upload] = []
        self.ended = False
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._current: _Upload | None = None
        self._text_left = 0
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }, max_header_count=16, max_header_size=8192)

    def _part_begin(self) -> None:
        self._headers = {}
        self._current = None

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _disp, options = parse_options_header(self._headers.get("content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        if filename is None:
            self._text_left = MAX_TEXT_FIELD  # a plain form field: not an object to scan
            return
        ctype = self._headers.get("content-type", b"").decode("latin-1")
        self._current = _Upload(self.gateway.new_spool(), name,
                                filename.decode("utf-8", "replace"), ctype)
        self.uploads.append(self._current)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current is not None:
            self._current.spool.write(memoryview(data)[start:end])
        else:
            self._text_left -= end - start
            if self._text_left < 0:
                raise MultipartParseError("form field too large (only file fields are read)")

    def _part_end(self) -> None:
        if self._current is not None:
            self._current.spool.finish()
        self._current = None

    def _end(self) -> None:
        self.ended = True

    def close(self) -> None:
        for upload in self.uploads:
            upload.spool.close()


class HttpApi:
    """The request handlers; ``app`` is the Starlette application."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.app = Starlette(routes=[
            Route("/v1/scan", self.scan, methods=["POST"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v1/version", self.version, methods=["GET"]),
            Route("/v1/quarantine", self.q_list, methods=["GET"]),
            Route("/v1/quarantine/{id}", self.q_record, methods=["GET", "DELETE"]),
            Route("/v1/quarantine/{id}/raw", self.q_raw, methods=["GET"]),
            Route("/v1/quarantine/{id}/release", self.q_release, methods=["POST"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
        ], exception_handlers={HTTPException: self._http_error})

    @staticmethod
    async def _http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _json({"error": exc.detail}, exc.status_code, exc.headers)

    @property
    def cfg(self) -> dict[str, Any]:
        return self.gateway.config.http or {}

    def _authorized(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.encode()
        # compare with every token, always: the time taken does not reveal which one matched
        matched = False
        for candidate in self.cfg.get("tokens", []):
            matched |= hmac.compare_digest(given, candidate.encode())
        return matched

    # -- scanning -----------------------------------------------------------------------
    async def scan(self, request: Request) -> Response:
        authorized = self._authorized(request)
        if self.cfg.get("scan_requires_token", False) and not authorized:
            return _error(401, "a valid bearer token is required")
        enforce_arg = request.query_params.get("enforce", "false").lower()
        if enforce_arg not in ("true", "false", "1", "0", "yes", "no"):
            return _error(400, "enforce must be true or false")
        enforce = enforce_arg in ("true", "1", "yes")
        limit = int(self.cfg.get("max_upload_size", DEFAULT_MAX_UPLOAD))
        ctype, options = parse_options_header(request.headers.get("content-type", ""))
        multipart = ctype == b"multipart/form-data"
        if multipart and not options.get(b"boundary"):
            return _error(400, "multipart/form-data without a boundary")
        uploads: list[_Upload] = []
        write: Callable[[bytes], object]
        collector: _MultipartCollector | None = None
        total = 0
        try:
            if multipart:
                try:
                    collector = _MultipartCollector(self.gateway, options[b"boundary"])
                except (ValueError, MultipartParseError) as exc:
                    return _error(400, f"bad multipart boundary: {exc}")
                uploads = collector.uploads
                write = collector.parser.write
            else:
                raw = _Upload(self.gateway.new_spool())
                uploads = [raw]
                write = raw.spool.write
            too_large = False
            async for chunk in request.stream():
                total += len(chunk)
                if too_large or not chunk:
                    continue  # over the limit: read to the end, keep nothing
                if total > limit:
                    too_large = True
                    for upload in uploads:
                        upload.spool.close()
                    continue
                try:
                    write(chunk)
                except MultipartParseError as exc:
                    return _error(400, f"malformed multipart body: {exc}")
            if too_large:
                return _error(413, f"upload larger than max_upload_size ({limit} bytes)",
                              max_upload_size=limit, size=total)
            if collector is not None:
                try:
                    collector.parser.finalize()
                except MultipartParseError as exc:
                    return _error(400, f"malformed multipart body: {exc}")
                if not collector.ended:
                    return _error(400, "malformed multipart body: it ends before its "
                                       "closing boundary")
                if not uploads:
                    return _error(400, "no file field in the multipart body "
                                       "(a file field has a filename)")
            results = []
            for upload in uploads:
                outcome = await self._process(upload, request, authorized)
                results.append(self._result_dict(outcome, upload if multipart else None))
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening; uvicorn drops it
        finally:
            for upload in uploads:
                upload.spool.close()
        statuses = {r["status"] for r in results}
        code = 200
        if enforce:
            if ScanStatus.INFECTED.value in statuses:
                code = 403
            elif ScanStatus.ERROR.value in statuses:
                code = 503
            for r in results:
                if r["status"] == ScanStatus.INFECTED.value:
                    r["error"] = INFECTED_ERROR
                elif r["status"] == ScanStatus.ERROR.value:
                    r["error"] = SCAN_ERROR
        return _json(results if multipart else results[0], code)

    async def _process(self, upload: _Upload, request: Request, authorized: bool) -> Outcome:
        spool = upload.spool.finish()
        client = request.client.host if request.client else ""
        ctx = Context(frontend="http", listener="http", client_addr=client,
                      authenticated=authorized, size=spool.size)
        ids = {"filename": upload.filename} if upload.filename else None
        return await self.gateway.process(spool, ctx, ids=ids)

    @staticmethod
    def _result_dict(outcome: Outcome, upload: _Upload | None) -> dict[str, Any]:
        d = outcome.result.to_dict()
        if outcome.quarantine_id:
            d["quarantine_id"] = outcome.quarantine_id
        if upload is not None:
            d["field"] = upload.field
            d["filename"] = upload.filename
        return d

    # -- service ------------------------------------------------------------------------
    async def healthz(self, request: Request) -> Response:
        engines = await self.gateway.scanner.health()
        ok = all(bool(e.get("ok")) for e in engines)
        return _json({"status": "ok" if ok else "unavailable", "engines": engines},
                     200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from .. import observability

        self._publish_quarantine_size()
        return Response(generate_latest(observability.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _publish_quarantine_size(self) -> None:
        from .. import observability

        # do not create the quarantine just to count it
        if Path(self.gateway.config.quarantine_path).is_dir():
            with contextlib.suppress(Exception):
                observability.set_quarantine_size(*self.gateway.store.stats())

    async def version(self, request: Request) -> Response:
        scanner = self.gateway.scanner
        return _json({"version": __version__,
                      "engines": [e.info().to_dict() for e in scanner.engines],
                      "db_versions": scanner.db_versions()})

    async def openapi(self, request: Request) -> Response:
        return _json(OPENAPI)

    # -- quarantine ---------------------------------------------------------------------
    def _need_token(self, request: Request) -> Response | None:
        if not self._authorized(request):
            return _error(401, "a valid bearer token is required")
        return None

    async def q_list(self, request: Request) -> Response:
        if (denied := self._need_token(request)) is not None:
            return denied
        # an empty text filter is no filter (form-style clients send every field);
        # limit, offset and since must be numbers/times when present
        q = {k: v for k, v in request.query_params.items()
             if v != "" or k in ("limit", "offset", "since")}
        try:
            limit = int(q.get("limit", "100"))
            offset = int(q.get("offset", "0"))
            if not 1 <= limit <= MAX_PAGE or offset < 0:
                raise ValueError
        except ValueError:
            return _error(400, f"limit must be 1..{MAX_PAGE} and offset >= 0")
        since: float | None = None
        if "since" in q:
            try:
                since = _parse_time(q["since"])
            except ValueError:
                return _error(400, "since must be an ISO 8601 time or epoch seconds")
        import fnmatch

        def match(value: str, pattern: str | None) -> bool:
            return pattern is None or fnmatch.fnmatchcase(value.lower(), pattern.lower())

        records = [r for r in self.gateway.store.list(virus=q.get("virus"), since=since)
                   if (q.get("status") is None or r.status == q["status"])
                   and (q.get("frontend") is None or r.frontend == q["frontend"])
                   and match(r.envelope.sender, q.get("sender"))
                   and (q.get("recipient") is None
                        or any(match(x, q["recipient"]) for x in r.envelope.recipients))]
        page = records[offset:offset + limit]
        nxt = offset + limit if offset + limit < len(records) else None
        return _json({"items": [r.to_dict() for r in page], "total": len(records),
                      "offset": offset, "limit": limit, "next_offset": nxt})

    async def q_record(self, request: Request) -> Response:
        # one route for both methods, so that a 405 lists both in its Allow header
        if request.method == "DELETE":
            return await self.q_delete(request)
        return await self.q_get(request)

    async def q_get(self, request: Request) -> Response:
        if (denied := self._need_token(request)) is not None:
            return denied
        try:
            return _json(self.gateway.store.get(request.path_params["id"]).to_dict())
        except NotFound as exc:
            return _error(404, str(exc))

    async def q_raw(self, request: Request) -> Response:
        if (denied := self._need_token(request)) is not None:
            return denied
        rid = request.path_params["id"]
        try:
            handle = self.gateway.store.open_raw(rid)
        except NotFound as exc:
            return _error(404, str(exc))
        except QuarantineError as exc:
            return _error(500, str(exc))

        async def body() -> AsyncIterator[bytes]:
            with handle:
                while chunk := handle.read(1 << 16):
                    yield chunk

        return StreamingResponse(body(), media_type="application/octet-stream", headers={
            "Content-Disposition": f'attachment; filename="{rid}"'})

    async def q_release(self, request: Request) -> Response:
        if (denied := self._need_token(request)) is not None:
            return denied
        rid = request.path_params["id"]
        raw = await request.body()
        try:
            opts = json.loads(raw) if raw.strip() else {}
            if not isinstance(opts, dict) or set(opts) - {"to", "force"}:
                raise ValueError
            to = opts.get("to")
            force = opts.get("force", False)
            if to is not None and not (isinstance(to, list) and to
                                       and all(isinstance(x, str) and x for x in to)):
                raise ValueError
            if not isinstance(force, bool):
                raise ValueError
        except ValueError:
            return _error(400, 'body must be empty or {"to": ["addr", ...], "force": bool}')
        store = self.gateway.store
        try:
            record = store.get(rid)
        except NotFound as exc:
            return _error(404, str(exc))
        if record.released is not None and not force:
            return _error(409, f"{rid} was already released (send \"force\": true to "
                               "release it again)")
        from ..quarantine import DEFAULT_NEXT_HOP

        next_hop = self.gateway.config.quarantine.get("next_hop", DEFAULT_NEXT_HOP)
        try:
            record = await store.release(rid, next_hop, to=to, force=force)
        except NotFound as exc:
            return _error(404, str(exc))
        except QuarantineError as exc:
            return _error(502, f"release failed: {exc}")
        return _json(record.to_dict())

    async def q_delete(self, request: Request) -> Response:
        if (denied := self._need_token(request)) is not None:
            return denied
        rid = request.path_params["id"]
        try:
            self.gateway.store.delete(rid)
        except NotFound as exc:
            return _error(404, str(exc))
        return _json({"deleted": rid})


def _parse_time(value: str) -> float:
    """ISO 8601 (``Z`` allowed; naive means UTC) or epoch seconds."""
    try:
        return float(value)
    except ValueError:
        pass
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        from datetime import UTC

        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


# -- server -----------------------------------------------------------------------------
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


def _bind(listen: str, reuse_port: bool = False) -> tuple[socket.socket, str]:
    if listen.startswith("unix:"):
        path = listen[5:]
        with contextlib.suppress(FileNotFoundError):
            if Path(path).is_socket():
                Path(path).unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        return sock, listen
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                         socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # several `serve` workers share the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, int(port)))
    except OSError:
        sock.close()
        raise
    bound = sock.getsockname()
    return sock, f"{host}:{bound[1]}"


class HttpListener:
    """A uvicorn server running as a task; ``aclose`` lets in-flight requests finish."""

    def __init__(self, server: _Server, sock: socket.socket, where: str, tls: bool) -> None:
        self.server = server
        self.sock = sock
        self.where = where
        self.tls = tls
        self.task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

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


async def start(gateway: Gateway) -> list[HttpListener]:
    """Start the HTTP API on ``[http] listen``."""
    from ..serve import reuse_port

    cfg = gateway.config.http or {}
    sock, where = _bind(cfg.get("listen", DEFAULT_LISTEN), reuse_port(gateway.config))
    base = gateway.config.base_dir
    cert, key = cfg.get("tls_cert"), cfg.get("tls_key")
    tls = bool(cert and key)
    drain = float(gateway.config.serve.get("drain_timeout", 30.0))
    config = uvicorn.Config(
        HttpApi(gateway).app, lifespan="off", log_config=None, log_level="warning",
        access_log=False, server_header=False, proxy_headers=False,
        ssl_certfile=str(Path(base, cert)) if cert and key else None,
        ssl_keyfile=str(Path(base, key)) if cert and key else None,
        timeout_graceful_shutdown=int(drain) or 1,
        http=_idle_protocol(float(cfg.get("idle_timeout", DEFAULT_IDLE_TIMEOUT))),
        limit_concurrency=cfg.get("max_connections"))
    listener = HttpListener(_Server(config), sock, where, tls)
    try:
        await listener.start()
    except BaseException:
        sock.close()
        raise
    return [listener]


# -- OpenAPI ----------------------------------------------------------------------------
_ERROR = {"type": "object", "required": ["error"],
          "properties": {"error": {"type": "string"}}}
_FINDING = {"type": "object", "required": ["name", "engine", "part"],
            "properties": {"name": {"type": "string"}, "engine": {"type": "string"},
                           "part": {"type": "string"}}}
_RESULT = {
    "type": "object",
    "required": ["status", "infected", "findings", "reason", "sha256", "size", "engines",
                 "elapsed_ms"],
    "properties": {
        "status": {"type": "string",
                   "enum": ["clean", "infected", "skipped", "unknown", "error"]},
        "infected": {"type": "boolean"},
        "findings": {"type": "array", "items": {"$ref": "#/components/schemas/Finding"}},
        "reason": {"type": "string"},
        "sha256": {"type": "string"},
        "size": {"type": "integer", "minimum": 0},
        "engines": {"type": "array", "items": {
            "type": "object", "required": ["name", "version"],
            "properties": {"name": {"type": "string"}, "version": {"type": "string"}}}},
        "elapsed_ms": {"type": "number"},
        "cached": {"type": "boolean"},
        "quarantine_id": {"type": "string"},
        "field": {"type": "string", "description": "multipart only: the form field"},
        "filename": {"type": "string", "description": "multipart only"},
        "error": {"type": "string", "description": "enforce=true only: "
                  f"\"{INFECTED_ERROR}\" or \"{SCAN_ERROR}\""},
    },
}
_RECORD = {
    "type": "object",
    "required": ["id", "created", "sender", "recipients", "frontend", "sha256", "size",
                 "status", "viruses", "rule", "actions", "released", "result"],
    "properties": {
        "id": {"type": "string"}, "created": {"type": "string"},
        "sender": {"type": "string"},
        "recipients": {"type": "array", "items": {"type": "string"}},
        "client_addr": {"type": "string"}, "helo": {"type": "string"},
        "listener": {"type": "string"}, "frontend": {"type": "string"},
        "sha256": {"type": "string"}, "size": {"type": "integer"},
        "status": {"type": "string"},
        "viruses": {"type": "array", "items": {"type": "string"}},
        "rule": {"type": "string"}, "actions": {"type": "array", "items": {"type": "string"}},
        "released": {"type": "string", "nullable": True},
        "released_to": {"type": "array", "items": {"type": "string"}},
        "result": {"type": "object"},
    },
}


def _resp(description: str, schema: str | dict[str, Any] | None = None,
          media: str = "application/json") -> dict[str, Any]:
    if schema is None:
        return {"description": description}
    ref = {"$ref": f"#/components/schemas/{schema}"} if isinstance(schema, str) else schema
    return {"description": description, "content": {media: {"schema": ref}}}


_UNAUTHORIZED = _resp("missing or invalid bearer token", "Error")
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_SECURED: list[dict[str, list[str]]] = [{"bearer": []}]

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "avgate HTTP API", "version": __version__,
             "description": "Antivirus scanning and quarantine management."},
    "paths": {
        "/v1/scan": {"post": {
            "summary": "Scan the request body, or each file field of a multipart body",
            "parameters": [{"name": "enforce", "in": "query", "required": False,
                            "schema": {"type": "boolean", "default": False},
                            "description": "403 for infected, 503 for a failed scan"}],
            "requestBody": {"required": False, "content": {
                "application/octet-stream": {"schema": {"type": "string",
                                                        "format": "binary"}},
                "multipart/form-data": {"schema": {
                    "type": "object", "required": ["file"],
                    "description": "every part with a filename is scanned; other fields "
                                   "are ignored; at least one file part is required",
                    "properties": {"file": {"type": "string", "format": "binary"}}}},
            }},
            "responses": {
                "200": _resp("scan completed (whatever the verdict)",
                             {"oneOf": [{"$ref": "#/components/schemas/ScanResult"},
                                        {"type": "array", "items": {
                                            "$ref": "#/components/schemas/ScanResult"}}]}),
                "400": _resp("bad request (malformed multipart, no file field, bad "
                             "parameter)", "Error"),
                "401": _resp("scan_requires_token is set and no valid token was given",
                             "Error"),
                "403": _resp("enforce=true and an object is infected",
                             {"oneOf": [{"$ref": "#/components/schemas/ScanResult"},
                                        {"type": "array", "items": {
                                            "$ref": "#/components/schemas/ScanResult"}}]}),
                "413": _resp("body larger than max_upload_size", "Error"),
                "503": _resp("enforce=true and a scan failed",
                             {"oneOf": [{"$ref": "#/components/schemas/ScanResult"},
                                        {"type": "array", "items": {
                                            "$ref": "#/components/schemas/ScanResult"}}]}),
            },
        }},
        "/healthz": {"get": {
            "summary": "Engine health",
            "responses": {
                "200": _resp("every engine is healthy", "Health"),
                "503": _resp("an engine is unhealthy", "Health"),
            },
        }},
        "/metrics": {"get": {
            "summary": "Prometheus metrics",
            "responses": {"200": _resp("text exposition format", {"type": "string"},
                                       "text/plain")},
        }},
        "/v1/version": {"get": {
            "summary": "avgate and engine versions",
            "responses": {"200": _resp("versions", {
                "type": "object", "required": ["version", "engines", "db_versions"],
                "properties": {"version": {"type": "string"},
                               "engines": {"type": "array"},
                               "db_versions": {"type": "string"}}})},
        }},
        "/v1/quarantine": {"get": {
            "summary": "List quarantined objects (oldest first)",
            "security": _SECURED,
            "parameters": [
                {"name": "limit", "in": "query", "schema": {
                    "type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 100}},
                {"name": "offset", "in": "query", "schema": {
                    "type": "integer", "minimum": 0, "default": 0}},
                {"name": "virus", "in": "query", "schema": {"type": "string"},
                 "description": "glob on finding names"},
                {"name": "sender", "in": "query", "schema": {"type": "string"}},
                {"name": "recipient", "in": "query", "schema": {"type": "string"}},
                {"name": "status", "in": "query", "schema": {"type": "string"}},
                {"name": "frontend", "in": "query", "schema": {"type": "string"}},
                {"name": "since", "in": "query", "schema": {"type": "number"},
                 "description": "records created at or after this time: epoch seconds "
                                "(an ISO 8601 time such as 2026-01-31T12:00:00Z is "
                                "accepted too)"},
            ],
            "responses": {
                "200": _resp("a page of records", {
                    "type": "object",
                    "required": ["items", "total", "offset", "limit", "next_offset"],
                    "properties": {
                        "items": {"type": "array",
                                  "items": {"$ref": "#/components/schemas/Record"}},
                        "total": {"type": "integer"}, "offset": {"type": "integer"},
                        "limit": {"type": "integer"},
                        "next_offset": {"type": "integer", "nullable": True}}}),
                "400": _resp("bad parameter", "Error"),
                "401": _UNAUTHORIZED,
            },
        }},
        "/v1/quarantine/{id}": {
            "get": {"summary": "One record", "security": _SECURED, "parameters": [_ID],
                    "responses": {"200": _resp("the record", "Record"),
                                  "401": _UNAUTHORIZED,
                                  "404": _resp("no such record", "Error")}},
            "delete": {"summary": "Delete a record and its content", "security": _SECURED,
                       "parameters": [_ID],
                       "responses": {"200": _resp("deleted", {
                           "type": "object", "required": ["deleted"],
                           "properties": {"deleted": {"type": "string"}}}),
                           "401": _UNAUTHORIZED,
                           "404": _resp("no such record", "Error")}},
        },
        "/v1/quarantine/{id}/raw": {"get": {
            "summary": "The object exactly as received", "security": _SECURED,
            "parameters": [_ID],
            "responses": {"200": _resp("content", {"type": "string", "format": "binary"},
                                       "application/octet-stream"),
                          "401": _UNAUTHORIZED,
                          "404": _resp("no such record", "Error"),
                          "500": _resp("content unreadable", "Error")}}},
        "/v1/quarantine/{id}/release": {"post": {
            "summary": "Re-inject the object over SMTP to [quarantine] next_hop",
            "security": _SECURED, "parameters": [_ID],
            "requestBody": {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False,
                "properties": {"to": {"type": "array", "minItems": 1,
                                      "items": {"type": "string", "minLength": 1}},
                               "force": {"type": "boolean"}}}}}},
            "responses": {"200": _resp("released", "Record"),
                          "400": _resp("bad body", "Error"),
                          "401": _UNAUTHORIZED,
                          "404": _resp("no such record", "Error"),
                          "409": _resp("already released (use force)", "Error"),
                          "502": _resp("the next hop refused or was unreachable", "Error")}}},
        "/openapi.json": {"get": {
            "summary": "This document",
            "responses": {"200": _resp("OpenAPI 3.0 document", {"type": "object"})}}},
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {"Error": _ERROR, "Finding": _FINDING, "ScanResult": _RESULT,
                    "Record": _RECORD,
                    "Health": {"type": "object", "required": ["status", "engines"],
                               "properties": {"status": {"type": "string",
                                                         "enum": ["ok", "unavailable"]},
                                              "engines": {"type": "array",
                                                          "items": {"type": "object"}}}}},
    },
}
