"""The quarantine store: an SQLite index plus one content file per record.

Layout under the configured directory (mode 0o700)::

    index.sqlite3          one row per record (envelope, result, rule, actions, times)
    objects/<id>           the content, byte-for-byte as received (mode 0o600)
    objects/.tmp-<pid>-<id>  a write in progress
    lock                   fcntl lock serialising "publish" steps between processes

Write order (``put``): stream into a temp file, fsync, rename to ``objects/<id>``, fsync the
directory, then insert the row in a transaction — all of the rename + insert under the store
lock. A crash can therefore leave a temp file (its writer's pid is dead) or a complete file
without a row, never a row without content nor a half-written ``objects/<id>``. Opening the
store removes both kinds of leftovers; the lock keeps it from racing a live writer.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import fnmatch
import json
import os
import re
import secrets
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO, Protocol

from pydantic import AfterValidator

from ..context import Envelope as Envelope  # the transaction a record keeps (re-exported)
from ..errors import NotFound, QuarantineError
from ..result import ScanResult
from ..settings import Mode, Section
from ..spool import Spool
from .addresses import parse_addresses
from .maildir import MaildirDelivery, UnsafeRecipient, check_template

if TYPE_CHECKING:
    from ..config import Config
    from ..policy import Decision

_CHUNK = 1 << 16
_ID_RE = re.compile(r"^\d{8}T\d{6}\d{6}Z-[0-9a-f]{16}$")
_TMP_PREFIX = ".tmp-"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id          TEXT PRIMARY KEY,
    created     REAL NOT NULL,
    sender      TEXT NOT NULL,
    recipients  TEXT NOT NULL,      -- JSON array
    client_addr TEXT NOT NULL,
    helo        TEXT NOT NULL,
    listener    TEXT NOT NULL,
    frontend    TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    size        INTEGER NOT NULL,
    status      TEXT NOT NULL,
    viruses     TEXT NOT NULL,      -- JSON array of finding names
    result      TEXT NOT NULL,      -- ScanResult.to_dict() as JSON
    rule        TEXT NOT NULL,
    actions     TEXT NOT NULL,      -- JSON array
    released    REAL,               -- time of the last release, NULL if never
    released_to TEXT,               -- JSON array of the recipients of the last release
    source      TEXT NOT NULL DEFAULT ''  -- on-demand: the scanned path (PATH:N in an mbox)
);
CREATE INDEX IF NOT EXISTS records_created ON records(created);
"""



class QuarantineSettings(Section):
    """``[quarantine]``: where held objects live, and where releases and reports go.

    report_to: where false-positive / false-negative reports go (``avgate quarantine
    report``, ``avgate report``); report_fp_to / report_fn_to: false positives / false
    negatives instead ("" = report_to).
    deliver_to_maildir: a Maildir folder template (``{recipient}``, ``{local}``,
    ``{domain}``; absolute): every held message is also written into that folder of each
    recipient whose Maildir exists, beside the record ("" = off, see :mod:`.maildir`);
    maildir_mode: the permissions of those copies.
    """

    path: str = "./var/quarantine"  # relative to the config file's directory
    next_hop: str = "127.0.0.1:10026"  # SMTP next hop for releases and reports (host:port)
    report_to: str = ""  # FP/FN reports go here ("" = not set)
    report_fp_to: str = ""  # false-positive reports ("" = report_to)
    report_fn_to: str = ""  # false-negative reports ("" = report_to)
    report_from: str = "avgate@localhost"
    deliver_to_maildir: Annotated[str, AfterValidator(check_template)] = ""
    maildir_mode: Mode = 0o600

    def report_address(self, kind: str) -> str:
        """The address of a ``false-positive`` / ``false-negative`` report ("" = none)."""
        specific = self.report_fp_to if kind == "false-positive" else self.report_fn_to
        return specific or self.report_to


