"""HTTP API (Starlette app, uvicorn server in the running event loop).

``[http]``: ``listen`` (default ``127.0.0.1:8080``), ``tokens`` (bearer tokens with roles, see
below), ``scan_requires_token`` (default false), ``tls_cert``/``tls_key`` (HTTPS when both are
set), ``max_upload_size`` (default 1 GiB), ``max_parts`` (default 1000 parts in one multipart
body), ``max_connections`` (default 256 concurrent connections), ``idle_timeout`` (60 s).

Tokens: ``tokens = ["s3cret"]`` gives scan-only tokens; a table gives roles,
``tokens = ["s3cret", { token = "ops", roles = ["read"] }, { token = "root", roles =
["admin"] }]``. Roles: ``scan`` (``POST /v1/scan`` when ``scan_requires_token``), ``read``
(list and show quarantine records), ``admin`` (download, release and delete quarantined
objects; implies ``read``). No or an unknown token: 401; a token without the role: 403.

Endpoints (the OpenAPI document at ``GET /openapi.json`` is :data:`OPENAPI` and describes
exactly these):

- ``POST /v1/scan[?enforce=true]``: the body is the object (any Content-Type), or
  ``multipart/form-data`` whose parts (file parts and plain fields alike) are each one
  object. Bodies are streamed: a raw body into a spool (memory up to ``[scan] spool_memory``,
  then a temp file); multipart parts into one temp file per request (small parts stay in
  memory within a small per-request budget), and then scanned a few at a time, each from its
  own spool. An upload never sits in memory whole, whatever its number of parts. 200 with the
  result object (a JSON array of them, one per part, for multipart) whatever the verdict;
  with ``enforce=true`` an infected object (or one the policy rejects) makes it 403 and adds
  ``"error"``, a failed scan 503 with ``"error": "Virus scanner unavailable"``. A body larger
  than ``max_upload_size``, or a multipart body with more than ``max_parts`` parts, is **read
  to the end and discarded**, then answered 413 (nothing of it is scanned or answered as
  clean), so that every client (including those that only read the response after sending
  everything) sees the 413 and the connection stays usable.
- ``GET /healthz`` (200 when every engine is healthy, else 503), ``GET /metrics``
  (Prometheus text format), ``GET /v1/version``.
- Quarantine: ``GET /v1/quarantine`` (role ``read``; filters ``virus``, ``sender``,
  ``recipient`` — globs —, ``status``, ``frontend``, ``since``; paged with
  ``limit``/``offset``), ``GET /v1/quarantine/{id}`` (``read``),
  ``GET /v1/quarantine/{id}/raw`` (``admin``), ``POST /v1/quarantine/{id}/release``
  (``admin``; JSON body ``{"to": [...], "force": false}``, optional; every address must be a
  plausible mailbox, else 400), ``DELETE /v1/quarantine/{id}`` (``admin``).

No CORS headers are sent (browsers on other origins cannot read the answers), and there is
deliberately no scan-by-path endpoint: a path from a network client is a traversal risk.
Every request reads ``gateway.<attr>`` afresh, so a reload (tokens, limits, engines) applies
to the next request. Listening on a non-loopback address without tokens (or with scanning
open) is warned about at start-up, on stderr and in the scan log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import os
import re
import socket
import sys
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import IO, Any

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
from ..config import http_tokens
from ..errors import NotFound, QuarantineError
from ..gateway import Gateway, Outcome
from ..limits import parse_size
from ..policy import Context, Disposition
from ..result import ScanStatus
from ..spool import Spool

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_IDLE_TIMEOUT = 60.0  # seconds a client may stay silent inside a request
DEFAULT_MAX_UPLOAD = parse_size("1 GiB")
DEFAULT_MAX_PARTS = 1000  # parts in one multipart body; more → 413, nothing scanned
DEFAULT_MAX_CONNECTIONS = 256
INFECTED_ERROR = "Virus Detected in Attachment"
SCAN_ERROR = "Virus scanner unavailable"
BLOCKED_ERROR = "Blocked by policy"
MAX_PAGE = 1000
MAX_RELEASE_TO = 100  # addresses in one release's "to"
# multipart receiving: a part stays in memory up to PART_MEMORY bytes while the request's
# parts in memory stay under REQUEST_PART_MEMORY; everything else goes to one temp file.
PART_MEMORY = 64 * 1024
REQUEST_PART_MEMORY = 1 << 20
PART_SCANS = 4  # parts of one request scanned at the same time (each from its own spool)
PART_SCANS_TOTAL = 16  # parts of all requests together (a part's spool: up to spool_memory)
FEED_SLICE = 64 * 1024  # the multipart parser gets at most this much between two yields
MAX_NAME = 1024  # characters of a part's field name / filename kept for the answer and log
# a part's Content-Disposition is parsed up to this many bytes (a 255-byte UTF-8 file name
# percent-encoded is under 800): the names are labels, the content is scanned regardless
MAX_DISPOSITION = 2048


def _json(data: Any, status: int = 200,
          headers: Mapping[str, str] | None = None) -> Response:
    body = json.dumps(data, separators=(",", ":"), default=str, ensure_ascii=False)
    return Response(body, status, headers=headers, media_type="application/json")


def _error(status: int, message: str, **extra: Any) -> Response:
    headers = {"WWW-Authenticate": 'Bearer realm="avgate"'} if status == 401 else None
    return _json({"error": message, **extra}, status, headers)


# -- multipart ------------------------------------------------------------------------------
# one parameter: ;name=token or ;name="quoted \"string\"" (an unterminated quote runs to the
# end). Unrolled, unambiguous patterns: one linear pass, whatever the input.
_PARAM = re.compile(r';[ \t]*([^=;\s]+)[ \t]*=[ \t]*(?:"([^"\\]*(?:\\.[^"\\]*)*)"?|([^;]*))')
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)
_CONTINUATION = re.compile(r"^([^*]+)\*(\d{1,3})(\*?)$")
_ENHANCED_CODE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} ")


def _disposition_params(value: str) -> dict[str, str]:
    """The parameters of a Content-Disposition value, in one linear pass.

    Quoted strings may hold ``;``; the first occurrence of a name wins; RFC 2231/5987
    extended values (``filename*=UTF-8''x.com``, ``filename*0*=...; filename*1=...``) are
    decoded and win over the plain parameter of the same name.
    """
    plain: dict[str, str] = {}
    extended: dict[str, str] = {}
    pieces: dict[str, dict[int, tuple[str, bool]]] = {}
    for m in _PARAM.finditer(value):
        name = m.group(1).lower()
        quoted = m.group(2)
        val = _QUOTED_PAIR.sub(r"\1", quoted) if quoted is not None else m.group(3).strip()
        cont = _CONTINUATION.match(name)
        if cont is not None:
            pieces.setdefault(cont.group(1), {}).setdefault(
                int(cont.group(2)), (val, bool(cont.group(3))))
        elif name.endswith("*"):
            extended.setdefault(name[:-1], _ext_value(val))
        else:
            plain.setdefault(name, val)
    for base, parts in pieces.items():
        if base in extended:
            continue
        joined: list[str] = []
        charset = "utf-8"
        for k in sorted(parts):
            text, encoded = parts[k]
            if encoded:
                if k == 0 and text.count("'") >= 2:
                    charset, _, rest = text.partition("'")
                    text = rest.partition("'")[2]
                joined.append(_pct_decode(text, charset or "utf-8"))
            else:
                joined.append(text)
        extended[base] = "".join(joined)
    return {**plain, **extended}


def _pct_decode(text: str, charset: str) -> str:
    data = urllib.parse.unquote_to_bytes(text)
    try:
        return data.decode(charset, "replace")
    except LookupError:
        return data.decode("utf-8", "replace")


def _ext_value(value: str) -> str:
    """An RFC 5987 ``charset'language'percent-encoded`` value."""
    if value.count("'") < 2:
        return _pct_decode(value, "utf-8")
    charset, _, rest = value.partition("'")
    return _pct_decode(rest.partition("'")[2], charset or "utf-8")


class _Part:
    """One part of a multipart body: its names and where its bytes are."""

    __slots__ = ("buf", "content_type", "field", "filename", "offset", "size")

    def __init__(self, field: str, filename: str, content_type: str) -> None:
        self.field = field
        self.filename = filename
        self.content_type = content_type
        self.size = 0
        self.buf: bytearray | None = bytearray()  # None once the bytes are in the temp file
        self.offset = 0  # where they start in the temp file

    @property
    def name(self) -> str:
        """The name to show: the file name, else the form field's name."""
        return self.filename or self.field


