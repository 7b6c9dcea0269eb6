"""The PostgreSQL quarantine store (``[quarantine] backend = "postgresql"``).

Every gateway that names the same ``dsn`` shares one quarantine: a message held by gateway A
is listed, released or deleted through gateway B, and losing a gateway loses none of it.

Tables (created and migrated by ``avgate quarantine migrate``, never implicitly)::

    avgate_quarantine_schema  (version)                        which migrations ran
    quarantine_records        one row per record; arrays for recipients/viruses/actions,
                              jsonb for the ScanResult; indexes on created, (status, created),
                              (frontend, created), refid, sha256
    quarantine_content        (id, seq, data bytea): the content in 1 MiB chunks, written
                              with COPY and read one chunk at a time, so a 100 MiB message
                              never sits in memory; ON DELETE CASCADE from its record

``put`` writes the chunks and the row in one transaction (the content's foreign key is
checked at commit): a record is visible with all its content or not at all, and the gateway
acknowledges the message only after the commit returned.

Why psycopg 3 (synchronous, with ``psycopg_pool``) and not asyncpg: the store interface is
synchronous — the SQLite backend must be, and the gateway already calls ``put`` in a worker
thread (``asyncio.to_thread``), the CLI and on-demand scans call it directly. psycopg's
thread-safe pool serves those threads; asyncpg would need a second, async interface and an
event loop in every CLI command. psycopg also gives binary COPY (the content) and adapts
arrays and jsonb.

The console's glob filters run in SQL as anchored regular expressions
(:func:`glob_to_regex`, fnmatch's own reading of each ``[...]`` set), compared with the
lower-cased column; no index serves a leading ``*``, but the time/status/front-end terms do.
The subject filter is a ``LIKE '%text%'`` with its wildcards escaped (:func:`.base.like_pattern`)
on ``lower(subject)``; ``lower`` folds what the database's collation folds (all of Unicode in
a UTF-8 locale, ASCII only under ``C``).
"""

from __future__ import annotations

import builtins
import contextlib
import fnmatch
import io
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from ..context import Envelope
from ..errors import NotFound, QuarantineError
from .base import (
    ChunkReader,
    Hashing,
    Record,
    RecordFilter,
    ReleaseClaim,
    Store,
    check_id,
    like_pattern,
    with_size,
)
from .maildir import MaildirDelivery

if TYPE_CHECKING:
    from psycopg import Connection
    from psycopg_pool import ConnectionPool

DB_CHUNK = 1 << 20  # bytes per quarantine_content row
CONNECT_TIMEOUT = 5.0  # seconds to reach the server or get a pooled connection (default)

#: (version, statements): applied in order by :func:`migrate`, each in its own transaction
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, (
        """CREATE TABLE quarantine_records (
            id              text PRIMARY KEY,
            created         double precision NOT NULL,
            sender          text NOT NULL,
            recipients      text[] NOT NULL,
            client_addr     text NOT NULL,
            helo            text NOT NULL,
            listener        text NOT NULL,
            frontend        text NOT NULL,
            sha256          text NOT NULL,
            size            bigint NOT NULL,
            status          text NOT NULL,
            viruses         text[] NOT NULL,
            result          jsonb NOT NULL,
            rule            text NOT NULL,
            actions         text[] NOT NULL,
            released        double precision,
            released_to     text[],
            source          text NOT NULL DEFAULT '',
            refid           text NOT NULL DEFAULT '',
            releasing       text,
            releasing_since double precision)""",
        """CREATE TABLE quarantine_content (
            id   text NOT NULL REFERENCES quarantine_records (id)
                 ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
            seq  integer NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (id, seq))""",
        "CREATE INDEX quarantine_records_created ON quarantine_records (created)",
        "CREATE INDEX quarantine_records_status ON quarantine_records (status, created)",
        "CREATE INDEX quarantine_records_frontend ON quarantine_records (frontend, created)",
        "CREATE INDEX quarantine_records_refid ON quarantine_records (refid)",
        "CREATE INDEX quarantine_records_sha256 ON quarantine_records (sha256)",
    )),
    # the held message's Subject (the console's subject column and filter); records held
    # before it keep an empty one
    (2, (
        "ALTER TABLE quarantine_records ADD COLUMN subject text NOT NULL DEFAULT ''",
    )),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
