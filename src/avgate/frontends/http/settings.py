"""``[http]`` settings, and the bearer tokens with roles that guard the API."""

from __future__ import annotations

import hmac
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from ...limits import GiB
from ...settings import Listen, Secret, Section, Size
from ..listen import parse_listen

Role = Literal["scan", "read", "admin"]
#: scan (POST /v1/scan when scan_requires_token), read (list and show quarantine records),
#: admin (download, release, delete quarantined objects; implies read)
ROLES: tuple[Role, ...] = ("scan", "read", "admin")


class Token(Section):
    """One bearer token and its roles (kept in :data:`ROLES` order, ``admin`` adds ``read``)."""

    token: Secret = Field(repr=False)  # never in a repr, a config message or `config show`
    roles: tuple[Role, ...] = ("scan",)
    name: str = ""  # who holds it: the console's audit lines name the user by it


def _kind(value: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def _token(item: Any, where: str) -> tuple[str, list[Any], str]:
    """(token, roles, name) of one entry of ``tokens``; messages name the entry, never the
    secret."""
    if isinstance(item, Token):
        return item.token, list(item.roles), item.name
    if isinstance(item, str):
        return item, ["scan"], ""
    if not isinstance(item, dict):
        raise ValueError(f'{where}: expected a string or a table {{ token = "...", '
                         f"roles = [...] }}, got {_kind(item)}")
    unknown = sorted(set(item) - {"token", "roles", "name"})
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: name, roles, token)")
    name = item.get("name", "")
    if not isinstance(name, str) or not all(" " <= c <= "~" for c in name) or len(name) > 64:
        raise ValueError(f"{where}.name: expected printable ASCII text of up to 64 characters")
    if "token" not in item:
        raise ValueError(f"{where}: missing key 'token'")
    if not isinstance(item["token"], str):
        raise ValueError(f"{where}.token: expected a string, got {_kind(item['token'])}")
    roles = item.get("roles", ["scan"])
    roles = [roles] if isinstance(roles, str) else roles
    if not isinstance(roles, list | tuple) or not roles or not all(
            isinstance(r, str) for r in roles):
        raise ValueError(f"{where}.roles: expected a non-empty array of roles "
                         f"({', '.join(ROLES)})")
    for role in roles:
        if role not in ROLES:
            raise ValueError(f"{where}.roles: unknown role {role!r} (known: {', '.join(ROLES)})")
    return item["token"], list(roles), name


def _tokens(value: Any) -> tuple[Token, ...]:
    """``tokens``: strings (scan-only tokens) or ``{ token = "...", roles = [...] }`` tables.

    Checked as a whole, by hand rather than field by field, so that no message (pydantic's
    include the input) can ever show a token: they name the entry (``tokens[1].roles``).
    """
    items = value if isinstance(value, list | tuple) else [value]
    out: list[Token] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        where = f"tokens[{i}]"
        token, roles, name = _token(item, where)
        if not token or not all("!" <= c <= "~" for c in token):
            raise ValueError(f"{where}: a token is printable ASCII without spaces, not empty")
        if token in seen:
            raise ValueError(f"{where}: the same token is listed twice")
        seen.add(token)
        if "admin" in roles:
            roles.append("read")
        out.append(Token(token=token, roles=tuple(r for r in ROLES if r in roles), name=name))
    return tuple(out)


class HttpSettings(Section):
    """``[http]``: the HTTP API (``avgate serve``).

    ``listen`` (``"127.0.0.1:8080"``, ``[v6]:port`` or ``unix:/path``), ``tokens`` (bearer
    tokens: a string is a scan-only token, ``{ token = "...", roles = ["read"] }`` gives
    roles: ``scan``, ``read``, ``admin``), ``scan_requires_token`` (false: ``POST /v1/scan``
    is open), ``tls_cert``/``tls_key`` (HTTPS when both are set; relative to the config
    file), ``max_upload_size`` (1 GiB; a larger body is 413, nothing scanned), ``max_parts``
    (1000 parts in one multipart body; more is 413), ``max_connections`` (256 concurrent
    connections), ``idle_timeout`` (60 s a client may stay silent inside a request).
    ``console`` (the web console under ``/console/``, signed in with a ``read`` or ``admin``
    token), ``console_idle_timeout`` (1800 s), ``console_secret`` (the session key; default:
    derived from the tokens, so changing them signs everybody out).
    """

    listen: Listen = parse_listen("127.0.0.1:8080")
    tokens: Annotated[tuple[Token, ...], BeforeValidator(_tokens)] = ()
    scan_requires_token: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    max_upload_size: Size = 1 * GiB
    max_parts: int = Field(default=1000, gt=0)
    max_connections: int = Field(default=256, gt=0)
    idle_timeout: float = Field(default=60.0, gt=0)
    console: bool = False
    console_idle_timeout: float = Field(default=1800.0, gt=0)
    console_secret: Secret = Field(default="", repr=False)

    def roles_for(self, authorization: str) -> frozenset[str] | None:
        """The roles of an ``Authorization`` header's bearer token; None without a valid one.

        The token is compared with every configured token, always: the time taken does not
        reveal which one matched.
        """
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        given = token.encode()
        matched = False
        roles: set[str] = set()
        for entry in self.tokens:
            if hmac.compare_digest(given, entry.token.encode()):
                matched = True
                roles.update(entry.roles)
        return frozenset(roles) if matched else None
