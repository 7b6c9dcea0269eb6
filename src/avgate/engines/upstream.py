"""Upstream servers of a network engine (clamd, ICAP): order, failover, health, one budget.

Modelled on rspamd's upstreams (``lualib/lua_scanners/common.lua`` over ``upstream.c``): an
engine lists its ``servers``, a ``strategy`` picks the order for each scan, and a server that
fails is marked down for a while.

- ``failover`` tries the servers in configured order; ``round_robin`` starts at the next one
  each scan. Either way a failed attempt (refused, timeout, garbage, closed mid-stream: any
  :class:`EngineError` the attempt raises) moves the same scan on to the next server. When
  none gives a verdict the scan is ``unknown`` if one of them answered garbage
  (:class:`~avgate.engines.base.UnparseableReply`), else ``error``.
- ``max_failures`` consecutive failures mark a server down for ``retry_after`` seconds; it is
  skipped meanwhile, and one success (a scan or a health probe) clears it. With every server
  down a scan fails at once, without waiting on any of them.
- One budget per scan: :meth:`Upstreams.call` gets the scan's deadline (``[limits]
  scan_timeout`` from its start) and every attempt spends from it. ``connect_timeout`` and
  the engine's own ``scan_timeout`` bound one attempt, never beyond the deadline; when the
  budget is spent no further server is tried. Nothing is multiplied by the number of servers.

The clock that says when a server may be tried again is injectable (tests advance it instead
of sleeping); deadlines are event-loop times, as :func:`asyncio.timeout_at` wants them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from pydantic import Field

from ..errors import EngineError, EngineUnavailable
from ..limits import DEFAULT_CONNECT_TIMEOUT
from .base import BaseEngine, EngineContext, EngineSettings, UnparseableReply

Clock = Callable[[], float]
R = TypeVar("R")


def server_urls(parse: Callable[[str], object]) -> Callable[[tuple[str, ...]], tuple[str, ...]]:
    """A validator for a list of server URLs: not empty, each accepted by ``parse`` (whose
    ValueError says what is wrong with it)."""
    def check(urls: tuple[str, ...]) -> tuple[str, ...]:
        if not urls:
            raise ValueError("list at least one server")
        for url in urls:
            parse(url)
        return urls

    return check


class UpstreamSettings(EngineSettings):
    """Keys every engine with servers has (besides its list of servers).

    strategy: "failover" (configured order) or "round_robin" (the next one first each scan)
    connect_timeout: seconds to connect to one server
    scan_timeout: seconds one server may take to answer; unset: the rest of the budget
        (``[limits] scan_timeout`` bounds the whole scan, every server included)
    retry_after: seconds a server that failed is left alone
    max_failures: consecutive failures that mark a server down
    """

    strategy: Literal["failover", "round_robin"] = "failover"
    connect_timeout: float = Field(DEFAULT_CONNECT_TIMEOUT, gt=0)
    scan_timeout: float | None = Field(None, gt=0)
    retry_after: float = Field(10.0, gt=0)
    max_failures: int = Field(1, ge=1)


@dataclass(slots=True, eq=False)
class Upstream:
    """One server and its health state; engines subclass it with their address fields."""

    url: str
    failures: int = 0  # consecutive
    down_until: float = 0.0  # clock time; 0 = up
    last_error: str = ""

    def available(self, now: float) -> bool:
        return now >= self.down_until


U = TypeVar("U", bound=Upstream)


@dataclass(frozen=True, slots=True)
class Bound:
    """When one step of an attempt must be done: its own limit, cut at the scan's deadline."""

    when: float  # event-loop time, for asyncio.timeout_at
    seconds: float  # the wait that gives, for messages

    @classmethod
    def of(cls, limit: float | None, deadline: float) -> Bound:
        now = asyncio.get_running_loop().time()
        when = deadline if limit is None else min(now + limit, deadline)
        return cls(when, round(max(0.0, when - now), 2))

    def __str__(self) -> str:
        return f"{self.seconds:g}s"


