"""Run ``avgate serve --config FILE`` as a subprocess for integration tests.

Every listener binds port 0; the ports are read from serve's start-up lines
(``avgate: <front-end>: listening on ...``). Always stopped afterwards (SIGTERM, then KILL).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

_LISTEN_RE = re.compile(r"^avgate: (\w+): listening on (?:https?://)?(\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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

    def wait_for_line(self, text: str, timeout: float = 10.0, *, stderr: bool = False,
                      after: int = 0) -> bool:
        """Wait until a line (from index ``after``) contains ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.err_lines() if stderr else self.lines()
            if any(text in line for line in lines[after:]):
                return True
            if self.proc is not None and self.proc.poll() is not None:
                lines = self.err_lines() if stderr else self.lines()
                return any(text in line for line in lines[after:])
            time.sleep(0.05)
        return False

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
