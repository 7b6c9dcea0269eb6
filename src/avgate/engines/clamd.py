"""clamd engine: streams the object to one or more clamd servers with INSTREAM.

Config (``[[engines]] type = "clamd"``): see :class:`ClamdEngineSettings`.

Connections: one connection per scan, no IDSESSION pool. On loopback or a unix socket a
connect costs tens of microseconds, far below a scan, while a pool would have to track
clamd's IdleTimeout, half-closed sessions and which reply belongs to which scan after a
failure. Small objects go out as one write (command + chunk + terminator); larger ones are
streamed from the spool in ``stream_chunk_size`` pieces, never held in memory whole.

Servers, failover, retry and health: :mod:`avgate.engines.upstream`. A failed attempt
(refused, timeout, garbage, closed mid-stream) moves the same scan to the next server; an
ERROR reply is clamd's verdict about this object, not a server failure.

Timeouts: one budget per scan (``[limits] scan_timeout``), spent by every attempt;
``connect_timeout`` and ``scan_timeout`` bound one attempt within it.

Replies: a reply we cannot interpret (garbage, ``UNKNOWN COMMAND``, PONG to INSTREAM, an
endless line) is :class:`~avgate.engines.base.UnparseableReply` → ``unknown``; no whole reply
(refused, reset, timeout, closed before the terminator) and clamd's own ``... ERROR`` are
``error``.

SOCKS5: a ``tcp://`` server can be reached through a SOCKS5 proxy (Sun's SOCKS_HOST/PORT/
USERNAME/PASSWORD): ``socks = "socks5://user:password@host:port"`` for every tcp server of the
engine, or per server in the table form of ``servers``. The proxy resolves the server's
host name (``socks5h`` behaviour); python-socks speaks the proxy protocol. The password is
never shown: ``config show`` and health reports print ``socks5://user:***@host:port``, and
errors name only the proxy's address.
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PlainSerializer,
    ValidationInfo,
    field_validator,
)

from ..errors import EngineError, EngineProtocolError, EngineTimeout, EngineUnavailable
from ..limits import GiB, KiB
from ..protocols import clamd as proto
from ..result import Finding, ScanResult, ScanStatus
from ..settings import Section, Size
from ..spool import Spool
from .base import EngineContext, UnparseableReply
from .upstream import Bound, Clock, Upstream, UpstreamEngine, UpstreamSettings

VERSION_TTL = 60.0  # seconds between lazy VERSION re-queries (db change → cache invalidation)
_READ_SIZE = 4096
# after clamd closes mid-stream (StreamMaxLength), how long to wait for its reply
_REPLY_AFTER_RESET = 1.0

_INSTREAM = proto.encode_command("INSTREAM")
_PING = proto.encode_command("PING")
_VERSION = proto.encode_command("VERSION")


# -- SOCKS5 ------------------------------------------------------------------------------


def parse_socks(url: str) -> tuple[str, int, str, str]:
    """``socks5://[user:password@]host:port`` → (host, port, user, password). Messages never
    repeat the URL (it may hold a password)."""
    split = urllib.parse.urlsplit(url)
    if split.scheme != "socks5":
        raise ValueError("expected socks5://[user:password@]host:port")
    if not split.hostname:
        raise ValueError("missing proxy host (socks5://[user:password@]host:port)")
    try:
        port = split.port
    except ValueError:
        raise ValueError("bad proxy port") from None
    if port is None:
        raise ValueError("missing proxy port (socks5://[user:password@]host:port)")
    if split.path not in ("", "/") or split.query or split.fragment:
        raise ValueError("expected socks5://[user:password@]host:port, nothing after")
    user = urllib.parse.unquote(split.username or "")
    password = urllib.parse.unquote(split.password or "")
    if bool(user) != bool(password):
        raise ValueError("give both user and password, or neither")
    if len(user.encode()) > 255 or len(password.encode()) > 255:  # RFC 1929
        raise ValueError("user and password are at most 255 bytes each")
    return split.hostname, port, user, password


def redact_socks(url: str) -> str:
    """The proxy URL as it may be shown: the password replaced by ``***``."""
    if not url:
        return url
    host, port, user, _ = parse_socks(url)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"socks5://{urllib.parse.quote(user, safe='')}:***@{where}" if user else \
        f"socks5://{where}"


def _check_socks(url: str) -> str:
    if url:  # "" = no proxy (a server entry can override the engine's socks with it)
        parse_socks(url)
    return url


#: a SOCKS5 proxy URL; "" = none. Shown (config show) with its password replaced
SocksUrl = Annotated[str, AfterValidator(_check_socks),
                     PlainSerializer(redact_socks, return_type=str)]


async def socks_connect(url: str, host: str, port: int, seconds: float) -> socket.socket:
    """A connected non-blocking socket to ``host:port`` through the SOCKS5 proxy ``url``
    (the proxy resolves ``host``). Raises OSError (proxy unreachable), TimeoutError or
    EngineUnavailable (the proxy refused: authentication, ruleset, target unreachable)."""
    from python_socks import ProxyError, ProxyType  # only needed when a proxy is configured
    from python_socks.async_.asyncio import Proxy

    phost, pport, user, password = parse_socks(url)
    proxy = Proxy(ProxyType.SOCKS5, phost, pport, username=user or None,
                  password=password or None, rdns=True)
    try:
        return await proxy.connect(dest_host=host, dest_port=port, timeout=max(seconds, 0.001))
    except ProxyError as exc:
        raise EngineUnavailable(f"SOCKS proxy {redact_socks(url)} refused {host}:{port}: "
                                f"{exc}") from None


@dataclass(slots=True, eq=False)
class ClamdServer(Upstream):
    """One configured server: its address, health state and last VERSION."""

    host: str = ""
    port: int = 0
    path: str = ""  # unix socket
    socks: str = field(default="", repr=False)  # SOCKS5 proxy URL (tcp only); a secret
    version: proto.VersionInfo | None = None
    version_at: float = 0.0  # clock time of the last VERSION query

    @property
    def via(self) -> str:
        """The proxy as it may be shown ("" when direct)."""
        return redact_socks(self.socks)

    @classmethod
    def parse(cls, url: str) -> ClamdServer:
        """``tcp://host:port``, ``unix:/path`` (or ``unix:///path``, or a bare ``/path``)."""
        if url.startswith("/"):
            return cls(url, path=url)
        if url.startswith("unix:"):
            path = url[len("unix:"):]
            if path.startswith("//"):
                path = path[2:]
            if not path.startswith("/"):
                raise ValueError(f"unix socket path must be absolute: {url!r}")
            return cls(url, path=path)
        split = urllib.parse.urlsplit(url if "://" in url else f"tcp://{url}")
        if split.scheme != "tcp" or not split.hostname or split.path not in ("", "/"):
            raise ValueError(f"expected tcp://host:port or unix:/path, got {url!r}")
        try:
            port = split.port
        except ValueError:
            raise ValueError(f"bad port in {url!r}") from None
        if port is None:
            raise ValueError(f"missing port in {url!r}")
        return cls(url, host=split.hostname, port=port)

    async def connect(self, seconds: float = 60.0) -> socket.socket:
        """A connected non-blocking socket (the caller closes it); ``seconds`` is passed to
        the SOCKS client (the caller bounds the whole connect anyway)."""
        loop = asyncio.get_running_loop()
        if self.socks:
            sock = await socks_connect(self.socks, self.host, self.port, seconds)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        if self.path:
            targets: list[tuple[int, Any]] = [(socket.AF_UNIX, self.path)]
        else:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            targets = [(info[0], info[4]) for info in infos]
        error: OSError = OSError(f"cannot resolve {self.host}")
        for family, address in targets:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                if family != socket.AF_UNIX:
                    # the terminator chunk is a tiny write after a big one: no Nagle delay
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await loop.sock_connect(sock, address)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
            except BaseException:
                sock.close()
                raise
        raise error


