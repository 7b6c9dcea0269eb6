"""The SMTP filter end to end on loopback: swaks/raw clients → avgate → recording sink."""

from __future__ import annotations

import asyncio

from tests.integration.smtp.conftest import (
    EICAR,
    RawClient,
    Sink,
    StartAvgate,
    make_message,
    swaks,
    swaks_reply,
)


async def test_clean_mail_is_relayed_with_headers_and_original_envelope(
        avgate: StartAvgate, sink: Sink) -> None:
    gw = await avgate(listener={"next_hop": sink.address})
    msg = make_message("clean one")
    c = await RawClient.connect(gw.port)
    await c.envelope("alice@example.test", ("bob@example.test", "carol@example.test"))
    assert (await c.cmd("DATA")).startswith("354")
    reply = await c.cmd(msg + b".\r\n")
    assert reply.startswith("250 2.0.0 Ok: queued as SINK1"), reply
    await c.cmd("QUIT")
    await c.close()
    [m] = sink.messages
    assert m.sender == "alice@example.test"
    assert m.recipients == ["bob@example.test", "carol@example.test"]
    head, _, rest = m.data.partition(b"From: Alice")
    # the original message byte for byte, behind the added verdict headers
    assert b"From: Alice" + rest == msg
    assert b"X-Virus-Status: Clean\r\n" in head and b"X-Virus-Scanned: avgate" in head


async def test_eicar_rejected_with_policy_reply_and_nothing_relayed(
        avgate: StartAvgate, sink: Sink, tmp_path) -> None:
    gw = await avgate(listener={"next_hop": sink.address})
    f = tmp_path / "eicar.com"
    f.write_bytes(EICAR)
    rc, out = await swaks(gw.port, "--to", "bob@example.test", "--from", "a@example.test",
                          "--attach", str(f))
    assert "550 5.7.1 Virus found: Eicar-Test-Signature" in swaks_reply(out), out
    assert rc != 0
    assert sink.messages == []


async def test_per_recipient_refusals_come_from_the_next_hop(
        avgate: StartAvgate, sink: Sink) -> None:
    sink.refuse.add("nobody@example.test")
    sink.defer.add("later@example.test")
    gw = await avgate(listener={"next_hop": sink.address})
    c = await RawClient.connect(gw.port)
    assert (await c.cmd("EHLO client.test")).startswith("250")
    assert (await c.cmd("MAIL FROM:<a@example.test>")).startswith("250")
    assert (await c.cmd("RCPT TO:<bob@example.test>")).startswith("250")
    assert (await c.cmd("RCPT TO:<nobody@example.test>")).startswith("550 5.1.1")
    assert (await c.cmd("RCPT TO:<later@example.test>")).startswith("450 4.2.1")
    assert (await c.cmd("DATA")).startswith("354")
    assert (await c.cmd(make_message() + b".\r\n")).startswith("250")
    await c.close()
    [m] = sink.messages
    assert m.recipients == ["bob@example.test"]


async def test_two_transactions_on_one_connection_and_rset(
        avgate: StartAvgate, sink: Sink) -> None:
    gw = await avgate(listener={"next_hop": sink.address})
    c = await RawClient.connect(gw.port)
    await c.envelope(rcpts=("x@example.test",))
    assert (await c.cmd("RSET")).startswith("250")
    for i in range(2):
        assert (await c.cmd(f"MAIL FROM:<s{i}@example.test>")).startswith("250")
        assert (await c.cmd(f"RCPT TO:<r{i}@example.test>")).startswith("250")
        assert (await c.cmd("DATA")).startswith("354")
        assert (await c.cmd(make_message(f"m{i}") + b".\r\n")).startswith("250")
    await c.close()
    assert [(m.sender, m.recipients) for m in sink.messages] == [
        ("s0@example.test", ["r0@example.test"]), ("s1@example.test", ["r1@example.test"])]
    assert sink.connections == 1  # one next-hop session reused


