"""On-demand scanning of stored data (``avgate scan``): files, directories, Maildir, mbox.

Walks the targets, scans each object with bounded concurrency and reports every result
through a callback, so the CLI can print clamscan-style lines, JSON lines or a progress bar.

Stores understood:

* directories, recursively (sorted; symlinks to directories are not followed);
* Maildir (a directory with ``cur``, ``new`` and ``tmp``): one message per file in ``cur`` and
  ``new``; ``tmp`` holds deliveries in progress and is skipped;
* mbox (a file whose first line starts with ``From ``): every line starting with ``From ``
  begins a message. Messages are reported as ``PATH:INDEX`` (1-based) and scanned as the
  message itself: the ``From_`` line and the blank separator line before the next one are not
  part of it, and ``>From `` quoting is undone the **mboxrd** way (one ``>`` is removed from
  every line matching ``^>+From ``), which is exact for mboxrd files and right for every
  line mboxo quoted.

``--since`` keeps objects modified after a time (an mbox counts as one object: when it
changed, all its messages are scanned); ``--state FILE`` stores the time just before a run
started and uses it as the next run's ``--since``. Actions on infected objects: ``report``
(nothing), ``delete``, ``quarantine`` (into the quarantine store with ``source`` = the path, or
``PATH:INDEX`` for an mbox message; then removed). An mbox is rewritten without the infected
messages under an fcntl lock, atomically, every other message left byte-identical.

The new copy of an mbox is written as an unnamed file (``O_TMPFILE``) in the mbox's directory
and gets a name, ``.avgate-mbox-NAME.PID.tmp``, only once it is complete, just before it
replaces the mbox: no mail tool listing that directory sees a half-written mailbox. A run
killed in that last step leaves the named copy; the next ``delete``/``quarantine`` run that
meets the mbox removes it under the mbox's lock (as well as the ``.avgate-mbox-XXXXXXXX``
copies of older versions), and the walker never scans such files. On filesystems without
``O_TMPFILE`` the copy is written under its dot-name from the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import errno
import fcntl
import hashlib
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .result import ScanResult, ScanStatus
from .scan import ScanService
from .spool import Spool

if TYPE_CHECKING:
    from .quarantine.store import Envelope, Store

ACTIONS = ("report", "delete", "quarantine")
MAILDIR_SUBDIRS = frozenset({"cur", "new", "tmp"})
_MBOXRD_QUOTED = re.compile(rb"^>(>*From )", re.MULTILINE)
MBOX_TMP_PREFIX = ".avgate-mbox-"  # a rewritten mbox's copy: .avgate-mbox-NAME.PID.tmp
_MBOX_TMP_NAME_MAX = 100  # characters of the mbox's name kept in its copy's name
_LEGACY_MBOX_TMP = re.compile(r"^\.avgate-mbox-[a-z0-9_]{8}$")  # mkstemp's, before issue 13


@dataclass(frozen=True, slots=True)
class MboxMessage:
    """Where one message lies in an mbox file, to remove exactly those bytes later."""

    mbox: str
    index: int  # 1-based
    start: int  # offset of its From_ line
    end: int  # offset of the next From_ line (or the file's end)
    digest: str  # sha256 of the raw span start..end: detects a changed file before a rewrite


@dataclass(slots=True)
class Target:
    """One object to scan: a file path, stdin (path None, data None), or an mbox message."""

    label: str
    path: str | None
    data: bytes | None = None
    mbox: MboxMessage | None = None


@dataclass
class Summary:
    scanned: int = 0
    infected: int = 0
    skipped: int = 0
    unknown: int = 0
    errors: int = 0
    bytes: int = 0
    directories: int = 0
    not_modified: int = 0  # left out by --since
    quarantined: int = 0
    deleted: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, result: ScanResult) -> None:
        self.scanned += 1
        self.bytes += result.size
        if result.status is ScanStatus.INFECTED:
            self.infected += 1
        elif result.status is ScanStatus.SKIPPED:
            self.skipped += 1
        elif result.status is ScanStatus.UNKNOWN:
            self.unknown += 1
        elif result.status is ScanStatus.ERROR:
            self.errors += 1

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def exit_code(self) -> int:
        """clamscan's codes: 1 when something was found, else 2 on errors, else 0."""
        if self.infected:
            return 1
        if self.errors:
            return 2
        return 0

    def to_dict(self) -> dict[str, float | int]:
        return {"scanned": self.scanned, "infected": self.infected, "skipped": self.skipped,
                "unknown": self.unknown, "errors": self.errors, "bytes": self.bytes,
                "directories": self.directories, "not_modified": self.not_modified,
                "quarantined": self.quarantined, "deleted": self.deleted,
                "elapsed": round(self.elapsed, 3)}


