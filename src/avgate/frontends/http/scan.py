"""The scan API: ``POST /v1/scan``, ``GET /healthz``, ``GET /metrics``, ``GET /v1/version``
and ``GET /openapi.json`` (the document shipped as package data, ``avgate/data/openapi.json``).

``POST /v1/scan[?enforce=true]``: the body is the object (any Content-Type), or
``multipart/form-data`` whose parts (file parts and plain fields alike) are each one object.
Bodies are streamed: a raw body into a spool (memory up to ``[scan] spool_memory``, then a
temp file); multipart parts as :mod:`.multipart` keeps them, then scanned a few at a time, each
from its own spool. 200 with the result object (a JSON array of them, one per part, for
multipart) whatever the verdict; with ``enforce=true`` an infected object (or one the policy
rejects) makes it 403 and adds ``"error"``, a failed scan 503 with ``"error": "Virus scanner
unavailable"``. A body larger than ``max_upload_size``, or a multipart body with more than
``max_parts`` parts, is **read to the end and discarded**, then answered 413 (nothing of it is
scanned or answered as clean), so that every client (including those that only read the
response after sending everything) sees the 413 and the connection stays usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import re
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from ... import __version__, observability
from ...gateway import Gateway, Outcome
from ...policy import Context, Disposition
from ...result import ScanStatus
from ...spool import Spool
from .common import Api, denied, error, json_response
from .multipart import MultipartReceiver, Part, TooManyParts
from .settings import HttpSettings

INFECTED_ERROR = "Virus Detected in Attachment"
SCAN_ERROR = "Virus scanner unavailable"
BLOCKED_ERROR = "Blocked by policy"
PART_SCANS = 4  # parts of one request scanned at the same time (each from its own spool)
PART_SCANS_TOTAL = 16  # parts of all requests together (a part's spool: up to spool_memory)
FEED_SLICE = 64 * 1024  # the multipart parser gets at most this much between two yields
_ENHANCED_CODE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} ")


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.0 document of the whole API (package data), with this version."""
    text = importlib.resources.files("avgate").joinpath("data/openapi.json").read_text("utf-8")
    document: dict[str, Any] = json.loads(text)
    document["info"]["version"] = __version__
    return document


