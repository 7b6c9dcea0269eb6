"""Small helpers shared by every test folder: waiting for a condition with a deadline, and
finding the external tools the integration tests drive (:data:`REQUIREMENTS`, checked once at
the start of a run by ``tests/conftest.py``).

Tests synchronise on what they can observe (a log line, a file, a counter, a socket state),
polled here with a deadline, never on a fixed sleep: a sleep is either too short on a loaded
machine (a flaky test) or longer than needed everywhere else.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import subprocess
import sysconfig
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import pytest

POLL_INTERVAL = 0.05


def wait_until(predicate: Callable[[], object], timeout: float = 10.0,
               interval: float = POLL_INTERVAL) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (its last
    answer, asked once more at the deadline). For threads and blocking test code."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


async def async_wait_until(predicate: Callable[[], object], timeout: float = 10.0,  # noqa: ASYNC109
                           interval: float = POLL_INTERVAL) -> bool:
    """:func:`wait_until` for coroutines: the event loop keeps running while it polls (so
    servers and sinks living in the test's own loop make progress)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return bool(predicate())


# -- what the test suite drives ---------------------------------------------------------------
# Every binary, Perl module and plug-in some test drives, with the Debian package that provides
# it. `make test` installs these packages (TEST_DEBS in the Makefile, kept equal to this list by
# tests/unit/test_fresh_machine.py); tests/conftest.py checks them before the first test.
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")  # not on a normal user's PATH
LIBDIR = f"/usr/lib/{sysconfig.get_config_var('MULTIARCH') or 'x86_64-linux-gnu'}"
CICAP_MODULES = f"{LIBDIR}/c_icap"
# Debian keeps initdb and postgres off PATH, in a directory per major version: the newest one
PG_BINDIR = max(glob.glob("/usr/lib/postgresql/*/bin"), default="/usr/lib/postgresql/15/bin",
                key=lambda d: int(d.split("/")[-2]) if d.split("/")[-2].isdigit() else 0)


@dataclass(frozen=True, slots=True)
class Requirement:
    """One external piece some test drives: a ``binary`` (looked up on PATH and the sbin
    directories), a ``perl`` module (loaded by ``perl -MModule``) or a ``file``."""

    kind: str
    name: str
    package: str  # the Debian package that provides it

    def describe(self) -> str:
        return {"binary": self.name, "perl": f"Perl module {self.name}",
                "file": self.name}[self.kind]


REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("binary", "clamd", "clamav-daemon"),
    Requirement("binary", "clamdscan", "clamdscan"),
    Requirement("binary", "clamav-milter", "clamav-milter"),
    Requirement("binary", "swaks", "swaks"),
    # swaks --tls: "TLS not available: requires Net::SSLeay" (a Recommends, left out by
    # --no-install-recommends)
    Requirement("perl", "Net::SSLeay", "libnet-ssleay-perl"),
    Requirement("perl", "IO::Socket::SSL", "libio-socket-ssl-perl"),
    Requirement("binary", "postfix", "postfix"),
    Requirement("binary", "postconf", "postfix"),
    Requirement("binary", "postqueue", "postfix"),
    Requirement("binary", "squid", "squid"),
    Requirement("binary", "c-icap", "c-icap"),
    Requirement("binary", "c-icap-client", "c-icap"),
    Requirement("file", f"{CICAP_MODULES}/virus_scan.so", "libc-icap-mod-virus-scan"),
    Requirement("file", f"{CICAP_MODULES}/clamd_mod.so", "libc-icap-mod-virus-scan"),
    Requirement("binary", "openssl", "openssl"),  # test certificates (STARTTLS, HTTPS)
    Requirement("binary", "mount", "mount"),  # the reliability tests' small tmpfs (root)
    Requirement("binary", "umount", "mount"),
    # the shared quarantine and verdict cache tests (tests/pg_instance.py, redis_instance.py)
    Requirement("file", f"{PG_BINDIR}/initdb", "postgresql"),
    Requirement("file", f"{PG_BINDIR}/postgres", "postgresql"),
    Requirement("binary", "redis-server", "redis-server"),
    Requirement("binary", "qpdf", "qpdf"),  # encrypted and object-stream PDFs (test_pdf.py)
    # RAR, CAB, ISO 9660, cpio and LHA are read through libarchive-c (also needed to run)
    Requirement("file", f"{LIBDIR}/libarchive.so.13", "libarchive13"),
    # the HTTP proxy tests: nginx as the origin, curl and wget as clients
    Requirement("binary", "nginx", "nginx"),
    Requirement("binary", "curl", "curl"),
    Requirement("binary", "wget", "wget"),
    # the POP3 and IMAP proxy tests: a private Dovecot (tests/integration/proxies/dovecot.py)
    Requirement("binary", "dovecot", "dovecot-core"),
    Requirement("file", "/usr/lib/dovecot/pop3", "dovecot-pop3d"),
    Requirement("file", "/usr/lib/dovecot/imap", "dovecot-imapd"),
    # the web console in a real browser (test_console_browser.py, Selenium)
    Requirement("binary", "chromium", "chromium"),
    Requirement("binary", "chromedriver", "chromium-driver"),
    # ClamAV's sample files (clam.exe in 40 wrappings) for the ClamAV database tests
    Requirement("file", "/usr/share/clamav-testfiles/clam.exe", "clamav-testfiles"),
)


