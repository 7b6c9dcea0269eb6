"""Scale-out benchmark: store scans with ``avgate scan --cluster`` on 1, 2 and 4 Dask workers
against a local ``avgate scan``, and quarantine ``put()`` latency, file store vs PostgreSQL.

    .venv/bin/python bench/scaleout.py [-n 2000] [--runs 3] [--partition 32]
                                       [--records 300] [--record-kib 20] [--out FILE]

Store scan: a generated store of ``-n`` small files (``--file-bytes``, 20 directories) with
``--infected`` EICARs at known places. Rows: a local ``avgate scan`` with one scan worker and
with the default pool (one per core), then a Dask scheduler and 1, 2 and 4 ``dask worker``
processes on 127.0.0.1 (``--nthreads 1`` each; ``[scan] workers = 1``, so a Dask worker is
one scanning process) scanned through ``avgate scan --cluster``. Each row gets ``--runs``
measured runs; a cluster row gets one warm-up run before them (Dask workers build their
scan service on their first task; a local scan builds its own in every run, as it always
does); every run must report each file exactly once, and exactly the EICARs as
infected, or the row says MISMATCH and the script exits 1.

Quarantine: ``--records`` calls of ``Store.put()`` of ``--record-kib`` KiB each, one after
another (latency of each call) and from 4 threads at once (aggregate puts/s), on the file
store (``QuarantineStore``: SQLite + one file per record, fsync'd) and on PostgreSQL
(``PostgresStore``) in a private local cluster started as tests/pg_instance.py does — with
``fsync = on`` (its series alternate with the file store's, ``--runs`` of each) and with
``fsync = off`` (as the test suite runs it). Without
PostgreSQL installed the PostgreSQL rows are left out with a line saying so.

Markdown tables go to stdout (bench/report.py shows them verbatim), progress to stderr, one
JSON line per measured run to ``--out``. Everything listens on 127.0.0.1; every process
started here is stopped by PID at the end, also on errors, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import math
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common as C  # noqa: E402
from tests.helpers import PG_BINDIR, wait_until  # noqa: E402

VENV_BIN = Path(sys.executable).parent
AVGATE = str(VENV_BIN / "avgate")
DASK = str(VENV_BIN / "dask")
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
WORKER_COUNTS = (1, 2, 4)
PUT_THREADS = 4
PR_SET_PDEATHSIG = 1


def log(msg: str) -> None:
    print(f"[scaleout {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- processes


def children_cpu() -> float:
    """CPU seconds of this process's reaped children (and what they reaped)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _die_with_parent() -> None:
    """preexec: SIGTERM this child if the benchmark dies (even by SIGKILL)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group (a nanny takes its worker along), SIGKILL after 15 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fs_type(path: Path) -> str:
    """The file system type of the mount ``path`` is on (from /proc/mounts)."""
    best, kind = "", "?"
    real = str(path.resolve())
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, parts[2]
    return kind


# ----------------------------------------------------------------------------- store scan
@dataclass
class Store:
    data: Path
    files: int
    infected: set[str]
    bytes: int


def make_store(root: Path, n: int, infected: int, size: int) -> Store:
    """``n`` files in 20 directories; ``infected`` of them, spread evenly, are EICAR."""
    bad = {(k * n) // infected + 3 for k in range(infected)} if infected else set()
    bad = {i for i in bad if i < n}
    line = b"The quick brown fox jumps over the lazy dog, file %06d.\n"
    data = root / "store"
    paths: set[str] = set()
    total = 0
    for i in range(n):
        sub = data / f"d{i % 20:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"f{i:06d}.txt"
        body = EICAR if i in bad else (line % i) * max(1, size // len(line % i))
        path.write_bytes(body)
        total += len(body)
        if i in bad:
            paths.add(str(path))
    return Store(data, n, paths, total)


@dataclass
class ScanRun:
    wall_s: float
    scan_s: float  # the CLI's own "elapsed" (listing + scanning + reporting, no interpreter)
    client_cpu_s: float
    tree_cpu_s: dict[str, float]
    problem: str  # "" when the report is exact


def check_report(stdout: str, stderr: str, store: Store) -> tuple[str, float]:
    """("" or what is wrong, the CLI's elapsed seconds)."""
    seen: Counter[str] = Counter()
    infected: set[str] = set()
    statuses: Counter[str] = Counter()
    for line in stdout.splitlines():
        rec = json.loads(line)
        seen[rec["path"]] += 1
        statuses[rec["status"]] += 1
        if rec["status"] == "infected":
            infected.add(rec["path"])
    summary: dict[str, Any] = {}
    for line in reversed(stderr.splitlines()):
        with contextlib.suppress(ValueError):
            summary = json.loads(line).get("summary", {})
            break
    problems = []
    if len(seen) != store.files or sum(seen.values()) != store.files:
        problems.append(f"{sum(seen.values())} results for {len(seen)} files "
                        f"(expected {store.files} once each)")
    if infected != store.infected:
        problems.append(f"{len(infected)} infected (expected {len(store.infected)}: "
                        f"{len(infected - store.infected)} wrong, "
                        f"{len(store.infected - infected)} missed)")
    if set(statuses) - {"clean", "infected"}:
        problems.append("statuses " + ", ".join(f"{k} {v}" for k, v in statuses.items()))
    if summary.get("infected") != len(store.infected):
        problems.append(f"summary says {summary.get('infected')} infected")
    return "; ".join(problems), float(summary.get("elapsed", 0.0))


def run_scan(cfg: Path, store: Store, extra: list[str],
             watch: dict[str, int]) -> ScanRun:
    cmd = [AVGATE, "scan", "--json", "--no-progress", "-c", str(cfg), *extra, str(store.data)]
    before = {k: C.tree_cpu(p) for k, p in watch.items()}
    cpu0 = children_cpu()
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False,
                          preexec_fn=_die_with_parent)
    wall = time.perf_counter() - t0
    client = children_cpu() - cpu0
    trees = {k: C.tree_cpu(p) - before[k] for k, p in watch.items()}
    if done.returncode not in (0, 1):
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return ScanRun(wall, 0.0, client, trees, f"exit {done.returncode}: {tail}")
    problem, elapsed = check_report(done.stdout, done.stderr, store)
    if done.returncode != (1 if store.infected else 0):
        problem = (problem + "; " if problem else "") + f"exit {done.returncode}"
    return ScanRun(wall, elapsed, client, trees, problem)


