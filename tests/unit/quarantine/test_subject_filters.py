"""Issue 16: the quarantine record's subject (read from the held message at put() time) and
the listener, until (a date range with since) and subject filters, in the file store (SQLite),
through ``avgate quarantine list``; a store made before the subject column is migrated."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from avgate.cli import app
from avgate.errors import QuarantineError
from avgate.quarantine import Envelope, QuarantineStore, RecordFilter
from avgate.quarantine.base import like_pattern
from avgate.quarantine.subject import HEAD_LIMIT, SUBJECT_MAX, head_of, subject_of
from avgate.result import Finding, ScanResult, ScanStatus
from avgate.spool import Spool

RESULT = ScanResult(ScanStatus.INFECTED, findings=(Finding("Eicar-Test-Signature", "e", ""),))


def mail(subject: bytes, body: bytes = b"body\r\n") -> bytes:
    return b"From: <a@example.org>\r\nSubject: " + subject + b"\r\nTo: b@example.net\r\n\r\n" + body


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = QuarantineStore(tmp_path / "q")
    yield s
    s.close()


# -- the subject, as read from the message ----------------------------------------------------
def test_subject_is_decoded_unfolded_and_cleaned() -> None:
    # RFC 2047 in two charsets, folded over two lines
    assert subject_of(mail(b"=?utf-8?q?Caf=C3=A9?= and\r\n =?iso-8859-1?b?5Q==?= x")) == (
        "Café and å x")
    assert subject_of(mail(b"Caf\xc3\xa9 \xf0\x9f\x98\x80")) == "Café 😀"  # raw UTF-8
    assert subject_of(mail(b"raw \xe9 latin-1")) == "raw \ufffd latin-1"  # undecodable: U+FFFD
    # escapes, bidi overrides (also when encoded), NUL and tabs: gone or one space
    assert subject_of(mail(b"a\x1b[31mred\x00\tz =?utf-8?b?4oCuZXhlLnR4dA==?=")) == (
        "a[31mred z exe.txt")
    assert subject_of(mail(b"x" * 5000)) == "x" * SUBJECT_MAX
    assert subject_of(b"Subject: only headers, no body") == "only headers, no body"
    assert subject_of(mail(b"first").replace(b"To:", b"Subject: second\r\nTo:")) == "first"


def test_no_subject_when_there_is_none_in_the_first_header_block() -> None:
    assert subject_of(b"From: a@example.org\r\n\r\nSubject: in the body\r\n") == ""
    assert subject_of(b"\r\nSubject: after an empty header block\r\n") == ""
    assert subject_of(b"\x7fELF\x02\x01\x01\x00binary\nSubject: x\n") == ""  # not mail
    assert subject_of(b"") == ""


def test_only_the_first_64_kib_are_read() -> None:
    padding = b"X-Pad: " + b"p" * 1000 + b"\r\n"
    early = mail(b"early").replace(b"From:", padding * 70 + b"From:")  # subject at ~70 KiB
    assert len(head_of(early)) == HEAD_LIMIT
    assert subject_of(head_of(early)) == ""  # past the cap: not read
    # a subject cut by the cap is left out (its end is unknown), the whole ones before it kept
    cut = b"Subject: whole\r\n" + padding * 64 + b"X-Cut: " + b"c" * 2000
    assert subject_of(cut[:HEAD_LIMIT]) == "whole"
    last = padding * 65 + b"Subject: " + b"s" * 3000 + b"\r\n\r\n"
    assert subject_of(last[:HEAD_LIMIT]) == ""


def test_head_of_reads_a_spool_on_disk_in_one_bounded_read(tmp_path: Path) -> None:
    data = mail(b"from the spool", b"z" * 300_000)
    spool = Spool(memory_limit=1024, directory=str(tmp_path))
    spool.write(data)
    spool.finish()
    assert not spool.in_memory
    assert head_of(spool) == data[:HEAD_LIMIT]
    with Spool() as small:
        small.write(data[:100])
        assert head_of(small) == data[:100]
        small.write(data[100:])  # the buffer view was released: the buffer can still grow
        assert small.in_memory and head_of(small) == data[:HEAD_LIMIT]
    assert head_of(iter([data])) == b""  # an iterator cannot be peeked at
    spool.close()


def test_put_stores_the_subject_of_mail_only(store: QuarantineStore) -> None:
    smtp = store.put(mail(b"=?utf-8?q?R=C3=A9sum=C3=A9?="), Envelope(), RESULT,
                     frontend="smtp")
    icap = store.put(mail(b"an uploaded .eml"), Envelope(), RESULT, frontend="icap")
    chosen = store.put(b"x", Envelope(), RESULT, frontend="http", subject="given\r\n\tby caller")
    assert store.get(smtp).subject == "Résumé"
    assert store.get(smtp).to_dict()["subject"] == "Résumé"
    assert store.get(icap).subject == ""  # web content has no subject
    assert store.get(chosen).subject == "given by caller"  # cleaned too


def test_a_spool_that_cannot_be_read_is_a_quarantine_error_not_a_subject_crash(
        store: QuarantineStore, tmp_path: Path) -> None:
    spool = Spool(memory_limit=16, directory=str(tmp_path))
    spool.write(mail(b"gone"))
    spool.finish()
    os.unlink(spool.path())  # e.g. a cleaner removed it
    assert head_of(spool) == b""
    with pytest.raises(QuarantineError, match="cannot write quarantine file"):
        store.put(spool, Envelope(), RESULT, frontend="smtp")
    assert store.list() == []
    spool.close()


# -- the filters ------------------------------------------------------------------------------
def test_listener_until_and_subject_filters_run_in_sql(store: QuarantineStore) -> None:
    subjects = [b"50% off today", b"500 off", b"a_b", b"axb", b"back\\slash", b"backXslash",
                b"=?utf-8?q?=C3=89T=C3=89_sale?=", b"plain"]
    ids = []
    for i, subject in enumerate(subjects):
        listener = "partners" if i % 2 else "smtp"
        ids.append(store.put(mail(subject), Envelope(listener=listener), RESULT,
                             frontend="smtp"))
    with sqlite3.connect(store.path / "index.sqlite3") as db:  # spread out in time
        for i, rid in enumerate(ids):
            db.execute("UPDATE records SET created = ? WHERE id = ?", (1000.0 + i * 100, rid))

    def found(**kw: object) -> list[int]:
        where = RecordFilter(**kw)  # type: ignore[arg-type]
        got = [ids.index(r.id) for r in store.list(where)]
        assert store.count(where) == len(got)
        return got

    # LIKE wildcards typed by a user are just characters
    assert found(subject="50%") == [0]
    assert found(subject="a_b") == [2] and found(subject="_") == [2]
    assert found(subject="\\") == [4] and found(subject="k\\s") == [4]
    assert found(subject="%") == [0] and found(subject="%%") == []
    # substring, any case, beyond ASCII too
    assert found(subject="OFF") == [0, 1] and found(subject="été") == [6]
    assert found(subject="") == list(range(8))  # empty text: in every subject
    assert found(subject="' OR 1=1 --") == [] and found(subject="\x00") == []
    # listener: a glob on the name, any case
    assert found(listener="partners") == [1, 3, 5, 7]
    assert found(listener="SMTP") == [0, 2, 4, 6] and found(listener="*") == list(range(8))
    assert found(listener="p*", subject="off") == [1]
    # until is exclusive; with since, a date range
    assert found(until=1200.0) == [0, 1]
    assert found(since=1200.0, until=1500.0) == [2, 3, 4]
    assert found(since=1500.0, until=1500.0) == []
    assert found(since=1200.0, until=1500.0, listener="smtp") == [2, 4]


def test_like_pattern_escapes_every_wildcard() -> None:
    assert like_pattern("50%") == "%50\\%%"
    assert like_pattern("A_\\b") == "%a\\_\\\\b%"


# -- migration --------------------------------------------------------------------------------
# the records table as avgate wrote it before `subject` existed (refid and the release claim
# columns already there)
PRE_SUBJECT_SCHEMA = """
CREATE TABLE records (
    id TEXT PRIMARY KEY, created REAL NOT NULL, sender TEXT NOT NULL,
    recipients TEXT NOT NULL, client_addr TEXT NOT NULL, helo TEXT NOT NULL,
    listener TEXT NOT NULL, frontend TEXT NOT NULL, sha256 TEXT NOT NULL,
    size INTEGER NOT NULL, status TEXT NOT NULL, viruses TEXT NOT NULL, result TEXT NOT NULL,
    rule TEXT NOT NULL, actions TEXT NOT NULL, released REAL, released_to TEXT,
    source TEXT NOT NULL DEFAULT '', refid TEXT NOT NULL DEFAULT '', releasing TEXT,
    releasing_since REAL);
