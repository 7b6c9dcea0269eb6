"""Load time and memory of a ClamAV database of ClamAV's real size in the embedded engine.

Generates (once, cached under ``bench/run/sigdb-<scale>``) a database directory of the size
of ClamAV's ``main`` + ``daily`` — by default 4,000,000 MD5 file hashes (``.hdb``), 100,000
body signatures (``.ndb``, mixed offsets and wildcards) and 10,000 logical signatures
(``.ldb``) — then, in a fresh process, loads it the way the engine does and prints one JSON
line: parse/verify time, YARA-X compile time, the worker state size, RSS before/after and
peak, and hash lookup cost. ``--scale 0.1`` for a quick run.

    .venv/bin/python bench/sigdb.py [--scale 1.0] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import random
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def generate(root: Path, scale: float) -> dict[str, int]:
    rng = random.Random(18)
    hashes, bodies, logical = int(4_000_000 * scale), int(100_000 * scale), int(10_000 * scale)
    marker = root / ".complete"
    if marker.exists():
        cached: dict[str, int] = json.loads(marker.read_text())
        return cached
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "bench.hdb", "w") as f:
        for i in range(hashes):
            digest = hashlib.md5(b"%d" % i, usedforsecurity=False).hexdigest()
            f.write(f"{digest}:{rng.randrange(100, 5_000_000)}:Win.Trojan.Bench-{i}\n")
    offsets = ["*", "*", "*", "0", "EOF-200", "100,400", "EP+0", "S1+0"]
    with open(root / "bench.ndb", "w") as f:
        for i in range(bodies):
            hexsig = rng.randbytes(rng.randrange(8, 24)).hex()
            if i % 5 == 0:
                hexsig = hexsig[:8] + "{4-16}" + hexsig[8:]
            if i % 7 == 0:
                hexsig = hexsig[:6] + "??" + hexsig[8:]
            offset = offsets[i % len(offsets)]
            target = 1 if offset.startswith(("EP", "S")) else 0
            f.write(f"Bench.Body-{i}:{target}:{offset}:{hexsig}\n")
    with open(root / "bench.ldb", "w") as f:
        for i in range(logical):
            subs = [rng.randbytes(rng.randrange(6, 16)).hex() for _ in range(3)]
            f.write(f"Bench.Logical-{i};Engine:81-255,Target:0;(0&1)|2;"
                    + ";".join(subs) + "\n")
    counts = {"hashes": hashes, "bodies": bodies, "logical": logical}
    marker.write_text(json.dumps(counts))
    return counts


def _timed(fn: object) -> tuple[object, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()  # type: ignore[operator]
    return out, round(time.perf_counter() - wall, 2), round(time.process_time() - cpu, 2)


def _worker_rss(engine: object) -> list[int]:
    pool = engine._pool  # type: ignore[attr-defined]
    out = []
    for worker in getattr(pool, "_all", ()):
        with open(f"/proc/{worker.pid}/statm") as f:
            out.append(round(int(f.read().split()[1]) * resource.getpagesize() / 2**20))
    return out


def measure(root: Path) -> dict[str, object]:
    import asyncio

    from avgate.engines.base import EngineContext
    from avgate.engines.clamavdb import load_database
    from avgate.engines.embedded import EmbeddedEngine, EmbeddedEngineSettings
    from avgate.spool import Spool

    rss0 = rss_mib()
    db, parse_wall, parse_cpu = _timed(lambda: load_database([root]))
    rss_parsed = rss_mib()
    del db
    engine = EmbeddedEngine(EmbeddedEngineSettings(clamav_db=(str(root),), reload_interval=0),
                            EngineContext(workers=1))
    _, load_wall, load_cpu = _timed(engine.load)
    rss_loaded = rss_mib()
    state, pickle_wall, _ = _timed(lambda: pickle.dumps(engine._worker_state()))
    data = [random.randbytes(n) for n in (1000, 20_000, 200_000)]
    rounds = 2000
    t0 = time.perf_counter()
    for _ in range(rounds):
        for d in data:
            engine._db.hashes.lookup(d)
    t_lookup = (time.perf_counter() - t0) / (rounds * len(data))
    t0 = time.perf_counter()
    for d in data:
        engine.match_part(d)
    t_match = (time.perf_counter() - t0) / len(data)

    async def in_worker() -> tuple[float, list[int], str]:
        start = time.perf_counter()
        await engine.start()  # one scan worker, default worker_memory (RLIMIT_AS)
        started = time.perf_counter() - start
        try:
            result = await engine.scan(Spool.from_bytes(b"x" * 20_000))
            return started, _worker_rss(engine), result.status.value
        finally:
            await engine.close()

    started, worker_rss, status = asyncio.run(in_worker())
    return {
        "parse_verify_wall_s": parse_wall, "parse_verify_cpu_s": parse_cpu,
        "engine_load_wall_s": load_wall, "engine_load_cpu_s": load_cpu,
        "rss_start_mib": round(rss0), "rss_after_parse_mib": round(rss_parsed),
        "rss_engine_loaded_mib": round(rss_loaded),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "worker_state_mib": round(len(state) / 2**20, 1),  # type: ignore[arg-type]
        "worker_state_pickle_s": pickle_wall,
        "worker_start_s": round(started, 2), "worker_rss_mib": worker_rss,
        "worker_scan_status": status,
        "hash_lookup_us": round(t_lookup * 1e6, 2),
        "match_part_ms": round(t_match * 1e3, 2),
        "stats_total": engine.stats()[-1],
        "load_average": open("/proc/loadavg").read().split()[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--keep", action="store_true", help="keep the generated database")
    args = parser.parse_args()
    root = ROOT / "bench" / "run" / f"sigdb-{args.scale:g}"
    t0 = time.perf_counter()
    counts = generate(root, args.scale)
    generated = time.perf_counter() - t0
    try:
        result = {"bench": "sigdb", **counts, "generate_s": round(generated, 1),
                  "files_mib": round(sum(p.stat().st_size for p in root.iterdir()) / 2**20),
                  **measure(root)}
        print(json.dumps(result))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
