"""Listener modes (``before_queue`` | ``after_queue`` | ``verdict``), the replies a mode gives
for each outcome, and the Sun Messaging Server settings that reach an SMTP client
(``tempfail_reply = "452 4.4.5 ..."``, an empty ``verdict_prefix``).

After the queue (Postfix ``content_filter``) a 5xx makes the MTA bounce the message — the
virus included — to the envelope sender, which malware forges: so there avgate never
answers 5xx; what policy rejects is quarantined and acknowledged (amavisd-new's D_DISCARD).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from avgate import config as config_mod
from avgate.cli import app
from avgate.errors import ConfigError
from tests.integration.smtp.conftest import (
    EICAR,
    RawClient,
    Sink,
    StartAvgate,
    closed_port,
    make_message,
)
from tests.integration.smtp.recipes import blocks


async def _send(port: int, msg: bytes, sender: str = "alice@example.test") -> str:
    """One transaction; the reply to the end of data (or the first refusal)."""
    c = await RawClient.connect(port)
    try:
        assert (await c.cmd("EHLO client.test")).startswith("250")
        for cmd in (f"MAIL FROM:<{sender}>", "RCPT TO:<bob@example.test>"):
            r = await c.cmd(cmd)
            if not r.startswith("250"):
                return r
        assert (await c.cmd("DATA")).startswith("354")
        return await c.cmd(msg + b".\r\n")
    finally:
        await c.close()


def _quarantine_id(reply: str) -> str:
    assert reply.startswith("250 2.0.0 Ok: discarded (quarantined as "), reply
    return reply.rsplit(" ", 1)[1].rstrip(")")


def _listener(**table: Any) -> Any:
    cfg = config_mod.from_dict({"smtp": {"listeners": [table]}})
    return cfg.smtp_listeners[0]


# -- after the queue: never a 5xx ------------------------------------------------------------
async def test_after_queue_infected_is_quarantined_with_250_not_rejected(
        avgate: StartAvgate, sink: Sink) -> None:
    gw = await avgate(listener={"next_hop": sink.address, "mode": "after_queue"})
    reply = await _send(gw.port, make_message("virus", attachment=EICAR))
    qid = _quarantine_id(reply)
    assert sink.messages == []  # not delivered...
    rec = gw.gateway.store.get(qid)  # ...but kept, with the envelope, for release
    assert rec.rule == "default:infected+after_queue"
    assert rec.envelope.sender == "alice@example.test"
    assert "Eicar-Test-Signature" in rec.viruses
    # clean mail still flows, tagged
    assert (await _send(gw.port, make_message("clean"))).startswith("250 2.0.0 Ok: queued")
    [m] = sink.messages
    assert b"X-Virus-Status: Clean" in m.data


async def test_after_queue_turns_every_reject_into_quarantine(
        avgate: StartAvgate, sink: Sink) -> None:
    # a rule's reject, and the structural-limit default, are 5xx too: held, never bounced
    gw = await avgate(listener={"next_hop": sink.address, "mode": "after_queue"},
                      policy={"rules": [{"name": "calendar", "status": "infected",
                                         "action": "reject",
                                         "reply": "550 5.7.1 FilterVerdictPositive"}]})
    qid = _quarantine_id(await _send(gw.port, make_message(attachment=EICAR)))
    assert gw.gateway.store.get(qid).rule == "calendar+after_queue"
    gw = await avgate(listener={"next_hop": sink.address, "mode": "after_queue"},
                      limits={"max_files": 1})
    reply = await _send(gw.port, _three_parts())  # over max_files: a structural limit
    assert gw.gateway.store.get(_quarantine_id(reply)).rule == (
        "default:structural-limit+after_queue")
    assert sink.messages == []


def _three_parts() -> bytes:
    boundary = b"==b=="
    parts = b"".join(b"--" + boundary + b"\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Disposition: attachment; filename=\"f%d.bin\"\r\n\r\n"
                     % i + b"part %d\r\n" % i for i in range(3))
    return (b"From: a@example.test\r\nTo: b@example.test\r\nSubject: parts\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"" + boundary
            + b"\"\r\n\r\n" + parts + b"--" + boundary + b"--\r\n")


async def test_after_queue_discard_rule_drops_without_keeping(
        avgate: StartAvgate, sink: Sink) -> None:
    gw = await avgate(listener={"next_hop": sink.address, "mode": "after_queue"},
                      policy={"rules": [{"status": "infected", "action": "discard"}]})
    assert await _send(gw.port, make_message(attachment=EICAR)) == "250 2.0.0 Ok: discarded"
    assert gw.gateway.store.count() == 0 and sink.messages == []


@pytest.fixture
def dead_clamd() -> list[dict[str, object]]:
    return [{"type": "clamd", "servers": [f"tcp://127.0.0.1:{closed_port()}"],
             "connect_timeout": 0.5, "scan_timeout": 2}]


async def test_after_queue_scanner_down_still_tempfails(
        avgate: StartAvgate, sink: Sink, dead_clamd: list[dict[str, object]]) -> None:
    # a 4xx keeps the mail in the MTA's queue (retried): nothing is bounced or lost
    gw = await avgate(listener={"next_hop": sink.address, "mode": "after_queue"},
                      engines=dead_clamd)
    reply = await _send(gw.port, make_message(attachment=EICAR))
    assert reply.startswith("451 4.7.1 Virus scanner unavailable"), reply
    assert gw.gateway.store.count() == 0 and sink.messages == []


async def test_before_queue_is_the_default_and_rejects(avgate: StartAvgate, sink: Sink) -> None:
    gw = await avgate(listener={"next_hop": sink.address})
    assert gw.listeners[0].settings.mode == "before_queue"
    reply = await _send(gw.port, make_message(attachment=EICAR))
    assert reply.startswith("550 5.7.1 Virus found: Eicar-Test-Signature"), reply
    gw2 = await avgate(listener={"next_hop": sink.address, "mode": "before_queue"})
    reply = await _send(gw2.port, make_message(attachment=EICAR))
    assert reply.startswith("550 5.7.1 Virus found: Eicar-Test-Signature"), reply
    assert gw.gateway.store.count() == 0 and sink.messages == []


async def test_verdict_mode_needs_no_next_hop_and_rejects(avgate: StartAvgate) -> None:
    gw = await avgate(listener={"mode": "verdict", "name": "verdict"})
    assert gw.listeners[0].settings.next_hop == "discard"
    assert "verdict" in gw.listeners[0].describe()
    assert await _send(gw.port, make_message(attachment=b"calendar\r\n")) == (
        "250 2.0.0 Ok: clean")
    reply = await _send(gw.port, make_message(attachment=EICAR))
    assert reply.startswith("550 5.7.1 Virus found: Eicar-Test-Signature"), reply


# -- the settings ------------------------------------------------------------------------------
def test_next_hop_discard_still_means_verdict() -> None:
    s = _listener(next_hop="discard")
    assert (s.mode, s.relay_to) == ("verdict", None)
    assert _listener().mode == "before_queue"
    assert _listener(mode="after_queue").next_hop == "127.0.0.1:10026"


@pytest.mark.parametrize(("table", "words"), [
    ({"mode": "verdict", "next_hop": "127.0.0.1:10026"}, 'mode = "verdict" relays nothing'),
    ({"mode": "after_queue", "next_hop": "discard"}, 'next_hop = "discard"'),
    ({"mode": "after-queue"}, "after_queue"),
])
def test_mode_and_next_hop_must_agree(table: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _listener(**table)
    assert "smtp.listeners[0]" in str(exc.value) and words in str(exc.value), exc.value


def test_modes_survive_config_show() -> None:
    text = ('[[smtp.listeners]]\nmode = "verdict"\n[[smtp.listeners]]\nname = "aq"\n'
            'listen = "127.0.0.1:10024"\nmode = "after_queue"\n')
    c = config_mod.loads(text)
    again = config_mod.loads(config_mod.render_toml(c.to_dict()))
    assert [(x.mode, x.next_hop) for x in again.smtp_listeners] == [
        ("verdict", "discard"), ("after_queue", "127.0.0.1:10026")]


# -- Sun Messaging Server: 452 4.4.5 and FIELD --------------------------------------------------
@pytest.mark.parametrize("mode", ["before_queue", "after_queue"])
async def test_scanner_down_reply_452_4_4_5_reaches_the_client(
        avgate: StartAvgate, sink: Sink, dead_clamd: list[dict[str, object]], mode: str) -> None:
    policy = tomllib.loads(blocks("SMTP filter")["toml"])["policy"]  # README's, as written
    assert policy == {"tempfail_reply": "452 4.4.5 Virus scanner unavailable, try again later"}
    gw = await avgate(listener={"next_hop": sink.address, "mode": mode}, engines=dead_clamd,
                      policy=policy)
    reply = await _send(gw.port, make_message(attachment=EICAR))
    assert reply == "452 4.4.5 Virus scanner unavailable, try again later"
    assert sink.messages == []


def test_empty_verdict_prefix_is_refused_by_config_check(tmp_path: Path) -> None:
    # Sun's empty FIELD: a header line without "Name:" is not RFC 5322; it must be refused
    # where the operator sees it, not become "451 4.3.0" on every message
    f = tmp_path / "sun.toml"
    f.write_text('[policy]\nheader_style = "clamav-verdict"\nverdict_prefix = ""\n'
                 '[[smtp.listeners]]\nlisten = "127.0.0.1:0"\n')
    r = CliRunner().invoke(app, ["config", "check", str(f)])
    assert r.exit_code != 0
    out = r.output
    assert "policy.verdict_prefix (line 3)" in out, out
    assert "empty" in out and "RFC 5322" in out, out
