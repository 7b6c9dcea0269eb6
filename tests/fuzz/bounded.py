"""Time and memory bounds for the fuzz targets of readers that run native code (libarchive,
zlib/lzma inflaters, olefile's buffers). :func:`check` asserts what
:func:`tests.fuzz.documents.check` does (no exception, no "cannot decompose", every limit
kept, time, what Python allocates by tracemalloc), with the limits as a parameter (an ISO
image is bigger than the document readers' limits); what a C library allocates is invisible
to tracemalloc, so it adds the process's own peak resident size, and runs each example
under an address-space ``resource`` limit.

* ``RLIMIT_AS`` (soft) is lowered to the current address space plus :data:`MAX_VIRTUAL`
  for the example and put back after it: a runaway allocation fails there (``MemoryError``
  in Python, ``ENOMEM`` in C, which decompose reports as a problem the check flags) instead
  of swapping the machine.
* The peak resident size (``VmHWM``) is reset before the example (``/proc/self/clear_refs``,
  Linux 4.0+) and read after it: it may grow by at most :data:`MAX_NATIVE_PEAK`.

Where ``/proc`` does not offer that (not Linux), only the ``resource`` limit applies.
"""

from __future__ import annotations

import contextlib
import re
import resource
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

from avgate.content import Part, Problem, decompose
from avgate.limits import Limits
from tests.fuzz.documents import LIMITS, MAX_PEAK, MAX_SECONDS, check_items

MAX_NATIVE_PEAK = 64 * 1024 * 1024  # resident growth for inputs of a few KB
MAX_VIRTUAL = 1024 * 1024 * 1024  # headroom in address space (thread stacks, arenas)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident size; False where the kernel does not offer it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@contextlib.contextmanager
def address_space_limit(headroom: int = MAX_VIRTUAL) -> Iterator[None]:
    """Lower the soft ``RLIMIT_AS`` to the current size plus ``headroom`` for the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    size = _status_kib("VmSize")
    if size is None:
        yield
        return
    limit = size * 1024 + headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def check(data: bytes, limits: Limits = LIMITS) -> list[Part | Problem]:
    """Decompose ``data`` under an address-space limit; assert it raised nothing, reported
    no catch-all problem, kept ``limits``, and stayed within the time, Python-allocation and
    native peak-resident bounds."""
    measured = _reset_peak()
    before = _status_kib("VmRSS") if measured else None
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with address_space_limit():
            items = list(decompose(data, limits, "fuzz"))
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - start
    peak = _status_kib("VmHWM") if measured else None
    assert elapsed < MAX_SECONDS, f"{elapsed:.1f}s for {len(data)} bytes"
    assert python_peak < MAX_PEAK, f"{python_peak} bytes allocated for {len(data)} bytes"
    if before is not None and peak is not None:
        grown = (peak - before) * 1024
        assert grown < MAX_NATIVE_PEAK, f"resident size grew {grown} bytes for {len(data)}"
    return check_items(data, items, limits)
