"""`make bench`: every side-by-side comparison in one session, then BENCHMARKS.md.

    .venv/bin/python bench/run.py [--quick] [--only smtp,milter,icap,clamd,engines,memory,workers]
                                  [--runs 3] [-n 2000] [--max-seconds 45] [--clamd unix|tcp]
                                  [--big-mib 256] [--workers 1,2] [--workers-concurrency 64]
                                  [--before SESSION] [--carry SESSION ...] [--no-report]

One clamd (the peer kit's ``start-clamd.sh``: two test signatures, EICAR by hash and the body
marker) serves every system. The peers are started with the kit's scripts, one at a time, with
``RUN_DIR=bench/run/peers``; avgate runs as ``avgate serve --config bench/run/avgate-bench.toml``
with one ``clamd`` engine on the same clamd and the same transport the peers use (``--clamd``,
default the unix socket). Every load run is the kit's ``loadgen.py`` with the same flags
(``-n N --max-seconds MAXS --warmup 20 --eicar-every 10 --marker-every 10 --timeout 60``), at
C=1 and C=16, RUNS times; peer and avgate runs alternate (peer run r, avgate run r, ...) so
background noise hits both. Raw records go to ``bench/results/<session>/`` (JSON lines);
``bench/report.py`` turns them into BENCHMARKS.md.

Groups (``--only``):
  smtp     avgate SMTP (127.0.0.1:10045 -> sink) vs clamsmtp and amavisd-new (-> sink);
           reference: loadgen straight into the sink
  milter   avgate milter vs clamav-milter, over TCP and over a unix socket
  icap     avgate ICAP (service avscan) vs c-icap virus_scan
  clamd    avgate's clamd-protocol listener vs raw clamd (zINSTREAM), unix and TCP
  engines  bench/engines.py (embedded vs clamd on one generated signature set)
  http_proxy  bench/http_proxy.py (avgate's HTTP proxy vs Squid + c-icap, same clamd; memory
           during a large download)
  mailproxy   bench/mailproxy.py (POP3/IMAP through avgate vs straight from Dovecot)
  ftp      bench/ftp.py (FTP proxy vs direct to pyftpdlib: MB/s, CPU s/GiB, RSS during 1 GiB)
  decompose  bench/decompose.py (decomposition µs per object per format, worst cases)
  scaleout   bench/scaleout.py (store scans on 1/2/4 Dask workers; quarantine writes, file
           store vs PostgreSQL)
  sigdb    bench/sigdb.py (load time and memory of a ClamAV-sized database)
  memory   RSS of a fresh `avgate serve`: idle, 1,000 idle SMTP connections, large transfers
  workers  `[serve] workers = N` for N in --workers (default 1,2; the 16-core device script
           bench/device/run-matrix.sh passes 1,2,4,8,16): SMTP (-> sink) and ICAP at
           --workers-concurrency (default 64) plus --concurrency, correctness counted

After the runs bench/report.py writes BENCHMARKS.md and its charts (bench/figures/*.svg):
before/after against --before (default: the session named in bench/results/BASELINE), and for
a partial run (--only) the groups it did not run carried over from --carry sessions (default:
the sessions the current BENCHMARKS.md was made from), each section saying its session.

Everything runs on 127.0.0.1, every run is bounded (messages and seconds), and every process
started here is stopped again by PID, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C
from common import say

GROUPS = ("smtp", "milter", "icap", "clamd", "engines", "http_proxy", "mailproxy", "ftp",
          "decompose", "scaleout", "sigdb", "memory", "workers")
#: groups that run a standalone script of bench/ and keep what it prints (report: verbatim)
SCRIPTS: dict[str, tuple[list[str], list[str]]] = {  # name: (args, --quick args)
    "http_proxy": (["--runs", "1"], ["--quick"]),
    "mailproxy": (["-n", "300", "--runs", "3"], ["-n", "100", "--runs", "1"]),
    "sigdb": ([], ["--scale", "0.05"]),
    "ftp": (["--runs", "3"], ["--quick"]),
    "decompose": ([], ["--quick"]),
    "scaleout": (["-n", "2000", "--runs", "3"], ["-n", "300", "--runs", "1", "--records", "100"]),
}


class Session:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.id = time.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
        self.dir = C.RESULTS / self.id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.la = C.LoadArgs(n=args.n, max_seconds=args.max_seconds)
        self.clamd_pid = 0
        self.avgate: C.Avgate | None = None
        self.extra_avgate: list[C.Avgate] = []
        self.notes: list[str] = []
        self.meta: dict[str, Any] = {}

    # ------------------------------------------------------------------ records
    def record(self, name: str, rec: dict[str, Any]) -> None:
        with open(self.dir / f"{name}.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def note(self, text: str) -> None:
        say("NOTE: " + text)
        self.notes.append(text)

    def write_meta(self) -> None:
        (self.dir / "meta.json").write_text(json.dumps(self.meta | {"notes": self.notes},
                                                       indent=1) + "\n")

    # ------------------------------------------------------------------ avgate
    def engine_table(self) -> dict[str, Any]:
        if self.args.clamd == "tcp":
            server = f"tcp://127.0.0.1:{C.CLAMD_PORT}"
        else:
            server = f"unix:{C.CLAMD_SOCK}"
        return {"type": "clamd", "servers": [server]}

    def avgate_config(self, path: Path, sections: list[str], *,
                      milter_listen: str = f"127.0.0.1:{C.AVGATE_MILTER}",
                      big: int = 0, workers: int = 0) -> Path:
        tables: list[tuple[str, dict[str, Any]]] = [
            ("[scan]", {"cache": False}),
            ("[[engines]]", self.engine_table()),
            ("[log]", {"path": str(C.RUN_DIR / "avgate-scan.log")}),
            ("[quarantine]", {"path": str(C.RUN_DIR / "avgate-quarantine")}),
        ]
        if workers:
            tables.append(("[serve]", {"workers": workers}))
        if "smtp" in sections:
            smtp: dict[str, Any] = {"name": "bench", "listen": f"127.0.0.1:{C.AVGATE_SMTP}",
                                    "next_hop": f"127.0.0.1:{C.SINK_PORT}",
                                    "max_connections": 1100}
            if big:
                smtp["max_message_size"] = big
            tables.append(("[[smtp.listeners]]", smtp))
        if "milter" in sections:
            tables.append(("[milter]", {"listen": milter_listen}))
        if "icap" in sections:
            tables.append(("[icap]", {"listen": f"127.0.0.1:{C.AVGATE_ICAP}",
                                      "service": "avscan"}))
        if "clamd_listener" in sections:
            tables.append(("[clamd_listener]", {
                "listen": f"127.0.0.1:{C.AVGATE_CLAMD}",
                "unix_socket": str(C.RUN_DIR / "avgate-clamd.sock")}))
        if "http" in sections:
            http: dict[str, Any] = {"listen": f"127.0.0.1:{C.AVGATE_HTTP}"}
            if big:
                http["max_upload_size"] = big
            tables.append(("[http]", http))
        C.write_toml(path, tables)
        return path

    def start_avgate(self, name: str, sections: list[str], probe: bool = True,
                     **kw: Any) -> C.Avgate | None:
        """Start `avgate serve` with ``sections``; a section whose front-end fails to start is
        dropped (each is then tried alone) so that the others can still be measured."""
        cfg = C.RUN_DIR / f"{name}.toml"
        av = C.Avgate(name, self.avgate_config(cfg, sections, **kw))
        say(f"starting avgate serve --config {cfg.relative_to(C.ROOT)} ({', '.join(sections)})")
        if av.start():
            self._say_avgate(av)
            return av
        tail = " | ".join(av.output.strip().splitlines()[-3:])
        self.note(f"`avgate serve` ({name}, {', '.join(sections)}) did not start: {tail}")
        if len(sections) == 1 or not probe:
            return None
        good = []
        for s in sections:
            probe = C.Avgate(f"{name}-probe-{s}",
                             self.avgate_config(C.RUN_DIR / f"{name}-probe-{s}.toml", [s], **kw))
            ok = probe.start()
            probe.stop()
            if ok:
                good.append(s)
            else:
                t = " | ".join(probe.output.strip().splitlines()[-2:])
                self.note(f"front-end section [{s}] makes `avgate serve` fail: {t}")
        if not good:
            return None
        av = C.Avgate(name, self.avgate_config(cfg, good, **kw))
        if av.start():
            self._say_avgate(av)
            return av
        return None

    def _say_avgate(self, av: C.Avgate) -> None:
        for k, v in av.listening.items():
            say(f"  avgate {k}: listening on {', '.join(v)}")
        for k in av.unavailable:
            say(f"  avgate {k}: front-end not available")

    def has(self, frontend: str) -> bool:
        return bool(self.avgate and frontend in self.avgate.listening)

    # ------------------------------------------------------------------ runs
    def run_pair(self, group: str, peer: dict[str, Any] | None,
                 ours: dict[str, Any] | None, concs: list[int]) -> None:
        """Alternate peer and avgate runs: for C, for r: peer r, avgate r."""
        pair = peer["name"] if peer else ""
        for c in concs:
            for r in range(1, self.args.runs + 1):
                for side in (peer, ours):
                    if side is None:
                        continue
                    rec = C.loadgen(side["mode"], side["target"], self.la, c,
                                    side["label"], side["watch"], side.get("extra"))
                    failed = rec is None or not rec["sent"] or all(
                        set(d) <= {"err"} for d in rec["replies"].values())
                    if failed and side["system"] == "avgate":
                        self.note(f"{side['label']} C={c} run {r}: no message answered; "
                                  "restarting that avgate serve (hung or crashed?)")
                        self.revive(side)
                    if rec is None:
                        self.note(f"{side['label']} C={c} run {r}: loadgen failed")
                        continue
                    rec.update(session=self.id, group=group, system=side["system"],
                               name=side["name"], transport=side["transport"],
                               clamd_transport=self.args.clamd, pair=pair, run=r,
                               warmup_kinds=C.warmup_kinds(self.la),
                               sink_checked=bool(side.get("sink")),
                               serve_workers=side.get("workers", 1))
                    self.record("loadgen", rec)

    def revive(self, side: dict[str, Any]) -> None:
        """Restart the avgate instance behind ``side`` (main or extra) and fix its watch PID."""
        pid = side["watch"].get("avgate")
        for av in [self.avgate, *self.extra_avgate]:
            if av is None or av.pid != pid:
                continue
            av.stop()
            new = C.Avgate(av.name, av.config)
            if new.start():
                self._say_avgate(new)
                side["watch"]["avgate"] = new.pid
                if av is self.avgate:
                    self.avgate = new
                else:
                    self.extra_avgate[self.extra_avgate.index(av)] = new
            else:
                self.note(f"{av.name}: restart failed")
            return

    def ours(self, name: str, mode: str, target: list[str], label: str, transport: str,
             pid: int | None = None, **kw: Any) -> dict[str, Any]:
        watch = {"avgate": pid or (self.avgate.pid if self.avgate else 0),
                 "clamd": self.clamd_pid}
        if kw.get("sink"):
            watch["sink"] = C.read_pid("sink")
        return {"system": "avgate", "name": name, "mode": mode, "target": target,
                "label": label, "transport": transport, "watch": watch, **kw}

    def peer(self, name: str, mode: str, target: list[str], label: str, transport: str,
             pidname: str | None, **kw: Any) -> dict[str, Any]:
        watch = {name: C.read_pid(pidname) if pidname else 0, "clamd": self.clamd_pid}
        if kw.get("sink"):
            watch["sink"] = C.read_pid("sink")
        return {"system": kw.pop("system", "peer"), "name": name, "mode": mode,
                "target": target, "label": label, "transport": transport, "watch": watch,
                **kw}

    def kit_env(self) -> dict[str, str]:
        t = self.args.clamd
        return {"CLAMSMTP_CLAMD": t, "AMAVIS_CLAMD": t, "MILTER_CLAMD": t, "CICAP_CLAMD": t}

    # ------------------------------------------------------------------ groups
    def group_smtp(self, concs: list[int]) -> None:
        env = self.kit_env()
        sink = ["--sink-stats", str(C.PEER_RUN / "sink-stats.json")]
        C.kit("start-sink.sh", "bench", **env)
        try:
            ours = None
            if self.has("smtp"):
                ours = self.ours("avgate", "smtp", ["--port", str(C.AVGATE_SMTP)],
                                 "avgate SMTP -> sink", "tcp", sink=True, extra=sink)
            else:
                self.note("avgate SMTP front-end not available: SMTP rows have peers only")
            for name, script, port, pidname, label in (
                    ("clamsmtp", "start-clamsmtp.sh", C.CLAMSMTP_PORT, "clamsmtp",
                     "clamsmtp -> sink"),
                    ("amavis", "start-amavis.sh", C.AMAVIS_PORT, "amavis",
                     "amavisd-new (max_servers 4) -> sink")):
                if not C.port_free(port):
                    self.note(f"port {port} busy: {name} skipped")
                    continue
                try:
                    C.kit(script, timeout=120, **env)
                except Exception as exc:
                    self.note(f"{name} did not start ({exc}): skipped")
                    C.stop_kit(pidname)
                    continue
                try:
                    p = self.peer(name, "smtp", ["--port", str(port)], label, "tcp", pidname,
                                  sink=True, extra=sink)
                    self.run_pair("smtp", p, ours, concs)
                finally:
                    C.stop_kit(pidname)
            ref = self.peer("sink-direct", "smtp", ["--port", str(C.SINK_PORT)],
                            "reference: loadgen -> sink directly", "tcp", "sink",
                            system="reference", sink=True, extra=sink)
            self.run_pair("smtp", ref, None, concs)
        finally:
            C.stop_kit("sink")

    def group_milter(self, concs: list[int]) -> None:
        env = self.kit_env()
        for transport in ("tcp", "unix"):
            ours = None
            extra_av: C.Avgate | None = None
            if transport == "tcp" and self.has("milter"):
                ours = self.ours("avgate", "milter", ["--port", str(C.AVGATE_MILTER)],
                                 "avgate milter, TCP", "tcp")
            elif transport == "unix" and self.has("milter"):
                sock = C.RUN_DIR / "avgate-milter.sock"
                extra_av = self.start_avgate("avgate-milter-unix", ["milter"],
                                             milter_listen=f"unix:{sock}")
                if extra_av and "milter" in extra_av.listening:
                    self.extra_avgate.append(extra_av)
                    ours = self.ours("avgate", "milter", ["--unix", str(sock)],
                                     "avgate milter, unix socket", "unix", pid=extra_av.pid)
                else:
                    self.note("avgate milter on a unix socket did not start: unix row peer only")
            else:
                self.note(f"avgate milter front-end not available: milter {transport} rows "
                          "have the peer only")
            try:
                C.kit("start-clamav-milter.sh", timeout=60,
                      MILTER_LISTEN="inet" if transport == "tcp" else "unix", **env)
            except Exception as exc:
                self.note(f"clamav-milter ({transport}) did not start ({exc}): skipped")
                C.stop_kit("clamav-milter")
                if extra_av:
                    extra_av.stop()
                continue
            try:
                target = (["--port", str(C.MILTER_PORT)] if transport == "tcp"
                          else ["--unix", str(C.PEER_RUN / "clamav-milter.sock")])
                p = self.peer("clamav-milter", "milter", target,
                              f"clamav-milter, {'TCP' if transport == 'tcp' else 'unix socket'}",
                              transport, "clamav-milter")
                self.run_pair("milter", p, ours, concs)
            finally:
                C.stop_kit("clamav-milter")
                if extra_av:
                    extra_av.stop()
                for av in self.extra_avgate:  # (a revived one replaced extra_av)
                    av.stop()
                self.extra_avgate.clear()

    def group_icap(self, concs: list[int]) -> None:
        ours = None
        if self.has("icap"):
            ours = self.ours("avgate", "icap", ["--port", str(C.AVGATE_ICAP),
                                                "--service", "avscan"],
                             "avgate ICAP (avscan)", "tcp")
        else:
            self.note("avgate ICAP front-end not available: ICAP rows have the peer only")
        try:
            C.kit("start-cicap.sh", timeout=60, **self.kit_env())
        except Exception as exc:
            self.note(f"c-icap did not start ({exc}): skipped")
            C.stop_kit("cicap")
            if ours:
                self.run_pair("icap", None, ours, concs)
            return
        try:
            p = self.peer("c-icap", "icap", ["--port", str(C.CICAP_PORT),
                                             "--service", "virus_scan"],
                          "c-icap virus_scan (clamd_mod)", "tcp", "cicap")
            self.run_pair("icap", p, ours, concs)
        finally:
            C.stop_kit("cicap")

    def group_clamd(self, concs: list[int]) -> None:
        have = self.has("clamd_listener")
        if not have:
            self.note("avgate clamd listener not available: raw clamd rows only")
        unix_sock = C.RUN_DIR / "avgate-clamd.sock"
        for transport in ("unix", "tcp"):
            raw_target = (["--unix", str(C.CLAMD_SOCK)] if transport == "unix"
                          else ["--port", str(C.CLAMD_PORT)])
            raw = self.peer("clamd", "clamd", raw_target,
                            f"raw clamd zINSTREAM, {transport}", transport, None)
            raw["watch"] = {"clamd": self.clamd_pid}
            ours = None
            if have:
                if transport == "unix" and not unix_sock.exists():
                    self.note("avgate clamd listener has no unix socket: unix row raw only")
                else:
                    tgt = (["--unix", str(unix_sock)] if transport == "unix"
                           else ["--port", str(C.AVGATE_CLAMD)])
                    ours = self.ours("avgate", "clamd", tgt,
                                     f"avgate clamd listener, {transport}", transport)
            self.run_pair("clamd", raw, ours, concs)

    def group_engines(self) -> None:
        a = self.args
        cmd = [sys.executable, str(C.BENCH / "engines.py"), "--json",
               str(self.dir / "engines.jsonl")]
        if a.quick:
            cmd += ["--hdb", "10000", "--ndb", "200", "--files", "1000"]
        say("engines: " + " ".join(cmd[1:]).replace(str(C.ROOT) + "/", ""))
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.engines_timeout,
                               cwd=str(C.ROOT))
        except subprocess.TimeoutExpired:
            self.note(f"bench/engines.py did not finish within {a.engines_timeout}s")
            return
        for line in p.stdout.strip().splitlines():
            say("  " + line)
        if p.returncode:
            self.note(f"bench/engines.py failed (exit {p.returncode}): "
                      + p.stderr.strip()[-400:])

    def group_script(self, name: str) -> None:
        """Run bench/<name>.py; its output goes to <session>/<name>.out for the report."""
        args, quick = SCRIPTS[name]
        cmd = [sys.executable, str(C.BENCH / f"{name}.py"), *(quick if self.args.quick
                                                            else args)]
        say(f"{name}: " + " ".join(cmd[1:]).replace(str(C.ROOT) + "/", ""))
        try:
            p = subprocess.run(cmd, capture_output=True, text=True,
                               timeout=self.args.engines_timeout, cwd=str(C.ROOT))
        except subprocess.TimeoutExpired:
            self.note(f"bench/{name}.py did not finish within {self.args.engines_timeout}s")
            return
        (self.dir / f"{name}.out").write_text(p.stdout)
        for line in p.stdout.strip().splitlines()[-20:]:
            say("  " + line)
        if p.returncode:
            self.note(f"bench/{name}.py failed (exit {p.returncode}): "
                      + p.stderr.strip()[-400:])

    # ------------------------------------------------------------------ memory
    def group_memory(self) -> None:
        big = self.args.big_mib * 1024 * 1024
        self.ensure_clamd()
        sections = ["smtp", "icap", "http"]
        C.kit("start-sink.sh", "memory")
        av = None
        try:
            av = self.start_avgate("avgate-memory", sections, big=big + (16 << 20))
            if av is None:
                self.note("memory: avgate serve did not start")
                return
            rec: dict[str, Any] = {"session": self.id, "big_bytes": big,
                                   "frontends": sorted(av.listening)}
            time.sleep(2)
            rec["idle"] = C.proc_status(av.pid)
            say(f"memory idle: {rec['idle']}")
            if "smtp" in av.listening:
                rec["smtp_1000_idle"] = self.idle_connections(av.pid, self.args.idle_conns)
                say(f"memory with idle SMTP connections: {rec['smtp_1000_idle']}")
            for fe, fn in (("icap", self.big_icap), ("smtp", self.big_smtp),
                           ("http", self.big_http)):
                if fe not in av.listening:
                    rec[f"big_{fe}"] = {"available": False}
                    continue
                try:
                    rec[f"big_{fe}"] = self.sampled(av.pid, lambda f=fn: f(big))
                except Exception as exc:
                    rec[f"big_{fe}"] = {"error": f"{type(exc).__name__}: {exc}"}
                say(f"memory during {big >> 20} MiB {fe} transfer: {rec[f'big_{fe}']}")
            rec["end"] = C.proc_status(av.pid)
            self.record("memory", rec)
        finally:
            if av:
                av.stop()
            C.stop_kit("sink")

    def idle_connections(self, pid: int, n: int) -> dict[str, Any]:
        socks: list[socket.socket] = []
        greeted = refused = 0
        t0 = time.monotonic()
        try:
            for _ in range(n):
                if time.monotonic() - t0 > 60:
                    break
                s = socket.create_connection(("127.0.0.1", C.AVGATE_SMTP), timeout=10)
                socks.append(s)
                try:
                    line = s.recv(512)
                except OSError:
                    line = b""
                if line.startswith(b"220"):
                    greeted += 1
                else:
                    refused += 1
            time.sleep(1.0)
            st = C.proc_status(pid)
        finally:
            for s in socks:
                with contextlib.suppress(OSError):
                    s.close()
        time.sleep(1.0)
        return {"opened": len(socks), "greeted_220": greeted, "not_greeted": refused,
                "open_s": round(time.monotonic() - t0, 2), **st,
                "after_close": C.proc_status(pid)}

    def sampled(self, pid: int, fn: Any) -> dict[str, Any]:
        """Run fn() while sampling VmRSS of pid every 20 ms; report the peak."""
        peak = [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], C.tree_rss_kib(pid))
                stop.wait(0.02)

        before = C.proc_status(pid)
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        t0 = time.monotonic()
        try:
            result = fn()
        finally:
            stop.set()
            t.join(5)
        return {"rss_before_kib": before.get("VmRSS"), "rss_peak_kib": peak[0],
                "hwm_after_kib": C.proc_status(pid).get("VmHWM"),
                "seconds": round(time.monotonic() - t0, 2), "reply": result}

    @staticmethod
    def _body_chunk() -> bytes:
        # 1 MiB of printable lines (998 chars + CRLF), different per run, nothing to detect
        rnd = os.urandom(768 * 1024).hex().encode()[: 1 << 20]
        lines = [rnd[i:i + 998] for i in range(0, len(rnd), 998)]
        return b"\r\n".join(lines)[: (1 << 20) - 2] + b"\r\n"

    def big_icap(self, size: int) -> str:
        chunk = self._body_chunk()
        n = size // len(chunk)
        total = n * len(chunk)
        req = b"GET http://files.example.test/big.bin HTTP/1.1\r\nHost: files.example.test\r\n\r\n"
        res = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
               b"Content-Length: %d\r\n\r\n" % total)
        head = (b"RESPMOD icap://127.0.0.1:%d/avscan ICAP/1.0\r\nHost: 127.0.0.1\r\n"
                b"Allow: 204\r\nEncapsulated: req-hdr=0, res-hdr=%d, res-body=%d\r\n\r\n"
                % (C.AVGATE_ICAP, len(req), len(req) + len(res)))
        s = socket.create_connection(("127.0.0.1", C.AVGATE_ICAP), timeout=300)
        err: list[BaseException] = []

        def send() -> None:
            try:
                s.sendall(head + req + res)
                for _ in range(n):
                    s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                s.sendall(b"0\r\n\r\n")
            except OSError as exc:
                err.append(exc)

        t = threading.Thread(target=send, daemon=True)
        t.start()
        f = s.makefile("rb")
        status = f.readline().decode("latin-1").strip()
        hdrs = []
        while True:
            line = f.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            hdrs.append(line.decode("latin-1").strip())
        t.join(300)
        s.close()
        inf = [h for h in hdrs if h.lower().startswith(("x-infection", "x-virus"))]
        return f"{status} {' '.join(inf)}".strip() + (f" (send: {err[0]})" if err else "")

    def big_smtp(self, size: int) -> str:
        chunk = self._body_chunk()
        n = size // len(chunk)
        s = socket.create_connection(("127.0.0.1", C.AVGATE_SMTP), timeout=300)
        f = s.makefile("rb")

        def reply() -> str:
            lines = []
            while True:
                line = f.readline().decode("latin-1")
                lines.append(line.strip())
                if len(line) < 4 or line[3] != "-":
                    return lines[-1]

        try:
            reply()
            for cmd in (b"EHLO bench.test", b"MAIL FROM:<big@bench.test>",
                        b"RCPT TO:<rcpt@example.test>", b"DATA"):
                s.sendall(cmd + b"\r\n")
                r = reply()
                if r[:1] not in ("2", "3"):
                    return f"{cmd.decode()}: {r}"
            s.sendall(b"From: big@bench.test\r\nTo: rcpt@example.test\r\nSubject: big\r\n"
                      b"Message-ID: <big-%d@bench.test>\r\n\r\n" % time.time_ns())
            for _ in range(n):
                s.sendall(chunk)
            s.sendall(b".\r\n")
            r = reply()
            s.sendall(b"QUIT\r\n")
            return r
        finally:
            s.close()

    def big_http(self, size: int) -> str:
        chunk = self._body_chunk()
        n = size // len(chunk)
        s = socket.create_connection(("127.0.0.1", C.AVGATE_HTTP), timeout=300)
        try:
            s.sendall(b"POST /v1/scan HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n"
                      b"Connection: close\r\n\r\n" % (n * len(chunk)))
            for _ in range(n):
                s.sendall(chunk)
            data = b""
            while len(data) < 65536:
                b = s.recv(65536)
                if not b:
                    break
                data += b
            head, _, body = data.partition(b"\r\n\r\n")
            return (head.split(b"\r\n", 1)[0] + b" " + body[:200]).decode("latin-1")
        finally:
            s.close()

    # ------------------------------------------------------------------ workers
    def group_workers(self, concs: list[int]) -> None:
        """``[serve] workers = N`` for each N of ``--workers``: SMTP (-> sink) and ICAP at the
        C of the other groups plus ``--workers-concurrency``; one fresh ``avgate serve`` per N,
        the same clamd and sink, correctness counted as in the other groups."""
        counts = self.args.workers
        wconcs = sorted(set(concs) | set(self.args.workers_concurrency))
        self.ensure_clamd()
        C.kit("start-sink.sh", "workers")
        sink = ["--sink-stats", str(C.PEER_RUN / "sink-stats.json")]
        try:
            for w in counts:
                rec: dict[str, Any] = {"session": self.id, "workers": w,
                                       "cores": os.cpu_count(), "concurrency": wconcs}
                av = self.start_avgate(f"avgate-workers{w}", ["smtp", "icap"], probe=False,
                                       workers=w)
                if av is None:
                    rec.update(available=False, reason=self.notes[-1] if self.notes else "")
                    self.record("workers", rec)
                    continue
                self.extra_avgate.append(av)
                try:
                    time.sleep(1)  # let every worker bind (SO_REUSEPORT) before the load
                    procs = C._tree(av.pid)
                    rec.update(available=True, processes=len(procs),
                               config=av.config.read_text())
                    say(f"workers = {w}: {len(procs)} processes (serve workers + scan workers)")
                    for fe, mode, tgt, extra in (
                            ("SMTP", "smtp", ["--port", str(C.AVGATE_SMTP)], sink),
                            ("ICAP", "icap", ["--port", str(C.AVGATE_ICAP),
                                              "--service", "avscan"], [])):
                        ours = self.ours(f"avgate-workers{w}", mode, tgt,
                                         f"avgate {fe}, workers = {w}", "tcp", pid=av.pid,
                                         sink=mode == "smtp", extra=extra, workers=w)
                        self.run_pair("workers", None, ours, wconcs)
                finally:
                    for a in self.extra_avgate:  # (a revived one replaced av)
                        a.stop()
                    self.extra_avgate.clear()
                self.record("workers", rec)
        finally:
            C.stop_kit("sink")

    def ensure_clamd(self) -> None:
        """The session's clamd is still there (a group script may have stopped it)."""
        if not (self.clamd_pid and C.pid_alive(self.clamd_pid)):
            if self.clamd_pid:
                self.note(f"clamd (pid {self.clamd_pid}) was gone: started it again")
            self.clamd_pid = C.start_clamd()

    @staticmethod
    def _tree(pid: int) -> list[int]:
        kids: dict[int, list[int]] = {}
        for p in os.listdir("/proc"):
            if p.isdigit():
                with contextlib.suppress(OSError):
                    s = open(f"/proc/{p}/stat").read()
                    kids.setdefault(int(s[s.rfind(")") + 2:].split()[1]), []).append(int(p))
        out, todo = [], [pid]
        while todo:
            x = todo.pop()
            out.append(x)
            todo.extend(kids.get(x, []))
        return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: --runs 1 -n 300 --max-seconds 15, small engine bench, "
                         "64 MiB large transfers")
    ap.add_argument("--only", default=",".join(GROUPS),
                    help=f"comma-separated groups (default all: {','.join(GROUPS)})")
    ap.add_argument("--runs", type=int, default=None, help="runs per C (default 3)")
    ap.add_argument("-n", type=int, default=None, help="messages per run (default 2000)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="seconds per run cap (default 45)")
    ap.add_argument("--concurrency", default="1,16", help="comma-separated (default 1,16)")
    ap.add_argument("--clamd", choices=("unix", "tcp"), default="unix",
                    help="how avgate and the peers reach clamd (default unix)")
    ap.add_argument("--big-mib", type=int, default=None,
                    help="size of the large-transfer memory test (default 256, quick 64)")
    ap.add_argument("--idle-conns", type=int, default=1000)
    ap.add_argument("--engines-timeout", type=int, default=900)
    ap.add_argument("--no-install", action="store_true", help="do not apt-get missing peers")
    ap.add_argument("--workers", default="1,2",
                    help="`[serve] workers` counts of the workers group (default 1,2)")
    ap.add_argument("--workers-concurrency", default="64",
                    help="C of the workers group, besides --concurrency (default 64)")
    ap.add_argument("--before", default=None,
                    help="report: the session to compare with (default: bench/results/BASELINE)")
    ap.add_argument("--carry", action="append", default=None, metavar="SESSION",
                    help="report: take the groups this run did not run from SESSION (repeatable;"
                         " default for a partial run: the sessions of the current BENCHMARKS.md)")
    ap.add_argument("--no-report", action="store_true", help="do not regenerate BENCHMARKS.md")
    a = ap.parse_args(argv)
    q = a.quick
    a.runs = a.runs or (1 if q else 3)
    a.n = a.n or (300 if q else 2000)
    a.max_seconds = a.max_seconds or (15.0 if q else 45.0)
    a.big_mib = a.big_mib or (64 if q else 256)
    only = [g.strip() for g in a.only.split(",") if g.strip()]
    bad = set(only) - set(GROUPS)
    if bad:
        ap.error(f"unknown group(s): {', '.join(sorted(bad))}")
    a.only = [g for g in GROUPS if g in only]  # memory/workers restart avgate: they go last
    try:
        a.workers = [int(x) for x in a.workers.split(",") if x.strip()]
        a.workers_concurrency = [int(x) for x in a.workers_concurrency.split(",") if x.strip()]
    except ValueError:
        ap.error("--workers and --workers-concurrency take comma-separated integers")
    if not a.workers or min(a.workers) < 1 or min(a.workers_concurrency, default=1) < 1:
        ap.error("--workers and --workers-concurrency take positive integers")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    C.RUN_DIR.mkdir(parents=True, exist_ok=True)
    C.PEER_RUN.mkdir(parents=True, exist_ok=True)
    if not C.LOADGEN.exists():
        print(f"bench: peer kit not found at {C.PEERS_DIR} (set AVGATE_PEERS_DIR)",
              file=sys.stderr)
        return 2
    sess = Session(args)
    started = time.time()
    cmd = " ".join([".venv/bin/python bench/run.py", *map(shlex.quote, sys.argv[1:])])
    if argv is None and os.environ.get("MAKELEVEL"):
        cmd = "make bench" + (f" BENCH_ARGS={shlex.quote(shlex.join(sys.argv[1:]))}"
                              if sys.argv[1:] else "")
    sess.meta = {"session": sess.id, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                 "command": cmd, "machine": C.machine_info(), "quick": args.quick,
                 "runs": args.runs, "n": args.n, "max_seconds": args.max_seconds,
                 "concurrency": args.concurrency, "clamd_transport": args.clamd,
                 "groups": args.only, "loadgen_flags": " ".join(sess.la.common()),
                 "big_mib": args.big_mib, "workers": args.workers,
                 "workers_concurrency": args.workers_concurrency}
    say(f"session {sess.id}: results in {sess.dir.relative_to(C.ROOT)}")
    concs = [int(x) for x in args.concurrency.split(",")]
    try:
        missing = [] if args.no_install else C.install_peers()
        if args.no_install:
            missing = C.missing_debs()
        if missing:
            sess.note(f"Debian packages missing: {' '.join(missing)}")
        sess.meta["versions"] = C.versions()
        load_groups = [g for g in args.only if g in ("smtp", "milter", "icap", "clamd")]
        if load_groups or "memory" in args.only or "workers" in args.only:
            sess.clamd_pid = C.start_clamd()
            say(f"clamd pid {sess.clamd_pid}")
        if load_groups:
            sections = ["smtp", "milter", "icap", "clamd_listener"]
            sess.avgate = sess.start_avgate("avgate-bench", sections)
            if sess.avgate is None:
                sess.note("avgate serve did not start: only peers are measured")
            else:
                sess.meta["avgate_listening"] = sess.avgate.listening
                sess.meta["avgate_unavailable"] = sess.avgate.unavailable
                sess.meta["avgate_config"] = sess.avgate.config.read_text()
            sess.write_meta()
        for g in args.only:
            say(f"=== {g}")
            t0 = time.time()
            try:
                if g == "smtp":
                    sess.group_smtp(concs)
                elif g == "milter":
                    sess.group_milter(concs)
                elif g == "icap":
                    sess.group_icap(concs)
                elif g == "clamd":
                    sess.group_clamd(concs)
                elif g == "engines":
                    sess.group_engines()
                elif g in SCRIPTS:
                    sess.group_script(g)
                elif g == "memory":
                    if sess.avgate:  # its ports are needed by the fresh instance
                        sess.avgate.stop()
                        sess.avgate = None
                    sess.group_memory()
                elif g == "workers":
                    if sess.avgate:
                        sess.avgate.stop()
                        sess.avgate = None
                    sess.group_workers(concs)
            except Exception as exc:
                sess.note(f"group {g} failed: {type(exc).__name__}: {exc}")
            say(f"=== {g} took {time.time() - t0:.0f}s")
    except KeyboardInterrupt:
        sess.note("interrupted")
    finally:
        if sess.avgate:
            sess.avgate.stop()
        for av in sess.extra_avgate:
            av.stop()
        C.stop_kit("clamsmtp", "amavis", "clamav-milter", "cicap", "sink")
        C.stop_clamd()
        sess.meta["duration_s"] = round(time.time() - started)
        sess.meta["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        sess.write_meta()
    if not args.no_report:
        import report

        rargs = [str(sess.dir)]
        if args.before:
            rargs += ["--before", args.before]
        for c in args.carry or []:
            rargs += ["--carry", c]
        report.main(rargs)
    say(f"done in {time.time() - started:.0f}s; raw results in {sess.dir.relative_to(C.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