@dataclass
class Dask:
    """A scheduler and ``dask worker`` processes on 127.0.0.1 (stopped by :meth:`close`)."""

    root: Path
    port: int = field(default_factory=free_port)
    scheduler: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _start(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        out = open(self.root / f"{name}.log", "wb")
        try:
            return subprocess.Popen([DASK, *args], cwd=self.root, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        finally:
            out.close()

    def start(self) -> None:
        self.scheduler = self._start(["scheduler", "--host", "127.0.0.1", "--port",
                                      str(self.port), "--no-dashboard"], "scheduler")

    def grow(self, count: int) -> None:
        """Start workers until there are ``count``; wait until the scheduler sees them all."""
        while len(self.workers) < count:
            i = len(self.workers) + 1
            self.workers.append(self._start(
                ["worker", self.address, "--nthreads", "1", "--nworkers", "1",
                 "--no-dashboard", "--memory-limit", "0", "--name", f"w{i}", "--host",
                 "127.0.0.1", "--local-directory", str(self.root / f"w{i}")], f"worker{i}"))
        if not wait_until(lambda: self._seen() == count, 90):
            raise RuntimeError(f"the Dask scheduler did not see {count} workers within 90 s "
                               f"(logs in {self.root})")

    def _seen(self) -> int:
        assert self.scheduler is not None
        if self.scheduler.poll() is not None or any(w.poll() is not None for w in self.workers):
            raise RuntimeError(f"a Dask process exited (logs in {self.root})")
        import distributed

        try:
            with distributed.Client(self.address,  # type: ignore[no-untyped-call]
                                    timeout="5s") as client:
                return len(client.scheduler_info(n_workers=-1)["workers"])
        except OSError:
            return 0

    def close(self) -> None:
        for proc in [*self.workers, *([self.scheduler] if self.scheduler else [])]:
            stop(proc)
        self.workers, self.scheduler = [], None


def config(path: Path, scan_workers: int | None) -> Path:
    lines = ["[scan]", "cache = false"]
    if scan_workers is not None:
        lines.append(f"workers = {scan_workers}")
    path.write_text("\n".join(lines) + "\n")
    return path


def scan_bench(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]
               ) -> tuple[list[dict[str, Any]], Store]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="avgate-bench-scaleout-") as tmp:
        root = Path(tmp)
        log(f"generating a store of {args.n} files ({args.infected} EICARs)")
        store = make_store(root, args.n, args.infected, args.file_bytes)
        one = config(root / "one-worker.toml", 1)
        default = config(root / "default.toml", None)

        def measure(label: str, cfg: Path, extra: list[str], watch: dict[str, int],
                    kind: str, dask_workers: int) -> None:
            runs: list[ScanRun] = []
            warm = []
            if kind == "cluster":  # Dask workers build their scan service on their first task
                log(f"{label}: warm-up run")
                warm.append(run_scan(cfg, store, extra, watch))
            for r in range(1, args.runs + 1):
                run = run_scan(cfg, store, extra, watch)
                log(f"{label} run {r}: {run.wall_s:.2f} s wall, {run.scan_s:.2f} s in the CLI"
                    + (f" MISMATCH {run.problem}" if run.problem else ""))
                runs.append(run)
                emit({"bench": "scaleout", "part": "scan", "kind": kind, "label": label,
                      "dask_workers": dask_workers, "run": r, "files": store.files,
                      "bytes": store.bytes, "infected_expected": len(store.infected),
                      "wall_s": round(run.wall_s, 3), "cli_elapsed_s": run.scan_s,
                      "client_cpu_s": round(run.client_cpu_s, 2),
                      "tree_cpu_s": {k: round(v, 2) for k, v in run.tree_cpu_s.items()},
                      "problem": run.problem})
            problems = [r.problem for r in [*warm, *runs] if r.problem]
            rows.append({"label": label, "runs": runs, "problem": "; ".join(problems)})

        measure("local `avgate scan`, 1 scan worker", one, [], {}, "local", 0)
        measure(f"local `avgate scan`, default pool ({os.cpu_count()} scan workers)",
                default, [], {}, "local", 0)
        dask = Dask(root)
        try:
            dask.start()
            for count in WORKER_COUNTS:
                log(f"starting Dask workers: {count}")
                dask.grow(count)
                assert dask.scheduler is not None
                watch = {"scheduler": dask.scheduler.pid} | {
                    f"w{i + 1}": w.pid for i, w in enumerate(dask.workers)}
                measure(f"`--cluster`, {count} Dask worker{'s' if count > 1 else ''}", one,
                        ["--cluster", dask.address, "--partition", str(args.partition)],
                        watch, "cluster", count)
        except RuntimeError as exc:
            log(f"Dask: {exc}")
            rows.append({"label": "`--cluster`", "runs": [], "problem": str(exc)})
        finally:
            dask.close()
    return rows, store


