"""clamd faults under SMTP traffic: SIGKILL mid-run and restart, SIGSTOP (hung daemon, the
timeouts must fire), one of two clamd down (failover / round robin: no tempfails).

Each test uses its own private clamd (``own_clamd``), never the session-wide one, and counts
every message: sent == delivered + rejected + tempfailed (+ quarantined), no infected message
delivered, nothing delivered unscanned.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.reliability.conftest import Ledger, Sink, send_batch, wrongly_scanned

pytestmark = pytest.mark.clamd


def clamd_engine(servers: list[str], **kw: Any) -> list[dict[str, Any]]:
    return [{"type": "clamd", "servers": servers, "connect_timeout": 0.5,
             "scan_timeout": 0.5, "retry_after": 0.1, **kw}]


async def test_clamd_sigkill_mid_run_then_restart(avgate: Any, sink: Sink, own_clamd: Any) -> None:
    d = own_clamd()
    gw = await avgate(listener={"next_hop": sink.address}, engines=clamd_engine([d.tcp]),
                      scan={"cache": False})
    ledger = Ledger()
    before = await send_batch(gw.port, ledger, 8, tag="before-")
    assert not wrongly_scanned(ledger, before)

    # kill while a batch is in flight: each message is either scanned or tempfailed
    async def kill_soon() -> None:
        await asyncio.sleep(0.05)
        d.kill()
    during, _ = await asyncio.gather(send_batch(gw.port, ledger, 8, tag="during-"), kill_soon())
    assert set(during.values()) <= {"delivered", "rejected", "tempfailed"}

    dead = await send_batch(gw.port, ledger, 6, tag="dead-")
    assert set(dead.values()) == {"tempfailed"}, dead
    assert all(ledger.replies[m].startswith("451 4.7.1") for m in dead), ledger.replies

    d.start()  # same port and socket (ClamdDaemon keeps them)
    await asyncio.sleep(0.15)  # > retry_after: the server is no longer marked down
    after = await send_batch(gw.port, ledger, 8, tag="after-")
    assert not wrongly_scanned(ledger, after), after

    ledger.check([x.data for x in sink.messages], sent=30)
    assert ledger.count("tempfailed") >= 6


async def test_clamd_hung_sigstop_timeouts_fire(avgate: Any, sink: Sink, own_clamd: Any) -> None:
    d = own_clamd()
    gw = await avgate(listener={"next_hop": sink.address}, engines=clamd_engine([d.tcp]),
                      scan={"cache": False})
    ledger = Ledger()
    assert not wrongly_scanned(ledger, await send_batch(gw.port, ledger, 4, tag="up-"))

    d.pause()
    try:
        t0 = time.monotonic()
        hung = await send_batch(gw.port, ledger, 6, concurrency=6, tag="hung-", timeout=15)
        elapsed = time.monotonic() - t0
    finally:
        d.resume()
    assert set(hung.values()) == {"tempfailed"}, {m: ledger.replies[m] for m in hung}
    assert all(ledger.replies[m].startswith("451 4.7.1") for m in hung)
    # scan_timeout 0.5 s (+ connect 0.5 s bound): the client waited seconds, not minutes
    assert elapsed < 5, elapsed

    await asyncio.sleep(0.15)
    again = await send_batch(gw.port, ledger, 4, tag="resumed-")
    assert not wrongly_scanned(ledger, again), again
    ledger.check([x.data for x in sink.messages], sent=14)


@pytest.mark.parametrize("strategy,fault", [("failover", "kill"), ("round_robin", "pause")])
async def test_one_of_two_clamd_down_no_tempfails(avgate: Any, sink: Sink, own_clamd: Any,
                                                  strategy: str, fault: str) -> None:
    d1, d2 = own_clamd(), own_clamd()
    gw = await avgate(listener={"next_hop": sink.address},
                      engines=clamd_engine([d1.tcp, d2.tcp], strategy=strategy),
                      scan={"cache": False})
    ledger = Ledger()
    assert not wrongly_scanned(ledger, await send_batch(gw.port, ledger, 4, tag="both-"))
    (d1.kill if fault == "kill" else d1.pause)()
    try:
        one = await send_batch(gw.port, ledger, 12, tag="one-")
    finally:
        d1.resume()
    assert not wrongly_scanned(ledger, one), one
    assert ledger.count("tempfailed") == 0
    ledger.check([x.data for x in sink.messages], sent=16)


async def test_both_clamd_down_tempfail_never_pass(avgate: Any, sink: Sink,
                                                   own_clamd: Any) -> None:
    """Unlike amavisd-new (D_PASS) and c-icap (204): every engine down → 451 for every
    message, clean ones included; nothing reaches the next hop unscanned."""
    d1, d2 = own_clamd(), own_clamd()
    gw = await avgate(listener={"next_hop": sink.address},
                      engines=clamd_engine([d1.tcp, d2.unix]), scan={"cache": False})
    d1.kill()
    d2.kill()
    ledger = Ledger()
    batch = await send_batch(gw.port, ledger, 8, tag="none-")
    assert set(batch.values()) == {"tempfailed"}, ledger.replies
    ledger.check([x.data for x in sink.messages], sent=8)
    assert sink.messages == []
