"""HTTP API (Starlette app, uvicorn server in the running event loop).

Settings: :class:`HttpSettings` (``[http]``). Tokens: ``tokens = ["s3cret"]`` gives scan-only
tokens; a table gives roles, ``tokens = ["s3cret", { token = "ops", roles = ["read"] }, {
token = "root", roles = ["admin"] }]``. Roles: ``scan`` (``POST /v1/scan`` when
``scan_requires_token``), ``read`` (list and show quarantine records), ``admin`` (download,
release and delete quarantined objects; implies ``read``). No or an unknown token: 401; a
token without the role: 403.

Modules:

- :mod:`.scan`: ``POST /v1/scan``, ``GET /healthz``, ``GET /metrics``, ``GET /v1/version``,
  ``GET /openapi.json``; :mod:`.multipart` receives multipart bodies for it.
- :mod:`.quarantine`: ``/v1/quarantine`` and ``/v1/quarantine/{id}[/raw|/release]``.
- :mod:`.server`: the listener (``start``), the app, the idle timeout inside a request.

The OpenAPI document served at ``GET /openapi.json`` is package data
(``avgate/data/openapi.json``) and describes exactly these endpoints. No CORS headers are
sent (browsers on other origins cannot read the answers), and there is deliberately no
scan-by-path endpoint: a path from a network client is a traversal risk. Every request reads
``gateway.config.http`` afresh, so a reload (tokens, limits, engines) applies to the next
request.
"""

from __future__ import annotations

from .scan import openapi_document
from .server import HttpListener, build_app, exposure_warnings, start
from .settings import ROLES, HttpSettings, Token

__all__ = ["ROLES", "HttpListener", "HttpSettings", "Token", "build_app", "exposure_warnings",
           "openapi_document", "start"]
