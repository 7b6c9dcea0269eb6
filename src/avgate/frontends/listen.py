"""Listen addresses and sockets: one grammar, one binder, one Listener protocol.

Every front-end's ``listen`` setting goes through :func:`parse_listen` and every listening
socket through :func:`bind` (uvicorn's ``Config.bind_socket`` is the model: the front-end gets
a bound socket and hands it to its server). ``serve`` passes :class:`ListenOptions` in;
front-ends never depend on the ``serve`` module.

Grammar (``what`` names the setting in error messages)::

    host:port            127.0.0.1:10025, localhost:1344, 0.0.0.0:8080
    [v6]:port            [::1]:3310
    unix:/path           a unix socket (mode and group set by the front-end's settings)
    local:/path          Sendmail's spelling of unix:
    inet:port@host       libmilter's spelling (inet:7357@127.0.0.1); inet:port = all addresses
    inet6:port@host      the same for IPv6 (inet6:7357 = [::])
"""

from __future__ import annotations

import contextlib
import errno
import grp
import ipaddress
import os
import re
import socket
import stat
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from ..errors import AvgateError

_HOSTPORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
DEFAULT_BACKLOG = 512


class ListenError(AvgateError, OSError):
    """A listener could not be opened; the message names the listener, the address and why."""


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed listen address: TCP (host, port) or a unix socket path."""

    kind: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_unix(self) -> bool:
        return self.kind == "unix"

    @property
    def is_loopback(self) -> bool:
        """True for unix sockets and loopback addresses (reachable from this machine only)."""
        if self.kind == "unix":
            return True
        if self.host == "localhost":
            return True
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            return False  # a host name: assume it resolves to a reachable address
        mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 (3.11 misses it)
        return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))

    def resolve(self, base_dir: str) -> Address:
        """A unix path made absolute against ``base_dir`` (the config file's directory)."""
        if self.kind != "unix" or os.path.isabs(self.path):
            return self
        return Address("unix", path=os.path.join(base_dir, self.path))


def parse_listen(text: str, what: str = "listen") -> Address:
    """Parse one listen address (see the module docstring); ``ValueError`` says what is wrong."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"{what}: expected an address like 127.0.0.1:1344 or unix:/path")
    for prefix in ("unix:", "local:"):
        if text.startswith(prefix):
            path = text[len(prefix):]
            if not path or "\0" in path:
                raise ValueError(f"{what}: empty or invalid unix socket path in {text!r}")
            return Address("unix", path=path)
    if text.startswith(("inet:", "inet6:")):
        scheme, _, rest = text.partition(":")
        port_text, _, host = rest.partition("@")
        host = host.strip("[]") or ("::" if scheme == "inet6" else "0.0.0.0")
        return Address("tcp", host=host, port=_port(port_text, text, what))
    m = _HOSTPORT.match(text)
    if not m:
        raise ValueError(f"{what}: expected host:port, [v6]:port, unix:/path or "
                         f"inet:port@host, got {text!r}")
    return Address("tcp", host=m.group(1).strip("[]"), port=_port(m.group(2), text, what))


def _port(port_text: str, text: str, what: str) -> int:
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f"{what}: bad port in {text!r}")
    return int(port_text)


@dataclass(frozen=True, slots=True)
class ListenOptions:
    """What ``serve`` tells every front-end about the process it runs in."""

    reuse_port: bool = False  # several serve workers share each TCP port (SO_REUSEPORT)
    unix_sockets: bool = True  # this process opens the unix-socket listeners (worker 0)
    drain_timeout: float = 30.0  # how long aclose() waits for work in flight
    base_dir: str = "."  # relative unix socket paths are resolved against this


@runtime_checkable
class Listener(Protocol):
    """What ``serve`` needs from every started listener."""

    def describe(self) -> str: ...
    async def aclose(self) -> None: ...


def bind(address: Address, *, what: str, options: ListenOptions = ListenOptions(),
         mode: int | None = None, group: str | int | None = None,
         backlog: int = DEFAULT_BACKLOG) -> socket.socket:
    """A listening, non-blocking socket for ``address``; ``ListenError`` names what failed.

    TCP: SO_REUSEADDR, and SO_REUSEPORT when ``options.reuse_port``. Unix: the directory must
    exist; a stale socket file (nobody accepting on it) is replaced, a live one is an error;
    the socket gets ``mode`` before it is bound (never wider than asked) and ``group``.
    """
    try:
        if address.kind == "unix":
            sock = _bind_unix(address.resolve(options.base_dir).path, what, mode, group)
        else:
            sock = _bind_tcp(address, options.reuse_port)
        sock.listen(backlog)
        sock.setblocking(False)
        return sock
    except ListenError:
        raise
    except OSError as exc:
        raise ListenError(f"{what}: cannot listen on {address}: "
                          f"{exc.strerror or exc}") from exc


def _bind_tcp(address: Address, reuse_port: bool) -> socket.socket:
    infos = socket.getaddrinfo(address.host or None, address.port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, _, proto, _, sockaddr = infos[0]
    # proto must be IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on sockets that say
    # so, and accepted sockets inherit it; without it every reply waits for delayed ACKs
    # (measured: 3 ms -> 48 ms per SMTP message)
    sock = socket.socket(family, socket.SOCK_STREAM, proto or socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_unix(path: str, what: str, mode: int | None, group: str | int | None) -> socket.socket:
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise ListenError(f"{what}: cannot listen on unix:{path}: directory {directory} does "
                          "not exist (create it, owned by the user avgate runs as)")
    gid = group_id(group) if group is not None else None
    _remove_stale(path, what)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if mode is not None:
            os.fchmod(sock.fileno(), mode)  # before bind: the file is never wider than asked
        sock.bind(path)
        if mode is not None:
            os.chmod(path, mode)
        if gid is not None:
            os.chown(path, -1, gid)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale(path: str, what: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"{what}: cannot listen on unix:{path}: it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale: left by a process that died
            return
        raise
    finally:
        probe.close()
    raise ListenError(f"{what}: cannot listen on unix:{path}: another process is listening "
                      "on it")


def group_id(group: str | int) -> int:
    """A group name or number → gid; ``ListenError`` for an unknown group."""
    if isinstance(group, int):
        return group
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ListenError(f"unknown group {group!r}") from None


def parse_mode(value: str) -> int:
    """An octal permission string (``"0660"``) → int; ``ValueError`` otherwise."""
    if not isinstance(value, str) or not re.fullmatch(r"0?[0-7]{3}", value):
        raise ValueError(f'expected an octal mode string like "0660", got {value!r}')
    return int(value, 8)
