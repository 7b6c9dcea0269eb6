"""Command engine: runs an external scanner on the spooled file (QHPSI style).

``command = "clamdscan --no-summary --fdpass {path}"`` is split with :mod:`shlex` once, at
config time. ``{path}`` is replaced inside its argv element by the spool's absolute path and
the program is executed directly, never through a shell: a file name full of shell
metacharacters is just bytes in one argument. The exit code decides the verdict; the virus
name comes from stdout (``virus_regex``). On timeout the whole process group is killed, so a
wrapper script cannot leave its scanner running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from ..errors import ConfigError, EngineTimeout, EngineUnavailable
from ..limits import Timeouts
from ..result import Finding, ScanResult, ScanStatus
from ..spool import Spool
from .base import BaseEngine, EngineContext

PATH_PLACEHOLDER = "{path}"
DEFAULT_VIRUS_REGEX = r":\s+(\S+)\s+FOUND\s*$"  # clamscan/clamdscan: "<path>: <name> FOUND"
UNKNOWN_VIRUS = "Unknown.Virus"
_STDOUT_CAP = 64 * 1024  # enough for any scanner's verdict lines; the rest is drained
_STDERR_TAIL = 2048  # kept for the error reason
_REASON_TAIL = 300


class CommandEngine(BaseEngine):
    """Runs ``command`` per object and maps its exit code to a verdict."""

    type_name: ClassVar[str] = "command"
    config_keys: ClassVar[frozenset[str]] = frozenset({
        "command", "infected_exit", "clean_exit", "error_exit", "virus_regex", "timeout",
    })

    def __init__(self, name: str, ctx: EngineContext, *, argv: Sequence[str],
                 clean_exit: Sequence[int] = (0,), infected_exit: Sequence[int] = (1,),
                 error_exit: Sequence[int] = (), virus_regex: str = DEFAULT_VIRUS_REGEX,
                 timeout: float | None = None) -> None:
        super().__init__(name, ctx)
        if not argv or not any(PATH_PLACEHOLDER in a for a in argv):
            raise ValueError(f"command must contain {PATH_PLACEHOLDER}")
        overlap = set(clean_exit) & set(infected_exit)
        if overlap:
            raise ValueError(f"exit code(s) {sorted(overlap)} both clean and infected")
        self.argv = tuple(argv)
        self.clean_exit = frozenset(clean_exit)
        self.infected_exit = frozenset(infected_exit)
        self.error_exit = frozenset(error_exit)
        self.virus_re = re.compile(virus_regex, re.MULTILINE)
        self.timeout = timeout if timeout is not None else ctx.limits.scan_timeout
        # our own timeout kills the process group; the base timeout is only a backstop
        self.timeouts = Timeouts(scan=self.timeout + 5.0)

    @classmethod
    def from_config(cls, table: Mapping[str, Any], ctx: EngineContext) -> CommandEngine:
        """Build from an ``[[engines]]`` table with ``type = "command"``."""
        name = str(table.get("name", "command"))
        where = f"engines ({name})"
        command = table.get("command")
        if isinstance(command, str):
            try:
                argv = shlex.split(command)
            except ValueError as exc:
                raise ConfigError(f"{where}: command: {exc}") from exc
        elif isinstance(command, list) and all(isinstance(a, str) for a in command):
            argv = list(command)
        else:
            raise ConfigError(f"{where}: command: required, a string or a list of strings")
        if not any(PATH_PLACEHOLDER in a for a in argv):
            raise ConfigError(f"{where}: command: must contain {PATH_PLACEHOLDER}")
        kw: dict[str, Any] = {"argv": argv}
        for key in ("clean_exit", "infected_exit", "error_exit"):
            if key in table:
                kw[key] = _exit_codes(table[key], f"{where}: {key}")
        if "virus_regex" in table:
            regex = table["virus_regex"]
            try:
                if not isinstance(regex, str):
                    raise TypeError("must be a string")
                re.compile(regex)
            except (re.error, TypeError) as exc:
                raise ConfigError(f"{where}: virus_regex: {exc}") from exc
            kw["virus_regex"] = regex
        if "timeout" in table:
            value = table["timeout"]
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"{where}: timeout: must be a number > 0")
            kw["timeout"] = float(value)
        try:
            return cls(name, ctx, **kw)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from exc

    def version(self) -> str:
        return os.path.basename(self.argv[0])

    def argv_for(self, path: str) -> list[str]:
        """The argv for one file: ``{path}`` replaced textually, never re-split."""
        # absolute, so a file named "-rf" can never be read as an option
        path = os.path.abspath(path)
        return [a.replace(PATH_PLACEHOLDER, path) for a in self.argv]

    async def _scan(self, spool: Spool) -> ScanResult:
        argv = self.argv_for(spool.path())
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise EngineUnavailable(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
        assert proc.stdout is not None and proc.stderr is not None
        try:
            async with asyncio.timeout(self.timeout):
                stdout, stderr, code = await asyncio.gather(
                    _read_head(proc.stdout, _STDOUT_CAP),
                    _read_tail(proc.stderr, _STDERR_TAIL), proc.wait())
        except BaseException as exc:
            # timeout or cancellation (outer timeout): kill the whole group, including
            # children that outlived the scanner and still hold its pipes
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            if proc.returncode is None:
                await asyncio.shield(proc.wait())
            if isinstance(exc, TimeoutError):
                raise EngineTimeout(f"{argv[0]} still running after {self.timeout:g}s, "
                                    "killed") from None
            raise
        return self._result(code, stdout, stderr)

    def _result(self, code: int, stdout: bytes, stderr: bytes) -> ScanResult:
        if code in self.infected_exit:
            text = stdout.decode("utf-8", "replace")
            match = self.virus_re.search(text)
            virus = (match.group("virus") if "virus" in self.virus_re.groupindex
                     else match.group(1) if self.virus_re.groups else match.group(0)
                     ) if match else ""
            return ScanResult(ScanStatus.INFECTED, findings=(
                Finding(virus.strip() or UNKNOWN_VIRUS, engine=self.name, part=""),))
        if code in self.clean_exit:
            return ScanResult(ScanStatus.CLEAN)
        tail = stderr.decode("utf-8", "replace").strip()[-_REASON_TAIL:]
        kind = "error exit" if code in self.error_exit else "unexpected exit"
        what = f"killed by signal {-code}" if code < 0 else f"{kind} {code}"
        return ScanResult.error(f"{self.name}: {self.argv[0]}: {what}"
                                + (f": {tail}" if tail else ""))


async def _read_head(stream: asyncio.StreamReader, cap: int) -> bytes:
    """The first ``cap`` bytes; the rest is read and dropped so the child never blocks."""
    kept = bytearray()
    while data := await stream.read(65536):
        if len(kept) < cap:
            kept += data[: cap - len(kept)]
    return bytes(kept)


async def _read_tail(stream: asyncio.StreamReader, cap: int) -> bytes:
    """The last ``cap`` bytes (error messages come last)."""
    kept = bytearray()
    while data := await stream.read(65536):
        kept += data
        if len(kept) > cap:
            del kept[:-cap]
    return bytes(kept)


def _exit_codes(value: Any, where: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value):
        raise ConfigError(f"{where}: must be an exit code or a list of exit codes (0-255)")
    return list(value)
