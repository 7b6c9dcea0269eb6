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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from ..errors import ConfigError, EngineError, EngineTimeout
from ..limits import DEFAULT_LIMITS, DEFAULT_WORKER_MEMORY, Limits, Timeouts
from ..result import EngineInfo, ScanResult, ScanStatus
from ..spool import Spool


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
    """Shared behaviour: timing, error → result translation, scan timeout."""

    type_name: ClassVar[str] = ""
    #: keys this engine accepts in its [[engines]] table (besides "type" and "name")
    config_keys: ClassVar[frozenset[str]] = frozenset()
    #: True when ``_scan`` enforces the scan timeout itself (the embedded engine's workers
    #: are killed at the budget, which makes a verdict; an outer timeout would race it)
    own_timeout: ClassVar[bool] = False

    def __init__(self, name: str, ctx: EngineContext) -> None:
        self.name = name
        self.ctx = ctx
        self.timeouts = Timeouts(scan=ctx.limits.scan_timeout)

    @classmethod
    @abc.abstractmethod
    def from_config(cls, table: Mapping[str, Any], ctx: EngineContext) -> BaseEngine:
        """Build from one [[engines]] table; raise ConfigError naming the key."""

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
        start = time.perf_counter()
        try:
            async with asyncio.timeout(None if self.own_timeout else self.timeouts.scan):
                result = await self._scan(spool)
        except TimeoutError:
            result = ScanResult.error(f"{self.name}: scan timeout after {self.timeouts.scan:g}s")
        except EngineTimeout as exc:
            result = ScanResult.error(f"{self.name}: {exc}")
        except EngineError as exc:
            result = ScanResult.error(f"{self.name}: {exc}")
        except OSError as exc:  # safety net: engines translate their own I/O errors
            result = ScanResult.error(f"{self.name}: {exc.strerror or exc}")
        elapsed = time.perf_counter() - start
        engines = result.engines or (self.info(),)
        return result.with_(elapsed=elapsed, engines=engines,
                            sha256=result.sha256 or spool.sha256, size=result.size or spool.size)

    @abc.abstractmethod
    async def _scan(self, spool: Spool) -> ScanResult:
        """Scan one object; may raise EngineError."""


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


def build_engine(table: Mapping[str, Any], ctx: EngineContext) -> BaseEngine:
    type_name = table.get("type", "embedded")
    cls = engine_class(type_name)
    unknown = set(table) - {"type", "name"} - cls.config_keys
    if unknown:
        raise ConfigError(
            f"engines ({type_name}): unknown key(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(cls.config_keys | {'type', 'name'}))}"
        )
    return cls.from_config(table, ctx)


def status_of(value: str) -> ScanStatus:
    return ScanStatus(value)
