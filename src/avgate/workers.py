"""Scan workers: supervised processes that run attacker-sized work under hard budgets.

Decomposing content and matching signatures is CPU-bound and its cost is chosen by whoever
sends the content: a 3 KB 7z can declare 500,000 entries, a 62 KB header can make the email
package go quadratic. None of it may run on the event loop, and none of it may run where it
cannot be stopped (a thread cannot be killed). So it runs here, in a pool of worker
processes, each task under

* a **wall-clock budget**: the parent waits at most ``budget`` seconds; then the worker is
  killed (SIGKILL) and replaced, and the caller gets :class:`BudgetExceeded`;
* a **memory cap**: ``RLIMIT_AS`` in the worker; a ``MemoryError`` (or the worker dying) is
  reported as :class:`BudgetExceeded` too, and that worker is replaced.

The event loop only moves bytes: a task is one length-prefixed pickle written to the
worker's socket, the reply one read from it (an asyncio protocol, no helper threads). Why not
``concurrent.futures.ProcessPoolExecutor`` or pebble: the first cannot stop a running task
(one stuck task breaks the whole pool), and pebble can but costs ~300 us of the parent's CPU
per task through its helper threads and futures (measured: 20 KB object, 2 workers), which
is most of an embedded scan; this module costs a few tens of microseconds.

Workers are forked by a *zygote*: one small single-threaded process per gateway process,
started once with the scanning modules imported, so a worker (or a replacement for a killed
one) starts in a few milliseconds and shares the imported code copy-on-write. (This is what
multiprocessing's forkserver does, minus its re-import of the parent's ``__main__`` in every
child, which would make a worker depend on how avgate was started.) What a worker needs
(compiled signatures, limits) is handed to its ``initializer`` once, when it starts. Workers
die with the zygote, and the zygote with its owner (PR_SET_PDEATHSIG, and EOF on its socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import pickle
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, cast

#: modules the forkserver imports once, so every worker starts with them loaded
PRELOAD = ["avgate.workers", "avgate.engines.embedded", "avgate.content",
           "avgate.content.mime", "avgate.content.archives", "avgate.content.sevenzip",
           "avgate.content.arj", "avgate.content.libarchive", "avgate.content.office",
           "avgate.content.pdf", "avgate.content.html", "avgate.content.tnef",
           "avgate.content.typeid", "avgate.banned"]

_HEADER = struct.Struct("!i")
_BIG = struct.Struct("!Q")
_START_TIMEOUT = 60.0  # a worker that does not report ready by then is broken


class WorkerError(Exception):
    """The pool could not run a task (closed pool, a worker that failed to start)."""


class BudgetExceeded(WorkerError):
    """A task ran over its time budget or memory cap, or killed its worker.

    ``kind``: ``"time"``, ``"memory"`` or ``"died"``. The object that caused it is not
    scannable within the configured budgets: that is a verdict, never a pass.
    """

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class PoolStats:
    size: int
    busy: int
    started: int  # workers started since the pool began (replacements included)
    killed: int  # workers killed for running over a budget or being cancelled
    tasks: int


# -- the worker process -----------------------------------------------------------------------
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; best effort)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def _worker_main(conn: Connection, initializer: Callable[..., None] | None,
                 initargs: tuple[Any, ...], memory_limit: int | None) -> None:
    """Run tasks from ``conn`` until it closes. Runs in the worker process."""
    if memory_limit:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    try:
        if initializer is not None:
            initializer(*initargs)
    except BaseException as exc:
        conn.send_bytes(pickle.dumps(("init-error", f"{type(exc).__name__}: {exc}")))
        return
    conn.send_bytes(pickle.dumps(("ready", os.getpid())))
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return
        reply: tuple[str, Any]
        try:
            fn, args = pickle.loads(message)  # noqa: S301 - from our own parent
            del message
            reply = ("ok", fn(*args))
        except MemoryError:
            reply = ("memory", "")
        except BaseException as exc:
            reply = ("error", f"{type(exc).__name__}: {exc}"[:500])
        try:
            conn.send_bytes(pickle.dumps(reply))
        except MemoryError:
            conn.send_bytes(pickle.dumps(("memory", "")))
        if reply[0] == "memory":
            return  # the heap may be in a poor state: let the parent start a fresh worker


def _zygote_main(fd: int) -> None:
    """The zygote: fork one worker per request on ``fd``, hand back its socket and pid."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner decides when we stop
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps our workers
    _die_with_parent()
    control = socket.socket(fileno=fd)
    for module in PRELOAD:
        with contextlib.suppress(ImportError):  # a reader missing here fails where it is used
            importlib.import_module(module)
    control.sendall(b"R")
    with control:
        while True:
            try:
                (n,) = _HEADER.unpack(_recv_exactly(control, _HEADER.size))
                request = _recv_exactly(control, n)
            except (EOFError, OSError):
                return
            ours, theirs = socket.socketpair()
            pid = os.fork()
            if pid == 0:  # the worker
                try:
                    control.close()
                    ours.close()
                    _die_with_parent()
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    initializer, initargs, memory_limit = pickle.loads(request)  # noqa: S301
                    del request
                    _worker_main(Connection(theirs.detach()), initializer, initargs,
                                 memory_limit)
                finally:
                    os._exit(0)
            theirs.close()
            try:
                socket.send_fds(control, [struct.pack("!q", pid)], [ours.fileno()])
            except OSError:
                return
            finally:
                ours.close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


