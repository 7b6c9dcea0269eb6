"""The quarantine store interface, one suite run against both backends: the file store
(SQLite + files) and PostgreSQL (a private cluster started for this module, a fresh database
per test). Plus what only the PostgreSQL backend has: ``avgate quarantine migrate``/``copy``,
the schema check, and the glob filters compared with fnmatch inside a real server.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import os
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from avgate.cli import app
from avgate.errors import NotFound, QuarantineError
from avgate.quarantine import (
    AlreadyReleased,
    Envelope,
    QuarantineStore,
    RecordFilter,
    Store,
    release,
)
from avgate.quarantine.base import RELEASE_CLAIM_TTL, like_pattern
from avgate.quarantine.maildir import MaildirDelivery
from avgate.quarantine.postgres import PostgresStore, glob_to_regex, migrate
from avgate.result import EngineInfo, Finding, ScanResult, ScanStatus
from avgate.spool import Spool
from tests.pg_instance import PgInstance, running_postgres
from tests.unit.quarantine.conftest import Sink, free_port, smtp_sink  # noqa: F401

ODD = b"Subject: odd\r\n\r\nbare\rCR, NUL \x00\x00 and\n mixed \r\n endings, no newline at end"
ENV = Envelope("alice@example.org", ("bob@example.net", "carol@example.net"), "192.0.2.1",
               "mx.example.org", "smtp")
MSG = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nbody\r\n"


def infected(name: str = "Eicar-Test-Signature") -> ScanResult:
    return ScanResult(ScanStatus.INFECTED, findings=(Finding(name, "embedded", "1"),),
                      sha256="x", size=1, engines=(EngineInfo("embedded", "1"),))


@pytest.fixture(scope="module")
def pg() -> Iterator[PgInstance]:
    with running_postgres() as instance:
        yield instance


@pytest.fixture
def pg_dsn(pg: PgInstance) -> str:
    dsn = pg.new_database()
    assert migrate(dsn) == [1, 2]
    return dsn


Opener = Callable[[], Store]


@pytest.fixture(params=["file", "postgresql"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens a store (as many as a test wants: two gateways) on one shared quarantine."""
    opened: list[Store] = []

    def open_file() -> Store:
        opened.append(QuarantineStore(tmp_path / "q"))
        return opened[-1]

    def open_pg() -> Store:
        opened.append(PostgresStore(dsn, pool_size=4))
        return opened[-1]

    if request.param == "postgresql":
        dsn = request.getfixturevalue("pg_dsn")
        yield open_pg
    else:
        yield open_file
    for s in opened:
        s.close()


@pytest.fixture
def store(opener: Opener) -> Store:
    return opener()


# -- the shared suite -----------------------------------------------------------------------
def test_round_trip_bytes_and_metadata(store: Store) -> None:
    rid = store.put(ODD, ENV, infected(), frontend="smtp", refid="ABCDEFGH23456789",
                    source="")
    assert store.read_raw(rid) == ODD
    rec = store.get(rid)
    assert rec.sha256 == hashlib.sha256(ODD).hexdigest() and rec.size == len(ODD)
    assert rec.envelope == ENV and rec.frontend == "smtp" and rec.status == "infected"
    assert rec.viruses == ("Eicar-Test-Signature",) and rec.refid == "ABCDEFGH23456789"
    assert rec.result["findings"][0]["part"] == "1"
    assert rec.released is None and rec.to_dict()["refid"] == "ABCDEFGH23456789"
    empty = store.put(b"", ENV, infected())
    assert store.read_raw(empty) == b"" and store.get(empty).size == 0


