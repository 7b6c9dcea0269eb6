"""What the clamd listener scans besides INSTREAM, and the words it answers with.

Verdicts: clamd clients know three words. ``infected`` → ``<path>: NAME FOUND`` (whatever
the policy decides — clients act on FOUND themselves; ALLMATCHSCAN lists every name),
``clean`` → ``<path>: OK``, ``error`` → ``<path>: <reason> ERROR``. ``skipped``/``unknown``
that the policy refuses (a structural limit, by default: anyone can shape content to hit one)
→ ``<path>: Heuristics.Limits.Exceeded.<Limit> FOUND``, as clamd with AlertExceedsMax; what the
policy accepts (a size limit on this front-end, an encrypted archive) → ``OK``, as clamd's
defaults. The scan log and metrics keep the real status.

Scan what was hashed: every file (FILDES, SCAN & co.) is read exactly once into an
avgate-owned spool (a snapshot, hashed while it is read, at most ``max_scan_size`` + 1
bytes); engines, size limits and the verdict cache see only that snapshot, so a file
rewritten meanwhile cannot get a verdict cached for bytes that were not scanned. FILDES
reads through the passed descriptor itself (``pread`` from offset 0, the client's file
offset untouched), never by reopening ``/proc/PID/fd/N`` with avgate's credentials: an
O_PATH or write-only descriptor is answered ``... ERROR``, not scanned.

Path scans (SCAN, CONTSCAN, MULTISCAN, ALLMATCHSCAN) only read below ``allowed_paths``:
the path is resolved (symlinks, ``..``) and must lie inside one of them, directory walks do
not follow symlinks (clamd's default), and each file is opened with O_NOFOLLOW and checked
again through its descriptor, so a symlink swapped in after the check cannot lead out.
Anything else is answered ``<path>: Access denied. ERROR``. SCAN stops at the first
infected file; the others go on.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

from ..errors import SpoolError
from ..policy import Decision, Disposition
from ..protocols import clamd as proto
from ..result import Finding, ScanResult, ScanStatus
from ..spool import Spool

if TYPE_CHECKING:
    from ..config import Config

#: a file up to this size is snapshotted on the event loop; larger ones in a thread
_INLINE_FILE = 1 << 20

#: scan → policy → verdict for one spool, from a peer (the listener's ``gateway.process``)
Process = Callable[[Spool, str], Awaitable[ScanResult]]


def clean_text(text: str) -> str:
    """Reply text must not contain the terminators."""
    return " ".join(text.replace("\0", " ").split())


def _signature_name(name: str) -> str:
    # clients split "<path>: NAME FOUND" from the right: a name has no spaces
    return "_".join(name.split()) or "Unknown"


# ClamAV's names for its AlertExceedsMax heuristics, which avgate's limits correspond to
_LIMIT_NAMES = (("recursion", "MaxRecursion"), ("file count", "MaxFiles"),
                ("entry count", "MaxFiles"), ("part", "MaxFiles"), ("ratio", "MaxRatio"),
                ("time budget", "MaxScanTime"), ("scan time", "MaxScanTime"),
                ("memory", "MaxScanMemory"), ("file size", "MaxFileSize"),
                ("scan size", "MaxScanSize"), ("size limit", "MaxScanSize"))


def as_clamd_verdict(result: ScanResult, decision: Decision) -> ScanResult:
    """A result the policy refused because a limit was hit, as clamd reports it with
    AlertExceedsMax: ``Heuristics.Limits.Exceeded.<Limit> FOUND``. clamd clients know only
    FOUND/OK/ERROR; a refused object answered ``OK`` would be delivered by them."""
    if (result.limit is None or result.status in (ScanStatus.INFECTED, ScanStatus.ERROR)
            or decision.disposition is Disposition.ACCEPT):
        return result
    reason = result.reason.lower()
    limit = next((name for key, name in _LIMIT_NAMES if key in reason), "MaxScanTime"
                 if "budget" in reason else "Structure")
    name = f"Heuristics.Limits.Exceeded.{limit}"
    return result.with_(findings=(Finding(name, "avgate", ""),))


def verdict_lines(result: ScanResult, path: str, *, all_matches: bool = False) -> list[str]:
    """The clamd reply lines for one scanned object (see the module docstring)."""
    if result.status is ScanStatus.INFECTED or result.findings:
        names = result.virus_names if all_matches else result.virus_names[:1]
        return [proto.found_reply(_signature_name(n), path) for n in names]
    if result.status is ScanStatus.ERROR:
        return [proto.error_reply(clean_text(result.reason) or "Scan failed.", path)]
    return [proto.ok_reply(path)]


def verdict_text(result: ScanResult) -> str:
    """The verdict as a clamd reply gives it, without the path (``NAME FOUND``, ``OK``,
    ``REASON ERROR``): what the scan log records as this front-end's answer."""
    return verdict_lines(result, "-")[0].split(": ", 1)[1]