async def test_null_sender_and_dot_stuffing_preserved(avgate: StartAvgate, sink: Sink) -> None:
    gw = await avgate(listener={"next_hop": sink.address})
    body = b".leading dot\r\n..two dots\r\n.\r\nx\r\n"
    msg = make_message("dots", body=body)
    wire = msg.replace(b"\r\n.", b"\r\n..")
    c = await RawClient.connect(gw.port)
    assert (await c.cmd("EHLO client.test")).startswith("250")
    assert (await c.cmd("MAIL FROM:<>")).startswith("250")
    assert (await c.cmd("RCPT TO:<bob@example.test>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    assert (await c.cmd(wire + b".\r\n")).startswith("250")
    await c.close()
    [m] = sink.messages
    assert m.sender in ("", "<>")
    assert m.data.endswith(body)


async def test_xforward_passes_the_real_client_to_the_next_hop(
        avgate: StartAvgate, sink: Sink) -> None:
    gw = await avgate(listener={"next_hop": sink.address})
    c = await RawClient.connect(gw.port)
    ehlo = await c.cmd("EHLO client.test")
    assert "XFORWARD" in ehlo
    assert (await c.cmd("XFORWARD NAME=mx.example.org ADDR=192.0.2.7 HELO=mx.example.org"
                        )).startswith("250")
    assert (await c.cmd("MAIL FROM:<a@example.test>")).startswith("250")
    assert (await c.cmd("RCPT TO:<b@example.test>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    assert (await c.cmd(make_message() + b".\r\n")).startswith("250")
    # without XFORWARD from upstream, avgate's own view of the client is passed on
    assert (await c.cmd("MAIL FROM:<a@example.test>")).startswith("250")
    assert (await c.cmd("RCPT TO:<b@example.test>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    assert (await c.cmd(make_message() + b".\r\n")).startswith("250")
    await c.close()
    first, second = sink.messages
    assert first.xforward["ADDR"] == "192.0.2.7" and first.xforward["NAME"] == "mx.example.org"
    assert second.xforward["ADDR"] == "127.0.0.1" and second.xforward["HELO"] == "client.test"


async def test_verdict_only_listener(avgate: StartAvgate) -> None:
    gw = await avgate(listener={"next_hop": "discard", "name": "verdict"},
                      policy={"rules": [{"status": "infected", "listener": "verdict",
                                         "action": "reject",
                                         "reply": "550 5.7.1 FilterVerdictPositive"}]})
    for payload, want in ((b"just a calendar attachment\r\n", "250 2.0.0 Ok: clean"),
                          (EICAR + b"\r\n", "550 5.7.1 FilterVerdictPositive")):
        c = await RawClient.connect(gw.port)
        await c.envelope()
        assert (await c.cmd("DATA")).startswith("354")
        assert (await c.cmd(make_message(attachment=payload) + b".\r\n")) == want
        await c.close()


async def test_discard_with_quarantine_answers_250_and_keeps_a_copy(
        avgate: StartAvgate, sink: Sink) -> None:
    gw = await avgate(listener={"next_hop": sink.address},
                      policy={"virus_action": "quarantine"})
    c = await RawClient.connect(gw.port)
    await c.envelope()
    assert (await c.cmd("DATA")).startswith("354")
    reply = await c.cmd(make_message(attachment=EICAR) + b".\r\n")
    await c.close()
    assert reply.startswith("250 2.0.0 Ok: discarded (quarantined as "), reply
    qid = reply.rsplit(" ", 1)[1].rstrip(")")
    assert sink.messages == []
    rec = gw.gateway.store.get(qid)
    assert "Eicar-Test-Signature" in str(rec.to_dict())


async def test_accept_tag_prefix_subject_and_copy_to(avgate: StartAvgate, sink: Sink) -> None:
    gw = await avgate(listener={"next_hop": sink.address},
                      policy={"rules": [{"status": "infected",
                                         "action": ["accept", "tag", "prefix_subject",
                                                    "copy_to"],
                                         "copy_to": "virusadmin@example.test"}]})
    c = await RawClient.connect(gw.port)
    await c.envelope()
    assert (await c.cmd("DATA")).startswith("354")
    assert (await c.cmd(make_message("invoice", attachment=EICAR) + b".\r\n")).startswith("250")
    await c.close()
    [m] = sink.messages
    assert m.recipients == ["bob@example.test", "virusadmin@example.test"]
    assert b"Subject: ***VIRUS*** invoice" in m.data
    assert b"X-Virus-Status: Infected (Eicar-Test-Signature)" in m.data


async def test_direction_rules_per_listener(avgate: StartAvgate, sink: Sink) -> None:
    """A submission listener (outbound) that does not scan-reject, next to an inbound one."""
    gw = await avgate(
        listeners=[{"name": "inbound", "next_hop": sink.address},
                   {"name": "submission", "next_hop": sink.address, "direction": "outbound"}],
        policy={"rules": [{"direction": "outbound", "action": ["accept", "tag"]}]})
    results = {}
    for name in ("inbound", "submission"):
        c = await RawClient.connect(gw.listener(name).port)
        await c.envelope()
        assert (await c.cmd("DATA")).startswith("354")
        results[name] = await c.cmd(make_message(attachment=EICAR) + b".\r\n")
        await c.close()
    assert results["inbound"].startswith("550 5.7.1")
    assert results["submission"].startswith("250")
    assert len(sink.messages) == 1


async def test_idle_timeout_closes_connection(avgate: StartAvgate, sink: Sink) -> None:
    gw = await avgate(listener={"next_hop": sink.address, "idle_timeout": 0.5})
    c = await RawClient.connect(gw.port)
    assert (await c.cmd("EHLO client.test")).startswith("250")
    data = await asyncio.wait_for(c.reader.read(), 5)
    assert data == b""  # closed by the server
    await c.close()


async def test_connection_limit(avgate: StartAvgate, sink: Sink) -> None:
    gw = await avgate(listener={"next_hop": sink.address, "max_connections": 2})
    a = await RawClient.connect(gw.port)
    b = await RawClient.connect(gw.port)
    r, w = await asyncio.open_connection("127.0.0.1", gw.port)
    line = await asyncio.wait_for(r.readline(), 5)
    assert line.startswith(b"421 4.7.0"), line
    w.close()
    await a.close()
    await b.close()
    await asyncio.sleep(0.1)
    c = await RawClient.connect(gw.port)  # a slot is free again
    assert (await c.cmd("NOOP")).startswith("250")
    await c.close()


async def test_ehlo_reply_is_one_write(avgate: StartAvgate) -> None:
    """The multi-line EHLO reply leaves in one write (aiosmtpd pushes each line on its own:
    a send() and a TCP segment per line)."""
    gw = await avgate(listener={"mode": "verdict"})
    r, w = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        assert (await asyncio.wait_for(r.readline(), 10)).startswith(b"220 ")
        [session] = gw.listeners[0].sessions
        transport = session.transport
        assert transport is not None
        writes: list[bytes] = []
        write = transport.write

        def counted(data: bytes) -> None:
            writes.append(bytes(data))
            write(data)

        transport.write = counted  # type: ignore[method-assign]
        w.write(b"EHLO client.test\r\n")
        reply = b""
        while not reply.endswith(b"250 HELP\r\n"):
            reply += await asyncio.wait_for(r.read(65536), 10)
        assert writes == [reply]
        lines = reply.decode().split("\r\n")
        assert lines[0] == "250-avgate.test" and lines[-2] == "250 HELP"
        assert any(line.startswith("250-XFORWARD ") for line in lines)
    finally:
        w.close()
