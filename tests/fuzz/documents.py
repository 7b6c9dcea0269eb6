"""What every fuzz target of a document reader checks (tests/fuzz/test_*_doc_fuzz.py).

Each example is decomposed with small limits under tracemalloc: decomposition must not
raise, must report no catch-all "cannot decompose" problem (a reader met an exception it
did not expect), must keep every limit, and must stay within a time and memory bound that
depends on the input size only (the inputs are a few KB: any super-linear path shows).
"""

from __future__ import annotations

import os
import time
import tracemalloc
from collections.abc import Callable

from hypothesis import strategies as st

from avgate.content import Part, Problem, decompose
from avgate.limits import Limits

EXAMPLES = int(os.environ.get("AVGATE_FUZZ_EXAMPLES", "200"))
LIMITS = Limits(max_scan_size=256 * 1024, max_file_size=64 * 1024, max_files=25,
                max_recursion=4, max_ratio=20)
MAX_SECONDS = 5.0  # per example of at most a few KB; real cost is milliseconds
MAX_PEAK = 32 * 1024 * 1024  # bytes allocated at once: a few copies of the scan budget


def check(data: bytes) -> list[Part | Problem]:
    tracemalloc.start()
    start = time.perf_counter()
    try:
        items = list(decompose(data, LIMITS, "fuzz"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - start
    assert elapsed < MAX_SECONDS, f"{elapsed:.1f}s for {len(data)} bytes"
    assert peak < MAX_PEAK, f"{peak} bytes allocated for {len(data)} bytes"
    return check_items(data, items, LIMITS)


def check_items(data: bytes, items: list[Part | Problem], limits: Limits
                ) -> list[Part | Problem]:
    """What every decomposition must give: the object first, no reader crash ("cannot
    ..."), and every limit kept."""
    found = [i for i in items if isinstance(i, Part)]
    assert found and found[0].data == data
    unexpected = [i for i in items if isinstance(i, Problem) and i.reason.startswith("cannot")]
    assert not unexpected, (unexpected, data[:200])
    assert sum(len(p.data) for p in found) <= limits.max_scan_size
    assert all(len(p.data) <= limits.max_file_size for p in found)
    assert len(found) - 1 <= limits.max_files
    assert all(p.depth <= limits.max_recursion for p in found)
    return items


def mutated(seeds: list[bytes], tokens: list[bytes]) -> st.SearchStrategy[bytes]:
    """A seed with up to 8 edits: byte flips, cuts, insertions (random or a format token),
    duplicated stretches."""

    @st.composite
    def strategy(draw: Callable[..., object]) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))  # type: ignore[arg-type]
        for _ in range(draw(st.integers(1, 8))):  # type: ignore[call-overload]
            action = draw(st.sampled_from(["flip", "cut", "insert", "token", "dup"]))
            pos = draw(st.integers(0, max(len(data) - 1, 0)))  # type: ignore[call-overload]
            if action == "flip" and data:
                data[pos] = draw(st.integers(0, 255))  # type: ignore[call-overload]
            elif action == "cut":
                del data[pos:pos + draw(st.integers(1, 64))]  # type: ignore[operator]
            elif action == "insert":
                data[pos:pos] = draw(st.binary(max_size=32))  # type: ignore[call-overload]
            elif action == "token":
                data[pos:pos] = draw(st.sampled_from(tokens))  # type: ignore[call-overload]
            else:
                data[pos:pos] = data[pos:pos + draw(st.integers(1, 512))]  # type: ignore
        return bytes(data)

    return strategy()