class _TooManyParts(Exception):
    pass


class _MultipartReceiver:
    """Callbacks for python-multipart's streaming parser: every part (file or field) is kept.

    Memory is bounded per request, not per part: a part stays in memory only while it is
    small (PART_MEMORY) and the request's parts in memory stay under REQUEST_PART_MEMORY;
    everything else is appended to one temp file (one descriptor per request, however many
    parts). The work per part on the event loop is constant: no spool, no scan while
    receiving. More than ``max_parts`` parts raises _TooManyParts out of ``write``.
    """

    def __init__(self, boundary: bytes, max_parts: int, spool_dir: str | None) -> None:
        self.parts: list[_Part] = []
        self.max_parts = max_parts
        self.ended = False
        self.memory = 0
        self._spool_dir = spool_dir
        self._file: IO[bytes] | None = None
        self._file_end = 0
        self._begun = 0
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._current: _Part | None = None
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

    def write(self, data: bytes) -> None:
        self.parser.write(data)

    def _part_begin(self) -> None:
        self._begun += 1
        if self._begun > self.max_parts:
            raise _TooManyParts
        self._headers = {}
        self._current = None

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers.setdefault(self._header_field.decode("latin-1").lower(),
                                 bytes(self._header_value))
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        disposition = self._headers.get("content-disposition", b"")[:MAX_DISPOSITION].decode(
            "utf-8", "replace")
        params = _disposition_params(disposition)
        ctype = self._headers.get("content-type", b"").decode("latin-1")
        self._current = _Part(params.get("name", "")[:MAX_NAME],
                              params.get("filename", "")[:MAX_NAME], ctype[:MAX_NAME])
        self.parts.append(self._current)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current
        if part is None:  # python-multipart calls headers_finished first; be safe anyway
            return
        n = end - start
        part.size += n
        if part.buf is not None:
            if (len(part.buf) + n <= PART_MEMORY
                    and self.memory + n <= REQUEST_PART_MEMORY):
                part.buf += data[start:end]
                self.memory += n
                return
            self._spill(part)
        assert self._file is not None
        self._file.write(memoryview(data)[start:end])
        self._file_end += n

    def _spill(self, part: _Part) -> None:
        """Move a part's bytes from memory to the end of the temp file (it is the last)."""
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="avgate-multipart-",
                                                dir=self._spool_dir)
        assert part.buf is not None
        part.offset = self._file_end
        self._file.write(part.buf)
        self._file_end += len(part.buf)
        self.memory -= len(part.buf)
        part.buf = None

    def _part_end(self) -> None:
        self._current = None

    def _end(self) -> None:
        self.ended = True

    def finish(self) -> None:
        if self._file is not None:
            self._file.flush()

    async def spool(self, part: _Part, gateway: Gateway) -> Spool:
        """A spool with the part's bytes (hashed as they are copied into it)."""
        spool = gateway.new_spool()
        try:
            if part.buf is not None:
                spool.write(part.buf)
                part.buf = None
            elif part.size:
                assert self._file is not None
                await asyncio.to_thread(self._copy, spool, self._file.fileno(), part.offset,
                                        part.size)
            return spool.finish()
        except BaseException:
            spool.close()
            raise

    @staticmethod
    def _copy(spool: Spool, fd: int, offset: int, size: int) -> None:
        while size > 0:
            chunk = os.pread(fd, min(size, 1 << 20), offset)
            if not chunk:
                raise OSError("multipart temp file is shorter than expected")
            spool.write(chunk)
            offset += len(chunk)
            size -= len(chunk)

    def close(self) -> None:
        """Drop every part's bytes and the temp file (an unnamed file: nothing to unlink)."""
        for part in self.parts:
            part.buf = None
        self.memory = 0
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name: it may resolve to anything
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def exposure_warnings(cfg: Mapping[str, Any], listen: str) -> list[str]:
    """What is wrong with listening on ``listen`` with this ``[http]`` table, if anything."""
    if listen.startswith("unix:"):
        return []
    host = listen.rpartition(":")[0].strip("[]")
    if _is_loopback(host):
        return []
    try:
        tokens = http_tokens(cfg.get("tokens", []))
    except ValueError:
        tokens = []
    if not tokens:
        return [f"the HTTP API listens on {listen}, which is not a loopback address, and "
                "[http] tokens is empty: anyone who can reach it can submit scans (the "
                "quarantine endpoints stay closed). Set tokens and scan_requires_token = "
                "true, or listen on 127.0.0.1."]
    if not cfg.get("scan_requires_token", False):
        return [f"the HTTP API listens on {listen}, which is not a loopback address, and "
                "scan_requires_token is false: anyone who can reach it can submit scans."]
    return []