class ScanApi(Api):
    """Scanning and service endpoints."""

    def __init__(self, gateway: Gateway) -> None:
        super().__init__(gateway)
        self._part_slots = asyncio.Semaphore(PART_SCANS_TOTAL)

    def routes(self) -> list[Route]:
        return [Route("/v1/scan", self.scan, methods=["POST"]),
                Route("/healthz", self.healthz, methods=["GET"]),
                Route("/metrics", self.metrics, methods=["GET"]),
                Route("/v1/version", self.version, methods=["GET"]),
                Route("/openapi.json", self.openapi, methods=["GET"])]

    async def scan(self, request: Request) -> Response:
        settings = self.settings
        roles = settings.roles_for(request.headers.get("authorization", ""))
        if settings.scan_requires_token and (refused := denied(roles, "scan")) is not None:
            return refused
        authorized = roles is not None and "scan" in roles
        enforce_arg = request.query_params.get("enforce", "false").lower()
        if enforce_arg not in ("true", "false", "1", "0", "yes", "no"):
            return error(400, "enforce must be true or false")
        enforce = enforce_arg in ("true", "1", "yes")
        limit = settings.max_upload_size
        ctype, options = parse_options_header(request.headers.get("content-type", ""))
        if ctype == b"multipart/form-data":
            if not options.get(b"boundary"):
                return error(400, "multipart/form-data without a boundary")
            return await self._scan_multipart(request, options[b"boundary"], settings, enforce,
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

    async def _scan_multipart(self, request: Request, boundary: bytes, settings: HttpSettings,
                              enforce: bool, authorized: bool) -> Response:
        limit, max_parts = settings.max_upload_size, settings.max_parts
        try:
            receiver = MultipartReceiver(boundary, max_parts, self.gateway.config.scan.spool_dir)
        except (ValueError, MultipartParseError) as exc:
            return error(400, f"bad multipart boundary: {exc}")
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
                    refused = error(400, f"malformed multipart body: {exc}")
                    receiver.close()
                except TooManyParts:
                    refused = error(413, f"the multipart body has more than max_parts "
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
                return error(400, f"malformed multipart body: {exc}")
            if not receiver.ended:
                return error(400, "malformed multipart body: it ends before its closing "
                                  "boundary")
            if not receiver.parts:
                return error(400, "no part in the multipart body")
            receiver.finish()
            outcomes = await self._scan_parts(receiver, request, authorized)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening; uvicorn drops it
        finally:
            receiver.close()
        results = [self._result_dict(o, p) for o, p in zip(outcomes, receiver.parts,
                                                           strict=True)]
        return self._answer(results, outcomes, enforce, multipart=True)

    async def _scan_parts(self, receiver: MultipartReceiver, request: Request,
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

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(PART_SCANS, len(parts))):
                    group.create_task(worker())
        except BaseException:
            for o in outcomes:  # no answer will be sent: the lines are written without one
                if o is not None:
                    self.gateway.log_outcome(o)
            raise
        return [o for o in outcomes if o is not None]

    @staticmethod
    def _too_large(limit: int, total: int) -> Response:
        return error(413, f"upload larger than max_upload_size ({limit} bytes)",
                     max_upload_size=limit, size=total)

    def _answer(self, results: list[dict[str, Any]], outcomes: list[Outcome], enforce: bool,
                multipart: bool) -> Response:
        """The response, and each outcome's scan-log line with the HTTP status sent."""
        code = 200
        if enforce:
            blocked = failed = False
            for r, o in zip(results, outcomes, strict=True):
                disposition = o.decision.disposition
                if o.result.banned_only:  # banned file types (avgate.banned), no virus
                    names = ", ".join(o.result.virus_names)
                    r["error"] = f"{BLOCKED_ERROR}: banned content ({names})"
                    blocked = True
                elif r["status"] == ScanStatus.INFECTED.value:
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
        for o in outcomes:
            self.gateway.log_outcome(o, http_status=code)
        return json_response(results if multipart else results[0], code)

    async def _process(self, spool: Spool, field: str, filename: str, request: Request,
                       authorized: bool) -> Outcome:
        spool.finish()
        client = request.client.host if request.client else ""
        ctx = Context(frontend="http", listener="http", client_addr=client,
                      authenticated=authorized, size=spool.size)
        ids = {k: v for k, v in (("field", field), ("filename", filename)) if v} or None
        # the line is written by _answer, with the HTTP status the client got
        return await self.gateway.process(spool, ctx, ids=ids, defer_log=True)

    @staticmethod
    def _result_dict(outcome: Outcome, part: Part | None) -> dict[str, Any]:
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
        return json_response({"status": "ok" if ok else "unavailable", "engines": engines},
                             200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        await self._publish_quarantine_size()
        return Response(generate_latest(observability.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _publish_quarantine_size(self) -> None:
        cfg = self.gateway.config

        def stats() -> tuple[int, int] | None:
            # do not create a file quarantine just to count it; a database is counted as it is
            if cfg.quarantine.backend == "file" and not Path(cfg.quarantine_path).is_dir():
                return None
            return self.gateway.store.stats()

        with contextlib.suppress(Exception):  # the metrics answer never fails for it
            # a directory check, SQLite or a database round trip: off the event loop
            size = await asyncio.to_thread(stats)
            if size is not None:
                observability.set_quarantine_size(*size)

    async def version(self, request: Request) -> Response:
        scanner = self.gateway.scanner
        return json_response({"version": __version__,
                              "engines": [e.info().to_dict() for e in scanner.engines],
                              "db_versions": scanner.db_versions()})

    async def openapi(self, request: Request) -> Response:
        return json_response(openapi_document())

