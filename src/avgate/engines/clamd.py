"""clamd engine: sends the object to one or more clamd servers with INSTREAM or FILDES,
on pooled IDSESSION connections.

Config (``[[engines]] type = "clamd"``): see :class:`ClamdEngineSettings`.

Connections: each server keeps up to ``session_pool`` IDSESSION connections per serve
process (default 16), one scan at a time on each. A new connection per scan cost avgate
about 130 µs of CPU of a ~470 µs 20 KB scan, and clamd about 140 µs (numbers below). A
scan takes the most recently used idle
session, else opens one while the pool has room, else uses a plain one-shot connection;
nobody waits for a session. Only objects that go out in one write (up to
``stream_chunk_size``) or by FILDES use sessions: a big stream gains nothing from reuse and
may hit StreamMaxLength, after which clamd closes the connection.

Every session reply must carry the id of the request just sent
(:class:`~avgate.protocols.clamd.ClientSession`). On any doubt about a reused session — it
was closed (clamd's ReadTimeout, a restart), a reply without our id or with another one,
garbage, an ERROR reply (MaxQueue, ...), bytes nobody asked for — the session is closed
and the scan redone once on a plain connection within the same attempt's bound; a broken
session is no server failure. A new session's first answer is the server's, as on a plain
connection. A timeout closes the session and fails the attempt. Idle sessions are checked
with a non-blocking peek before use and ENDed after ``session_idle_timeout`` (default 20
s); clamd 1.4 itself drops an idle session after its ReadTimeout (default 120 s; IdleTimeout
is for its idle threads).

FILDES (unix sockets only; ``fildes``): instead of streaming, the object's descriptor goes
to clamd with SCM_RIGHTS and clamd scans it in place, with no temp-file copy on its side. The
descriptor is of exactly the bytes that were hashed: a disk spool's own private file
(mkstemp, written once, reopened read-only and checked: our regular file of the hashed
size), or, with ``fildes = "always"``, a memfd holding an in-memory spool, sealed against
writes, growth and shrinking before clamd sees it. clamd's StreamMaxLength does not apply
to FILDES, so objects over ``fildes_max_size`` are streamed. A refusal (``No file descriptor
received``, ``UNKNOWN COMMAND``, anything but an ``fd[N]:`` verdict) switches that server to
INSTREAM for the life of the process and the scan is redone with INSTREAM.

Measured (a clamd of tests/clamd_daemon.py on its unix socket, unique 20 KB objects,
C=16, CPU of avgate's process per scan, median of 3 rounds on the shared 2-core machine;
details in the issue-19 part of bench/ANALYSIS.md): objects in memory — new connection +
INSTREAM 472 µs, IDSESSION 341 µs, sealed-memfd FILDES 451 µs, both 354 µs (clamd's CPU
780 / 640 / 520 / 450 µs): the memfd spares clamd its temp-file copy but not avgate any
CPU, so in-memory objects are streamed unless ``fildes = "always"``. Objects on disk —
INSTREAM 475 µs, IDSESSION 355 µs, FILDES 368 µs, both 298 µs.

Small objects go out as one write (command + chunk + terminator; on a session one
``sendmsg`` of the head, the spool's own buffer and the terminator: the object is not
copied into a joined request); larger ones are streamed from the spool in
``stream_chunk_size`` pieces, never held in memory whole. A session scan is bounded by one
timer handle on its reply wait (no ``asyncio.timeout`` per scan).

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

import array
import asyncio
import contextlib
import fcntl
import os
import socket
import stat
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

from .. import observability
from ..errors import EngineError, EngineProtocolError, EngineTimeout, EngineUnavailable
from ..limits import GiB, KiB, MiB
from ..protocols import clamd as proto
from ..result import Finding, ScanResult, ScanStatus
from ..settings import Section, Size
from ..spool import Spool
from .base import EngineContext, UnparseableReply
from .upstream import Bound, Clock, Upstream, UpstreamEngine, UpstreamSettings

VERSION_TTL = 60.0  # seconds between lazy VERSION re-queries (db change → cache invalidation)
_READ_SIZE = 4096
#: socket flags as plain ints: an operation on the IntFlag members builds an enum each time
#: (about 3 µs here), on the hot path of every scan
_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
_DONTWAIT = int(socket.MSG_DONTWAIT)
# after clamd closes mid-stream (StreamMaxLength), how long to wait for its reply
_REPLY_AFTER_RESET = 1.0

_INSTREAM = proto.encode_command("INSTREAM")
_PING = proto.encode_command("PING")
_VERSION = proto.encode_command("VERSION")
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


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
    #: idle IDSESSION connections, oldest first; ``sessions`` counts idle and busy ones
    idle: list[Session] = field(default_factory=list, repr=False)
    sessions: int = 0
    sessions_opened: int = 0  # since start, for health and tests
    fildes_refused: str = ""  # clamd's refusal of FILDES: INSTREAM from then on
    prune: asyncio.TimerHandle | None = field(default=None, repr=False)

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


@dataclass(slots=True, eq=False)
class Session:
    """One IDSESSION connection: the socket, its codec, and since when it is idle.

    The socket's reader stays registered for the session's life (no epoll registration per
    reply): while a reply is awaited it wakes :meth:`recv_more`; otherwise readiness with
    something to read (a peek tells it from a report made before the last reply was read)
    means clamd closed the session or said something unasked, and marks it dead.
    """

    sock: socket.socket
    codec: proto.ClientSession
    loop: asyncio.AbstractEventLoop
    idle_since: float = 0.0  # event-loop time
    scans: int = 0
    dead: bool = False  # readable while idle: closed by clamd, or garbage
    _waiter: asyncio.Future[None] | None = None
    _watched: bool = False

    def _readable(self) -> None:
        if self._waiter is not None:
            _wake(self._waiter)
            return
        if self._quiet():
            return  # reported by the poll before the last reply was read: nothing new
        self.dead = True  # closed, or something unasked: the session is not usable any more
        self._unwatch()

    def _unwatch(self) -> None:
        if self._watched:
            self._watched = False
            self.loop.remove_reader(self.sock.fileno())

    async def recv_more(self, pending: bytes, when: float) -> bytes:
        """The next bytes of a reply (waits for them first: a reply is never there the
        moment its request left), by ``when`` (loop time; TimeoutError after it: one timer
        handle on the wait, no ``asyncio.Timeout`` per scan); a lost or closed connection is
        a protocol error."""
        loop = self.loop
        if not self._watched:  # (unwatched by the reply arriving while the request was sent)
            loop.add_reader(self.sock.fileno(), self._readable)
            self._watched = True
            self.dead = False  # a close or garbage shows in the recv below, not in `dead`
        while True:
            self._waiter = waiter = loop.create_future()
            timer = loop.call_at(when, _expire, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                timer.cancel()
            try:
                data = self.sock.recv(_READ_SIZE)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                raise _lost(exc) from exc
            return _some(data, pending)

    def alive(self) -> bool:
        """Nothing to read and not closed: clamd has not dropped it (ReadTimeout, restart)
        nor sent anything unasked. Known from the reader, else one non-blocking peek (the
        loop may not have polled since)."""
        return not self.dead and self._quiet()

    def _quiet(self) -> bool:
        """One non-blocking peek: nothing to read (not closed, nothing unasked)."""
        try:
            self.sock.recv(1, _PEEK)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        return False  # b"": closed; data: something we did not ask for

    def close(self, end: bool) -> None:
        """Close; with ``end`` say ``zEND`` first when the session is clean (best effort,
        never blocks)."""
        self._unwatch()
        if end and self.codec.idle:
            with contextlib.suppress(OSError):
                self.sock.send(self.codec.end(), _DONTWAIT)
        self.sock.close()


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
    session_pool: IDSESSION connections kept per server and serve process (0: a new
        connection for every scan). Used for objects that go out in one write (up to
        ``stream_chunk_size``) and for FILDES; when all are busy a scan uses a plain
        connection
    session_idle_timeout: seconds an idle session is kept; keep it below clamd's
        ReadTimeout (default 120 s), after which clamd drops an idle session
    fildes: pass a descriptor (FILDES) instead of streaming, unix sockets only:
        "off"; "disk" (objects spooled to disk: their private spool file); "always" (also
        objects in memory, through a sealed memfd)
    fildes_max_size: larger objects are streamed with INSTREAM (clamd's StreamMaxLength
        does not apply to FILDES; keep this at or below clamd's StreamMaxLength and
        MaxFileSize, or a larger file may come back OK unscanned)
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
    session_pool: int = Field(16, ge=0, le=1024)
    session_idle_timeout: float = Field(20.0, gt=0)
    fildes: Literal["off", "disk", "always"] = "disk"
    fildes_max_size: Size = 10 * MiB

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

    async def close(self) -> None:
        """End and close every idle session (busy ones close when their scan ends)."""
        await super().close()
        for server in self.servers:
            if server.prune is not None:
                server.prune.cancel()
                server.prune = None
            while server.idle:
                self._drop(server, server.idle.pop(), end=True)

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
            return server, await self._attempt(server, spool, deadline)

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

    def _wants_fildes(self, server: ClamdServer, spool: Spool) -> bool:
        mode = self.settings.fildes
        return (mode != "off" and bool(server.path) and not server.fildes_refused
                and spool.size <= self.settings.fildes_max_size
                and (mode == "always" or not spool.in_memory))

    async def _attempt(self, server: ClamdServer, spool: Spool, deadline: float
                       ) -> proto.Reply:
        """One server's try at the scan: on an IDSESSION connection when one is free (or
        can be opened), else on a plain one; FILDES when wanted. Any doubt about a session
        (closed, garbage, a reply we did not ask for, an ERROR) closes it and the scan is
        redone once on a plain connection within the same bound; a FILDES refusal switches
        the server to INSTREAM for good."""
        fd = self._descriptor(server, spool) if self._wants_fildes(server, spool) else None
        try:
            return await self._attempt_with(server, spool, deadline, fd)
        finally:
            if fd is not None:
                os.close(fd)

    def _descriptor(self, server: ClamdServer, spool: Spool) -> int | None:
        """The object's descriptor for FILDES, or None (INSTREAM) when it cannot be made."""
        try:
            return _spool_fd(spool)
        except (OSError, EngineError) as exc:
            self._debug(server, "FILDES", time.perf_counter(), size=spool.size,
                        error=f"no descriptor, INSTREAM instead: {exc}")
            return None

    async def _attempt_with(self, server: ClamdServer, spool: Spool, deadline: float,
                            fd: int | None) -> proto.Reply:
        fildes = fd is not None
        command = "FILDES" if fildes else "INSTREAM"
        bound = Bound.of(self.settings.scan_timeout, deadline)
        if self.settings.session_pool and (fildes or spool.size <= self.settings.stream_chunk_size):
            session = await self._session(server, deadline)
            if session is not None:
                started = time.perf_counter()
                reused = session.scans > 0
                try:
                    reply = await self._on_session(server, session, spool, fd, bound)
                except EngineError as exc:
                    retry = reused and not isinstance(exc, EngineTimeout)
                    self._debug(server, command, started, size=spool.size, session=True,
                                reused=reused, error=str(exc),
                                **({"retry": "plain connection"} if retry else {}))
                    if not retry:
                        # a new session's failure is the server's, as on a plain connection
                        raise
                    # a reused session clamd dropped (ReadTimeout, restart, MaxQueue, ...)
                    # or that said something we did not ask for: redo on a plain connection
                else:
                    if observability.debug_enabled():  # the hot path: no fields built else
                        self._debug(server, command, started, size=spool.size, session=True,
                                    reused=reused, reply=reply.text[:200])
                    if not (fildes and self._fildes_refused(server, reply)):
                        return reply
                    command = "INSTREAM"
                deadline = min(deadline, bound.when)
        if command == "FILDES" and server.fildes_refused:
            command = "INSTREAM"
        reply = await self._plain(server, spool, fd if command == "FILDES" else None, deadline)
        if command == "FILDES" and self._fildes_refused(server, reply):
            reply = await self._plain(server, spool, None, deadline)
        return reply

    def _fildes_refused(self, server: ClamdServer, reply: proto.Reply) -> bool:
        """A FILDES reply that is not about the object (``fd[N]: ...``) is a refusal:
        remember it, INSTREAM from now on for this server."""
        if reply.kind in (proto.ReplyKind.OK, proto.ReplyKind.FOUND) or \
                reply.path.startswith("fd["):
            return False
        server.fildes_refused = reply.text[:200]
        return True

    # -- IDSESSION pool --------------------------------------------------------------------
    async def _session(self, server: ClamdServer, deadline: float) -> Session | None:
        """An idle session that is still alive, else a new one while the pool has room,
        else None (the scan takes a plain connection; nobody waits for a session)."""
        if server.idle:
            # the loop of the sessions (asyncio.get_running_loop() costs a getpid() system
            # call: only asked for a new session)
            self._expire(server, server.idle[-1].loop.time())
        while server.idle:
            session = server.idle.pop()  # the most recently used: least likely dropped
            if session.alive():
                return session
            self._drop(server, session, end=False)
        if server.sessions >= self.settings.session_pool:
            return None
        sock = await self._connect(server, deadline)
        server.sessions += 1
        server.sessions_opened += 1
        session = Session(sock, proto.ClientSession(), asyncio.get_running_loop())
        # IDSESSION itself has no reply: it goes out with the first command
        return session

    def _release(self, server: ClamdServer, session: Session) -> None:
        """Back to the pool when clean, else closed."""
        if not session.codec.idle:
            self._drop(server, session, end=False)
            return
        loop = session.loop  # (asyncio.get_running_loop() costs a getpid() system call)
        session.idle_since = loop.time()
        server.idle.append(session)
        if server.prune is None:
            server.prune = loop.call_later(self.settings.session_idle_timeout,
                                           self._prune, server)

    def _prune(self, server: ClamdServer) -> None:
        server.prune = None
        loop = asyncio.get_running_loop()
        self._expire(server, loop.time())
        if server.idle:
            wait = server.idle[0].idle_since + self.settings.session_idle_timeout - loop.time()
            server.prune = loop.call_later(max(wait, 0.01), self._prune, server)

    def _expire(self, server: ClamdServer, now: float) -> None:
        limit = self.settings.session_idle_timeout
        while server.idle and now - server.idle[0].idle_since >= limit:
            self._drop(server, server.idle.pop(0), end=True)

    def _drop(self, server: ClamdServer, session: Session, *, end: bool) -> None:
        session.close(end)
        server.sessions -= 1

    async def _on_session(self, server: ClamdServer, session: Session, spool: Spool,
                          fd: int | None, bound: Bound) -> proto.Reply:
        """One scan on a session: INSTREAM, or FILDES of ``fd``."""
        command = "INSTREAM" if fd is None else "FILDES"
        codec = session.codec
        clean = False
        try:
            head = b"" if codec.opened else codec.open()
            request_id, request = codec.request(command)
            try:
                # one sendmsg from the spool's buffer (no joined copy of the object); a
                # socket that does not take it all at once gets the rest within the bound
                if fd is not None:
                    await _send_fd(session.sock, head + request, fd, bound.when)
                elif spool.size:
                    await _send_parts(session.sock, [head + request + proto.chunk_header(
                        spool.size), spool.getbuffer(), proto.INSTREAM_END], bound.when)
                else:
                    await _send_parts(session.sock, [head + request + proto.INSTREAM_END],
                                      bound.when)
            except OSError as exc:
                raise EngineProtocolError(
                    f"connection lost while streaming: {exc.strerror or exc}") from exc
            reply = await _read_session_reply(session, command, bound.when)
            if reply.session_id != request_id:  # the codec allows only outstanding ids
                raise UnparseableReply(f"reply for request {reply.session_id}, "
                                       f"expected {request_id}")
            if reply.kind is proto.ReplyKind.ERROR and session.scans \
                    and not reply.size_limit_exceeded \
                    and not (command == "FILDES" and not reply.path.startswith("fd[")):
                # MaxQueue, a temporary failure, ...: clamd's word about this session,
                # not necessarily about the object; the plain retry decides
                raise EngineProtocolError(f"session reply {reply.text[:80]!r}")
            if reply.kind not in (proto.ReplyKind.OK, proto.ReplyKind.FOUND,
                                  proto.ReplyKind.ERROR) and \
                    not (command == "FILDES" and reply.kind is proto.ReplyKind.OTHER):
                # (UNKNOWN COMMAND to FILDES is a refusal: the caller falls back)
                raise UnparseableReply(f"unexpected {command} reply {reply.text[:80]!r}")
            session.scans += 1
            clean = reply.kind is not proto.ReplyKind.OTHER  # a refusal ends it
            return reply
        except TimeoutError:
            raise EngineTimeout(f"no reply within {bound}") from None
        finally:
            if clean:
                self._release(server, session)
            else:
                self._drop(server, session, end=False)

    # -- plain connections ---------------------------------------------------------------
    async def _plain(self, server: ClamdServer, spool: Spool, fd: int | None, deadline: float
                     ) -> proto.Reply:
        """One scan on a new connection: INSTREAM, or FILDES of ``fd``."""
        command = "INSTREAM" if fd is None else "FILDES"
        started = time.perf_counter()
        try:
            reply = await self._plain_on(server, spool, fd, deadline)
        except EngineError as exc:
            self._debug(server, command, started, size=spool.size, error=str(exc))
            raise
        if observability.debug_enabled():
            self._debug(server, command, started, size=spool.size, reply=reply.text[:200])
        return reply

    def _debug(self, server: ClamdServer, command: str, started: float, **fields: Any) -> None:
        if server.socks:
            fields["socks"] = server.via
        self.debug_request(server.url, command, started, **fields)

    async def _plain_on(self, server: ClamdServer, spool: Spool, fd: int | None,
                        deadline: float) -> proto.Reply:
        command = "INSTREAM" if fd is None else "FILDES"
        sock = await self._connect(server, deadline)
        bound = Bound.of(self.settings.scan_timeout, deadline)
        try:
            async with asyncio.timeout_at(bound.when):
                try:
                    if fd is not None:
                        await _send_fd(sock, proto.FILDES_WITH_DUMMY, fd)
                    else:
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
            if command == "FILDES" and reply.kind is proto.ReplyKind.OTHER:
                return reply  # UNKNOWN COMMAND: a refusal, the caller falls back
            raise UnparseableReply(f"unexpected {command} reply {reply.text[:80]!r}")
        return reply

    async def _send_stream(self, sock: socket.socket, spool: Spool) -> None:
        loop = asyncio.get_running_loop()
        size = spool.size
        chunk_size = self.settings.stream_chunk_size
        if size <= chunk_size:
            # the common case (mail parts): one sendmsg() of command, data and terminator
            head = _INSTREAM + proto.chunk_header(size) if size else _INSTREAM
            await _send_parts(sock, [head, spool.getbuffer(), proto.INSTREAM_END], None)
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
    buf = proto.ReplyReader(proto.Prefix.Z)
    while True:
        try:
            raw = buf.next_reply()
        except proto.ClamdProtocolError as exc:
            raise UnparseableReply(str(exc)) from exc
        if raw is not None:
            return proto.parse_reply(raw)
        buf.feed(await _recv_more(sock, buf.pending))


