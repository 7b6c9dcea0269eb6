"""``[[http_proxy.acl]]`` matching (pure: no I/O), Kernun style — the first match wins.

A request is matched twice: when its head arrives (client, method, host, port, URL) and,
when an ACL that could match also looks at the object (``content_types``,
``declared_types``, ``size``), again once the object's first bytes are known. So an ACL
naming a content type never lets a request through before its bytes were looked at, and
rules keep their order. After the configured ACLs come the built-in ones: CONNECT to port
443 is tunnelled, any other CONNECT is denied, everything else is scanned.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from ...content.filetype import Kind, detect
from ...result import ScanStatus
from ..icap_skip import MEDIA_SIGNATURES, media_agrees
from .settings import AclSettings

__all__ = ["DEFAULT_ACLS", "Acl", "Request", "Subject", "detected_types", "first_match"]

#: bytes of a body looked at for its type (``content_types``)
SNIFF_BYTES = 512

_KIND_TYPES = {
    Kind.ZIP: "application/zip", Kind.GZIP: "application/gzip",
    Kind.BZIP2: "application/x-bzip2", Kind.XZ: "application/x-xz",
    Kind.SEVENZIP: "application/x-7z-compressed", Kind.TAR: "application/x-tar",
    Kind.MAIL: "message/rfc822",
}


def detected_types(head: bytes) -> tuple[str, ...]:
    """The media types ``head`` (a body's first bytes) carries the signature of; at least
    ``application/octet-stream``."""
    found = [media for media in MEDIA_SIGNATURES if media_agrees(media, head)]
    kind = detect(head)
    if kind in _KIND_TYPES:
        found.append(_KIND_TYPES[kind])
    return tuple(found) or ("application/octet-stream",)


@dataclass(frozen=True, slots=True)
class Request:
    """What is known of a request when its head arrives."""

    client: str
    method: str
    host: str
    port: int
    url: str


@dataclass(frozen=True, slots=True)
class Subject:
    """What is known of an object (a response or an upload body) after its first bytes."""

    declared_type: str = ""
    head: bytes = b""
    size: int | None = None  # declared Content-Length or bytes received; None: unknown

    def types(self) -> tuple[str, ...]:
        return detected_types(self.head)


@dataclass(frozen=True, slots=True)
class Acl:
    """One compiled ACL (networks parsed)."""

    settings: AclSettings
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def compile(cls, settings: AclSettings) -> Acl:
        return cls(settings, tuple(ipaddress.ip_network(n, strict=False)
                                   for n in settings.clients))

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def action(self) -> str:
        return self.settings.action

    @property
    def needs_object(self) -> bool:
        """Whether this ACL looks at the object (its type or size), not only the request."""
        s = self.settings
        return bool(s.content_types or s.declared_types or s.size is not None)

    def accepts(self, status: ScanStatus) -> bool | None:
        """Whether ``status`` is delivered under this ACL; None: the policy decides."""
        accept = self.settings.accept
        return None if accept is None else status.value in accept

    def matches_request(self, req: Request) -> bool:
        s = self.settings
        if self.networks:
            try:
                ip = ipaddress.ip_address(req.client)
            except ValueError:
                return False
            mapped = getattr(ip, "ipv4_mapped", None)
            if not any(ip in n or (mapped is not None and mapped in n) for n in self.networks):
                return False
        if s.methods and req.method.upper() not in s.methods:
            return False
        if s.ports and req.port not in s.ports:
            return False
        if s.hosts and not any(fnmatch.fnmatchcase(req.host.lower(), p) for p in s.hosts):
            return False
        return not (s.urls and not any(fnmatch.fnmatchcase(req.url, p) for p in s.urls))

    def matches_object(self, obj: Subject) -> bool:
        s = self.settings
        if s.declared_types and not any(fnmatch.fnmatchcase(obj.declared_type, p)
                                        for p in s.declared_types):
            return False
        if s.content_types:
            types = obj.types()
            if not any(fnmatch.fnmatchcase(t, p) for t in types for p in s.content_types):
                return False
        if s.size is not None:
            if obj.size is None:
                return False
            lo, hi = s.size
            if not lo <= obj.size <= hi:
                return False
        return True


DEFAULT_ACLS: tuple[Acl, ...] = (
    Acl.compile(AclSettings(name="default:connect-443", methods=("CONNECT",), ports=(443,),
                            action="pass")),
    Acl.compile(AclSettings(name="default:connect", methods=("CONNECT",), action="deny")),
    Acl.compile(AclSettings(name="default:scan", action="scan")),
)


def compile_acls(settings: Sequence[AclSettings]) -> tuple[Acl, ...]:
    """The configured ACLs followed by :data:`DEFAULT_ACLS`."""
    return (*(Acl.compile(s) for s in settings), *DEFAULT_ACLS)


def first_match(acls: Sequence[Acl], req: Request, obj: Subject | None) -> Acl | None:
    """The first ACL matching ``req`` (and ``obj``); None when ``obj`` is None and an ACL
    that looks at the object comes first (ask again once the object's bytes are known).
    The built-in last ACL matches everything, so with ``obj`` given there is always one."""
    for acl in acls:
        if not acl.matches_request(req):
            continue
        if not acl.needs_object:
            return acl
        if obj is None:
            return None
        if acl.matches_object(obj):
            return acl
    return None
