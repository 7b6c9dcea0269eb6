"""FTP proxy benchmark: MB/s of downloads (RETR) and uploads (STOR) through avgate's
``[ftp_proxy]`` vs straight to the FTP server, avgate's CPU seconds per GiB moved, and the RSS
growth of the ``avgate serve`` process tree during one large download.

    .venv/bin/python bench/ftp.py [--runs 3] [--small-count 16] [--big-mib 1024]
                                  [--max-file-mib 128] [--max-scan-mib N]
                                  [--worker-memory-mib N] [--quick] [--out FILE]

The FTP server is pyftpdlib (the test suite's server, tests/integration/proxies/
test_ftp_proxy.py) run as its own process (``python -m pyftpdlib``, async, one user with a
password) on 127.0.0.1 over ``bench/run/ftp/home``: a 1 MiB and a 64 MiB file of random bytes
and a sparse ``--big-mib`` file (reads as zeros). ``avgate serve`` runs only ``[ftp_proxy]``
in front of it with the default embedded engine (its built-in signatures) and the verdict
cache off, so every transfer is scanned again. The client is Python ftplib (passive mode,
256 KiB blocks, the data counted and dropped), the same for both sides; each run does, for
each size, direct then through avgate: RETR (1 MiB: ``--small-count`` files in one session)
and STOR of the same bytes (deleted again afterwards).

What is scanned: ``[limits] max_file_size`` is raised to ``--max-file-mib`` (128 MiB; avgate's
default 25 MiB would skip the 64 MiB file), so the 1 MiB and 64 MiB objects are scanned whole,
downloads (keep-back trickling, the default) and uploads (spooled and scanned before they
reach the server). The big download is over ``max_scan_size`` (100 MiB by default): it is
spooled and relayed but no engine reads it (status ``skipped``, size limit; the default policy
passes it with a tag). ``--max-scan-mib``/``--max-file-mib`` above it include the scan, which
also needs ``--worker-memory-mib`` above the object (the embedded engine's scan worker reads
the object into memory; with the default 1 GiB budget a 1 GiB object is refused as a
structural limit). Every row names the scan log's verdicts and the final reply.

Memory: VmRSS of ``avgate serve`` and its descendants (the scan workers), sampled every 0.1 s;
growth = peak during the big download - RSS just before it (the goal is < 64 MiB). CPU:
utime + stime of the same process tree (/proc/PID/stat) over the proxied transfers, per GiB
(2^30 bytes) moved. MB/s = 10^6 bytes per second of wall time from the command to its final
reply (for STOR through avgate: spooling, scanning and forwarding to the server).

One JSON line per measurement goes to stderr (and ``--out``); stdout gets only the Markdown
tables (what `make bench` shows). Everything
listens on 127.0.0.1; pyftpdlib and avgate are stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import ftplib
import importlib.util
import io
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common as C  # noqa: E402
from tests.integration.avgate_proc import AvgateServe  # noqa: E402

WORK = C.RUN_DIR / "ftp"
USER, PASSWORD = "bench", "ftp-bench-pass"
MiB = 1 << 20
BLOCK = 256 * 1024


# ------------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def ftp_server(home: Path) -> Iterator[int]:
    """pyftpdlib in its own process on 127.0.0.1; yields its port; stopped by PID."""
    port = free_port()
    log = open(WORK / "pyftpdlib.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pyftpdlib", "-i", "127.0.0.1", "-p",
                             str(port), "-d", str(home), "-w", "-u", USER, "-P", PASSWORD],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    try:
        if not C.wait_port(port, 20):
            raise RuntimeError("pyftpdlib did not start (see bench/run/ftp/pyftpdlib.log)")
        yield port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@contextmanager
def avgate_serve(cfg: Path) -> Iterator[AvgateServe]:
    """``avgate serve --config cfg`` (90 s to start on a busy machine); stopped by PID."""
    serve = AvgateServe(cfg).start(timeout=90)
    try:
        yield serve
    finally:
        serve.stop()


# ------------------------------------------------------------------------------- the client
def session(port: int) -> ftplib.FTP:
    ftp = ftplib.FTP()  # noqa: S321 - plain FTP is what the proxy speaks
    ftp.connect("127.0.0.1", port, timeout=120)
    ftp.login(USER, PASSWORD)
    ftp.set_pasv(True)
    return ftp


def retr(port: int, name: str, count: int = 1) -> tuple[int, float, str]:
    """RETR ``name`` ``count`` times in one session: (bytes, seconds, last final reply)."""
    with session(port) as ftp:
        size = 0

        def sink(data: bytes) -> None:
            nonlocal size
            size += len(data)

        t0 = time.perf_counter()
        reply = ""
        for _ in range(count):
            try:
                reply = ftp.retrbinary(f"RETR {name}", sink, blocksize=BLOCK)
            except ftplib.Error as exc:
                reply = str(exc)
        return size, time.perf_counter() - t0, reply.split("\n")[0][:120]


def stor(port: int, name: str, data: bytes, count: int = 1) -> tuple[int, float, str]:
    """STOR ``data`` as ``name`` ``count`` times, then DELE it: (bytes, seconds, reply)."""
    with session(port) as ftp:
        t0 = time.perf_counter()
        reply = ""
        for _ in range(count):
            try:
                reply = ftp.storbinary(f"STOR {name}", io.BytesIO(data), blocksize=BLOCK)
            except ftplib.Error as exc:
                reply = str(exc)
        elapsed = time.perf_counter() - t0
        try:
            ftp.delete(name)
        except ftplib.Error:
            pass
        return len(data) * count, elapsed, reply.split("\n")[0][:120]


# ------------------------------------------------------------------------------- the files
def corpus(big_mib: int) -> dict[str, Path]:
    home = WORK / "home"
    home.mkdir(parents=True, exist_ok=True)
    rng = random.Random(15)
    files = {}
    for name, size in (("1MiB.bin", MiB), ("64MiB.bin", 64 * MiB)):
        path = home / name
        if not path.exists() or path.stat().st_size != size:
            path.write_bytes(rng.randbytes(size))
        files[name] = path
    big = home / "big.bin"
    if not big.exists() or big.stat().st_size != big_mib * MiB:
        with open(big, "wb") as f:  # sparse: costs no disk, reads as zeros
            f.truncate(big_mib * MiB)
    files["big.bin"] = big
    for stale in home.glob("up-*"):
        stale.unlink()
    return files


def scan_log_tail(path: Path, after: int) -> list[dict[str, Any]]:
    """The scan log's JSON records written after byte ``after``."""
    try:
        with open(path, "rb") as f:
            f.seek(after)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def big_download(serve_pid: int, port: int, big_mib: int) -> dict[str, Any]:
    before = C.tree_rss_kib(serve_pid)
    peak, samples = before, 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, samples
        while not done.is_set():
            peak = max(peak, C.tree_rss_kib(serve_pid))
            samples += 1
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu0 = C.tree_cpu(serve_pid)
    try:
        size, seconds, reply = retr(port, "big.bin")
    finally:
        done.set()
        sampler.join()
    cpu = C.tree_cpu(serve_pid) - cpu0
    return {"what": "big_download", "big_mib": big_mib, "bytes": size,
            "seconds": round(seconds, 2), "mb_s": round(size / seconds / 1e6, 1),
            "reply": reply, "avgate_cpu_s_per_gib": round(cpu / (size / 2**30), 2)
            if size else None,
            "rss_before_mib": round(before / 1024, 1), "rss_peak_mib": round(peak / 1024, 1),
            "growth_mib": round((peak - before) / 1024, 1), "rss_samples": samples}


