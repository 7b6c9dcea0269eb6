"""The shared per-object path's shortcuts (issue 19) give what the general code gives.

Each shortcut is held against the code it replaces: ``ScanResult.with_`` and
``Decision.with_refid`` against ``dataclasses.replace``, ``merge``'s one-result path against
the general merge, ``new_refid`` against ``base64.b32encode``, the scan log's orjson lines
against the standard library's encoder, ``ScanService.db_versions`` against the engines'
answers, and ``GatewayRef``'s properties and in-flight counting against the Gateway.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as fuzz_settings
from hypothesis import strategies as st

from avgate import observability as obs
from avgate.config import defaults
from avgate.decision import Decision, Disposition, new_refid
from avgate.engines.base import BaseEngine, EngineContext
from avgate.gateway import Context, Gateway
from avgate.policy import Policy
from avgate.result import EngineInfo, Finding, LimitKind, ScanResult, ScanStatus, _merge_many, merge
from avgate.scan import ScanService
from avgate.serve import GatewayRef
from avgate.spool import Spool

text = st.text(max_size=12)
results = st.builds(
    ScanResult,
    status=st.sampled_from(ScanStatus),
    findings=st.lists(st.builds(Finding, text, text, text), max_size=3).map(tuple),
    reason=text, sha256=text, size=st.integers(0, 1 << 40),
    engines=st.lists(st.builds(EngineInfo, text, text), max_size=2).map(tuple),
    elapsed=st.floats(0, 1e6), cached=st.booleans(),
    limit=st.sampled_from([None, LimitKind.SIZE, LimitKind.STRUCTURAL]),
    details=st.lists(st.tuples(text, text), max_size=2).map(tuple))


def same(a: ScanResult, b: ScanResult) -> bool:
    """Every field equal (``details`` is not part of ``==``)."""
    return a == b and a.details == b.details


# -- result.py ------------------------------------------------------------------------------------
@given(results, results)
@fuzz_settings(max_examples=200, deadline=None)
def test_with_is_dataclasses_replace(a: ScanResult, b: ScanResult) -> None:
    names = [f.name for f in dataclasses.fields(ScanResult)]
    assert same(a.with_(), a)
    for name in names:  # each field alone, then two at once
        one: dict[str, Any] = {name: getattr(b, name)}
        assert same(a.with_(**one), dataclasses.replace(a, **one))
    changes: dict[str, Any] = {"elapsed": b.elapsed, "cached": b.cached}
    assert same(a.with_(**changes), dataclasses.replace(a, **changes))
    assert same(a.with_(**{n: getattr(b, n) for n in names}), b)


def test_with_refuses_an_unknown_field() -> None:
    with pytest.raises(TypeError, match="nonsense"):
        ScanResult(ScanStatus.CLEAN).with_(nonsense=1)


@given(results, text, st.integers(0, 99), st.one_of(st.none(), st.floats(0, 1e3)))
@fuzz_settings(max_examples=300, deadline=None)
def test_merge_of_one_result_is_the_general_merge(r: ScanResult, sha256: str, size: int,
                                                  elapsed: float | None) -> None:
    fast = merge([r], sha256=sha256, size=size, elapsed=elapsed)
    assert same(fast, _merge_many([r], sha256=sha256, size=size, elapsed=elapsed))
    assert same(merge([r]), _merge_many([r], sha256="", size=0, elapsed=None))


def test_merge_elapsed_overrides_the_longest() -> None:
    rs = [ScanResult(ScanStatus.CLEAN, elapsed=0.5), ScanResult(ScanStatus.CLEAN, elapsed=2.0)]
    assert merge(rs).elapsed == 2.0 and merge(rs, elapsed=3.0).elapsed == 3.0
    assert merge([], elapsed=1.5).elapsed == 1.5 and merge([]).elapsed == 0.0


# -- decision.py ----------------------------------------------------------------------------------
@given(st.integers(0, (1 << 63) - 1), st.binary(min_size=4, max_size=4))
@fuzz_settings(max_examples=300, deadline=None)
def test_new_refid_is_base32_of_milliseconds_and_random_bits(ns: int, rnd: bytes) -> None:
    raw = (ns // 1_000_000 & (1 << 48) - 1).to_bytes(6, "big") + rnd
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("avgate.decision.time.time_ns", lambda: ns)
        mp.setattr("avgate.decision.os.urandom", lambda n: rnd[:n])
        assert new_refid() == base64.b32encode(raw).decode("ascii")


def test_new_refids_differ_and_sort_by_time() -> None:
    ids = [new_refid() for _ in range(200)]
    assert len(set(ids)) == 200 and all(len(i) == 16 for i in ids)
    assert ids[0][:9] <= ids[-1][:9]  # the first 45 bits: milliseconds


def test_with_refid_is_dataclasses_replace() -> None:
    values: dict[str, Any] = {
        "disposition": Disposition.DISCARD, "reply": "250 ok", "headers": (("X-A", "1"),),
        "quarantine": True, "replace": True, "notice": "n", "subject_prefix": "p ",
        "copy_to": ("a@b",), "rule": "r", "shadow": True,
        "would": Decision(Disposition.REJECT, "550 no"), "refid": "OLD",
        "refid_header": "X-Old", "remove_recipients": ("c@d",)}
    assert set(values) == {f.name for f in dataclasses.fields(Decision)}
    d = Decision(**values)
    new = d.with_refid("NEW", "X-Ref", (("X-A", "1"), ("X-Ref", "NEW")))
    assert new == dataclasses.replace(d, refid="NEW", refid_header="X-Ref",
                                      headers=(("X-A", "1"), ("X-Ref", "NEW")))


@pytest.mark.parametrize("headers", [(), (("X-Ref", "R"),), (("X-A", "1"), ("X-Ref", "R"))])
@pytest.mark.parametrize("flags", range(64))
def test_actions_names_what_the_decision_does(flags: int, headers: tuple[Any, ...]) -> None:
    quarantine, replace, prefix, copy_to, remove, shadow = ((flags >> i) & 1 for i in range(6))
    d = Decision(Disposition.ACCEPT, headers=headers, quarantine=bool(quarantine),
                 replace=bool(replace), subject_prefix="S " if prefix else "",
                 copy_to=("x@y",) if copy_to else (), shadow=bool(shadow),
                 remove_recipients=("r@s",) if remove else (), refid_header="X-Ref")
    want = ["accept"] + [name for name, on in (
        ("quarantine", quarantine), ("replace", replace), ("tag", len(headers) == 2),
        ("prefix_subject", prefix), ("copy_to", copy_to), ("remove_recipients", remove),
        ("shadow", shadow)) if on]
    assert d.actions == tuple(want)


# -- observability.py: the scan log's encoder ----------------------------------------------------
def reference_line(event: dict[str, Any], now: str) -> bytes:
    """What the scan log wrote before orjson: the standard library's encoder."""
    if "time" not in event:
        event = {"time": now, **event}
    return (json.dumps(event, separators=(",", ":"), default=str, ensure_ascii=False)
            + "\n").encode("utf-8", "backslashreplace")


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.text(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(min_value=0, max_value=1e9).map(lambda f: round(f, 3)))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.lists(inner, max_size=3).map(tuple),
    st.dictionaries(st.text(max_size=8), inner, max_size=4),
    st.dictionaries(st.integers(), inner, max_size=2)), max_leaves=12)


