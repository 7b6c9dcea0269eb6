"""What the scan API and the quarantine API share: JSON answers, errors, token checks."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ...gateway import Gateway
from .settings import HttpSettings


def json_response(data: Any, status: int = 200,
                  headers: Mapping[str, str] | None = None) -> Response:
    body = json.dumps(data, separators=(",", ":"), default=str, ensure_ascii=False)
    return Response(body, status, headers=headers, media_type="application/json")


def error(status: int, message: str, **extra: Any) -> Response:
    """``{"error": message, ...}``; a 401 says which scheme to use."""
    headers = {"WWW-Authenticate": 'Bearer realm="avgate"'} if status == 401 else None
    return json_response({"error": message, **extra}, status, headers)


def denied(roles: frozenset[str] | None, role: str) -> Response | None:
    """None when ``roles`` include ``role``; else the 401 (no valid token) or 403 answer."""
    if roles is None:
        return error(401, "a valid bearer token is required")
    if role not in roles:
        return json_response({"error": f"this token lacks the {role!r} role"}, 403, {
            "WWW-Authenticate": 'Bearer realm="avgate", error="insufficient_scope"'})
    return None


class Api:
    """A set of routes over the gateway. Every request reads ``gateway.config.http`` afresh
    (through :attr:`settings`), so a reload (tokens, limits) applies to the next request."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    @property
    def settings(self) -> HttpSettings:
        return self.gateway.config.http or HttpSettings()

    def roles(self, request: Request) -> frozenset[str] | None:
        """The roles of the request's bearer token; None without a valid token."""
        return self.settings.roles_for(request.headers.get("authorization", ""))

    def require(self, request: Request, role: str) -> Response | None:
        """None when the request's token has ``role``; else the 401 or 403 answer."""
        return denied(self.roles(request), role)

    def routes(self) -> list[Route]:
        raise NotImplementedError