# ------------------------------------------------------------------------------- session
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--small-count", type=int, default=16,
                    help="1 MiB transfers per run and direction (one session)")
    ap.add_argument("--big-mib", type=int, default=1024, help="the memory-test download")
    ap.add_argument("--max-scan-mib", type=int, default=0,
                    help="set [limits] max_scan_size (default: avgate's, 100 MiB)")
    ap.add_argument("--max-file-mib", type=int, default=128,
                    help="[limits] max_file_size (avgate's default 25 MiB would skip the "
                         "64 MiB file; 0: keep avgate's default)")
    ap.add_argument("--worker-memory-mib", type=int, default=0,
                    help="[scan] worker_memory (default: avgate's, 1 GiB; a scan of a 1 GiB "
                         "object needs more)")
    ap.add_argument("--quick", action="store_true",
                    help="--runs 1 --small-count 8 --big-mib 128")
    ap.add_argument("--out", type=Path, help="append the JSON lines here too")
    args = ap.parse_args(argv)
    if importlib.util.find_spec("pyftpdlib") is None:
        print("bench/ftp.py: pyftpdlib is missing (the test extra: "
              ".venv/bin/pip install -e '.[test]')", file=sys.stderr)
        return 2
    if args.quick:
        args.runs, args.small_count, args.big_mib = 1, 8, 128
    WORK.mkdir(parents=True, exist_ok=True)
    files = corpus(args.big_mib)
    payload = {name: files[name].read_bytes() for name in ("1MiB.bin", "64MiB.bin")}
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        line = json.dumps(row)
        print(line, file=sys.stderr, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(line + "\n")

    scan_log = WORK / "scan.log"
    limits_set = {k: f"{v} MiB" for k, v in (("max_scan_size", args.max_scan_mib),
                                             ("max_file_size", args.max_file_mib)) if v}
    limits = "[limits]\n" + "".join(f'{k} = "{v}"\n' for k, v in limits_set.items()) \
        if limits_set else ""
    worker_memory = f'worker_memory = "{args.worker_memory_mib} MiB"\n' \
        if args.worker_memory_mib else ""
    if args.worker_memory_mib:
        limits_set["worker_memory ([scan])"] = f"{args.worker_memory_mib} MiB"
    with ftp_server(files["1MiB.bin"].parent) as server_port:
        cfg = WORK / "avgate-ftp.toml"
        cfg.write_text(f"""# generated by bench/ftp.py
[scan]
cache = false
{worker_memory}{limits}[log]
path = "{scan_log}"
[quarantine]
path = "{WORK / 'quarantine'}"
[ftp_proxy]
listen = "127.0.0.1:0"
server = "127.0.0.1:{server_port}"
data_timeout = 120
max_upload_size = "2 GiB"
""")
        with avgate_serve(cfg) as serve:
            assert serve.proc is not None
            pid = serve.proc.pid
            proxy_port = serve.port("ftp_proxy")
            print(f"bench/ftp.py: pyftpdlib on :{server_port}, avgate ftp_proxy on "
                  f":{proxy_port} (pid {pid})", file=sys.stderr, flush=True)
            retr(proxy_port, "1MiB.bin", 2)  # warm-up: scan workers, page cache
            stor(proxy_port, "up-warm.bin", payload["1MiB.bin"])
            for run in range(1, args.runs + 1):
                for name, count in (("1MiB.bin", args.small_count), ("64MiB.bin", 1)):
                    for op in ("RETR", "STOR"):
                        res: dict[str, tuple[int, float, str]] = {}
                        cpu = 0.0
                        log_at = scan_log.stat().st_size if scan_log.exists() else 0
                        for side, port in (("direct", server_port), ("avgate", proxy_port)):
                            cpu0 = C.tree_cpu(pid)
                            if op == "RETR":
                                res[side] = retr(port, name, count)
                            else:
                                res[side] = stor(port, f"up-{name}", payload[name], count)
                            if side == "avgate":
                                cpu = C.tree_cpu(pid) - cpu0
                        statuses = sorted({str(r.get("status", r.get("result", "?")))
                                           for r in scan_log_tail(scan_log, log_at)})
                        size = res["avgate"][0]
                        emit({"what": op, "file": name, "run": run, "transfers": count,
                              "bytes": size,
                              "direct_mb_s": round(res["direct"][0] / res["direct"][1] / 1e6,
                                                   1),
                              "avgate_mb_s": round(size / res["avgate"][1] / 1e6, 1),
                              "avgate_cpu_s_per_gib": round(cpu / (size / 2**30), 2)
                              if size else None,
                              "direct_reply": res["direct"][2],
                              "avgate_reply": res["avgate"][2], "scan_status": statuses})
            log_at = scan_log.stat().st_size if scan_log.exists() else 0
            big = big_download(pid, proxy_port, args.big_mib)
            big["scan_status"] = sorted({str(r.get("status", r.get("result", "?")))
                                         for r in scan_log_tail(scan_log, log_at)})
            big["limits"] = limits_set or "avgate's defaults"
            size, seconds, _ = retr(server_port, "big.bin")
            big["direct_mb_s"] = round(size / seconds / 1e6, 1)
            emit(big)
    shown = ", ".join(f"{k} = {v}" for k, v in limits_set.items()) or "none"
    print(f"Set for this run: {shown}; everything else avgate's defaults (max_scan_size "
          "100 MiB, max_file_size 25 MiB, worker_memory 1 GiB); embedded engine, cache off. "
          "MB/s = 10^6 bytes/s of wall time; CPU = utime+stime of avgate serve + scan workers "
          "per GiB moved through it.")
    print("\n| transfer | runs | direct MB/s (median) | through avgate MB/s (median) | "
          "avgate CPU s/GiB (median) | scan verdicts | avgate reply |")
    print("|---|---|---|---|---|---|---|")
    for op in ("RETR", "STOR"):
        for name in ("1MiB.bin", "64MiB.bin"):
            sel = [r for r in rows if r["what"] == op and r["file"] == name]
            if not sel:
                continue
            label = (f"{op} {name.removesuffix('.bin')}"
                     + (f" x{sel[0]['transfers']}" if sel[0]["transfers"] > 1 else ""))
            med = {k: statistics.median(r[k] for r in sel) for k in
                   ("direct_mb_s", "avgate_mb_s", "avgate_cpu_s_per_gib")}
            verdicts = ", ".join(sorted({s for r in sel for s in r["scan_status"]}))
            print(f"| {label} | {len(sel)} | {med['direct_mb_s']} | {med['avgate_mb_s']} | "
                  f"{med['avgate_cpu_s_per_gib']} | {verdicts} | {sel[-1]['avgate_reply']} |")
    big = rows[-1]
    print("\n| one big download (RSS: avgate serve + scan workers) | direct MB/s | "
          "through avgate MB/s | avgate CPU s/GiB | RSS before MiB | RSS peak MiB | "
          "growth MiB (goal < 64) | scan verdict | avgate reply |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| RETR {big['big_mib']} MiB (sparse, zeros) | {big['direct_mb_s']} | {big['mb_s']} | "
          f"{big['avgate_cpu_s_per_gib']} | {big['rss_before_mib']} | {big['rss_peak_mib']} | "
          f"{big['growth_mib']} | {', '.join(big['scan_status'])} | {big['reply']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