def strict_dependencies(env: Mapping[str, str] | None = None) -> bool:
    """Whether a missing requirement is an error rather than a skip: on CI (``$CI`` set) and
    wherever ``make test`` installs the packages itself (root with apt-get). A developer
    machine without root keeps the skips."""
    env = os.environ if env is None else env
    if env.get("CI", "").lower() not in ("", "0", "false"):
        return True
    return os.geteuid() == 0 and find_binary("apt-get", env) is not None


def find_binary(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """``name`` on ``$PATH``, then in the sbin directories (clamd, postfix, squid live there,
    and an unprivileged PATH often lacks them)."""
    env = os.environ if env is None else env
    path = os.pathsep.join([env.get("PATH", os.defpath), *SBIN_DIRS])
    return shutil.which(name, path=path)


def requirement_present(req: Requirement, env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    if req.kind == "file":
        return os.path.exists(req.name)
    if req.kind == "binary":
        if req.name == "clamd" and env.get("AVGATE_CLAMD"):
            return os.access(env["AVGATE_CLAMD"], os.X_OK)
        return find_binary(req.name, env) is not None
    perl = find_binary("perl", env)
    if perl is None:
        return False
    probe = subprocess.run([perl, f"-M{req.name}", "-e", "1"], capture_output=True,
                           timeout=30, check=False)
    return probe.returncode == 0


def missing_requirements(requirements: Iterable[Requirement] = REQUIREMENTS,
                         env: Mapping[str, str] | None = None) -> list[Requirement]:
    """The requirements that are not installed here."""
    return [r for r in requirements if not requirement_present(r, env)]


def missing_message(missing: Iterable[Requirement]) -> str:
    """One line: what is missing, and the one command that installs it."""
    missing = list(missing)
    packages = " ".join(dict.fromkeys(r.package for r in missing))
    what = ", ".join(f"{r.describe()} ({r.package})" for r in missing)
    return (f"avgate tests: missing {what}. Install them with `apt-get install "
            f"--no-install-recommends {packages}` (`make test` does that when run as root); "
            "on a developer machine without root and without $CI the tests that need them "
            "skip instead.")


def require_binary(name: str, package: str) -> str:
    """Path of an installed tool (``$PATH``, then the sbin directories). Missing: skip on an
    unprivileged dev machine, fail where :func:`strict_dependencies` (CI installs every
    package it needs)."""
    found = find_binary(name)
    if found is None:
        if strict_dependencies():
            pytest.fail(f"{name} is not installed; CI must install it (apt-get install "
                        f"{package})")
        pytest.skip(f"{name} not installed (apt-get install {package})")
    return found


def require_clamd() -> str:
    """The clamd binary (``$AVGATE_CLAMD``, PATH, the usual places); skip or fail as
    :func:`require_binary` does."""
    from tests.clamd_daemon import find_clamd

    binary = find_clamd()
    if binary is None:
        if strict_dependencies():
            pytest.fail("clamd is not installed; CI must install it "
                        "(apt-get install clamav-daemon) or set AVGATE_CLAMD")
        pytest.skip("clamd not installed (apt-get install clamav-daemon, or set AVGATE_CLAMD)")
    return binary