def _server_url(url: str) -> str:
    ClamdServer.parse(url)
    return url


class ClamdServerSettings(Section):
    """One entry of ``servers``: a string is short for ``{ url = "..." }``.

    url: ``tcp://host:port`` / ``unix:/path``
    socks: SOCKS5 proxy for this server (tcp only), overriding the engine's ``socks``;
        ``""`` = connect directly; unset: the engine's
    """

    url: Annotated[str, AfterValidator(_server_url)]
    socks: SocksUrl | None = Field(None, repr=False)

    @field_validator("socks")
    @classmethod
    def _tcp_only(cls, socks: str | None, info: ValidationInfo) -> str | None:
        url = info.data.get("url", "")
        if socks and url and ClamdServer.parse(url).path:
            raise ValueError("a SOCKS5 proxy reaches tcp:// servers only, not unix sockets")
        return socks


def _servers(value: Any) -> Any:
    """One entry or a list of them; each a URL string or a table → a tuple of tables."""
    items = value if isinstance(value, list | tuple) else [value]
    out: list[Any] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"url": item}
        elif not isinstance(item, dict | ClamdServerSettings):
            raise ValueError(f"servers[{i}]: expected a URL string or a table "
                             f"{{ url = \"...\", socks = \"...\" }}")
        out.append(item)
    return tuple(out)