# -- time arguments -------------------------------------------------------------------------
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float | None = None, *, naive_utc: bool = False) -> float:
    """A point in time, in the one grammar of ``--since``, ``--state`` files and the HTTP API's
    ``since``: ``@EPOCH`` or a plain number (epoch seconds), ``2h``/``3d`` (s, m, h, d, w ago),
    or ISO 8601 (``Z`` or an offset allowed). A naive ISO time is local time, or UTC with
    ``naive_utc`` (a network client cannot know the server's zone). Returns a finite epoch
    time; raises ValueError (also for ``nan`` and ``inf``: numbers, but not times)."""
    value = _parse_time(text.strip(), now, naive_utc)
    if not math.isfinite(value):
        raise ValueError(f"not a time: {text.strip()!r}")
    return value


def _parse_time(text: str, now: float | None, naive_utc: bool) -> float:
    if text.startswith("@"):
        return float(text[1:])
    m = _RELATIVE.match(text)
    if m:
        return (time.time() if now is None else now) - float(m.group(1)) * _UNIT_SECONDS[
            m.group(2)]
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"not a time: {text!r} (use ISO 8601, epoch seconds, @EPOCH or "
                             "e.g. 2h, 3d)") from None
    if naive_utc and when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def format_time(ts: float) -> str:
    """An epoch time as ISO 8601 UTC, precise enough to be fed back to ``--since``."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace(
        "+00:00", "Z")


def read_state(path: str) -> float | None:
    """The since-time stored by the previous run, or None when there is no state yet."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return parse_since(text) if text else None