def test_a_large_spool_is_streamed_not_held(store: Store, tmp_path: Path) -> None:
    size = 16 << 20
    spool = Spool(memory_limit=1 << 16, directory=str(tmp_path))
    block = os.urandom(1 << 16)
    digest = hashlib.sha256()
    for _ in range(size // len(block)):
        spool.write(block)
        digest.update(block)
    spool.finish()
    store.put(b"warm-up", ENV, infected())  # connections and imports, outside the count
    tracemalloc.start()
    try:
        rid = store.put(spool, ENV, infected())
        got = hashlib.sha256()
        with store.open_raw(rid) as f:
            while chunk := f.read(1 << 16):
                got.update(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        spool.close()
    assert got.hexdigest() == digest.hexdigest() == store.get(rid).sha256
    # a few chunks in flight (PostgreSQL: 1 MiB rows, a 1 MiB read buffer), never the whole
    assert peak < 6 << 20, f"{peak} bytes held for a {size}-byte message"


def test_ids_unknown_and_malformed(store: Store) -> None:
    with pytest.raises(NotFound):
        store.get("20240101T000000000000Z-0123456789abcdef")
    for bad in ("../index.sqlite3", "x' OR '1'='1"):
        with pytest.raises(NotFound):
            store.open_raw(bad)
        with pytest.raises(NotFound):
            store.delete(bad)


def test_filters_every_field_in_the_database(store: Store) -> None:
    mail = store.put(b"m", ENV, infected("Win.Trojan.Agent-1"), frontend="smtp",
                     refid="AAAABBBBCCCCDDDD")
    web = store.put(b"w", Envelope("Mallory@Evil.example", ("EVE@example.net",)),
                    infected("Eicar-Test-Signature"), frontend="http")
    skipped = store.put(b"s", Envelope(), ScanResult(ScanStatus.SKIPPED), frontend="http")

    def ids(**kw: object) -> list[str]:
        where = RecordFilter(**kw)  # type: ignore[arg-type]
        found = [r.id for r in store.list(where)]
        assert store.count(where) == len(found)
        return found

    assert ids() == [mail, web, skipped]
    assert ids(sender="mallory@*") == [web]  # globs ignore case
    assert ids(sender="*") == [mail, web, skipped] and ids(sender="?*") == [mail, web]
    assert ids(recipient="carol@*") == [mail]  # any recipient matches
    assert ids(recipient="eve@example.net") == [web]
    assert ids(recipient="[bc]*@example.net") == [mail]
    assert ids(recipient="[!b]*@example.net") == [mail, web]  # carol, eve
    assert ids(virus="win.*") == [mail] and ids(virus="win?trojan*") == [mail]
    assert ids(virus="*eicar*") == [web] and ids(virus="eicar") == []  # whole value
    assert ids(status="skipped") == [skipped] and ids(status="SKIPPED") == []  # exact
    assert ids(frontend="http") == [web, skipped]
    assert ids(frontend="http", virus="*") == [web]  # every condition must hold
    assert ids(refid="aaaabbbbccccdddd") == [mail] and ids(refid="AAAA") == []
    assert ids(since=time.time() + 60) == [] and len(ids(since=time.time() - 60)) == 3
    # values travel as parameters: SQL in a filter is only text that matches nothing
    assert ids(status="x' OR 1=1 --") == [] and ids(sender="' OR 1=1 --") == []
    assert ids(sender="%") == [] and ids(sender=".*") == []  # not LIKE, not a regex


def test_listener_date_range_and_subject_filters(store: Store) -> None:
    """Issue 16: the subject read from the held message, and the listener, until and
    subject filters, LIKE wildcards escaped."""
    subjects = [b"50% off today", b"500 off", b"a_b", b"axb", b"back\\slash", b"backXslash",
                b"=?utf-8?q?Caf=C3=A9_sale?=", b"plain"]
    made = [store.put(b"From: a@example.org\r\nSubject: " + subject + b"\r\n\r\nbody\r\n",
                      Envelope(listener="partners" if i % 2 else "smtp"), infected(),
                      frontend="smtp")
            for i, subject in enumerate(subjects)]
    web = store.put(b"Subject: not mail\r\n\r\n", ENV, infected(), frontend="http")
    assert store.get(made[6]).subject == "Café sale" and store.get(web).subject == ""
    assert store.get(made[0]).to_dict()["subject"] == "50% off today"

    def found(**kw: object) -> list[int]:
        where = RecordFilter(**kw)  # type: ignore[arg-type]
        got = [made.index(r.id) for r in store.list(where) if r.id in made]
        assert store.count(where) == len(store.list(where))
        return got

    assert found(subject="50%") == [0] and found(subject="%") == [0]
    assert found(subject="a_b") == [2] and found(subject="_") == [2]
    assert found(subject="\\") == [4] and found(subject="k\\s") == [4]
    assert found(subject="OFF") == [0, 1] and found(subject="café") == [6]
    assert found(subject="' OR 1=1 --") == [] and found(subject="not mail") == []
    # a NUL cannot travel to PostgreSQL, and would end SQLite's LIKE pattern: no match
    assert found(subject="\x00") == [] and found(status="\x00", refid="\x00") == []
    assert found(listener="PARTNERS") == [1, 3, 5, 7] and found(listener="s?tp") == [0, 2, 4, 6]
    assert found(listener="p*", subject="off") == [1]
    created = [store.get(rid).created for rid in made]
    assert found(until=created[3]) == [0, 1, 2]  # exclusive
    assert found(since=created[2], until=created[5]) == [2, 3, 4]
    assert found(since=created[2], until=created[2]) == []


def test_pages(store: Store) -> None:
    made = [store.put(b"x%d" % i, ENV, infected()) for i in range(5)]
    assert [r.id for r in store.list(limit=2)] == made[:2]
    assert [r.id for r in store.list(limit=2, offset=2)] == made[2:4]
    assert [r.id for r in store.list(offset=4)] == made[4:]
    assert store.list(limit=2, offset=5) == [] and store.count() == 5
    assert store.list(limit=10**30, offset=10**30) == []  # no overflow, just nothing
    assert len(store.list(limit=10**30)) == 5
    assert list(store.ids()) == made


def test_delete_purge_stats(store: Store) -> None:
    old = store.put(b"old", ENV, infected())
    new = store.put(b"new!", ENV, infected())
    assert store.stats() == (2, 7)
    store.delete(new)
    with pytest.raises(NotFound):
        store.get(new)
    with pytest.raises(NotFound):
        store.delete(new)
    assert store.purge(1) == []
    assert store.purge(1, now=time.time() + 2 * 86400) == [old]
    assert store.list() == [] and store.stats() == (0, 0)


def test_a_record_written_by_one_gateway_is_seen_by_another(opener: Opener) -> None:
    a, b = opener(), opener()
    rid = a.put(MSG, ENV, infected(), frontend="milter", refid="REFID234")
    assert b.get(rid).refid == "REFID234" and b.read_raw(rid) == MSG
    b.delete(rid)
    with pytest.raises(NotFound):
        a.get(rid)


async def test_two_gateways_releasing_at_once_send_once(opener: Opener,
                                                        smtp_sink: Sink) -> None:  # noqa: F811
    gateways = [opener(), opener(), opener()]
    rid = gateways[0].put(MSG, ENV, infected())
    outcomes = await asyncio.gather(*(release(g, rid, smtp_sink.next_hop) for g in gateways),
                                    return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, AlreadyReleased)]
    assert len(refused) == 2, outcomes
    assert len(smtp_sink.received) == 1 and smtp_sink.received[0].data == MSG
    # later: refused with the time of the release, unless forced
    with pytest.raises(AlreadyReleased, match="already released"):
        await release(gateways[2], rid, smtp_sink.next_hop)
    rec = await release(gateways[1], rid, smtp_sink.next_hop, to=["admin@example.org"],
                        force=True)
    assert rec.released_to == ("admin@example.org",) and len(smtp_sink.received) == 2


async def test_a_failed_release_can_be_retried(store: Store) -> None:
    rid = store.put(MSG, ENV, infected())
    with pytest.raises(QuarantineError):
        await release(store, rid, f"127.0.0.1:{free_port()}")  # nobody listens
    assert store.get(rid).released is None
    claim = store.claim_release(rid)  # the failed one left no claim behind
    store.abort_release(claim)


def test_a_claim_in_flight_refuses_even_forced_until_it_is_stale(store: Store) -> None:
    rid = store.put(MSG, ENV, infected())
    claim = store.claim_release(rid)
    with pytest.raises(AlreadyReleased, match="being released"):
        store.claim_release(rid, force=True)
    store.abort_release(claim)
    # a claim of a gateway that died mid-send: taken over once older than the TTL
    now = time.time() - RELEASE_CLAIM_TTL - 1
    assert store._claim(rid, "dead-gateway", now, now - RELEASE_CLAIM_TTL, False)
    store.finish_release(store.claim_release(rid), ["bob@example.net"])
    assert store.get(rid).released_to == ("bob@example.net",)


def test_maildir_copies_come_from_either_backend(opener: Opener, tmp_path: Path) -> None:
    store = opener()
    root = tmp_path / "mail"
    (root / "example.net" / "bob").mkdir(parents=True)
    store.maildir = MaildirDelivery(str(root / "{domain}" / "{local}" / ".Quarantine"))
    rid = store.put(MSG, ENV, infected())
    copies = list((root / "example.net" / "bob" / ".Quarantine" / "new").iterdir())
    assert len(copies) == 1
    assert copies[0].read_bytes() == f"X-Avgate-Quarantine-ID: {rid}\r\n".encode() + MSG


# -- PostgreSQL only ------------------------------------------------------------------------
def test_an_unmigrated_database_is_refused_with_the_fix(pg: PgInstance) -> None:
    with pytest.raises(QuarantineError, match="avgate quarantine migrate"):
        PostgresStore(pg.new_database())


def test_a_server_that_is_not_there_is_a_quarantine_error() -> None:
    with pytest.raises(QuarantineError, match="cannot open the quarantine database"):
        PostgresStore(f"postgresql://avgate@127.0.0.1:{free_port()}/x")


# a scanner that starts at once (the embedded engine's workers take seconds): EICAR → 1
GREP_ENGINE = ('[[engines]]\ntype = "command"\ncommand = ["/bin/sh", "-c", '
               '"grep -q EICAR-STANDARD {path} || exit 0; echo {path}: Eicar-Test-Signature '
               'FOUND; exit 1"]\n')


def _config(tmp_path: Path, dsn: str) -> Path:
    cfg = tmp_path / "avgate.toml"
    cfg.write_text(f'[quarantine]\nbackend = "postgresql"\ndsn = "{dsn}"\n'
                   f'path = "{tmp_path / "q"}"\n' + GREP_ENGINE)
    return cfg


def test_migrate_then_copy_a_file_store(pg: PgInstance, tmp_path: Path) -> None:
    dsn = pg.new_database()
    cfg = _config(tmp_path, dsn)
    runner = CliRunner()
    first = runner.invoke(app, ["quarantine", "migrate", "--config", str(cfg)])
    assert first.exit_code == 0 and "applied schema version(s) 1, 2" in first.output
    again = runner.invoke(app, ["quarantine", "migrate", "--config", str(cfg)])
    assert again.exit_code == 0 and "schema is current" in again.output

    with QuarantineStore(tmp_path / "q") as files:
        kept = files.put(ODD, ENV, infected(), frontend="smtp", refid="COPYME22")
        sent = files.put(MSG, ENV, infected("Other"), source="/srv/mail/x")
        files.mark_released(sent, ["bob@example.net"], when=1_700_000_000.0)
        before = {r.id: r for r in files.list()}
    out = runner.invoke(app, ["quarantine", "copy", "--config", str(cfg),
                              "--from", str(tmp_path / "q"), "--to", dsn])
    assert out.exit_code == 0, out.output
    assert "copied 2 record(s), 0 already there" in out.output
    with PostgresStore(dsn) as db:
        assert {r.id: r for r in db.list()} == before  # ids, times, release state
        assert db.read_raw(kept) == ODD and db.read_raw(sent) == MSG
    rerun = runner.invoke(app, ["quarantine", "copy", "--config", str(cfg),
                                "--from", str(tmp_path / "q")])
    assert rerun.exit_code == 0 and "copied 0 record(s), 2 already there" in rerun.output
    # the CLI reads the configured backend: list --refid finds the copy in PostgreSQL
    listed = runner.invoke(app, ["quarantine", "list", "--config", str(cfg), "--json",
                                 "--refid", "copyme22"])
    assert listed.exit_code == 0 and kept in listed.output and sent not in listed.output
    shown = runner.invoke(app, ["quarantine", "show", "--config", str(cfg), kept])
    assert shown.exit_code == 0 and "COPYME22" in shown.output


def test_a_version_1_database_gets_the_subject_column(pg: PgInstance) -> None:
    import psycopg

    from avgate.quarantine.postgres import MIGRATIONS

    dsn = pg.new_database()
    with psycopg.connect(dsn, autocommit=True) as conn:  # what avgate before issue 16 made
        conn.execute("CREATE TABLE avgate_quarantine_schema (version integer PRIMARY KEY)")
        for statement in MIGRATIONS[0][1]:
            conn.execute(statement)
        conn.execute("INSERT INTO avgate_quarantine_schema VALUES (1)")
        conn.execute("INSERT INTO quarantine_records (id, created, sender, recipients,"
                     " client_addr, helo, listener, frontend, sha256, size, status, viruses,"
                     " result, rule, actions) VALUES (%s, 1.7e9, '', '{}', '', '', 'smtp',"
                     " 'smtp', 's', 0, 'infected', '{X}', '{}', 'r', '{quarantine}')",
                     ("20240101T000000000000Z-0123456789abcdef",))
    with pytest.raises(QuarantineError, match="schema version 1, this avgate needs 2"):
        PostgresStore(dsn)
    assert migrate(dsn) == [2] and migrate(dsn) == []
    with PostgresStore(dsn) as db:
        (old,) = db.list()
        assert old.subject == "" and old.envelope.listener == "smtp"
        new = db.put(MSG, ENV, infected(), frontend="smtp")
        assert [r.id for r in db.list(RecordFilter(subject="HI"))] == [new]


def test_copy_refuses_what_is_not_a_file_store(pg: PgInstance, tmp_path: Path) -> None:
    cfg = _config(tmp_path, pg.new_database())
    out = CliRunner().invoke(app, ["quarantine", "copy", "--config", str(cfg),
                                   "--from", str(tmp_path / "nothing")])
    assert out.exit_code == 2 and "not a quarantine file store" in out.output


GLOB_CHARS = "ab-!^]\\[*?.$()|+{}&~%_\n"


@pytest.fixture(scope="module")
def pg_conn(pg: PgInstance) -> Iterator[Any]:
    import psycopg

    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        yield conn


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pattern=st.text(alphabet=GLOB_CHARS, max_size=10),
       value=st.text(alphabet=GLOB_CHARS.replace("*", "").replace("?", ""), max_size=8))
