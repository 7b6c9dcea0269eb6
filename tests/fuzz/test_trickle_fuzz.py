"""Fuzz the trickle gate: any sequence of arrivals and clock readings keeps its invariants."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from avgate.trickle import Gate, TrickleSettings

EXAMPLES = int(os.environ.get("AVGATE_FUZZ_EXAMPLES", "200"))

SETTINGS = st.builds(
    lambda mode, keep_back, interval, chunk, limit, min_size: TrickleSettings.model_validate(
        {"mode": mode, "keep_back": keep_back, "interval": interval, "chunk": chunk,
         "limit": limit, "min_size": min_size}),
    st.sampled_from(["off", "keep_back", "trickle"]), st.integers(1, 10_000),
    st.floats(0.001, 100.0), st.integers(1, 5_000), st.integers(0, 50_000),
    st.integers(0, 20_000))
STEPS = st.lists(st.tuples(st.integers(0, 20_000), st.floats(-5.0, 50.0)), max_size=40)


@settings(max_examples=EXAMPLES, deadline=None)
@given(SETTINGS, st.one_of(st.none(), st.integers(0, 100_000)), st.floats(0.0, 1e9), STEPS)
def test_gate_invariants(s: TrickleSettings, declared: int | None, start: float,
                         steps: list[tuple[int, float]]) -> None:
    gate = Gate(s, declared, start)
    now, last, total = start, 0, 0
    for n, dt in steps:
        gate.received(n)
        total += n
        now += dt
        out = gate.releasable(now)
        assert last <= out <= total  # never decreasing, never more than arrived
        if not gate.active:
            assert out == 0
        if gate.mode == "keep_back":
            assert out == max(last, total - s.keep_back)
        if gate.mode == "trickle":
            assert out <= s.limit
        wake = gate.next_wakeup(now)
        if wake is not None:
            assert gate.mode == "trickle" and wake > now
            assert gate.releasable(wake) > out  # waking up always makes progress
        last = gate.releasable(now)
