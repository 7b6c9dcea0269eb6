"""Shared helpers for the side-by-side benchmark (`bench/run.py`, `bench/report.py`).

Everything here targets 127.0.0.1 only, and every process started here is stopped again by
PID (the peer kit's ``stop.sh`` for peers, :meth:`Avgate.stop` for ``avgate serve``).

Paths
    ``PEERS_DIR``  the shared peer kit (read-only for us: its scripts are called with
                   ``RUN_DIR`` pointing into our own ``bench/run/peers``)
    ``RUN_DIR``    ``bench/run`` (git-ignored): generated avgate configs, logs, pid files
    ``RESULTS``    ``bench/results`` (committed): one directory per bench session with the raw
                   JSON lines that BENCHMARKS.md is generated from
"""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RUN_DIR = BENCH / "run"
PEER_RUN = RUN_DIR / "peers"
RESULTS = BENCH / "results"
PEERS_DIR = Path(os.environ.get("AVGATE_PEERS_DIR", ROOT.parent / "shared" / "peers")).resolve()
LOADGEN = PEERS_DIR / "loadgen.py"
VENV_BIN = Path(sys.executable).parent
AVGATE = VENV_BIN / "avgate"

# the peer kit's defaults (common.sh)
CLAMD_PORT = 13310
SINK_PORT = 10030
CLAMSMTP_PORT = 10025
AMAVIS_PORT = 10024
MILTER_PORT = 10032
CICAP_PORT = 11344
# avgate's benchmark listeners
AVGATE_SMTP = 10045
AVGATE_MILTER = 10047
AVGATE_ICAP = 10049
AVGATE_CLAMD = 10051
AVGATE_HTTP = 10053

#: Debian packages the peer kit needs (its install.sh list, without its .venv step: the kit's
#: directory is read-only for us and the sink needs only the stdlib).
PEER_DEBS = ("clamav-daemon", "clamsmtp", "amavisd-new", "clamav-milter", "c-icap",
             "libc-icap-mod-virus-scan", "miltertest", "swaks", "libnet-patricia-perl",
             "altermime")

