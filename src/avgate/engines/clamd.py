"""clamd engine: streams the object to one or more clamd servers with INSTREAM.

Connections: one connection per scan, no IDSESSION pool. On loopback or a unix socket a
connect costs tens of microseconds, far below a scan, while a pool would have to track
clamd's IdleTimeout, half-closed sessions and which reply belongs to which scan after a
failure. Small objects go out as one write (command + chunk + terminator); larger ones are
streamed from the spool in ``stream_chunk_size`` pieces, never held in memory whole.

Servers: ``failover`` tries them in configured order, ``round_robin`` starts at the next one
each scan; either way a failed attempt (refused, timeout, garbage, closed mid-stream) moves
the same scan to the next server. A server with ``max_failures`` consecutive failures is
skipped for ``retry_after`` seconds.

Timeouts: ``connect_timeout`` and ``scan_timeout`` bound each attempt; the engine-wide bound
applied by :class:`BaseEngine` is one full round over every server.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import (
    ConfigError,
    EngineError,
    EngineProtocolError,
    EngineTimeout,
    EngineUnavailable,
)
from ..limits import DEFAULT_CONNECT_TIMEOUT, Timeouts, parse_size
from ..protocols import clamd as proto
from ..result import Finding, ScanResult, ScanStatus
from ..spool import Spool
from .base import BaseEngine, EngineContext

DEFAULT_SERVERS = ("tcp://127.0.0.1:3310", "unix:/run/clamav/clamd.ctl")
DEFAULT_CHUNK_SIZE = 64 * 1024
DEFAULT_RETRY_AFTER = 10.0
DEFAULT_MAX_FAILURES = 1
VERSION_TTL = 60.0  # seconds between lazy VERSION re-queries (db change → cache invalidation)
_READ_SIZE = 4096
# after clamd closes mid-stream (StreamMaxLength), how long to wait for its reply
_REPLY_AFTER_RESET = 1.0

_INSTREAM = proto.encode_command("INSTREAM")
_PING = proto.encode_command("PING")
_VERSION = proto.encode_command("VERSION")


@dataclass(slots=True)
class ClamdServer:
    """One configured server and its health state."""

    url: str
    host: str = ""
    port: int = 0
    path: str = ""  # unix socket
    failures: int = 0  # consecutive
    down_until: float = 0.0  # monotonic time; 0 = up
    last_error: str = ""
    version: proto.VersionInfo | None = None
    version_at: float = 0.0

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

    def available(self, now: float) -> bool:
        return now >= self.down_until

    async def connect(self) -> socket.socket:
        """A connected non-blocking socket (the caller closes it)."""
        loop = asyncio.get_running_loop()
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


class ClamdEngine(BaseEngine):
    """Scans through clamd's INSTREAM command."""

    type_name: ClassVar[str] = "clamd"
    config_keys: ClassVar[frozenset[str]] = frozenset({
        "servers", "strategy", "connect_timeout", "scan_timeout", "stream_chunk_size",
        "retry_after", "max_failures",
    })

    def __init__(self, name: str, ctx: EngineContext, *,
                 servers: Sequence[str] = DEFAULT_SERVERS, strategy: str = "failover",
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 scan_timeout: float | None = None,
                 stream_chunk_size: int = DEFAULT_CHUNK_SIZE,
                 retry_after: float = DEFAULT_RETRY_AFTER,
                 max_failures: int = DEFAULT_MAX_FAILURES,
                 version_ttl: float = VERSION_TTL) -> None:
        super().__init__(name, ctx)
        if not servers:
            raise ValueError("at least one server is needed")
        if strategy not in ("failover", "round_robin"):
            raise ValueError(f"unknown strategy {strategy!r}")
        self.servers = [ClamdServer.parse(s) for s in servers]
        self.strategy = strategy
        self.connect_timeout = connect_timeout
        self.scan_timeout = scan_timeout if scan_timeout is not None else ctx.limits.scan_timeout
        self.chunk_size = stream_chunk_size
        self.retry_after = retry_after
        self.max_failures = max_failures
        self.version_ttl = version_ttl
        # BaseEngine bounds the whole scan: allow one full failover round.
        self.timeouts = Timeouts(
            connect=connect_timeout,
            scan=len(self.servers) * (connect_timeout + self.scan_timeout),
        )
        self._next = 0  # round-robin position
        self._refresh: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, table: Mapping[str, Any], ctx: EngineContext) -> ClamdEngine:
        """Build from an ``[[engines]]`` table with ``type = "clamd"``."""
        name = str(table.get("name", "clamd"))
        where = f"engines ({name})"
        kw: dict[str, Any] = {}
        try:
            if "servers" in table:
                servers = table["servers"]
                if isinstance(servers, str):
                    servers = [servers]
                if (not isinstance(servers, list) or not servers
                        or not all(isinstance(s, str) for s in servers)):
                    raise ConfigError(f"{where}: servers: must be a non-empty list of strings")
                for s in servers:
                    ClamdServer.parse(s)
                kw["servers"] = servers
            if "strategy" in table:
                if table["strategy"] not in ("failover", "round_robin"):
                    raise ConfigError(
                        f"{where}: strategy: must be \"failover\" or \"round_robin\"")
                kw["strategy"] = table["strategy"]
            for key in ("connect_timeout", "scan_timeout", "retry_after"):
                if key in table:
                    kw[key] = _positive(table[key], f"{where}: {key}")
            if "max_failures" in table:
                value = table["max_failures"]
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"{where}: max_failures: must be an integer >= 1")
                kw["max_failures"] = value
            if "stream_chunk_size" in table:
                size = parse_size(table["stream_chunk_size"])
                if not 1 <= size <= 1 << 30:
                    raise ValueError("stream_chunk_size must be between 1 byte and 1 GiB")
                kw["stream_chunk_size"] = size
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        return cls(name, ctx, **kw)

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Ask every server for its VERSION; a server that is down now is not an error."""
        await asyncio.gather(*(self._fetch_version(s) for s in self.servers))

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh
            self._refresh = None

    def version(self) -> str:
        """clamd's VERSION string (program/db version/db date) of the first server known."""
        for s in self.servers:
            if s.version is not None:
                return s.version.raw
        return ""

    def db_version(self) -> str:
        """The database part of VERSION of every server (joined with ``|`` if they differ).

        Re-queried in the background once the answer is older than ``version_ttl``, so the
        verdict cache follows clamd's database reloads without slowing a scan.
        """
        now = time.monotonic()
        if any(now - s.version_at > self.version_ttl for s in self.servers):
            self._schedule_refresh()
        return "|".join(dict.fromkeys(s.version.db for s in self.servers if s.version))

    def _schedule_refresh(self) -> None:
        if self._refresh is not None and not self._refresh.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside the event loop: keep the old value
            return
        self._refresh = loop.create_task(self.start())

    async def health(self) -> dict[str, Any]:
        """PING every server; ``ok`` when at least one answers."""
        reports = await asyncio.gather(*(self._ping(s) for s in self.servers))
        return {"name": self.name, "type": self.type_name,
                "ok": any(r["ok"] for r in reports), "servers": reports}

    # -- scanning ------------------------------------------------------------------------
    async def _scan(self, spool: Spool) -> ScanResult:
        failures: list[tuple[ClamdServer, EngineError]] = []
        for server in self._order():
            try:
                reply = await self._instream(server, spool)
            except EngineError as exc:
                self._mark_failed(server, exc)
                failures.append((server, exc))
                continue
            self._mark_ok(server)
            return self._result(server, reply)
        if not failures:
            raise EngineUnavailable(
                f"all {len(self.servers)} clamd server(s) marked down "
                f"(retry after {self.retry_after:g}s)")
        summary = "; ".join(f"{s.url}: {exc}" for s, exc in failures)
        raise type(failures[-1][1])(summary)

    def _order(self) -> list[ClamdServer]:
        """Servers to try for one scan, in order, skipping those marked down."""
        servers = self.servers
        if self.strategy == "round_robin":
            start = self._next % len(servers)
            self._next = start + 1
            servers = servers[start:] + servers[:start]
        now = time.monotonic()
        return [s for s in servers if s.available(now)]

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

    async def _instream(self, server: ClamdServer, spool: Spool) -> proto.Reply:
        sock = await self._connect(server)
        try:
            async with asyncio.timeout(self.scan_timeout):
                try:
                    await self._send_stream(sock, spool)
                except OSError as exc:
                    # clamd closes as soon as StreamMaxLength is exceeded, often while we
                    # are still sending; its reply is then already in our receive buffer.
                    try:
                        async with asyncio.timeout(_REPLY_AFTER_RESET):
                            reply = await _read_reply(sock)
                    except (TimeoutError, EngineError):
                        raise EngineProtocolError(
                            f"connection lost while streaming: {exc.strerror or exc}"
                        ) from exc
                else:
                    reply = await _read_reply(sock)
        except TimeoutError:
            raise EngineTimeout(f"no reply within {self.scan_timeout:g}s") from None
        finally:
            sock.close()
        if reply.kind not in (proto.ReplyKind.OK, proto.ReplyKind.FOUND, proto.ReplyKind.ERROR):
            raise EngineProtocolError(f"unexpected INSTREAM reply {reply.text[:80]!r}")
        return reply

    async def _send_stream(self, sock: socket.socket, spool: Spool) -> None:
        loop = asyncio.get_running_loop()
        size = spool.size
        if size <= self.chunk_size:
            # the common case (mail parts): one send() for command, data and terminator
            head = _INSTREAM + proto.chunk_header(size) if size else _INSTREAM
            await loop.sock_sendall(sock, head + spool.getbuffer() + proto.INSTREAM_END)
            return
        head = _INSTREAM
        sent = 0
        for chunk in spool.chunks(self.chunk_size):
            sent += len(chunk)
            tail = proto.INSTREAM_END if sent >= size else b""
            # sock_sendall returns once the kernel took it all: one chunk in flight at most
            await loop.sock_sendall(sock, head + proto.chunk_header(len(chunk)) + chunk + tail)
            head = b""
        if sent < size:  # the file shrank under us; still end the stream properly
            await loop.sock_sendall(sock, proto.INSTREAM_END)

    async def _connect(self, server: ClamdServer) -> socket.socket:
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await server.connect()
        except TimeoutError:
            raise EngineTimeout(f"connect timeout after {self.connect_timeout:g}s") from None
        except OSError as exc:
            raise EngineUnavailable(f"cannot connect: {exc.strerror or exc}") from exc

    async def _command(self, server: ClamdServer, command: bytes) -> proto.Reply:
        """Send a one-line command (PING, VERSION) and read its reply."""
        sock = await self._connect(server)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await asyncio.get_running_loop().sock_sendall(sock, command)
                return await _read_reply(sock)
        except TimeoutError:
            raise EngineTimeout(f"no reply within {self.connect_timeout:g}s") from None
        except OSError as exc:
            raise EngineUnavailable(f"connection failed: {exc.strerror or exc}") from exc
        finally:
            sock.close()

    async def _fetch_version(self, server: ClamdServer) -> None:
        server.version_at = time.monotonic()  # also on failure: no retry storm
        try:
            reply = await self._command(server, _VERSION)
            server.version = proto.parse_version(reply.text)
        except (EngineError, ValueError) as exc:
            server.last_error = f"VERSION: {exc}"

    async def _ping(self, server: ClamdServer) -> dict[str, Any]:
        start = time.perf_counter()
        report: dict[str, Any] = {"server": server.url}
        try:
            reply = await self._command(server, _PING)
            if reply.kind is not proto.ReplyKind.PONG:
                raise EngineProtocolError(f"unexpected PING reply {reply.text[:80]!r}")
        except EngineError as exc:
            self._mark_failed(server, exc)
            report.update(ok=False, error=str(exc))
        else:
            self._mark_ok(server)
            report.update(ok=True, latency_ms=round((time.perf_counter() - start) * 1000, 3))
        report.update(down=not server.available(time.monotonic()),
                      version=server.version.raw if server.version else "")
        return report

    # -- server health -------------------------------------------------------------------
    def _mark_failed(self, server: ClamdServer, exc: EngineError) -> None:
        server.failures += 1
        server.last_error = str(exc)
        if server.failures >= self.max_failures:
            server.down_until = time.monotonic() + self.retry_after

    def _mark_ok(self, server: ClamdServer) -> None:
        server.failures = 0
        server.down_until = 0.0
        server.last_error = ""


async def _read_reply(sock: socket.socket) -> proto.Reply:
    """Read one z-terminated reply; EOF before the terminator is a protocol error."""
    loop = asyncio.get_running_loop()
    buf = proto.ReplyReader(proto.Prefix.Z)
    while True:
        try:
            raw = buf.next_reply()
        except proto.ClamdProtocolError as exc:
            raise EngineProtocolError(str(exc)) from exc
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


def _positive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{where}: must be a number > 0")
    return float(value)
