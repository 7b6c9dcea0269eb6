"""Limits and timeouts: frozen value objects, defaults in one place (ClamAV-compatible names)."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

DEFAULT_MAX_SCAN_SIZE = 100 * MiB
DEFAULT_MAX_FILE_SIZE = 25 * MiB
DEFAULT_MAX_RECURSION = 16
DEFAULT_MAX_FILES = 10_000
DEFAULT_MAX_RATIO = 250
DEFAULT_SCAN_TIMEOUT = 120.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_SPOOL_MEMORY = 1 * MiB
# Address-space cap of one scan worker: room for a max_scan_size object, its decoded parts
# (bounded by max_scan_size in all) and the compiled signatures, with a margin.
DEFAULT_WORKER_MEMORY = 1 * GiB


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what decomposition and engines will do with one object.

    max_scan_size: total bytes scanned per object (including extracted data)
    max_file_size: largest single file/part scanned (compressed or extracted)
    max_recursion: nesting depth of archives/MIME
    max_files: number of parts extracted from one object
    max_ratio: decompressed/compressed ratio for one member (zip bomb guard)
    """

    max_scan_size: int = DEFAULT_MAX_SCAN_SIZE
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    max_recursion: int = DEFAULT_MAX_RECURSION
    max_files: int = DEFAULT_MAX_FILES
    max_ratio: float = DEFAULT_MAX_RATIO
    scan_timeout: float = DEFAULT_SCAN_TIMEOUT

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"limits.{f.name} must be > 0")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Network timeouts of an engine, in seconds."""

    connect: float = DEFAULT_CONNECT_TIMEOUT
    scan: float = DEFAULT_SCAN_TIMEOUT


DEFAULT_LIMITS = Limits()
DEFAULT_TIMEOUTS = Timeouts()

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": KiB, "KB": 1000, "KIB": KiB, "M": MiB, "MB": 1000**2,
          "MIB": MiB, "G": GiB, "GB": 1000**3, "GIB": GiB, "T": GiB * 1024,
          "TB": 1000**4, "TIB": GiB * 1024}


def parse_size(value: int | float | str) -> int:
    """Parse a byte size: an int, or a string like ``"25 MiB"``, ``"10M"``, ``"512KB"``."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"size must not be negative: {value!r}")
        return int(value)
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"not a size: {value!r} (use bytes or e.g. \"25 MiB\")")
    unit = (m.group(2) or "").upper()
    if unit not in _UNITS:
        raise ValueError(f"unknown size unit in {value!r}")
    return int(float(m.group(1)) * _UNITS[unit])
