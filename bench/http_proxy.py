"""avgate's HTTP proxy vs Squid + c-icap (virus_scan), the same clamd behind both.

    .venv/bin/python bench/http_proxy.py [--quick] [-n 400] [--max-seconds 30] [--runs 1]
                                         [--big-mib 1024] [--no-install]

Origin: Debian's nginx on 127.0.0.1 serving a corpus of 20 objects from 20 KB to 5 MB
(log-spaced sizes, random bytes; every 10th request is EICAR) from ``bench/run/http-proxy``.
Systems, one at a time, C=1 and C=16, ``--runs`` times each, alternating:

* ``avgate``: ``avgate serve`` with only ``[http_proxy]`` on 127.0.0.1:10055, one ``clamd``
  engine on the peer kit's clamd (unix socket), trickling ``keep_back`` (the default);
* ``squid+c-icap``: Squid on 127.0.0.1:10056 (no cache) adapting RESPMOD through the peer
  kit's c-icap (``start-cicap.sh``: virus_scan, clamd_mod on the same clamd).

The client is this script (asyncio + h11, one keep-alive connection per worker), the same for
both, with a 15 s limit per request (a fetch that hangs counts as an error: Squid 5.7 with
c-icap stalls on objects over ~64 KiB, see issue 14): requests/s, p50/p99 latency, and CPU
ms per request of each system's process tree (/proc utime+stime: avgate with its scan
workers; Squid + c-icap together; clamd excluded for both). Memory: avgate's RSS before
and during one ``--big-mib`` download (over max_scan_size: streamed unscanned by policy) —
the goal is growth < 64 MiB.

Raw records: ``bench/results/http-proxy-<time>.jsonl``; a Markdown table is printed. Every
process started here is stopped by PID at the end. ``bench/run.py`` does not call this file
yet (it is owned elsewhere): run it on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h11

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C
from common import say

WORK = C.RUN_DIR / "http-proxy"
ORIGIN_PORT = 10054
AVGATE_PROXY = 10055
SQUID_PORT = 10056
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


# ------------------------------------------------------------------------------- the parts
def corpus() -> list[str]:
    """Write the objects; their names (the URL paths)."""
    www = WORK / "www"
    www.mkdir(parents=True, exist_ok=True)
    rng = random.Random(14)
    names = []
    for i in range(20):
        size = int(20_000 * math.exp(i * math.log(5_000_000 / 20_000) / 19))
        name = f"obj{i:02d}-{size}.bin"
        path = www / name
        if not path.exists() or path.stat().st_size != size:
            path.write_bytes(rng.randbytes(size))
        names.append(name)
    (www / "eicar.com").write_bytes(EICAR)
    return names


def start_nginx(big_mib: int) -> subprocess.Popen[bytes]:
    big = WORK / "www" / "big.bin"
    if not big.exists() or big.stat().st_size != big_mib << 20:
        with open(big, "wb") as f:  # sparse: costs no disk, reads as zeros
            f.truncate(big_mib << 20)
    conf = WORK / "nginx.conf"
    conf.write_text(f"""daemon off;
