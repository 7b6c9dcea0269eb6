"""What one clamd-listener process holds for its clients, counted and capped.

Resource limits (a local client must not exhaust the process; the numbers come from
``[clamd_listener]``, see :class:`avgate.frontends.clamd.ClamdListenerSettings`):

- Descriptors (:data:`fds`): a connection holds at most ``max_fds_per_connection``
  descriptors that no FILDES has claimed yet, the process at most ``max_fds`` in all; extras
  are closed on arrival (the FILDES that wanted one answers ``FILDES: file descriptor
  refused: too many held. ERROR`` at once), and an unclaimed descriptor is closed after
  ``idle_timeout``. Each one is closed once its FILDES is answered.
- IDSESSION sessions (:data:`sessions`): at most ``max_sessions_per_client`` per client (peer
  uid on the unix socket, IP address on TCP) and ``max_sessions`` per process open at once.
- RELOAD (:data:`reloads`): coalesced, at most one running per gateway; RELOADs arriving
  meanwhile cause one more, at least a second after the previous one began.
- Repeated errors (:data:`log`): one stderr line per kind per second, with a count of the
  lines suppressed (tests replace it).

:class:`Conn` is one client connection's share of all this.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..observability import RateLimitedLog

if TYPE_CHECKING:
    from .clamd import ClamdListenerSettings, Readable

_RELOAD_MIN_INTERVAL = 1.0  # coalesced reloads start at least this far apart

#: repeated errors: one stderr line per kind per second (tests replace it)
log = RateLimitedLog(1.0)


class FdBudget:
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


fds = FdBudget()


class Sessions:
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


sessions = Sessions()


class Reloads:
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
                    log.log("reload", f"avgate: clamd listener: RELOAD failed: {exc!r}")
                if key not in self._again:
                    return
                self._again.discard(key)
                await asyncio.sleep(max(0.0, _RELOAD_MIN_INTERVAL - (loop.time() - began)))
        finally:
            self._running.pop(key, None)
            self._again.discard(key)


reloads = Reloads()


def peer_uid(sock: socket.socket) -> str:
    """``uid:N`` of the process at the other end of a unix socket (per-client limits)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return f"uid:{struct.unpack('3i', creds)[1]}"
    except (OSError, AttributeError, struct.error):
        return "uid:?"


class Conn:
    """State of one client connection: its socket, and what it holds of the process's
    descriptor and session budgets (given back by :meth:`release`)."""

    __slots__ = ("_client", "busy", "dropped", "fds", "peer", "readable", "session",
                 "settings", "sock", "task", "unix")

    def __init__(self, sock: socket.socket, unix: bool, peer: str, client: str | None,
                 settings: ClamdListenerSettings) -> None:
        self.sock = sock
        self.unix = unix
        #: the listener's settings for the command in progress (read per command)
        self.settings = settings
        #: descriptors received and not claimed by a FILDES yet: (fd, close-by time)
        self.fds: deque[tuple[int, float]] = deque()
        self.dropped = 0  # descriptors closed on arrival (over a cap): FILDES fails at once
        self.busy = False  # inside a command: drain waits for it; idle ones are cancelled
        self.task: asyncio.Task[None] | None = None
        self.peer = peer
        self._client = client  # None: the peer's uid, asked of the socket when first needed
        self.session = False  # holds an IDSESSION slot
        self.readable: Readable | None = None  # waits for the client's bytes (set by _serve)

    @property
    def client(self) -> str:
        """Who the per-client limits count: ``uid:N`` (unix socket, asked of the socket
        once, when first needed: most connections never open a session) or the IP
        address."""
        if self._client is None:
            self._client = peer_uid(self.sock)
        return self._client

    def adopt_fds(self, received: list[int], truncated: bool, now: float) -> None:
        """Keep received descriptors within the per-connection and per-process caps; close
        the others at once (``truncated``: the kernel already dropped some)."""
        per_conn = self.settings.max_fds_per_connection
        limit = self.settings.max_fds
        expires = now + self.settings.idle_timeout
        dropped = 0
        for fd in received:
            if len(self.fds) < per_conn and fds.take(limit):
                self.fds.append((fd, expires))
            else:
                dropped += 1
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.dropped += dropped + (1 if truncated and not dropped else 0)
        if dropped or truncated:
            over = "per-process" if len(self.fds) < per_conn else "per-connection"
            log.log("fds-over-cap",
                    f"avgate: clamd listener: client {self.client}: closed "
                    f"{dropped or 'some'} descriptors over the {over} cap "
                    f"(max_fds_per_connection {per_conn}, max_fds {limit}, "
                    f"held {fds.held})")

    def expire_fds(self, now: float) -> None:
        """Close descriptors no FILDES claimed within ``idle_timeout``."""
        while self.fds and self.fds[0][1] <= now:
            fds.close(self.fds.popleft()[0])

    def claim_fd(self) -> int:
        """The oldest unclaimed descriptor (the caller closes it with ``fds.close``)."""
        return self.fds.popleft()[0]

    def open_session(self) -> bool:
        """Take an IDSESSION slot; False (logged) when the client or the process is at its
        limit."""
        if not sessions.open(self.client, self.settings.max_sessions_per_client,
                             self.settings.max_sessions):
            log.log("sessions-over-cap",
                    f"avgate: clamd listener: IDSESSION refused for client {self.client}: "
                    f"{sessions.by_client[self.client]} open by it, {sessions.total} in all")
            return False
        self.session = True
        return True

    def release(self) -> None:
        """Give back every descriptor and the session slot; close the socket."""
        while self.fds:
            fds.close(self.fds.popleft()[0])
        if self.session:
            self.session = False
            sessions.close(self.client)
        self.sock.close()