def _check_servers(servers: tuple[Any, ...]) -> tuple[Any, ...]:
    if not servers:
        raise ValueError("list at least one server")
    return servers


def _show_server(entry: ClamdServerSettings) -> Any:
    """``config show``: the plain URL unless the entry has its own proxy (password hidden)."""
    if entry.socks is None:
        return entry.url
    return {"url": entry.url, "socks": redact_socks(entry.socks)}


ServerEntry = Annotated[ClamdServerSettings, PlainSerializer(_show_server)]


class ClamdEngineSettings(UpstreamSettings):
    """``[[engines]] type = "clamd"``.

    servers: ``tcp://host:port`` / ``unix:/path`` (one string or a list), tried per strategy;
        an entry may be a table ``{ url = "...", socks = "socks5://..." }``
    socks: SOCKS5 proxy (``socks5://[user:password@]host:port``) for every ``tcp://`` server
        of this engine (unset: connect directly; unix sockets always connect directly)
    stream_chunk_size: bytes per INSTREAM chunk (e.g. "64 KiB"; 1 byte to 1 GiB)
    strategy, connect_timeout, scan_timeout, retry_after, max_failures: see UpstreamSettings
    """

    type: Literal["clamd"] = "clamd"
    name: str = "clamd"
    servers: Annotated[tuple[ServerEntry, ...], BeforeValidator(_servers),
                       AfterValidator(_check_servers)] = (
        ClamdServerSettings(url="tcp://127.0.0.1:3310"),
        ClamdServerSettings(url="unix:/run/clamav/clamd.ctl"))
    socks: SocksUrl | None = Field(None, repr=False)
    stream_chunk_size: Size = 64 * KiB

    def server_list(self) -> list[ClamdServer]:
        """The servers to build, each with its proxy (its own ``socks``, else the engine's;
        tcp servers only)."""
        out: list[ClamdServer] = []
        for entry in self.servers:
            socks = entry.socks if entry.socks is not None else self.socks
            server = ClamdServer.parse(entry.url)
            if socks and not server.path:
                server.socks = socks
            out.append(server)
        return out

    @field_validator("stream_chunk_size")
    @classmethod
    def _chunk_size(cls, size: int) -> int:
        if size > GiB:
            raise ValueError("stream_chunk_size must be between 1 byte and 1 GiB")
        return size


