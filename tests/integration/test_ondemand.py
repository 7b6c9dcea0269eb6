"""`avgate scan` over directories, Maildir and mbox: detection, --since/--state, actions."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from avgate.cli import app
from avgate.ondemand import format_time, iter_mbox, parse_since, unquote_mboxrd
from avgate.quarantine import QuarantineStore

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
FOUND = "Eicar-Test-Signature FOUND"


def mail(subject: str, body: bytes) -> bytes:
    return (b"From: a@example.org\nTo: b@example.org\nSubject: " + subject.encode() +
            b"\n\n" + body + b"\n")


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "avgate.toml"
    path.write_text(f'[quarantine]\npath = "{tmp_path / "q"}"\n')
    return path


def run(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(app, ["scan", "--no-progress", *args])
    return result.exit_code, result.stdout.splitlines()


def test_directory_recursive(tmp_path: Path, cfg: Path) -> None:
    d = tmp_path / "data"
    (d / "a" / "b").mkdir(parents=True)
    (d / "clean.txt").write_bytes(b"hello")
    (d / "a" / "b" / "eicar.com").write_bytes(EICAR)
    code, out = run("-c", str(cfg), str(d))
    assert code == 1
    assert f"{d}/a/b/eicar.com: {FOUND}" in out
    assert "Scanned files: 2" in out and "Infected files: 1" in out
    assert any(line.startswith("Next --since: ") for line in out)


def test_maildir_skips_tmp(tmp_path: Path, cfg: Path) -> None:
    md = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (md / sub).mkdir(parents=True)
    (md / "cur" / "1.host:2,S").write_bytes(mail("clean", b"hi"))
    (md / "new" / "2.host").write_bytes(mail("bad", EICAR))
    (md / "tmp" / "3.host").write_bytes(mail("in delivery", EICAR))
    code, out = run("-c", str(cfg), "--json", str(md))
    assert code == 1
    objs = [json.loads(line) for line in out]
    assert {Path(o["path"]).name: o["status"] for o in objs} == {
        "1.host:2,S": "clean", "2.host": "infected"}


def _mbox(messages: list[bytes]) -> bytes:
    return b"".join(b"From sender@example.org Mon Jan  1 00:00:00 2024\n" + m + b"\n"
                    for m in messages)


def test_mbox_split_and_unquote(tmp_path: Path) -> None:
    m1 = mail("one", b"line\n>From the start\n>>From deeper")
    mbox = tmp_path / "inbox"
    mbox.write_bytes(_mbox([m1, mail("two", b"x")]))
    items = list(iter_mbox(str(mbox)))
    assert [m.index for m, _ in items] == [1, 2]
    assert items[0][1] == mail("one", b"line\nFrom the start\n>From deeper")
    assert items[1][1] == mail("two", b"x")
    assert unquote_mboxrd(b">From x\n>>From y\nFrom z\n") == b"From x\n>From y\nFrom z\n"


def test_mbox_infected_in_the_middle(tmp_path: Path, cfg: Path) -> None:
    mbox = tmp_path / "inbox"
    mbox.write_bytes(_mbox([mail("one", b"a"), mail("two", EICAR), mail("three", b"c")]))
    code, out = run("-c", str(cfg), str(mbox))
    assert code == 1
    assert [line for line in out if "FOUND" in line] == [f"{mbox}:2: {FOUND}"]
    assert "Scanned files: 3" in out


def test_mbox_quarantine_keeps_other_messages_byte_identical(tmp_path: Path,
                                                             cfg: Path) -> None:
    msgs = [mail("one", b"a\n>From quoted"), mail("two", EICAR), mail("three", b"c"),
            mail("four", EICAR + b"\n"), mail("five", b"e\r\nf")]
    mbox = tmp_path / "inbox"
    mbox.write_bytes(_mbox(msgs))
    os.chmod(mbox, 0o640)
    code, out = run("-c", str(cfg), "--action", "quarantine", str(mbox))
    assert code == 1
    assert sum("moved to quarantine" in line for line in out) == 2
    assert mbox.read_bytes() == _mbox([msgs[0], msgs[2], msgs[4]])
    assert os.stat(mbox).st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".avgate")] == []
    with QuarantineStore(tmp_path / "q") as store:
        records = store.list()
        assert [store.read_raw(r.id) for r in records] == [msgs[1], msgs[3]]
        assert records[0].envelope.listener == f"{mbox}:2"
    # a second run finds nothing left
    code, out = run("-c", str(cfg), str(mbox))
    assert code == 0 and "Scanned files: 3" in out


def test_mbox_delete(tmp_path: Path, cfg: Path) -> None:
    msgs = [mail("one", EICAR), mail("two", b"b")]
    mbox = tmp_path / "inbox"
    mbox.write_bytes(_mbox(msgs))
    code, out = run("-c", str(cfg), "--action", "delete", str(mbox))
    assert code == 1 and f"{mbox}:1: Removed." in out
    assert mbox.read_bytes() == _mbox([msgs[1]])


def test_delete_files(tmp_path: Path, cfg: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "bad").write_bytes(EICAR)
    (d / "good").write_bytes(b"ok")
    code, out = run("-c", str(cfg), "--action", "delete", str(d))
    assert code == 1 and f"{d}/bad: Removed." in out
    assert sorted(p.name for p in d.iterdir()) == ["good"]


def test_quarantine_files_leaves_nothing_behind(tmp_path: Path, cfg: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "bad").write_bytes(EICAR)
    code, _ = run("-c", str(cfg), "--action", "quarantine", str(d))
    assert code == 1
    assert list(d.iterdir()) == []
    with QuarantineStore(tmp_path / "q") as store:
        (rec,) = store.list()
        assert store.read_raw(rec.id) == EICAR and rec.viruses == ("Eicar-Test-Signature",)


def test_state_second_run_scans_only_new_files(tmp_path: Path, cfg: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    old = time.time() - 3600
    for name in ("a", "b"):
        (d / name).write_bytes(b"x")
        os.utime(d / name, (old, old))
    state = tmp_path / "state"
    code, out = run("-c", str(cfg), "--json", "--state", str(state), str(d))
    assert code == 0 and len(out) == 2
    first = parse_since(state.read_text().strip())
    assert abs(first - time.time()) < 60
    (d / "c").write_bytes(EICAR)
    # after the first run started, before the second one starts
    between = first + (time.time() - first) / 2
    os.utime(d / "c", (between, between))
    code, out = run("-c", str(cfg), "--json", "--state", str(state), str(d))
    assert code == 1
    assert [json.loads(line)["path"] for line in out] == [str(d / "c")]
    assert parse_since(state.read_text().strip()) > first
    code, out = run("-c", str(cfg), "--state", str(state), str(d))
    assert code == 0 and "Scanned files: 0" in out and any(
        line.startswith("Not modified since") and line.endswith(": 3") for line in out)


def test_since_option(tmp_path: Path, cfg: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "old").write_bytes(EICAR)
    os.utime(d / "old", (time.time() - 7200, time.time() - 7200))
    (d / "new").write_bytes(b"ok")
    code, out = run("-c", str(cfg), "--since", "1h", str(d))
    assert code == 0 and "Scanned files: 1" in out
    code, out = run("-c", str(cfg), "--since", "@0", str(d))
    assert code == 1
    code, _ = run("-c", str(cfg), "--since", "yesterday-ish", str(d))
    assert code == 2


def test_parse_since_forms() -> None:
    now = 1_700_000_000.0
    assert parse_since("@1700000000") == now
    assert parse_since("2h", now=now) == now - 7200
    assert parse_since("3d", now=now) == now - 3 * 86400
    assert parse_since("2023-11-14T22:13:20Z") == now
    assert parse_since(format_time(now + 0.5)) == now + 0.5
    with pytest.raises(ValueError):
        parse_since("soon")
