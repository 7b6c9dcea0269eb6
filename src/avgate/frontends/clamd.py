r"""clamd-protocol listener: existing clamd clients talk to avgate as if it were clamd.

Settings: :class:`ClamdListenerSettings` (``[clamd_listener]``), read from
``gateway.config.clamd_listener`` per connection and again per command, so a reload applies
from the next command (the listen addresses and ``max_connections`` only from a restart).

The bytes ⇄ events work is :mod:`avgate.protocols.clamd`; this module only moves bytes
between sockets and the codec and calls ``gateway.process`` (``Context(frontend="clamd")``).
It uses plain non-blocking sockets (reader callbacks, no transports): the unix socket needs
``recvmsg`` for the file descriptors FILDES passes, and one code path for both keeps the hot
path lean. The listening socket is watched by a callback that accepts what is pending; each
connection keeps its reader registered between waits and one deadline timer (:class:`Readable`).
Sockets are opened by :func:`avgate.frontends.listen.bind`.

Beside it: :mod:`.clamd_scan` (verdict words, file snapshots, path scans below
``allowed_paths``) and :mod:`.clamd_accounting` (descriptors, sessions, reloads: what a
client may hold of the process, and the rate-limited error lines).

Idle timeout: only progress resets it — a complete command, or INSTREAM data. Bare
descriptors, keep-alive NULs and partial command bytes do not, so a connection that sends
nothing but those is closed ``idle_timeout`` after its last real command. A reply the client
does not read within ``idle_timeout`` closes the connection too. Descriptors are received
with MSG_CMSG_CLOEXEC.

IDSESSION: commands of a session run one at a time (one in flight; nothing more is read while
a complete command is waiting, so read-ahead is bounded by one receive buffer); one
IDSESSION over the session limits is answered ``Too many sessions ... ERROR`` and closed.

SHUTDOWN is refused (a network client must not stop the gateway). RELOAD reloads config and
signatures like SIGHUP when running under ``avgate serve``; it is accepted on the unix
socket, and over TCP only with ``allow_reload = true`` (anyone who can reach the port could
otherwise flush the verdict cache at will).
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
from datetime import datetime
from typing import Any

from pydantic import Field, field_validator

from .. import __version__
from ..deadline import Deadline
from ..errors import SpoolError
from ..gateway import Gateway
from ..policy import Context
from ..protocols import clamd as proto
from ..result import ScanResult
from ..settings import Group, Listen, Mode, Section, Size, StrTuple
from ..spool import Spool
from . import clamd_accounting as accounting
from .clamd_accounting import Conn
from .clamd_scan import FileScanner, as_clamd_verdict, clean_text, verdict_lines, verdict_text
from .listen import Address, Listener, ListenOptions, bind

__all__ = ["ClamdListener", "ClamdListenerSettings", "as_clamd_verdict", "start",
           "verdict_lines"]

_RECV = 256 * 1024
#: socket flags as plain ints: an operation on the IntFlag members builds an enum each time
#: (about 3 µs here), on the hot path of every connection
_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
_CTRUNC = int(socket.MSG_CTRUNC)
_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_FDS_PER_MESSAGE = 4  # ancillary room per recvmsg; the kernel closes what does not fit
_ACCEPT_BATCH = 64  # connections accepted per readiness report of the listening socket
COMMANDS = ("SCAN QUIT RELOAD PING CONTSCAN VERSIONCOMMANDS VERSION END SHUTDOWN MULTISCAN "
            "FILDES STATS IDSESSION INSTREAM ALLMATCHSCAN")


class ClamdListenerSettings(Section):
    """``[clamd_listener]``: the clamd-protocol listener.

    - ``listen``: address (default ``127.0.0.1:3311``; ``unix:/path`` works too)
    - ``unix_socket``: an additional unix socket path (FILDES works only on a unix socket)
    - ``unix_socket_mode``: permissions of the unix sockets (default ``"0660"``) and
      ``unix_socket_group`` (a group name or gid; default: the process's group), like clamd's
      LocalSocketMode/LocalSocketGroup
    - ``allowed_paths``: directories SCAN & co. may read (none by default: path scans are
      refused)
    - ``stream_max_length``: INSTREAM limit (default 25 MiB, like clamd)
    - ``max_connections``: clients served at once (default 128; more wait in the backlog)
    - ``idle_timeout``: seconds without progress before a connection is closed (default 30)
    - ``max_fds`` / ``max_fds_per_connection``: descriptors held for FILDES (default 256 per
      process / 4 per connection)
    - ``max_sessions`` / ``max_sessions_per_client``: IDSESSION sessions open at once
      (default 64 per process / 16 per client)
    - ``allow_reload``: RELOAD over TCP (default false; always allowed on a unix socket)
    """

    listen: Listen = Field(default="127.0.0.1:3311", validate_default=True)
    unix_socket: str | None = None
    unix_socket_mode: Mode = Field(default="0660", validate_default=True)
    unix_socket_group: Group | None = None
    allowed_paths: StrTuple = ()
    stream_max_length: Size = proto.DEFAULT_STREAM_MAX_LENGTH
    max_connections: int = Field(default=128, gt=0)
    idle_timeout: float = Field(default=30.0, gt=0)
    max_fds: int = Field(default=256, gt=0)
    max_fds_per_connection: int = Field(default=4, gt=0)
    max_sessions: int = Field(default=64, gt=0)
    max_sessions_per_client: int = Field(default=16, gt=0)
    allow_reload: bool = False

    @field_validator("unix_socket_mode", mode="before")
    @classmethod
    def _mode_is_text(cls, value: object) -> object:
        # 660 in TOML is a decimal number, not the octal 0660 it looks like
        if isinstance(value, int):
            raise ValueError(f'expected an octal mode string like "0660", got {value!r}')
        return value


_DEFAULTS = ClamdListenerSettings()


class Readable:
    """Waits for one client socket to have data (asyncio has no sock_recvmsg before Python
    3.13), up to a deadline.

    The reader stays registered while the connection waits again and again (it is removed
    only when new bytes come while nobody waits, and at :meth:`close`; a readiness report
    made before the last read is told apart by a peek), and the deadline is one timer
    handle per connection, moved rather than re-armed: no epoll registration and no timer
    per wait.
    """

    __slots__ = ("_deadline", "_fd", "_loop", "_reading", "_sock", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._reading = False
        self._waiter: asyncio.Future[bool] | None = None
        self._deadline = Deadline(loop, self._expired)

    async def wait(self, deadline: float) -> bool:
        """True once the socket is readable (the caller reads without blocking and waits
        again if nothing is there: a poll's report can predate the last read); False when
        ``deadline`` (loop time) comes first."""
        loop = self._loop
        if loop.time() >= deadline:
            return False
        self._waiter = waiter = loop.create_future()
        if not self._reading:
            loop.add_reader(self._fd, self._ready)
            self._reading = True
        self._deadline.set(deadline)
        try:
            ready: bool = await waiter
        finally:
            self._waiter = None
            self._deadline.clear()
        return ready

    def _ready(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(True)
            return
        try:  # nobody waits: a report from before the last read, or new bytes?
            self._sock.recv(1, _PEEK)
        except (BlockingIOError, InterruptedError):
            return  # nothing new: keep watching
        except OSError:
            pass
        # bytes (or EOF) while a command is in progress: stop watching until the next wait
        # (epoll is level-triggered: it would report them on every turn)
        self._loop.remove_reader(self._fd)
        self._reading = False

    def _expired(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    def close(self) -> None:
        """Stop watching (before the socket is closed)."""
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
        self._deadline.cancel()


class ClamdListener:
    """One listening socket (TCP or unix) speaking the clamd protocol."""

    def __init__(self, gateway: Gateway, sock: socket.socket, *, unix_path: str | None = None,
                 name: str = "clamd") -> None:
        self.gateway = gateway
        self.sock = sock
        self.unix_path = unix_path
        self.name = name
        #: clients served at once (more wait in the backlog); read at start only
        self._max_connections = self.settings().max_connections
        self._conns: set[Conn] = set()
        self._closing = False
        self._accepting = False  # the listening socket is watched
        self._backoff: asyncio.TimerHandle | None = None  # accept failed: watch again later
        #: the loop it serves in, from start(): asyncio.get_running_loop() costs a getpid()
        #: system call, and this is per connection
        self._loop: asyncio.AbstractEventLoop | None = None
        self._versions: dict[str, tuple[int, str]] = {}
        self.started = time.time()
        self.served = 0

    def settings(self) -> ClamdListenerSettings:
        """``[clamd_listener]`` of the current config (it follows reloads)."""
        return self.gateway.config.clamd_listener or _DEFAULTS

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
        self._loop = asyncio.get_running_loop()
        self._watch_accept()

    async def aclose(self) -> None:
        """Stop accepting; end idle connections; let commands in progress finish."""
        self._closing = True
        self._unwatch_accept()
        if self._backoff is not None:
            self._backoff.cancel()
            self._backoff = None
        self.sock.close()
        if self.unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)
        for conn in list(self._conns):
            if not conn.busy and conn.task is not None:
                conn.task.cancel()
        tasks = [c.task for c in self._conns if c.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- accepting ------------------------------------------------------------------------
    # The listening socket is watched by a reader callback that accepts what is pending (no
    # task and no future per accept); it stops watching while max_connections are served.
    def _watch_accept(self) -> None:
        if not self._accepting and not self._closing and self._backoff is None:
            asyncio.get_running_loop().add_reader(self.sock.fileno(), self._accept_ready)
            self._accepting = True

    def _unwatch_accept(self) -> None:
        if self._accepting:
            self._accepting = False
            asyncio.get_running_loop().remove_reader(self.sock.fileno())

    def _accept_ready(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            if len(self._conns) >= self._max_connections:
                self._unwatch_accept()  # watched again when a connection ends
                return
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                accounting.log.log(f"accept:{exc.errno}", f"avgate: clamd listener "
                                   f"{self.describe()}: accept failed: {exc}")
                # EMFILE and friends: back off, keep serving
                self._unwatch_accept()
                self._backoff = asyncio.get_running_loop().call_later(0.05, self._retry_accept)
                return
            self._admit(sock, addr)

    def _retry_accept(self) -> None:
        self._backoff = None
        self._watch_accept()

    def _admit(self, sock: socket.socket, addr: Any) -> None:
        sock.setblocking(False)
        client: str | None
        if self.unix_path is not None:
            peer, client = "local", None  # the peer's uid: asked when a limit needs it
        else:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # reset before it was admitted
                sock.close()
                return
            peer, client = f"{addr[0]}:{addr[1]}", str(addr[0])
        conn = Conn(sock, self.unix_path is not None, peer, client, self.settings())
        self._conns.add(conn)
        conn.task = (self._loop or asyncio.get_running_loop()).create_task(self._serve(conn))

    # -- one connection -----------------------------------------------------------------
    def _recv_ready(self, conn: Conn) -> bytes | None:
        """What the socket holds now: bytes (b"" at EOF), or None when only descriptors
        arrived; raises BlockingIOError when nothing is there yet."""
        if not conn.unix:
            return conn.sock.recv(_RECV)
        data, fds, flags, _addr = socket.recv_fds(
            conn.sock, _RECV, _FDS_PER_MESSAGE, _CMSG_CLOEXEC)
        if fds or flags & _CTRUNC:
            conn.adopt_fds(fds, bool(flags & _CTRUNC),
                           asyncio.get_running_loop().time())
            # clamdscan sends the descriptor with one dummy NUL byte, the last byte of
            # the message carrying it: it is not part of any command
            if data.endswith(b"\0"):
                data = data[:-1]
                if not data:
                    return None
        return data

    async def _send(self, conn: Conn, data: bytes) -> None:
        """Send, or give up (TimeoutError) when the client does not read for idle_timeout.
        A reply the socket takes at once (the usual case: a few dozen bytes) is sent
        without arming the timeout."""
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent == len(data):
            return
        async with asyncio.timeout(conn.settings.idle_timeout):
            await asyncio.get_running_loop().sock_sendall(conn.sock, data[sent:])

    async def _serve(self, conn: Conn) -> None:
        loop = self._loop or asyncio.get_running_loop()
        conn.readable = readable = Readable(loop, conn.sock)
        parser = proto.ServerParser(stream_max_length=conn.settings.stream_max_length)
        spool: Spool | None = None
        instream: proto.Command | None = None
        # only progress (a complete command, INSTREAM data) moves the idle deadline
        deadline = loop.time() + conn.settings.idle_timeout
        try:
            while True:
                try:
                    event = parser.next_event()
                except proto.ClamdProtocolError as exc:
                    conn.busy = True
                    await self._send(conn, exc.reply())
                    return
                if conn.fds:
                    conn.expire_fds(loop.time())
                if event is proto.NEED_DATA:
                    try:
                        # what is there already is taken without arming the timeout
                        data = self._recv_ready(conn)
                    except (BlockingIOError, InterruptedError):
                        # nothing yet: wait for it (then read it on the next turn)
                        if not await readable.wait(deadline):
                            return
                        continue
                    if data is None:
                        continue  # a descriptor alone: FILDES will take it
                    if data:
                        conn.busy = True
                    parser.receive_data(data)
                    continue
                if isinstance(event, proto.InstreamChunk):
                    assert spool is not None
                    deadline = loop.time() + conn.settings.idle_timeout
                    try:
                        spool.write(event.data)
                    except SpoolError as exc:  # disk full: say so, never answer OK
                        assert instream is not None
                        await self._reply(conn, instream,
                                          [proto.error_reply(clean_text(str(exc)), "stream")])
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
                    # the settings for this command (a reload applies from the next one)
                    conn.settings = self.settings()
                    parser.stream_max_length = conn.settings.stream_max_length
                    deadline = loop.time() + conn.settings.idle_timeout
                    if event.name == "INSTREAM":
                        spool = self.gateway.new_spool()
                        instream = event
                        continue
                    if event.name == "END":
                        return
                    if event.name == "IDSESSION":
                        if not conn.open_session():
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
                # the time spent scanning is not idleness
                deadline = loop.time() + conn.settings.idle_timeout
        except (ConnectionError, OSError):  # TimeoutError included: a client not reading
            return
        except Exception as exc:  # a bug must not pass silently; the client sees the close
            frame = traceback.extract_tb(exc.__traceback__)[-1:]
            where = f"{frame[0].filename}:{frame[0].lineno}" if frame else "?"
            accounting.log.log(f"serve:{type(exc).__name__}:{where}",
                               "avgate: clamd listener: internal error\n"
                               + traceback.format_exc())
            return
        finally:
            readable.close()
            if spool is not None:
                spool.close()
            conn.release()
            self._conns.discard(conn)
            self._watch_accept()  # when it had stopped at max_connections

    async def _reply(self, conn: Conn, command: proto.Command, lines: list[str]) -> None:
        glog = self.gateway.log
        if glog is not None and glog.debug_enabled:
            glog.debug({"event": "clamd_command", "frontend": "clamd", "listener": self.name,
                        "client": conn.peer, "command": command.name, "lines": len(lines),
                        "reply": lines[0][:200] if lines else ""})
        await self._send(conn, b"".join(command.reply(line) for line in lines))

    async def _process(self, spool: Spool, peer: str) -> ScanResult:
        spool.finish()
        ctx = Context(frontend="clamd", listener=self.name, client_addr=peer,
                      size=spool.size)
        outcome = await self.gateway.process(spool, ctx, defer_log=True)
        self.served += 1
        verdict = as_clamd_verdict(outcome.result, outcome.decision)
        self.gateway.log_outcome(outcome, clamd_reply=verdict_text(verdict))
        return verdict

    def _files(self, conn: Conn) -> FileScanner:
        return FileScanner(self.gateway.config, conn.settings.allowed_paths, self._process)

    # -- commands -----------------------------------------------------------------------
    async def _command(self, cmd: proto.Command, conn: Conn,
                       parser: proto.ServerParser) -> list[str]:
        name = cmd.name
        if name == "PING":
            return [proto.PONG]
        if name == "VERSION":
            return [self.version()]
        if name == "VERSIONCOMMANDS":
            return [f"{self.version()}| COMMANDS: {COMMANDS}"]
        if name == "STATS":
            return [self.stats(conn.settings)]
        if name == "RELOAD":
            return self._reload(conn)
        if name == "SHUTDOWN":
            return [proto.error_reply("SHUTDOWN is not allowed on avgate's clamd listener")]
        if name == "FILDES":
            return await self._fildes(conn, parser)
        return await self._files(conn).scan_path(cmd.name, cmd.args)

    def _reload(self, conn: Conn) -> list[str]:
        if not conn.unix and not conn.settings.allow_reload:
            return [proto.error_reply("RELOAD is only allowed on the unix socket "
                                      "(or with allow_reload = true)")]
        reload = getattr(self.gateway, "request_reload", None)
        if reload is not None:
            # the reply comes first, as with clamd; the reload runs on its own, coalesced
            accounting.reloads.request(reload, id(self.gateway))
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

    def stats(self, settings: ClamdListenerSettings) -> str:
        """A STATS reply in clamd's layout (pools and memory are not meaningful here)."""
        busy = sum(1 for c in self._conns if c.busy)
        return (
            "POOLS: 1\n\nSTATE: VALID PRIMARY\n"
            f"THREADS: live {busy}  idle {len(self._conns) - busy} "
            f"max {settings.max_connections} idle-timeout {int(settings.idle_timeout)}\n"
            f"QUEUE: 0 items\n\tSTATS 0.000000 \n\n"
            f"MEMSTATS: heap N/A mmap N/A used N/A free N/A releasable N/A pools 1 "
            "pools_used N/A pools_total N/A\nEND")

    async def _fildes(self, conn: Conn, parser: proto.ServerParser) -> list[str]:
        if not conn.unix:
            return [proto.error_reply("FILDES: only on the unix socket")]
        assert conn.readable is not None  # (set by _serve)
        if not conn.fds:
            # the descriptor may arrive just after the command: read (and buffer) until then
            deadline = asyncio.get_running_loop().time() + conn.settings.idle_timeout
            while not conn.fds and not conn.dropped:
                try:
                    data = self._recv_ready(conn)
                except (BlockingIOError, InterruptedError):
                    if not await conn.readable.wait(deadline):
                        break
                    continue
                if data is not None:
                    parser.receive_data(data)
                if data == b"":
                    break
        if not conn.fds:
            if conn.dropped:  # it came, but over max_fds / max_fds_per_connection
                conn.dropped -= 1
                return [proto.error_reply("FILDES: file descriptor refused: too many held.")]
            return [proto.error_reply("FILDES: didn't receive file descriptor.")]
        fd = conn.claim_fd()
        label = f"fd[{fd}]"
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return [proto.error_reply("Not supported file type.", label)]
            return verdict_lines(await self._files(conn).scan_fd(fd, conn.peer), label)
        finally:
            accounting.fds.close(fd)


async def start(gateway: Gateway, options: ListenOptions) -> list[Listener]:
    """Open ``[clamd_listener] listen`` and, if set, ``unix_socket`` (unix sockets only in
    the process ``options`` says opens them)."""
    settings = gateway.config.clamd_listener or _DEFAULTS
    addresses = [settings.listen]
    if settings.unix_socket:
        addresses.append(Address("unix", path=settings.unix_socket))
    if not options.unix_sockets:  # another serve worker owns the unix sockets
        addresses = [a for a in addresses if not a.is_unix]
    listeners: list[Listener] = []
    try:
        for address in addresses:
            sock = bind(address, what="clamd_listener", options=options,
                        mode=settings.unix_socket_mode, group=settings.unix_socket_group)
            unix_path = address.resolve(options.base_dir).path if address.is_unix else None
            listener = ClamdListener(gateway, sock, unix_path=unix_path)
            listener.start()
            listeners.append(listener)
    except OSError:
        for opened in listeners:
            await opened.aclose()
        raise
    return listeners
