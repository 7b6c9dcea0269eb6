"""Real clamdscan against avgate's clamd-protocol listener.

clamdscan's exit codes (clamdscan(1)): 0 no virus found, 1 virus(es) found, 2 some error.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import require_binary

from .conftest import STREAM_MAX, ClamdListenerEnv


@pytest.fixture(scope="module")
def clamdscan() -> str:
    return require_binary("clamdscan", "clamdscan")


def run(clamdscan: str, conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([clamdscan, f"--config-file={conf}", "--no-summary", *args],
                          capture_output=True, text=True, timeout=30)


def test_stream_eicar_found(clamdscan: str, clamd_listener: ClamdListenerEnv) -> None:
    target = clamd_listener.allowed / "sub" / "eicar.com"
    r = run(clamdscan, clamd_listener.clamd_conf(), "--stream", str(target))
    assert r.returncode == 1, r
    assert r.stdout.strip() == f"{target}: Eicar-Test-Signature FOUND"


def test_stream_clean_ok(clamdscan: str, clamd_listener: ClamdListenerEnv) -> None:
    target = clamd_listener.allowed / "clean.txt"
    r = run(clamdscan, clamd_listener.clamd_conf(), "--stream", str(target))
    assert r.returncode == 0, r
    assert r.stdout.strip() == f"{target}: OK"


def test_stream_works_for_files_outside_allowed_paths(
        clamdscan: str, clamd_listener: ClamdListenerEnv) -> None:
    # with --stream clamdscan reads the file itself: allowed_paths does not apply
    target = clamd_listener.outside / "secret-eicar.com"
    r = run(clamdscan, clamd_listener.clamd_conf(), "--stream", str(target))
    assert r.returncode == 1 and "Eicar-Test-Signature FOUND" in r.stdout


def test_stream_over_stream_max_length_is_an_error(
        clamdscan: str, clamd_listener: ClamdListenerEnv, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"A" * (STREAM_MAX + 4096))
    r = run(clamdscan, clamd_listener.clamd_conf(), "--stream", str(big))
    assert r.returncode == 2, r
    assert "size limit exceeded" in (r.stdout + r.stderr)


def test_fdpass_on_unix_socket(clamdscan: str, clamd_listener: ClamdListenerEnv) -> None:
    eicar = clamd_listener.allowed / "sub" / "eicar.com"
    clean = clamd_listener.allowed / "clean.txt"
    conf = clamd_listener.clamd_conf(unix=True)
    r = run(clamdscan, conf, "--fdpass", str(eicar), str(clean))
    assert r.returncode == 1, r
    assert f"{eicar}: Eicar-Test-Signature FOUND" in r.stdout.splitlines()
    assert f"{clean}: OK" in r.stdout.splitlines()
    r = run(clamdscan, conf, "--fdpass", str(clean))
    assert (r.returncode, r.stdout.strip()) == (0, f"{clean}: OK")


def test_fdpass_reaches_files_outside_allowed_paths(
        clamdscan: str, clamd_listener: ClamdListenerEnv) -> None:
    # the client opened the file: passing a descriptor is not a path the server resolves
    target = clamd_listener.outside / "secret-eicar.com"
    r = run(clamdscan, clamd_listener.clamd_conf(unix=True), "--fdpass", str(target))
    assert r.returncode == 1 and "Eicar-Test-Signature FOUND" in r.stdout


@pytest.mark.parametrize("mode", [[], ["-m"], ["--allmatch"]],
                         ids=["contscan", "multiscan", "allmatchscan"])
def test_path_scan_of_allowed_directory(clamdscan: str, clamd_listener: ClamdListenerEnv,
                                        mode: list[str]) -> None:
    r = run(clamdscan, clamd_listener.clamd_conf(), *mode, str(clamd_listener.allowed))
    assert r.returncode == 1, r
    lines = r.stdout.splitlines()
    assert f"{clamd_listener.allowed}/sub/eicar.com: Eicar-Test-Signature FOUND" in lines
    # symlinks out of the allowed directory are not followed
    assert not any("secret" in line or "link-out" in line for line in lines), lines


def test_path_scan_of_clean_file(clamdscan: str, clamd_listener: ClamdListenerEnv) -> None:
    target = clamd_listener.allowed / "clean.txt"
    r = run(clamdscan, clamd_listener.clamd_conf(), str(target))
    assert (r.returncode, r.stdout.strip()) == (0, f"{target}: OK")


@pytest.mark.parametrize("relative", [
    "outside/secret-eicar.com",            # plainly outside
    "allowed/../outside/secret-eicar.com",  # .. escape
    "allowed/dirlink-out/secret-eicar.com",  # through a directory symlink
])
def test_path_scan_outside_allowed_paths_is_denied(
        clamdscan: str, clamd_listener: ClamdListenerEnv, relative: str) -> None:
    # (a symlink given as the argument itself is skipped by clamdscan without asking the
    # server; test_protocol.py sends that case over the wire)
    target = f"{clamd_listener.root}/{relative}"
    r = run(clamdscan, clamd_listener.clamd_conf(), target)
    assert r.returncode == 2, r
    assert "Access denied. ERROR" in r.stdout + r.stderr
    assert "FOUND" not in r.stdout


def test_version_and_ping(clamdscan: str, clamd_listener: ClamdListenerEnv) -> None:
    r = run(clamdscan, clamd_listener.clamd_conf(), "-V")
    assert r.returncode == 0
    assert re.fullmatch(r"avgate \d+\.\d+\.\d+\S*/\d+/\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}",
                        r.stdout.strip()), r.stdout
    r = run(clamdscan, clamd_listener.clamd_conf(), "--ping", "1")
    assert (r.returncode, r.stdout.strip()) == (0, "PONG")


def test_unreachable_listener_is_exit_2(clamdscan: str, clamd_listener: ClamdListenerEnv,
                                        tmp_path: Path) -> None:
    conf = tmp_path / "dead.conf"
    conf.write_text(f"LocalSocket {tmp_path}/nobody.sock\n")
    r = run(clamdscan, conf, "--stream", str(clamd_listener.allowed / "clean.txt"))
    assert r.returncode == 2