_BIGINT_MAX = (1 << 63) - 1
_MIGRATE_LOCK = 0x61766761  # pg_advisory_xact_lock key: one migrator at a time

_COLUMNS = ("id, created, sender, recipients, client_addr, helo, listener, frontend, sha256,"
            " size, status, viruses, result, rule, actions, released, released_to, source,"
            " refid, subject")


# -- globs ------------------------------------------------------------------------------------
_PY_SET = re.compile(r"^\(\?s:(?P<body>.*)\)\\Z$", re.DOTALL)


def _pg_char(c: str) -> str:
    """One literal character for a PostgreSQL ARE (escaped unless a letter or digit)."""
    if c.isascii() and c.isalnum():
        return c
    code = ord(c)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _python_set_to_pg(py: str) -> str:
    """fnmatch's translation of one ``[...]`` (a Python regex) as a PostgreSQL ARE atom."""
    body = _PY_SET.match(py)
    if body is None:  # pragma: no cover - fnmatch's output format changed
        raise ValueError(f"unexpected fnmatch translation {py!r}")
    text = body.group("body")
    if text == "(?!)":
        return "[^\\u0000-\\U0010ffff]"  # an empty set: matches nothing
    if text == ".":
        return "."  # a negated empty set: any character
    if not (text.startswith("[") and text.endswith("]")):  # pragma: no cover
        raise ValueError(f"unexpected fnmatch translation {py!r}")
    inner = text[1:-1]
    out = ["["]
    i = 0
    if inner.startswith("^"):
        out.append("^")
        i = 1
    items: builtins.list[str] = []
    while i < len(inner):
        c = inner[i]
        if c == "\\":  # fnmatch escapes \ - & ~ | ^ [ with a backslash
            c = inner[i + 1]
            i += 2
            items.append(_pg_char(c))
        elif c == "-" and items and i + 1 < len(inner):  # a range: previous item - next
            nxt = inner[i + 1]
            if nxt == "\\":
                nxt = inner[i + 2]
                i += 3
            else:
                i += 2
            items.append("-" + _pg_char(nxt))
        else:
            items.append(_pg_char(c))
            i += 1
    out.extend(items)
    out.append("]")
    return "".join(out)


def glob_to_regex(pattern: str) -> str:
    """An anchored PostgreSQL regular expression (ARE) matching what
    ``fnmatch.fnmatchcase(value, pattern)`` matches: ``*``, ``?``, ``[...]``, ``[!...]``
    (each set read by fnmatch itself, so ranges and odd sets mean the same), every other
    character literal. Case is the caller's business (both sides are lower-cased)."""
    out = ["^(?:"]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            if not out[-1] == ".*":  # ** is *
                out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            # the set's end, found as fnmatch finds it
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                out.append(_pg_char("["))
            else:
                out.append(_python_set_to_pg(fnmatch.translate(pattern[i - 1:j + 1])))
                i = j + 1
        else:
            out.append(_pg_char(c))
    out.append(")$")
    return "".join(out)


