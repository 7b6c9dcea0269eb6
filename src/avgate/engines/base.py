"""The Engine protocol, the registry by type name, and helpers shared by every engine.

An engine detects; it never decides. ``scan`` always returns a :class:`ScanResult` — a
failure is a result with status ``error`` — so the scan service never sees an exception
from an engine for a failed scan. ``EngineError`` raised inside ``_scan`` is turned into
such a result by :meth:`BaseEngine.scan`:

- :class:`UnparseableReply` (the engine answered, we could not understand the answer) →
  ``unknown``;
- any other ``EngineError`` (refused, reset, timeout, closed before a whole reply, the
  engine's own error reply) → ``error``.

Debug logging: with ``[log] level = "debug"`` every engine writes one ``engine`` line per
scan (and the network engines one ``engine_request`` line per request) through
:func:`avgate.observability.debug`: command, sizes, reply, timing — never content bytes
nor secrets.
"""

from __future__ import annotations

import abc
import asyncio
import importlib
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from .. import observability
from ..errors import ConfigError, EngineError, EngineProtocolError
from ..limits import DEFAULT_LIMITS, DEFAULT_WORKER_MEMORY, Limits, Timeouts
from ..result import EngineInfo, ScanResult, ScanStatus
from ..settings import Section
from ..spool import Spool


class UnparseableReply(EngineProtocolError):
    """(avgate.engines.base) The engine answered, but with a reply we cannot interpret
    (garbage, a reply that does not belong to the request): the scan is ``unknown``, not
    ``error`` — ``error`` is kept for no communication (refused, reset, timeout, connection
    closed before a whole reply)."""


class EngineSettings(Section):
    """One ``[[engines]]`` table: ``type`` picks the engine, ``name`` labels it (logs, cache
    key, findings). Every engine subclasses this with its own keys and defaults."""

    type: str
    name: str


@dataclass(frozen=True, slots=True)
class EngineContext:
    """What every engine gets besides its own config table."""

    limits: Limits = DEFAULT_LIMITS
    base_dir: str = "."  # relative paths in the engine table are resolved against this
    workers: int = 0  # scan worker processes for engines that use them (0: one per core)
    worker_memory: int | None = DEFAULT_WORKER_MEMORY  # RLIMIT_AS of each scan worker


@runtime_checkable
class Engine(Protocol):
    """What the scan service needs from an engine."""

    type_name: ClassVar[str]
    name: str

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def scan(self, spool: Spool) -> ScanResult: ...
    async def health(self) -> dict[str, Any]: ...
    def db_version(self) -> str: ...
    def version(self) -> str: ...
    def info(self) -> EngineInfo: ...


