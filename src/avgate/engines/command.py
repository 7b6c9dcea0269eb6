"""Command engine: runs an external scanner on the spooled file (QHPSI style).

``command = "clamdscan --no-summary --fdpass {path}"`` is split with :mod:`shlex` once, at
config time. ``{path}`` — or ``%s``, IndiMail's QHPSI form (``QHPSI='/usr/bin/clamdscan %s
--quiet --no-summary'`` can be copied as it is) — is replaced inside its argv element by the
spool's absolute path, in one pass (a path containing ``%s`` or ``{path}`` stays as it is), and
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
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from ..errors import EngineTimeout, EngineUnavailable
from ..limits import Timeouts
from ..result import Finding, ScanResult, ScanStatus
from ..spool import Spool
from .base import BaseEngine, EngineContext, EngineSettings

PATH_PLACEHOLDER = "{path}"
QHPSI_PLACEHOLDER = "%s"  # IndiMail's QHPSI command lines: the same placeholder
_PLACEHOLDERS = re.compile(r"\{path\}|%s")
DEFAULT_VIRUS_REGEX = r":\s+(\S+)\s+FOUND\s*$"  # clamscan/clamdscan: "<path>: <name> FOUND"
UNKNOWN_VIRUS = "Unknown.Virus"
_STDOUT_CAP = 64 * 1024  # enough for any scanner's verdict lines; the rest is drained
_STDERR_TAIL = 2048  # kept for the error reason
_REASON_TAIL = 300


def _argv(value: Any) -> tuple[str, ...]:
    """A command line (split like a shell would, never run by one) or a list of arguments."""
    if isinstance(value, str):
        argv = shlex.split(value)
    elif isinstance(value, list | tuple) and all(isinstance(a, str) for a in value):
        argv = list(value)
    else:
        raise ValueError("expected a string or a list of strings")
    if not any(_PLACEHOLDERS.search(a) for a in argv):
        raise ValueError(f"must contain {PATH_PLACEHOLDER} (or {QHPSI_PLACEHOLDER}, as in "
                         "IndiMail's QHPSI)")
    return tuple(argv)


def _exit_codes(value: Any) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value):
        raise ValueError("expected an exit code or a list of exit codes (0-255)")
    return tuple(value)


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from None
    return value


Argv = Annotated[tuple[str, ...], BeforeValidator(_argv)]
ExitCodes = Annotated[tuple[int, ...], BeforeValidator(_exit_codes)]


class CommandEngineSettings(EngineSettings):
    """``[[engines]] type = "command"``.

    command: the scanner's command line with ``{path}`` or ``%s`` (a string, split once like a
        shell would but never run by one, or a list of arguments)
    clean_exit, infected_exit, error_exit: exit codes (one or a list) of each verdict; any
        other exit is an error too
    virus_regex: finds the virus name in stdout (group "virus", else the first group)
    timeout: seconds the scanner may run before its process group is killed (unset:
        [limits] scan_timeout)
    """

    type: Literal["command"] = "command"
    name: str = "command"
    command: Argv
    clean_exit: ExitCodes = (0,)
    infected_exit: ExitCodes = (1,)
    error_exit: ExitCodes = ()
    virus_regex: Annotated[str, AfterValidator(_regex)] = DEFAULT_VIRUS_REGEX
    timeout: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _distinct_exits(self) -> CommandEngineSettings:
        overlap = set(self.clean_exit) & set(self.infected_exit)
        if overlap:
            raise ValueError(f"exit code(s) {sorted(overlap)} both clean and infected")
        return self


class CommandEngine(BaseEngine):
    """Runs ``command`` per object and maps its exit code to a verdict."""

    type_name: ClassVar[str] = "command"
    Settings = CommandEngineSettings

    def __init__(self, settings: CommandEngineSettings, ctx: EngineContext) -> None:
        super().__init__(settings.name, ctx)
        self.settings = settings
        self.argv = settings.command
        self.clean_exit = frozenset(settings.clean_exit)
        self.infected_exit = frozenset(settings.infected_exit)
        self.error_exit = frozenset(settings.error_exit)
        self.virus_re = re.compile(settings.virus_regex, re.MULTILINE)
        self.timeout = settings.timeout or ctx.limits.scan_timeout
        # our own timeout kills the process group; the base timeout is only a backstop
        self.timeouts = Timeouts(scan=self.timeout + 5.0)

    @classmethod
    def from_settings(cls, settings: CommandEngineSettings, ctx: EngineContext
                      ) -> CommandEngine:
        return cls(settings, ctx)

    def version(self) -> str:
        return os.path.basename(self.argv[0])

    def argv_for(self, path: str) -> list[str]:
        """The argv for one file: ``{path}`` and ``%s`` replaced textually in one pass (the
        path itself is never searched for placeholders), never re-split."""
        # absolute, so a file named "-rf" can never be read as an option
        path = os.path.abspath(path)
        return [_PLACEHOLDERS.sub(lambda _: path, a) for a in self.argv]

    async def _scan(self, spool: Spool, deadline: float) -> ScanResult:
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

