"""Real Postfix (a private instance on loopback) with avgate as after-queue content_filter
and as before-queue smtpd_proxy_filter, each set up from README's recipe blocks as written
(only the ports are this run's); the final hop is a recording sink."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import async_wait_until
from tests.integration.smtp.conftest import EICAR, Sink, StartAvgate, make_message
from tests.integration.smtp.recipes import (
    AFTER_QUEUE,
    BEFORE_QUEUE,
    avgate_config,
    main_cf,
    master_cf,
)
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
            b"Received", b"X-Virus-Scanned", b"X-Virus-Status", b"X-Avgate-RefID"), line
    return delivered[start:]


def _recipe_listener(heading: str, reinject: int) -> dict[str, Any]:
    [listener] = avgate_config(heading)["smtp"]["listeners"]
    return {**listener, "listen": "127.0.0.1:0", "next_hop": f"127.0.0.1:{reinject}"}


async def test_content_filter_after_queue_recipe_never_bounces_a_virus(
        avgate: StartAvgate, sink: Sink, postfix: Any) -> None:
    reinject = free_port()
    gw = await avgate(listener=_recipe_listener(AFTER_QUEUE, reinject))
    main = {k: v.replace("[127.0.0.1]:10025", f"[127.0.0.1]:{gw.port}")
            for k, v in main_cf(AFTER_QUEUE).items()}
    master = "".join(s.text for s in master_cf(AFTER_QUEUE))
    # the instance's own smtpd line plays the stock "smtp inet" line, which the recipe keeps
    pf: PostfixInstance = await asyncio.to_thread(
        postfix, relayhost=sink.address, main_cf=main,
        master_cf_extra=master.replace("127.0.0.1:10026", f"127.0.0.1:{reinject}"))
    clean = dated(make_message("after-queue clean", attachment=b"harmless bytes"))
    code, text = await asyncio.to_thread(pf.send, clean)
    assert code == 250, text
    virus = dated(make_message("after-queue virus", attachment=EICAR))
    code, _ = await asyncio.to_thread(pf.send, virus)
    assert code == 250  # after-queue: Postfix already took responsibility
    assert await async_wait_until(lambda: gw.gateway.store.count() == 1, timeout=30), pf.log()
    assert await asyncio.to_thread(pf.wait_empty, 30), pf.log()
    # clean mail arrives, byte-identical except the added trace + verdict headers
    assert await async_wait_until(lambda: len(sink.messages) >= 1, timeout=30), pf.log()
    await asyncio.sleep(1)
    [m] = sink.messages  # ...and nothing else: no bounce to the (forged) sender
    assert m.recipients == ["bob@example.test"]
    assert original_part(m.data, clean) == clean
    assert b"X-Virus-Status: Clean" in m.data
    log = pf.log(400)
    assert "status=bounced" not in log and "sender non-delivery notification" not in log, log
    assert "status=sent (250 2.0.0 Ok: discarded (quarantined as " in log, log
    # the virus is held in the quarantine with its envelope, for release
    [rec] = gw.gateway.store.list()
    assert rec.rule == "default:infected+after_queue" and rec.viruses == (
        "Eicar-Test-Signature",)
    assert rec.envelope.sender == "alice@example.test"
    assert rec.envelope.recipients == ("bob@example.test",)
    # XFORWARD (set on the avgate transport) made it through: the reinjection smtpd logs
    # the first queue id
    assert "orig_queue_id=" in log, log


async def test_proxy_filter_before_queue_recipe(avgate: StartAvgate, sink: Sink,
                                                postfix: Any) -> None:
    reinject = free_port()
    gw = await avgate(listener=_recipe_listener(BEFORE_QUEUE, reinject))
    services = master_cf(BEFORE_QUEUE)
    [smtp] = [s for s in services if s.name == "smtp"]  # replaces the stock smtp line:
    options = {k: v.replace("127.0.0.1:10025", f"127.0.0.1:{gw.port}")  # here, the
               for k, v in smtp.options.items()}  # instance's own smtpd line
    extra = "".join(s.text for s in services if s is not smtp)
    pf: PostfixInstance = await asyncio.to_thread(
        postfix, relayhost=sink.address, smtpd_options=options,
        master_cf_extra=extra.replace("127.0.0.1:10026", f"127.0.0.1:{reinject}"))
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
    assert gw.gateway.store.count() == 0
    assert await asyncio.to_thread(pf.wait_empty, 20)