CLAMD_SOCK = PEER_RUN / "clamd.sock"


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    mem_kib = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return {"cores": os.cpu_count(), "cpu_model": model, "mem_gib": round(mem_kib / 1048576, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "hostname": platform.node(), "loadavg_at_start": [round(x, 2) for x in load]}


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for pkg in ("clamav-daemon", "clamsmtp", "amavisd-new", "clamav-milter", "c-icap",
                "libc-icap-mod-virus-scan"):
        try:
            v = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            v = ""
        out[pkg] = v or "not installed"
    try:
        v = subprocess.run([sys.executable, "-c", "import avgate; print(avgate.__version__)"],
                           capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        v = ""
    out["avgate"] = v or "?"
    try:
        out["avgate_git"] = subprocess.run(["git", "-C", str(ROOT), "describe", "--always",
                                            "--dirty"], capture_output=True, text=True,
                                           timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


# ----------------------------------------------------------------------------- processes
def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def read_pid(name: str) -> int:
    try:
        return int((PEER_RUN / f"{name}.pid").read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def kit_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["RUN_DIR"] = str(PEER_RUN)
    env.update(extra)
    return env


def kit(script: str, *args: str, timeout: float = 120, check: bool = True,
        **extra: str) -> bool:
    """Run one of the peer kit's scripts with RUN_DIR = bench/run/peers."""
    PEER_RUN.mkdir(parents=True, exist_ok=True)
    cmd = [str(PEERS_DIR / script), *args]
    try:
        p = subprocess.run(cmd, env=kit_env(**extra), capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        say(f"{script} {' '.join(args)}: timed out after {timeout:g}s")
        if check:
            raise
        return False
    out = (p.stdout + p.stderr).strip()
    if out:
        for line in out.splitlines():
            say(f"  {script}: {line}")
    if p.returncode and check:
        raise RuntimeError(f"{script} {' '.join(args)} failed (exit {p.returncode})")
    return p.returncode == 0


def stop_kit(*names: str) -> None:
    kit("stop.sh", *names, timeout=60, check=False)


def wait_port(port: int, timeout: float = 20) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def port_free(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


def missing_debs() -> list[str]:
    missing = []
    for p in PEER_DEBS:
        try:
            r = subprocess.run(["dpkg", "-s", p], capture_output=True)
        except OSError:  # no dpkg (a non-Debian host: bench/device/run-matrix.sh)
            return list(PEER_DEBS)
        if r.returncode:
            missing.append(p)
    return missing


def install_peers() -> list[str]:
    """apt-get install the peers that are missing (root only); returns what is still missing."""
    missing = missing_debs()
    if not missing:
        return []
    if os.geteuid() != 0:
        say(f"not root: cannot install {' '.join(missing)}; those peers will be skipped")
        return missing
    say(f"installing Debian packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    created = False
    policy = Path("/usr/sbin/policy-rc.d")
    if not policy.exists():  # keep package scripts from starting daemons (as install.sh does)
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        created = True
    try:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                       env=env, capture_output=True, timeout=900)
    finally:
        if created:
            policy.unlink(missing_ok=True)
    return missing_debs()


# ----------------------------------------------------------------------------- clamd
def start_clamd() -> int:
    """The kit's clamd (two test signatures) with RUN_DIR = bench/run/peers; returns its PID."""
    pid = read_pid("clamd")
    if pid and pid_alive(pid):
        return pid
    if not port_free(CLAMD_PORT):
        raise RuntimeError(f"127.0.0.1:{CLAMD_PORT} is already in use (a clamd not started by "
                           "this bench?); stop it first")
    kit("start-clamd.sh", timeout=180)
    for _ in range(100):
        if CLAMD_SOCK.exists():
            break
        time.sleep(0.1)
    return read_pid("clamd")


def stop_clamd() -> None:
    stop_kit("clamd")


# ----------------------------------------------------------------------------- memory
def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM / VmSize in KiB and Threads, from /proc/PID/status."""
    out: dict[str, int] = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "VmSize", "Threads"):
                out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    """``pid`` and every live descendant (from /proc; workers, if any)."""
    children: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            s = open(f"/proc/{p}/stat").read()
        except OSError:
            continue
        ppid = int(s[s.rfind(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(p))
    out, todo, seen = [], [pid], set()
    while todo:
        x = todo.pop()
        if x in seen:
            continue
        seen.add(x)
        out.append(x)
        todo.extend(children.get(x, []))
    return out


def tree_rss_kib(pid: int) -> int:
    """VmRSS of pid plus its descendants (workers, if any)."""
    return sum(proc_status(x).get("VmRSS", 0) for x in _tree(pid))


CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """utime + stime (seconds) of ``pid`` and every live descendant, from /proc/PID/stat."""
    total = 0
    for x in _tree(pid):
        try:
            fields = Path(f"/proc/{x}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICK


# ----------------------------------------------------------------------------- avgate serve
@dataclass
class Avgate:
    """One ``avgate serve --config FILE`` process."""

    name: str
    config: Path
    proc: subprocess.Popen[bytes] | None = None
    out_path: Path | None = None
    listening: dict[str, list[str]] = field(default_factory=dict)
    unavailable: list[str] = field(default_factory=list)
    output: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def start(self, timeout: float = 90) -> bool:
        """Start; True once it printed ``avgate: serving``. Front-ends opened → ``listening``."""
        self.out_path = RUN_DIR / f"{self.name}.out"
        out = open(self.out_path, "wb")
        self.proc = subprocess.Popen([str(AVGATE), "serve", "--config", str(self.config)],
                                     stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     cwd=str(RUN_DIR))
        out.close()
        end = time.monotonic() + timeout
        ok = False
        while time.monotonic() < end:
            text = self.out_path.read_text(errors="replace")
            if "avgate: serving" in text:
                ok = True
                break
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.output = self.out_path.read_text(errors="replace")
        for m in re.finditer(r"^avgate: (\w+): listening on (.*)$", self.output, re.M):
            self.listening.setdefault(m.group(1), []).append(m.group(2).strip())
        self.unavailable = re.findall(r"^avgate: (\w+): front-end not available", self.output,
                                      re.M)
        if not ok:
            self.stop()
        return ok

    def stop(self, timeout: float = 20) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
        except OSError:
            pass


def write_toml(path: Path, tables: list[tuple[str, dict[str, Any]]]) -> None:
    """Minimal TOML writer: [name] / [[name]] tables of str, int, float, bool, list[str]."""
    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return str(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return json.dumps(str(v))

    lines = []
    for name, table in tables:
        lines.append(f"\n{name}")
        lines.extend(f"{k} = {val(v)}" for k, v in table.items())
    path.write_text("# generated by bench/run.py — do not edit\n" + "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- loadgen
@dataclass
class LoadArgs:
    n: int
    max_seconds: float
    warmup: int = 20
    eicar_every: int = 10
    marker_every: int = 10
    timeout: float = 60

    def common(self) -> list[str]:
        return ["-n", str(self.n), "--max-seconds", str(self.max_seconds),
                "--warmup", str(self.warmup), "--eicar-every", str(self.eicar_every),
                "--marker-every", str(self.marker_every), "--timeout", str(self.timeout)]


def warmup_kinds(la: LoadArgs) -> dict[str, int]:
    """Kinds of the warm-up messages (loadgen's build_corpus rule), for sink accounting."""
    k = {"clean": 0, "eicar": 0, "marker": 0}
    for i in range(la.warmup):
        if la.eicar_every and i % la.eicar_every == la.eicar_every - 1:
            k["eicar"] += 1
        elif la.marker_every and i % la.marker_every == la.marker_every - 2:
            k["marker"] += 1
        else:
            k["clean"] += 1
    return k


def loadgen(mode: str, target: list[str], la: LoadArgs, concurrency: int, label: str,
            watch: dict[str, int], extra: list[str] | None = None) -> dict[str, Any] | None:
    """One bounded loadgen run; returns its JSON record (None if it failed)."""
    tmp = RUN_DIR / "loadgen-last.jsonl"
    tmp.unlink(missing_ok=True)
    w = ",".join(f"{k}={v}" for k, v in watch.items() if v)
    cmd = [sys.executable, str(LOADGEN), mode, *target, *la.common(), "-c", str(concurrency),
           "--label", label, "--json", str(tmp), *(extra or [])]
    if w:
        cmd += ["--watch", w]
    limit = la.max_seconds + la.timeout + 120
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        say(f"loadgen {label} C={concurrency}: killed after {limit:g}s")
        return None
    first = p.stdout.strip().splitlines()[:1]
    if first:
        say("  " + first[0])
    if p.returncode or not tmp.exists():
        say(f"loadgen {label} failed (exit {p.returncode}): {p.stderr.strip()[-500:]}")
        return None
    rec: dict[str, Any] = json.loads(tmp.read_text().strip().splitlines()[-1])
    rec["command"] = " ".join(cmd[1:]).replace(str(ROOT) + "/", "")
    return rec