def _where(where: RecordFilter | None) -> tuple[str, builtins.list[Any]]:
    """The WHERE clause (with its arguments) selecting what ``where`` describes."""
    if where is None:
        return "", []
    # every term is a constant of this function; values only ever travel as parameters
    def rx(glob: str | None) -> str | None:
        return None if glob is None else glob_to_regex(glob.lower())

    def text(value: str | None) -> str | None:
        # PostgreSQL text cannot hold a NUL (psycopg refuses to send one); no stored status,
        # front-end or RefID holds a NUL or a \x01 either, so this still matches nothing, as
        # in the file store (the subject's pattern does the same, see like_pattern)
        return None if value is None else value.replace("\x00", "\x01")

    given = [(term, value) for term, value in (
        ("created >= %s", where.since),
        ("created < %s", where.until),
        ("status = %s", text(where.status)),
        ("frontend = %s", text(where.frontend)),
        ("refid = %s", text(where.refid.upper()) if where.refid is not None else None),
        ("lower(sender) ~ %s", rx(where.sender)),
        ("lower(listener) ~ %s", rx(where.listener)),
        ("lower(subject) LIKE %s ESCAPE '\\'",
         like_pattern(where.subject) if where.subject is not None else None),
        ("EXISTS (SELECT 1 FROM unnest(recipients) AS r WHERE lower(r) ~ %s)",
         rx(where.recipient)),
        ("EXISTS (SELECT 1 FROM unnest(viruses) AS v WHERE lower(v) ~ %s)", rx(where.virus)),
    ) if value is not None]
    if not given:
        return "", []
    return " WHERE " + " AND ".join(t for t, _ in given), [v for _, v in given]


# -- schema -----------------------------------------------------------------------------------
def _import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:  # no psycopg, or no libpq for it
        raise QuarantineError(
            f"backend postgresql needs psycopg 3 and libpq (Debian libpq5): {exc}") from exc
    return psycopg


def _schema_version(conn: Connection[Any]) -> int:
    found = conn.execute("SELECT to_regclass('avgate_quarantine_schema')").fetchone()
    if found is None or found[0] is None:
        return 0
    row = conn.execute("SELECT max(version) FROM avgate_quarantine_schema").fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0


def migrate(dsn: str) -> builtins.list[int]:
    """Create or bring the schema at ``dsn`` up to :data:`SCHEMA_VERSION`; the versions
    applied (none when it was current). Safe to run from several hosts at once."""
    psycopg = _import_psycopg()
    applied: builtins.list[int] = []
    try:
        with psycopg.connect(dsn, connect_timeout=_libpq_timeout(CONNECT_TIMEOUT)) as conn:
            for version, statements in MIGRATIONS:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
                    conn.execute("CREATE TABLE IF NOT EXISTS avgate_quarantine_schema"
                                 " (version integer PRIMARY KEY)")
                    if _schema_version(conn) >= version:
                        continue
                    for statement in statements:
                        conn.execute(statement)
                    conn.execute("INSERT INTO avgate_quarantine_schema (version) VALUES (%s)",
                                 (version,))
                    applied.append(version)
    except psycopg.Error as exc:
        raise QuarantineError(f"cannot migrate the quarantine database: {exc}") from exc
    return applied