def scan_table(rows: list[dict[str, Any]], store: Store, args: argparse.Namespace) -> None:
    print(f"### Store scan: {store.files} files, {store.bytes / 1e6:.1f} MB, "
          f"{len(store.infected)} EICARs ({args.runs} measured run(s) per row; cluster rows "
          "after 1 warm-up run)")
    print()
    print("| how | files/s (CLI) | files/s (wall) | client CPU s / 1k files | Dask workers "
          "CPU s / 1k files | scheduler CPU s / 1k files | infected found / expected |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        runs: list[ScanRun] = row["runs"]
        if not runs:
            print(f"| {row['label']} | - | - | - | - | - | not run: {row['problem']} |")
            continue
        k = store.files / 1000
        cli = statistics.median(store.files / r.scan_s for r in runs if r.scan_s) \
            if all(r.scan_s for r in runs) else 0.0
        wall = statistics.median(store.files / r.wall_s for r in runs)
        client = statistics.median(r.client_cpu_s for r in runs) / k
        workers = statistics.median(sum(v for n, v in r.tree_cpu_s.items()
                                        if n != "scheduler") for r in runs) / k
        sched = statistics.median(r.tree_cpu_s.get("scheduler", 0.0) for r in runs) / k
        cluster = bool(runs[0].tree_cpu_s)
        ok = ("✗ MISMATCH: " + row["problem"]) if row["problem"] else \
            f"{len(store.infected)} / {len(store.infected)} ✓"
        print(f"| {row['label']} | {cli:.0f} | {wall:.0f} | {client:.2f} | "
              f"{f'{workers:.2f}' if cluster else '-'} | {f'{sched:.2f}' if cluster else '-'} "
              f"| {ok} |")
    print()
    print(f"files/s (CLI) = files ÷ the scan time `avgate scan --json` reports (listing, "
          f"scanning, reporting; from the CLI's start of work, so a local scan's engine "
          f"start is in it, the interpreter start is not); files/s (wall) = files ÷ wall time "
          f"of the whole command; median of the measured runs. CPU: client = the `avgate "
          f"scan` process and the scan workers it started, interpreter start and imports "
          f"included (getrusage of reaped children); "
          f"Dask workers = each `dask worker` process tree (nanny, worker, its scan workers; "
          f"/proc utime+stime); scheduler = `dask scheduler`. Cluster rows: `[scan] workers = "
          f"1`, `--nthreads 1`, `--partition {args.partition}`; scheduler, workers and client "
          f"share this machine's {os.cpu_count()} cores, so more workers than cores cannot "
          f"scale here. Every run (warm-up included) is checked: each file reported once, "
          f"exactly the EICARs infected, nothing else but clean.")
    print()


# ----------------------------------------------------------------------------- quarantine
def put_series(store: Any, n: int, size: int, threads: int) -> tuple[list[float], float]:
    """(latency of each put in seconds, wall seconds of all) for ``n`` puts of ``size``
    bytes from ``threads`` threads."""
    from avgate.quarantine import Envelope
    from avgate.result import EngineInfo, Finding, ScanResult, ScanStatus

    env = Envelope("alice@example.org", ("bob@example.net",), "192.0.2.1", "mx.example.org",
                   "bench")
    result = ScanResult(ScanStatus.INFECTED, findings=(Finding("Eicar-Test-Signature",
                                                               "embedded", "1"),),
                        sha256="x", size=size, engines=(EngineInfo("embedded", "1"),))
    block = (b"Subject: quarantined\r\n\r\n" + os.urandom(size)).ljust(size, b"x")[:size]
    store.put(b"warm-up", env, result, frontend="smtp")  # connections and imports
    lat: list[float] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        t0 = time.perf_counter()
        store.put(block, env, result, frontend="smtp")
        took = time.perf_counter() - t0
        with lock:
            lat.append(took)

    t0 = time.perf_counter()
    if threads == 1:
        for i in range(n):
            one(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(n)))
    return lat, time.perf_counter() - t0


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]  # nearest rank


