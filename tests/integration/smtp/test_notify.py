"""Notices through the real SMTP path: the admin notice reaches the next hop as its own
message from ``<>``, the client's answer never waits for it, and a notice that cannot be
sent changes nothing but a log line."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from avgate.observability import ScanLog
from tests.corpus import EICAR, make_message
from tests.helpers import async_wait_until
from tests.integration.smtp.conftest import Sink, StartAvgate, closed_port, send_smtplib


async def test_admin_and_recipient_notices_for_held_virus(avgate: StartAvgate, sink: Sink,
                                                          tmp_path: Path) -> None:
    notice_sink = await Sink().start()
    try:
        running = await avgate(listener={"next_hop": sink.address},
                               notify={"admin": ["virusalert@example.org"], "recipient": True,
                                       "next_hop": notice_sink.address,
                                       "from_address": "avgate@gw.example"})
        log = ScanLog(str(tmp_path / "scan.log"), "info")
        running.gateway.log = log
        code, _ = await asyncio.to_thread(
            send_smtplib, running.port, make_message("bad", attachment=EICAR,
                                                     name="eicar.com"))
        assert code == 550
        assert await async_wait_until(lambda: len(notice_sink.messages) == 2, 20)
        by_rcpt = {m.recipients[0]: m for m in notice_sink.messages}
        admin, bob = by_rcpt["virusalert@example.org"], by_rcpt["bob@example.test"]
        assert admin.sender == bob.sender == "<>"  # the null sender: no bounce loops
        assert b"Eicar-Test-Signature" in admin.data and b"eicar.com" in admin.data
        assert b"A message to you was held" in bob.data
        assert EICAR not in admin.data + bob.data  # never the content
        assert sink.messages == []
        log.close()
        lines = [json.loads(x) for x in (tmp_path / "scan.log").read_text().splitlines()]
        notes = [e for e in lines if e.get("event") == "notify"]
        assert sorted(e["kind"] for e in notes) == ["admin", "recipient"]
        assert all(e["ok"] for e in notes)
        refid = next(e["refid"] for e in lines if e.get("event") == "scan")
        assert {e["refid"] for e in notes} == {refid}
    finally:
        await notice_sink.stop()


async def test_a_notice_that_cannot_be_sent_changes_nothing(avgate: StartAvgate, sink: Sink,
                                                            tmp_path: Path) -> None:
    running = await avgate(listener={"next_hop": sink.address},
                           notify={"admin": ["virusalert@example.org"],
                                   "next_hop": f"127.0.0.1:{closed_port()}", "timeout": 5})
    log = ScanLog(str(tmp_path / "scan.log"), "info")
    running.gateway.log = log
    code, _ = await asyncio.to_thread(send_smtplib, running.port,
                                      make_message("bad", attachment=EICAR))
    assert code == 550  # the verdict, whatever happens to the notice
    code, _ = await asyncio.to_thread(send_smtplib, running.port, make_message("fine"))
    assert code == 250 and len(sink.messages) == 1

    def failed() -> list[dict[str, object]]:
        text = (tmp_path / "scan.log").read_text()
        return [e for e in map(json.loads, text.splitlines())
                if e.get("event") == "notify" and e.get("ok") is False]

    assert await async_wait_until(lambda: len(failed()) == 1, 20)
    assert failed()[0]["level"] == "warning" and failed()[0]["error"]
    log.close()
