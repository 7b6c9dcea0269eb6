"""The `avgate` console script as users run it: scan, selftest, config."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.clamd_daemon import EICAR_NAME
from tests.corpus import EICAR
from tests.helpers import require_binary

AVGATE = [sys.executable, "-m", "avgate.cli"]


def run(*args: str, cwd: Path | None = None, env: dict | None = None,
        stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if k != "AVGATE_CONFIG"}
    e.update(env or {})
    return subprocess.run([*AVGATE, *args], cwd=cwd, env=e, input=stdin, capture_output=True,
                          timeout=60)


def text(p: subprocess.CompletedProcess) -> str:
    return p.stdout.decode() if isinstance(p.stdout, bytes) else p.stdout


def test_scan_eicar_without_config(tmp_path):
    (tmp_path / "eicar.com").write_bytes(EICAR)
    p = run("scan", "eicar.com", cwd=tmp_path)
    assert p.returncode == 1, p.stderr
    assert text(p).splitlines()[0] == "eicar.com: Eicar-Test-Signature FOUND"
    assert "Infected files: 1" in text(p)


def test_scan_directory_json_and_exit_codes(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_bytes(b"hello\n")
    (d / "sub" / "b.txt").write_bytes(b"world\n")
    p = run("scan", "--json", str(d))
    assert p.returncode == 0
    rows = [json.loads(line) for line in text(p).splitlines()]
    assert sorted(Path(r["path"]).name for r in rows) == ["a.txt", "b.txt"]
    assert all(r["status"] == "clean" and len(r["sha256"]) == 64 for r in rows)
    (d / "sub" / "eicar.com").write_bytes(EICAR)
    p = run("scan", "--json", str(d))
    assert p.returncode == 1
    infected = [json.loads(x) for x in text(p).splitlines() if '"infected"' in x]
    assert [r["findings"][0]["name"] for r in infected if r["infected"]] == [
        "Eicar-Test-Signature"]


def test_scan_stdin_and_missing_file(tmp_path):
    p = run("scan", "-", stdin=EICAR)
    assert p.returncode == 1 and "stdin: Eicar-Test-Signature FOUND" in text(p)
    p = run("scan", str(tmp_path / "nope"))
    assert p.returncode == 2 and "No such file or directory ERROR" in text(p)


def test_selftest_default_config():
    p = run("selftest")
    assert p.returncode == 0, text(p)
    assert "selftest: passed" in text(p)
    assert text(p).count("ok  ") == 4


def test_selftest_with_clamd_engine(tmp_path, clamd):
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[[engines]]\ntype = "embedded"\n\n[[engines]]\ntype = "clamd"\n'
                   f'servers = ["{clamd.tcp}", "{clamd.unix}"]\n')
    p = run("selftest", "--config", str(cfg))
    assert p.returncode == 0, text(p)
    out = text(p)
    assert out.count("ok  ") == 8 and "Eicar-Test-Signature.UNOFFICIAL" in out


def test_selftest_fails_when_clamd_down(tmp_path):
    cfg = tmp_path / "a.toml"
    cfg.write_text('[[engines]]\ntype = "clamd"\nservers = ["tcp://127.0.0.1:1"]\n'
                   'connect_timeout = 0.5\n')
    p = run("selftest", "--config", str(cfg))
    assert p.returncode == 1 and "FAIL" in text(p)


def test_scan_with_indimail_qhpsi_command_line(tmp_path, clamd_alive):
    """IndiMail's QHPSI line, `%s` and all, runs as the command engine (issue 13): real
    clamdscan against the test clamd."""
    clamdscan = require_binary("clamdscan", "clamdscan")
    cfg = tmp_path / "a.toml"
    cfg.write_text('[[engines]]\ntype = "command"\n'
                   f'command = "{clamdscan} %s --quiet --no-summary '
                   f'--config-file={clamd_alive.config_path}"\n')
    (tmp_path / "eicar.com").write_bytes(EICAR)
    (tmp_path / "clean.txt").write_bytes(b"hello\n")
    p = run("scan", "--config", str(cfg), "eicar.com", "clean.txt", cwd=tmp_path)
    assert p.returncode == 1, text(p) + p.stderr.decode()
    # --quiet keeps clamdscan from printing the name: the exit code alone says infected
    assert [line for line in text(p).splitlines() if line.endswith(" FOUND")] == [
        "eicar.com: Unknown.Virus FOUND"]
    assert "Infected files: 1" in text(p) and "Errors: 0" in text(p)
    # without --quiet the name comes through
    cfg.write_text(cfg.read_text().replace(" --quiet", ""))
    p = run("scan", "--config", str(cfg), "eicar.com", cwd=tmp_path)
    assert p.returncode == 1 and f"eicar.com: {EICAR_NAME} FOUND" in text(p)


def test_config_check_and_show(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[scan]\nmode = "sometimes"\n')
    p = run("config", "check", str(bad))
    assert p.returncode == 1 and "scan.mode (line 2)" in text(p)
    good = tmp_path / "good.toml"
    good.write_text('[icap]\nlisten = "127.0.0.1:11344"\n')
    p = run("config", "check", str(good))
    assert p.returncode == 0
    p = run("config", "show", "--config", str(good))
    assert p.returncode == 0 and 'listen = "127.0.0.1:11344"' in text(p)
    assert "[http]" not in text(p)
    p = run("config", "show", env={"AVGATE_CONFIG": str(good)})
    assert 'listen = "127.0.0.1:11344"' in text(p)
    unplaced = tmp_path / "unplaced.toml"
    unplaced.write_text('[[smtp.listeners]]\nlisten = "127.0.0.1:10025"\n')
    p = run("config", "check", str(unplaced))
    assert p.returncode == 0 and "WARNING: smtp listener 'smtp' has no `mode`" in text(p)
    assert "OK" in text(p)


@pytest.mark.parametrize("args", [["scan", "x"], ["selftest"], ["config", "show"]])
def test_bad_config_file_is_a_clear_error(tmp_path, args):
    bad = tmp_path / "bad.toml"
    bad.write_text("[scan\n")
    p = run(*args, "--config", str(bad))
    assert p.returncode == 2 and "invalid TOML" in p.stderr.decode()
