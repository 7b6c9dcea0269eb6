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
from tests.reliability.conftest import Ledger, Sink, scanned_correctly, send_batch


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

    async def stop_soon() -> float:
        await asyncio.sleep(0.8)
        served.proc.signal(signal.SIGTERM)
        return time.monotonic()

    load = asyncio.create_task(send_batch(port, ledger, 40, concurrency=8, size=20_000,
                                          tag="load-", timeout=15))
    stopped_at = await stop_soon()
    delivered_at_signal = len(sink.messages)
    batch = await load
    # the process drains and exits on its own (drain_timeout 5 s)
    deadline = time.monotonic() + 10
    while served.alive() and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded poll
        await asyncio.sleep(0.05)
    assert not served.alive(), served.proc.output()
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
    assert not scanned_correctly(ledger, after), after
    ledger.check([x.data for x in sink.messages], sent=48)
