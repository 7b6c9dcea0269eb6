"""Real Postfix (a private instance on loopback) with avgate as after-queue content_filter
and as before-queue smtpd_proxy_filter; the final hop is a recording sink."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import async_wait_until
from tests.integration.smtp.conftest import EICAR, Sink, StartAvgate, make_message
from tests.postfix_instance import PostfixInstance, free_port, postfix_factory, require_postfix

pytestmark = pytest.mark.postfix


@pytest.fixture
def postfix(tmp_path: Path) -> Iterator[Any]:
    require_postfix()  # CI runs as root and installs Postfix: missing there is a failure
    yield from postfix_factory(tmp_path)


def dated(msg: bytes) -> bytes:
    # a Date header, so Postfix's cleanup adds nothing inside the original header block
    return b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n" + msg


def original_part(delivered: bytes, original: bytes) -> bytes:
    """The delivered message from the original's first header on (drops prepended headers)."""
    start = delivered.find(original[:40])
    assert start >= 0, delivered[:500]
    prefix = delivered[:start]
    # only trace and verdict headers were added in front
    for line in prefix.split(b"\r\n"):
        assert line == b"" or line[:1] in (b" ", b"\t") or line.split(b":")[0] in (
            b"Received", b"X-Virus-Scanned", b"X-Virus-Status"), line
    return delivered[start:]


async def test_content_filter_after_queue(avgate: StartAvgate, sink: Sink,
                                          postfix: Any) -> None:
    reinject = free_port()
    gw = await avgate(listener={"next_hop": f"127.0.0.1:{reinject}"})
    pf: PostfixInstance = await asyncio.to_thread(
        postfix, relayhost=sink.address, reinject_port=reinject,
        main_cf={"smtp_send_xforward_command": "yes"},
        smtpd_options={"content_filter": f"smtp:[127.0.0.1]:{gw.port}"})
    clean = dated(make_message("after-queue clean", attachment=b"harmless bytes"))
    code, text = await asyncio.to_thread(pf.send, clean)
    assert code == 250, text
    virus = dated(make_message("after-queue virus", attachment=EICAR))
    code, _ = await asyncio.to_thread(pf.send, virus)
    assert code == 250  # after-queue: Postfix already took responsibility
    # clean mail arrives, byte-identical except the added trace + verdict headers
    assert await async_wait_until(lambda: len(sink.messages) >= 2, timeout=30), pf.log()
    to_bob = [m for m in sink.messages if m.recipients == ["bob@example.test"]]
    assert len(to_bob) == 1
    assert original_part(to_bob[0].data, clean) == clean
    assert b"X-Virus-Status: Clean" in to_bob[0].data
    # the infected one was refused by avgate (550): Postfix bounced it to the sender
    bounces = [m for m in sink.messages if m.recipients == ["alice@example.test"]]
    assert len(bounces) == 1 and bounces[0].sender in ("", "<>")
    assert b"Virus found: Eicar-Test-Signature" in bounces[0].data
    # XFORWARD made it through avgate: the reinjection smtpd logs the first queue id
    assert "orig_queue_id=" in pf.log(400), pf.log(400)
    assert await asyncio.to_thread(pf.wait_empty, 20)


async def test_proxy_filter_before_queue(avgate: StartAvgate, sink: Sink,
                                         postfix: Any) -> None:
    reinject = free_port()
    gw = await avgate(listener={"next_hop": f"127.0.0.1:{reinject}"})
    pf: PostfixInstance = await asyncio.to_thread(
        postfix, relayhost=sink.address, reinject_port=reinject,
        smtpd_options={"smtpd_proxy_filter": f"127.0.0.1:{gw.port}"})
    code, text = await asyncio.to_thread(
        pf.send, dated(make_message("before-queue virus", attachment=EICAR)))
    # the client sees avgate's refusal: nothing was queued
    assert code == 550 and b"Virus found: Eicar-Test-Signature" in text, (code, text)
    clean = dated(make_message("before-queue clean"))
    code, text = await asyncio.to_thread(pf.send, clean)
    assert code == 250, text
    assert await async_wait_until(lambda: len(sink.messages) >= 1, timeout=30), pf.log()
    await asyncio.sleep(0.5)
    [m] = sink.messages
    assert m.recipients == ["bob@example.test"]
    assert original_part(m.data, clean) == clean
    assert await asyncio.to_thread(pf.wait_empty, 20)