async def _recv_more(sock: socket.socket, pending: bytes) -> bytes:
    """The next bytes of a reply; a lost or closed connection is a protocol error (no whole
    reply), naming what had arrived (``pending``)."""
    try:
        data = await asyncio.get_running_loop().sock_recv(sock, _READ_SIZE)
    except OSError as exc:
        raise _lost(exc) from exc
    return _some(data, pending)


def _lost(exc: OSError) -> EngineProtocolError:
    return EngineProtocolError(f"connection lost: {exc.strerror or exc}")


def _some(data: bytes, pending: bytes) -> bytes:
    """``data`` from a recv; empty (clamd closed the connection) is a protocol error that
    names what had arrived of the reply (``pending``)."""
    if not data:
        detail = f" after {pending[:80]!r}" if pending else ""
        raise EngineProtocolError(f"connection closed without a reply{detail}")
    return data


async def _read_session_reply(session: Session, command: str, when: float) -> proto.Reply:
    """Read the next reply of an IDSESSION connection: one that carries the id of a request
    we sent, else UnparseableReply (the codec says why); EOF first is a protocol error;
    TimeoutError at ``when`` (loop time)."""
    codec = session.codec
    while True:
        try:
            reply = codec.next_reply()
        except proto.ClamdProtocolError as exc:
            raise UnparseableReply(f"unexpected {command} reply {exc}") from exc
        if reply is not None:
            return reply
        codec.receive_data(await session.recv_more(codec.pending, when))


