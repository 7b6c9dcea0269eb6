"""The file quarantine store (``[quarantine] backend = "file"``, the default): an SQLite index
plus one content file per record. ``[quarantine]`` settings and :func:`open_store` (which
backend the config names) live here too; the interface is :class:`~.base.Store`.

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
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO, Literal

from pydantic import AfterValidator, Field, model_validator

from ..context import Envelope as Envelope  # the transaction a record keeps (re-exported)
from ..errors import NotFound, QuarantineError
from ..settings import Mode, SecretUrl, Section
from .base import (
    AlreadyReleased,
    EnvelopeLike,
    Hashing,
    Record,
    RecordFilter,
    ReleaseClaim,
    Store,
    check_id,
    decision_actions,
    iso_utc,
    like_pattern,
    new_id,
    with_size,
)
from .maildir import MaildirDelivery, check_template

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["AlreadyReleased", "Envelope", "EnvelopeLike", "QuarantineSettings",
           "QuarantineStore", "Record", "RecordFilter", "ReleaseClaim", "Store",
           "decision_actions", "iso_utc", "new_id", "open_store"]

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
    source      TEXT NOT NULL DEFAULT '',  -- on-demand: the scanned path (PATH:N in an mbox)
    refid       TEXT NOT NULL DEFAULT '',  -- the message's RefID
    subject     TEXT NOT NULL DEFAULT '',  -- the held message's Subject (decoded, cleaned)
    releasing   TEXT,               -- token of the release in flight, NULL if none
    releasing_since REAL            -- when that release was claimed
);
CREATE INDEX IF NOT EXISTS records_created ON records(created);
"""
#: columns added after the first release, in order: (name, SQL type and default)
_ADDED_COLUMNS = (("source", "TEXT NOT NULL DEFAULT ''"), ("refid", "TEXT NOT NULL DEFAULT ''"),
                  ("releasing", "TEXT"), ("releasing_since", "REAL"),
                  ("subject", "TEXT NOT NULL DEFAULT ''"))
_COLUMNS = ("id, created, sender, recipients, client_addr, helo, listener, frontend, sha256,"
            " size, status, viruses, result, rule, actions, released, released_to, source,"
            " refid, subject")


class QuarantineSettings(Section):
    """``[quarantine]``: where held objects live, and where releases and reports go.

    backend: ``"file"`` (SQLite index + files under ``path``, one machine) or
    ``"postgresql"`` (records and content in the database at ``dsn``, shared by every
    gateway; create its schema with ``avgate quarantine migrate``); pool_size: connections
    each process keeps to it at most; db_timeout: seconds to connect or get a connection.
    report_to: where false-positive / false-negative reports go (``avgate quarantine
    report``, ``avgate report``); report_fp_to / report_fn_to: false positives / false
    negatives instead ("" = report_to).
    deliver_to_maildir: a Maildir folder template (``{recipient}``, ``{local}``,
    ``{domain}``; absolute): every held message is also written into that folder of each
    recipient whose Maildir exists, beside the record ("" = off, see :mod:`.maildir`);
    maildir_mode: the permissions of those copies.
    """

    backend: Literal["file", "postgresql"] = "file"
    path: str = "./var/quarantine"  # relative to the config file's directory (backend "file")
    dsn: SecretUrl = ""  # "postgresql://user@host:5432/db" (password: .pgpass); shown without it
    pool_size: int = Field(10, ge=1, le=1000)
    # seconds to reach PostgreSQL or wait for a pooled connection: a database that is down
    # costs each quarantined message at most this, then a tempfail
    db_timeout: float = Field(5.0, gt=0, le=300)
    next_hop: str = "127.0.0.1:10026"  # SMTP next hop for releases and reports (host:port)
    report_to: str = ""  # FP/FN reports go here ("" = not set)
    report_fp_to: str = ""  # false-positive reports ("" = report_to)
    report_fn_to: str = ""  # false-negative reports ("" = report_to)
    report_from: str = "avgate@localhost"
    deliver_to_maildir: Annotated[str, AfterValidator(check_template)] = ""
    maildir_mode: Mode = 0o600

    @model_validator(mode="after")
    def _dsn_for_postgresql(self) -> QuarantineSettings:
        if self.backend == "postgresql" and not self.dsn:
            raise ValueError('backend = "postgresql" needs dsn = "postgresql://..."')
        return self

    def report_address(self, kind: str) -> str:
        """The address of a ``false-positive`` / ``false-negative`` report ("" = none)."""
        specific = self.report_fp_to if kind == "false-positive" else self.report_fn_to
        return specific or self.report_to


