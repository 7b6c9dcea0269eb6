"""The web console (``[http] console = true``): the quarantine for people, under ``/console/``.

Server-rendered pages (Jinja2, autoescaped; no script at all, no CDN: the stylesheet is package
data), signed in with the HTTP API's tokens and their roles: ``read`` sees, ``admin`` also
releases, deletes, reports and downloads. Sessions and CSRF: :mod:`.session`.

- ``/console/quarantine``: newest first, paged, filtered by status, virus, sender, recipient,
  listener, front-end, RefID, a date range (from/to) and text in the subject; the total
  count; the subject as a column. The page links keep the filter (URL-encoded).
- ``/console/quarantine/{id}``: envelope, headers, the MIME tree (each part's name, type, size
  and the findings in it), text parts as escaped text (HTML is never rendered and nothing
  remote is loaded); admin: raw download (an attachment, ``application/octet-stream``),
  release (original or chosen recipients), delete, false-positive report — each confirmed on
  a page of its own and written to the scan log as an ``audit`` line naming the user.
- ``/console/dashboard``: scans, infected, skipped/unknown and errors per hour (24 h) and per
  day (14 days), top findings and mean scan time, read from the tail of the scan log
  (``[log] path``; none without one), as inline SVG made here; engine health and signature
  versions. ``/console/status``: listeners and engines.

Every answer carries a CSP without inline script or style, ``X-Frame-Options: DENY``,
``Referrer-Policy: no-referrer``, ``nosniff`` and ``Cache-Control: no-store``. Redirects go to
fixed paths only (never one taken from the request).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import jinja2
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from ....errors import AvgateError, NotFound, QuarantineError
from ....ondemand import parse_since
from ....quarantine import (
    AlreadyReleased,
    InvalidAddress,
    RecordFilter,
    iso_utc,
    parse_addresses,
    release,
)
from ..common import Api
from .dashboard import dashboard_data
from .message import message_view
from .session import COOKIE, PRE_COOKIE, Session, Sessions

PAGE = 50  # records per list page
VIEW_MAX = 10 * 1024 * 1024  # bytes of a message parsed for its view (the rest is not shown)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")  # a day, no time: "to" that day includes it


STATUSES = ("infected", "skipped", "unknown", "error", "clean")
ACTIONS = ("release", "delete", "report")

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("avgate.frontends.http.console", "templates"),
    autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_env.filters["when"] = iso_utc
_STYLE = resources.files(__package__).joinpath("static/console.css").read_bytes()

Handler = Callable[[Request, Session], Awaitable[Response]]


class ConsoleApi(Api):
    """The console's routes over the gateway (see the module docstring)."""

    def routes(self) -> list[Route]:
        r = [Route("/console", self.home), Route("/console/", self.home),
             Route("/console/signin", self.signin, methods=["GET", "POST"]),
             Route("/console/signout", self.signout, methods=["POST"]),
             Route("/console/static/console.css", self.style),
             Route("/console/quarantine", self._page(self.records)),
             Route("/console/quarantine/{id}", self._page(self.record)),
             Route("/console/quarantine/{id}/raw", self._page(self.raw, "admin")),
             Route("/console/quarantine/{id}/{action}", self._page(self.act, "admin"),
                   methods=["GET", "POST"]),
             Route("/console/dashboard", self._page(self.dashboard)),
             Route("/console/status", self._page(self.status))]
        return r

    # -- plumbing ----------------------------------------------------------------------------
    def _sessions(self) -> Sessions:
        return Sessions(self.settings)

    def _enabled(self) -> bool:
        return self.settings.console

    @staticmethod
    def _secure(request: Request) -> bool:
        return request.url.scheme == "https"

    def _render(self, name: str, status: int = 200, **ctx: Any) -> Response:
        body = _env.get_template(name).render(**ctx)
        return Response(body, status, headers=SECURITY_HEADERS, media_type="text/html")

    def _page(self, handler: Handler, role: str = "read") -> Callable[[Request],
                                                                      Awaitable[Response]]:
        """Wrap a page: the console is on, a valid session with ``role``, CSRF on POST, the
        cookie's idle clock moved on."""
        async def page(request: Request) -> Response:
            if not self._enabled():
                return Response("Not Found", 404, headers=SECURITY_HEADERS)
            sessions = self._sessions()
            session = sessions.check(request.cookies.get(COOKIE))
            if session is None:
                return self._redirect("/console/signin")
            if not session.can(role):
                return self._render("error.html", 403, session=session, csrf="",
                                    message=f"This page needs the {role!r} role.")
            if request.method == "POST":
                form = await request.form()
                if not sessions.csrf_ok(session, str(form.get("csrf", ""))):
                    return self._render("error.html", 403, session=session, csrf="",
                                        message="The form expired; reload the page.")
            response = await handler(request, session)
            refreshed = sessions.touched(session)
            if refreshed:
                self._set_cookie(response, request, refreshed)
            return response
        return page

    def _set_cookie(self, response: Response, request: Request, value: str) -> None:
        response.set_cookie(COOKIE, value, path="/console", httponly=True, samesite="strict",
                            secure=self._secure(request),
                            max_age=int(self.settings.console_idle_timeout))

    @staticmethod
    def _redirect(path: str) -> Response:
        # fixed, local paths only: never a target taken from the request
        return RedirectResponse(path, 303, headers=SECURITY_HEADERS)

    def _audit(self, session: Session, action: str, **fields: Any) -> None:
        log = self.gateway.log
        if log is not None:
            log.log({"event": "audit", "level": "info", "action": action,
                     "frontend": "console", "user": session.user,
                     **{k: v for k, v in fields.items() if v not in (None, "", [])}})

    async def _store(self) -> Any:
        return await asyncio.to_thread(lambda: self.gateway.store)

    # -- sign-in -----------------------------------------------------------------------------
    async def home(self, request: Request) -> Response:
        if not self._enabled():
            return Response("Not Found", 404, headers=SECURITY_HEADERS)
        return self._redirect("/console/quarantine")

    async def style(self, request: Request) -> Response:
        if not self._enabled():
            return Response("Not Found", 404, headers=SECURITY_HEADERS)
        return Response(_STYLE, headers={**SECURITY_HEADERS, "Cache-Control": "max-age=3600"},
                        media_type="text/css")

    async def signin(self, request: Request) -> Response:
        if not self._enabled():
            return Response("Not Found", 404, headers=SECURITY_HEADERS)
        sessions = self._sessions()
        if request.method == "GET":
            nonce = secrets.token_urlsafe(16)
            response = self._render("signin.html", session=None, message="",
                                    csrf=sessions.signin_csrf(nonce))
            response.set_cookie(PRE_COOKIE, nonce, path="/console/signin", httponly=True,
                                samesite="strict", secure=self._secure(request), max_age=600)
            return response
        form = await request.form()
        if not sessions.signin_csrf_ok(request.cookies.get(PRE_COOKIE),
                                       str(form.get("csrf", ""))):
            return self._render("error.html", 403, session=None, csrf="",
                                message="The sign-in form expired; load it again.")
        opened = sessions.sign_in(str(form.get("token", "")).strip())
        if opened is None:
            await asyncio.sleep(0.5)  # a guess costs the guesser time
            nonce = secrets.token_urlsafe(16)
            response = self._render("signin.html", 401, session=None,
                                    message="That token is not valid for the console (it "
                                            "needs the read or admin role).",
                                    csrf=sessions.signin_csrf(nonce))
            response.set_cookie(PRE_COOKIE, nonce, path="/console/signin", httponly=True,
                                samesite="strict", secure=self._secure(request), max_age=600)
            return response
        session, cookie = opened
        self._audit(session, "console-signin", roles=sorted(session.roles))
        response = self._redirect("/console/quarantine")
        self._set_cookie(response, request, cookie)  # always a new session: no fixation
        response.delete_cookie(PRE_COOKIE, path="/console/signin")
        return response

    async def signout(self, request: Request) -> Response:
        if not self._enabled():
            return Response("Not Found", 404, headers=SECURITY_HEADERS)
        sessions = self._sessions()
        session = sessions.check(request.cookies.get(COOKIE))
        form = await request.form()
        if session is not None and sessions.csrf_ok(session, str(form.get("csrf", ""))):
            self._audit(session, "console-signout")
        response = self._redirect("/console/signin")
        response.delete_cookie(COOKIE, path="/console")
        return response

    # -- quarantine --------------------------------------------------------------------------
    async def records(self, request: Request, session: Session) -> Response:
        q = {k: v.strip() for k, v in request.query_params.items() if v.strip()}
        try:
            page = max(1, int(q.get("page", "1")))
        except ValueError:
            page = 1
        problems: list[str] = []
        since = until = None
        if "since" in q:
            try:
                since = parse_since(q["since"], naive_utc=True)
            except ValueError:
                problems.append("“From” must be an age such as 3d or 12h, or an ISO 8601 "
                                "time or date.")
        if "until" in q:
            try:
                until = parse_since(q["until"], naive_utc=True)
                if _DATE_ONLY.match(q["until"]):
                    until += 86400  # "to 2026-12-01" includes that day
            except ValueError:
                problems.append("“To” must be an age such as 1d, or an ISO 8601 time or date.")
        status = q.get("status") if q.get("status") in STATUSES else None
        where = RecordFilter(virus=q.get("virus"), sender=q.get("sender"),
                             recipient=q.get("recipient"), status=status,
                             frontend=q.get("frontend"), since=since, refid=q.get("refid"),
                             listener=q.get("listener"), until=until,
                             subject=q.get("subject"))
        try:
            store = await self._store()
            total = await asyncio.to_thread(store.count, where)
            # newest first: the store lists oldest first, so page from the end
            offset = max(0, total - page * PAGE)
            limit = min(PAGE, total - (page - 1) * PAGE) if total else PAGE
            rows = await asyncio.to_thread(store.list, where, max(limit, 1), offset)
        except QuarantineError as exc:
            return self._render("error.html", 503, session=session,
                                csrf=self._sessions().csrf(session),
                                message=f"The quarantine is unavailable: {exc}")
        rows = list(reversed(rows)) if total else []
        pages = max(1, -(-total // PAGE))
        keep = {k: v for k, v in q.items() if k != "page"}
        return self._render("list.html", session=session, csrf=self._sessions().csrf(session),
                            rows=rows, total=total, page=page, pages=pages, query=keep,
                            statuses=STATUSES, problem=" ".join(problems))

    async def _get(self, rid: str) -> Any:
        store = await self._store()
        return await asyncio.to_thread(store.get, rid)

    async def record(self, request: Request, session: Session) -> Response:
        rid = request.path_params["id"]
        try:
            record = await self._get(rid)
            store = await self._store()

            def read() -> bytes:
                with store.open_raw(rid) as handle:
                    data: bytes = handle.read(VIEW_MAX + 1)
                    return data
            raw = await asyncio.to_thread(read)
        except NotFound:
            return self._not_found(session)
        except QuarantineError as exc:
            return self._render("error.html", 503, session=session,
                                csrf=self._sessions().csrf(session),
                                message=f"The quarantine is unavailable: {exc}")
        view = await asyncio.to_thread(message_view, raw[:VIEW_MAX], record.result)
        return self._render("message.html", session=session,
                            csrf=self._sessions().csrf(session), r=record, view=view,
                            truncated=len(raw) > VIEW_MAX)

    def _not_found(self, session: Session) -> Response:
        return self._render("error.html", 404, session=session,
                            csrf=self._sessions().csrf(session),
                            message="No such quarantine record (deleted or purged?).")

    async def raw(self, request: Request, session: Session) -> Response:
        rid = request.path_params["id"]
        try:
            store = await self._store()
            handle = await asyncio.to_thread(store.open_raw, rid)
        except NotFound:
            return self._not_found(session)
        self._audit(session, "console-download", id=rid)

        async def body() -> Any:
            with handle:
                while chunk := await asyncio.to_thread(handle.read, 1 << 20):
                    yield chunk

        return StreamingResponse(body(), media_type="application/octet-stream", headers={
            **SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{rid}.eml"'})

    async def act(self, request: Request, session: Session) -> Response:
        rid, action = request.path_params["id"], request.path_params["action"]
        if action not in ACTIONS:
            return self._not_found(session)
        csrf = self._sessions().csrf(session)
        try:
            record = await self._get(rid)
        except NotFound:
            return self._not_found(session)
        if request.method == "GET":  # the confirmation page
            return self._render("confirm.html", session=session, csrf=csrf, r=record,
                                action=action, message="")
        form = await request.form()
        try:
            done = await self._carry_out(action, record, str(form.get("to", "")), session,
                                         force=form.get("force") == "1")
        except (InvalidAddress, AlreadyReleased, QuarantineError, AvgateError) as exc:
            return self._render("confirm.html", 409, session=session, csrf=csrf, r=record,
                                action=action, message=str(exc))
        return self._render("done.html", session=session, csrf=csrf, r=record, action=action,
                            message=done)

    async def _carry_out(self, action: str, record: Any, to_text: str, session: Session, *,
                         force: bool) -> str:
        q = self.gateway.config.quarantine
        store = await self._store()
        if action == "delete":
            await asyncio.to_thread(store.delete, record.id)
            self._audit(session, "console-delete", id=record.id, refid=record.refid)
            return f"{record.id} was deleted."
        if action == "report":
            from ....quarantine.release import report

            desk = q.report_address("false-positive")
            if not desk:
                raise QuarantineError("[quarantine] report_fp_to (or report_to) is not "
                                      "configured")
            await report(store, record.id, "false-positive", q.next_hop, q.report_from, desk)
            self._audit(session, "console-report", id=record.id, to=[desk])
            return f"A false-positive report about {record.id} was sent to {desk}."
        chosen = [a for a in to_text.replace(",", " ").split() if a]
        to = parse_addresses(chosen, limit=100) if chosen else None
        released = await release(store, record.id, q.next_hop, to=to, force=force)
        self._audit(session, "console-release", id=record.id, refid=record.refid,
                    to=list(released.released_to), force=force or None)
        return (f"{record.id} was released to {', '.join(released.released_to)} "
                f"at {iso_utc(released.released or time.time())}.")

    # -- overview ----------------------------------------------------------------------------
    async def dashboard(self, request: Request, session: Session) -> Response:
        path = self.gateway.config.log.path
        data = await asyncio.to_thread(dashboard_data, path, time.time())
        engines = await self.gateway.scanner.health()
        return self._render("dashboard.html", session=session,
                            csrf=self._sessions().csrf(session), d=data, engines=engines,
                            db_versions=self.gateway.scanner.db_versions())

    async def status(self, request: Request, session: Session) -> Response:
        cfg = self.gateway.config
        listeners: list[tuple[str, str, str]] = [
            ("smtp " + x.name, str(x.listen), x.mode) for x in cfg.smtp_listeners]
        for name in ("milter", "icap", "http", "clamd_listener", "http_proxy", "pop3_proxy",
                     "imap_proxy", "ftp_proxy"):
            section = getattr(cfg, name, None)
            if section is not None:
                listeners.append((name, str(getattr(section, "listen", "")), ""))
        engines = await self.gateway.scanner.health()
        return self._render("status.html", session=session,
                            csrf=self._sessions().csrf(session), listeners=listeners,
                            engines=engines, db_versions=self.gateway.scanner.db_versions())
