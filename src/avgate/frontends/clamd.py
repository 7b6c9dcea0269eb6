r"""clamd-protocol listener: existing clamd clients talk to avgate as if it were clamd.

``[clamd_listener]``: ``listen`` (default ``127.0.0.1:3311``; ``unix:/path`` also works),
``unix_socket`` (an additional unix socket; FILDES works only there), ``unix_socket_mode``
(default ``"0660"``) and ``unix_socket_group`` (default: the process's group), like clamd's
LocalSocketMode/LocalSocketGroup, ``allowed_paths`` (directories SCAN & co. may read; none by
default, so path scans are refused), ``stream_max_length`` (INSTREAM limit, default 25 MiB
like clamd), ``max_connections`` (default 128; further clients wait in the accept backlog),
``idle_timeout`` (default 30 s), ``max_fds`` / ``max_fds_per_connection`` (descriptors held
for FILDES, default 256 per process / 4 per connection), ``max_sessions`` /
``max_sessions_per_client`` (IDSESSION sessions open at once, default 64 per process / 16
per client) and ``allow_reload`` (RELOAD over TCP, default false).

The bytes ⇄ events work is :mod:`avgate.protocols.clamd`; this module only moves bytes
between sockets and the codec and calls ``gateway.process`` (``Context(frontend="clamd")``).
It uses plain non-blocking sockets (``loop.sock_*``): the unix socket needs ``recvmsg`` for
the file descriptors FILDES passes, and one code path for both keeps the hot path lean.

Verdicts: clamd clients know three words. ``infected`` → ``<path>: NAME FOUND`` (whatever
the policy decides — clients act on FOUND themselves; ALLMATCHSCAN lists every name),
``clean`` → ``<path>: OK``, ``error`` → ``<path>: <reason> ERROR``. ``skipped``/``unknown``
that the policy refuses (a structural limit, by default: anyone can shape content to hit one)
→ ``<path>: Heuristics.Limits.Exceeded.<Limit> FOUND``, as clamd with AlertExceedsMax; what the
policy accepts (a size limit on this front-end, an encrypted archive) → ``OK``, as clamd's
defaults. The scan log and metrics keep the real status.

Scan what was hashed: every file (FILDES, SCAN & co.) is read exactly once into an
avgate-owned spool (a snapshot, hashed while it is read, at most ``max_scan_size`` + 1
bytes); engines, size limits and the verdict cache see only that snapshot, so a file
rewritten meanwhile cannot get a verdict cached for bytes that were not scanned. FILDES
reads through the passed descriptor itself (``pread`` from offset 0, the client's file
offset untouched), never by reopening ``/proc/PID/fd/N`` with avgate's credentials: an
O_PATH or write-only descriptor is answered ``... ERROR``, not scanned.

Path scans (SCAN, CONTSCAN, MULTISCAN, ALLMATCHSCAN) only read below ``allowed_paths``:
the path is resolved (symlinks, ``..``) and must lie inside one of them, directory walks do
not follow symlinks (clamd's default), and each file is opened with O_NOFOLLOW and checked
again through its descriptor, so a symlink swapped in after the check cannot lead out.
Anything else is answered ``<path>: Access denied. ERROR``. SCAN stops at the first
infected file; the others go on.

Resource limits (a local client must not exhaust the process):

- Descriptors: a connection holds at most ``max_fds_per_connection`` descriptors that no
  FILDES has claimed yet, the process at most ``max_fds`` in all; extras are closed on
  arrival (the FILDES that wanted one answers ``FILDES: file descriptor refused: too many
  held. ERROR`` at once), and an unclaimed descriptor is closed after ``idle_timeout``.
  Each one is closed once its FILDES is answered. Descriptors are received with
  MSG_CMSG_CLOEXEC.
- Idle timeout: only progress resets it — a complete command, or INSTREAM data. Bare
  descriptors, keep-alive NULs and partial command bytes do not, so a connection that sends
  nothing but those is closed ``idle_timeout`` after its last real command. A reply the
  client does not read within ``idle_timeout`` closes the connection too.
- IDSESSION: commands of a session run one at a time (one in flight; nothing more is read
  while a complete command is waiting, so read-ahead is bounded by one receive buffer). At
  most ``max_sessions_per_client`` sessions per client (peer uid on the unix socket, IP
  address on TCP) and ``max_sessions`` per process are open at once; one more IDSESSION is
  answered ``Too many sessions ... ERROR`` and closed.
- Repeated errors (descriptors over a cap, failed accepts, internal errors) are logged to
  stderr at most once per second per kind, with a count of the lines suppressed.

SHUTDOWN is refused (a network client must not stop the gateway). RELOAD reloads config and
signatures like SIGHUP when running under ``avgate serve``; it is accepted on the unix
socket, and over TCP only with ``allow_reload = true`` (anyone who can reach the port could
otherwise flush the verdict cache at will). Reloads are coalesced: at most one runs per
process; RELOADs arriving meanwhile cause one more, at least a second after the previous
one began.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hashlib
import os
import socket
import stat
import struct
import time
import traceback
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from typing import Any

from .. import __version__
from ..errors import SpoolError
from ..gateway import Gateway
from ..observability import RateLimitedLog
from ..policy import Context, Decision, Disposition
from ..protocols import clamd as proto
from ..result import Finding, ScanResult, ScanStatus
from ..spool import Spool

DEFAULT_LISTEN = "127.0.0.1:3311"
DEFAULT_MAX_CONNECTIONS = 128
DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_UNIX_SOCKET_MODE = "0660"
DEFAULT_MAX_FDS = 256
DEFAULT_MAX_FDS_PER_CONNECTION = 4
DEFAULT_MAX_SESSIONS = 64
DEFAULT_MAX_SESSIONS_PER_CLIENT = 16
_RECV = 256 * 1024
_FDS_PER_MESSAGE = 4  # ancillary room per recvmsg; the kernel closes what does not fit
# a file up to this size is snapshotted on the event loop; larger ones in a thread
_INLINE_FILE = 1 << 20
_RELOAD_MIN_INTERVAL = 1.0  # coalesced reloads start at least this far apart
COMMANDS = ("SCAN QUIT RELOAD PING CONTSCAN VERSIONCOMMANDS VERSION END SHUTDOWN MULTISCAN "
            "FILDES STATS IDSESSION INSTREAM ALLMATCHSCAN")

#: repeated errors: one stderr line per kind per second (tests replace it)
_log = RateLimitedLog(1.0)


def _clean_text(text: str) -> str:
    """Reply text must not contain the terminators."""
    return " ".join(text.replace("\0", " ").split())


def _signature_name(name: str) -> str:
    # clients split "<path>: NAME FOUND" from the right: a name has no spaces
    return "_".join(name.split()) or "Unknown"


# ClamAV's names for its AlertExceedsMax heuristics, which avgate's limits correspond to
_LIMIT_NAMES = (("recursion", "MaxRecursion"), ("file count", "MaxFiles"),
                ("entry count", "MaxFiles"), ("part", "MaxFiles"), ("ratio", "MaxRatio"),
                ("time budget", "MaxScanTime"), ("scan time", "MaxScanTime"),
                ("memory", "MaxScanMemory"), ("file size", "MaxFileSize"),
                ("scan size", "MaxScanSize"), ("size limit", "MaxScanSize"))


def as_clamd_verdict(result: ScanResult, decision: Decision) -> ScanResult:
    """A result the policy refused because a limit was hit, as clamd reports it with
    AlertExceedsMax: ``Heuristics.Limits.Exceeded.<Limit> FOUND``. clamd clients know only
    FOUND/OK/ERROR; a refused object answered ``OK`` would be delivered by them."""
    if (result.limit is None or result.status in (ScanStatus.INFECTED, ScanStatus.ERROR)
            or decision.disposition is Disposition.ACCEPT):
        return result
    reason = result.reason.lower()
    limit = next((name for key, name in _LIMIT_NAMES if key in reason), "MaxScanTime"
                 if "budget" in reason else "Structure")
    name = f"Heuristics.Limits.Exceeded.{limit}"
    return result.with_(findings=(Finding(name, "avgate", ""),))


def verdict_lines(result: ScanResult, path: str, *, all_matches: bool = False) -> list[str]:
    """The clamd reply lines for one scanned object (see the module docstring)."""
    if result.status is ScanStatus.INFECTED or result.findings:
        names = result.virus_names if all_matches else result.virus_names[:1]
        return [proto.found_reply(_signature_name(n), path) for n in names]
    if result.status is ScanStatus.ERROR:
        return [proto.error_reply(_clean_text(result.reason) or "Scan failed.", path)]
    return [proto.ok_reply(path)]


def _parse_listen(listen: str) -> tuple[str, Any]:
    """("tcp", (host, port)) or ("unix", path)."""
    if listen.startswith("unix:"):
        return "unix", listen[5:]
    if listen.startswith(("inet:", "inet6:")):
        port, _, host = listen.split(":", 1)[1].partition("@")
        return "tcp", (host or "127.0.0.1", int(port))
    host, _, port = listen.rpartition(":")
    return "tcp", (host.strip("[]"), int(port))


def _tcp_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # several `serve` workers share the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(512)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def socket_mode(value: str | int | None) -> int:
    """``unix_socket_mode`` ("0660", "660", "0o660") as permission bits."""
    if value is None:
        value = DEFAULT_UNIX_SOCKET_MODE
    if isinstance(value, int):
        return value & 0o777
    text = value.strip()
    return int(text[2:] if text[:2].lower() == "0o" else text, 8) & 0o777


def socket_gid(group: str | int | None) -> int | None:
    """``unix_socket_group`` as a gid (None: leave the process's group); OSError if unknown."""
    if group is None or group == "":
        return None
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise OSError(f"unix_socket_group: no such group {group!r}") from None


def _unix_socket(path: str, mode: int = 0o660, gid: int | None = None) -> socket.socket:
    """Bind a unix socket with ``mode`` (and group ``gid``); a stale socket file is replaced.

    The mode is set on the socket before ``bind`` (Linux creates the file with it, minus the
    umask), so the file never exists with wider permissions than asked for; the exact mode
    and the group are set right after."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: left by a process that died
        else:
            raise OSError(f"{path}: another server is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        with contextlib.suppress(OSError):  # not every platform lets a socket be fchmod'ed
            os.fchmod(sock.fileno(), mode)
        sock.bind(path)
        bound = True
        if gid is not None:
            try:
                os.chown(path, -1, gid)
            except OSError as exc:
                raise OSError(exc.errno, f"{path}: cannot set group {gid} "
                                         f"(unix_socket_group): {exc.strerror}") from None
        os.chmod(path, mode)
        sock.listen(512)
        sock.setblocking(False)
    except OSError:
        sock.close()
        if bound:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    return sock


class _FdBudget:
    """Descriptors received over FILDES and not closed yet, counted for the whole process."""

    def __init__(self) -> None:
        self.held = 0

    def take(self, limit: int) -> bool:
        if self.held >= limit:
            return False
        self.held += 1
        return True

    def close(self, fd: int) -> None:
        self.held -= 1
        with contextlib.suppress(OSError):
            os.close(fd)


_fds = _FdBudget()


class _Sessions:
    """IDSESSION sessions open in this process, in all and per client."""

    def __init__(self) -> None:
        self.total = 0
        self.by_client: Counter[str] = Counter()

    def open(self, client: str, per_client: int, limit: int) -> bool:
        if self.total >= limit or self.by_client[client] >= per_client:
            return False
        self.total += 1
        self.by_client[client] += 1
        return True

    def close(self, client: str) -> None:
        self.total -= 1
        self.by_client[client] -= 1
        if self.by_client[client] <= 0:
            del self.by_client[client]


_sessions = _Sessions()


class _Reloads:
    """RELOAD requests, coalesced: at most one reload runs per Gateway(Ref); requests that
    arrive meanwhile cause exactly one more, at least ``_RELOAD_MIN_INTERVAL`` after the
    previous one began (it may have missed a change made while it ran)."""

    def __init__(self) -> None:
        self._running: dict[int, asyncio.Task[None]] = {}
        self._again: set[int] = set()
        self.started = 0  # reloads actually asked for (tests, STATS)

    def request(self, reload: Callable[[], Awaitable[Any]], key: int) -> None:
        if key in self._running:
            self._again.add(key)
            return
        self._running[key] = asyncio.ensure_future(self._run(reload, key))

    async def _run(self, reload: Callable[[], Awaitable[Any]], key: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                began = loop.time()
                self.started += 1
                try:
                    await reload()
                except Exception as exc:  # the reload reports its own failures; a bug here
                    _log.log("reload", f"avgate: clamd listener: RELOAD failed: {exc!r}")
                if key not in self._again:
                    return
                self._again.discard(key)
                await asyncio.sleep(max(0.0, _RELOAD_MIN_INTERVAL - (loop.time() - began)))
        finally:
            self._running.pop(key, None)
            self._again.discard(key)


_reloads = _Reloads()


def _snapshot(fd: int, max_size: int, memory_limit: int, directory: str | None) -> Spool:
    """Read the file behind ``fd`` once into a new spool (hashed while read), with ``pread``
    from offset 0 as clamd does (see :meth:`Spool.from_fd`)."""
    return Spool.from_fd(fd, max_size=max_size, memory_limit=memory_limit, directory=directory,
                         label="file descriptor")


class _Conn:
    """State of one client connection."""

    __slots__ = ("busy", "client", "dropped", "fds", "peer", "session", "sock", "task",
                 "unix")

    def __init__(self, sock: socket.socket, unix: bool, peer: str, client: str) -> None:
        self.sock = sock
        self.unix = unix
        #: descriptors received and not claimed by a FILDES yet: (fd, close-by time)
        self.fds: deque[tuple[int, float]] = deque()
        self.dropped = 0  # descriptors closed on arrival (over a cap): FILDES fails at once
        self.busy = False  # inside a command: drain waits for it; idle ones are cancelled
        self.task: asyncio.Task[None] | None = None
        self.peer = peer
        self.client = client  # per-client limits: "uid:N" (unix socket) or the IP address
        self.session = False  # holds an IDSESSION slot


def _peer_uid(sock: socket.socket) -> str:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return f"uid:{struct.unpack('3i', creds)[1]}"
    except (OSError, AttributeError, struct.error):
        return "uid:?"


class ClamdListener:
    """One listening socket (TCP or unix) speaking the clamd protocol."""

    def __init__(self, gateway: Gateway, sock: socket.socket, *, unix_path: str | None = None,
                 name: str = "clamd") -> None:
        self.gateway = gateway
        self.sock = sock
        self.unix_path = unix_path
        self.name = name
        cfg = gateway.config.clamd_listener or {}
        self._slots = asyncio.Semaphore(int(cfg.get("max_connections",
                                                    DEFAULT_MAX_CONNECTIONS)))
        self._conns: set[_Conn] = set()
        self._closing = False
        self._accept_task: asyncio.Task[None] | None = None
        self._versions: dict[str, tuple[int, str]] = {}
        self.started = time.time()
        self.served = 0

    @property
    def _cfg(self) -> dict[str, Any]:
        return self.gateway.config.clamd_listener or {}

    def _idle(self) -> float:
        return float(self._cfg.get("idle_timeout", DEFAULT_IDLE_TIMEOUT))

    # -- lifecycle ----------------------------------------------------------------------
    def describe(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path} (clamd protocol, FILDES)"
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port} (clamd protocol)"

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def start(self) -> None:
        self._accept_task = asyncio.ensure_future(self._accept_loop())

    async def aclose(self) -> None:
        """Stop accepting; end idle connections; let commands in progress finish."""
        self._closing = True
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
        self.sock.close()
        if self.unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)
        for conn in list(self._conns):
            if not conn.busy and conn.task is not None:
                conn.task.cancel()
        tasks = [c.task for c in self._conns if c.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        unix = self.unix_path is not None
        while True:
            await self._slots.acquire()
            try:
                sock, addr = await loop.sock_accept(self.sock)
            except OSError as exc:
                self._slots.release()
                _log.log(f"accept:{exc.errno}",
                         f"avgate: clamd listener {self.describe()}: accept failed: {exc}")
                await asyncio.sleep(0.05)  # EMFILE and friends: back off, keep serving
                continue
            except BaseException:
                self._slots.release()
                raise
            sock.setblocking(False)
            if unix:
                peer, client = "local", _peer_uid(sock)
            else:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer, client = f"{addr[0]}:{addr[1]}", str(addr[0])
            conn = _Conn(sock, unix, peer, client)
            self._conns.add(conn)
            conn.task = asyncio.ensure_future(self._serve(conn))

    # -- descriptors --------------------------------------------------------------------
    def _adopt_fds(self, conn: _Conn, fds: list[int], truncated: bool) -> None:
        """Keep received descriptors within the per-connection and per-process caps."""
        cfg = self._cfg
        per_conn = int(cfg.get("max_fds_per_connection", DEFAULT_MAX_FDS_PER_CONNECTION))
        limit = int(cfg.get("max_fds", DEFAULT_MAX_FDS))
        expires = asyncio.get_running_loop().time() + self._idle()
        dropped = 0
        for fd in fds:
            if len(conn.fds) < per_conn and _fds.take(limit):
                conn.fds.append((fd, expires))
            else:
                dropped += 1
                with contextlib.suppress(OSError):
                    os.close(fd)
        conn.dropped += dropped + (1 if truncated and not dropped else 0)
        if dropped or truncated:
            over = "per-process" if len(conn.fds) < per_conn else "per-connection"
            _log.log("fds-over-cap",
                     f"avgate: clamd listener: client {conn.client}: closed "
                     f"{dropped or 'some'} descriptors over the {over} cap "
                     f"(max_fds_per_connection {per_conn}, max_fds {limit}, "
                     f"held {_fds.held})")

    @staticmethod
    def _expire_fds(conn: _Conn, now: float) -> None:
        """Close descriptors no FILDES claimed within ``idle_timeout``."""
        while conn.fds and conn.fds[0][1] <= now:
            _fds.close(conn.fds.popleft()[0])

    # -- one connection -----------------------------------------------------------------
    async def _recv(self, conn: _Conn) -> bytes | None:
        """Bytes from the client (b"" at EOF), or None when only descriptors arrived."""
        loop = asyncio.get_running_loop()
        if not conn.unix:
            return await loop.sock_recv(conn.sock, _RECV)
        while True:
            try:
                data, fds, flags, _addr = socket.recv_fds(
                    conn.sock, _RECV, _FDS_PER_MESSAGE, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                await _readable(loop, conn.sock)
                continue
            if fds or flags & socket.MSG_CTRUNC:
                self._adopt_fds(conn, fds, bool(flags & socket.MSG_CTRUNC))
                # clamdscan sends the descriptor with one dummy NUL byte, the last byte of
                # the message carrying it: it is not part of any command
                if data.endswith(b"\0"):
                    data = data[:-1]
                    if not data:
                        return None
            return data

    async def _send(self, conn: _Conn, data: bytes) -> None:
        """Send, or give up (TimeoutError) when the client does not read for idle_timeout."""
        async with asyncio.timeout(self._idle()):
            await asyncio.get_running_loop().sock_sendall(conn.sock, data)

    async def _serve(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        cfg = self._cfg
        idle = self._idle()
        parser = proto.ServerParser(stream_max_length=int(cfg.get(
            "stream_max_length", proto.DEFAULT_STREAM_MAX_LENGTH)))
        spool: Spool | None = None
        instream: proto.Command | None = None
        # only progress (a complete command, INSTREAM data) moves the idle deadline
        deadline = loop.time() + idle
        try:
            while True:
                try:
                    event = parser.next_event()
                except proto.ClamdProtocolError as exc:
                    conn.busy = True
                    await self._send(conn, exc.reply())
                    return
                if conn.fds:
                    self._expire_fds(conn, loop.time())
                if event is proto.NEED_DATA:
                    try:
                        async with asyncio.timeout_at(deadline):
                            data = await self._recv(conn)
                    except TimeoutError:
                        return
                    if data is None:
                        continue  # a descriptor alone: FILDES will take it
                    if data:
                        conn.busy = True
                    parser.receive_data(data)
                    continue
                if isinstance(event, proto.InstreamChunk):
                    assert spool is not None
                    deadline = loop.time() + idle
                    try:
                        spool.write(event.data)
                    except SpoolError as exc:  # disk full: say so, never answer OK
                        assert instream is not None
                        await self._reply(conn, instream,
                                          [proto.error_reply(_clean_text(str(exc)), "stream")])
                        return
                    continue
                if isinstance(event, proto.ConnectionClosed):
                    return
                if isinstance(event, proto.InstreamEnd):
                    assert spool is not None
                    result = await self._process(spool, conn.peer)
                    spool.close()
                    spool = None
                    await self._reply(conn, event.command,
                                      verdict_lines(result, "stream"))
                elif isinstance(event, proto.Command):
                    conn.busy = True
                    deadline = loop.time() + idle
                    if event.name == "INSTREAM":
                        spool = self.gateway.new_spool()
                        instream = event
                        continue
                    if event.name == "END":
                        return
                    if event.name == "IDSESSION":
                        if not self._open_session(conn):
                            await self._reply(conn, event, [proto.error_reply(
                                "Too many sessions from this client or in all "
                                "(max_sessions_per_client, max_sessions)")])
                            return
                        conn.busy = False
                        continue
                    lines = await self._command(event, conn, parser)
                    await self._reply(conn, event, lines)
                    if event.name == "SHUTDOWN":
                        return
                if not parser.in_session or self._closing:
                    return  # one command per connection outside IDSESSION (like clamd)
                conn.busy = False
                deadline = loop.time() + idle  # the time spent scanning is not idleness
        except (ConnectionError, OSError):  # TimeoutError included: a client not reading
            return
        except Exception as exc:  # a bug must not pass silently; the client sees the close
            frame = traceback.extract_tb(exc.__traceback__)[-1:]
            where = f"{frame[0].filename}:{frame[0].lineno}" if frame else "?"
            _log.log(f"serve:{type(exc).__name__}:{where}",
                     "avgate: clamd listener: internal error\n" + traceback.format_exc())
            return
        finally:
            if spool is not None:
                spool.close()
            while conn.fds:
                _fds.close(conn.fds.popleft()[0])
            if conn.session:
                conn.session = False
                _sessions.close(conn.client)
            conn.sock.close()
            self._conns.discard(conn)
            self._slots.release()

    def _open_session(self, conn: _Conn) -> bool:
        cfg = self._cfg
        if not _sessions.open(conn.client,
                              int(cfg.get("max_sessions_per_client",
                                          DEFAULT_MAX_SESSIONS_PER_CLIENT)),
                              int(cfg.get("max_sessions", DEFAULT_MAX_SESSIONS))):
            _log.log("sessions-over-cap",
                     f"avgate: clamd listener: IDSESSION refused for client {conn.client}: "
                     f"{_sessions.by_client[conn.client]} open by it, {_sessions.total} "
                     "in all")
            return False
        conn.session = True
        return True

    async def _reply(self, conn: _Conn, command: proto.Command, lines: list[str]) -> None:
        await self._send(conn, b"".join(command.reply(line) for line in lines))

    async def _process(self, spool: Spool, peer: str) -> ScanResult:
        spool.finish()
        ctx = Context(frontend="clamd", listener=self.name, client_addr=peer,
                      size=spool.size)
        outcome = await self.gateway.process(spool, ctx)
        self.served += 1
        return as_clamd_verdict(outcome.result, outcome.decision)

    # -- commands -----------------------------------------------------------------------
    async def _command(self, cmd: proto.Command, conn: _Conn,
                       parser: proto.ServerParser) -> list[str]:
        name = cmd.name
        if name == "PING":
            return [proto.PONG]
        if name == "VERSION":
            return [self.version()]
        if name == "VERSIONCOMMANDS":
            return [f"{self.version()}| COMMANDS: {COMMANDS}"]
        if name == "STATS":
            return [self.stats()]
        if name == "RELOAD":
            return self._reload(conn)
        if name == "SHUTDOWN":
            return [proto.error_reply("SHUTDOWN is not allowed on avgate's clamd listener")]
        if name == "FILDES":
            return await self._fildes(conn, parser)
        return await self._scan_path(cmd)

    def _reload(self, conn: _Conn) -> list[str]:
        if not conn.unix and not self._cfg.get("allow_reload", False):
            return [proto.error_reply("RELOAD is only allowed on the unix socket "
                                      "(or with allow_reload = true)")]
        reload = getattr(self.gateway, "request_reload", None)
        if reload is not None:
            # the reply comes first, as with clamd; the reload runs on its own, coalesced
            _reloads.request(reload, id(self.gateway))
        return ["RELOADING"]

    def version(self) -> str:
        """``avgate <version>/<db number>/<db load date>`` (the db number is a 32-bit hash
        of the engines' signature versions: numeric like clamd's, changes on reload)."""
        dbv = self.gateway.scanner.db_versions()
        cached = self._versions.get(dbv)
        if cached is None:
            number = int(hashlib.sha256(dbv.encode()).hexdigest()[:8], 16)
            when = datetime.now().strftime("%a %b %d %H:%M:%S %Y")
            cached = self._versions[dbv] = (number, when)
        return f"avgate {__version__}/{cached[0]}/{cached[1]}"

    def stats(self) -> str:
        """A STATS reply in clamd's layout (pools and memory are not meaningful here)."""
        cfg = self._cfg
        busy = sum(1 for c in self._conns if c.busy)
        return (
            "POOLS: 1\n\nSTATE: VALID PRIMARY\n"
            f"THREADS: live {busy}  idle {len(self._conns) - busy} "
            f"max {cfg.get('max_connections', DEFAULT_MAX_CONNECTIONS)} "
            f"idle-timeout {int(cfg.get('idle_timeout', DEFAULT_IDLE_TIMEOUT))}\n"
            f"QUEUE: 0 items\n\tSTATS 0.000000 \n\n"
            f"MEMSTATS: heap N/A mmap N/A used N/A free N/A releasable N/A pools 1 "
            "pools_used N/A pools_total N/A\nEND")

    async def _fildes(self, conn: _Conn, parser: proto.ServerParser) -> list[str]:
        if not conn.unix:
            return [proto.error_reply("FILDES: only on the unix socket")]
        if not conn.fds:
            # the descriptor may arrive just after the command: read (and buffer) until then
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._idle()):
                    while not conn.fds and not conn.dropped:
                        data = await self._recv(conn)
                        if data is not None:
                            parser.receive_data(data)
                        if data == b"":
                            break
        if not conn.fds:
            if conn.dropped:  # it came, but over max_fds / max_fds_per_connection
                conn.dropped -= 1
                return [proto.error_reply("FILDES: file descriptor refused: too many held.")]
            return [proto.error_reply("FILDES: didn't receive file descriptor.")]
        fd = conn.fds.popleft()[0]
        label = f"fd[{fd}]"
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return [proto.error_reply("Not supported file type.", label)]
            return verdict_lines(await self._scan_fd(fd, label, conn.peer), label)
        finally:
            _fds.close(fd)

    async def _scan_fd(self, fd: int, label: str, peer: str) -> ScanResult:
        """Snapshot the regular file behind ``fd`` (read through it, once) and scan that."""
        try:
            spool = await self._snapshot(fd)
        except SpoolError as exc:
            return ScanResult.error(_clean_text(str(exc)))
        with spool:
            return await self._process(spool, peer)

    async def _snapshot(self, fd: int) -> Spool:
        """One read of the file into an avgate-owned spool, at most max_scan_size + 1 bytes
        (then ``truncated``: the scan service reports the object as over the limit)."""
        limit = self.gateway.config.limits.max_scan_size
        scanner = self.gateway.scanner
        memory = int(getattr(scanner, "spool_memory", 1 << 20))
        directory = getattr(scanner, "spool_dir", None)
        # fstat is only a hint for where to read (the snapshot's own size is what counts)
        if os.fstat(fd).st_size <= _INLINE_FILE:
            spool = _snapshot(fd, min(limit, _INLINE_FILE), memory, directory)
            if not spool.truncated or limit <= _INLINE_FILE:
                return spool
            spool.close()  # it grew meanwhile: read it again, off the event loop
        return await asyncio.to_thread(_snapshot, fd, limit, memory, directory)

    def _allowed(self) -> list[str]:
        cfg = self._cfg
        base = self.gateway.config.base_dir
        return [os.path.realpath(os.path.join(base, p)) for p in cfg.get("allowed_paths", [])]

    @staticmethod
    def _inside(path: str, roots: list[str]) -> bool:
        return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)

    def _resolve(self, requested: str, roots: list[str]) -> tuple[str, os.stat_result] | str:
        """(real path, stat) of a requested path inside ``roots``, or the error reply."""
        if not roots or not os.path.isabs(requested):
            return proto.error_reply("Access denied.", requested)
        real = os.path.realpath(requested)
        if not self._inside(real, roots):
            return proto.error_reply("Access denied.", requested)
        try:
            return real, os.stat(real)
        except OSError as exc:
            return proto.error_reply(f"lstat() failed: {exc.strerror}.", requested)

    async def _scan_path(self, cmd: proto.Command) -> list[str]:
        requested = cmd.args
        roots = self._allowed()
        resolved = self._resolve(requested, roots)
        if isinstance(resolved, str):
            return [resolved]
        real, st = resolved
        if not stat.S_ISDIR(st.st_mode):
            return await self._scan_file(real, requested, cmd.name, roots)
        lines: list[str] = []
        for path, shown in _walk(real, requested):
            file_lines = await self._scan_file(path, shown, cmd.name, roots, quiet_ok=True)
            lines.extend(file_lines)
            if cmd.name == "SCAN" and any(x.endswith(" FOUND") for x in file_lines):
                break  # SCAN stops at the first virus; CONTSCAN & co. go on
        if not lines:
            lines.append(proto.ok_reply(requested))
        return lines

    async def _scan_file(self, path: str, shown: str, command: str, roots: list[str],
                         quiet_ok: bool = False) -> list[str]:
        """Scan one file (opened without following a final symlink, checked by descriptor,
        snapshotted through that descriptor).

        ``quiet_ok``: inside a directory only FOUND/ERROR lines are reported (like clamd).
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == getattr(os, "ELOOP", 40):
                return [proto.error_reply("Access denied.", shown)]
            return [proto.error_reply("Can't open file or directory.", shown)]
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
            if not self._inside(real, roots):
                return [proto.error_reply("Access denied.", shown)]
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return [] if quiet_ok else [proto.error_reply("Not supported file type.",
                                                              shown)]
            result = await self._scan_fd(fd, shown, "local")
        finally:
            os.close(fd)
        lines = verdict_lines(result, shown, all_matches=command == "ALLMATCHSCAN")
        if quiet_ok and result.status not in (ScanStatus.INFECTED, ScanStatus.ERROR):
            return []
        return lines


def _walk(real: str, shown: str) -> Iterator[tuple[str, str]]:
    """(real path, path as shown) of every file below a directory, symlinks not followed."""
    for dirpath, dirnames, filenames in os.walk(real, followlinks=False):
        dirnames.sort()
        rel = os.path.relpath(dirpath, real)
        for fname in sorted(filenames):
            full = os.path.join(dirpath, fname)
            if os.path.islink(full):
                continue  # FollowFileSymlinks no (clamd's default)
            yield full, os.path.normpath(os.path.join(shown, rel, fname))


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Wait until ``sock`` has data (asyncio has no sock_recvmsg before Python 3.13)."""
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    fd = sock.fileno()
    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def start(gateway: Gateway) -> list[ClamdListener]:
    """Open ``[clamd_listener] listen`` and, if set, ``unix_socket``."""
    from ..serve import reuse_port, serves_unix_sockets

    cfg = gateway.config.clamd_listener or {}
    addresses: list[tuple[str, Any]] = [_parse_listen(cfg.get("listen", DEFAULT_LISTEN))]
    if cfg.get("unix_socket"):
        addresses.append(("unix", os.path.join(gateway.config.base_dir, cfg["unix_socket"])))
    if not serves_unix_sockets():  # another worker process owns the unix sockets
        addresses = [a for a in addresses if a[0] != "unix"]
    shared = reuse_port(gateway.config)
    mode = socket_mode(cfg.get("unix_socket_mode"))
    listeners: list[ClamdListener] = []
    try:
        for kind, where in addresses:
            if kind == "unix":
                gid = socket_gid(cfg.get("unix_socket_group"))
                listener = ClamdListener(gateway, _unix_socket(where, mode, gid),
                                         unix_path=where)
            else:
                host, port = where
                listener = ClamdListener(gateway, _tcp_socket(host, port, reuse_port=shared))
            listener.start()
            listeners.append(listener)
    except OSError:
        for listener in listeners:
            await listener.aclose()
        raise
    return listeners
