"""The SMTP next hop down, refusing, deferring, slow, and coming back — with mixed clean and
infected traffic counted message by message. avgate answers DATA only with the next hop's
own outcome: no 250 unless the next hop said 250, never an infected message relayed."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.reliability.conftest import Ledger, Sink, ThreadSink, send_batch, wrongly_scanned


async def test_next_hop_goes_down_and_comes_back(avgate: Any, embedded: Any) -> None:
    """The next hop process dies (its listening socket AND open connections go away, e.g.
    avgate's pooled next-hop connections) and comes back on the same port."""
    sink = await asyncio.to_thread(ThreadSink().start)
    port = sink.port
    gw = await avgate(listener={"next_hop": sink.address, "relay_timeout": 2}, engines=embedded)
    ledger = Ledger()
    delivered: list[bytes] = []
    try:
        up = await send_batch(gw.port, ledger, 8, tag="up-")
        assert not wrongly_scanned(ledger, up)
        await asyncio.to_thread(sink.stop)
        delivered += sink.messages

        down = await send_batch(gw.port, ledger, 8, tag="down-")
        assert set(down.values()) == {"tempfailed"}, ledger.replies
        assert all(ledger.replies[m].startswith("451 4.4.") for m in down), ledger.replies

        sink = await asyncio.to_thread(ThreadSink(port).start)  # back, on the same port
        back = await send_batch(gw.port, ledger, 8, tag="back-")
        assert not wrongly_scanned(ledger, back), {m: ledger.replies[m] for m in back}
    finally:
        await asyncio.to_thread(sink.stop)
    delivered += sink.messages
    ledger.check(delivered, sent=24)


async def test_next_hop_refusing_permanently(avgate: Any, sink: Sink, embedded: Any) -> None:
    sink.data_reply = "554 5.7.1 next hop says no"
    gw = await avgate(listener={"next_hop": sink.address}, engines=embedded)
    ledger = Ledger()
    batch = await send_batch(gw.port, ledger, 12)
    assert set(batch.values()) == {"rejected"}
    for m in batch:  # clean: the next hop's 554; infected: avgate's own 550, never relayed
        want = "554 5.7.1 next hop says no" if ledger.kinds[m] == "clean" else "550 5.7.1"
        assert ledger.replies[m].startswith(want), ledger.replies[m]
    ledger.check([x.data for x in sink.messages], sent=12)


async def test_next_hop_deferring(avgate: Any, sink: Sink, embedded: Any) -> None:
    sink.data_reply = "452 4.3.1 insufficient system storage"
    gw = await avgate(listener={"next_hop": sink.address}, engines=embedded)
    ledger = Ledger()
    batch = await send_batch(gw.port, ledger, 8)
    for m in batch:
        if ledger.kinds[m] == "clean":
            assert ledger.replies[m].startswith("451"), ledger.replies[m]
        else:
            assert ledger.replies[m].startswith("550"), ledger.replies[m]
    ledger.check([x.data for x in sink.messages], sent=8)


async def test_next_hop_slow_relay_timeout(avgate: Any, sink: Sink, embedded: Any) -> None:
    """The next hop takes longer than relay_timeout to answer DATA: 451 within the bound;
    infected messages are rejected without waiting for the next hop at all."""
    sink.data_delay = 3.0
    gw = await avgate(listener={"next_hop": sink.address, "relay_timeout": 0.5}, engines=embedded)
    ledger = Ledger()
    t0 = time.monotonic()
    batch = await send_batch(gw.port, ledger, 8, concurrency=8)
    assert time.monotonic() - t0 < 2.5
    for m in batch:
        want = "451 4.4.2" if ledger.kinds[m] == "clean" else "550 5.7.1"
        assert ledger.replies[m].startswith(want), ledger.replies[m]
    # aiosmtpd drops the message when avgate hangs up: nothing is at the sink, so a 451
    # here loses nothing and duplicates nothing. A next hop that kept it would store it
    # data_delay after it got it: wait until then (nothing to poll for: this checks that
    # nothing happens), so such a late delivery fails the check below.
    await asyncio.sleep(max(0.0, t0 + sink.data_delay + 0.3 - time.monotonic()))
    ledger.check([x.data for x in sink.messages], sent=8)
