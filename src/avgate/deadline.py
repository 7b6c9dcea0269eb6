"""A deadline that moves on every read or exchange, kept by one timer per connection.

``asyncio.timeout`` (or ``call_at``) per read costs a timer handle and a heap push each time;
a connection that moves its deadline thousands of times pays for that on the hot path.
:class:`Deadline` stores the new time instead: its one timer fires at the deadline it was
armed for, sees that the deadline moved, and re-arms itself for the new one. Used by the
ICAP connections (idle timeout per wait for bytes), the clamd listener's connections and the
next-hop SMTP client (timeout per exchange).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["Deadline"]


class Deadline:
    """Calls ``expire`` once the time given to :meth:`set` passes while armed.

    :meth:`set` arms it (or moves it), :meth:`clear` disarms it without touching the timer
    (a timer that fires disarmed is dropped; the next :meth:`set` arms a new one),
    :meth:`cancel` drops the timer too (when the connection ends).
    """

    __slots__ = ("_armed", "_expire", "_loop", "_timer", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop, expire: Callable[[], None]) -> None:
        self._loop = loop
        self._expire = expire
        self._timer: asyncio.TimerHandle | None = None
        self._when = 0.0
        self._armed = False

    def set(self, when: float) -> None:
        """Arm for ``when`` (loop time), or move the deadline there."""
        self._when = when
        self._armed = True
        timer = self._timer
        if timer is None or timer.when() > when:  # (later: the timer re-arms when it fires)
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(when, self._fire)

    def clear(self) -> None:
        self._armed = False

    def cancel(self) -> None:
        self._armed = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        if not self._armed:
            return  # between waits: the next set() arms it again
        if self._loop.time() < self._when:  # moved since the timer was set
            self._timer = self._loop.call_at(self._when, self._fire)
            return
        self._armed = False
        self._expire()