def _spool_fd(spool: Spool) -> int:
    """A read-only descriptor of exactly the bytes that were hashed, for FILDES.

    On disk: the spool's own private file (mkstemp, 0600, written once), reopened read-only
    through its open descriptor (``Spool.reopen_fd``: the very inode that was hashed, never
    looked up by name) and checked to be a regular file of ours with the hashed size. In
    memory: a memfd with the content, sealed against any change before clamd sees it.
    """
    if not spool.in_memory:
        own = spool.reopen_fd()
        fd = own if own is not None else \
            os.open(spool.path(), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != spool.size or \
                st.st_uid != os.geteuid():
            os.close(fd)
            raise EngineProtocolError("spool file changed under us; not scanned by FILDES")
        return fd
    fd = os.memfd_create("avgate-scan", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(spool.getbuffer())
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def _send_fd(sock: socket.socket, data: bytes, fd: int, when: float | None = None
                   ) -> None:
    """Send ``data`` with ``fd`` as SCM_RIGHTS (clamd gets its own copy of the descriptor;
    ours stays open for a retry and is closed by the caller); waits for the socket by
    ``when`` (loop time, TimeoutError after it; None: unbounded here, the caller bounds)."""
    loop = asyncio.get_running_loop()
    fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    while True:
        try:
            sent = sock.sendmsg([data], fds)
        except (BlockingIOError, InterruptedError):
            await _writable(loop, sock, when)
            continue
        if sent < len(data):  # the descriptor went with the first byte
            await _send_parts(sock, [data[sent:]], when)
        return


async def _send_parts(sock: socket.socket, parts: list[bytes | memoryview],
                      when: float | None) -> None:
    """Send ``parts`` in order with ``sendmsg`` (gathered by the kernel: nothing joined
    here); the usual case is one call that takes everything. What the socket does not take
    at once is sent as it becomes writable, by ``when`` (TimeoutError after it). ``parts``
    is consumed (emptied): no reference to a spool's buffer may outlive the send, not even
    in a traceback's frame (a BytesIO with an export cannot be closed)."""
    try:
        while True:
            try:
                sent = sock.sendmsg(parts)
            except (BlockingIOError, InterruptedError):
                sent = 0
            done = 0
            while done < len(parts) and sent >= len(parts[done]):
                sent -= len(parts[done])
                done += 1
            if done == len(parts):
                return
            del parts[:done]
            if sent:
                parts[0] = memoryview(parts[0])[sent:]
            await _writable(asyncio.get_running_loop(), sock, when)
    finally:
        parts.clear()


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                    when: float | None) -> None:
    """Wait until ``sock`` may be written, by ``when`` (TimeoutError after it)."""
    waiter: asyncio.Future[None] = loop.create_future()
    loop.add_writer(sock.fileno(), _wake, waiter)
    timer = loop.call_at(when, _expire, waiter) if when is not None else None
    try:
        await waiter
    finally:
        loop.remove_writer(sock.fileno())
        if timer is not None:
            timer.cancel()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
