"""QuarantineStore: byte-for-byte storage, atomic writes, permissions, listing, purge."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from avgate.errors import NotFound, QuarantineError
from avgate.quarantine import Envelope, QuarantineStore, RecordFilter
from avgate.quarantine import store as store_mod
from avgate.result import EngineInfo, Finding, ScanResult, ScanStatus
from avgate.spool import Spool

ODD = b"Subject: odd\r\n\r\nbare\rCR, NUL \x00\x00 and\n mixed \r\n endings, no newline at end"


def infected(name: str = "Eicar-Test-Signature") -> ScanResult:
    return ScanResult(ScanStatus.INFECTED, findings=(Finding(name, "embedded", "1"),),
                      sha256="x", size=1, engines=(EngineInfo("embedded", "1"),))


ENV = Envelope("alice@example.org", ("bob@example.net", "carol@example.net"), "192.0.2.1",
               "mx.example.org", "smtp")


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = QuarantineStore(tmp_path / "q")
    yield s
    s.close()


def test_round_trip_bytes_exactly(store: QuarantineStore) -> None:
    rid = store.put(ODD, ENV, infected(), frontend="smtp")
    assert store.read_raw(rid) == ODD
    rec = store.get(rid)
    assert rec.sha256 == hashlib.sha256(ODD).hexdigest()
    assert rec.size == len(ODD)
    assert rec.envelope == ENV
    assert rec.frontend == "smtp"
    assert rec.viruses == ("Eicar-Test-Signature",)
    assert rec.result["findings"][0]["part"] == "1"
    assert rec.status == "infected"
    assert rec.released is None


def test_put_streams_a_spool_on_disk(store: QuarantineStore) -> None:
    data = os.urandom(300_000) + b"\x00\r"
    spool = Spool(memory_limit=1024)
    for i in range(0, len(data), 4096):
        spool.write(data[i:i + 4096])
    spool.finish()
    assert not spool.in_memory
    rid = store.put(spool, ENV, infected(), frontend="milter", listener="milter-in")
    spool.close()
    assert store.read_raw(rid) == data
    assert store.get(rid).envelope.listener == "milter-in"


def test_permissions_not_world_readable(store: QuarantineStore) -> None:
    rid = store.put(b"data", ENV, infected())
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store.objects).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store.objects / rid).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.path / "index.sqlite3").st_mode) == 0o600


def test_ids_sortable_and_unguessable(store: QuarantineStore) -> None:
    ids = [store.put(b"x%d" % i, ENV, infected()) for i in range(5)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 5
    assert len({i.rsplit("-", 1)[1] for i in ids}) == 5  # random part differs
    assert [r.id for r in store.list()] == ids


def test_unknown_and_malformed_ids(store: QuarantineStore) -> None:
    with pytest.raises(NotFound):
        store.get("20240101T000000000000Z-0123456789abcdef")
    with pytest.raises(NotFound):
        store.open_raw("../index.sqlite3")


def test_list_filters(store: QuarantineStore) -> None:
    a = store.put(b"a", ENV, infected("Win.Trojan.Agent-1"))
    b = store.put(b"b", ENV, infected("Eicar-Test-Signature"))
    assert [r.id for r in store.list(RecordFilter(virus="win.*"))] == [a]
    assert [r.id for r in store.list(RecordFilter(virus="*Eicar*"))] == [b]
    assert store.list(RecordFilter(since=time.time() + 60)) == []
    assert len(store.list(RecordFilter(since=time.time() - 60))) == 2


def test_list_filters_every_field_in_sql(store: QuarantineStore) -> None:
    mail = store.put(b"m", ENV, infected("Win.Trojan.Agent-1"), frontend="smtp")
    web = store.put(b"w", Envelope("Mallory@Evil.example", ("ÉVE@example.net",)),
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
    assert ids(recipient="éve@example.net") == [web]  # case folded beyond ASCII
    assert ids(recipient="[be]*@example.net") == [mail]
    assert ids(status="skipped") == [skipped] and ids(status="SKIPPED") == []  # exact
    assert ids(frontend="http") == [web, skipped]
    assert ids(frontend="http", virus="*") == [web]  # every condition must hold
    assert ids(virus="*", sender="alice@*", frontend="http") == []
    # values travel as parameters: SQL in a filter is only text that matches nothing
    assert ids(status="x' OR 1=1 --") == [] and ids(sender="' OR 1=1 --") == []


def test_list_pages(store: QuarantineStore) -> None:
    made = [store.put(b"x%d" % i, ENV, infected()) for i in range(5)]
    assert [r.id for r in store.list(limit=2)] == made[:2]
    assert [r.id for r in store.list(limit=2, offset=2)] == made[2:4]
    assert [r.id for r in store.list(offset=4)] == made[4:]
    assert store.list(limit=2, offset=5) == [] and store.count() == 5
    # past SQLite's 64-bit integers: no overflow, just nothing
    assert store.list(limit=10**30, offset=10**30) == []
    assert len(store.list(limit=10**30)) == 5


def test_delete_and_purge(store: QuarantineStore) -> None:
    old = store.put(b"old", ENV, infected())
    new = store.put(b"new", ENV, infected())
    store.delete(new)
    assert not (store.objects / new).exists()
    with pytest.raises(NotFound):
        store.get(new)
    assert store.purge(1) == []  # nothing older than a day
    assert store.purge(1, now=time.time() + 2 * 86400) == [old]
    assert store.list() == []
    assert list(store.objects.iterdir()) == []
    assert store.stats() == (0, 0)


def test_crash_before_rename_leaves_no_row_and_no_file(
        store: QuarantineStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "simulated crash")

    monkeypatch.setattr(store_mod.os, "replace", crash)
    with pytest.raises(QuarantineError):
        store.put(b"half", ENV, infected())
    assert store.list() == []
    assert list(store.objects.iterdir()) == []


def test_disk_full_is_a_quarantine_error(store: QuarantineStore,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.os, "fsync", full)
    with pytest.raises(QuarantineError, match="disk full"):
        store.put(b"x" * 1000, ENV, infected())
    assert store.list() == []
    assert list(store.objects.iterdir()) == []


def test_open_removes_leftovers_of_dead_writers(tmp_path: Path) -> None:
    with QuarantineStore(tmp_path / "q") as s:
        kept = s.put(b"kept", ENV, infected())
    objects = tmp_path / "q" / "objects"
    # a pid that cannot be alive: above the kernel's pid_max
    (objects / ".tmp-99999999-20240101T000000000000Z-0123456789abcdef").write_bytes(b"ha")
    (objects / "20240101T000000000000Z-fedcba9876543210").write_bytes(b"no row")
    with QuarantineStore(tmp_path / "q") as s:
        assert sorted(p.name for p in objects.iterdir()) == [kept]
        assert s.read_raw(kept) == b"kept"


WRITER = textwrap.dedent("""
    import os, sys
    from avgate.quarantine import Envelope, QuarantineStore
    from avgate.result import ScanResult, ScanStatus
    store = QuarantineStore(sys.argv[1])
    r = ScanResult(ScanStatus.INFECTED)
    i = 0
    while True:
        i += 1
        store.put(os.urandom(1000 + i * 37 % 50000), Envelope("a@b", ("c@d",)), r)
        if i == 3:
            print("running", flush=True)
""")


def test_kill_9_writer_leaves_consistent_store(tmp_path: Path) -> None:
    path = tmp_path / "q"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"running\n"
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with QuarantineStore(path) as s:
        records = s.list()
        assert len(records) >= 3
        for rec in records:
            data = s.read_raw(rec.id)
            assert hashlib.sha256(data).hexdigest() == rec.sha256
            assert len(data) == rec.size
        # every file is a record's: no temp file or orphan survives the open
        assert sorted(p.name for p in s.objects.iterdir()) == [r.id for r in records]