def open_store(config: Config, *, maildir: bool = True) -> Store:
    """The store ``[quarantine]`` describes (backend, path or dsn; with ``maildir``, the
    Maildir copies). Raises QuarantineError."""
    q = config.quarantine
    delivery = (MaildirDelivery(q.deliver_to_maildir, q.maildir_mode)
                if maildir and q.deliver_to_maildir else None)
    if q.backend == "postgresql":
        from .postgres import PostgresStore

        return PostgresStore(q.dsn, pool_size=q.pool_size, timeout=q.db_timeout,
                             maildir=delivery)
    return QuarantineStore(config.quarantine_path, maildir=delivery)


_SQL_INT_MAX = (1 << 63) - 1


def _glob(value: str | None, pattern: str) -> bool:
    """SQL function ``avgate_glob(value, pattern)``: fnmatch, case-insensitive."""
    return value is not None and fnmatch.fnmatchcase(value.lower(), pattern.lower())


def _lower(value: str | None) -> str | None:
    """SQL function ``avgate_lower(value)``: Python's lower() (SQLite's folds ASCII only)."""
    return None if value is None else value.lower()


def _where(where: RecordFilter | None) -> tuple[str, list[Any]]:
    """The WHERE clause (with its arguments) selecting what ``where`` describes."""
    if where is None:
        return "", []
    # every term is a constant of this function; values only ever travel as parameters
    given = [(term, value) for term, value in (
        ("created >= ?", where.since),
        ("created < ?", where.until),
        ("status = ?", where.status),
        ("frontend = ?", where.frontend),
        ("refid = ?", where.refid.upper() if where.refid is not None else None),
        ("avgate_glob(sender, ?)", where.sender),
        ("avgate_glob(listener, ?)", where.listener),
        # lower-cased in Python on both sides: case folds beyond ASCII, as the globs do
        ("avgate_lower(subject) LIKE ? ESCAPE '\\'",
         like_pattern(where.subject) if where.subject is not None else None),
        ("EXISTS (SELECT 1 FROM json_each(recipients) WHERE avgate_glob(value, ?))",
         where.recipient),
        ("EXISTS (SELECT 1 FROM json_each(viruses) WHERE avgate_glob(value, ?))", where.virus),
    ) if value is not None]
    if not given:
        return "", []
    return " WHERE " + " AND ".join(t for t, _ in given), [v for _, v in given]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


