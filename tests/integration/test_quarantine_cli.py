"""`avgate scan --action quarantine` then `avgate quarantine ...` against a real SMTP sink."""

from __future__ import annotations

import email
import email.policy
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from typer.testing import CliRunner

from avgate.cli import app
from avgate.cli_quarantine import quarantine_app

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
# CRLF throughout: SMTP carries CRLF lines, so this is what a byte-for-byte release can keep
MESSAGE = (b"Return-Path: <alice@example.org>\r\nDelivered-To: bob@example.net\r\n"
           b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: infected\r\n"
           b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n\r\n'
           b"--b1\r\nContent-Type: text/plain\r\n\r\n.dot line\r\n\xe9 8bit\r\n"
           b"--b1\r\nContent-Type: application/octet-stream\r\n"
           b'Content-Disposition: attachment; filename="eicar.com"\r\n\r\n'
           + EICAR + b"\r\n--b1--\r\n")


class Sink:
    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos),
                              envelope.original_content))
        return "250 OK"


@pytest.fixture
def sink_port() -> Iterator[tuple[Sink, int]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = Sink()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield sink, port
    finally:
        controller.stop()


@pytest.fixture
def setup(tmp_path: Path, sink_port: tuple[Sink, int]) -> tuple[Path, Path, Sink]:
    sink, port = sink_port
    cfg = tmp_path / "avgate.toml"
    cfg.write_text(f'[quarantine]\npath = "{tmp_path / "q"}"\nnext_hop = "127.0.0.1:{port}"\n'
                   'report_to = "lab@example.com"\nreport_from = "avgate@example.org"\n')
    md = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (md / sub).mkdir(parents=True)
    (md / "new" / "1.host").write_bytes(MESSAGE)
    (md / "cur" / "2.host:2,S").write_bytes(b"Subject: fine\r\n\r\nclean\r\n")
    return cfg, md, sink


def q(*args: str) -> Any:
    return CliRunner().invoke(quarantine_app, list(args))


def test_maildir_quarantine_list_release_round_trip(setup: tuple[Path, Path, Sink]) -> None:
    cfg, md, sink = setup
    scan = CliRunner().invoke(app, ["scan", "--no-progress", "-c", str(cfg),
                                    "--action", "quarantine", str(md)])
    assert scan.exit_code == 1, scan.output
    assert not (md / "new" / "1.host").exists()
    assert (md / "cur" / "2.host:2,S").exists()

    listed = q("list", "--json", "-c", str(cfg))
    assert listed.exit_code == 0
    (rec,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert rec["viruses"] == ["Eicar-Test-Signature"]
    assert rec["sender"] == "alice@example.org"
    assert rec["recipients"] == ["bob@example.net"]
    assert q("list", "-c", str(cfg), "--virus", "Win.*").stdout == ""

    shown = q("show", rec["id"], "-c", str(cfg))
    assert shown.exit_code == 0
    assert "Eicar-Test-Signature" in shown.stdout and "parts:" in shown.stdout

    exported = q("export", rec["id"], "-c", str(cfg))
    assert exported.exit_code == 0 and exported.stdout_bytes == MESSAGE

    released = q("release", rec["id"], "-c", str(cfg))
    assert released.exit_code == 0, released.output
    assert sink.received == [("alice@example.org", ["bob@example.net"], MESSAGE)]

    again = q("release", rec["id"], "-c", str(cfg))
    assert again.exit_code == 1 and len(sink.received) == 1
    forced = q("release", rec["id"], "-c", str(cfg), "--force", "--to", "admin@example.org")
    assert forced.exit_code == 0
    assert sink.received[1] == ("alice@example.org", ["admin@example.org"], MESSAGE)


def test_report_delete_purge_and_exit_codes(setup: tuple[Path, Path, Sink]) -> None:
    cfg, md, sink = setup
    CliRunner().invoke(app, ["scan", "--no-progress", "-c", str(cfg), "--action",
                             "quarantine", str(md)])
    (rec,) = [json.loads(x) for x in q("list", "--json", "-c", str(cfg)).stdout.splitlines()]

    rep = q("report", rec["id"], "--false-positive", "-c", str(cfg))
    assert rep.exit_code == 0, rep.output
    sender, rcpts, data = sink.received[0]
    assert (sender, rcpts) == ("avgate@example.org", ["lab@example.com"])
    msg = email.message_from_bytes(data, policy=email.policy.default)
    attached = [p for p in msg.iter_parts() if p.get_content_type() == "message/rfc822"]
    assert len(attached) == 1 and MESSAGE in data
    assert q("report", rec["id"], "-c", str(cfg)).exit_code == 2  # no kind given

    missing = "20240101T000000000000Z-0123456789abcdef"
    for cmd in ("show", "export", "release", "delete"):
        assert q(cmd, missing, "-c", str(cfg)).exit_code == 1, cmd

    assert q("purge", "--older-than", "1", "-c", str(cfg)).exit_code == 0
    assert len(q("list", "--json", "-c", str(cfg)).stdout.splitlines()) == 1
    assert q("purge", "--older-than", "0", "-c", str(cfg)).exit_code == 0
    assert q("list", "--json", "-c", str(cfg)).stdout == ""


def test_delete_and_bad_config(setup: tuple[Path, Path, Sink], tmp_path: Path) -> None:
    cfg, md, _ = setup
    CliRunner().invoke(app, ["scan", "--no-progress", "-c", str(cfg), "--action",
                             "quarantine", str(md)])
    (rec,) = [json.loads(x) for x in q("list", "--json", "-c", str(cfg)).stdout.splitlines()]
    assert q("delete", rec["id"], "-c", str(cfg)).exit_code == 0
    assert q("delete", rec["id"], "-c", str(cfg)).exit_code == 1
    bad = tmp_path / "bad.toml"
    bad.write_text("[quarantine]\nnope = 1\n")
    assert q("list", "-c", str(bad)).exit_code == 2


def test_release_to_unreachable_hop_is_error(setup: tuple[Path, Path, Sink],
                                             tmp_path: Path) -> None:
    cfg, md, _ = setup
    CliRunner().invoke(app, ["scan", "--no-progress", "-c", str(cfg), "--action",
                             "quarantine", str(md)])
    (rec,) = [json.loads(x) for x in q("list", "--json", "-c", str(cfg)).stdout.splitlines()]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    other = tmp_path / "other.toml"
    other.write_text(f'[quarantine]\npath = "{tmp_path / "q"}"\nnext_hop = "127.0.0.1:{dead}"\n')
    assert q("release", rec["id"], "-c", str(other)).exit_code == 2
    (after,) = [json.loads(x) for x in q("list", "--json", "-c", str(cfg)).stdout.splitlines()]
    assert after["released"] is None


def test_list_filters_are_the_stores(setup: tuple[Path, Path, Sink]) -> None:
    """``quarantine list`` filters through ``QuarantineStore.list``, like the HTTP API."""
    cfg, md, _ = setup
    CliRunner().invoke(app, ["scan", "--no-progress", "-c", str(cfg), "--action",
                             "quarantine", str(md)])

    def listed(*args: str) -> list[str]:
        out = q("list", "--json", "-c", str(cfg), *args)
        assert out.exit_code == 0, out.output
        return [json.loads(line)["sender"] for line in out.stdout.splitlines()]

    assert listed() == ["alice@example.org"]
    assert listed("--sender", "ALICE@*", "--recipient", "bob@*") == ["alice@example.org"]
    assert listed("--status", "infected", "--virus", "eicar*") == ["alice@example.org"]
    assert listed("--frontend", "http") == [] and listed("--recipient", "carol@*") == []
    for since in ("3d", "@0", "0", "2000-01-01"):  # the one time grammar (see ondemand)
        assert listed("--since", since) == ["alice@example.org"], since
    assert listed("--since", "@99999999999") == []
    assert q("list", "-c", str(cfg), "--since", "yesterday-ish").exit_code == 2


# -- issue 13: --config at every level; on-demand records' source, old stores migrated --------
def test_config_is_accepted_at_every_level(setup: tuple[Path, Path, Sink], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, md, _ = setup
    monkeypatch.chdir(tmp_path)  # the built-in default store would be ./var/quarantine
    scan = CliRunner().invoke(app, ["--config", str(cfg), "scan", "--no-progress",
                                    "--action", "quarantine", str(md)])
    assert scan.exit_code == 1, scan.output
    for args in (["quarantine", "--config", str(cfg), "list", "--json"],
                 ["quarantine", "-c", str(cfg), "list", "--json"],
                 ["--config", str(cfg), "quarantine", "list", "--json"],
                 ["quarantine", "list", "--json", "--config", str(cfg)],
                 # the innermost wins
                 ["--config", str(tmp_path / "other.toml"), "quarantine", "--config", str(cfg),
                  "list", "--json"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, (args, r.output)
        assert [json.loads(line)["source"] for line in r.stdout.splitlines()] == [
            str(md / "new" / "1.host")], args
    assert not (tmp_path / "var").exists()
    (rec_id,) = [json.loads(line)["id"] for line in CliRunner().invoke(
        app, ["-c", str(cfg), "quarantine", "list", "--json"]).stdout.splitlines()]
    r = CliRunner().invoke(app, ["quarantine", "--config", str(cfg), "show", rec_id])
    assert r.exit_code == 0 and f"source:       {md / 'new' / '1.host'}" in r.stdout
    assert "listener:     -" in r.stdout
    for args in (["--config", str(cfg), "config", "show"],
                 ["config", "--config", str(cfg), "show"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0 and f"source: {cfg}" in r.stdout, (args, r.output)
    r = CliRunner().invoke(app, ["config", "--config", str(cfg), "check"])
    assert r.exit_code == 0 and f"{cfg}: OK" in r.stdout


# the index as avgate made it before records had a source (on-demand kept the path in listener)
OLD_SCHEMA = """
CREATE TABLE records (
    id TEXT PRIMARY KEY, created REAL NOT NULL, sender TEXT NOT NULL,
    recipients TEXT NOT NULL, client_addr TEXT NOT NULL, helo TEXT NOT NULL,
    listener TEXT NOT NULL, frontend TEXT NOT NULL, sha256 TEXT NOT NULL,
    size INTEGER NOT NULL, status TEXT NOT NULL, viruses TEXT NOT NULL, result TEXT NOT NULL,
    rule TEXT NOT NULL, actions TEXT NOT NULL, released REAL, released_to TEXT);
CREATE INDEX records_created ON records(created);
"""


def test_an_older_store_is_migrated(tmp_path: Path) -> None:
    import hashlib
    import sqlite3
    import time

    qdir = tmp_path / "q"
    (qdir / "objects").mkdir(parents=True)
    db = sqlite3.connect(qdir / "index.sqlite3")
    db.executescript(OLD_SCHEMA)
    rows = [("20240101T000000000000Z-00000000000000a1", "ondemand", "/srv/mail/inbox:2"),
            ("20240101T000000000001Z-00000000000000a2", "smtp", "in")]
    for rid, frontend, listener in rows:
        (qdir / "objects" / rid).write_bytes(EICAR)
        db.execute("INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                   (rid, time.time(), "", "[]", "", "", listener, frontend,
                    hashlib.sha256(EICAR).hexdigest(), len(EICAR), "infected",
                    '["Eicar-Test-Signature"]', "{}", "ondemand", '["quarantine"]', None,
                    None))
    db.commit()
    db.close()
    cfg = tmp_path / "avgate.toml"
    cfg.write_text(f'[quarantine]\npath = "{qdir}"\n')
    r = CliRunner().invoke(app, ["quarantine", "--config", str(cfg), "list", "--json"])
    assert r.exit_code == 0, r.output
    got = [(d["frontend"], d["listener"], d["source"])
           for d in map(json.loads, r.stdout.splitlines())]
    assert got == [("ondemand", "", "/srv/mail/inbox:2"), ("smtp", "in", "")]
    # opened again (already migrated): unchanged, and new records can be written
    r = CliRunner().invoke(app, ["quarantine", "--config", str(cfg), "list", "--json"])
    assert [json.loads(line)["source"] for line in r.stdout.splitlines()] == [
        "/srv/mail/inbox:2", ""]


def test_notify_digest_tells_each_recipient_what_was_held(setup: tuple[Path, Path, Sink]
                                                          ) -> None:
    cfg, md, sink = setup
    port = cfg.read_text().split('next_hop = "127.0.0.1:')[1].split('"')[0]
    with cfg.open("a") as f:
        f.write(f'[notify]\nadmin = ["postmaster@example.org"]\n'
                f'next_hop = "127.0.0.1:{port}"\n')
    CliRunner().invoke(app, ["scan", "--no-progress", "-c", str(cfg), "--action",
                             "quarantine", str(md)])
    (rec,) = [json.loads(x) for x in q("list", "--json", "-c", str(cfg)).stdout.splitlines()]
    dry = CliRunner().invoke(app, ["notify", "digest", "--dry-run", "-c", str(cfg)])
    assert dry.exit_code == 0, dry.output
    assert "To: bob@example.net" in dry.stdout and f"id {rec['id']}" in dry.stdout
    assert "1 digest(s), none sent" in dry.stdout and sink.received == []
    sent = CliRunner().invoke(app, ["notify", "digest", "-c", str(cfg), "--hours", "1"])
    assert sent.exit_code == 0, sent.output
    ((sender, rcpts, data),) = sink.received
    assert (sender, rcpts) == ("<>", ["bob@example.net"])
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg["Subject"] == "Messages held for you: 1"
    assert rec["id"] in msg.get_content() and "postmaster@example.org" in msg.get_content()
    assert EICAR not in data