class EnvelopeLike(Protocol):
    """Anything with an envelope's fields (front-ends may keep their own envelope type)."""

    @property
    def sender(self) -> str: ...
    @property
    def recipients(self) -> Sequence[str]: ...
    @property
    def client_addr(self) -> str: ...
    @property
    def helo(self) -> str: ...
    @property
    def listener(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Record:
    """One quarantined object's metadata (the content is read with ``open_raw``)."""

    id: str
    created: float
    envelope: Envelope
    frontend: str
    sha256: str
    size: int
    status: str
    viruses: tuple[str, ...]
    result: dict[str, Any]
    rule: str
    actions: tuple[str, ...]
    released: float | None = None
    released_to: tuple[str, ...] = field(default=())
    source: str = ""  # on-demand records: the scanned path (PATH:N for an mbox message)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        return {
            "id": self.id,
            "created": iso_utc(self.created),
            "sender": self.envelope.sender,
            "recipients": list(self.envelope.recipients),
            "client_addr": self.envelope.client_addr,
            "helo": self.envelope.helo,
            "listener": self.envelope.listener,
            "source": self.source,
            "frontend": self.frontend,
            "sha256": self.sha256,
            "size": self.size,
            "status": self.status,
            "viruses": list(self.viruses),
            "rule": self.rule,
            "actions": list(self.actions),
            "released": iso_utc(self.released) if self.released is not None else None,
            "released_to": list(self.released_to),
            "result": self.result,
        }


@dataclass(frozen=True, slots=True)
class RecordFilter:
    """Which records :meth:`QuarantineStore.list` returns (None: any; all given must match).

    Globs are fnmatch patterns (``*``, ``?``, ``[...]``), compared case-insensitively.
    """

    virus: str | None = None  # glob on any finding name
    sender: str | None = None  # glob on the envelope sender
    recipient: str | None = None  # glob on any envelope recipient
    status: str | None = None  # exact scan status (infected, skipped...)
    frontend: str | None = None  # exact front-end name (smtp, http...)
    since: float | None = None  # created at or after this epoch time


_SQL_INT_MAX = (1 << 63) - 1


def _glob(value: str | None, pattern: str) -> bool:
    """SQL function ``avgate_glob(value, pattern)``: fnmatch, case-insensitive."""
    return value is not None and fnmatch.fnmatchcase(value.lower(), pattern.lower())


def _where(where: RecordFilter | None) -> tuple[str, list[Any]]:
    """The WHERE clause (with its arguments) selecting what ``where`` describes."""
    if where is None:
        return "", []
    # every term is a constant of this function; values only ever travel as parameters
    given = [(term, value) for term, value in (
        ("created >= ?", where.since),
        ("status = ?", where.status),
        ("frontend = ?", where.frontend),
        ("avgate_glob(sender, ?)", where.sender),
        ("EXISTS (SELECT 1 FROM json_each(recipients) WHERE avgate_glob(value, ?))",
         where.recipient),
        ("EXISTS (SELECT 1 FROM json_each(viruses) WHERE avgate_glob(value, ?))", where.virus),
    ) if value is not None]
    if not given:
        return "", []
    return " WHERE " + " AND ".join(t for t, _ in given), [v for _, v in given]


