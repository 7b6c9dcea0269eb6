"""Limits and timeouts: frozen value objects, defaults in one place (ClamAV-compatible names)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import Field

from .settings import Section, Size

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


class Limits(Section):
    """``[limits]``: bounds on what decomposition and engines will do with one object.

    max_scan_size: total bytes scanned per object (including extracted data)
    max_file_size: largest single file/part scanned (compressed or extracted)
    max_recursion: nesting depth of archives/MIME
    max_files: number of parts extracted from one object
    max_ratio: decompressed/compressed ratio for one member (zip bomb guard)
    scan_timeout: seconds one object may take (the scan worker's hard budget)
    """

    max_scan_size: Size = DEFAULT_MAX_SCAN_SIZE
    max_file_size: Size = DEFAULT_MAX_FILE_SIZE
    max_recursion: int = Field(DEFAULT_MAX_RECURSION, gt=0)
    max_files: int = Field(DEFAULT_MAX_FILES, gt=0)
    max_ratio: float = Field(float(DEFAULT_MAX_RATIO), gt=1)
    scan_timeout: float = Field(DEFAULT_SCAN_TIMEOUT, gt=0)


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
