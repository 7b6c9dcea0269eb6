"""A fresh machine: `make test` installs every package the tests drive, a missing one stops the
run at its start with one line, and `make run` installs only what running needs (issue 13 §0).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from tests.helpers import (
    REQUIREMENTS,
    Requirement,
    find_binary,
    missing_message,
    missing_requirements,
    strict_dependencies,
)

ROOT = Path(__file__).resolve().parents[2]


def _test_debs() -> set[str]:
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    m = re.search(r"^TEST_DEBS\s*\??=(.*)$", text, re.MULTILINE)
    assert m, "TEST_DEBS not found in the Makefile"
    return set(m.group(1).split())


def test_every_required_package_is_installed_by_make_test() -> None:
    packages = {r.package for r in REQUIREMENTS}
    assert packages - _test_debs() == set()
    # and nothing is installed that no test needs
    assert _test_debs() - packages == set()


def test_every_binary_a_test_requires_is_listed() -> None:
    listed = {(r.name, r.package) for r in REQUIREMENTS if r.kind == "binary"}
    used: set[tuple[str, str]] = set()
    for path in (ROOT / "tests").rglob("*.py"):
        used |= set(re.findall(r'require_binary\(\s*"([^"]+)",\s*"([^"]+)"\)',
                               path.read_text()))
    assert used, "no require_binary calls found: the pattern above is out of date"
    assert used - listed == set()


def test_missing_pieces_are_named_with_their_package_in_one_line() -> None:
    env = {"PATH": "/nonexistent"}  # only the sbin directories are searched
    missing = missing_requirements(env=env)
    names = {r.name for r in missing}
    assert {"swaks", "Net::SSLeay", "IO::Socket::SSL", "openssl"} <= names
    line = missing_message(missing)
    assert "\n" not in line
    assert "swaks (swaks)" in line and "Perl module Net::SSLeay (libnet-ssleay-perl)" in line
    # each package once, in the command that installs them
    command = re.search(r"`apt-get install --no-install-recommends ([^`]+)`", line)
    assert command is not None
    packages = command.group(1).split()
    assert len(packages) == len(set(packages)) and "libnet-ssleay-perl" in packages
    assert "without root" in line  # where the skips remain


def test_a_missing_file_or_perl_module_is_missing(tmp_path: Path) -> None:
    reqs = (Requirement("file", str(tmp_path / "nope.so"), "pkg-a"),
            Requirement("perl", "Avgate::No::Such::Module", "pkg-b"))
    assert missing_requirements(reqs) == list(reqs)
    assert missing_requirements((Requirement("file", str(ROOT / "Makefile"), "x"),)) == []


def test_strict_on_ci_or_where_make_test_installs() -> None:
    assert strict_dependencies({"PATH": "/nonexistent", "CI": "true"})
    assert not strict_dependencies({"PATH": "/nonexistent", "CI": "false"})
    # no apt-get: a developer machine, whoever runs it; tests skip
    assert not strict_dependencies({"PATH": "/nonexistent"})


def _pytest(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
         "tests/unit/test_result.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_a_missing_package_stops_the_run_at_its_start(tmp_path: Path) -> None:
    """swaks without its package: one line before any test, not a failure deep in one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for req in REQUIREMENTS:
        found = find_binary(req.name) if req.kind == "binary" else None
        if found and req.name != "swaks":
            (bin_dir / req.name).symlink_to(found)
    if perl := find_binary("perl"):
        (bin_dir / "perl").symlink_to(perl)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "AVGATE_CLAMD")}
    env.update(PATH=str(bin_dir), CI="1")
    proc = _pytest(env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, out
    lines = [line for line in out.splitlines() if "avgate tests: missing" in line]
    assert len(lines) == 1 and "swaks (swaks)" in lines[0], out
    assert "test_result.py::" not in out  # stopped before collecting anything
    # a developer machine (no CI, no apt-get on PATH): the run goes on, the tests skip
    env.pop("CI")
    proc = _pytest(env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "avgate tests: missing" not in proc.stdout + proc.stderr


def test_make_run_installs_only_what_running_needs(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run = subprocess.run(["make", "-n", "-B", "run", f"VENV={venv}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    installs = [line for line in run.stdout.splitlines() if " install " in line]
    assert any("-e '.'" in line for line in installs), run.stdout
    assert not any("[test" in line or "[dev" in line for line in installs), run.stdout
    # Debian packages: only RUN_DEBS (libarchive, libpq), never a test daemon
    make = (ROOT / "Makefile").read_text()
    run_debs = set(re.search(r"^RUN_DEBS \?= (.*)$", make, re.M).group(1).split())  # type: ignore[union-attr]
    assert run_debs == {"libarchive13", "libpq5"}
    for line in run.stdout.splitlines():
        if "for p in" in line:
            assert set(line.split("for p in", 1)[1].split(";", 1)[0].split()) == run_debs
    for test_only in ("postfix", "squid", "clamav-daemon", "chromium", "dovecot"):
        assert test_only not in run.stdout


def _third_party_imports() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "src" / "avgate").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.partition(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "avgate"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_running_needs_only_the_declared_dependencies() -> None:
    """Everything avgate imports comes from [project] dependencies (what `make run`
    installs) or a feature extra (``cluster``: imported only by ``scan --cluster``), never
    from a test extra or another package's dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    features = [d for name, deps in project["optional-dependencies"].items()
                if name not in ("test", "dev") for d in deps]
    declared = {_norm(re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0])
                for d in [*project["dependencies"], *features]}
    dists = packages_distributions()
    undeclared = {}
    for module in _third_party_imports():
        provided_by = {_norm(d) for d in dists.get(module, [module])}
        if not provided_by & declared:
            undeclared[module] = sorted(provided_by)
    assert undeclared == {}
