"""Disk full: a 2 MiB tmpfs as ``[scan] spool_dir`` or as ``[quarantine] path``. A message
that cannot be spooled or quarantined is tempfailed (451), never accepted and lost; once
space is back, mail flows again. Skipped (with the reason) where mounting is not allowed."""

from __future__ import annotations

import contextlib
import gc
import os
from typing import Any

import pytest

from avgate.errors import SpoolError
from avgate.quarantine import QuarantineStore
from avgate.spool import Spool
from tests.reliability.conftest import (
    Ledger,
    Sink,
    fill,
    send_batch,
    smtp_send,
    unique_message,
    wrongly_scanned,
)


async def test_spool_dir_full_tempfails_then_recovers(avgate: Any, sink: Sink, embedded: Any,
                                                      tmpfs: Any) -> None:
    spool = tmpfs("spool")
    gw = await avgate(listener={"next_hop": sink.address}, engines=embedded,
                      scan={"spool_dir": str(spool), "spool_memory": "4 KiB", "cache": False})
    ledger = Ledger()
    filler = fill(spool)
    # 20 KB each: over spool_memory, so each must go to the (full) disk
    full = await send_batch(gw.port, ledger, 8, tag="full-", kinds=("clean", "eicar"),
                            size=20_000)
    assert set(full.values()) == {"tempfailed"}, ledger.replies
    assert all(ledger.replies[m].startswith("451 4.3.0") for m in full), ledger.replies

    filler.unlink()
    ok = await send_batch(gw.port, ledger, 8, tag="free-", size=20_000)
    assert not wrongly_scanned(ledger, ok), ok
    assert not [p for p in os.listdir(spool) if p.startswith("avgate-spool-")]

    # bigger than the whole filesystem: the spool write fails in the middle of DATA
    mid, big = unique_message("clean", size=3 * 1024 * 1024, tag="huge-")
    ledger.record(mid, "clean", await smtp_send(gw.port, big))
    assert ledger.replies[mid].startswith("451 4.3.0"), ledger.replies[mid]
    ledger.check([x.data for x in sink.messages], sent=17)


def test_spool_close_after_disk_full_never_raises_and_removes_the_file(tmpfs: Any) -> None:
    spool_dir = tmpfs("spool")
    s = Spool(memory_limit=1024, directory=str(spool_dir))
    with pytest.raises(SpoolError):
        for _ in range(100):
            s.write(b"x" * 50_000)  # 5 MB into 2 MiB
    try:
        s.close()  # must not raise: it runs in front-ends' finally blocks
    finally:
        leftover = os.listdir(spool_dir)
        with contextlib.suppress(OSError):
            s.close()
        del s
        gc.collect()
    assert leftover == []


async def _big_batch(port: int, ledger: Ledger, n: int, tag: str) -> dict[str, str]:
    out = {}
    for i in range(n):
        kind = ("clean", "eicar")[i % 2]
        mid, msg = unique_message(kind, size=20_000, tag=f"{tag}{kind}")
        out[mid] = ledger.record(mid, kind, await smtp_send(port, msg))
    return out


async def test_spool_dir_full_with_large_messages(avgate: Any, sink: Sink, embedded: Any,
                                                  tmpfs: Any) -> None:
    spool = tmpfs("spool")
    gw = await avgate(listener={"next_hop": sink.address}, engines=embedded,
                      scan={"spool_dir": str(spool), "spool_memory": "4 KiB", "cache": False})
    ledger = Ledger()
    filler = fill(spool)
    full = await _big_batch(gw.port, ledger, 6, "full-")
    assert set(full.values()) == {"tempfailed"}, ledger.replies
    filler.unlink()
    ok = await _big_batch(gw.port, ledger, 6, "free-")
    assert not wrongly_scanned(ledger, ok), ok
    ledger.check([x.data for x in sink.messages], sent=12)


async def test_quarantine_full_tempfails_infected_never_discards(
        avgate: Any, sink: Sink, embedded: Any, tmpfs: Any) -> None:
    qdir = tmpfs("quarantine")
    gw = await avgate(listener={"next_hop": sink.address}, engines=embedded,
                      policy={"virus_action": "quarantine"},
                      quarantine={"path": str(qdir / "q")}, scan={"cache": False})
    ledger = Ledger()
    first = await send_batch(gw.port, ledger, 4, tag="room-", kinds=("clean", "eicar"))
    assert sorted(first.values()) == ["delivered", "delivered", "quarantined", "quarantined"]

    filler = fill(qdir)
    full = await _big_batch(gw.port, ledger, 6, "qfull-")
    for m, outcome in full.items():
        if ledger.kinds[m] == "clean":
            assert outcome == "delivered"  # no quarantine needed: unaffected
        else:
            assert ledger.replies[m].startswith("451 4.3.0"), ledger.replies[m]

    filler.unlink()
    again = await send_batch(gw.port, ledger, 4, tag="again-", kinds=("clean", "eicar"))
    assert sorted(again.values()) == ["delivered", "delivered", "quarantined", "quarantined"]

    ledger.check([x.data for x in sink.messages], sent=14)
    store = QuarantineStore(qdir / "q")
    try:  # every "250 discarded (quarantined as ...)" has its record; nothing else was kept
        assert len(store.list()) == ledger.count("quarantined") == 4
    finally:
        store.close()
