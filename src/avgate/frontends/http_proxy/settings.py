"""``[http_proxy]`` and its ``[[http_proxy.acl]]`` tables.

Every key has its default here, once; the proxy reads ``gateway.config.http_proxy`` per
request, so a reload applies from the next request (``listen`` needs a restart).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator

from ...limits import KiB
from ...policy import Networks, SizeRange, Statuses
from ...settings import Listen, Section, Size, StrTuple
from ...trickle import TrickleSettings
from ..listen import parse_listen

__all__ = ["AclSettings", "HttpProxySettings", "parse_parent"]


def parse_parent(value: str) -> tuple[str, int]:
    """``"http://host:port"`` (the port defaults to 3128) → (host, port); ``ValueError``."""
    from .headers import split_authority

    if not isinstance(value, str) or not value.lower().startswith("http://"):
        raise ValueError(f'expected a parent proxy like "http://host:3128", got {value!r}')
    rest = value[len("http://"):].rstrip("/")
    if not rest or "/" in rest or "@" in rest:
        raise ValueError(f'expected a parent proxy like "http://host:3128", got {value!r}')
    return split_authority(rest, 3128)


def _parent(value: Any) -> Any:
    if value is not None:
        parse_parent(value)
    return value


def _methods(value: Any) -> Any:
    items = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list) \
        else value
    if isinstance(items, tuple):
        for m in items:
            if not isinstance(m, str) or not m.isalpha():
                raise ValueError(f"not an HTTP method: {m!r}")
        return tuple(m.upper() for m in items)
    return items


def _ports(value: Any) -> Any:
    items = (value,) if isinstance(value, int) else tuple(value) if isinstance(value, list) \
        else value
    if isinstance(items, tuple):
        for p in items:
            if isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 65536:
                raise ValueError(f"not a port: {p!r}")
    return items


def _acl_tables(value: Any) -> Any:
    if not isinstance(value, list | tuple):
        raise ValueError("expected [[http_proxy.acl]] tables")
    return tuple(value)


Methods = Annotated[tuple[str, ...], BeforeValidator(_methods)]
Ports = Annotated[tuple[int, ...], BeforeValidator(_ports)]


class AclSettings(Section):
    """``[[http_proxy.acl]]``: one access rule; the first whose conditions all match decides.

    Conditions (absent: any): ``clients`` (networks), ``hosts`` (globs over the destination
    host, case-insensitive), ``urls`` (globs over the absolute URL), ``methods``, ``ports``
    (destination ports), ``content_types`` (globs over the type *detected from the bytes*:
    ``application/zip``, ``application/gzip``, ``application/x-7z-compressed``,
    ``application/x-xz``, ``application/x-bzip2``, ``application/x-tar``, ``message/rfc822``,
    the media types with a signature (``image/png``...), else ``application/octet-stream``),
    ``declared_types`` (globs over the Content-Type header), ``size`` (the body's size,
    declared or received: ``"0-10 MiB"``, ``"1 GiB-"``).

    ``action``: ``scan`` (default), ``pass`` (forward without scanning; a CONNECT tunnel is
    never inspected, so for CONNECT scan and pass both mean "open the tunnel") or ``deny``
    (403). ``accept``: the scan statuses delivered (``["clean", "skipped"]``); anything else
    gets the block page. Absent: the policy decides (``[policy]``, front-end
    ``http_proxy``).
    """

    name: str = ""
    clients: Networks = ()
    hosts: StrTuple = ()
    urls: StrTuple = ()
    methods: Methods = ()
    ports: Ports = ()
    content_types: StrTuple = ()
    declared_types: StrTuple = ()
    size: SizeRange | None = None
    action: Literal["scan", "pass", "deny"] = "scan"
    accept: Statuses | None = None

    @field_validator("hosts", "content_types", "declared_types")
    @classmethod
    def _lower(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(p.lower() for p in patterns)


class HttpProxySettings(Section):
    """``[http_proxy]``: the scanning HTTP/1.1 forward proxy (``avgate serve``).

    ``listen`` (``"127.0.0.1:3128"``), ``parent`` (``"http://host:port"``: every request
    goes through that proxy; default: direct), ``connect_timeout`` (10 s), ``read_timeout``
    (60 s without a byte from upstream → 504), ``idle_timeout`` (60 s: a keep-alive client
    connection with no request, or a tunnel with no traffic, is closed), ``header_timeout``
    (30 s for a whole request head from its first byte: slowloris), ``max_header_size``
    (64 KiB for the request line and headers; 431 past it), ``max_request_line`` (8 KiB; 414
    past it), ``max_connections`` (256 clients at once; 503 past it),
    ``max_requests_per_connection`` (1000), ``allowed_clients`` (networks that may use the
    proxy at all; others get 403 and are closed; default: anyone who can connect — the
    default listener is loopback), ``via`` (the pseudonym in the ``Via`` header and
    the loop check; default the host name), ``block_page`` (template file, as ``[icap]
    block_page``), ``acl`` (``[[http_proxy.acl]]``, see :class:`AclSettings`; after them: a
    CONNECT to port 443 is tunnelled, any other CONNECT denied, everything else scanned),
    ``trickle`` (``[http_proxy.trickle]``, see :class:`avgate.trickle.TrickleSettings`).
    """

    listen: Listen = parse_listen("127.0.0.1:3128")
    parent: Annotated[str | None, BeforeValidator(_parent)] = None
    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=60.0, gt=0)
    idle_timeout: float = Field(default=60.0, gt=0)
    header_timeout: float = Field(default=30.0, gt=0)
    max_header_size: Size = 64 * KiB
    max_request_line: Size = 8 * KiB
    max_connections: int = Field(default=256, gt=0)
    max_requests_per_connection: int = Field(default=1000, gt=0)
    allowed_clients: Networks = ()
    via: str = Field(default="", pattern=r"^[A-Za-z0-9._-]{0,64}$")
    block_page: str | None = None
    acl: Annotated[tuple[AclSettings, ...], BeforeValidator(_acl_tables)] = ()
    trickle: TrickleSettings = TrickleSettings()