def iso_utc(ts: float) -> str:
    """An epoch time as ISO 8601 UTC with a trailing Z."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_id(now: float | None = None) -> str:
    """A sortable, unguessable id: UTC time to the microsecond, then 64 random bits."""
    now = time.time() if now is None else now
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%S%f")
    return f"{stamp}Z-{secrets.token_hex(8)}"


def decision_actions(decision: Decision | None) -> tuple[str, tuple[str, ...]]:
    """(rule, actions) of a policy decision; an on-demand quarantine has no decision."""
    if decision is None:
        return "", ("quarantine",)
    return decision.rule, tuple(decision.actions)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


class QuarantineStore:
    """SQLite-indexed quarantine directory. One instance per process is enough."""

    def __init__(self, path: str | os.PathLike[str], *,
                 maildir: MaildirDelivery | None = None) -> None:
        self._thread_lock = threading.RLock()
        self.maildir = maildir  # deliver_to_maildir: copies beside each record
        self.path = Path(path)
        self.objects = self.path / "objects"
        try:
            # 0o700: quarantined mail is private; mkdir's mode is masked by umask, so chmod.
            for d in (self.path, self.objects):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(d, 0o700)
            self._lock_fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
            db = self.path / "index.sqlite3"
            fresh = not db.exists()
            self._db = sqlite3.connect(db, timeout=30.0, isolation_level=None,
                                       check_same_thread=False)
            if fresh:
                os.chmod(db, 0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._migrate()
            self._db.create_function("avgate_glob", 2, _glob, deterministic=True)
        except (OSError, sqlite3.Error) as exc:
            raise QuarantineError(f"cannot open quarantine {self.path}: {exc}") from exc
        self.cleanup()

    def _migrate(self) -> None:
        """Bring a store made by an older avgate up to ``_SCHEMA``: add ``source``, and move
        the scanned path that on-demand records used to keep in ``listener`` there."""
        def columns() -> set[str]:
            return {row[1] for row in self._db.execute("PRAGMA table_info(records)")}

        if "source" in columns():
            return
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")  # one process migrates, the others then see it
            if "source" not in columns():
                self._db.execute("ALTER TABLE records ADD COLUMN source TEXT NOT NULL DEFAULT ''")
                self._db.execute("UPDATE records SET source = listener, listener = ''"
                                 " WHERE frontend = 'ondemand'")

    @classmethod
    def from_config(cls, config: Config) -> QuarantineStore:
        """The store ``[quarantine]`` describes (path, Maildir copies)."""
        q = config.quarantine
        maildir = (MaildirDelivery(q.deliver_to_maildir, q.maildir_mode)
                   if q.deliver_to_maildir else None)
        return cls(config.quarantine_path, maildir=maildir)

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        """Close the index and the lock file."""
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    def __enter__(self) -> QuarantineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # flock excludes other processes; the RLock excludes other threads of this one
        # (gateway writes from worker threads, and they share one sqlite connection).
        with self._thread_lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def cleanup(self) -> list[str]:
        """Remove leftovers of crashed writers; return the names removed."""
        removed: list[str] = []
        with self._locked():
            known = {row[0] for row in self._db.execute("SELECT id FROM records")}
            for entry in os.scandir(self.objects):
                name = entry.name
                if name.startswith(_TMP_PREFIX):
                    pid_text = name[len(_TMP_PREFIX):].partition("-")[0]
                    # a temp file of a live writer is still being filled: leave it alone
                    if pid_text.isdigit() and _pid_alive(int(pid_text)):
                        continue
                elif name in known:
                    continue
                # a complete file without a row: its writer died between rename and insert
                # (we hold the lock, so no live writer is in that step now)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                removed.append(name)
        return removed

    # -- writing --------------------------------------------------------------------------
    def put(self, content: Spool | bytes, envelope: EnvelopeLike, result: ScanResult,
            decision: Decision | None = None, frontend: str = "", listener: str = "",
            *, rule: str | None = None, actions: Sequence[str] | None = None,
            source: str = "") -> str:
        """Store ``content`` byte-for-byte with its metadata; return the new id.

        ``rule``/``actions`` override what is derived from ``decision`` (e.g. on-demand scans
        have no decision); ``source``: where an on-demand scan found the object. Raises
        QuarantineError (disk full included: front-ends tempfail).
        """
        record_id = new_id()
        d_rule, d_actions = decision_actions(decision)
        rule = d_rule if rule is None else rule
        actions = d_actions if actions is None else tuple(actions)
        envelope = Envelope(envelope.sender, tuple(envelope.recipients), envelope.client_addr,
                            envelope.helo, listener or envelope.listener)
        tmp = self.objects / f"{_TMP_PREFIX}{os.getpid()}-{record_id}"
        final = self.objects / record_id
        try:
            size, sha = self._write_temp(tmp, content)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            why = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise QuarantineError(f"cannot write quarantine file: {why}") from exc
        row = (record_id, time.time(), envelope.sender, json.dumps(list(envelope.recipients)),
               envelope.client_addr, envelope.helo, envelope.listener, frontend, sha, size,
               result.status.value, json.dumps(list(result.virus_names)),
               json.dumps(result.to_dict()), rule, json.dumps(list(actions)), source)
        try:
            with self._locked():
                os.replace(tmp, final)
                self._fsync_dir()
                try:
                    with self._db:
                        self._db.execute("BEGIN IMMEDIATE")
                        self._db.execute(
                            "INSERT INTO records (id, created, sender, recipients, client_addr,"
                            " helo, listener, frontend, sha256, size, status, viruses, result,"
                            " rule, actions, source) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                            row)
                except sqlite3.Error:
                    with contextlib.suppress(OSError):
                        os.unlink(final)
                    raise
        except (OSError, sqlite3.Error) as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            why = ("disk full" if isinstance(exc, OSError) and exc.errno == errno.ENOSPC
                   else str(exc))
            raise QuarantineError(f"cannot store quarantine record: {why}") from exc
        self._update_metrics()
        if self.maildir is not None:
            self.deliver_to_maildirs(record_id, envelope.recipients)
        return record_id

    def deliver_to_maildirs(self, record_id: str, recipients: Sequence[str]
                            ) -> builtins.list[Path]:
        """Copy a record into each recipient's ``deliver_to_maildir`` folder; the copies.

        A copy is a convenience beside the record, never instead of it: a recipient without
        a mailbox here is skipped, and one that cannot get its copy (an address unfit for a
        path, a write error, a symlinked folder) costs only that copy, said on stderr.
        """
        delivered: builtins.list[Path] = []
        if self.maildir is None:
            return delivered
        source = self.objects / self._check_id(record_id)
        seen: set[Path] = set()
        for rcpt in recipients:
            try:
                folder = self.maildir.folder_for(rcpt)
                if folder in seen:
                    continue
                seen.add(folder)
                copy = self.maildir.deliver_to(folder, source, record_id)
            except (OSError, UnsafeRecipient) as exc:
                print(f"avgate: quarantine {record_id}: cannot deliver to the Maildir of "
                      f"{rcpt!r}: {exc}", file=sys.stderr)
                continue
            if copy is not None:
                delivered.append(copy)
        return delivered

    def _write_temp(self, tmp: Path, content: Spool | bytes) -> tuple[int, str]:
        import hashlib

        h = hashlib.sha256()
        size = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            chunks: Iterator[bytes] | Sequence[bytes]
            # a Spool may be a large file: copy it in chunks, never as one bytes object
            chunks = content.chunks(_CHUNK) if isinstance(content, Spool) else (content,)
            for chunk in chunks:
                out.write(chunk)
                h.update(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        return size, h.hexdigest()

    def _fsync_dir(self) -> None:
        fd = os.open(self.objects, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- reading --------------------------------------------------------------------------
    def _check_id(self, record_id: str) -> str:
        # ids become file names: refuse anything that is not exactly our format
        if not _ID_RE.match(record_id):
            raise NotFound(f"no quarantine record {record_id!r}")
        return record_id

    def get(self, record_id: str) -> Record:
        """The record's metadata; NotFound if there is none."""
        self._check_id(record_id)
        row = self._db.execute("SELECT * FROM records WHERE id = ?", (record_id,)).fetchone()
        if row is None:
            raise NotFound(f"no quarantine record {record_id!r}")
        return self._record(row)

    def content_path(self, record_id: str) -> Path:
        """Path of the content file of an existing record."""
        self.get(record_id)
        return self.objects / record_id

    def open_raw(self, record_id: str) -> BinaryIO:
        """The content exactly as received, opened for reading."""
        path = self.content_path(record_id)
        try:
            return open(path, "rb")  # the caller closes it
        except OSError as exc:
            raise QuarantineError(f"cannot read {path}: {exc.strerror}") from exc

    def read_raw(self, record_id: str) -> bytes:
        """The whole content as bytes (for release and report, which send it in one piece)."""
        with self.open_raw(record_id) as f:
            return f.read()

    def list(self, where: RecordFilter | None = None, limit: int | None = None,
             offset: int = 0) -> builtins.list[Record]:
        """Records matching ``where``, oldest first; at most ``limit`` after skipping ``offset``.

        The filter runs in SQL (globs through :func:`_glob`), so a page costs the rows it
        returns, not the whole store.
        """
        sql, args = _where(where)
        # SQLite integers are 64-bit: an offset past that is past every record anyway
        args += [-1 if limit is None else min(limit, _SQL_INT_MAX),
                 min(max(offset, 0), _SQL_INT_MAX)]
        rows = self._db.execute(
            f"SELECT * FROM records{sql} ORDER BY id LIMIT ? OFFSET ?", args)  # noqa: S608
        return [self._record(row) for row in rows]

    def count(self, where: RecordFilter | None = None) -> int:
        """How many records match ``where`` (the total behind a page of :meth:`list`)."""
        sql, args = _where(where)
        found = self._db.execute(f"SELECT COUNT(*) FROM records{sql}", args)  # noqa: S608
        return int(found.fetchone()[0])

    def stats(self) -> tuple[int, int]:
        """(records, bytes) in the store."""
        n, total = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records"
                                    ).fetchone()
        return int(n), int(total)

    @staticmethod
    def _record(row: tuple[Any, ...]) -> Record:
        (rid, created, sender, rcpts, client, helo, listener, frontend, sha, size, status,
         viruses, result, rule, actions, released, released_to, source) = row
        return Record(
            id=rid, created=created,
            envelope=Envelope(sender, tuple(json.loads(rcpts)), client, helo, listener),
            frontend=frontend, sha256=sha, size=size, status=status,
            viruses=tuple(json.loads(viruses)), result=json.loads(result), rule=rule,
            actions=tuple(json.loads(actions)), released=released,
            released_to=tuple(json.loads(released_to)) if released_to else (), source=source)

    # -- changing -------------------------------------------------------------------------
    def mark_released(self, record_id: str, recipients: Sequence[str],
                      when: float | None = None) -> None:
        """Record that the object was released to ``recipients``.

        Each address goes through :func:`~.addresses.parse_addresses` first (InvalidAddress):
        ``released_to`` never holds a CR/LF or other junk, whoever calls this.
        """
        recipients = parse_addresses(recipients)
        self.get(record_id)
        with self._db:
            self._db.execute("UPDATE records SET released = ?, released_to = ? WHERE id = ?",
                             (time.time() if when is None else when,
                              json.dumps(list(recipients)), record_id))

    def delete(self, record_id: str) -> None:
        """Remove a record and its content; NotFound if there is none."""
        self.get(record_id)
        with self._locked():
            # row first: a crash after it leaves an orphan file (cleaned on open), never a row
            # whose content is gone
            with self._db:
                self._db.execute("DELETE FROM records WHERE id = ?", (record_id,))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.objects / record_id)
        self._update_metrics()

    def purge(self, older_than_days: float, now: float | None = None) -> builtins.list[str]:
        """Delete every record created more than ``older_than_days`` ago; return their ids."""
        cutoff = (time.time() if now is None else now) - older_than_days * 86400
        ids = [r[0] for r in self._db.execute(
            "SELECT id FROM records WHERE created < ? ORDER BY id", (cutoff,))]
        for rid in ids:
            self.delete(rid)
        return ids

    def _update_metrics(self) -> None:
        from ..observability import set_quarantine_size

        set_quarantine_size(*self.stats())