class _Zygote:
    """The parent's handle on its zygote (one per process, started on first use)."""

    _lock = threading.Lock()
    _current: _Zygote | None = None
    _pid = 0  # the process that started _current (a forked serve worker needs its own)

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        # The parent's sys.path, as multiprocessing passes it: task functions are pickled
        # by reference and must import the same way here.
        code = (f"import sys; sys.path[:] = {sys.path!r}; "
                f"from avgate.workers import _zygote_main; _zygote_main({theirs.fileno()})")
        self.process = subprocess.Popen([sys.executable, "-c", code],
                                        pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        self.sock = ours
        self.sock.settimeout(_START_TIMEOUT)
        try:
            if _recv_exactly(self.sock, 1) != b"R":
                raise OSError("zygote did not start")
        except BaseException:
            self.close()
            raise

    @classmethod
    def fork(cls, request: bytes) -> tuple[int, socket.socket]:
        """A new worker: (pid, connected socket). Blocking: call it in a thread."""
        with cls._lock:
            if cls._pid != os.getpid():
                cls._current, cls._pid = None, os.getpid()
            for attempt in (1, 2):
                zygote = cls._current
                try:
                    if zygote is None or zygote.process.poll() is not None:
                        zygote = cls._current = cls()
                    zygote.sock.sendall(_HEADER.pack(len(request)) + request)
                    msg, fds, _flags, _addr = socket.recv_fds(zygote.sock, 8, 1)
                    if len(msg) != 8 or len(fds) != 1:
                        raise OSError("zygote sent no worker")
                    (pid,) = struct.unpack("!q", msg)
                    return pid, socket.socket(fileno=fds[0])
                except (OSError, EOFError):
                    if zygote is not None:
                        zygote.close()
                    cls._current = None
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait(5)


# -- the parent side --------------------------------------------------------------------------
class _Channel(asyncio.Protocol):
    """The parent's end of one worker's socket: length-prefixed frames in, one at a time.

    A plain protocol rather than asyncio streams: a reply is one ``data_received`` and one
    future, where a StreamReader's two ``readexactly`` calls cost two more task wake-ups
    per task (measured: ~0.05 ms of the parent's CPU per task of a 20 KB object)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[bytes] | None = None
        self._lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports implement asyncio.Transport without subclassing it)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._deliver()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or asyncio.IncompleteReadError(bytes(self._buffer), None)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(self._lost)

    def _frame(self) -> bytes | None:
        """The next whole frame in the buffer (removed from it), or None."""
        buf = self._buffer
        if len(buf) < _HEADER.size:
            return None
        (n,) = _HEADER.unpack_from(buf)
        start = _HEADER.size
        if n == -1:
            if len(buf) < start + _BIG.size:
                return None
            (n,) = _BIG.unpack_from(buf, start)
            start += _BIG.size
        if len(buf) < start + n:
            return None
        frame = bytes(buf[start:start + n])
        del buf[:start + n]
        return frame

    def _deliver(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        frame = self._frame()
        if frame is not None:
            self._waiter = None
            waiter.set_result(frame)

    async def receive(self) -> bytes:
        """The next frame (raises IncompleteReadError/ConnectionError once the worker is
        gone)."""
        ready = self._frame()
        if ready is not None:
            return ready
        if self._lost is not None:
            raise self._lost
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            frame = await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None
        return frame


class _Worker:
    __slots__ = ("channel", "pid", "pidfd", "transport")

    def __init__(self, pid: int, transport: asyncio.Transport, channel: _Channel) -> None:
        self.pid = pid
        # A pidfd names this very process even after its pid is reused: kill() can never
        # hit another process.
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
        except (OSError, AttributeError):  # pragma: no cover - old kernel
            self.pidfd = None
        self.transport = transport
        self.channel = channel

    def send(self, payload: bytes) -> None:
        """Queue one frame: the transport writes what the socket takes now and the rest as
        the worker reads (the worker answers only once it has it all)."""
        if self.transport.is_closing():
            raise ConnectionResetError("scan worker connection closed")
        n = len(payload)
        header = _HEADER.pack(-1) + _BIG.pack(n) if n > 0x7FFFFFFF else _HEADER.pack(n)
        self.transport.writelines((header, payload))

    async def receive(self) -> Any:
        return pickle.loads(await self.channel.receive())  # noqa: S301 - our own worker

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.transport.close()
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = None


class WorkerPool:
    """``size`` worker processes; :meth:`run` one task at a time on each, under budgets."""

    def __init__(self, size: int, *, initializer: Callable[..., None] | None = None,
                 initargs: tuple[Any, ...] = (), memory_limit: int | None = None,
                 name: str = "scan") -> None:
        if size < 1:
            raise ValueError("a worker pool needs at least one worker")
        self.size = size
        self.initializer = initializer
        self.initargs = initargs
        self.memory_limit = memory_limit
        self.name = name
        self._idle: asyncio.Queue[_Worker] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._all: set[_Worker] = set()
        self._closed = False
        self._replacing: set[asyncio.Task[None]] = set()
        self._request: bytes | None = None
        self._started = 0
        self._killed = 0
        self._tasks = 0
        # A pool dropped without close() must not leave processes behind.
        weakref.finalize(self, _kill_all, self._all)

    # -- life cycle ----------------------------------------------------------------------
    async def start(self) -> None:
        if self._idle is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Queue()
        workers = await asyncio.gather(*(self._spawn() for _ in range(self.size)),
                                       return_exceptions=True)
        failed = [w for w in workers if isinstance(w, BaseException)]
        for w in workers:
            if isinstance(w, _Worker):
                self._idle.put_nowait(w)
        if failed:
            await self.close()
            raise WorkerError(f"{self.name} workers failed to start: {failed[0]}")

    async def _spawn(self) -> _Worker:
        if self._request is None:  # the same for every worker: pickled once
            self._request = pickle.dumps((self.initializer, self.initargs, self.memory_limit),
                                         protocol=pickle.HIGHEST_PROTOCOL)
        request = self._request
        try:
            pid, sock = await asyncio.to_thread(_Zygote.fork, request)
        except (OSError, EOFError) as exc:
            raise WorkerError(f"{self.name} worker did not start: {exc}") from None
        transport, channel = await asyncio.get_running_loop().create_unix_connection(
            _Channel, sock=sock)
        worker = _Worker(pid, transport, channel)
        self._all.add(worker)
        self._started += 1
        try:
            async with asyncio.timeout(_START_TIMEOUT):
                status, detail = await worker.receive()
        except (TimeoutError, asyncio.IncompleteReadError, OSError) as exc:
            self._forget(worker)
            why = "timeout" if isinstance(exc, TimeoutError) else "it exited"
            raise WorkerError(f"{self.name} worker did not start: {why}") from None
        except BaseException:
            self._forget(worker)
            raise
        if status != "ready":
            self._forget(worker)
            raise WorkerError(f"{self.name} worker failed to initialise: {detail}")
        return worker

    def _forget(self, worker: _Worker) -> None:
        worker.kill()
        self._all.discard(worker)

    def _replace(self, worker: _Worker) -> None:
        """Kill ``worker`` and start another in its place (in the background)."""
        self._forget(worker)
        if self._closed:
            return

        async def replace() -> None:
            assert self._idle is not None
            delay = 0.1
            while not self._closed:
                try:
                    new = await self._spawn()
                except WorkerError:
                    await asyncio.sleep(delay)  # e.g. out of memory: try again, gently
                    delay = min(delay * 2, 5.0)
                    continue
                if self._closed:
                    self._forget(new)
                else:
                    self._idle.put_nowait(new)
                return

        task = asyncio.get_running_loop().create_task(replace())
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def close(self, grace: float = 30.0) -> None:
        """Stop: idle workers now, busy ones when their task ends (at most ``grace`` s)."""
        self._closed = True
        for task in list(self._replacing):
            task.cancel()
        deadline = time.monotonic() + grace
        while self._idle is not None:
            idle = self._drain_idle()
            busy = self._all - set(idle)
            for w in idle:
                self._forget(w)
            if not busy or time.monotonic() > deadline:
                for w in busy:
                    self._forget(w)
                break
            await asyncio.sleep(0.05)

    def _drain_idle(self) -> list[_Worker]:
        assert self._idle is not None
        out = []
        while not self._idle.empty():
            out.append(self._idle.get_nowait())
        return out

    def stats(self) -> PoolStats:
        idle = self._idle.qsize() if self._idle is not None else 0
        return PoolStats(size=self.size, busy=len(self._all) - idle, started=self._started,
                         killed=self._killed, tasks=self._tasks)

    # -- running tasks -------------------------------------------------------------------
    async def run(self, fn: Callable[..., Any], *args: Any, budget: float,
                  wait: float | None = None) -> Any:
        """Run ``fn(*args)`` in a worker; at most ``budget`` seconds once it has started.

        Waiting for a free worker is not part of the budget: it is bounded by ``wait``
        (``TimeoutError``: every worker stayed busy, a load problem, not the object's).
        Raises :class:`BudgetExceeded` (time, memory, worker died) or :class:`WorkerError`
        (``fn`` raised: the text names the exception). Cancelling the call kills the worker
        running it.
        """
        if self._idle is not None and self._loop is not asyncio.get_running_loop():
            # Used from another event loop (a long-lived engine in a test run, a second
            # asyncio.run): the old loop's sockets are dead; start over on this one.
            _kill_all(self._all)
            self._idle = None
        if self._idle is None and not self._closed:
            await self.start()
        if self._closed:
            raise WorkerError(f"{self.name} worker pool is closed")
        assert self._idle is not None
        payload = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
        async with asyncio.timeout(wait):
            worker = await self._idle.get()
        self._tasks += 1
        try:
            async with asyncio.timeout(budget):
                worker.send(payload)
                del payload
                status, value = await worker.receive()
        except TimeoutError:
            self._killed += 1
            self._replace(worker)
            raise BudgetExceeded("time", f"scan time budget exceeded ({budget:g}s)") from None
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            self._replace(worker)
            raise BudgetExceeded("died", "scan worker died while scanning") from None
        except BaseException:  # cancelled: the task may still be running; stop it
            self._killed += 1
            self._replace(worker)
            raise
        if status == "memory":
            self._replace(worker)
            cap = f"{self.memory_limit >> 20} MiB" if self.memory_limit else "no cap"
            raise BudgetExceeded("memory", f"scan memory budget exceeded ({cap})")
        if self._closed:
            self._forget(worker)
        else:
            self._idle.put_nowait(worker)
        if status == "error":
            raise WorkerError(str(value))
        return value


def _kill_all(workers: set[_Worker]) -> None:
    for worker in list(workers):
        worker.kill()
    workers.clear()


def default_size() -> int:
    """One worker per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
