"""Scan log (JSON lines) and Prometheus metrics.

The scan log is the audit trail: one JSON object per line for every scan and every action,
written by one writer per process and flushed per line, so ``tail -f`` and log shippers see
whole lines. Metrics live in a module-level registry (not the prometheus-client default
one, so tests and embedding applications do not collide); the HTTP front-end exposes it.

Debug lines (``[log] level = "debug"``) go to the same scan log. Code that holds the gateway
writes ``gateway.log.debug({"event": ..., ...})`` (a front-end's protocol steps); code
without one (the engines) calls :func:`debug`, which writes to the scan log this process
opened last (a :class:`ScanLog` registers itself; ``close`` unregisters it). Both drop the
line unless the level is ``debug``; test :func:`debug_enabled` (``ScanLog.debug_enabled``)
first when building the line costs something. A debug line summarises — command, sizes,
reply, timing — and never carries message bodies or secrets (passwords, tokens, proxy
credentials). Writing one never fails the caller.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any, Literal

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .result import ScanResult, ScanStatus
from .settings import Section

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


_last_second: tuple[int, str] = (-1, "")  # the whole second utc_now formatted last, its text


def utc_now() -> str:
    """Current time as ISO 8601 UTC (milliseconds, trailing Z)."""
    global _last_second
    now = time.time()
    second = int(now)
    cached = _last_second
    if cached[0] != second:  # strftime once a second, not once a line
        cached = _last_second = (second, datetime.fromtimestamp(second, UTC).strftime(
            "%Y-%m-%dT%H:%M:%S"))
    return f"{cached[1]}.{int((now - second) * 1000):03d}Z"


def scan_event(result: ScanResult, *, frontend: str, listener: str = "",
               ids: dict[str, str] | None = None, rule: str = "",
               actions: list[str] | tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    """The standard scan-log event for one result (the caller adds what it knows)."""
    event: dict[str, Any] = {
        "event": "scan",
        "frontend": frontend,
        "listener": listener,
        "ids": {k: v for k, v in ids.items() if v} if ids else {},
        "sha256": result.sha256,
        "size": result.size,
        "status": _STATUS_VALUES[result.status],
        "findings": [f.to_dict() for f in result.findings] if result.findings else [],
        "engines": [e.to_dict() for e in result.engines],
        "rule": rule,
        "actions": list(actions),
        "elapsed_ms": round(result.elapsed * 1000, 3),
        "cached": result.cached,
    }
    if result.reason:
        event["reason"] = result.reason
    if extra:
        event.update(extra)
    return event


#: each status's value as a plain str (an enum's ``.value`` is a property: slow per object)
_STATUS_VALUES = {s: s.value for s in ScanStatus}


class LogSettings(Section):
    """``[log]``: the scan log (JSON lines; stdout for ``serve`` when no path) and its level."""

    path: str | None = None
    level: Literal["debug", "info", "warning", "error"] = "info"


class ScanLog:
    """JSON-lines writer: ``path`` (appended to, created 0o600) or stdout when None.

    ``register`` (default): become the process's log for :func:`debug`.
    """

    def __init__(self, path: str | None = None, level: str = "info", *,
                 register: bool = True) -> None:
        if level not in _LEVELS:
            raise ValueError(f"unknown log level {level!r}")
        self.level = level
        self._lock = threading.Lock()  # front-ends may log from executor threads
        self._own = path is not None
        self._stream: IO[str]
        if path is None:
            self._stream = sys.stdout
        else:
            # the log names senders and recipients: not world-readable
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._stream = open(fd, "a", encoding="utf-8", buffering=1)
        if register:
            global _current
            _current = self

    @property
    def debug_enabled(self) -> bool:
        return _LEVELS[self.level] <= _LEVELS["debug"]

    def log(self, event: dict[str, Any], level: str = "info") -> None:
        """Write one event as a JSON line (``time`` added when missing)."""
        if _LEVELS.get(level, 20) < _LEVELS[self.level]:
            return
        line = encode_line(event)  # serialised once, written in one call
        with self._lock:
            if self._own:
                # one os.write on the O_APPEND descriptor, as the line-buffered file's
                # write + flush per line did: a line is in the kernel before log() returns,
                # so a crash of avgate loses no line it wrote
                _write_all(self._stream.fileno(), line)
            else:
                self._stream.write(line.decode("utf-8"))
                self._stream.flush()

    def debug(self, event: dict[str, Any]) -> None:
        """A debug line (a protocol step, an engine request — summaries, never content bytes
        nor secrets); dropped unless level=debug. Never raises: a debug line that cannot be
        written (stream closed, disk full) must not fail the scan or session it describes."""
        if self.debug_enabled:
            try:
                self.log({"level": "debug", **event}, level="debug")
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        """Close the file (stdout is left open); stop being the process's debug log."""
        global _current
        if _current is self:
            _current = None
        if self._own:
            with self._lock:
                self._stream.close()


