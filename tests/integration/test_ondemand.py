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
    assert not any(line.startswith("Next --since") for line in out)  # only with --state


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
        assert records[0].source == f"{mbox}:2" and records[0].envelope.listener == ""
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


# -- issue 13: report lines, scan log, record source, mbox copies ------------------------------
def test_next_since_is_printed_only_with_state(tmp_path: Path, cfg: Path) -> None:
    (tmp_path / "f").write_bytes(b"hello")
    code, out = run("-c", str(cfg), str(tmp_path / "f"))
    assert code == 0 and "Scanned files: 1" in out
    assert not any(line.startswith("Next --since") for line in out)
    code, out = run("-c", str(cfg), "--state", str(tmp_path / "state"), str(tmp_path / "f"))
    assert code == 0
    assert [line for line in out if line.startswith("Next --since: ")] == [
        f"Next --since: {(tmp_path / 'state').read_text().strip()}"]


def _encrypted_7z() -> bytes:
    import io

    import py7zr

    buf = io.BytesIO()
    with py7zr.SevenZipFile(buf, "w", password="secret") as archive:  # noqa: S106
        archive.writestr(EICAR, "eicar.com")
    return buf.getvalue()


def test_skipped_and_unknown_objects_get_a_line_each(tmp_path: Path) -> None:
    cfg = tmp_path / "avgate.toml"
    cfg.write_text('[limits]\nmax_scan_size = 1000\n')
    d = tmp_path / "d"
    d.mkdir()
    (d / "big.bin").write_bytes(b"x" * 5000)
    (d / "locked.7z").write_bytes(_encrypted_7z())
    (d / "fine.txt").write_bytes(b"fine")
    (d / "bad\x1b[2J.com").write_bytes(EICAR)  # a name chosen by whoever made the file
    code, out = run("-c", str(cfg), str(d))
    assert code == 1
    skipped = [line for line in out if line.endswith(" SKIPPED")]
    unknown = [line for line in out if line.endswith(" UNKNOWN")]
    assert len(skipped) == 1 and skipped[0].startswith(f"{d}/big.bin: ")
    assert "max_scan_size" in skipped[0] or "size" in skipped[0], skipped
    assert len(unknown) == 1 and unknown[0].startswith(f"{d}/locked.7z: ")
    assert "encrypted" in unknown[0]
    assert f"{d}/bad\\x1b[2J.com: {FOUND}" in out  # shown escaped, like `quarantine list`
    assert not any("\x1b" in line for line in out)
    assert not any("fine.txt" in line for line in out)  # clean objects stay silent
    assert "Skipped files: 1" in out and "Unknown files: 1" in out
    # --json is unchanged: one object per scanned object, nothing else
    code, out = run("-c", str(cfg), "--json", str(d))
    assert sorted(json.loads(line)["status"] for line in out) == [
        "clean", "infected", "skipped", "unknown"]


def test_on_demand_scans_write_the_scan_log(tmp_path: Path) -> None:
    cfg = tmp_path / "avgate.toml"
    cfg.write_text(f'[quarantine]\npath = "{tmp_path / "q"}"\n[log]\npath = "scan.log"\n')
    d = tmp_path / "d"
    d.mkdir()
    (d / "bad").write_bytes(EICAR)
    (d / "good").write_bytes(b"ok")
    mbox = d / "inbox"
    mbox.write_bytes(_mbox([mail("one", b"a"), mail("two", EICAR)]))
    code, _ = run("-c", str(cfg), "--action", "quarantine", str(d))
    assert code == 1
    log = tmp_path / "scan.log"  # relative to the config file, like serve's
    events = [json.loads(line) for line in log.read_text().splitlines()]
    scans = {e["source"]: e for e in events if e["event"] == "scan"}
    assert set(scans) == {str(d / "bad"), str(d / "good"), f"{mbox}:1", f"{mbox}:2"}
    assert all(e["frontend"] == "ondemand" and e["listener"] == "" for e in scans.values())
    with QuarantineStore(tmp_path / "q") as store:
        ids = {r.source: r.id for r in store.list()}
    for source in (str(d / "bad"), f"{mbox}:2"):
        assert scans[source]["status"] == "infected"
        assert scans[source]["actions"] == ["quarantine"]
        assert scans[source]["ids"] == {"quarantine": ids[source]}
    assert scans[str(d / "good")]["status"] == "clean" and scans[str(d / "good")]["actions"] == []
    (summary,) = [e for e in events if e["event"] == "scan_summary"]
    assert summary["scanned"] == 4 and summary["quarantined"] == 2
    # report mode logs what was found and that nothing was done
    (d / "bad2").write_bytes(EICAR)
    run("-c", str(cfg), str(d / "bad2"))
    last = [json.loads(line) for line in log.read_text().splitlines()
            if '"event":"scan"' in line][-1]
    assert last["source"] == str(d / "bad2") and last["actions"] == []


