"""The RefID in the quarantine record (issue 13): written by the gateway, kept by the store,
shown and filtered by the CLI, added to stores made before it by a migration."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from typer.testing import CliRunner

from avgate import config as config_mod
from avgate.cli import app
from avgate.gateway import Context, Gateway
from avgate.quarantine import Envelope, QuarantineStore, RecordFilter
from avgate.result import Finding, ScanResult, ScanStatus
from avgate.spool import Spool

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
RESULT = ScanResult(ScanStatus.INFECTED, findings=(Finding("Eicar-Test-Signature", "e", ""),))

# the records table as avgate wrote it before `source` (and `refid`) existed
OLD_SCHEMA = """
CREATE TABLE records (
    id TEXT PRIMARY KEY, created REAL NOT NULL, sender TEXT NOT NULL,
    recipients TEXT NOT NULL, client_addr TEXT NOT NULL, helo TEXT NOT NULL,
    listener TEXT NOT NULL, frontend TEXT NOT NULL, sha256 TEXT NOT NULL,
    size INTEGER NOT NULL, status TEXT NOT NULL, viruses TEXT NOT NULL, result TEXT NOT NULL,
    rule TEXT NOT NULL, actions TEXT NOT NULL, released REAL, released_to TEXT);
"""
OLD_ID = "20240101T000000000000Z-0123456789abcdef"


async def test_the_gateway_stores_the_refid_of_the_decision(tmp_path: Path) -> None:
    # a command engine starts at once (the embedded engine's scan workers take seconds)
    grep = ("grep -q EICAR-STANDARD {path} || exit 0; "
            "echo {path}: Eicar-Test-Signature FOUND; exit 1")
    cfg = config_mod.from_dict({"policy": {"virus_action": "quarantine"},
                                "engines": [{"type": "command",
                                             "command": ["/bin/sh", "-c", grep]}],
                                "quarantine": {"path": str(tmp_path / "q")}})
    gw = Gateway.from_config(cfg)
    await gw.start()
    try:
        with Spool.from_bytes(b"Subject: x\r\n\r\n" + EICAR + b"\r\n") as spool:
            out = await gw.process(spool, Context("smtp", sender="a@example.org",
                                                  recipients=["b@example.net"]))
    finally:
        await gw.close()
    assert out.quarantine_id is not None and out.refid
    record = gw.store.get(out.quarantine_id)
    assert record.refid == out.refid
    assert [r.id for r in gw.store.list(RecordFilter(refid=out.refid.lower()))] == [
        out.quarantine_id]
    gw.store.close()


def test_an_explicit_refid_wins_and_none_is_empty(tmp_path: Path) -> None:
    with QuarantineStore(tmp_path / "q") as store:
        given = store.put(b"x", Envelope(), RESULT, refid="ABC234")
        none = store.put(b"y", Envelope(), RESULT)
        assert store.get(given).refid == "ABC234" and store.get(none).refid == ""
        assert store.get(given).to_dict()["refid"] == "ABC234"


def test_a_store_made_before_source_and_refid_is_migrated(tmp_path: Path) -> None:
    root = tmp_path / "q"
    (root / "objects").mkdir(parents=True)
    (root / "objects" / OLD_ID).write_bytes(b"old content")
    db = sqlite3.connect(root / "index.sqlite3")
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
               (OLD_ID, 1.7e9, "", "[]", "", "", "/srv/mail/box:3", "ondemand", "s", 11,
                "infected", '["X"]', "{}", "ondemand", '["quarantine"]', None, None))
    db.commit()
    db.close()
    with QuarantineStore(root) as store:
        record = store.get(OLD_ID)
        assert (record.refid, record.source, record.envelope.listener) == (
            "", "/srv/mail/box:3", "")
        assert store.read_raw(OLD_ID) == b"old content"
        claim = store.claim_release(OLD_ID)  # the release columns came with it
        store.abort_release(claim)
        fresh = store.put(b"new", Envelope(), RESULT, refid="NEW234")
        assert store.get(fresh).refid == "NEW234"


def test_cli_list_and_show_print_the_refid_and_filter_by_it(tmp_path: Path) -> None:
    cfg = tmp_path / "avgate.toml"
    cfg.write_text(f'[quarantine]\npath = "{tmp_path / "q"}"\n')
    with QuarantineStore(tmp_path / "q") as store:
        wanted = store.put(b"x", Envelope("a@example.org", ("b@example.net",)), RESULT,
                           refid="WANTED2345")
        other = store.put(b"y", Envelope(), RESULT, refid="OTHER23456")
    runner = CliRunner()
    listed = runner.invoke(app, ["quarantine", "list", "--config", str(cfg)])
    assert listed.exit_code == 0 and "WANTED2345" in listed.output
    only = runner.invoke(app, ["quarantine", "list", "--config", str(cfg), "--json",
                               "--refid", "wanted2345"])
    rows = [json.loads(line) for line in only.stdout.splitlines()]
    assert [(r["id"], r["refid"]) for r in rows] == [(wanted, "WANTED2345")]
    shown = runner.invoke(app, ["quarantine", "show", "--config", str(cfg), other])
    assert shown.exit_code == 0 and "refid:" in shown.output and "OTHER23456" in shown.output
