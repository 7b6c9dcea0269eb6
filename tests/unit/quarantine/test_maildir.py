"""``[quarantine] deliver_to_maildir``: a held message also lands in the recipient's Maildir
folder (IndiMail's QUARANTINE), beside the store; hostile recipients never leave the template."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from avgate import config as config_mod
from avgate.context import Context
from avgate.errors import ConfigError
from avgate.gateway import Gateway
from avgate.quarantine import Envelope, QuarantineStore
from avgate.quarantine.maildir import MaildirDelivery, UnsafeRecipient, split_recipient
from avgate.result import Finding, ScanResult, ScanStatus
from avgate.spool import Spool

MSG = b"From: a@example.org\r\nSubject: held\r\n\r\nbody \x00\xff\r\n"
RESULT = ScanResult(ScanStatus.INFECTED, findings=(Finding("Eicar-Test-Signature", "e", ""),))


def template(root: Path) -> str:
    return str(root) + "/{domain}/{local}/Maildir/.Quarantine"


def mailbox(root: Path, domain: str, local: str) -> Path:
    box = root / domain / local / "Maildir"
    box.mkdir(parents=True)
    return box


def test_held_message_lands_in_each_local_recipients_folder(tmp_path: Path) -> None:
    root = tmp_path / "vmail"
    bob = mailbox(root, "example.net", "bob")
    store = QuarantineStore(tmp_path / "q", maildir=MaildirDelivery(template(root)))
    env = Envelope("a@example.org", ("bob@Example.NET", "carol@example.net"))
    rid = store.put(MSG, env, RESULT)
    folder = bob / ".Quarantine"
    assert {p.name for p in folder.iterdir()} == {"tmp", "new", "cur", "maildirfolder"}
    [copy] = list((folder / "new").iterdir())
    assert copy.read_bytes() == b"X-Avgate-Quarantine-ID: " + rid.encode() + b"\r\n" + MSG
    assert copy.stat().st_mode & 0o777 == 0o600
    assert list((folder / "tmp").iterdir()) == []
    assert not (root / "example.net" / "carol").exists()  # no mailbox here: skipped
    assert store.read_raw(rid) == MSG  # the store keeps its record as always
    store.close()


def test_mode_and_lf_messages(tmp_path: Path) -> None:
    root = tmp_path / "vmail"
    bob = mailbox(root, "example.net", "bob")
    store = QuarantineStore(tmp_path / "q", maildir=MaildirDelivery(template(root), 0o640))
    lf = MSG.replace(b"\r\n", b"\n")
    spool = Spool(memory_limit=8)  # a spool on disk is copied in chunks
    spool.write(lf)
    spool.finish()
    rid = store.put(spool, Envelope("", ("bob@example.net",)), RESULT)
    spool.close()
    [copy] = list((bob / ".Quarantine/new").iterdir())
    assert copy.read_bytes() == f"X-Avgate-Quarantine-ID: {rid}\n".encode() + lf
    assert copy.stat().st_mode & 0o777 == 0o640
    store.close()


@pytest.mark.parametrize("rcpt", ["../../../etc@example.net", "bob/../../x@example.net",
                                  ".bob@example.net", "bob@../example.net",
                                  "bob@example.net/..", "bo\nb@example.net", "@example.net",
                                  "bob@exa mple.net", "bob\x00@example.net"])
def test_hostile_recipient_never_leaves_the_template(tmp_path: Path, rcpt: str) -> None:
    root = tmp_path / "vmail"
    mailbox(root, "example.net", "bob")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(UnsafeRecipient):
        split_recipient(rcpt)
    store = QuarantineStore(tmp_path / "q", maildir=MaildirDelivery(template(root)))
    rid = store.put(MSG, Envelope("", (rcpt,)), RESULT)
    after = sorted(str(p) for p in tmp_path.rglob("*") if "/q/" not in str(p)
                   and not str(p).endswith("/q"))
    assert after == before
    assert store.read_raw(rid) == MSG
    store.close()


@pytest.mark.parametrize("link", [".Quarantine", ".Quarantine/tmp", ".Quarantine/new"])
def test_symlinked_folder_refused_record_kept(tmp_path: Path, link: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "vmail"
    bob = mailbox(root, "example.net", "bob")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (bob / link).parent.mkdir(exist_ok=True)
    os.symlink(elsewhere, bob / link)
    store = QuarantineStore(tmp_path / "q", maildir=MaildirDelivery(template(root)))
    rid = store.put(MSG, Envelope("", ("bob@example.net",)), RESULT)
    assert list(elsewhere.iterdir()) == []
    assert store.read_raw(rid) == MSG
    assert "cannot deliver" in capsys.readouterr().err
    store.close()


@pytest.mark.parametrize(("value", "why"), [("relative/{local}", "absolute"),
                                            ("/x/{user}/Maildir", "placeholder"),
                                            ("/x/{local", "placeholder")])
def test_bad_template_refused_by_config(value: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_mod.from_dict({"quarantine": {"deliver_to_maildir": value}})
    assert why in str(err.value.problems)


def test_report_addresses_fall_back_to_report_to() -> None:
    q = config_mod.from_dict({"quarantine": {"report_to": "all@x.test",
                                             "report_fn_to": "fn@x.test"}}).quarantine
    assert q.report_address("false-positive") == "all@x.test"
    assert q.report_address("false-negative") == "fn@x.test"
    assert config_mod.from_dict({}).quarantine.deliver_to_maildir == ""


async def test_gateway_quarantine_delivers_to_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "vmail"
    bob = mailbox(root, "example.net", "bob")
    cfg = config_mod.from_dict({
        "policy": {"virus_action": "quarantine"},
        "quarantine": {"path": str(tmp_path / "q"), "deliver_to_maildir": template(root)}})
    gw = Gateway.from_config(cfg)
    await gw.start()
    try:
        eicar = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")
        with Spool.from_bytes(b"Subject: x\r\n\r\n" + eicar + b"\r\n") as spool:
            out = await gw.process(spool, Context("smtp", sender="a@example.org",
                                                  recipients=["bob@example.net"]))
    finally:
        await gw.close()
    assert out.quarantine_id is not None
    [copy] = list((bob / ".Quarantine/new").iterdir())
    assert out.quarantine_id.encode() in copy.read_bytes()
