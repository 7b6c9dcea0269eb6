"""1,000 messages with a random mix through several concurrent clients: every message is
accounted for (delivered + rejected + tempfailed + quarantined = sent), no infected message
is delivered, and the sink holds exactly the messages that got a 250 "queued"."""

from __future__ import annotations

import asyncio
import os
import random
import re

from tests.integration.smtp.conftest import EICAR, RawClient, Sink, StartAvgate, make_message

N = int(os.environ.get("AVGATE_SMTP_VOLUME", "1000"))
CLIENTS = 8


async def test_thousand_messages_accounted_for(avgate: StartAvgate, sink: Sink) -> None:
    sink.defer.add("later@example.test")
    gw = await avgate(listener={"next_hop": sink.address},
                      policy={"rules": [{"status": "infected",
                                         "recipient": "quarantine@example.test",
                                         "action": "quarantine"}]})
    rng = random.Random(4)
    kinds = [rng.choice(["clean", "clean", "virus", "quarantine", "defer"]) for _ in range(N)]
    outcome: dict[int, str] = {}

    async def client(ids: list[int]) -> None:
        c = await RawClient.connect(gw.port)
        assert (await c.cmd("EHLO client.test")).startswith("250")
        for i in ids:
            kind = kinds[i]
            rcpt = {"quarantine": "quarantine@example.test",
                    "defer": "later@example.test"}.get(kind, "bob@example.test")
            assert (await c.cmd(f"MAIL FROM:<s{i}@example.test>")).startswith("250")
            r = await c.cmd(f"RCPT TO:<{rcpt}>")
            if r.startswith("450"):
                outcome[i] = "tempfailed"
                assert (await c.cmd("RSET")).startswith("250")
                continue
            assert (await c.cmd("DATA")).startswith("354")
            attach = EICAR if kind in ("virus", "quarantine") else os.urandom(64)
            r = await c.cmd(make_message(f"msg {i}", attachment=attach) + b".\r\n")
            if r.startswith("250 2.0.0 Ok: queued"):
                outcome[i] = "delivered"
            elif r.startswith("250 2.0.0 Ok: discarded (quarantined as"):
                outcome[i] = "quarantined"
            elif r.startswith("5"):
                outcome[i] = "rejected"
            elif r.startswith("4"):
                outcome[i] = "tempfailed"
            else:
                outcome[i] = "unexpected: " + r
        await c.cmd("QUIT")
        await c.close()

    ids = list(range(N))
    await asyncio.wait_for(asyncio.gather(*(client(ids[k::CLIENTS]) for k in range(CLIENTS))),
                           timeout=90)
    counts = {k: sum(1 for v in outcome.values() if v == k)
              for k in ("delivered", "rejected", "tempfailed", "quarantined")}
    assert sum(counts.values()) == N, (counts, [v for v in outcome.values()
                                                if v.startswith("unexpected")][:3])
    # each outcome is the one its kind calls for
    want = {"clean": "delivered", "virus": "rejected", "quarantine": "quarantined",
            "defer": "tempfailed"}
    wrong = [(i, kinds[i], outcome[i]) for i in range(N) if outcome[i] != want[kinds[i]]]
    assert not wrong, wrong[:5]
    # the sink got exactly the delivered ones, none infected
    delivered = sorted(int(re.search(rb"Subject: msg (\d+)", m.data).group(1))  # type: ignore
                       for m in sink.messages)
    assert delivered == sorted(i for i in range(N) if outcome[i] == "delivered")
    assert not any(b"EICAR" in m.data or b"WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNU"
                   in m.data for m in sink.messages)
    assert len(gw.gateway.store.list()) == counts["quarantined"]
