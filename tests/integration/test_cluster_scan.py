"""``avgate scan --cluster``: a real Dask scheduler and two ``dask worker`` processes on
loopback scan a store; the report equals a local scan's, a worker SIGKILLed mid-run leaves a
complete, duplicate-free report, and paths the workers cannot see stop the scan up front."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.corpus import EICAR
from tests.helpers import wait_until
from tests.integration.avgate_proc import free_port

distributed = pytest.importorskip("distributed", reason="the cluster extra is not installed")

DASK = str(Path(sys.executable).with_name("dask"))
FILES = 120
INFECTED = {7, 42, 99}


@dataclass
class Cluster:
    address: str
    workers: list[subprocess.Popen[bytes]]


def _start(args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([DASK, *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _workers(address: str) -> int:
    with distributed.Client(address, timeout="5s") as client:
        return len(client.scheduler_info()["workers"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("dask")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = _start(["scheduler", "--host", "127.0.0.1", "--port", str(port),
                        "--no-dashboard"], root)
    workers = [_start(["worker", address, "--nthreads", "2", "--nworkers", "1",
                       "--no-dashboard", "--memory-limit", "0", "--name", f"w{i}",
                       "--host", "127.0.0.1"], root) for i in range(2)]
    try:
        assert wait_until(lambda: scheduler.poll() is None and _try_workers(address) == 2, 60)
        yield Cluster(address, workers)
    finally:
        for proc in [*workers, scheduler]:
            _stop(proc)


def _try_workers(address: str) -> int:
    try:
        return _workers(address)
    except OSError:
        return 0


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "store"
    for i in range(FILES):
        sub = data / f"d{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i}.bin").write_bytes(EICAR if i in INFECTED else f"clean {i}\n".encode())
    mbox = data / "mail.mbox"
    mbox.write_bytes(b"From a@example.test Mon Dec  1 10:00:00 2026\nSubject: one\n\nclean\n\n"
                     b"From b@example.test Mon Dec  1 10:01:00 2026\nSubject: two\n\n"
                     + EICAR + b"\n")
    cfg = tmp_path / "avgate.toml"
    cfg.write_text('[scan]\ncache = false\n')
    return cfg, data


def slow(cfg: Path) -> Path:
    """The same store's config with a slow second engine: the run lasts long enough to lose
    a worker in the middle of it."""
    out = cfg.with_name("slow.toml")
    out.write_text('[scan]\ncache = false\nmode = "all"\n[[engines]]\ntype = "embedded"\n'
                   '[[engines]]\ntype = "command"\nname = "slow"\n'
                   'command = ["sh", "-c", "sleep 0.3", "scan", "{path}"]\n')
    return out


AVGATE = str(Path(sys.executable).with_name("avgate"))


def _scan(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AVGATE, "scan", "--no-progress",
                           "--json", "-c", str(cfg), *args], capture_output=True, text=True,
                          timeout=300, check=False)


def _report(stdout: str) -> Counter[tuple[str, str]]:
    return Counter((r["path"], r["status"]) for r in map(json.loads, stdout.splitlines()))


def test_cluster_report_equals_local(cluster: Cluster, store: tuple[Path, Path]) -> None:
    cfg, data = store
    local = _scan(cfg, str(data))
    remote = _scan(cfg, "--cluster", cluster.address, "--partition", "10", str(data))
    assert local.returncode == remote.returncode == 1, remote.stderr
    assert _report(remote.stdout) == _report(local.stdout)
    report = _report(remote.stdout)
    assert sum(report.values()) == FILES + 2 and max(report.values()) == 1
    assert {p for (p, s) in report if s == "infected"} == {
        *(str(data / f"d{i % 4}" / f"f{i}.bin") for i in INFECTED), f"{data}/mail.mbox:2"}


def test_a_worker_killed_mid_run_loses_nothing(cluster: Cluster,
                                               store: tuple[Path, Path]) -> None:
    cfg, data = store
    cfg = slow(cfg)
    proc = subprocess.Popen([AVGATE, "scan", "--no-progress",
                             "--json", "-c", str(cfg), "--cluster", cluster.address,
                             "--partition", "2", str(data)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        lines.extend(proc.stdout)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert wait_until(lambda: len(lines) >= 10, 120)
    victim = cluster.workers[0]
    os.killpg(victim.pid, signal.SIGKILL)  # nanny and worker: gone without a goodbye
    assert proc.poll() is None and len(lines) < FILES + 2  # the kill landed mid-run
    victim.wait(10)
    assert proc.wait(240) == 1, proc.stderr.read() if proc.stderr else ""
    reader.join(10)
    report = _report("".join(lines))
    assert sum(report.values()) == FILES + 2 and max(report.values()) == 1
    assert sum(1 for (_, s) in report if s == "infected") == len(INFECTED) + 1
    assert all(s in ("clean", "infected") for (_, s) in report)


def test_paths_the_workers_cannot_see_stop_the_scan(cluster: Cluster, tmp_path: Path) -> None:
    # the surviving worker checks each path before anything is submitted
    cfg = tmp_path / "avgate.toml"
    cfg.write_text("[scan]\ncache = false\n")
    p = _scan(cfg, "--cluster", cluster.address, str(tmp_path / "nowhere"))
    assert p.returncode == 2 and "not on storage every worker sees" in p.stderr
    p = _scan(cfg, "--cluster", "tcp://127.0.0.1:9", str(tmp_path))
    assert p.returncode == 2 and "cannot reach the Dask scheduler" in p.stderr
