"""Run ``avgate serve --config FILE`` as a subprocess for integration tests.

Every listener binds port 0; the ports are read from serve's start-up lines
(``avgate: <front-end>: listening on ...``). Always stopped afterwards (SIGTERM, then KILL).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from tests.clamd_daemon import free_port as free_port  # re-exported
from tests.helpers import wait_until

_LISTEN_RE = re.compile(r"^avgate: (\w+): listening on (?:https?://)?(\S+)")


def _hex_addr(port: int) -> str:
    return f"0100007F:{port:04X}"  # 127.0.0.1 as /proc/net/tcp writes it (little-endian)


def server_ends(server_port: int) -> dict[int, tuple[str, int]]:
    """The server ends of the established connections to 127.0.0.1:``server_port``, read
    from /proc/net/tcp: client port → (socket inode, bytes received but not yet read).

    The inode is "0" while the connection waits in the listen backlog; a server that has
    accepted it owns a socket with a real inode (see :func:`socket_inodes`)."""
    local = _hex_addr(server_port)
    ends: dict[int, tuple[str, int]] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1] == local and f[3] == "01" and f[2].startswith("0100007F:"):
            ends[int(f[2].split(":")[1], 16)] = (f[9], int(f[4].split(":")[1], 16))
    return ends


def in_server(server_port: int, client_port: int) -> bool:
    """The server has accepted the connection from ``client_port`` and read everything sent
    on it so far: a request the test started is in the server's hands, not in a kernel
    queue (what a test waits for before it signals the server)."""
    inode, unread = server_ends(server_port).get(client_port, ("0", 0))
    return inode != "0" and unread == 0


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets process ``pid`` holds open."""
    inodes: set[str] = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (serve's workers), read from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2:].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def avgate_command() -> list[str]:
    """The ``avgate`` console script next to the running interpreter, else ``-c main()``."""
    script = Path(sys.executable).with_name("avgate")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from avgate.cli import main; main()"]


class AvgateServe:
    """One ``avgate serve`` process; ``listeners`` maps front-end name → list of addresses."""

    def __init__(self, config_path: Path, cwd: Path | None = None) -> None:
        self.config_path = config_path
        self.cwd = cwd or config_path.parent
        self.proc: subprocess.Popen[str] | None = None
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.listeners: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def _pump(self, stream: object, sink: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self._lock:
                sink.append(line.rstrip("\n"))

    def start(self, timeout: float = 20.0) -> AvgateServe:
        # a second start would orphan the first process (stop() only knows the last one)
        assert self.proc is None or self.proc.poll() is not None, "avgate serve already started"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("AVGATE_CONFIG", None)
        self.proc = subprocess.Popen(
            [*avgate_command(), "serve", "--config", str(self.config_path)], cwd=self.cwd,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout),
                         daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr),
                         daemon=True).start()
        if not self.wait_for_line("avgate: serving", timeout):
            self.stop()
            raise RuntimeError("avgate serve did not start:\n" + self.output())
        for line in self.lines():
            m = _LISTEN_RE.match(line)
            if m:
                self.listeners.setdefault(m.group(1), []).append(m.group(2))
        return self

    def lines(self) -> list[str]:
        with self._lock:
            return list(self.stdout)

    def err_lines(self) -> list[str]:
        with self._lock:
            return list(self.stderr)

    def output(self) -> str:
        return "\n".join([*self.lines(), "--- stderr ---", *self.err_lines()])

    def has_line(self, text: str, *, stderr: bool = False, after: int = 0) -> bool:
        """A line (from index ``after``) of stdout (or stderr) contains ``text``."""
        lines = self.err_lines() if stderr else self.lines()
        return any(text in line for line in lines[after:])

    def wait_for_line(self, text: str, timeout: float = 10.0, *, stderr: bool = False,
                      after: int = 0) -> bool:
        """Wait until a line (from index ``after``) contains ``text``; False at the deadline
        or once the process has exited without writing it."""
        def done() -> bool:
            exited = self.proc is not None and self.proc.poll() is not None
            return exited or self.has_line(text, stderr=stderr, after=after)

        return wait_until(done, timeout) and self.has_line(text, stderr=stderr, after=after)

    def port(self, frontend: str, index: int = 0) -> int:
        return int(self.listeners[frontend][index].rsplit(":", 1)[1])

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait, then SIGKILL; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def __enter__(self) -> AvgateServe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