def write_state(path: str, ts: float) -> None:
    """Store ``ts`` for the next run (atomically: a crash keeps the old state)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".avgate-state-", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(format_time(ts) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- walking --------------------------------------------------------------------------------
def is_mbox(path: str) -> bool:
    """A regular file whose first line is an mbox ``From_`` line."""
    try:
        with open(path, "rb") as f:
            return f.read(5) == b"From "
    except OSError:
        return False


def is_maildir(path: str) -> bool:
    return all(os.path.isdir(os.path.join(path, d)) for d in MAILDIR_SUBDIRS)


def unquote_mboxrd(data: bytes) -> bytes:
    """Undo mboxrd ``>From `` quoting (one ``>`` less on every ``^>+From `` line)."""
    return _MBOXRD_QUOTED.sub(rb"\1", data)


def _body(body: bytes) -> bytes:
    # the blank line before the next From_ line separates messages: not content
    if body.endswith(b"\r\n\r\n"):
        body = body[:-2]
    elif body.endswith(b"\n\n"):
        body = body[:-1]
    return unquote_mboxrd(body)


def mbox_body(span: bytes) -> bytes:
    """A message's content from its raw mbox span (the From_ line to the next one), as
    :func:`iter_mbox` yields it."""
    return _body(span.partition(b"\n")[2])


def iter_mbox(path: str) -> Iterator[tuple[MboxMessage, bytes]]:
    """Each message of an mbox: its position and its content (unquoted, no From_ line)."""
    with open(path, "rb") as f:
        index = 0
        start = 0
        offset = 0
        lines: list[bytes] = []
        span = hashlib.sha256()

        def emit() -> tuple[MboxMessage, bytes]:
            return (MboxMessage(path, index, start, offset, span.hexdigest()),
                    _body(b"".join(lines[1:])))

        for line in f:
            if line.startswith(b"From ") and lines:
                yield emit()
                lines, start, span = [], offset, hashlib.sha256()
            if not lines:
                index += 1
            lines.append(line)
            span.update(line)
            offset += len(line)
        if lines:
            yield emit()


def iter_targets(paths: Iterable[str], summary: Summary,
                 on_error: Callable[[str, str], None],
                 since: float | None = None) -> Iterator[Target]:
    """Expand the command-line paths into objects to scan (see the module docstring)."""

    def fresh(path: str) -> bool:
        if since is None:
            return True
        try:
            modified = os.stat(path).st_mtime > since
        except OSError as exc:
            on_error(path, exc.strerror or str(exc))
            return False
        if not modified:
            summary.not_modified += 1
        return modified

    def file_targets(path: str) -> Iterator[Target]:
        if not fresh(path):
            return
        if is_mbox(path):
            try:
                for msg, data in iter_mbox(path):
                    yield Target(f"{path}:{msg.index}", None, data=data, mbox=msg)
            except OSError as exc:
                on_error(path, exc.strerror or str(exc))
        else:
            yield Target(path, path)

    for p in paths:
        if p == "-":
            yield Target("stdin", None)
            continue
        if os.path.isdir(p):
            def walk_error(exc: OSError, top: str = p) -> None:
                on_error(exc.filename or top, exc.strerror or str(exc))

            for root, dirs, files in os.walk(p, onerror=walk_error):
                summary.directories += 1
                dirs.sort()
                if MAILDIR_SUBDIRS <= set(dirs):
                    dirs.remove("tmp")  # deliveries in progress, not messages yet
                for name in sorted(files):
                    if name.startswith(MBOX_TMP_PREFIX):
                        continue  # an mbox copy of ours (see the module docstring)
                    full = os.path.join(root, name)
                    if os.path.islink(full) and not os.path.exists(full):
                        continue
                    if os.path.isfile(full):
                        yield from file_targets(full)
        elif os.path.exists(p):
            yield from file_targets(p)
        else:
            on_error(p, "No such file or directory")


# -- scanning -------------------------------------------------------------------------------
async def _scan_one(service: ScanService, target: Target) -> ScanResult:
    if target.data is not None:
        return await service.scan_bytes(target.data)
    if target.path is not None:
        return await service.scan_path(target.path)
    spool = service.new_spool()
    with spool:
        loop = asyncio.get_running_loop()
        stdin = sys.stdin.buffer
        while chunk := await loop.run_in_executor(None, stdin.read, 1 << 16):
            spool.write(chunk)
        return await service.scan(spool)


async def scan_targets(service: ScanService, targets: Iterable[Target],
                       jobs: int = 4) -> AsyncIterator[tuple[Target, ScanResult]]:
    """Scan targets with at most ``jobs`` in flight, yielding results as they finish."""
    pending: set[asyncio.Task[tuple[Target, ScanResult]]] = set()

    async def run(t: Target) -> tuple[Target, ScanResult]:
        return t, await _scan_one(service, t)

    for target in targets:
        pending.add(asyncio.create_task(run(target)))
        if len(pending) >= jobs:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                yield task.result()
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            yield task.result()


# -- actions --------------------------------------------------------------------------------
def envelope_from_headers(data: bytes, listener: str = "") -> Envelope:
    """Best-effort envelope of a stored message: Return-Path, Delivered-To / X-Original-To
    (what delivery agents record), so a release can send it where it was going. On-demand
    records leave ``listener`` empty: where the object lay is their ``source``."""
    from .quarantine.store import Envelope

    head = data.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
    msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)

    def addr(value: str) -> str:
        return value.strip().strip("<>").strip()

    sender = addr(str(msg.get("Return-Path", "")))
    rcpts = [addr(str(v)) for v in (msg.get_all("Delivered-To") or
                                     msg.get_all("X-Original-To") or [])]
    return Envelope(sender=sender, recipients=tuple(r for r in rcpts if r), listener=listener)


@dataclass(slots=True)
class ActionOutcome:
    """What an action did to one infected object (for the report line)."""

    label: str
    action: str  # "deleted", "quarantined", "error"
    detail: str = ""  # quarantine id, or the error


class Actions:
    """Applies ``--action`` to infected objects; mbox rewrites wait for ``finish``."""

    def __init__(self, action: str, store: Store | None = None) -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r} (use {', '.join(ACTIONS)})")
        if action == "quarantine" and store is None:
            raise ValueError("action quarantine needs a quarantine store")
        self.action = action
        self.store = store
        self._mbox: dict[str, list[tuple[Target, ScanResult]]] = {}
        self._mbox_seen: set[str] = set()  # every mbox met: stale copies are cleaned at finish

    def deferred(self, target: Target, result: ScanResult) -> bool:
        """Whether :meth:`handle` leaves this object's action to :meth:`finish` (an infected
        mbox message: the mbox is rewritten once, with every such message removed)."""
        return (self.action != "report" and result.status is ScanStatus.INFECTED
                and target.mbox is not None)

    def handle(self, target: Target, result: ScanResult) -> ActionOutcome | None:
        """Act on one result now (files) or later (mbox messages); None when nothing to do."""
        if self.action != "report" and target.mbox is not None:
            self._mbox_seen.add(target.mbox.mbox)
        if self.action == "report" or result.status is not ScanStatus.INFECTED:
            return None
        if target.mbox is not None:
            self._mbox.setdefault(target.mbox.mbox, []).append((target, result))
            return None
        if target.path is None:
            return None  # stdin: nothing stored to act on
        try:
            if self.action == "quarantine":
                assert self.store is not None
                with Spool.from_path(target.path) as spool:
                    head = next(spool.chunks(1 << 16), b"")
                    record_id = self.store.put(
                        spool, envelope_from_headers(head), result, frontend="ondemand",
                        rule="ondemand", actions=("quarantine",), source=target.label)
                os.unlink(target.path)
                return ActionOutcome(target.label, "quarantined", record_id)
            os.unlink(target.path)
            return ActionOutcome(target.label, "deleted")
        except Exception as exc:  # an action failure is reported, the run goes on
            return ActionOutcome(target.label, "error", str(exc))

    def finish(self) -> list[ActionOutcome]:
        """Rewrite each mbox that held infected messages; return what happened to each.
        Every other mbox met loses the stale copies a killed run left beside it."""
        outcomes: list[ActionOutcome] = []
        for path, items in sorted(self._mbox.items()):
            outcomes.extend(self._rewrite_mbox(path, sorted(
                items, key=lambda it: it[0].mbox.index if it[0].mbox else 0)))
        for path in sorted(self._mbox_seen - self._mbox.keys()):
            with contextlib.suppress(OSError):  # best effort: nothing was asked of this mbox
                os.close(_open_locked(path))
        self._mbox.clear()
        self._mbox_seen.clear()
        return outcomes

    def _rewrite_mbox(self, path: str,
                      items: list[tuple[Target, ScanResult]]) -> list[ActionOutcome]:
        try:
            fd = _open_locked(path)
        except OSError as exc:
            return [ActionOutcome(t.label, "error", exc.strerror or str(exc)) for t, _ in items]
        try:
            with open(fd, "rb", closefd=False) as f:
                data = f.read()
            removals: list[tuple[int, int]] = []
            outcomes: list[ActionOutcome] = []
            for target, result in items:
                msg = target.mbox
                assert msg is not None
                span = data[msg.start:msg.end]
                if hashlib.sha256(span).hexdigest() != msg.digest:
                    outcomes.append(ActionOutcome(target.label, "error",
                                                  "mbox changed since the scan; left as is"))
                    continue
                detail = ""
                if self.action == "quarantine":
                    assert self.store is not None and target.data is not None
                    try:
                        detail = self.store.put(
                            target.data, envelope_from_headers(target.data), result,
                            frontend="ondemand", rule="ondemand", actions=("quarantine",),
                            source=target.label)
                    except Exception as exc:
                        outcomes.append(ActionOutcome(target.label, "error", str(exc)))
                        continue
                removals.append((msg.start, msg.end))
                outcomes.append(ActionOutcome(
                    target.label, "quarantined" if self.action == "quarantine" else "deleted",
                    detail))
            if removals:
                self._write_without(path, fd, data, removals)
            return outcomes
        except OSError as exc:
            return [ActionOutcome(t.label, "error", exc.strerror or str(exc)) for t, _ in items]
        finally:
            os.close(fd)  # also drops the lock

    @staticmethod
    def _write_without(path: str, fd: int, data: bytes,
                       removals: list[tuple[int, int]]) -> None:
        directory = os.path.dirname(os.path.abspath(path))
        tmp = os.path.join(directory, _mbox_tmp_name(path))
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            named = False
            try:
                # unnamed until complete: nobody listing the directory sees a partial mbox
                out_fd = os.open(".", os.O_TMPFILE | os.O_WRONLY, 0o600, dir_fd=dfd)
            except (OSError, AttributeError):  # no O_TMPFILE on this filesystem (or OS)
                out_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                named = True
            try:
                with os.fdopen(out_fd, "wb") as out:
                    pos = 0
                    for start, end in sorted(removals):
                        out.write(data[pos:start])
                        pos = end
                    out.write(data[pos:])
                    out.flush()
                    st = os.fstat(fd)
                    os.fchmod(out.fileno(), st.st_mode & 0o7777)
                    with contextlib.suppress(PermissionError):  # only root may give away files
                        os.fchown(out.fileno(), st.st_uid, st.st_gid)
                    os.fsync(out.fileno())
                    if not named:
                        # linkat(AT_SYMLINK_FOLLOW) through /proc: the way to name an O_TMPFILE
                        os.link(f"/proc/self/fd/{out.fileno()}", os.path.basename(tmp),
                                dst_dir_fd=dfd, follow_symlinks=True)
                        named = True
                os.replace(tmp, path)
            except BaseException:
                if named:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                raise
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _mbox_tmp_name(path: str) -> str:
    """The name of ``path``'s rewritten copy while it replaces the mbox (a dot-file)."""
    return (f"{MBOX_TMP_PREFIX}{os.path.basename(path)[:_MBOX_TMP_NAME_MAX]}."
            f"{os.getpid()}.tmp")


