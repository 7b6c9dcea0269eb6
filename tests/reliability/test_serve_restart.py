"""``avgate serve`` (a real subprocess) stopped with SIGTERM under SMTP load, then started
again on the same port. Messages in flight are either finished (the next hop has them, the
client got 250) or tempfailed (the client got 4xx or lost the connection before a final
reply, and keeps the message); none is half-delivered, none delivered without a 250."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

from tests.clamd_daemon import free_port
from tests.helpers import async_wait_until
from tests.reliability.conftest import Ledger, Sink, send_batch, wrongly_scanned


def _config(port: int, next_hop: str, sigs: str, root: str) -> str:
    return f"""
[scan]
cache = false
spool_memory = "4 KiB"
[[engines]]
type = "embedded"
signatures = ["{sigs}"]
[log]
path = "{root}/scan.log"
[quarantine]
path = "{root}/quarantine"
[serve]
drain_timeout = 5
[[smtp.listeners]]
listen = "127.0.0.1:{port}"
next_hop = "{next_hop}"
relay_timeout = 10
"""


async def test_sigterm_under_load_then_restart(serve: Any, sink: Sink, marker_sigs: str,
                                               tmp_path: Any) -> None:
    sink.data_delay = 0.5  # the next hop is slowish: there is always a relay in flight
    port = free_port()
    served = serve(_config(port, sink.address, marker_sigs, str(tmp_path)))
    assert served.ports["smtp"] == port
    ledger = Ledger()
    scan_log = tmp_path / "scan.log"

    def relays_in_flight() -> int:
        """Messages avgate scanned and accepted (the scan log is written before the relay)
        that the next hop has not answered yet: avgate is relaying them right now."""
        lines = scan_log.read_text().splitlines() if scan_log.exists() else []
        accepted = sum(1 for x in lines if '"event":"scan"' in x and '"status":"clean"' in x)
        return accepted - len(sink.messages)

    load = asyncio.create_task(send_batch(port, ledger, 40, concurrency=8, size=20_000,
                                          tag="load-", timeout=15))
    # SIGTERM while relays are in flight (and most of the batch is still to come)
    assert await async_wait_until(lambda: relays_in_flight() >= 2 or load.done()), (
        ledger.summary())
    assert not load.done(), ledger.summary()
    served.proc.signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    delivered_at_signal = len(sink.messages)
    batch = await load
    # the process drains and exits on its own (drain_timeout 5 s)
    assert await async_wait_until(lambda: not served.alive()), served.proc.output()
    assert served.proc.proc is not None and served.proc.proc.returncode == 0, served.proc.output()
    assert time.monotonic() - stopped_at < 8
    assert set(batch.values()) <= {"delivered", "rejected", "tempfailed"}, ledger.replies
    # messages being relayed at SIGTERM were finished, not cut off
    assert ledger.count("delivered") > delivered_at_signal, (delivered_at_signal,
                                                             ledger.summary())
    assert ledger.count("tempfailed") > 0, ledger.summary()  # refused after the signal
    ledger.check([x.data for x in sink.messages], sent=40)

    # restarted on the same port: mail flows again
    sink.data_delay = 0.0
    served2 = serve(_config(port, sink.address, marker_sigs, str(tmp_path)))
    assert served2.ports["smtp"] == port
    after = await send_batch(port, ledger, 8, tag="restarted-")
    assert not wrongly_scanned(ledger, after), after
    ledger.check([x.data for x in sink.messages], sent=48)
