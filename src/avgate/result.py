"""The one scan-result type every layer passes on.

An engine returns a :class:`ScanResult`; the scan service merges the results of several
engines into one; policy turns it into a decision; front-ends report it in their protocol.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any


class ScanStatus(enum.StrEnum):
    """The five outcomes of a scan."""

    CLEAN = "clean"  # scanned, nothing found
    INFECTED = "infected"  # at least one finding
    SKIPPED = "skipped"  # not scanned (over a limit, type excluded): not confirmed clean
    UNKNOWN = "unknown"  # scanned but undecidable (encrypted archive, recursion limit, ...)
    ERROR = "error"  # engine unreachable, timeout, protocol failure


# When several results are merged, the most severe status wins. Infected wins over
# everything; nothing that is not clean is ever turned into clean.
_SEVERITY = {
    ScanStatus.CLEAN: 0,
    ScanStatus.SKIPPED: 1,
    ScanStatus.UNKNOWN: 2,
    ScanStatus.ERROR: 3,
    ScanStatus.INFECTED: 4,
}


class LimitKind(enum.StrEnum):
    """Why an object was not (fully) scanned, when a limit was the reason.

    ``structural``: the shape of the content hit a limit (max_files, max_recursion,
    max_ratio, part/entry/header counts, the scan worker's time or memory budget). Anyone
    can shape content to hit one, so by default such an object is never passed.
    ``size``: max_scan_size / max_file_size; web downloads pass with a tag by default, mail
    is refused.
    """

    STRUCTURAL = "structural"
    SIZE = "size"


def worst_limit(limits: Iterable[LimitKind | None]) -> LimitKind | None:
    """Structural beats size beats none."""
    found = set(limits)
    if LimitKind.STRUCTURAL in found:
        return LimitKind.STRUCTURAL
    if LimitKind.SIZE in found:
        return LimitKind.SIZE
    return None


def worst(statuses: Iterable[ScanStatus]) -> ScanStatus:
    """The most severe of ``statuses`` (clean for none)."""
    return max(statuses, key=_SEVERITY.__getitem__, default=ScanStatus.CLEAN)


#: the ``engine`` of the banned-type check's findings, named ``Banned.<rule>`` (avgate.banned)
BANNED_ENGINE = "banned"


@dataclass(frozen=True, slots=True)
class Finding:
    """One detection: signature name, the engine that found it, where inside the content."""

    name: str
    engine: str
    part: str = ""  # e.g. "message/2/archive.zip/evil.exe"; "" for the object itself

    @property
    def banned(self) -> bool:
        """A banned file type (a ``[[banned.rules]]`` rule), not a virus."""
        return self.engine == BANNED_ENGINE

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "engine": self.engine, "part": self.part}


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """An engine that took part in a scan, with its version (program/signature DB)."""

    name: str
    version: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version}


@dataclass(frozen=True, slots=True)
class ScanResult:
    """The verdict on one object."""

    status: ScanStatus
    findings: tuple[Finding, ...] = ()
    reason: str = ""  # why skipped / unknown / error ("" for clean/infected)
    sha256: str = ""
    size: int = 0
    engines: tuple[EngineInfo, ...] = ()
    elapsed: float = 0.0  # seconds
    cached: bool = False
    limit: LimitKind | None = None  # set when a limit is why the object was not fully scanned
    details: tuple[tuple[str, str], ...] = field(default=(), compare=False)  # (part, note) pairs

    @property
    def infected(self) -> bool:
        return self.status is ScanStatus.INFECTED

    @property
    def virus(self) -> str:
        """Name of the first finding, or "" when there is none."""
        return self.findings[0].name if self.findings else ""

    @property
    def banned_only(self) -> bool:
        """Infected, and every finding is a banned file type (no virus): ``banned_action``."""
        return self.infected and bool(self.findings) and all(f.banned for f in self.findings)

    @property
    def virus_names(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for f in self.findings:
            seen.setdefault(f.name, None)
        return tuple(seen)

    def with_(self, **changes: Any) -> ScanResult:
        """A copy with ``changes`` (``dataclasses.replace``, without its per-call field
        introspection: this runs two or three times per object)."""
        if not changes.keys() <= _FIELD_NAMES:
            return replace(self, **changes)  # its TypeError names the unknown field
        get = changes.get
        return ScanResult(get("status", self.status), get("findings", self.findings),
                          get("reason", self.reason), get("sha256", self.sha256),
                          get("size", self.size), get("engines", self.engines),
                          get("elapsed", self.elapsed), get("cached", self.cached),
                          get("limit", self.limit), get("details", self.details))

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "infected": self.infected,
            "findings": [f.to_dict() for f in self.findings],
            "reason": self.reason,
            "sha256": self.sha256,
            "size": self.size,
            "engines": [e.to_dict() for e in self.engines],
            "elapsed_ms": round(self.elapsed * 1000, 3),
            "cached": self.cached,
            "limit": self.limit.value if self.limit else None,
        }

    @classmethod
    def clean(cls, **kw: Any) -> ScanResult:
        return cls(ScanStatus.CLEAN, **kw)

    @classmethod
    def error(cls, reason: str, **kw: Any) -> ScanResult:
        return cls(ScanStatus.ERROR, reason=reason, **kw)


_FIELD_NAMES = frozenset(f.name for f in fields(ScanResult))


def merge(results: Iterable[ScanResult], *, sha256: str = "", size: int = 0,
          elapsed: float | None = None) -> ScanResult:
    """Merge several engines' results on the same object into one.

    Infected wins; otherwise the most severe of error/unknown/skipped; clean only when
    every result is clean. Findings and engines are concatenated; reasons are joined.
    ``elapsed``: the merged result's time (default: the longest of ``results``).
    """
    rs = list(results)
    if not rs:
        return ScanResult(ScanStatus.ERROR, reason="no engine scanned the object",
                          sha256=sha256, size=size, elapsed=elapsed or 0.0)
    if len(rs) == 1:  # one engine (the common case): what the general path below gives
        r = rs[0]
        status = r.status
        return ScanResult(
            status, r.findings, "" if status is ScanStatus.INFECTED else r.reason,
            sha256 or r.sha256, size or r.size, r.engines,
            r.elapsed if elapsed is None else elapsed, False,
            None if status is ScanStatus.INFECTED or status is ScanStatus.ERROR else r.limit,
            r.details)
    return _merge_many(rs, sha256=sha256, size=size, elapsed=elapsed)


def _merge_many(rs: list[ScanResult], *, sha256: str, size: int,
                elapsed: float | None) -> ScanResult:
    """:func:`merge` of a non-empty list (its one-result shortcut gives the same)."""
    status = worst(r.status for r in rs)
    findings = tuple(f for r in rs for f in r.findings)
    engines = tuple(e for r in rs for e in r.engines)
    reasons = [r.reason for r in rs if r.reason and r.status is not ScanStatus.CLEAN]
    if status is ScanStatus.INFECTED:
        reason = ""
    else:
        reason = "; ".join(dict.fromkeys(r.reason for r in rs if r.status is status and r.reason))
        if not reason:
            reason = "; ".join(dict.fromkeys(reasons))
    limit = (None if status in (ScanStatus.INFECTED, ScanStatus.ERROR)
             else worst_limit(r.limit for r in rs))
    return ScanResult(
        status=status,
        findings=findings,
        reason=reason,
        limit=limit,
        sha256=sha256 or rs[0].sha256,
        size=size or rs[0].size,
        engines=engines,
        elapsed=max(r.elapsed for r in rs) if elapsed is None else elapsed,
        details=tuple(d for r in rs for d in r.details),
    )