class QuarantineStore(Store):
    """SQLite-indexed quarantine directory (``backend = "file"``). One per process is enough."""

    backend = "file"

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
            # after the migration: an older store gets the column first
            self._db.execute("CREATE INDEX IF NOT EXISTS records_refid ON records(refid)")
            self._db.create_function("avgate_glob", 2, _glob, deterministic=True)
            self._db.create_function("avgate_lower", 1, _lower, deterministic=True)
        except (OSError, sqlite3.Error) as exc:
            raise QuarantineError(f"cannot open quarantine {self.path}: {exc}") from exc
        self.cleanup()

    def _migrate(self) -> None:
        """Bring a store made by an older avgate up to ``_SCHEMA``: add the columns it lacks
        (``_ADDED_COLUMNS``; records held before ``subject`` existed keep an empty one);
        with ``source``, move the scanned path that on-demand records
        used to keep in ``listener`` there."""
        def columns() -> set[str]:
            return {row[1] for row in self._db.execute("PRAGMA table_info(records)")}

        if {name for name, _ in _ADDED_COLUMNS} <= columns():
            return
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")  # one process migrates, the others then see it
            have = columns()
            for name, decl in _ADDED_COLUMNS:
                if name in have:
                    continue
                # both names are constants of this module
                self._db.execute(f"ALTER TABLE records ADD COLUMN {name} {decl}")
                if name == "source":
                    self._db.execute("UPDATE records SET source = listener, listener = ''"
                                     " WHERE frontend = 'ondemand'")

    @classmethod
    def from_config(cls, config: Config) -> QuarantineStore:
        """The file store ``[quarantine]`` describes (path, Maildir copies), whatever its
        ``backend`` (see :func:`open_store` for the configured one)."""
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

    def cleanup(self) -> builtins.list[str]:
        """Remove leftovers of crashed writers; return the names removed."""
        removed: builtins.list[str] = []
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
    def _insert(self, record: Record, chunks: Iterable[bytes],
                expect: tuple[int, str] | None = None) -> None:
        """Stream into a temp file, fsync, rename, fsync the directory, insert the row (see
        the module doc for why in this order)."""
        record_id = check_id(record.id)
        tmp = self.objects / f"{_TMP_PREFIX}{os.getpid()}-{record_id}"
        final = self.objects / record_id
        try:
            size, sha = self._write_temp(tmp, chunks)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            why = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise QuarantineError(f"cannot write quarantine file: {why}") from exc
        if expect is not None and expect != (size, sha):
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise QuarantineError(f"{record_id}: content does not match its record "
                                  f"({size} bytes, sha256 {sha})")
        record = with_size(record, size, sha)
        try:
            with self._locked():
                os.replace(tmp, final)
                self._fsync_dir()
                try:
                    with self._db:
                        self._db.execute("BEGIN IMMEDIATE")
                        self._db.execute(
                            f"INSERT INTO records ({_COLUMNS})"  # noqa: S608
                            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", _row(record))
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

    def _write_temp(self, tmp: Path, chunks: Iterable[bytes]) -> tuple[int, str]:
        hashing = Hashing(chunks)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            for chunk in hashing:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        return hashing.size, hashing.sha256

    def _fsync_dir(self) -> None:
        fd = os.open(self.objects, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- reading --------------------------------------------------------------------------
    def get(self, record_id: str) -> Record:
        """The record's metadata; NotFound if there is none."""
        check_id(record_id)
        row = self._db.execute(f"SELECT {_COLUMNS} FROM records WHERE id = ?",  # noqa: S608
                               (record_id,)).fetchone()
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
            f"SELECT {_COLUMNS} FROM records{sql} ORDER BY id LIMIT ? OFFSET ?",  # noqa: S608
            args)
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
         viruses, result, rule, actions, released, released_to, source, refid,
         subject) = row
        return Record(
            id=rid, created=created,
            envelope=Envelope(sender, tuple(json.loads(rcpts)), client, helo, listener),
            frontend=frontend, sha256=sha, size=size, status=status,
            viruses=tuple(json.loads(viruses)), result=json.loads(result), rule=rule,
            actions=tuple(json.loads(actions)), released=released,
            released_to=tuple(json.loads(released_to)) if released_to else (), source=source,
            refid=refid, subject=subject)

    # -- changing -------------------------------------------------------------------------
    def _claim(self, record_id: str, token: str, now: float, stale_before: float,
               force: bool) -> bool:
        # one UPDATE: SQLite runs it under its write lock, across processes too; the thread
        # lock keeps it out of another thread's transaction on the shared connection
        with self._thread_lock, self._db:
            cur = self._db.execute(
                "UPDATE records SET releasing = ?, releasing_since = ? WHERE id = ?"
                " AND (? OR released IS NULL)"
                " AND (releasing IS NULL OR releasing_since < ?)",
                (token, now, record_id, force, stale_before))
        return cur.rowcount == 1

    def _finish(self, record_id: str, token: str | None, recipients: Sequence[str],
                when: float) -> None:
        with self._thread_lock, self._db:
            self._db.execute(
                "UPDATE records SET released = ?, released_to = ?, releasing = NULL,"
                " releasing_since = NULL WHERE id = ? AND (? IS NULL OR releasing = ?)",
                (when, json.dumps(list(recipients)), record_id, token, token))

    def abort_release(self, claim: ReleaseClaim) -> None:
        with self._thread_lock, self._db:
            self._db.execute("UPDATE records SET releasing = NULL, releasing_since = NULL"
                             " WHERE id = ? AND releasing = ?", (claim.record.id, claim.token))

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

    def _ids_before(self, cutoff: float) -> builtins.list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT id FROM records WHERE created < ? ORDER BY id", (cutoff,))]

    def _ids_after(self, last: str, limit: int) -> builtins.list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT id FROM records WHERE id > ? ORDER BY id LIMIT ?", (last, limit))]


def _row(record: Record) -> tuple[Any, ...]:
    """The values of ``_COLUMNS`` for ``record``."""
    env = record.envelope
    return (record.id, record.created, env.sender, json.dumps(list(env.recipients)),
            env.client_addr, env.helo, env.listener, record.frontend, record.sha256,
            record.size, record.status, json.dumps(list(record.viruses)),
            json.dumps(record.result), record.rule, json.dumps(list(record.actions)),
            record.released,
            json.dumps(list(record.released_to)) if record.released is not None else None,
            record.source, record.refid, record.subject)
