"""The quarantine API, behind bearer tokens with roles.

- ``GET /v1/quarantine`` (role ``read``): records oldest first, filtered by ``virus``,
  ``sender``, ``recipient``, ``listener`` (globs), ``status``, ``frontend``, ``refid``,
  ``subject`` (text in the subject, any case) and ``since``/``until`` (a date range, in the
  time grammar of ``avgate quarantine list --since``, see :func:`avgate.ondemand.parse_since`;
  a naive ISO time is UTC here), paged with ``limit``/``offset``. The filter runs in the store
  (:meth:`~avgate.quarantine.Store.list`, either backend), as for the CLI.
- ``GET /v1/quarantine/{id}`` (``read``), ``GET /v1/quarantine/{id}/raw`` (``admin``).
- ``POST /v1/quarantine/{id}/release`` (``admin``; JSON body ``{"to": [...], "force":
  false}``, optional; every address must be a plausible mailbox, else 400), through
  :func:`avgate.quarantine.release`, to ``[quarantine] next_hop``.
- ``DELETE /v1/quarantine/{id}`` (``admin``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ...errors import NotFound, QuarantineError
from ...ondemand import parse_since
from ...quarantine import (
    AlreadyReleased,
    InvalidAddress,
    RecordFilter,
    parse_addresses,
    release,
)
from .common import Api, error, json_response

MAX_PAGE = 1000  # records in one page (the OpenAPI document states it too)
MAX_RELEASE_TO = 100  # addresses in one release's "to"


class QuarantineApi(Api):
    """List, show, download, release and delete quarantined objects."""

    def routes(self) -> list[Route]:
        return [Route("/v1/quarantine", self.list_records, methods=["GET"]),
                # one route for both methods, so that a 405 lists both in its Allow header
                Route("/v1/quarantine/{id}", self.record, methods=["GET", "DELETE"]),
                Route("/v1/quarantine/{id}/raw", self.raw, methods=["GET"]),
                Route("/v1/quarantine/{id}/release", self.release, methods=["POST"])]

    async def list_records(self, request: Request) -> Response:
        if (refused := self.require(request, "read")) is not None:
            return refused
        # an empty text filter is no filter (form-style clients send every field);
        # limit, offset, since and until must be numbers/times when present
        q = {k: v for k, v in request.query_params.items()
             if v != "" or k in ("limit", "offset", "since", "until")}
        try:
            limit = int(q.get("limit", "100"))
            offset = int(q.get("offset", "0"))
            if not 1 <= limit <= MAX_PAGE or offset < 0:
                raise ValueError
        except ValueError:
            return error(400, f"limit must be 1..{MAX_PAGE} and offset >= 0")
        times: dict[str, float | None] = {}
        for key in ("since", "until"):
            try:
                times[key] = parse_since(q[key], naive_utc=True) if key in q else None
            except ValueError:
                return error(400, f"{key} must be epoch seconds, an ISO 8601 time, @EPOCH or "
                                  "an age such as 3d")
        where = RecordFilter(virus=q.get("virus"), sender=q.get("sender"),
                             recipient=q.get("recipient"), status=q.get("status"),
                             frontend=q.get("frontend"), since=times["since"],
                             refid=q.get("refid"), listener=q.get("listener"),
                             until=times["until"], subject=q.get("subject"))
        # the store may be a database away (backend "postgresql"): off the event loop
        try:
            store = await asyncio.to_thread(lambda: self.gateway.store)
            total = await asyncio.to_thread(store.count, where)
            page = await asyncio.to_thread(store.list, where, limit, offset)
        except QuarantineError as exc:  # the database is down: say so, not a bare 500
            return error(503, f"quarantine unavailable: {exc}")
        nxt = offset + limit if offset + limit < total else None
        return json_response({"items": [r.to_dict() for r in page], "total": total,
                              "offset": offset, "limit": limit, "next_offset": nxt})

    async def record(self, request: Request) -> Response:
        if request.method == "DELETE":
            return await self.delete(request)
        if (refused := self.require(request, "read")) is not None:
            return refused
        try:
            record = await asyncio.to_thread(lambda: self.gateway.store.get(
                request.path_params["id"]))
        except NotFound as exc:
            return error(404, str(exc))
        except QuarantineError as exc:
            return error(503, f"quarantine unavailable: {exc}")
        return json_response(record.to_dict())

    async def raw(self, request: Request) -> Response:
        if (refused := self.require(request, "admin")) is not None:
            return refused
        rid = request.path_params["id"]
        try:
            handle = await asyncio.to_thread(lambda: self.gateway.store.open_raw(rid))
        except NotFound as exc:
            return error(404, str(exc))
        except QuarantineError as exc:
            return error(500, str(exc))

        async def body() -> AsyncIterator[bytes]:
            with handle:
                while chunk := await asyncio.to_thread(handle.read, 1 << 20):
                    yield chunk

        return StreamingResponse(body(), media_type="application/octet-stream", headers={
            "Content-Disposition": f'attachment; filename="{rid}"'})

    async def release(self, request: Request) -> Response:
        if (refused := self.require(request, "admin")) is not None:
            return refused
        rid = request.path_params["id"]
        try:
            to, force = _release_options(await request.body())
        except ValueError:
            return error(400, 'body must be empty or {"to": ["addr", ...], "force": bool}')
        try:
            if to is not None:
                to = parse_addresses(to, limit=MAX_RELEASE_TO)
        except InvalidAddress as exc:
            return error(400, str(exc))
        next_hop = self.gateway.config.quarantine.next_hop
        try:
            store = await asyncio.to_thread(lambda: self.gateway.store)
            record = await release(store, rid, next_hop, to=to, force=force)
        except NotFound as exc:
            return error(404, str(exc))
        except AlreadyReleased as exc:
            if exc.in_flight:  # another gateway is sending it right now
                return error(409, str(exc))
            return error(409, f"{rid} was already released (send \"force\": true to release "
                              "it again)")
        except InvalidAddress as exc:  # the stored envelope holds a bad address: nothing sent
            return error(409, f"release refused: {exc}")
        except QuarantineError as exc:
            return error(502, f"release failed: {exc}")
        return json_response(record.to_dict())

    async def delete(self, request: Request) -> Response:
        if (refused := self.require(request, "admin")) is not None:
            return refused
        rid = request.path_params["id"]
        try:
            await asyncio.to_thread(lambda: self.gateway.store.delete(rid))
        except NotFound as exc:
            return error(404, str(exc))
        return json_response({"deleted": rid})


def _release_options(raw: bytes) -> tuple[list[str] | None, bool]:
    """(to, force) of a release's JSON body (empty: neither); ValueError when malformed."""
    opts: Any = json.loads(raw) if raw.strip() else {}
    if not isinstance(opts, dict) or set(opts) - {"to", "force"}:
        raise ValueError("unexpected body")
    to = opts.get("to")
    force = opts.get("force", False)
    if to is not None and not (isinstance(to, list) and to
                               and all(isinstance(x, str) and x for x in to)):
        raise ValueError("bad to")
    if not isinstance(force, bool):
        raise ValueError("bad force")
    return to, force