def _snapshot(fd: int, max_size: int, memory_limit: int, directory: str | None) -> Spool:
    """Read the file behind ``fd`` once into a new spool (hashed while read), with ``pread``
    from offset 0 as clamd does (see :meth:`Spool.from_fd`)."""
    return Spool.from_fd(fd, max_size=max_size, memory_limit=memory_limit, directory=directory,
                         label="file descriptor")


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _walk(real: str, shown: str) -> Iterator[tuple[str, str]]:
    """(real path, path as shown) of every file below a directory, symlinks not followed."""
    for dirpath, dirnames, filenames in os.walk(real, followlinks=False):
        dirnames.sort()
        rel = os.path.relpath(dirpath, real)
        for fname in sorted(filenames):
            full = os.path.join(dirpath, fname)
            if os.path.islink(full):
                continue  # FollowFileSymlinks no (clamd's default)
            yield full, os.path.normpath(os.path.join(shown, rel, fname))


class FileScanner:
    """Scans files for one command: a passed descriptor (FILDES) or a path below
    ``allowed_paths`` (SCAN & co.), each through one snapshot (see the module docstring).

    ``config`` is the gateway's config as read for this command; ``process`` scans a spool
    and applies the policy (the listener's ``gateway.process``).
    """

    def __init__(self, config: Config, allowed_paths: tuple[str, ...], process: Process) -> None:
        self.limit = config.limits.max_scan_size
        self.memory = config.scan.spool_memory
        self.directory = config.scan.spool_dir
        self.roots = [os.path.realpath(os.path.join(config.base_dir, p)) for p in allowed_paths]
        self.process = process

    async def scan_fd(self, fd: int, peer: str) -> ScanResult:
        """Snapshot the regular file behind ``fd`` (read through it, once) and scan that."""
        try:
            spool = await self._snapshot(fd)
        except SpoolError as exc:
            return ScanResult.error(clean_text(str(exc)))
        with spool:
            return await self.process(spool, peer)

    async def _snapshot(self, fd: int) -> Spool:
        """One read of the file into an avgate-owned spool, at most max_scan_size + 1 bytes
        (then ``truncated``: the scan service reports the object as over the limit)."""
        limit = self.limit
        # fstat is only a hint for where to read (the snapshot's own size is what counts)
        if os.fstat(fd).st_size <= _INLINE_FILE:
            spool = _snapshot(fd, min(limit, _INLINE_FILE), self.memory, self.directory)
            if not spool.truncated or limit <= _INLINE_FILE:
                return spool
            spool.close()  # it grew meanwhile: read it again, off the event loop
        return await asyncio.to_thread(_snapshot, fd, limit, self.memory, self.directory)

    def _resolve(self, requested: str) -> tuple[str, os.stat_result] | str:
        """(real path, stat) of a requested path inside the roots, or the error reply."""
        if not self.roots or not os.path.isabs(requested):
            return proto.error_reply("Access denied.", requested)
        real = os.path.realpath(requested)
        if not _inside(real, self.roots):
            return proto.error_reply("Access denied.", requested)
        try:
            return real, os.stat(real)
        except OSError as exc:
            return proto.error_reply(f"lstat() failed: {exc.strerror}.", requested)

    async def scan_path(self, command: str, requested: str) -> list[str]:
        """The reply lines of SCAN/CONTSCAN/MULTISCAN/ALLMATCHSCAN ``requested``."""
        resolved = self._resolve(requested)
        if isinstance(resolved, str):
            return [resolved]
        real, st = resolved
        if not stat.S_ISDIR(st.st_mode):
            return await self._scan_file(real, requested, command)
        lines: list[str] = []
        for path, shown in _walk(real, requested):
            file_lines = await self._scan_file(path, shown, command, quiet_ok=True)
            lines.extend(file_lines)
            if command == "SCAN" and any(x.endswith(" FOUND") for x in file_lines):
                break  # SCAN stops at the first virus; CONTSCAN & co. go on
        if not lines:
            lines.append(proto.ok_reply(requested))
        return lines

    async def _scan_file(self, path: str, shown: str, command: str,
                         quiet_ok: bool = False) -> list[str]:
        """Scan one file (opened without following a final symlink, checked by descriptor,
        snapshotted through that descriptor).

        ``quiet_ok``: inside a directory only FOUND/ERROR lines are reported (like clamd).
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == getattr(os, "ELOOP", 40):
                return [proto.error_reply("Access denied.", shown)]
            return [proto.error_reply("Can't open file or directory.", shown)]
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
            if not _inside(real, self.roots):
                return [proto.error_reply("Access denied.", shown)]
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return [] if quiet_ok else [proto.error_reply("Not supported file type.",
                                                              shown)]
            result = await self.scan_fd(fd, "local")
        finally:
            os.close(fd)
        lines = verdict_lines(result, shown, all_matches=command == "ALLMATCHSCAN")
        if quiet_ok and result.status not in (ScanStatus.INFECTED, ScanStatus.ERROR):
            return []
        return lines