class Upstreams(Generic[U]):
    """The servers of one engine and the choice among them (see the module docstring)."""

    def __init__(self, servers: Sequence[U], settings: UpstreamSettings, *,
                 clock: Clock = time.monotonic) -> None:
        if not servers:
            raise ValueError("at least one server is needed")
        self.servers = list(servers)
        self.strategy = settings.strategy
        self.retry_after = settings.retry_after
        self.max_failures = settings.max_failures
        self.clock = clock
        self._next = 0  # round-robin position

    def order(self) -> list[U]:
        """Servers to try for one scan, in order, skipping those marked down."""
        servers = self.servers
        if self.strategy == "round_robin":
            start = self._next % len(servers)
            self._next = start + 1
            servers = servers[start:] + servers[:start]
        now = self.clock()
        return [s for s in servers if s.available(now)]

    def failed(self, server: U, exc: Exception) -> None:
        server.failures += 1
        server.last_error = str(exc)
        if server.failures >= self.max_failures:
            server.down_until = self.clock() + self.retry_after

    def succeeded(self, server: U) -> None:
        server.failures = 0
        server.down_until = 0.0
        server.last_error = ""

    def is_down(self, server: U) -> bool:
        return not server.available(self.clock())

    async def call(self, attempt: Callable[[U], Awaitable[R]], deadline: float) -> R:
        """``attempt`` on one server after the other until one succeeds, within ``deadline``.

        An :class:`EngineError` from an attempt counts against its server and moves on to the
        next; with none left (or no time left) an error naming every server tried and why it
        failed is raised: :class:`UnparseableReply` when any server answered something we
        could not parse (the scan is then ``unknown``), else the last error's type.
        """
        loop = asyncio.get_running_loop()
        failures: list[tuple[U, EngineError]] = []
        candidates = self.order()
        note = ""
        for index, server in enumerate(candidates):
            if failures and loop.time() >= deadline:
                note = f"; scan budget spent, {len(candidates) - index} server(s) not tried"
                break
            try:
                result = await attempt(server)
            except EngineError as exc:
                self.failed(server, exc)
                failures.append((server, exc))
                continue
            self.succeeded(server)
            return result
        if not failures:
            raise EngineUnavailable(
                f"all {len(self.servers)} server(s) marked down "
                f"(retry after {self.retry_after:g}s)")
        summary = "; ".join(f"{s.url}: {exc}" for s, exc in failures)
        # a server that answered what we could not parse makes the scan unknown (an answer
        # came); otherwise the last failure says what kind of error it was
        unparseable = [exc for _, exc in failures if isinstance(exc, UnparseableReply)]
        raise type(unparseable[0] if unparseable else failures[-1][1])(summary + note)

    async def health(self, probe: Callable[[U], Awaitable[dict[str, Any]]],
                     describe: Callable[[U], dict[str, Any]] | None = None
                     ) -> tuple[bool, list[dict[str, Any]]]:
        """Probe every server now (down or not): (any answered, one report per server).

        ``probe`` raises EngineError or returns details to add; a probe's outcome marks its
        server up or failed like a scan does. ``describe`` adds fields either way.
        """
        async def one(server: U) -> dict[str, Any]:
            start = time.perf_counter()
            report: dict[str, Any] = {"server": server.url}
            try:
                details = await probe(server)
            except EngineError as exc:
                self.failed(server, exc)
                report.update(ok=False, error=str(exc))
            else:
                self.succeeded(server)
                report.update(ok=True, **details,
                              latency_ms=round((time.perf_counter() - start) * 1000, 3))
            report["down"] = self.is_down(server)
            if describe is not None:
                report.update(describe(server))
            return report

        reports = list(await asyncio.gather(*(one(s) for s in self.servers)))
        return any(r["ok"] for r in reports), reports


class UpstreamEngine(BaseEngine, Generic[U]):
    """An engine that scans on servers: its :class:`Upstreams`, the injectable clock, and a
    background refresh of what the servers said at start (VERSION, OPTIONS) once it is old."""

    own_timeout = True  # every wait is bounded by the scan's deadline (see Bound)

    def __init__(self, settings: UpstreamSettings, servers: Sequence[U], ctx: EngineContext,
                 clock: Clock) -> None:
        super().__init__(settings.name, ctx)
        self.clock = clock
        self.upstreams = Upstreams(servers, settings, clock=clock)
        self.servers = self.upstreams.servers
        self._refresh: asyncio.Task[None] | None = None

    def cache_epoch(self) -> str:
        """What :meth:`db_version` adds after an unparseable reply (``""`` before any): the
        ``unknown`` of that scan was cached under the old key and is never hit again."""
        return f"|unparseable:{self.unparseable_replies}" if self.unparseable_replies else ""

    def deadline(self, seconds: float | None = None) -> float:
        """The event-loop time ``seconds`` from now (default: one scan budget)."""
        return asyncio.get_running_loop().time() + (seconds or self.timeouts.scan)

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError, EngineError):
                await self._refresh
            self._refresh = None

    def _schedule_refresh(self) -> None:
        """Run :meth:`start` again in the background (once at a time)."""
        if self._refresh is not None and not self._refresh.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside the event loop: keep the old answers
            return
        self._refresh = loop.create_task(self.start())