@dataclass
class PutRow:
    """Every put of every run pooled per thread count (latencies), and puts/s per run."""

    label: str
    latencies: dict[int, list[float]] = field(default_factory=dict)
    rates: dict[int, list[float]] = field(default_factory=dict)


def measure_store(row: PutRow, open_store: Callable[[], Any], threads: int, run: int,
                  args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> None:
    """One series of ``--records`` puts on a fresh store, added to ``row``."""
    size = args.record_kib * 1024
    store = open_store()
    try:
        log(f"{row.label}: {args.records} puts of {args.record_kib} KiB, {threads} thread(s), "
            f"run {run}")
        lat, wall = put_series(store, args.records, size, threads)
    finally:
        store.close()
    row.latencies.setdefault(threads, []).extend(lat)
    row.rates.setdefault(threads, []).append(len(lat) / wall)
    emit({"bench": "scaleout", "part": "quarantine", "store": row.label, "threads": threads,
          "run": run, "records": args.records, "record_bytes": size,
          "p50_ms": round(pct(lat, 50) * 1e3, 2), "p99_ms": round(pct(lat, 99) * 1e3, 2),
          "max_ms": round(max(lat) * 1e3, 2), "puts_s": round(len(lat) / wall, 1)})


def pg_instance() -> Any:
    """A private cluster (initdb as tests/pg_instance.py does it), not started. Its
    ``start(fsync=True)`` runs the server with ``fsync``, ``full_page_writes`` and
    ``synchronous_commit`` on; ``start()`` runs it exactly as the tests do (fsync off)."""
    from tests.pg_instance import PgInstance

    class Instance(PgInstance):
        def start(self, fsync: bool = False) -> None:
            if not fsync:
                super().start()
                return
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen(
                    [*self._as, f"{self.bindir}/postgres", "-D", str(self.data), "-p",
                     str(self.port), "-k", str(self.sockets), "-c",
                     "listen_addresses=127.0.0.1", "-c", "fsync=on", "-c",
                     "full_page_writes=on", "-c", "synchronous_commit=on", "-c",
                     "max_connections=200"],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            if not wait_until(self.ready, timeout=60):
                self.stop()
                raise RuntimeError(f"postgres did not start: {self.log.read_text()[-2000:]}")

    return Instance(PG_BINDIR)


def quarantine_bench(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]
                     ) -> tuple[list[PutRow], list[str]]:
    """File store and PostgreSQL (fsync on) series alternate run by run, so that both see
    the same disk (fsync latency on a shared machine drifts); then PostgreSQL with fsync
    off, as the tests run it."""
    from avgate.quarantine import QuarantineStore

    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="avgate-bench-quarantine-") as tmp:
        count = itertools.count(1)
        file_row = PutRow(f"file store (SQLite WAL, synchronous=FULL, fsync'd files; "
                          f"{fs_type(Path(tmp))} in {tempfile.gettempdir()})")
        rows = [file_row]

        def open_file() -> Any:
            return QuarantineStore(Path(tmp) / f"q{next(count)}")

        if not (os.access(f"{PG_BINDIR}/initdb", os.X_OK)
                and os.access(f"{PG_BINDIR}/postgres", os.X_OK)):
            notes.append(f"PostgreSQL rows left out: PostgreSQL is not installed "
                         f"({PG_BINDIR}/initdb missing; apt-get install postgresql).")
            for run in range(1, args.runs + 1):
                for threads in (1, PUT_THREADS):
                    measure_store(file_row, open_file, threads, run, args, emit)
            return rows, notes
        from avgate.quarantine.postgres import PostgresStore, migrate

        version = subprocess.run([f"{PG_BINDIR}/postgres", "--version"], capture_output=True,
                                 text=True, check=False).stdout.strip()
        try:
            pg = pg_instance()
        except (RuntimeError, OSError) as exc:
            notes.append(f"PostgreSQL rows left out: initdb failed: {exc}")
            return rows, notes

        def open_pg() -> Any:
            dsn = pg.new_database()
            migrate(dsn)
            return PostgresStore(dsn, pool_size=PUT_THREADS)

        try:
            for fsync in (True, False):
                row = PutRow(f"PostgreSQL, local test cluster, fsync = "
                             f"{'on' if fsync else 'off (as the tests run it)'}; "
                             f"{fs_type(pg.root)} in {pg.root.parent}")
                try:
                    pg.start(fsync)
                except (RuntimeError, OSError) as exc:
                    notes.append(f"{row.label}: not measured: {exc}")
                    if fsync:  # the file store still gets its runs
                        for run in range(1, args.runs + 1):
                            for threads in (1, PUT_THREADS):
                                measure_store(file_row, open_file, threads, run, args, emit)
                    continue
                try:
                    for run in range(1, args.runs + 1):
                        for threads in (1, PUT_THREADS):
                            if fsync:
                                measure_store(file_row, open_file, threads, run, args, emit)
                            measure_store(row, open_pg, threads, run, args, emit)
                finally:
                    pg.stop()
                rows.append(row)
        finally:
            pg.close()
    notes.append(f"PostgreSQL: {version}, a private cluster on 127.0.0.1 started by this "
                 "script the way tests/pg_instance.py does (initdb as `nobody`, TCP over "
                 f"loopback, pool of {PUT_THREADS} connections) - a local test cluster on the "
                 "same disk as the file store, not a tuned server. fsync = on also sets "
                 "full_page_writes and synchronous_commit on (PostgreSQL's defaults).")
    return rows, notes