#: the standard library's encoder: the reference for every line, and the one that writes
#: what orjson refuses (one encoder: json.dumps with these options builds one per call)
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str, ensure_ascii=False)
#: orjson calls ``default`` (``str``, as the reference does) for these instead of writing
#: them its own way
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def _default(value: Any) -> Any:
    """What orjson does not write itself: a float subclass as the number (as the standard
    library does), anything else as ``str`` (its ``default``)."""
    return float(value) if isinstance(value, float) else str(value)


def _encode(event: dict[str, Any]) -> bytes:
    """``event`` as compact UTF-8 JSON: orjson (a tenth of the standard library's CPU for a
    scan line), which writes the bytes ``_ENCODER`` writes for what a log line holds: str,
    int, bool, None, lists, tuples, dicts with str keys, str/int enums, floats (below 1e-4
    the same number spelled ``0.00001`` instead of ``1e-05``; NaN and infinity, which no
    line holds, as ``null`` instead of the non-JSON ``NaN``), anything else through ``str``
    (a plain ``enum.Enum`` member, which no line holds either, as its value instead).
    What orjson refuses goes to ``_ENCODER``, as before: dict keys that are not strings,
    integers beyond 64 bits, lone surrogates (written ``\\udcXX``, the ``backslashreplace``
    escape)."""
    try:
        return orjson.dumps(event, default=_default, option=_ORJSON_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return _ENCODER.encode(event).encode("utf-8", "backslashreplace")


def encode_line(event: dict[str, Any]) -> bytes:
    """One scan-log line (with its newline): ``{"time": ..., <event>}`` when ``event`` has
    no ``time``, else ``event`` as it is. The time goes in front of the encoded event's
    bytes, not into a copy of the event."""
    data = _encode(event)
    if "time" in event:
        return data + b"\n"
    if not event:
        return b'{"time":"' + utc_now().encode("ascii") + b'"}\n'
    return b'{"time":"' + utc_now().encode("ascii") + b'",' + data[1:] + b"\n"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


#: the scan log :func:`debug` writes to (the one this process opened last)
_current: ScanLog | None = None


def current_log() -> ScanLog | None:
    """The process's scan log (the one opened last and not closed), if any."""
    return _current


def debug_enabled() -> bool:
    """Whether :func:`debug` writes anything (a scan log is open with level ``debug``)."""
    log = _current
    return log is not None and log.debug_enabled


def debug(event: dict[str, Any]) -> None:
    """Write a debug line to the process's scan log (see the module docstring); a no-op
    unless one is open with level ``debug``. Never raises."""
    log = _current
    if log is not None:
        log.debug(event)


class RateLimitedLog:
    """Log lines for repeated errors, at most one per key per ``interval`` seconds.

    A listener under attack (descriptor exhaustion, a flood of bad connections) must not turn
    every failure into a traceback: the log would grow by tens of thousands of lines a
    second. ``log(key, message)`` writes the message when nothing was written for ``key``
    within ``interval``; otherwise it only counts it, and the next line written for that key
    says how many were suppressed. Keys are chosen by the caller's code (an error kind, never
    attacker-chosen text); at most ``max_keys`` are remembered (least recently used dropped).

    ``write`` receives each line without newline (default: stderr, looked up per call).
    Thread-safe.
    """

    def __init__(self, interval: float = 1.0, *, write: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 1024) -> None:
        self.interval = interval
        self._write = write
        self._clock = clock
        self._max_keys = max_keys
        self._lock = threading.Lock()
        # key -> [time of the last line written, lines suppressed since]
        self._keys: OrderedDict[str, list[float]] = OrderedDict()

    def log(self, key: str, message: str) -> bool:
        """Write ``message`` unless ``key`` was logged within the interval; True if written."""
        now = self._clock()
        with self._lock:
            entry = self._keys.get(key)
            if entry is not None and now - entry[0] < self.interval:
                entry[1] += 1
                return False
            suppressed = 0 if entry is None else int(entry[1])
            since = 0.0 if entry is None else now - entry[0]
            self._keys[key] = [now, 0]
            self._keys.move_to_end(key)
            while len(self._keys) > self._max_keys:
                self._keys.popitem(last=False)
        if suppressed:
            message += f" (suppressed {suppressed} similar in the last {since:.1f} s)"
        self._emit(message)
        return True

    def suppressed(self, key: str) -> int:
        """Lines for ``key`` counted but not written since its last line."""
        with self._lock:
            entry = self._keys.get(key)
            return 0 if entry is None else int(entry[1])

    def _emit(self, line: str) -> None:
        if self._write is not None:
            self._write(line)
            return
        try:
            sys.stderr.write(line.rstrip("\n") + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):  # stderr gone (closed, disk full): nothing to do
            pass


# -- metrics --------------------------------------------------------------------------------
registry = CollectorRegistry(auto_describe=True)

scans_total = Counter("avgate_scans", "Objects scanned, by front-end and status",
                      ["frontend", "status"], registry=registry)
findings_total = Counter("avgate_findings", "Findings, by signature name", ["name"],
                         registry=registry)
engine_latency = Histogram("avgate_engine_latency_seconds", "Scan latency, by engine",
                           ["engine"], registry=registry,
                           buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120))