CREATE INDEX records_created ON records(created);
"""
OLD_ID = "20240101T000000000000Z-0123456789abcdef"


def test_a_store_made_before_the_subject_column_is_migrated(tmp_path: Path) -> None:
    root = tmp_path / "q"
    (root / "objects").mkdir(parents=True)
    old_mail = mail(b"held long ago")
    (root / "objects" / OLD_ID).write_bytes(old_mail)
    db = sqlite3.connect(root / "index.sqlite3")
    db.executescript(PRE_SUBJECT_SCHEMA)
    db.execute("INSERT INTO records (id, created, sender, recipients, client_addr, helo,"
               " listener, frontend, sha256, size, status, viruses, result, rule, actions,"
               " refid) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
               (OLD_ID, 1.7e9, "a@example.org", '["b@example.net"]', "", "", "smtp", "smtp",
                "s", len(old_mail), "infected", '["X"]', "{}", "r", '["quarantine"]',
                "OLDREFID"))
    db.commit()
    db.close()
    with QuarantineStore(root) as store:
        old = store.get(OLD_ID)
        assert (old.subject, old.refid, old.envelope.listener) == ("", "OLDREFID", "smtp")
        new = store.put(mail(b"held today"), Envelope(listener="smtp"), RESULT,
                        frontend="smtp")
        assert [r.id for r in store.list(RecordFilter(subject="today"))] == [new]
        assert [r.id for r in store.list(RecordFilter(listener="smtp"))] == [OLD_ID, new]
    with QuarantineStore(root) as again:  # a second open finds nothing to do
        assert again.get(new).subject == "held today"


# -- avgate quarantine list -------------------------------------------------------------------
def test_cli_list_filters_by_listener_until_and_subject(tmp_path: Path) -> None:
    cfg = tmp_path / "avgate.toml"
    cfg.write_text(f'[quarantine]\npath = "{tmp_path / "q"}"\n')
    with QuarantineStore(tmp_path / "q") as store:
        sale = store.put(mail(b"50% off \x1b]0;pwned\x07"), Envelope(listener="partners"),
                         RESULT, frontend="smtp")
        other = store.put(mail(b"500 off"), Envelope(listener="smtp"), RESULT,
                          frontend="smtp")
    runner = CliRunner()

    def listed(*args: str) -> list[str]:
        out = runner.invoke(app, ["quarantine", "list", "--config", str(cfg), "--json", *args])
        assert out.exit_code == 0, out.output
        return [json.loads(line)["id"] for line in out.stdout.splitlines()]

    assert listed("--subject", "50%") == [sale]
    assert listed("--subject", "OFF") == [sale, other]
    assert listed("--listener", "part*") == [sale] and listed("--listener", "x*") == []
    assert listed("--until", "@1") == [] and listed("--until", "1h") == []
    assert listed("--since", "1h", "--until", f"@{time.time() + 60}") == [sale, other]
    assert listed("--until", "2999-01-01") == [sale, other]
    text = runner.invoke(app, ["quarantine", "list", "--config", str(cfg),
                               "--subject", "50%"])
    assert text.exit_code == 0 and "50% off ]0;pwned" in text.stdout  # controls removed
    assert "\x1b" not in text.stdout and "500 off" not in text.stdout
    shown = runner.invoke(app, ["quarantine", "show", "--config", str(cfg), other])
    assert "subject:" in shown.stdout and "500 off" in shown.stdout
    for bad_time in ("yesterday-ish", "nan", "-inf"):
        bad = runner.invoke(app, ["quarantine", "list", "--config", str(cfg),
                                  "--until", bad_time])
        assert bad.exit_code == 2 and "--until" in bad.output, bad_time