def quarantine_table(rows: list[PutRow], notes: list[str], args: argparse.Namespace) -> None:
    print(f"### Quarantine `put()`: {args.records} records of {args.record_kib} KiB per "
          f"series, {args.runs} series per cell")
    print()
    print(f"| store | p50 ms | p99 ms | max ms | puts/s, 1 thread | p50 ms, {PUT_THREADS} "
          f"threads | p99 ms, {PUT_THREADS} threads | puts/s, {PUT_THREADS} threads |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        cells = []
        for threads in (1, PUT_THREADS):
            lat = row.latencies.get(threads)
            if not lat:
                cells.append(["-"] * 4)
                continue
            cells.append([f"{pct(lat, 50) * 1e3:.2f}", f"{pct(lat, 99) * 1e3:.2f}",
                          f"{max(lat) * 1e3:.2f}",
                          f"{statistics.median(row.rates[threads]):.0f}"])
        s, p = cells
        print(f"| {row.label} | {s[0]} | {s[1]} | {s[2]} | {s[3]} | {p[0]} | {p[1]} | "
              f"{p[3]} |")
    print()
    print("Latency = wall time of one `Store.put()` call (it returns once the record and its "
          "content are committed), measured in this process; p50/p99/max over every put of "
          "the row's series (each series starts on an empty store, after one warm-up put). "
          "puts/s = records ÷ wall time of a series, median over the series; the "
          f"{PUT_THREADS}-thread series share one store object, as a gateway's worker "
          "threads do (the file store writes and fsyncs content files in parallel and "
          "serialises the rename and index insert under its lock; PostgreSQL runs the puts "
          "on pooled connections). A file store put fsyncs three times (content file, "
          "directory, SQLite WAL at commit), a PostgreSQL put once (its WAL at commit, "
          "with fsync = on). File store and PostgreSQL fsync = on series alternate, "
          "so both see the same disk (fsync latency on this shared virtual disk varies "
          "from run to run).")
    for note in notes:
        print()
        print(note)
    print()


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=2000, help="files in the store (default 2000)")
    ap.add_argument("--infected", type=int, default=8, help="EICARs among them (default 8)")
    ap.add_argument("--file-bytes", type=int, default=1500, help="size of a clean file")
    ap.add_argument("--runs", type=int, default=3, help="measured runs per row (default 3)")
    ap.add_argument("--partition", type=int, default=32,
                    help="--cluster --partition (objects per Dask task, default 32)")
    ap.add_argument("--records", type=int, default=300,
                    help="quarantine puts per series (default 300)")
    ap.add_argument("--record-kib", type=int, default=20, help="size of a record (20 KiB)")
    ap.add_argument("--only", choices=("scan", "quarantine"), help="one part only")
    ap.add_argument("--out", type=Path, help="append one JSON line per measurement here")
    args = ap.parse_args(argv)
    if args.n < 1 or args.runs < 1 or args.records < 1 or not 0 <= args.infected <= args.n:
        ap.error("-n, --runs and --records must be at least 1; --infected at most -n")

    def emit(rec: dict[str, Any]) -> None:
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(rec) + "\n")

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # the finally blocks stop what was started

    signal.signal(signal.SIGTERM, terminate)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"Machine: {os.cpu_count()} cores, load average at start {load} (shared machine).")
    print()
    failed = False
    if args.only in (None, "scan"):
        rows, store = scan_bench(args, emit)
        scan_table(rows, store, args)
        failed = any(r["problem"] for r in rows)
    if args.only in (None, "quarantine"):
        qrows, notes = quarantine_bench(args, emit)
        quarantine_table(qrows, notes, args)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
