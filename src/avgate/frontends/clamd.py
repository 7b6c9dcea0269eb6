r"""clamd-protocol listener: existing clamd clients talk to avgate as if it were clamd.

``[clamd_listener]``: ``listen`` (default ``127.0.0.1:3311``; ``unix:/path`` also works),
``unix_socket`` (an additional unix socket; FILDES works only there), ``allowed_paths``
(directories SCAN & co. may read; none by default, so path scans are refused),
``stream_max_length`` (INSTREAM limit, default 25 MiB like clamd), ``max_connections``
(default 128; further clients wait in the accept backlog), ``idle_timeout`` (default 30 s of
silence before a connection is closed).

The bytes ⇄ events work is :mod:`avgate.protocols.clamd`; this module only moves bytes
between sockets and the codec and calls ``gateway.process`` (``Context(frontend="clamd")``).
It uses plain non-blocking sockets (``loop.sock_*``): the unix socket needs ``recvmsg`` for
the file descriptors FILDES passes, and one code path for both keeps the hot path lean.

Verdicts: clamd clients know three words. ``infected`` → ``<path>: NAME FOUND`` (whatever
the policy decides — clients act on FOUND themselves; ALLMATCHSCAN lists every name),
``clean`` → ``<path>: OK``, ``error`` → ``<path>: <reason> ERROR``. ``skipped`` (over a size
limit) and ``unknown`` (e.g. encrypted archive) → ``OK``, as clamd does by default
(AlertExceedsMax and AlertEncrypted are off by default); the scan log and metrics keep the
real status.

Path scans (SCAN, CONTSCAN, MULTISCAN, ALLMATCHSCAN) only read below ``allowed_paths``:
the path is resolved (symlinks, ``..``) and must lie inside one of them, directory walks do
not follow symlinks (clamd's default), and each file is opened with O_NOFOLLOW and checked
again through its descriptor, so a symlink swapped in after the check cannot lead out.
Anything else is answered ``<path>: Access denied. ERROR``. SCAN stops at the first
infected file; the others go on.

SHUTDOWN is refused (a network client must not stop the gateway); RELOAD reloads config and
signatures like SIGHUP when running under ``avgate serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import stat
import time
import traceback
from collections import deque
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from .. import __version__
from ..errors import SpoolError
from ..gateway import Gateway
from ..policy import Context
from ..protocols import clamd as proto
from ..result import ScanResult, ScanStatus
from ..spool import Spool

DEFAULT_LISTEN = "127.0.0.1:3311"
DEFAULT_MAX_CONNECTIONS = 128
DEFAULT_IDLE_TIMEOUT = 30.0
_RECV = 256 * 1024
_MAX_FDS = 4  # FILDES passes one; a few more are accepted and closed
# a file up to this size is hashed on the event loop; larger ones in a thread
_INLINE_FILE = 1 << 20
COMMANDS = ("SCAN QUIT RELOAD PING CONTSCAN VERSIONCOMMANDS VERSION END SHUTDOWN MULTISCAN "
            "FILDES STATS IDSESSION INSTREAM ALLMATCHSCAN")


def _clean_text(text: str) -> str:
    """Reply text must not contain the terminators."""
    return " ".join(text.replace("\0", " ").split())


def _signature_name(name: str) -> str:
    # clients split "<path>: NAME FOUND" from the right: a name has no spaces
    return "_".join(name.split()) or "Unknown"


def verdict_lines(result: ScanResult, path: str, *, all_matches: bool = False) -> list[str]:
    """The clamd reply lines for one scanned object (see the module docstring)."""
    if result.status is ScanStatus.INFECTED:
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


def _unix_socket(path: str) -> socket.socket:
    """Bind a unix socket; a stale socket file (nobody listening) is replaced."""
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
    try:
        sock.bind(path)
        # like Debian's clamd (LocalSocketMode 666): local clients of any user may scan
        os.chmod(path, 0o666)  # noqa: S103 - clamd's LocalSocketMode 666, on purpose
        sock.listen(512)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _Conn:
    """State of one client connection."""

    __slots__ = ("busy", "fds", "peer", "sock", "task", "unix")

    def __init__(self, sock: socket.socket, unix: bool, peer: str) -> None:
        self.sock = sock
        self.unix = unix
        self.fds: deque[int] = deque()
        self.busy = False  # inside a command: drain waits for it; idle ones are cancelled
        self.task: asyncio.Task[None] | None = None
        self.peer = peer


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
            except OSError:
                self._slots.release()
                await asyncio.sleep(0.05)  # EMFILE and friends: back off, keep serving
                continue
            except BaseException:
                self._slots.release()
                raise
            sock.setblocking(False)
            if not unix:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "local"
            conn = _Conn(sock, unix, peer)
            self._conns.add(conn)
            conn.task = asyncio.ensure_future(self._serve(conn))

    # -- one connection -----------------------------------------------------------------
    async def _recv(self, conn: _Conn) -> bytes | None:
        """Bytes from the client (b"" at EOF), or None when only descriptors arrived."""
        loop = asyncio.get_running_loop()
        if not conn.unix:
            return await loop.sock_recv(conn.sock, _RECV)
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(conn.sock, _RECV, _MAX_FDS)
            except (BlockingIOError, InterruptedError):
                await _readable(loop, conn.sock)
                continue
            if fds:
                conn.fds.extend(fds)
                # clamdscan sends the descriptor with one dummy NUL byte, the last byte of
                # the message carrying it: it is not part of any command
                if data.endswith(b"\0"):
                    data = data[:-1]
                    if not data:
                        return None
            return data

    async def _serve(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.gateway.config.clamd_listener or {}
        idle = float(cfg.get("idle_timeout", DEFAULT_IDLE_TIMEOUT))
        parser = proto.ServerParser(stream_max_length=int(cfg.get(
            "stream_max_length", proto.DEFAULT_STREAM_MAX_LENGTH)))
        spool: Spool | None = None
        instream: proto.Command | None = None
        try:
            while True:
                try:
                    event = parser.next_event()
                except proto.ClamdProtocolError as exc:
                    conn.busy = True
                    await loop.sock_sendall(conn.sock, exc.reply())
                    return
                if event is proto.NEED_DATA:
                    try:
                        async with asyncio.timeout(idle):
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
                    if event.name == "INSTREAM":
                        spool = self.gateway.new_spool()
                        instream = event
                        continue
                    if event.name == "END":
                        return
                    if event.name == "IDSESSION":
                        conn.busy = False
                        continue
                    lines = await self._command(event, conn, parser)
                    await self._reply(conn, event, lines)
                    if event.name == "SHUTDOWN":
                        return
                if not parser.in_session or self._closing:
                    return  # one command per connection outside IDSESSION (like clamd)
                conn.busy = False
        except (ConnectionError, OSError):
            return
        except Exception:  # a bug must not pass silently; the client sees the close (error)
            traceback.print_exc()
            return
        finally:
            if spool is not None:
                spool.close()
            while conn.fds:
                with contextlib.suppress(OSError):
                    os.close(conn.fds.popleft())
            conn.sock.close()
            self._conns.discard(conn)
            self._slots.release()

    async def _reply(self, conn: _Conn, command: proto.Command, lines: list[str]) -> None:
        data = b"".join(command.reply(line) for line in lines)
        await asyncio.get_running_loop().sock_sendall(conn.sock, data)

    async def _process(self, spool: Spool, peer: str) -> ScanResult:
        spool.finish()
        ctx = Context(frontend="clamd", listener=self.name, client_addr=peer,
                      size=spool.size)
        outcome = await self.gateway.process(spool, ctx)
        self.served += 1
        return outcome.result

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
            reload = getattr(self.gateway, "request_reload", None)
            if reload is not None:
                # the reply comes first, as with clamd; the reload runs on its own
                _spawn(reload())
            return ["RELOADING"]
        if name == "SHUTDOWN":
            return [proto.error_reply("SHUTDOWN is not allowed on avgate's clamd listener")]
        if name == "FILDES":
            return await self._fildes(conn, parser)
        return await self._scan_path(cmd)

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
        cfg = self.gateway.config.clamd_listener or {}
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
            cfg = self.gateway.config.clamd_listener or {}
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(float(cfg.get("idle_timeout",
                                                         DEFAULT_IDLE_TIMEOUT))):
                    while not conn.fds:
                        data = await self._recv(conn)
                        if data is not None:
                            parser.receive_data(data)
                        if data == b"":
                            break
        if not conn.fds:
            return [proto.error_reply("FILDES: didn't receive file descriptor.")]
        fd = conn.fds.popleft()
        label = f"fd[{fd}]"
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return [proto.error_reply("Not supported file type.", label)]
            result = await self._scan_fd(fd, conn.peer)
        finally:
            os.close(fd)
        return verdict_lines(result, label)

    async def _scan_fd(self, fd: int, peer: str) -> ScanResult:
        """Scan an open regular file through /proc without copying it."""
        # /proc/<pid>/fd/N names this very inode, even if the path was swapped meanwhile;
        # <pid> rather than "self" so that an external command engine can open it too
        path = f"/proc/{os.getpid()}/fd/{fd}"
        if os.fstat(fd).st_size > _INLINE_FILE:
            spool = await asyncio.to_thread(Spool.from_path, path)
        else:
            spool = Spool.from_path(path)
        with spool:
            return await self._process(spool, peer)

    def _allowed(self) -> list[str]:
        cfg = self.gateway.config.clamd_listener or {}
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
        """Scan one file (opened without following a final symlink, checked by descriptor).

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
            result = await self._scan_fd(fd, "local")
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


_background: set[asyncio.Task[Any]] = set()


def _spawn(coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


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
    listeners: list[ClamdListener] = []
    try:
        for kind, where in addresses:
            if kind == "unix":
                listener = ClamdListener(gateway, _unix_socket(where), unix_path=where)
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
