"""SMTP smuggling regression tests: one test per attack, on the wire through avgate.

Each attack hides a second message ("MAIL FROM:<evil@...>" ...) behind an end-of-data
look-alike. avgate must never end DATA early (no second transaction appears at the next
hop), and what it relays must contain exactly one end-of-data marker, at the end.
"""

from __future__ import annotations

import pytest

from tests.integration.smtp.conftest import RawClient, RawSink, StartAvgate, make_message

SMUGGLED = (b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
            b"From: ceo@example.test\r\nSubject: smuggled\r\n\r\npay now\r\n")

ATTACKS = {
    "lf_dot_lf": b"\n.\n",
    "lf_dot_crlf": b"\n.\r\n",
    "crlf_dot_lf": b"\r\n.\n",
    "cr_dot_cr": b"\r.\r",
    "cr_dot_crlf": b"\r.\r\n",
}
LENIENT_MARKERS = (b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r\n")


async def _attack(port: int, marker: bytes) -> str:
    c = await RawClient.connect(port)
    await c.envelope()
    assert (await c.cmd("DATA")).startswith("354")
    body = make_message("innocent").rstrip(b"\r\n") + marker + SMUGGLED
    await c.send(body + b".\r\n")
    reply = await c.reply()
    await c.cmd("QUIT")
    await c.close()
    return reply


def _data_section(wire: bytes) -> bytes:
    start = wire.index(b"DATA\r\n") + 6
    return wire[start:]


@pytest.mark.parametrize("name", sorted(ATTACKS))
async def test_attack_rejected_by_default(avgate: StartAvgate, raw_sink: RawSink,
                                          name: str) -> None:
    gw = await avgate(listener={"next_hop": raw_sink.address})
    reply = await _attack(gw.port, ATTACKS[name])
    assert reply.startswith("550 5.6.11 bare"), reply
    # nothing reached the next hop: no DATA at all, and no smuggled transaction
    assert all(b"DATA\r\n" not in w for w in raw_sink.wire)
    assert all(b"evil@attacker.test" not in w for w in raw_sink.wire)


@pytest.mark.parametrize("name", sorted(ATTACKS))
async def test_attack_normalized_is_one_message(avgate: StartAvgate, raw_sink: RawSink,
                                                name: str) -> None:
    gw = await avgate(listener={"next_hop": raw_sink.address, "bare_lf": "normalize"})
    reply = await _attack(gw.port, ATTACKS[name])
    assert reply.startswith("250"), reply
    [wire] = [w for w in raw_sink.wire if w]
    # exactly one transaction reached the next hop: one envelope, one DATA, then nothing
    # (the connection waits in avgate's pool) or QUIT ...
    commands = wire[:wire.index(b"DATA\r\n")]
    assert commands.count(b"MAIL FROM:") == 1 and b"evil" not in commands
    data = _data_section(wire)
    if data.endswith(b"QUIT\r\n"):
        data = data[:-len(b"QUIT\r\n")]
    assert data.endswith(b"\r\n.\r\n")
    # ... and its data holds no early end-of-data marker for any lenient reader
    for marker in LENIENT_MARKERS:
        assert (b"\r\n" + data).find(marker) in (-1, len(data) + 2 - len(marker)), marker
    assert data.count(b"\r\n.\r\n") == 1
    # the smuggled commands travel as (dot-stuffed where needed) content of the one message
    assert b"MAIL FROM:<evil@attacker.test>" in data


async def test_real_crlf_dot_crlf_ends_data_and_pipelined_rest_is_commands(
        avgate: StartAvgate, raw_sink: RawSink) -> None:
    """The control: a real <CR><LF>.<CR><LF> ends DATA; what follows is a new command."""
    gw = await avgate(listener={"next_hop": raw_sink.address})
    c = await RawClient.connect(gw.port)
    await c.envelope()
    assert (await c.cmd("DATA")).startswith("354")
    await c.send(make_message() + b".\r\nNOOP\r\n")
    assert (await c.reply()).startswith("250 2.0.0 Ok raw")
    assert (await c.reply()).startswith("250")  # the NOOP
    await c.close()