# -- the store --------------------------------------------------------------------------------
class PostgresStore(Store):
    """Records and content in PostgreSQL (see the module doc). Thread-safe."""

    backend = "postgresql"

    def __init__(self, dsn: str, *, pool_size: int = 10, timeout: float = CONNECT_TIMEOUT,
                 maildir: MaildirDelivery | None = None) -> None:
        psycopg = _import_psycopg()
        from psycopg_pool import ConnectionPool

        self._errors: tuple[type[Exception], ...] = (psycopg.Error,)
        self.maildir = maildir
        self.dsn = dsn
        try:
            # one direct connection first: a wrong DSN or a server that is down is said at
            # once, in libpq's words (the pool would retry in the background until timeout)
            with psycopg.connect(dsn, connect_timeout=_libpq_timeout(timeout)) as conn:
                version = _schema_version(conn)
        except psycopg.Error as exc:
            raise QuarantineError(f"cannot open the quarantine database: {exc}") from exc
        if version != SCHEMA_VERSION:
            raise QuarantineError(
                f"the quarantine database has schema version {version}, this avgate needs "
                f"{SCHEMA_VERSION}: run `avgate quarantine migrate`")
        # check: a connection broken by a server restart is replaced, not handed out
        self._pool: ConnectionPool[Any] = ConnectionPool(
            dsn, min_size=1, max_size=pool_size, open=True, timeout=timeout,
            name="avgate-quarantine", check=ConnectionPool.check_connection,
            kwargs={"connect_timeout": _libpq_timeout(timeout)})

    def close(self) -> None:
        self._pool.close()

    @contextlib.contextmanager
    def _conn(self, what: str) -> Iterator[Connection[Any]]:
        """A pooled connection in a transaction (committed on success); every database
        error becomes a QuarantineError saying ``what`` failed."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except self._errors as exc:
            raise QuarantineError(f"quarantine database: cannot {what}: {exc}") from exc

    # -- writing --------------------------------------------------------------------------
    def _insert(self, record: Record, chunks: Iterable[bytes],
                expect: tuple[int, str] | None = None) -> None:
        hashing = Hashing(chunks)
        with self._conn("store the record") as conn, conn.cursor() as cur:
            with cur.copy("COPY quarantine_content (id, seq, data) FROM STDIN"
                          " (FORMAT BINARY)") as copy:
                copy.set_types(["text", "int4", "bytea"])
                seq = 0
                for block in _blocks(hashing, DB_CHUNK):
                    copy.write_row((record.id, seq, block))
                    seq += 1
            if expect is not None and expect != (hashing.size, hashing.sha256):
                raise QuarantineError(f"{record.id}: content does not match its record "
                                      f"({hashing.size} bytes, sha256 {hashing.sha256})")
            record = with_size(record, hashing.size, hashing.sha256)
            cur.execute(f"INSERT INTO quarantine_records ({_COLUMNS}) VALUES"  # noqa: S608
                        " (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                        _row(record))

    def _update_metrics(self) -> None:
        # a COUNT over the shared table after every put costs more than the gauge is worth;
        # GET /metrics refreshes it from stats()
        return

    # -- reading --------------------------------------------------------------------------
    def get(self, record_id: str) -> Record:
        check_id(record_id)
        with self._conn("read the record") as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM quarantine_records"  # noqa: S608
                               " WHERE id = %s", (record_id,)).fetchone()
        if row is None:
            raise NotFound(f"no quarantine record {record_id!r}")
        return _record(row)

    def open_raw(self, record_id: str) -> BinaryIO:
        record = self.get(record_id)

        def fetch(seq: int) -> bytes | None:
            with self._conn("read the content") as conn:
                row = conn.execute("SELECT data FROM quarantine_content WHERE id = %s"
                                   " AND seq = %s", (record_id, seq)).fetchone()
            return None if row is None else bytes(row[0])

        return io.BufferedReader(ChunkReader(fetch, record.size), buffer_size=DB_CHUNK)

    def list(self, where: RecordFilter | None = None, limit: int | None = None,
             offset: int = 0) -> builtins.list[Record]:
        sql, args = _where(where)
        # bigint bounds: an offset past them is past every record anyway
        args += [None if limit is None else min(limit, _BIGINT_MAX),
                 min(max(offset, 0), _BIGINT_MAX)]
        with self._conn("list records") as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM quarantine_records{sql}"  # noqa: S608
                                " ORDER BY id LIMIT %s OFFSET %s", args).fetchall()
        return [_record(row) for row in rows]

    def count(self, where: RecordFilter | None = None) -> int:
        sql, args = _where(where)
        with self._conn("count records") as conn:
            row = conn.execute(f"SELECT count(*) FROM quarantine_records{sql}",  # noqa: S608
                               args).fetchone()
        return int(row[0]) if row is not None else 0

    def stats(self) -> tuple[int, int]:
        with self._conn("count records") as conn:
            row = conn.execute("SELECT count(*), COALESCE(sum(size), 0)"
                               " FROM quarantine_records").fetchone()
        return (int(row[0]), int(row[1])) if row is not None else (0, 0)

    # -- changing -------------------------------------------------------------------------
    def _claim(self, record_id: str, token: str, now: float, stale_before: float,
               force: bool) -> bool:
        # READ COMMITTED: a second UPDATE of the row waits for the first's commit, then
        # re-checks the WHERE against the new row (releasing is set): 0 rows
        with self._conn("claim the release") as conn:
            cur = conn.execute(
                "UPDATE quarantine_records SET releasing = %s, releasing_since = %s"
                " WHERE id = %s AND (%s OR released IS NULL)"
                " AND (releasing IS NULL OR releasing_since < %s)",
                (token, now, record_id, force, stale_before))
            return cur.rowcount == 1

    def _finish(self, record_id: str, token: str | None, recipients: Sequence[str],
                when: float) -> None:
        with self._conn("record the release") as conn:
            conn.execute(
                "UPDATE quarantine_records SET released = %s, released_to = %s,"
                " releasing = NULL, releasing_since = NULL"
                " WHERE id = %s AND (%s::text IS NULL OR releasing = %s)",
                (when, list(recipients), record_id, token, token))

    def abort_release(self, claim: ReleaseClaim) -> None:
        with self._conn("drop the release claim") as conn:
            conn.execute("UPDATE quarantine_records SET releasing = NULL,"
                         " releasing_since = NULL WHERE id = %s AND releasing = %s",
                         (claim.record.id, claim.token))

    def delete(self, record_id: str) -> None:
        check_id(record_id)
        with self._conn("delete the record") as conn:
            cur = conn.execute("DELETE FROM quarantine_records WHERE id = %s", (record_id,))
            if cur.rowcount == 0:
                raise NotFound(f"no quarantine record {record_id!r}")

    def _ids_after(self, last: str, limit: int) -> builtins.list[str]:
        with self._conn("list records") as conn:
            rows = conn.execute("SELECT id FROM quarantine_records WHERE id > %s"
                                " ORDER BY id LIMIT %s", (last, limit)).fetchall()
        return [row[0] for row in rows]

    def _ids_before(self, cutoff: float) -> builtins.list[str]:
        with self._conn("list records") as conn:
            rows = conn.execute("SELECT id FROM quarantine_records WHERE created < %s"
                                " ORDER BY id", (cutoff,)).fetchall()
        return [row[0] for row in rows]


def _libpq_timeout(seconds: float) -> int:
    """libpq's connect_timeout: whole seconds, 2 at least (it reads 1 as 2)."""
    return max(2, math.ceil(seconds))


def _blocks(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """``chunks`` regrouped into blocks of ``size`` bytes (the last one shorter); nothing for
    empty content."""
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)


def _row(record: Record) -> tuple[Any, ...]:
    env = record.envelope
    from psycopg.types.json import Jsonb

    return (record.id, record.created, env.sender, list(env.recipients), env.client_addr,
            env.helo, env.listener, record.frontend, record.sha256, record.size,
            record.status, list(record.viruses), Jsonb(record.result), record.rule,
            list(record.actions), record.released,
            list(record.released_to) if record.released is not None else None,
            record.source, record.refid, record.subject)


def _record(row: tuple[Any, ...] | Any) -> Record:
    (rid, created, sender, rcpts, client, helo, listener, frontend, sha, size, status,
     viruses, result, rule, actions, released, released_to, source, refid, subject) = row
    return Record(
        id=rid, created=created,
        envelope=Envelope(sender, tuple(rcpts), client, helo, listener),
        frontend=frontend, sha256=sha, size=int(size), status=status,
        viruses=tuple(viruses), result=result, rule=rule, actions=tuple(actions),
        released=released, released_to=tuple(released_to or ()), source=source, refid=refid,
        subject=subject)