class ClamdEngine(UpstreamEngine[ClamdServer]):
    """Scans through clamd's INSTREAM command."""

    type_name: ClassVar[str] = "clamd"
    Settings = ClamdEngineSettings

    def __init__(self, settings: ClamdEngineSettings, ctx: EngineContext, *,
                 clock: Clock = time.monotonic) -> None:
        super().__init__(settings, settings.server_list(), ctx, clock)
        self.settings = settings

    @classmethod
    def from_settings(cls, settings: ClamdEngineSettings, ctx: EngineContext) -> ClamdEngine:
        return cls(settings, ctx)

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Ask every server for its VERSION; a server that is down now is not an error."""
        await asyncio.gather(*(self._fetch_version(s) for s in self.servers))

    def version(self) -> str:
        """clamd's VERSION string (program/db version/db date) of the first server known."""
        for s in self.servers:
            if s.version is not None:
                return s.version.raw
        return ""

    def db_version(self) -> str:
        """The database part of VERSION of every server (joined with ``|`` if they differ).

        Re-queried in the background once the answer is older than ``VERSION_TTL``, so the
        verdict cache follows clamd's database reloads without slowing a scan; changes too
        after a reply we could not parse (see ``cache_epoch``).
        """
        now = self.clock()
        if any(now - s.version_at > VERSION_TTL for s in self.servers):
            self._schedule_refresh()
        return "|".join(dict.fromkeys(s.version.db for s in self.servers if s.version)) + \
            self.cache_epoch()

    async def health(self) -> dict[str, Any]:
        """PING every server; ``ok`` when at least one answers."""
        async def ping(server: ClamdServer) -> dict[str, Any]:
            reply = await self._command(server, _PING, "PING")
            if reply.kind is not proto.ReplyKind.PONG:
                raise UnparseableReply(f"unexpected PING reply {reply.text[:80]!r}")
            return {}

        def describe(s: ClamdServer) -> dict[str, Any]:
            return {"version": s.version.raw if s.version else "",
                    **({"socks": s.via} if s.socks else {})}

        ok, reports = await self.upstreams.health(ping, describe)
        return {"name": self.name, "type": self.type_name, "ok": ok, "servers": reports}

    # -- scanning ------------------------------------------------------------------------
    async def _scan(self, spool: Spool, deadline: float) -> ScanResult:
        async def attempt(server: ClamdServer) -> tuple[ClamdServer, proto.Reply]:
            return server, await self._instream(server, spool, deadline)

        server, reply = await self.upstreams.call(attempt, deadline)
        return self._result(server, reply)

    def _result(self, server: ClamdServer, reply: proto.Reply) -> ScanResult:
        if reply.kind is proto.ReplyKind.OK:
            return ScanResult(ScanStatus.CLEAN)
        if reply.kind is proto.ReplyKind.FOUND:
            return ScanResult(ScanStatus.INFECTED,
                              findings=(Finding(reply.virus, engine=self.name, part=""),))
        if reply.size_limit_exceeded:
            return ScanResult(ScanStatus.SKIPPED,
                              reason=f"{self.name}: larger than clamd's StreamMaxLength "
                                     f"({server.url}: {reply.text})")
        return ScanResult.error(f"{self.name}: {server.url}: {reply.text}")

    async def _instream(self, server: ClamdServer, spool: Spool, deadline: float
                        ) -> proto.Reply:
        started = time.perf_counter()
        try:
            reply = await self._instream_on(server, spool, deadline)
        except EngineError as exc:
            self._debug(server, "INSTREAM", started, size=spool.size, error=str(exc))
            raise
        self._debug(server, "INSTREAM", started, size=spool.size, reply=reply.text[:200])
        return reply

    def _debug(self, server: ClamdServer, command: str, started: float, **fields: Any) -> None:
        if server.socks:
            fields["socks"] = server.via
        self.debug_request(server.url, command, started, **fields)

    async def _instream_on(self, server: ClamdServer, spool: Spool, deadline: float
                           ) -> proto.Reply:
        sock = await self._connect(server, deadline)
        bound = Bound.of(self.settings.scan_timeout, deadline)
        try:
            async with asyncio.timeout_at(bound.when):
                try:
                    await self._send_stream(sock, spool)
                except OSError as exc:
                    # clamd closes as soon as StreamMaxLength is exceeded, often while we
                    # are still sending; its reply is then already in our receive buffer.
                    try:
                        async with asyncio.timeout(_REPLY_AFTER_RESET):
                            reply = await _read_reply(sock)
                    except UnparseableReply:
                        raise
                    except (TimeoutError, EngineError):
                        raise EngineProtocolError(
                            f"connection lost while streaming: {exc.strerror or exc}"
                        ) from exc
                else:
                    reply = await _read_reply(sock)
        except TimeoutError:
            raise EngineTimeout(f"no reply within {bound}") from None
        finally:
            sock.close()
        if reply.kind not in (proto.ReplyKind.OK, proto.ReplyKind.FOUND, proto.ReplyKind.ERROR):
            raise UnparseableReply(f"unexpected INSTREAM reply {reply.text[:80]!r}")
        return reply

    async def _send_stream(self, sock: socket.socket, spool: Spool) -> None:
        loop = asyncio.get_running_loop()
        size = spool.size
        chunk_size = self.settings.stream_chunk_size
        if size <= chunk_size:
            # the common case (mail parts): one send() for command, data and terminator
            head = _INSTREAM + proto.chunk_header(size) if size else _INSTREAM
            await loop.sock_sendall(sock, head + spool.getbuffer() + proto.INSTREAM_END)
            return
        head = _INSTREAM
        sent = 0
        for chunk in spool.chunks(chunk_size):
            sent += len(chunk)
            tail = proto.INSTREAM_END if sent >= size else b""
            # sock_sendall returns once the kernel took it all: one chunk in flight at most
            await loop.sock_sendall(sock, head + proto.chunk_header(len(chunk)) + chunk + tail)
            head = b""
        if sent < size:  # the file shrank under us; still end the stream properly
            await loop.sock_sendall(sock, proto.INSTREAM_END)

    async def _connect(self, server: ClamdServer, deadline: float) -> socket.socket:
        bound = Bound.of(self.settings.connect_timeout, deadline)
        try:
            async with asyncio.timeout_at(bound.when):
                return await server.connect(bound.seconds)
        except TimeoutError:
            raise EngineTimeout(f"connect timeout after {bound}") from None
        except OSError as exc:
            raise EngineUnavailable(f"cannot connect: {exc.strerror or exc}") from exc

    async def _command(self, server: ClamdServer, command: bytes, name: str) -> proto.Reply:
        """Send a one-line command (PING, VERSION) and read its reply: connecting and the
        reply each get ``connect_timeout``."""
        started = time.perf_counter()
        try:
            reply = await self._command_on(server, command)
        except EngineError as exc:
            self._debug(server, name, started, error=str(exc))
            raise
        self._debug(server, name, started, reply=reply.text[:200])
        return reply

    async def _command_on(self, server: ClamdServer, command: bytes) -> proto.Reply:
        timeout = self.settings.connect_timeout
        sock = await self._connect(server, self.deadline(timeout))
        try:
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_sendall(sock, command)
                return await _read_reply(sock)
        except TimeoutError:
            raise EngineTimeout(f"no reply within {timeout:g}s") from None
        except OSError as exc:
            raise EngineUnavailable(f"connection failed: {exc.strerror or exc}") from exc
        finally:
            sock.close()

    async def _fetch_version(self, server: ClamdServer) -> None:
        server.version_at = self.clock()  # also on failure: no retry storm
        try:
            reply = await self._command(server, _VERSION, "VERSION")
            server.version = proto.parse_version(reply.text)
        except (EngineError, ValueError) as exc:
            server.last_error = f"VERSION: {exc}"


async def _read_reply(sock: socket.socket) -> proto.Reply:
    """Read one z-terminated reply. EOF before the terminator is a protocol error (no whole
    reply: ``error``); a reply longer than any clamd sends is garbage (``unknown``)."""
    loop = asyncio.get_running_loop()
    buf = proto.ReplyReader(proto.Prefix.Z)
    while True:
        try:
            raw = buf.next_reply()
        except proto.ClamdProtocolError as exc:
            raise UnparseableReply(str(exc)) from exc
        if raw is not None:
            return proto.parse_reply(raw)
        try:
            data = await loop.sock_recv(sock, _READ_SIZE)
        except OSError as exc:
            raise EngineProtocolError(f"connection lost: {exc.strerror or exc}") from exc
        if not data:
            pending = buf.pending
            detail = f" after {pending[:80]!r}" if pending else ""
            raise EngineProtocolError(f"connection closed without a reply{detail}")
        buf.feed(data)