def floats_as_numbers(value: Any) -> Any:
    """``value`` read back, with every number as a float (1e-05 and 0.00001 are one number)."""
    if isinstance(value, dict):
        return {k: floats_as_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [floats_as_numbers(v) for v in value]
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else value


# (NaN and infinity left out: no line holds one; orjson writes null, the standard library
# the non-JSON NaN/Infinity)
@given(st.dictionaries(st.text(max_size=10), values, max_size=6), st.booleans())
@fuzz_settings(max_examples=400, deadline=None)
def test_scan_log_line_is_what_the_standard_library_writes(event: dict[str, Any],
                                                           timed: bool) -> None:
    if timed:
        event = {"time": "T", **event}
    now = obs.utc_now()
    line = obs.encode_line(event)
    want = reference_line(event, now)
    line.decode("utf-8")  # never invalid UTF-8
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    got_time, want_time = json.loads(line).get("time"), json.loads(want).get("time")
    if not timed:  # the clock may have moved on between the two
        line = line.replace(f'"time":"{got_time}"'.encode(), f'"time":"{want_time}"'.encode(), 1)
    if line != want:  # only the spelling of a float below 1e-4 may differ: the same number
        assert floats_as_numbers(json.loads(line)) == floats_as_numbers(json.loads(want))
        assert any(0 < abs(f) < 1e-4 for f in _floats(event))


def _floats(value: Any) -> list[float]:
    if isinstance(value, dict):
        return [f for v in value.values() for f in _floats(v)]
    if isinstance(value, list | tuple):
        return [f for v in value for f in _floats(v)]
    return [value] if isinstance(value, float) else []


class _Float(float):
    pass


@dataclasses.dataclass
class _Point:
    x: int


@pytest.mark.parametrize("value", [
    "a\udcff.exe", "\x00\x1f\"\\\u2028\U0001f600", 1 << 70, -(1 << 64), {1: "int key"},
    {None: 1, True: 2}, datetime.datetime(2026, 12, 1, 23, 0, 0, 123000),
    datetime.date(2026, 12, 1), _Point(1), b"raw", {1, 2} - {2}, Path("/tmp/x"),
    ScanStatus.INFECTED, Disposition.REJECT, _Float(2.5), 1e-7, 1e22, -0.0])
def test_scan_log_values_orjson_would_write_otherwise(value: Any) -> None:
    """What orjson refuses or writes its own way goes as the standard library writes it."""
    event = {"event": "x", "value": value}
    line = obs.encode_line(event)
    if isinstance(value, float) and 0 < abs(value) < 1e-4:
        assert json.loads(line)["value"] == value
        return
    assert line == reference_line(event, json.loads(line)["time"])


def test_scan_log_time_goes_first(tmp_path: Path) -> None:
    path = tmp_path / "s.log"
    log = obs.ScanLog(str(path), register=False)
    try:
        log.log({})
        log.log({"event": "a", "n": 1})
        log.log({"event": "b", "time": "given"})
    finally:
        log.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [list(x) for x in lines] == [["time"], ["time", "event", "n"], ["event", "time"]]
    assert lines[2]["time"] == "given" and lines[0]["time"].endswith("Z")


def test_stdout_scan_log_gets_text(capsys: pytest.CaptureFixture[str]) -> None:
    log = obs.ScanLog(None, register=False)
    log.log({"event": "x", "name": "ü\udcff"})
    out = capsys.readouterr().out
    assert out.endswith("\n") and json.loads(out)["name"] == "ü\udcff"


# -- scan.py: db_versions -------------------------------------------------------------------------
class _Versioned(BaseEngine):
    type_name = "versioned"

    def __init__(self, name: str, version: str) -> None:
        super().__init__(name, EngineContext())
        self.v = version
        self.asked = 0

    @classmethod
    def from_settings(cls, settings: Any, ctx: EngineContext) -> BaseEngine:
        raise NotImplementedError

    def db_version(self) -> str:
        self.asked += 1  # a network engine starts its refresh from here: asked every time
        return self.v

    async def _scan(self, spool: Spool, deadline: float) -> ScanResult:
        return ScanResult(ScanStatus.CLEAN)


def test_db_versions_follows_every_engine() -> None:
    a, b = _Versioned("a", "1"), _Versioned("b", "x")
    service = ScanService([a, b])
    assert service.db_versions() == "a=1|b=x"
    assert service.db_versions() == "a=1|b=x"
    assert (a.asked, b.asked) == (2, 2)
    b.v = "y"  # a reload of b's signatures
    assert service.db_versions() == "a=1|b=y"
    a.v = "1|unparseable:1"
    assert service.db_versions() == "a=1|unparseable:1|b=y"
    service.engines[1] = _Versioned("c", "y")  # another engine with the same answer
    assert service.db_versions() == "a=1|unparseable:1|c=y"
    assert ScanService([_Versioned("only", "")]).db_versions() == "only="


# -- serve.py: GatewayRef -------------------------------------------------------------------------
def _gateway(tmp_path: Path, name: str) -> Gateway:
    config = defaults()
    log = obs.ScanLog(str(tmp_path / f"{name}.log"), register=False)
    return Gateway(config, ScanService([_Versioned(name, "1")], cache=None),
                   Policy.from_settings(config.policy), log=log)


def test_gateway_ref_reads_the_current_gateway(tmp_path: Path) -> None:
    one, two = _gateway(tmp_path, "one"), _gateway(tmp_path, "two")
    ref = GatewayRef(one)
    for gw in (one, two):
        ref.swap(gw)
        assert ref.config is gw.config and ref.scanner is gw.scanner
        assert ref.policy is gw.policy and ref.log is gw.log
        assert ref.new_spool is not None and ref.notifier is gw.notifier  # via __getattr__
        assert ref.log_outcome == gw.log_outcome
    with pytest.raises(AttributeError):
        ref.no_such_attribute  # noqa: B018


def test_gateway_ref_logs_a_deferred_outcome_once(tmp_path: Path) -> None:
    gw = _gateway(tmp_path, "gw")
    ref = GatewayRef(gw)

    async def run() -> None:
        with Spool.from_bytes(b"hello") as spool:
            out = await ref.process(spool, Context("icap", listener="icap"), defer_log=True)
        ref.log_outcome(out, actions=["accept"], icap_status=204, http_status=None)
        ref.log_outcome(out, icap_status=500)  # written already: nothing

    asyncio.run(run())
    assert gw.log is not None
    gw.log.close()
    lines = (tmp_path / "gw.log").read_text().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["icap_status"] == 204 and "http_status" not in event
    assert list(event)[:2] == ["time", "event"] and list(event)[-1] == "icap_status"


def test_gateway_ref_waits_for_the_scans_of_a_retired_gateway(tmp_path: Path) -> None:
    old, new = _gateway(tmp_path, "old"), _gateway(tmp_path, "new")
    ref = GatewayRef(old)
    release = asyncio.Event()

    async def slow(spool: Spool, ctx: Context | None = None) -> ScanResult:
        await release.wait()
        return ScanResult(ScanStatus.CLEAN)

    old.scanner.scan = slow  # type: ignore[method-assign]

    async def run() -> None:
        with Spool.from_bytes(b"a") as s1, Spool.from_bytes(b"b") as s2:
            scans = [asyncio.ensure_future(ref.process(s, Context("clamd")))
                     for s in (s1, s2)]
            await asyncio.sleep(0)
            assert ref.inflight(old) == 2 and not ref._idle  # no Event until someone waits
            ref.swap(new)
            waiter = asyncio.ensure_future(ref.wait_idle(old))
            other = asyncio.ensure_future(ref.wait_idle(old))
            await asyncio.sleep(0)
            assert not waiter.done()
            release.set()
            await asyncio.gather(*scans)
            await asyncio.wait_for(asyncio.gather(waiter, other), 5)
            assert ref.inflight(old) == 0 and ref.inflight() == 0
            with Spool.from_bytes(b"c") as s3:
                await ref.process(s3, Context("clamd"))  # on the new one, not counted as old
            assert not ref._idle and ref.inflight(new) == 0

    asyncio.run(run())
    for gw in (old, new):
        assert gw.log is not None
        gw.log.close()
