"""Start and stop a real clamd for tests, with our own tiny signature database.

No internet needed: the database directory holds only ``test.hdb`` (EICAR by MD5) and
``test.ndb`` (the body marker ``THIS-IS-A-TEST-MALWARE-MARKER``), so clamd is ready in about
a second. clamd listens on a free loopback TCP port and on a unix socket in its temp dir.

clamd drops privileges only when the config has a ``User`` line; without one it keeps the
uid it was started with, so the same config works as root (CI, fresh containers) and as an
ordinary user. Reliability tests use :meth:`ClamdDaemon.pause` / :meth:`resume` (SIGSTOP /
SIGCONT), :meth:`kill` and :meth:`restart`.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
MARKER = b"THIS-IS-A-TEST-MALWARE-MARKER"
# clamd appends ".UNOFFICIAL" to every signature that is not from ClamAV's signed databases
EICAR_NAME = "Eicar-Test-Signature.UNOFFICIAL"
MARKER_NAME = "Test.Body.Pattern.UNOFFICIAL"
DEFAULT_STREAM_MAX_LENGTH = 10 * 1024 * 1024

CLAMD_CANDIDATES = ("/usr/sbin/clamd", "/usr/local/sbin/clamd", "/usr/bin/clamd")


def find_clamd() -> str | None:
    """The clamd binary: ``$AVGATE_CLAMD``, else PATH, else the usual install locations."""
    if env := os.environ.get("AVGATE_CLAMD"):
        return env
    found = shutil.which("clamd")
    if found:
        return found
    return next((c for c in CLAMD_CANDIDATES if os.access(c, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_signatures(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "test.hdb").write_text(
        f"{hashlib.md5(EICAR, usedforsecurity=False).hexdigest()}:{len(EICAR)}"
        ":Eicar-Test-Signature\n")
    (directory / "test.ndb").write_text(f"Test.Body.Pattern:0:*:{MARKER.hex()}\n")


class ClamdDaemon:
    """One private clamd process (``Foreground yes``) in its own temp directory."""

    def __init__(self, binary: str, *, stream_max_length: int = DEFAULT_STREAM_MAX_LENGTH,
                 workdir: str | None = None) -> None:
        self.binary = binary
        self.stream_max_length = stream_max_length
        # short path: a unix socket path must stay under 108 bytes
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="avgate-clamd-"))
        self.db_dir = self.workdir / "db"
        self.socket_path = str(self.workdir / "clamd.sock")
        self.config_path = str(self.workdir / "clamd.conf")
        self.log_path = str(self.workdir / "clamd.log")
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        write_signatures(self.db_dir)

    # -- addresses ---------------------------------------------------------------------
    @property
    def tcp(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def unix(self) -> str:
        return f"unix:{self.socket_path}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("clamd is not running")
        return self.proc.pid

    def _write_config(self) -> None:
        Path(self.config_path).write_text(
            f"DatabaseDirectory {self.db_dir}\n"
            f"TCPSocket {self.port}\n"
            "TCPAddr 127.0.0.1\n"
            f"LocalSocket {self.socket_path}\n"
            "FixStaleSocket yes\n"
            "Foreground yes\n"
            f"LogFile {self.log_path}\n"
            f"TemporaryDirectory {self.workdir}\n"
            f"StreamMaxLength {self.stream_max_length}\n"
            "MaxThreads 4\n"  # the test machines have few cores
            "MaxQueue 50\n"
            "SelfCheck 3600\n"
            "ConcurrentDatabaseReload no\n"
        )

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        """Start clamd and wait until it answers PING on both sockets."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("clamd already running")
        if not self.port:
            self.port = free_port()
        self._write_config()
        with open(self.workdir / "clamd.out", "ab") as out:
            self.proc = subprocess.Popen(
                [self.binary, "-c", self.config_path], stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"clamd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.ping() and self.ping(unix=True):
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"clamd not ready after {timeout:g}s:\n{self.log_tail()}")

    def ping(self, unix: bool = False, timeout: float = 1.0) -> bool:
        """True when clamd answers zPING with PONG."""
        family = socket.AF_UNIX if unix else socket.AF_INET
        address: str | tuple[str, int] = (
            self.socket_path if unix else ("127.0.0.1", self.port))
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(address)
                s.sendall(b"zPING\0")
                return s.recv(16) == b"PONG\0"
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (after SIGCONT, in case it is paused), then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL, no clean-up by clamd (stale socket, like a crash)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self._signal(signal.SIGKILL)
        self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the sockets stay open, nothing answers (a hung daemon)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def restart(self, timeout: float = 60.0) -> None:
        """Stop and start again on the same port and socket."""
        self.stop()
        self.start(timeout)

    def cleanup(self) -> None:
        """Kill clamd and remove its temp directory."""
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def log_tail(self, lines: int = 30) -> str:
        text = ""
        for name in ("clamd.out", "clamd.log"):
            with contextlib.suppress(OSError):
                text += (self.workdir / name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def start_clamd(binary: str, *, stream_max_length: int = DEFAULT_STREAM_MAX_LENGTH,
                workdir: str | None = None) -> ClamdDaemon:
    """Start a daemon; it is killed at interpreter exit even if the caller forgets."""
    daemon = ClamdDaemon(binary, stream_max_length=stream_max_length, workdir=workdir)
    atexit.register(daemon.cleanup)
    try:
        daemon.start()
    except BaseException:
        daemon.cleanup()
        raise
    return daemon
