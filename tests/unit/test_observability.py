"""Scan log lines and metrics."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from avgate import observability as obs
from avgate.result import EngineInfo, Finding, ScanResult, ScanStatus

RESULT = ScanResult(ScanStatus.INFECTED, findings=(Finding("Eicar-Test-Signature", "emb", "1"),),
                    sha256="ab" * 32, size=68, engines=(EngineInfo("emb", "1.0"),), elapsed=0.25)


def test_scan_log_writes_one_json_line_per_event(tmp_path: Path) -> None:
    path = tmp_path / "scan.log"
    log = obs.ScanLog(str(path), "info")
    log.log(obs.scan_event(RESULT, frontend="smtp", listener="in",
                           ids={"queue_id": "Q1", "message_id": "", "quarantine_id": "R1"},
                           rule="default:infected", actions=("reject",)))
    log.debug({"event": "engine", "said": "OK"})  # level info: dropped
    log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    ev = json.loads(lines[0])
    assert ev["time"].endswith("Z")
    assert ev["frontend"] == "smtp" and ev["listener"] == "in"
    assert ev["ids"] == {"queue_id": "Q1", "quarantine_id": "R1"}
    assert ev["sha256"] == "ab" * 32 and ev["size"] == 68
    assert ev["status"] == "infected"
    assert ev["findings"][0]["name"] == "Eicar-Test-Signature"
    assert ev["engines"] == [{"name": "emb", "version": "1.0"}]
    assert ev["rule"] == "default:infected" and ev["actions"] == ["reject"]
    assert ev["elapsed_ms"] == 250.0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_debug_level_and_threads(tmp_path: Path) -> None:
    path = tmp_path / "d.log"
    log = obs.ScanLog(str(path), "debug")

    def work(n: int) -> None:
        for i in range(200):
            log.debug({"event": "engine", "thread": n, "i": i, "pad": "x" * 500})

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(events) == 800  # no torn or merged lines
    assert all(e["level"] == "debug" for e in events)


def test_stdout_default(capsys: pytest.CaptureFixture[str]) -> None:
    log = obs.ScanLog(None)
    log.log({"event": "action", "action": "quarantine"})
    out = capsys.readouterr().out
    assert json.loads(out)["action"] == "quarantine"


def test_unknown_level() -> None:
    with pytest.raises(ValueError):
        obs.ScanLog(None, "loud")


def _value(name: str, labels: dict[str, str] | None = None) -> float:
    v = obs.registry.get_sample_value(name, labels or {})
    return 0.0 if v is None else v


def test_record_scan_updates_metrics() -> None:
    before_scans = _value("avgate_scans_total", {"frontend": "icap", "status": "infected"})
    before_find = _value("avgate_findings_total", {"name": "Eicar-Test-Signature"})
    before_hits = _value("avgate_cache_hits_total")
    obs.record_scan("icap", RESULT)
    obs.record_scan("icap", RESULT.with_(cached=True))
    assert _value("avgate_scans_total",
                  {"frontend": "icap", "status": "infected"}) == before_scans + 2
    assert _value("avgate_findings_total",
                  {"name": "Eicar-Test-Signature"}) == before_find + 2
    assert _value("avgate_cache_hits_total") == before_hits + 1
    # engine latency and errors come from each engine's own result (BaseEngine.scan;
    # tests/unit/engines/test_base.py): a merged result must not count them again
    before_lat = _value("avgate_engine_latency_seconds_count", {"engine": "emb"})
    before_err = _value("avgate_engine_errors_total", {"engine": "clamd"})
    obs.record_scan("smtp", ScanResult.error("down", engines=(EngineInfo("clamd", "?"),)))
    assert _value("avgate_engine_errors_total", {"engine": "clamd"}) == before_err
    assert _value("avgate_engine_latency_seconds_count", {"engine": "emb"}) == before_lat


def test_quarantine_gauges(tmp_path: Path) -> None:
    from avgate.quarantine import Envelope, QuarantineStore

    with QuarantineStore(tmp_path / "q") as store:
        store.put(b"12345", Envelope(), RESULT)
        store.put(b"123", Envelope(), RESULT)
        assert _value("avgate_quarantine_records") == 2
        assert _value("avgate_quarantine_bytes") == 8


def test_utc_now_is_iso_milliseconds(monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import UTC, datetime

    for t in (1_700_000_000.0, 1_700_000_000.9996, 1_700_000_001.5, 1_700_000_000.25):
        monkeypatch.setattr("avgate.observability.time.time", lambda t=t: t)
        expected = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        assert obs.utc_now() == expected  # the second's text is cached, never stale


def test_metric_children_are_cached_per_label_set() -> None:
    a = obs.child(obs.scans_total, "smtp", "clean")
    assert obs.child(obs.scans_total, "smtp", "clean") is a
    assert a is obs.scans_total.labels(frontend="smtp", status="clean")
    assert obs.child(obs.scans_total, "smtp", "infected") is not a
    for i in range(obs._MAX_CHILDREN + 1):  # bounded: the cache starts over when full
        obs.child(obs.findings_total, f"Test.Cache.{i}")
    assert len(obs._children) <= obs._MAX_CHILDREN


def test_scan_log_line_is_one_write_and_never_invalid_utf8(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.log"
    log = obs.ScanLog(str(path), "info", register=False)
    writes: list[bytes] = []
    real = os.write

    def spy(fd: int, data: bytes | memoryview) -> int:
        writes.append(bytes(data))
        return real(fd, data)

    monkeypatch.setattr("avgate.observability.os.write", spy)
    try:
        # a surrogate (undecodable bytes of a name, decoded with surrogateescape)
        log.log({"event": "scan", "name": "a\udcff.exe", "n": 1})
    finally:
        log.close()
    assert len(writes) == 1 and writes[0].endswith(b"\n")  # serialised once, one write
    raw = path.read_bytes()
    raw.decode("utf-8")  # valid UTF-8
    assert json.loads(raw)["name"] == "a\udcff.exe"  # a JSON escape, read back as written
