"""CommandEngine with a Python script as scanner: exit codes, names, injection, timeout."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from avgate import config
from avgate.engines.base import EngineContext, build_engine
from avgate.engines.command import UNKNOWN_VIRUS, CommandEngine, CommandEngineSettings
from avgate.errors import ConfigError
from avgate.result import ScanStatus
from avgate.spool import Spool

pytestmark = pytest.mark.timeout(30)

CTX = EngineContext()

# The scanner reads the file it was given and acts on its content, clamscan-style.
SCANNER = r'''
import os, sys, time
path = next(a for a in reversed(sys.argv[1:]) if not a.startswith("-"))
data = open(path, "rb").read()
if data.startswith(b"SLEEP"):
    pid_file = data.split()[1].decode()
    child = os.fork()
    if child == 0:  # a grandchild in the same process group must die too
        time.sleep(60)
        os._exit(0)
    open(pid_file, "w").write(f"{os.getpid()} {child}")
    time.sleep(60)
if data.startswith(b"VIRUS"):
    print(f"{path}: {data.split()[1].decode()} FOUND")
    sys.exit(1)
if data.startswith(b"NONAME"):
    sys.exit(1)
if data.startswith(b"FAIL"):
    print("ERROR: can't open database", file=sys.stderr)
    sys.exit(2)
print(f"{path}: OK")
sys.exit(0)
'''


@pytest.fixture(scope="module")
def scanner(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("scanner") / "scanner.py"
    path.write_text(SCANNER)
    return str(path)


def make(scanner: str, **table: Any) -> CommandEngine:
    table.setdefault("command", f"{sys.executable} {scanner} --no-summary {{path}}")
    eng = build_engine(CommandEngineSettings(name="cmd", **table), CTX)
    assert isinstance(eng, CommandEngine)
    return eng


async def scan(eng: CommandEngine, data: bytes) -> Any:
    spool = Spool.from_bytes(data)
    try:
        return await eng.scan(spool)
    finally:
        spool.close()


async def test_clean(scanner: str) -> None:
    result = await scan(make(scanner), b"hello")
    assert result.status is ScanStatus.CLEAN and not result.findings


async def test_infected_with_name_from_stdout(scanner: str) -> None:
    result = await scan(make(scanner), b"VIRUS Win.Test.Thing-42")
    assert result.status is ScanStatus.INFECTED
    assert [(f.name, f.engine) for f in result.findings] == [("Win.Test.Thing-42", "cmd")]


async def test_infected_without_a_name(scanner: str) -> None:
    result = await scan(make(scanner), b"NONAME")
    assert result.status is ScanStatus.INFECTED and result.virus == UNKNOWN_VIRUS


async def test_other_exit_is_an_error_with_stderr(scanner: str) -> None:
    result = await scan(make(scanner), b"FAIL")
    assert result.status is ScanStatus.ERROR
    assert "unexpected exit 2" in result.reason and "can't open database" in result.reason


async def test_configured_exit_codes(scanner: str) -> None:
    # QHPSI-style scanner where 1 means error and 2 means infected
    eng = make(scanner, clean_exit=[0], infected_exit=[2], error_exit=[1])
    assert (await scan(eng, b"FAIL")).status is ScanStatus.INFECTED
    result = await scan(eng, b"VIRUS X")
    assert result.status is ScanStatus.ERROR and "error exit 1" in result.reason


async def test_custom_virus_regex(scanner: str) -> None:
    eng = make(scanner, virus_regex=r"(?P<virus>Win\.\w+)")
    assert (await scan(eng, b"VIRUS Win.Test.Thing-42")).virus == "Win.Test"


async def test_missing_program_is_an_error() -> None:
    eng = build_engine(CommandEngineSettings(command="/nonexistent/scanner {path}"), CTX)
    result = await scan(eng, b"x")  # type: ignore[arg-type]
    assert result.status is ScanStatus.ERROR and "cannot run" in result.reason


EVIL_NAMES = [
    "$(touch {marker})", "; touch {marker}", "`touch {marker}`", "| touch {marker}",
    "&& touch {marker} #", "' ; touch {marker} '", '" ; touch {marker} "',
]


@pytest.mark.parametrize("evil", EVIL_NAMES)
async def test_file_names_cannot_inject(scanner: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch, evil: str) -> None:
    # a relative marker: an injected "touch" would create it in the scanner's cwd
    monkeypatch.chdir(tmp_path)
    marker = "pwned"
    name = tmp_path / evil.format(marker=marker)
    name.write_bytes(b"VIRUS Evil.Name")
    eng = make(scanner)
    argv = eng.argv_for(str(name))
    assert argv[-1] == str(name)  # one argv element, verbatim
    result = await eng.scan(Spool.from_path(name))
    assert result.status is ScanStatus.INFECTED and result.virus == "Evil.Name"
    assert not (tmp_path / marker).exists()


def test_the_evil_names_do_inject_through_a_shell(tmp_path: Path) -> None:
    """Control: the same names passed through a shell really would run code."""
    import subprocess

    name = EVIL_NAMES[0].format(marker="pwned")
    subprocess.run(f"true {name}", shell=True, cwd=tmp_path, check=False)  # noqa: S602
    assert (tmp_path / "pwned").exists()


def test_placeholder_is_replaced_inside_its_argument_only(scanner: str) -> None:
    eng = make(scanner, command="scan --file={path} --opt '{literal braces}'")
    assert eng.argv_for("/tmp/a b;c") == ["scan", "--file=/tmp/a b;c", "--opt",
                                          "{literal braces}"]
    # relative names become absolute: "-rf" can never be read as an option
    assert eng.argv_for("-rf")[1] == f"--file={os.getcwd()}/-rf"


async def test_timeout_kills_the_process_group(scanner: str, tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    eng = make(scanner, timeout=1)
    start = time.monotonic()
    result = await scan(eng, b"SLEEP " + str(pid_file).encode())
    assert result.status is ScanStatus.ERROR and "killed" in result.reason
    assert time.monotonic() - start < 5
    pids = [int(p) for p in pid_file.read_text().split()]
    for pid in pids:  # scanner and its grandchild are gone (reaped or killed)
        for _ in range(100):
            if not _alive(pid):
                break
            await asyncio.sleep(0.02)
        assert not _alive(pid), pid


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie is dead, awaiting its parent
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.parametrize(("table", "key"), [
    ({}, "command"),
    ({"command": "clamdscan --no-summary"}, r"\{path\}"),
    ({"command": "scan 'unbalanced {path}"}, "command"),
    ({"command": "s {path}", "infected_exit": "one"}, "infected_exit"),
    ({"command": "s {path}", "clean_exit": [0, 1]}, "both clean and infected"),
    ({"command": "s {path}", "virus_regex": "("}, "virus_regex"),
    ({"command": "s {path}", "timeout": -1}, "timeout"),
])
def test_config_errors_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key) as exc:
        config.from_dict({"engines": [{"type": "command", **table}]})
    assert str(exc.value).startswith("<config>: engines[0]")


def test_command_may_be_a_list() -> None:
    [settings] = config.from_dict({"engines": [
        {"type": "command", "command": ["scan", "--x", "{path}"]}]}).engines
    eng = build_engine(settings, CTX)
    assert isinstance(eng, CommandEngine) and eng.argv == ("scan", "--x", "{path}")


# -- issue 13: IndiMail's QHPSI form ----------------------------------------------------------
async def test_percent_s_is_the_path_placeholder_too(scanner: str) -> None:
    """QHPSI='/usr/bin/clamdscan %s --quiet --no-summary' copied as it is."""
    eng = make(scanner, command=f"{sys.executable} {scanner} %s --quiet --no-summary")
    assert eng.argv_for("/tmp/x")[2:] == ["/tmp/x", "--quiet", "--no-summary"]
    result = await scan(eng, b"VIRUS Win.Test.Qhpsi")
    assert result.status is ScanStatus.INFECTED and result.virus == "Win.Test.Qhpsi"
    assert (await scan(eng, b"hello")).status is ScanStatus.CLEAN


def test_placeholders_are_replaced_in_one_pass(scanner: str) -> None:
    eng = make(scanner, command="scan --file=%s {path}")
    # a path containing a placeholder is passed as it is, never substituted again
    assert eng.argv_for("/tmp/a%s{path}") == ["scan", "--file=/tmp/a%s{path}",
                                              "/tmp/a%s{path}"]


def test_config_accepts_percent_s() -> None:
    [settings] = config.from_dict({"engines": [
        {"type": "command", "command": "/usr/bin/clamdscan %s --quiet --no-summary"}]}).engines
    assert isinstance(settings, CommandEngineSettings)
    assert settings.command == ("/usr/bin/clamdscan", "%s", "--quiet", "--no-summary")
