"""Request targets and header handling of the proxy (pure functions, no I/O).

RFC 9110 7.6.1 / RFC 9112: a proxy removes the hop-by-hop fields before it forwards a
message — ``Connection`` and every field it names, ``Keep-Alive``, ``Proxy-Connection``,
``Proxy-Authenticate``, ``Proxy-Authorization``, ``TE``, ``Trailer``, ``Transfer-Encoding``
and ``Upgrade`` — adds itself to ``Via``, and takes the host from an absolute-form target,
never from ``Host`` (RFC 9112 3.2.2: the ``Host`` field is replaced by the target's
authority). Framing (``Content-Length``/chunked) is set by h11 for each side separately.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = ["HOP_BY_HOP", "ProxyTarget", "TargetError", "check_head", "forward_headers",
           "is_loopback", "parse_target", "split_authority", "via_loop"]

#: fields that describe one connection, never forwarded (plus those Connection names)
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})

Headers = list[tuple[bytes, bytes]]


class TargetError(ValueError):
    """A request target the proxy cannot serve; ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class ProxyTarget:
    """Where a request goes: ``host`` (lower case, IPv6 without brackets), ``port``,
    ``path`` (origin-form, for the origin server) and ``url`` (absolute, for a parent proxy
    and the logs). For CONNECT, ``path`` and ``url`` are ``host:port``."""

    host: str
    port: int
    path: str
    url: str

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 80 else f"{host}:{self.port}"


def split_authority(text: str, default_port: int) -> tuple[str, int]:
    """``host[:port]`` / ``[v6][:port]`` → (host, port); ``ValueError`` for anything else."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"bad authority {text!r}")
        host, rest = text[1:end], text[end + 1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad IPv6 address in {text!r}") from None
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad authority {text!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
        if not host or any(not (c.isalnum() or c in "-._~") for c in host):
            raise ValueError(f"bad host in {text!r}")
    if port_text:
        if not port_text.isdigit() or len(port_text) > 5 or not 0 < int(port_text) < 65536:
            raise ValueError(f"bad port in {text!r}")
        port = int(port_text)
    else:
        port = default_port
    return host.lower(), port


def parse_target(method: bytes, target: bytes) -> ProxyTarget:
    """The absolute-form (``http://host[:port]/path``) or, for CONNECT, authority-form
    (``host:port``) target of a proxy request; :class:`TargetError` otherwise."""
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise TargetError(400, "request target is not ASCII") from None
    if method == b"CONNECT":
        try:
            host, port = split_authority(text, 0)
        except ValueError as exc:
            raise TargetError(400, f"CONNECT needs host:port: {exc}") from None
        if port == 0:
            raise TargetError(400, "CONNECT needs host:port")
        return ProxyTarget(host, port, text, text)
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise TargetError(400, "this is a proxy: the request target must be an absolute "
                               "http:// URL")
    if scheme.lower() != "http":
        raise TargetError(501, f"only http:// URLs are proxied (https through CONNECT), "
                               f"not {scheme[:16]!r}")
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0),
              default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if "@" in authority:
        raise TargetError(400, "user information in the URL is not accepted")
    try:
        host, port = split_authority(authority, 80)
    except ValueError as exc:
        raise TargetError(400, str(exc)) from None
    path = path.split("#", 1)[0]
    if not path.startswith("/"):
        path = "/" + path
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}{'' if port == 80 else f':{port}'}{path}"
    return ProxyTarget(host, port, path, url)


def check_head(method: bytes, target: bytes, headers: Headers, *, max_request_line: int,
               max_header_size: int) -> ProxyTarget:
    """Check a request head h11 has parsed, and parse its target; :class:`TargetError`
    (414, 431, 400 for Content-Length with Transfer-Encoding: a smuggling form that h11
    would accept, taking the chunked framing; RFC 9112 6.1 lets a server refuse it)."""
    if len(target) > max_request_line:
        raise TargetError(414, f"request target over max_request_line ({max_request_line} "
                               "bytes)")
    size = len(target) + len(method) + sum(len(n) + len(v) + 4 for n, v in headers)
    if size > max_header_size:
        raise TargetError(431, f"request head over max_header_size ({max_header_size} bytes)")
    if header(headers, b"transfer-encoding") is not None and \
            header(headers, b"content-length") is not None:
        raise TargetError(400, "Content-Length together with Transfer-Encoding (request "
                               "smuggling) refused")
    return parse_target(method, target)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a literal address or ``localhost``) is this machine's loopback."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or ip.is_unspecified
                or (mapped is not None and mapped.is_loopback))


def connection_tokens(headers: Headers) -> set[bytes]:
    """The field names ``Connection`` lists (lower case)."""
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return names


def forward_headers(headers: Headers, *, via: str, version: bytes, host: str | None = None,
                    drop: frozenset[bytes] = frozenset()) -> Headers:
    """``headers`` without the hop-by-hop fields (and those ``Connection`` names, and
    ``drop``), ``Host`` replaced by ``host`` when given, our ``Via`` entry appended."""
    remove = HOP_BY_HOP | connection_tokens(headers) | drop
    if host is not None:
        remove = remove | {b"host"}
    out: Headers = []
    if host is not None:
        out.append((b"Host", host.encode("ascii")))
    via_values: list[bytes] = []
    for name, value in headers:
        low = name.lower()
        if low in remove:
            continue
        if low == b"via":
            via_values.append(value)
            continue
        out.append((name, value))
    proto = version.decode("ascii", "replace")
    via_values.append(f"{proto} {via}".encode("ascii"))
    out.append((b"Via", b", ".join(via_values)))
    return out


def via_loop(headers: Headers, via: str) -> bool:
    """Whether a ``Via`` entry names this proxy (the request came through it already)."""
    me = via.encode("ascii").lower()
    for name, value in headers:
        if name.lower() == b"via":
            for entry in value.split(b","):
                parts = entry.strip().split()
                if len(parts) >= 2 and parts[1].lower() == me:
                    return True
    return False


def header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of ``name`` (lower case), or None."""
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


def content_length(headers: Headers) -> int | None:
    """The declared body length (h11 has already checked and merged it), or None."""
    value = header(headers, b"content-length")
    return int(value) if value is not None and value.isdigit() else None


def media_type(headers: Headers) -> str:
    """The Content-Type's media type, lower case, no parameters ("" when absent)."""
    value = header(headers, b"content-type")
    if value is None:
        return ""
    return value.split(b";", 1)[0].strip().decode("latin-1").lower()