class HttpApi:
    """The request handlers; ``app`` is the Starlette application."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._part_slots = asyncio.Semaphore(PART_SCANS_TOTAL)
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

    def _roles(self, request: Request) -> frozenset[str] | None:
        """The roles of the request's bearer token; None without a valid token."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        try:
            tokens = http_tokens(self.cfg.get("tokens", []))
        except ValueError:  # only a config built in code can get here; no token is valid
            tokens = []
        given = token.encode()
        # compare with every token, always: the time taken does not reveal which one matched
        matched = False
        roles: set[str] = set()
        for entry in tokens:
            if hmac.compare_digest(given, entry["token"].encode()):
                matched = True
                roles.update(entry["roles"])
        return frozenset(roles) if matched else None

    def _require(self, request: Request, role: str) -> Response | None:
        """None when the request's token has ``role``; else the 401 or 403 answer."""
        return self._denied(self._roles(request), role)

    @staticmethod
    def _denied(roles: frozenset[str] | None, role: str) -> Response | None:
        if roles is None:
            return _error(401, "a valid bearer token is required")
        if role not in roles:
            return _json({"error": f"this token lacks the {role!r} role"}, 403, {
                "WWW-Authenticate": 'Bearer realm="avgate", error="insufficient_scope"'})
        return None

    # -- scanning -----------------------------------------------------------------------
    async def scan(self, request: Request) -> Response:
        roles = self._roles(request)
        if self.cfg.get("scan_requires_token", False) and (
                denied := self._denied(roles, "scan")) is not None:
            return denied
        authorized = roles is not None and "scan" in roles
        enforce_arg = request.query_params.get("enforce", "false").lower()
        if enforce_arg not in ("true", "false", "1", "0", "yes", "no"):
            return _error(400, "enforce must be true or false")
        enforce = enforce_arg in ("true", "1", "yes")
        limit = int(self.cfg.get("max_upload_size", DEFAULT_MAX_UPLOAD))
        ctype, options = parse_options_header(request.headers.get("content-type", ""))
        if ctype == b"multipart/form-data":
            if not options.get(b"boundary"):
                return _error(400, "multipart/form-data without a boundary")
            return await self._scan_multipart(request, options[b"boundary"], limit, enforce,
                                              authorized)
        spool = self.gateway.new_spool()
        try:
            total = 0
            too_large = False
            async for chunk in request.stream():
                total += len(chunk)
                if too_large or not chunk:
                    continue  # over the limit: read to the end, keep nothing
                if total > limit:
                    too_large = True
                    spool.close()
                    continue
                spool.write(chunk)
            if too_large:
                return self._too_large(limit, total)
            outcome = await self._process(spool, "", "", request, authorized)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening; uvicorn drops it
        finally:
            spool.close()
        results = [self._result_dict(outcome, None)]
        return self._answer(results, [outcome], enforce, multipart=False)

    async def _scan_multipart(self, request: Request, boundary: bytes, limit: int,
                              enforce: bool, authorized: bool) -> Response:
        max_parts = int(self.cfg.get("max_parts", DEFAULT_MAX_PARTS))
        try:
            receiver = _MultipartReceiver(boundary, max_parts, self.gateway.config.scan.spool_dir)
        except (ValueError, MultipartParseError) as exc:
            return _error(400, f"bad multipart boundary: {exc}")
        refused: Response | None = None  # once refused: read to the end, keep nothing
        too_large = False
        total = 0
        try:
            async for chunk in request.stream():
                total += len(chunk)
                if too_large or refused is not None or not chunk:
                    continue
                if total > limit:
                    too_large = True
                    receiver.close()
                    continue
                try:
                    for at in range(0, len(chunk), FEED_SLICE):
                        receiver.write(chunk[at:at + FEED_SLICE] if len(chunk) > FEED_SLICE
                                       else chunk)
                        await asyncio.sleep(0)  # many small parts: let others run
                except MultipartParseError as exc:
                    refused = _error(400, f"malformed multipart body: {exc}")
                    receiver.close()
                except _TooManyParts:
                    refused = _error(413, f"the multipart body has more than max_parts "
                                          f"({max_parts}) parts; nothing was scanned",
                                     max_parts=max_parts)
                    receiver.close()
            if too_large:
                return self._too_large(limit, total)
            if refused is not None:
                return refused
            try:
                receiver.parser.finalize()
            except MultipartParseError as exc:
                return _error(400, f"malformed multipart body: {exc}")
            if not receiver.ended:
                return _error(400, "malformed multipart body: it ends before its closing "
                                   "boundary")
            if not receiver.parts:
                return _error(400, "no part in the multipart body")
            receiver.finish()
            outcomes = await self._scan_parts(receiver, request, authorized)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening; uvicorn drops it
        finally:
            receiver.close()
        results = [self._result_dict(o, p) for o, p in zip(outcomes, receiver.parts,
                                                           strict=True)]
        return self._answer(results, outcomes, enforce, multipart=True)

    async def _scan_parts(self, receiver: _MultipartReceiver, request: Request,
                          authorized: bool) -> list[Outcome]:
        """Scan every part, PART_SCANS at a time (PART_SCANS_TOTAL for all requests), each
        from its own spool; the outcomes in part order."""
        parts = receiver.parts
        outcomes: list[Outcome | None] = [None] * len(parts)
        work = iter(enumerate(parts))

        async def worker() -> None:
            for i, part in work:
                async with self._part_slots:
                    spool = await receiver.spool(part, self.gateway)
                    try:
                        outcomes[i] = await self._process(spool, part.field, part.filename,
                                                          request, authorized)
                    finally:
                        spool.close()

        async with asyncio.TaskGroup() as group:
            for _ in range(min(PART_SCANS, len(parts))):
                group.create_task(worker())
        return [o for o in outcomes if o is not None]

    @staticmethod
    def _too_large(limit: int, total: int) -> Response:
        return _error(413, f"upload larger than max_upload_size ({limit} bytes)",
                      max_upload_size=limit, size=total)

    @staticmethod
    def _answer(results: list[dict[str, Any]], outcomes: list[Outcome], enforce: bool,
                multipart: bool) -> Response:
        code = 200
        if enforce:
            blocked = failed = False
            for r, o in zip(results, outcomes, strict=True):
                disposition = o.decision.disposition
                if r["status"] == ScanStatus.INFECTED.value:
                    r["error"] = INFECTED_ERROR
                    blocked = True
                elif r["status"] == ScanStatus.ERROR.value:
                    r["error"] = SCAN_ERROR
                    failed = True
                elif disposition in (Disposition.REJECT, Disposition.DISCARD):
                    # not infected, but the policy refuses it (e.g. a structural limit)
                    why = _ENHANCED_CODE.sub("", o.decision.text) or o.result.reason
                    r["error"] = f"{BLOCKED_ERROR}: {why}" if why else BLOCKED_ERROR
                    blocked = True
                elif disposition is Disposition.TEMPFAIL:
                    r["error"] = SCAN_ERROR
                    failed = True
            code = 403 if blocked else 503 if failed else 200
        return _json(results if multipart else results[0], code)

    async def _process(self, spool: Spool, field: str, filename: str, request: Request,
                       authorized: bool) -> Outcome:
        spool.finish()
        client = request.client.host if request.client else ""
        ctx = Context(frontend="http", listener="http", client_addr=client,
                      authenticated=authorized, size=spool.size)
        ids = {k: v for k, v in (("field", field), ("filename", filename)) if v} or None
        return await self.gateway.process(spool, ctx, ids=ids)

    @staticmethod
    def _result_dict(outcome: Outcome, part: _Part | None) -> dict[str, Any]:
        d = outcome.result.to_dict()
        if outcome.quarantine_id:
            d["quarantine_id"] = outcome.quarantine_id
        if part is not None:
            d["field"] = part.field
            d["filename"] = part.filename
            d["name"] = part.name
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
    async def q_list(self, request: Request) -> Response:
        if (denied := self._require(request, "read")) is not None:
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
        if (denied := self._require(request, "read")) is not None:
            return denied
        try:
            return _json(self.gateway.store.get(request.path_params["id"]).to_dict())
        except NotFound as exc:
            return _error(404, str(exc))

    async def q_raw(self, request: Request) -> Response:
        if (denied := self._require(request, "admin")) is not None:
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
        if (denied := self._require(request, "admin")) is not None:
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
        from ..quarantine.release import InvalidAddress, parse_addresses

        if to is not None:
            try:
                to = parse_addresses(to, limit=MAX_RELEASE_TO)
            except InvalidAddress as exc:
                return _error(400, str(exc))
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
        except InvalidAddress as exc:  # the stored envelope holds a bad address: nothing sent
            return _error(409, f"release refused: {exc}")
        except QuarantineError as exc:
            return _error(502, f"release failed: {exc}")
        return _json(record.to_dict())

    async def q_delete(self, request: Request) -> Response:
        if (denied := self._require(request, "admin")) is not None:
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
        limit_concurrency=int(cfg.get("max_connections", DEFAULT_MAX_CONNECTIONS)))
    listener = HttpListener(_Server(config), sock, where, tls)
    try:
        await listener.start()
    except BaseException:
        sock.close()
        raise
    for warning in exposure_warnings(cfg, where):
        print(f"avgate: http: WARNING: {warning}", file=sys.stderr, flush=True)
        log = gateway.log
        if log is not None:
            log.log({"event": "warning", "frontend": "http", "listener": where,
                     "warning": warning}, level="warning")
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
        "filename": {"type": "string", "description": "multipart only: the part's file name "
                     "(filename* decoded), empty for a plain field"},
        "name": {"type": "string", "description": "multipart only: the file name, else the "
                 "field name"},
        "error": {"type": "string", "description": "enforce=true only: "
                  f"\"{INFECTED_ERROR}\", \"{SCAN_ERROR}\" or \"{BLOCKED_ERROR}: ...\""},
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
_NEEDS_READ = _resp("the token lacks the read role", "Error")
_NEEDS_ADMIN = _resp("the token lacks the admin role", "Error")
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
                    "type": "object", "minProperties": 1,
                    "description": "every part is scanned, file parts and plain fields "
                                   "alike (one result each); at least one part is required; "
                                   "at most max_parts parts",
                    "properties": {"file": {"type": "string", "format": "binary"}}}},
            }},
            "responses": {
                "200": _resp("scan completed (whatever the verdict)",
                             {"oneOf": [{"$ref": "#/components/schemas/ScanResult"},
                                        {"type": "array", "items": {
                                            "$ref": "#/components/schemas/ScanResult"}}]}),
                "400": _resp("bad request (malformed multipart, no part, bad parameter)",
                             "Error"),
                "401": _resp("scan_requires_token is set and no valid token was given",
                             "Error"),
                "403": _resp("enforce=true and an object is infected or refused by policy; "
                             "or scan_requires_token is set and the token lacks the scan "
                             "role",
                             {"oneOf": [{"$ref": "#/components/schemas/ScanResult"},
                                        {"type": "array", "items": {
                                            "$ref": "#/components/schemas/ScanResult"}},
                                        {"$ref": "#/components/schemas/Error"}]}),
                "413": _resp("body larger than max_upload_size, or more than max_parts "
                             "multipart parts (nothing scanned)", "Error"),
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
            "summary": "List quarantined objects, oldest first (role read)",
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
                "403": _NEEDS_READ,
            },
        }},
        "/v1/quarantine/{id}": {
            "get": {"summary": "One record (role read)", "security": _SECURED,
                    "parameters": [_ID],
                    "responses": {"200": _resp("the record", "Record"),
                                  "401": _UNAUTHORIZED, "403": _NEEDS_READ,
                                  "404": _resp("no such record", "Error")}},
            "delete": {"summary": "Delete a record and its content (role admin)",
                       "security": _SECURED,
                       "parameters": [_ID],
                       "responses": {"200": _resp("deleted", {
                           "type": "object", "required": ["deleted"],
                           "properties": {"deleted": {"type": "string"}}}),
                           "401": _UNAUTHORIZED, "403": _NEEDS_ADMIN,
                           "404": _resp("no such record", "Error")}},
        },
        "/v1/quarantine/{id}/raw": {"get": {
            "summary": "The object exactly as received (role admin)", "security": _SECURED,
            "parameters": [_ID],
            "responses": {"200": _resp("content", {"type": "string", "format": "binary"},
                                       "application/octet-stream"),
                          "401": _UNAUTHORIZED, "403": _NEEDS_ADMIN,
                          "404": _resp("no such record", "Error"),
                          "500": _resp("content unreadable", "Error")}}},
        "/v1/quarantine/{id}/release": {"post": {
            "summary": "Re-inject the object over SMTP to [quarantine] next_hop (role admin)",
            "security": _SECURED, "parameters": [_ID],
            "requestBody": {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False,
                "properties": {"to": {"type": "array", "minItems": 1,
                                      "maxItems": MAX_RELEASE_TO,
                                      "items": {"type": "string", "minLength": 1,
                                                "format": "email"}},
                               "force": {"type": "boolean"}}}}}},
            "responses": {"200": _resp("released", "Record"),
                          "400": _resp("bad body, or a \"to\" address that is not a "
                                       "plausible mailbox", "Error"),
                          "401": _UNAUTHORIZED, "403": _NEEDS_ADMIN,
                          "404": _resp("no such record", "Error"),
                          "409": _resp("already released (use force), or the stored "
                                       "envelope holds an invalid address", "Error"),
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