def test_on_demand_records_have_a_source_and_no_listener(tmp_path: Path, cfg: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "bad").write_bytes(EICAR)
    mbox = d / "inbox"
    mbox.write_bytes(_mbox([mail("one", b"a"), mail("two", EICAR)]))
    code, _ = run("-c", str(cfg), "--action", "quarantine", str(d))
    assert code == 1
    with QuarantineStore(tmp_path / "q") as store:
        records = store.list()
    assert sorted(r.source for r in records) == [str(d / "bad"), f"{mbox}:2"]
    assert [r.envelope.listener for r in records] == ["", ""]
    assert {r.to_dict()["source"] for r in records} == {str(d / "bad"), f"{mbox}:2"}


# A child that runs `avgate scan --action delete` and is SIGKILLed in the middle of the mbox
# rewrite: "write" while the new copy is being written (first fsync of the run), after listing
# the mbox's directory; "rename" once the copy is complete, as it is about to replace the mbox.
KILLED_RUN = r'''
import os, signal, sys
when, listing, mbox = sys.argv[1], sys.argv[2], sys.argv[3]
real_fsync = os.fsync
def fsync(fd):
    real_fsync(fd)
    if when == "write":
        with open(listing, "w") as f:
            f.write("\n".join(sorted(os.listdir(os.path.dirname(mbox)))))
        os.kill(os.getpid(), signal.SIGKILL)
def replace(src, dst, **kw):
    if when == "rename" and os.path.abspath(dst) == mbox:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, **kw)
real_replace = os.replace
os.fsync, os.replace = fsync, replace
from avgate.cli import main
sys.argv = ["avgate", "scan", "--no-progress", "--action", "delete", mbox]
main()
'''


def _killed_run(when: str, mbox: Path, tmp_path: Path) -> list[str]:
    import subprocess
    import sys

    listing = tmp_path / f"listing-{when}"
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, when, str(listing), str(mbox)],
                          capture_output=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == -9, proc.stderr.decode()
    return listing.read_text().split("\n") if listing.exists() else []


def _o_tmpfile_works(directory: Path) -> bool:
    try:
        os.close(os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o600))
    except OSError:
        return False
    return True


def test_mbox_rewrite_killed_leaves_nothing_for_mail_tools(tmp_path: Path, cfg: Path) -> None:
    mail_dir = tmp_path / "Mail"
    mail_dir.mkdir()
    msgs = [mail("one", b"a"), mail("two", EICAR), mail("three", b"c")]
    mbox = mail_dir / "inbox"
    original = _mbox(msgs)
    mbox.write_bytes(original)
    # killed while the new copy is written: nothing but the mbox in its directory
    listing = _killed_run("write", mbox, tmp_path)
    assert mbox.read_bytes() == original
    if _o_tmpfile_works(mail_dir):
        assert listing == ["inbox"]
    # killed as the complete copy is about to replace the mbox: a dot-file is left ...
    _killed_run("rename", mbox, tmp_path)
    assert mbox.read_bytes() == original
    leftovers = [p.name for p in mail_dir.iterdir() if p.name != "inbox"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".avgate-mbox-")
    # ... which a scan of the directory does not take for a mailbox ...
    code, out = run("-c", str(cfg), str(mail_dir))
    assert code == 1 and [line for line in out if "FOUND" in line] == [f"{mbox}:2: {FOUND}"]
    # ... and the next run removes, under the mbox's lock, with an older avgate's copies
    (mail_dir / ".avgate-mbox-k2x_9abq").write_bytes(original)
    code, out = run("-c", str(cfg), "--action", "delete", str(mail_dir))
    assert code == 1 and f"{mbox}:2: Removed." in out
    assert sorted(p.name for p in mail_dir.iterdir()) == ["inbox"]
    assert mbox.read_bytes() == _mbox([msgs[0], msgs[2]])


def test_stale_copies_go_even_when_nothing_is_left_to_remove(tmp_path: Path,
                                                             cfg: Path) -> None:
    mbox = tmp_path / "Mail" / "inbox"
    mbox.parent.mkdir()
    mbox.write_bytes(_mbox([mail("one", b"a")]))
    stale = mbox.parent / f".avgate-mbox-inbox.{2**22 + 7}.tmp"
    stale.write_bytes(mbox.read_bytes())
    other = mbox.parent / ".avgate-mbox-otherbox.123.tmp"  # another mbox's: not ours to judge
    other.write_bytes(b"From x\n")
    code, _ = run("-c", str(cfg), str(mbox))  # report: changes nothing
    assert code == 0 and stale.exists()
    code, _ = run("-c", str(cfg), "--action", "delete", str(mbox))
    assert code == 0 and not stale.exists() and other.exists()