master_process off;
pid {WORK}/nginx.pid;
error_log {WORK}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {WORK}/body;
    proxy_temp_path {WORK}/proxy;
    fastcgi_temp_path {WORK}/fastcgi;
    uwsgi_temp_path {WORK}/uwsgi;
    scgi_temp_path {WORK}/scgi;
    types {{ application/octet-stream bin com; }}
    keepalive_requests 100000;
    server {{ listen 127.0.0.1:{ORIGIN_PORT}; root {WORK}/www; }}
}}
""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen([nginx, "-p", str(WORK), "-c", str(conf), "-e",
                             str(WORK / "nginx-error.log")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    if not C.wait_port(ORIGIN_PORT):
        raise RuntimeError("nginx did not start (see bench/run/http-proxy/nginx-error.log)")
    return proc


def start_avgate() -> C.Avgate:
    config = WORK / "avgate-proxy.toml"
    config.write_text(f"""[scan]
cache = false
[log]
path = "{WORK}/avgate-scan.log"
[quarantine]
path = "{WORK}/quarantine"
[[engines]]
type = "clamd"
name = "clamd"
servers = ["unix:{C.CLAMD_SOCK}"]
[http_proxy]
listen = "127.0.0.1:{AVGATE_PROXY}"
max_connections = 1024
""")
    av = C.Avgate("http-proxy", config)
    if not av.start():
        raise RuntimeError("avgate serve did not start:\n" + av.output)
    return av


def start_squid() -> subprocess.Popen[bytes]:
    squid = shutil.which("squid") or "/usr/sbin/squid"
    sdir = WORK / "squid"
    sdir.mkdir(parents=True, exist_ok=True)
    user = ""
    if os.geteuid() == 0:
        shutil.chown(sdir, "proxy", "proxy")
        user = "cache_effective_user proxy\n"
    conf = sdir / "squid.conf"
    conf.write_text(f"""http_port 127.0.0.1:{SQUID_PORT}
{user}pid_filename {sdir}/squid.pid
cache_log {sdir}/cache.log
access_log none
cache_store_log none
cache deny all
cache_mem 8 MB
coredump_dir {sdir}
acl localhost_src src 127.0.0.1/32
http_access allow localhost_src
http_access deny all
shutdown_lifetime 0 seconds
forwarded_for off
via off
icap_enable on
icap_preview_enable on
icap_service svc_resp respmod_precache bypass=0 icap://127.0.0.1:{C.CICAP_PORT}/avscan
adaptation_access svc_resp allow all
""")
    proc = subprocess.Popen([squid, "-N", "-f", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    if not C.wait_port(SQUID_PORT, 30):
        raise RuntimeError(f"squid did not start (see {sdir}/cache.log)")
    return proc


def stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(OSError):
        proc.send_signal(sig)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# ------------------------------------------------------------------------------- the client
class Client:
    """One keep-alive connection to a proxy, absolute-URI GETs, body counted and dropped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.conn = h11.Connection(h11.CLIENT)

    async def get(self, url: str) -> tuple[int, int]:
        if self.writer is None or self.conn.our_state is not h11.IDLE:
            await self.close()
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.conn = h11.Connection(h11.CLIENT)
        assert self.reader is not None and self.writer is not None
        self.writer.write(self.conn.send(h11.Request(method="GET", target=url,
                                                     headers=[("Host", "127.0.0.1")])))
        self.writer.write(self.conn.send(h11.EndOfMessage()))
        status, size = 0, 0
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.reader.read(1 << 16)
                self.conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        else:
            await self.close()
        return status, size

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.writer = None


async def load(port: int, urls: list[str], concurrency: int, max_seconds: float,
               per_request: float = 15) -> dict[str, Any]:
    queue = list(reversed(urls))
    lat: list[float] = []
    errors = blocked = 0
    deadline = time.monotonic() + max_seconds

    async def worker() -> None:
        nonlocal errors, blocked
        client = Client(port)
        try:
            while queue and time.monotonic() < deadline:
                url = queue.pop()
                t0 = time.perf_counter()
                try:
                    async with asyncio.timeout(per_request):
                        status, _ = await client.get(url)
                except (OSError, TimeoutError, h11.ProtocolError):
                    errors += 1
                    await client.close()
                    continue
                lat.append(time.perf_counter() - t0)
                if status == 403:
                    blocked += 1
                elif status != 200:
                    errors += 1
        finally:
            await client.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    lat.sort()
    return {"requests": len(lat), "wall_s": round(wall, 3), "errors": errors,
            "blocked": blocked, "rps": round(len(lat) / wall, 2) if wall else 0,
            "p50_ms": round(statistics.median(lat) * 1000, 2) if lat else None,
            "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2)
            if lat else None}


def tree_cpu(pids: list[int]) -> float:
    hz = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            s = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        rest = s[s.rfind(")") + 2:].split()
        stats[int(p)] = (int(rest[1]), sum(int(x) for x in rest[11:15]) / hz)
    total, todo, seen = 0.0, list(pids), set()
    while todo:
        x = todo.pop()
        if x in seen or x not in stats:
            continue
        seen.add(x)
        total += stats[x][1]
        todo.extend(pid for pid, (pp, _) in stats.items() if pp == x)
    return total


def measure(system: str, port: int, pids: list[int], names: list[str], n: int,
            concurrency: int, max_seconds: float) -> dict[str, Any]:
    base = f"http://127.0.0.1:{ORIGIN_PORT}/"
    urls = [base + ("eicar.com" if i % 10 == 9 else names[i % len(names)]) for i in range(n)]
    asyncio.run(load(port, urls[:20], concurrency, 30))  # warm-up
    cpu0 = tree_cpu(pids)
    rec = asyncio.run(load(port, urls, concurrency, max_seconds))
    cpu = tree_cpu(pids) - cpu0
    rec.update(system=system, concurrency=concurrency,
               cpu_ms_per_request=round(cpu * 1000 / rec["requests"], 2)
               if rec["requests"] else None)
    say(f"{system} C={concurrency}: {rec}")
    return rec


def big_download_memory(av: C.Avgate, big_mib: int) -> dict[str, Any]:
    before = C.tree_rss_kib(av.pid)
    peak = before
    done = False

    async def fetch() -> tuple[int, int]:
        nonlocal done
        try:
            return await Client(AVGATE_PROXY).get(f"http://127.0.0.1:{ORIGIN_PORT}/big.bin")
        finally:
            done = True

    async def main() -> tuple[int, int]:
        nonlocal peak
        task = asyncio.ensure_future(fetch())
        while not done:
            peak = max(peak, C.tree_rss_kib(av.pid))
            await asyncio.sleep(0.2)
        return await task

    t0 = time.perf_counter()
    status, size = asyncio.run(main())
    rec = {"system": "avgate", "big_mib": big_mib, "status": status, "bytes": size,
           "seconds": round(time.perf_counter() - t0, 2), "rss_before_mib": before // 1024,
           "rss_peak_mib": peak // 1024, "growth_mib": (peak - before) // 1024}
    say(f"big download: {rec}")
    return rec


# ------------------------------------------------------------------------------- session
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="-n 60, 10 s, 128 MiB big download")
    ap.add_argument("-n", type=int, default=400)
    ap.add_argument("--max-seconds", type=float, default=30.0)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--big-mib", type=int, default=1024)
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.max_seconds, args.big_mib = 60, 10.0, 128
    WORK.mkdir(parents=True, exist_ok=True)
    C.RESULTS.mkdir(parents=True, exist_ok=True)
    out = C.RESULTS / f"http-proxy-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    names = corpus()
    nginx = squid = None
    av: C.Avgate | None = None
    records: list[dict[str, Any]] = []
    # the bench session's clamd (run.py) may already run: stop it only if started here
    own_clamd = not (C.read_pid("clamd") and C.pid_alive(C.read_pid("clamd")))
    try:
        C.start_clamd()
        nginx = start_nginx(args.big_mib)
        av = start_avgate()
        C.kit("start-cicap.sh")
        squid = start_squid()
        cicap = C.read_pid("cicap")
        for run in range(args.runs):
            for concurrency in (1, 16):
                for system, port, pids in (("avgate", AVGATE_PROXY, [av.pid]),
                                           ("squid+c-icap", SQUID_PORT, [squid.pid, cicap])):
                    rec = measure(system, port, pids, names, args.n, concurrency,
                                  args.max_seconds)
                    rec["run"] = run
                    records.append(rec)
        records.append(big_download_memory(av, args.big_mib))
    finally:
        if av is not None:
            av.stop()
        stop(squid, signal.SIGINT)
        C.stop_kit("cicap")
        stop(nginx, signal.SIGQUIT)
        if own_clamd:
            C.stop_clamd()
        with open(out, "w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    say(f"records: {out}")
    print("| system | C | req/s | p50 ms | p99 ms | CPU ms/req | errors |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        if "rps" in r:
            print(f"| {r['system']} | {r['concurrency']} | {r['rps']} | {r['p50_ms']} | "
                  f"{r['p99_ms']} | {r['cpu_ms_per_request']} | {r['errors']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
