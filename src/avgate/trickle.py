"""Trickling: how much of a body may reach the client before the scan verdict (sans-IO).

Scanning a large download takes time; a client (browser, download manager, Squid in front
of an ICAP service) that receives nothing meanwhile times out. The front-ends that stream a
body (the HTTP proxy, the ICAP RESPMOD path) therefore pass part of it on before the verdict,
under one of two classic schemes:

``keep_back`` (HAVP ``KEEPBACKBUFFER``, c-icap ``SendPercentData``)
    send the body as it arrives but hold back the last ``keep_back`` bytes; the client never
    has the complete object before the verdict. Infected: the connection is cut before the
    tail, the client is left with a truncated file (and an error). The leading part of an
    infected file does reach the client: the protection is that it is never complete.
``trickle`` (Kernun)
    hold the body, and every ``interval`` seconds send ``chunk`` bytes, at most ``limit``
    bytes before the verdict: only a small, bounded prefix leaves before the verdict; enough
    to keep a client's read timeout from firing, not enough to be useful.
``off``
    nothing before the verdict.

:class:`Gate` is the pure decision: the caller tells it how many bytes arrived (and were
spooled: the spool is what is scanned) and asks how many bytes, counted from offset 0, it may
have sent by now. After a clean verdict the caller sends the rest; after an infected one it
cuts the connection and never completes the body. No I/O, no clock: ``now`` is passed in
(``time.monotonic()`` in production), which is what makes it testable and fuzzable.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from .limits import KiB, MiB, parse_size
from .settings import Section, Size

if TYPE_CHECKING:
    from .spool import Spool

__all__ = ["ByteCount", "Gate", "Relay", "TrickleSettings"]


def _byte_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a size (bytes, or e.g. \"25 MiB\"), got {value!r}")
    return parse_size(value)


#: a byte size that may be 0 (``Size`` must be > 0)
ByteCount = Annotated[int, BeforeValidator(_byte_count)]

TrickleMode = Literal["off", "keep_back", "trickle"]


class TrickleSettings(Section):
    """``[<frontend>.trickle]``: what reaches the client before the verdict.

    ``keep_back`` holds the last ``keep_back`` bytes; ``trickle`` sends ``chunk`` bytes every
    ``interval`` seconds, at most ``limit``; ``off`` sends nothing early. ``patience``: the
    longest a front-end waits for a verdict before it takes the policy's error path.
    ``min_size``: an object whose declared length is below it is not trickled (small objects
    scan fast; nothing of them leaves early).

    ``keep_back`` defaults to 32 KiB (HAVP's is ~200 KB): an ICAP answer can only begin once
    more than ``keep_back`` bytes arrived, and Squid 5.x sends no more than its 64 KiB body
    buffer before the answer begins (see :mod:`avgate.frontends.icap`).
    """

    mode: TrickleMode = "keep_back"
    keep_back: Size = 32 * KiB
    interval: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    chunk: Size = 2 * KiB
    limit: ByteCount = 1 * MiB
    patience: float = Field(default=300.0, gt=0, allow_inf_nan=False)
    min_size: ByteCount = 0


class Gate:
    """Decides how much of a body received so far may go to the client before the verdict.

    ``received(n)`` after ``n`` more bytes arrived; ``releasable(now)`` is the total number of
    bytes, from offset 0, allowed out by ``now`` (never decreasing, never more than received);
    ``next_wakeup(now)`` is when ``releasable`` grows without new data (``None``: only new
    data makes it grow). ``deadline`` is when the caller stops waiting for a verdict:
    ``patience`` after the gate was made, or after :meth:`complete` (the body is all there
    and the scan starts; a slow download must not use up the patience of its scan).
    """

    __slots__ = ("_latest", "_released", "deadline", "declared_length", "mode", "settings",
                 "start", "total")

    def __init__(self, settings: TrickleSettings, declared_length: int | None,
                 now: float) -> None:
        if declared_length is not None and declared_length < 0:
            raise ValueError(f"declared length must not be negative: {declared_length}")
        self.settings = settings
        self.declared_length = declared_length
        self.start = now
        self.deadline = now + settings.patience
        self.total = 0
        self._released = 0
        self._latest = now  # the latest clock reading seen: a clock never steps back here
        small = declared_length is not None and (
            declared_length < settings.min_size or declared_length <= settings.keep_back)
        #: the effective mode for this body: ``off`` when it is below ``min_size``, or when
        #: it is declared no longer than ``keep_back`` (nothing of it could leave early: the
        #: last ``keep_back`` bytes wait for the verdict in every mode)
        self.mode: TrickleMode = "off" if small else settings.mode

    @property
    def active(self) -> bool:
        """Whether anything may ever leave before the verdict."""
        return self.mode != "off"

    def received(self, n: int) -> None:
        """``n`` more body bytes arrived (and were spooled)."""
        if n < 0:
            raise ValueError(f"received a negative byte count: {n}")
        self.total += n

    def complete(self, now: float) -> None:
        """The whole body arrived: ``patience`` counts from ``now``."""
        self.deadline = now + self.settings.patience

    def releasable(self, now: float) -> int:
        """Total bytes (from offset 0) allowed out by ``now``."""
        s = self.settings
        now = self._clock(now)
        if self.mode == "keep_back":
            allowed = self.total - s.keep_back
        elif self.mode == "trickle":
            # the tail waits for the verdict here too: a small object must never leave
            # whole before it (a 68-byte EICAR inside the first chunk)
            allowed = min(self.total - s.keep_back, s.limit, s.chunk * self._steps(now))
        else:
            allowed = 0
        self._released = max(self._released, allowed, 0)  # never take back what was allowed
        return self._released

    def next_wakeup(self, now: float) -> float | None:
        """When :meth:`releasable` grows without new data; ``None`` if only new data does."""
        if self.mode != "trickle":
            return None
        s = self.settings
        now = self._clock(now)
        current = self.releasable(now)
        if current >= min(self.total - s.keep_back, s.limit):
            return None  # waiting for data, or the limit is reached
        return self.start + (self._steps(now) + 1) * s.interval

    def _clock(self, now: float) -> float:
        self._latest = max(self._latest, now)
        return self._latest

    def _steps(self, now: float) -> int:
        elapsed = now - self.start
        if elapsed <= 0:
            return 0
        interval = self.settings.interval
        steps = math.floor(elapsed / interval)
        # the same expression as next_wakeup's, so that waking at it always makes progress
        if self.start + (steps + 1) * interval <= now:
            steps += 1
        return steps


# -- the bytes themselves ----------------------------------------------------------------------
# The spool holds the whole body (it is what is scanned). What may leave before the verdict
# (:class:`Gate`) is sent from a small in-memory window of the bytes not yet sent: at most
# ``window`` bytes from offset 0 are ever kept in it (keep-back: unbounded, but the sender
# drains it as data arrives, so it holds about ``keep_back`` bytes; trickle: the first
# ``limit`` bytes; no trickling: nothing). After the verdict the rest is read back from the
# finished spool, so memory stays bounded whatever the body's size.
class Relay:
    """The body as received (into ``spool``) and as sent (``sent`` bytes from offset 0)."""

    __slots__ = ("_pending", "buffered_until", "received", "sent", "spool", "window")

    def __init__(self, spool: Spool, window: int | None) -> None:
        self.spool = spool
        self.window = window  # None: keep every unsent byte (the caller drains it)
        self._pending = bytearray()  # bytes [sent, buffered_until)
        self.buffered_until = 0
        self.received = 0
        self.sent = 0

    def add(self, data: bytes) -> None:
        """Spool ``data``; keep what falls inside the window for early sending."""
        self.spool.write(data)
        if self.buffered_until == self.received:
            room = len(data) if self.window is None else max(0, self.window - self.received)
            if room:
                self._pending += data[:room]
                self.buffered_until += min(room, len(data))
        self.received += len(data)

    def take(self, upto: int) -> bytes:
        """The bytes from ``sent`` up to offset ``upto`` (as far as the window holds them),
        counted as sent."""
        n = min(upto, self.buffered_until) - self.sent
        if n <= 0:
            return b""
        out = bytes(self._pending[:n])
        del self._pending[:n]
        self.sent += n
        return out

    def rest(self, chunk: int = 1 << 16) -> Iterator[bytes]:
        """Everything not sent yet: the window, then the finished spool from where the
        window stops. The spool must be finished."""
        if self._pending:
            out = bytes(self._pending)
            self._pending.clear()
            self.sent += len(out)
            yield out
        if self.sent >= self.received:
            return
        with self.spool.open() as f:
            f.seek(self.sent)
            while data := f.read(chunk):
                self.sent += len(data)
                yield data