def test_postgresql_reads_the_translated_globs_as_fnmatch_does(pg_conn: Any, pattern: str,
                                                               value: str) -> None:
    row = pg_conn.execute("SELECT %s ~ %s", (value, glob_to_regex(pattern))).fetchone()
    assert row is not None and row[0] == fnmatch.fnmatchcase(value, pattern)


def test_on_demand_scans_quarantine_into_postgresql(pg_dsn: str, tmp_path: Path) -> None:
    eicar = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
    store_dir = tmp_path / "files"
    store_dir.mkdir()
    (store_dir / "bad.com").write_bytes(eicar)
    (store_dir / "good.txt").write_bytes(b"hello")
    out = CliRunner().invoke(app, ["scan", "--no-progress", "-c", str(_config(tmp_path, pg_dsn)),
                                   "--action", "quarantine", str(store_dir)])
    assert out.exit_code == 1, out.output
    assert [p.name for p in store_dir.iterdir()] == ["good.txt"]
    with PostgresStore(pg_dsn) as db:
        (record,) = db.list()
        assert record.source == str(store_dir / "bad.com") and record.frontend == "ondemand"
        assert db.read_raw(record.id) == eicar


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(needle=st.text(alphabet="ab%_\\X[]*", max_size=6),
       value=st.text(alphabet="ab%_\\X[]*", max_size=8))
def test_postgresql_reads_the_escaped_like_pattern_as_a_substring(pg_conn: Any, needle: str,
                                                                  value: str) -> None:
    row = pg_conn.execute("SELECT lower(%s) LIKE %s ESCAPE '\\'",
                          (value, like_pattern(needle))).fetchone()
    assert row is not None and row[0] == (needle.lower() in value.lower())