engine_errors_total = Counter("avgate_engine_errors", "Scans an engine could not decide",
                              ["engine"], registry=registry)
cache_hits_total = Counter("avgate_cache_hits", "Verdict cache hits", registry=registry)
quarantine_records = Gauge("avgate_quarantine_records", "Records in the quarantine",
                           registry=registry)
quarantine_bytes = Gauge("avgate_quarantine_bytes", "Bytes in the quarantine",
                         registry=registry)


_MAX_CHILDREN = 4096  # label sets remembered, all metrics together (a bound: finding
#: names come from the engines' signatures)
_children: dict[tuple[Any, ...], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, remembered: prometheus_client checks and looks the label
    values up under a lock on every call; this is one dict lookup on the hot path."""
    key = (metric, *labels)
    found = _children.get(key)
    if found is None:
        found = metric.labels(*labels)
        if len(_children) >= _MAX_CHILDREN:
            _children.clear()
        _children[key] = found
    return found


def record_scan(frontend: str, result: ScanResult) -> None:
    """Update the scan metrics for one merged result."""
    child(scans_total, frontend, _STATUS_VALUES[result.status]).inc()
    if result.findings:
        for name in result.virus_names:
            child(findings_total, name).inc()
    if result.cached:
        cache_hits_total.inc()
    # engine latency and errors are recorded per engine by BaseEngine.scan, from that
    # engine's own result (the merged one has one elapsed time and one status for all)


def set_quarantine_size(records: int, size: int) -> None:
    """Publish the quarantine's size (the store calls this after every change)."""
    quarantine_records.set(records)
    quarantine_bytes.set(size)