class BaseEngine(abc.ABC):
    """Shared behaviour: timing, error → result translation, the scan budget, metrics."""

    type_name: ClassVar[str] = ""
    #: the engine's ``[[engines]]`` settings class (keys and defaults of this type)
    Settings: ClassVar[type[EngineSettings]] = EngineSettings
    #: True when ``_scan`` spends the deadline itself, bounding every wait by it (network
    #: engines, to say which server timed out; the embedded engine's workers are killed at
    #: the budget, which makes a verdict): an outer timeout would race it
    own_timeout: ClassVar[bool] = False

    def __init__(self, name: str, ctx: EngineContext) -> None:
        self.name = name
        self.ctx = ctx
        #: ``scan``: the budget of one scan, [limits] scan_timeout: one deadline, spent by
        #: every server and retry inside, never multiplied
        self.timeouts = Timeouts(scan=ctx.limits.scan_timeout)
        #: replies this engine could not parse (each made a scan ``unknown``); part of the
        #: network engines' :meth:`db_version`, so that such a verdict, which says nothing
        #: about the object, is never served again from the verdict cache
        self.unparseable_replies = 0
        self._info: EngineInfo | None = None  # the last one made (one per version)

    @classmethod
    @abc.abstractmethod
    def from_settings(cls, settings: Any, ctx: EngineContext) -> BaseEngine:
        """Build from one ``[[engines]]`` table, validated into an instance of ``cls.Settings``."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load signatures / open pools. Called once before the first scan."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""

    def db_version(self) -> str:
        """A string that changes whenever the engine's signatures change (cache key)."""
        return ""

    def version(self) -> str:
        return self.db_version()

    def info(self) -> EngineInfo:
        """Name and version (made again only when the version changed: it goes into every
        scan's result)."""
        version = self.version()
        info = self._info
        if info is None or info.version != version:
            info = self._info = EngineInfo(self.name, version)
        return info

    async def health(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type_name, "ok": True}

    async def scan(self, spool: Spool) -> ScanResult:
        """Scan within the budget; never raises for a failed scan. Records this engine's
        latency and errors (its own, not the merged result's): a scan without a verdict
        from the engine — ``error``, or ``unknown`` from a reply we could not parse."""
        start = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + self.timeouts.scan
        failed = True
        try:
            if self.own_timeout:  # every wait inside is bounded already: no Timeout per scan
                result = await self._scan(spool, deadline)
            else:
                async with asyncio.timeout_at(deadline):
                    result = await self._scan(spool, deadline)
            failed = result.status is ScanStatus.ERROR
        except TimeoutError:
            result = ScanResult.error(f"{self.name}: scan timeout after {self.timeouts.scan:g}s")
        except UnparseableReply as exc:
            self.unparseable_replies += 1
            result = ScanResult(ScanStatus.UNKNOWN, reason=f"{self.name}: {exc}")
        except EngineError as exc:
            result = ScanResult.error(f"{self.name}: {exc}")
        except OSError as exc:  # safety net: engines translate their own I/O errors
            result = ScanResult.error(f"{self.name}: {exc.strerror or exc}")
        except BaseException as exc:  # cancelled: the client went away, or an outer timeout
            if observability.debug_enabled():
                self._debug_scan(spool, None, time.perf_counter() - start, type(exc).__name__)
            raise
        elapsed = time.perf_counter() - start
        observability.child(observability.engine_latency, self.name).observe(elapsed)
        if failed:
            observability.child(observability.engine_errors_total, self.name).inc()
        if observability.debug_enabled():
            self._debug_scan(spool, result, elapsed)
        engines = result.engines or (self.info(),)
        return result.with_(elapsed=elapsed, engines=engines,
                            sha256=result.sha256 or spool.sha256, size=result.size or spool.size)

    def _debug_scan(self, spool: Spool, result: ScanResult | None, elapsed: float,
                    interrupted: str = "") -> None:
        """The debug line of one scan: what went in (size, hash), what came out, how long."""
        event: dict[str, Any] = {
            "event": "engine", "engine": self.name, "type": self.type_name,
            "sha256": spool.sha256, "size": spool.size,
            "elapsed_ms": round(elapsed * 1000, 3)}
        if result is None:
            event["status"] = "interrupted"
            event["reason"] = interrupted
        else:
            event["status"] = result.status.value
            if result.findings:
                event["findings"] = [f.name for f in result.findings]
            if result.reason:
                event["reason"] = result.reason
        observability.debug(event)

    def debug_request(self, server: str, command: str, started: float, **fields: Any) -> None:
        """One ``engine_request`` debug line (a network engine's request and its reply):
        ``server`` as configured (no secrets), ``command`` (INSTREAM, PING, RESPMOD, ...),
        ``started`` (``time.perf_counter()`` when it began) and the summary fields (sizes,
        reply status line, error) — never content bytes. Cheap when debug is off."""
        if not observability.debug_enabled():
            return
        observability.debug({"event": "engine_request", "engine": self.name,
                             "type": self.type_name, "server": server, "command": command,
                             **fields,
                             "elapsed_ms": round((time.perf_counter() - started) * 1000, 3)})

    @abc.abstractmethod
    async def _scan(self, spool: Spool, deadline: float) -> ScanResult:
        """Scan one object by ``deadline`` (event-loop time); may raise EngineError."""


# -- registry -------------------------------------------------------------------------------
# type name → "module:Class"; modules are imported on first use so an engine's dependencies
# are only needed when it is configured.
registry: dict[str, str] = {
    "embedded": "avgate.engines.embedded:EmbeddedEngine",
    "clamd": "avgate.engines.clamd:ClamdEngine",
    "icap": "avgate.engines.icap:IcapEngine",
    "command": "avgate.engines.command:CommandEngine",
}


def engine_class(type_name: str) -> type[BaseEngine]:
    try:
        target = registry[type_name]
    except KeyError:
        raise ConfigError(
            f"engines: unknown type {type_name!r} (known: {', '.join(sorted(registry))})"
        ) from None
    module_name, _, cls_name = target.partition(":")
    module = importlib.import_module(module_name)
    cls: type[BaseEngine] = getattr(module, cls_name)
    return cls


def build_engine(settings: EngineSettings, ctx: EngineContext) -> BaseEngine:
    """The engine ``settings`` describe (settings as :mod:`avgate.config` built them)."""
    cls = engine_class(settings.type)
    if not isinstance(settings, cls.Settings):
        raise TypeError(f"a {settings.type} engine is built from {cls.Settings.__name__}, "
                        f"not {type(settings).__name__}")
    return cls.from_settings(settings, ctx)
