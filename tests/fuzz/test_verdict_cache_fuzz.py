"""Hypothesis fuzzing of the shared verdict cache's entry format (:mod:`avgate.cache`):
whatever a shared Redis holds, reading it gives a clean/infected verdict or BadEntry (a
miss), never another exception and never an error/unknown/skipped verdict; what we write
reads back as written."""

from __future__ import annotations

import json
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from avgate.cache import SHARED, BadEntry, decode, encode
from avgate.result import EngineInfo, Finding, LimitKind, ScanResult, ScanStatus

EXAMPLES = int(os.environ.get("AVGATE_FUZZ_EXAMPLES", "200"))
text = st.text(max_size=8)
scalars = st.none() | st.booleans() | st.integers() | text
json_values = scalars | st.lists(scalars | st.dictionaries(text, scalars, max_size=3),
                                 max_size=3)
FIELDS = ["status", "findings", "reason", "sha256", "size", "engines", "limit"]
entries = st.fixed_dictionaries({k: json_values for k in FIELDS}) | st.fixed_dictionaries(
    {"status": st.sampled_from([s.value for s in ScanStatus])},
    optional={k: json_values for k in FIELDS[1:]})


@settings(max_examples=EXAMPLES, deadline=None)
@given(raw=st.binary(max_size=200) | entries.map(lambda d: json.dumps(d).encode()))
def test_any_stored_value_is_a_shared_verdict_or_a_miss(raw: bytes) -> None:
    try:
        result = decode(raw)
    except BadEntry:
        return
    assert result.status in SHARED
    assert (result.status is ScanStatus.INFECTED) == bool(result.findings)


results = st.builds(
    ScanResult,
    status=st.sampled_from(sorted(SHARED)),
    findings=st.lists(st.builds(Finding, text, text, text), min_size=1, max_size=3).map(tuple),
    reason=text, sha256=st.text("0123456789abcdef", min_size=64, max_size=64),
    size=st.integers(min_value=0, max_value=1 << 40),
    engines=st.lists(st.builds(EngineInfo, text, text), max_size=3).map(tuple),
    limit=st.none() | st.sampled_from(list(LimitKind)))


@settings(max_examples=EXAMPLES, deadline=None)
@given(result=results)
def test_what_is_written_reads_back(result: ScanResult) -> None:
    if result.status is ScanStatus.CLEAN:
        result = result.with_(findings=())
    assert decode(encode(result)) == result.with_(elapsed=0.0, cached=False)
