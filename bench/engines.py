"""Embedded engine vs clamd on the same generated signature set and the same corpus.

    .venv/bin/python bench/engines.py [--hdb 100000] [--ndb 2000] [--files 10000] [--json F]

Signature set: N random MD5 ``.hdb`` lines (plus EICAR) and M random ``.ndb`` body signatures
(plus the test marker), loaded into the embedded engine and into a private clamd.
Corpus: unique ~20 KB objects (random bytes; 1% carry EICAR as a MIME attachment, 1% the
marker), kept in memory; the verdict cache is off so every object is scanned.
Reports files/s and MB/s for each engine at concurrency 1 and 16, the ratio, and the cost
of decomposing one 20 KB MIME message. The embedded engine runs as avgate runs it: through
the scan worker pool (one worker per core), and its CPU per file counts the workers too.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from tests.clamd_daemon import EICAR, MARKER, ClamdDaemon, find_clamd  # noqa: E402

from avgate.config import from_dict  # noqa: E402
from avgate.limits import Limits  # noqa: E402
from avgate.result import ScanStatus  # noqa: E402
from avgate.scan import ScanService  # noqa: E402
from avgate.spool import Spool  # noqa: E402


def make_signatures(directory: Path, n_hdb: int, n_ndb: int, rng: random.Random) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "bench.hdb", "w") as f:
        for i in range(n_hdb):
            f.write(f"{rng.randbytes(16).hex()}:{rng.randint(100, 100_000)}:Bench.Hash.{i}\n")
    with open(directory / "bench.ndb", "w") as f:
        for i in range(n_ndb):
            a, b = rng.randbytes(6).hex(), rng.randbytes(6).hex()
            shape = i % 4
            if shape == 0:
                sig = a + b
            elif shape == 1:
                sig = f"{a}??{b}"
            elif shape == 2:
                sig = f"{a}{{2-8}}{b}"
            else:
                sig = f"{a}*{b}"
            f.write(f"Bench.Body.{i}:0:*:{sig}\n")


def make_corpus(n: int, rng: random.Random) -> list[bytes]:
    out = []
    for i in range(n):
        text = f"Hello {i}\n".encode() * 600
        if i % 100 == 50:
            text += MARKER
        attach = base64.encodebytes(rng.randbytes(10_000))
        parts = [b"--b\r\nContent-Type: text/plain\r\n\r\n" + text,
                 b"--b\r\nContent-Type: application/octet-stream\r\n"
                 b"Content-Transfer-Encoding: base64\r\n\r\n" + attach]
        if i % 100 == 0:
            parts.append(b"--b\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Disposition: attachment; filename=eicar.com\r\n"
                         b"Content-Transfer-Encoding: base64\r\n\r\n"
                         + base64.encodebytes(EICAR))
        out.append(b"From: a@example.org\r\nTo: b@example.net\r\nSubject: bench\r\n"
                   b"Message-ID: <" + str(i).encode() + b"@bench>\r\nMIME-Version: 1.0\r\n"
                   b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
                   + b"\r\n".join(parts) + b"\r\n--b--\r\n")
    return out


async def run_engine(service: ScanService, corpus: list[bytes], concurrency: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    counts = {s.value: 0 for s in ScanStatus}

    async def one(data: bytes) -> None:
        async with sem:
            with Spool.from_bytes(data) as s:
                r = await service.scan(s)
            counts[r.status.value] += 1

    workers0 = worker_cpu(service)
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(d) for d in corpus))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    wcpu = worker_cpu(service) - workers0
    mb = sum(map(len, corpus)) / 1e6
    n = len(corpus)
    return {"files_s": round(n / wall, 1), "mb_s": round(mb / wall, 2),
            "wall_s": round(wall, 3),
            # the gateway process plus its scan workers (the embedded engine's real cost)
            "avgate_cpu_ms_per_file": round((cpu + wcpu) * 1000 / n, 3),
            "avgate_loop_cpu_ms_per_file": round(cpu * 1000 / n, 3),
            "avgate_worker_cpu_ms_per_file": round(wcpu * 1000 / n, 3),
            "statuses": counts}


def worker_cpu(service: ScanService) -> float:
    """CPU seconds (user + system) used so far by the scan workers of ``service``."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for engine in service.engines:
        pool = getattr(engine, "_pool", None)
        for worker in list(getattr(pool, "_all", ())):
            try:
                stat = Path(f"/proc/{worker.pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def decomposition_cost(sample: bytes, rounds: int = 2000) -> float:
    from avgate.content import decompose

    limits = Limits()
    t0 = time.perf_counter()
    for _ in range(rounds):
        for _ in decompose(sample, limits):
            pass
    return (time.perf_counter() - t0) / rounds * 1e6  # µs


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hdb", type=int, default=100_000)
    ap.add_argument("--ndb", type=int, default=2_000)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--json", help="append the result record to this JSON-lines file")
    args = ap.parse_args()
    rng = random.Random(1)
    work = Path(tempfile.mkdtemp(prefix="avgate-bench-"))
    db = work / "db"
    (db).mkdir()
    from tests.clamd_daemon import write_signatures

    write_signatures(db)
    t0 = time.perf_counter()
    make_signatures(db, args.hdb, args.ndb, rng)
    corpus = make_corpus(args.files, rng)
    print(f"generated {args.hdb} hdb + {args.ndb} ndb signatures and {len(corpus)} objects "
          f"({sum(map(len, corpus)) / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")

    record: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(),
                    "machine": platform.machine(), "hdb": args.hdb, "ndb": args.ndb,
                    "files": len(corpus), "command": " ".join(sys.argv)}
    cfg = from_dict({"scan": {"cache": False},
                     "engines": [{"type": "embedded", "signatures": [str(db)]}]})
    emb = ScanService.from_config(cfg)
    t0 = time.perf_counter()
    await emb.start()
    record["embedded_load_s"] = round(time.perf_counter() - t0, 2)
    print(f"embedded: loaded in {record['embedded_load_s']}s")
    for c in (1, 16):
        record[f"embedded_c{c}"] = await run_engine(emb, corpus, c)
        print(f"embedded C={c}: {record[f'embedded_c{c}']}")
    await emb.close()

    binary = find_clamd()
    if binary is None:
        print("clamd not installed: no comparison")
    else:
        daemon = ClamdDaemon(binary, workdir=str(work / "clamd"))
        daemon.db_dir = db
        t0 = time.perf_counter()
        daemon.start(timeout=300)
        record["clamd_load_s"] = round(time.perf_counter() - t0, 2)
        try:
            cfg = from_dict({"scan": {"cache": False},
                             "engines": [{"type": "clamd", "servers": [daemon.tcp]}]})
            cl = ScanService.from_config(cfg)
            await cl.start()
            for c in (1, 16):
                record[f"clamd_c{c}"] = await run_engine(cl, corpus, c)
                print(f"clamd C={c}: {record[f'clamd_c{c}']}")
            await cl.close()
        finally:
            daemon.cleanup()
        for c in (1, 16):
            e, k = record[f"embedded_c{c}"]["files_s"], record[f"clamd_c{c}"]["files_s"]
            record[f"ratio_c{c}"] = round(e / k, 2)
            print(f"ratio embedded/clamd at C={c}: {record[f'ratio_c{c}']}")
    record["decompose_us_per_20k_mime"] = round(decomposition_cost(corpus[1]), 1)
    print(f"decomposition of one ~20 KB MIME message: {record['decompose_us_per_20k_mime']} µs")
    if args.json:
        with open(args.json, "a") as f:  # noqa: ASYNC230 - one line at the end of a benchmark
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