def _is_stale_copy(name: str, mbox_name: str) -> bool:
    """Whether ``name`` is a rewritten copy of the mbox called ``mbox_name`` (any pid), or a
    copy an older avgate made (``.avgate-mbox-`` and mkstemp's 8 characters)."""
    prefix = f"{MBOX_TMP_PREFIX}{mbox_name[:_MBOX_TMP_NAME_MAX]}."
    if name.startswith(prefix) and name.endswith(".tmp"):
        return name[len(prefix):-len(".tmp")].isdigit()
    return _LEGACY_MBOX_TMP.match(name) is not None


def _open_locked(path: str) -> int:
    """``path`` opened read-write under an exclusive fcntl lock (MDAs lock the mbox with fcntl
    too: nothing is appended while we rewrite), then cleared of stale copies.

    The lock is taken on the file now at ``path``: a process that opened the mbox before
    another one replaced it would otherwise lock, read and rewrite the replaced file. Under
    that lock no live rewrite of this mbox exists, so every copy of it lying beside it was
    left by a run that was killed; removing one can at worst make a concurrent rewrite by an
    older avgate fail cleanly (its rename finds nothing), never lose mail.
    """
    for _ in range(10):
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            now = os.stat(path)
            if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # replaced while we waited for the lock: take the new one
    else:
        raise OSError(errno.EAGAIN, "the mbox keeps being replaced; left as is")
    try:
        directory = os.path.dirname(os.path.abspath(path))
        name = os.path.basename(path)
        for entry in os.scandir(directory):
            if entry.name.startswith(MBOX_TMP_PREFIX) and _is_stale_copy(entry.name, name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
    except OSError:
        os.close(fd)
        raise
    return fd


def scan_bytes_sync(service: ScanService, data: bytes) -> ScanResult:
    """Convenience for scripts: scan bytes without an event loop of your own."""

    async def go() -> ScanResult:
        with Spool.from_bytes(data) as s:
            return await service.scan(s)

    return asyncio.run(go())


def is_dir(path: str) -> bool:
    return Path(path).is_dir()
