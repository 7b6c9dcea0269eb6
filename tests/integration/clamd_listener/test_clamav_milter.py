"""Real clamav-milter using avgate's clamd listener as its clamd, driven by a milter client
(the shared load generator's milter mode: one milter conversation per message, no MTA)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import require_binary

from .conftest import ClamdListenerEnv

# the peer kit lives in shared/ beside the project checkout
_ROOT = Path(__file__).resolve().parents[3]
LOADGEN = next((p for p in (_ROOT.parent / "shared" / "peers" / "loadgen.py",
                            Path("/work/shared/peers/loadgen.py")) if p.exists()),
               _ROOT.parent / "shared" / "peers" / "loadgen.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def clamav_milter(clamd_listener: ClamdListenerEnv, tmp_path: Path) -> Iterator[int]:
    binary = require_binary("clamav-milter", "clamav-milter")
    port = _free_port()
    conf = tmp_path / "clamav-milter.conf"
    (tmp_path / "tmp").mkdir()
    conf.write_text(f"""MilterSocket inet:{port}@127.0.0.1
Foreground yes
PidFile {tmp_path}/clamav-milter.pid
ClamdSocket tcp:127.0.0.1:{clamd_listener.tcp_port}
OnClean Accept
OnInfected Reject
OnFail Defer
AddHeader Replace
ReadTimeout 30
TemporaryDirectory {tmp_path}/tmp
LogFile {tmp_path}/clamav-milter.log
LogInfected Basic
""")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("clamav-milter did not start: "
                                + (tmp_path / "clamav-milter.log").read_text(errors="replace")
                                if (tmp_path / "clamav-milter.log").exists() else "no log")
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_clamav_milter_rejects_eicar_and_accepts_clean(clamav_milter: int,
                                                      tmp_path: Path) -> None:
    if not LOADGEN.exists():
        pytest.skip(f"{LOADGEN} (shared load generator) not available")
    out = tmp_path / "loadgen.json"
    r = subprocess.run([sys.executable, str(LOADGEN), "milter", "--port", str(clamav_milter),
                        "-n", "20", "-c", "2", "--eicar-every", "5", "--warmup", "0",
                        "--max-seconds", "30", "--timeout", "20", "--json", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text().splitlines()[-1])
    assert rec["sent"] == 20
    # 4 of 20 carry EICAR (base64 attachment inside a MIME mail): every one rejected,
    # every clean one accepted with clamav-milter's Clean header
    assert rec["replies"] == {"clean": {"2xx": 16}, "eicar": {"5xx": 4}}, rec
    assert rec["flagged"]["eicar"] == 4
    assert "X-Virus-Status=Clean" in rec["samples"]["clean/2xx"]
    assert "Infected (Eicar-Test-Signature)" in rec["samples"]["eicar/5xx"]
