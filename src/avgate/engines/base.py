"""The Engine protocol, the registry by type name, and helpers shared by every engine.

An engine detects; it never decides. ``scan`` always returns a :class:`ScanResult` — a
failure is a result with status ``error`` — so the scan service never sees an exception
from an engine for a failed scan. ``EngineError`` raised inside ``_scan`` is turned into
such a result by :meth:`BaseEngine.scan`.
"""

from __future__ import annotations

import abc
import asyncio
import importlib
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from .. import observability
from ..errors import ConfigError, EngineError
from ..limits import DEFAULT_LIMITS, DEFAULT_WORKER_MEMORY, Limits, Timeouts
from ..result import EngineInfo, ScanResult, ScanStatus
from ..settings import Section
from ..spool import Spool


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
        return EngineInfo(self.name, self.version())

    async def health(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type_name, "ok": True}

    async def scan(self, spool: Spool) -> ScanResult:
        """Scan within the budget; never raises for a failed scan. Records this engine's
        latency and errors (its own, not the merged result's)."""
        start = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + self.timeouts.scan
        try:
            async with asyncio.timeout_at(None if self.own_timeout else deadline):
                result = await self._scan(spool, deadline)
        except TimeoutError:
            result = ScanResult.error(f"{self.name}: scan timeout after {self.timeouts.scan:g}s")
        except EngineError as exc:
            result = ScanResult.error(f"{self.name}: {exc}")
        except OSError as exc:  # safety net: engines translate their own I/O errors
            result = ScanResult.error(f"{self.name}: {exc.strerror or exc}")
        elapsed = time.perf_counter() - start
        observability.engine_latency.labels(engine=self.name).observe(elapsed)
        if result.status is ScanStatus.ERROR:
            observability.engine_errors_total.labels(engine=self.name).inc()
        engines = result.engines or (self.info(),)
        return result.with_(elapsed=elapsed, engines=engines,
                            sha256=result.sha256 or spool.sha256, size=result.size or spool.size)

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
