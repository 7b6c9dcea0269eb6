# ruff: noqa: F811 - pytest fixtures imported from the SMTP tests are parameters here
"""SMTP front-end: what a client says about itself is not trusted, and no client makes one
session hold unbounded memory (issue 11, section 5).

Found before the fix:

* ``XFORWARD ADDR=10.1.2.3`` from any client was believed: with ``direction = "auto"`` and
  ``internal_networks = ["10.0.0.0/8"]`` an inbound EICAR mail counted as outbound and was
  delivered, and the forged attributes were passed on to the next hop (Postfix logs them).
* A verdict-only listener (``next_hop = "discard"``) accepted every RCPT of a transaction:
  400,000 RCPTs were all answered 250 and kept (+33 MiB with short addresses, +215 MiB with
  long ones); NOOP/RSET/HELO loops and error loops kept a session going for ever; every EHLO
  raised aiosmtpd's MAIL command-length limit by 36 bytes for every connection.

Now XFORWARD/XCLIENT are advertised to and accepted from ``xforward_hosts`` /
``xclient_hosts`` only (default loopback: 127.0.0.1 and ::1), others get Postfix's
``550 5.7.0 Error: insufficient authorization``; ``max_recipients`` (1000, Postfix's
smtpd_recipient_limit) answers ``452 4.5.3``; ``max_junk_commands`` (100) and ``max_errors``
(20) end the session with a 421. The untrusted client connects from 127.0.0.2: loopback on
Linux, but not in the default allow-list.
"""

from __future__ import annotations

import asyncio

import pytest

from avgate.config import from_dict
from avgate.errors import ConfigError
from avgate.frontends.smtp import SmtpListenerSettings
from avgate.frontends.smtpd import trusted
from tests.integration.smtp.conftest import (  # noqa: F401 - fixtures
    EICAR,
    RawClient,
    Sink,
    StartAvgate,
    avgate,
    make_message,
    sink,
)

pytestmark = pytest.mark.timeout(90)

OUTBOUND_PASSES = {"internal_networks": ["10.0.0.0/8"],
                   "rules": [{"direction": "outbound", "action": ["accept", "tag"]}]}
FORGED = "XFORWARD NAME=relay.example.org ADDR=10.1.2.3 PORT=25 HELO=relay.example.org"


async def connect_from(port: int, source: str) -> RawClient:
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    c = RawClient(r, w)
    await c.reply()
    return c


async def send_message(c: RawClient, message: bytes) -> str:
    assert (await c.cmd("MAIL FROM:<alice@example.test>")).startswith("250")
    assert (await c.cmd("RCPT TO:<bob@example.test>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    return await c.cmd(message + b".\r\n")


# -- XFORWARD / XCLIENT ---------------------------------------------------------------------
async def test_forged_xforward_from_an_untrusted_client_is_refused_and_not_used(
        avgate: StartAvgate, sink: Sink) -> None:
    gw = await avgate(listener={"next_hop": sink.address, "direction": "auto"},
                      policy=OUTBOUND_PASSES)
    c = await connect_from(gw.port, "127.0.0.2")
    try:
        ehlo = await c.cmd("EHLO client.test")
        assert "XFORWARD" not in ehlo and "XCLIENT" not in ehlo
        assert await c.cmd(FORGED) == "550 5.7.0 Error: insufficient authorization"
        # still inbound (the real client is not internal): EICAR is refused
        reply = await send_message(c, make_message("forged", attachment=EICAR))
        assert reply.startswith("550 5.7.1"), reply
        # a clean mail goes through with the real client, not the forged one
        assert (await send_message(c, make_message("clean"))).startswith("250")
    finally:
        await c.close()
    [delivered] = sink.messages
    assert delivered.xforward["ADDR"] == "127.0.0.2"
    assert "relay.example.org" not in delivered.xforward.values()


async def test_forged_xclient_from_an_untrusted_client_is_refused(
        avgate: StartAvgate, sink: Sink) -> None:
    gw = await avgate(listener={"next_hop": sink.address, "direction": "auto"},
                      policy=OUTBOUND_PASSES)
    c = await connect_from(gw.port, "127.0.0.2")
    try:
        await c.cmd("EHLO client.test")
        assert await c.cmd("XCLIENT ADDR=10.1.2.3 LOGIN=boss") == (
            "550 5.7.0 Error: insufficient authorization")
        reply = await send_message(c, make_message("xclient", attachment=EICAR))
        assert reply.startswith("550 5.7.1"), reply
    finally:
        await c.close()
    assert sink.messages == []


async def test_trusted_upstream_may_still_forward_the_client(
        avgate: StartAvgate, sink: Sink) -> None:
    """From the allow-list (default loopback 127.0.0.1) XFORWARD is advertised and used."""
    gw = await avgate(listener={"next_hop": sink.address, "direction": "auto"},
                      policy=OUTBOUND_PASSES)
    c = await connect_from(gw.port, "127.0.0.1")
    try:
        ehlo = await c.cmd("EHLO postfix.test")
        assert "XFORWARD" in ehlo and "XCLIENT" in ehlo
        assert (await c.cmd(FORGED)).startswith("250")
        # ADDR 10.1.2.3 is internal: outbound, which this policy lets pass tagged
        assert (await send_message(c, make_message("fwd", attachment=EICAR))).startswith("250")
    finally:
        await c.close()
    [delivered] = sink.messages
    assert delivered.xforward["ADDR"] == "10.1.2.3"


async def test_trusted_xclient_replaces_the_client_for_the_session(
        avgate: StartAvgate, sink: Sink) -> None:
    gw = await avgate(listener={"next_hop": sink.address, "direction": "auto"},
                      policy=OUTBOUND_PASSES)
    c = await connect_from(gw.port, "127.0.0.1")
    try:
        await c.cmd("EHLO postfix.test")
        # XCLIENT answers with a new greeting; the session starts over (EHLO again)
        assert (await c.cmd("XCLIENT NAME=mx.example.org ADDR=10.9.8.7 HELO=mx.example.org"
                            )).startswith("220 ")
        assert (await c.cmd("MAIL FROM:<a@example.test>")).startswith("503")
        assert (await c.cmd("EHLO mx.example.org")).startswith("250")
        assert (await send_message(c, make_message("xc", attachment=EICAR))).startswith("250")
    finally:
        await c.close()
    [delivered] = sink.messages
    assert delivered.xforward["ADDR"] == "10.9.8.7"
    assert delivered.xforward["NAME"] == "mx.example.org"


async def test_allow_lists_take_networks(avgate: StartAvgate, sink: Sink) -> None:
    gw = await avgate(listener={"next_hop": sink.address, "xforward_hosts": ["127.0.0.0/30"],
                                "xclient_hosts": []})
    c = await connect_from(gw.port, "127.0.0.2")
    try:
        ehlo = await c.cmd("EHLO client.test")
        assert "XFORWARD" in ehlo and "XCLIENT" not in ehlo
        assert (await c.cmd("XFORWARD ADDR=192.0.2.9")).startswith("250")
        assert (await c.cmd("XCLIENT ADDR=192.0.2.9")).startswith("550 5.7.0")
    finally:
        await c.close()


def test_allow_list_entries_are_checked() -> None:
    with pytest.raises(ConfigError, match="xforward_hosts"):
        from_dict({"smtp": {"listeners": [{"xforward_hosts": ["not-an-address"]}]}})
    with pytest.raises(ConfigError):
        from_dict({"smtp": {"listeners": [{"xclient_hosts": [1]}]}})
    s = SmtpListenerSettings()
    assert trusted("127.0.0.1", s.xforward_hosts) and trusted("::1", s.xclient_hosts)
    assert trusted("::ffff:127.0.0.1", s.xforward_hosts)
    assert not trusted("127.0.0.2", s.xforward_hosts) and not trusted("", s.xforward_hosts)


# -- per-session resources ------------------------------------------------------------------
async def test_recipients_per_transaction_are_limited(avgate: StartAvgate) -> None:
    gw = await avgate(listener={"next_hop": "discard", "max_recipients": 50})
    c = await RawClient.connect(gw.port)
    try:
        await c.cmd("EHLO client.test")
        await c.cmd("MAIL FROM:<a@example.test>")
        # pipelined, as a client that does not wait would: every RCPT gets its reply
        await c.send(b"".join(b"RCPT TO:<u%d@example.test>\r\n" % i for i in range(60)))
        replies = [await c.reply() for _ in range(60)]
        assert all(r.startswith("250") for r in replies[:50])
        assert all(r == "452 4.5.3 Error: too many recipients" for r in replies[50:]), replies[50]
        # the transaction goes on with the recipients accepted so far
        assert (await c.cmd("DATA")).startswith("354")
        assert (await c.cmd(make_message() + b".\r\n")) == "250 2.0.0 Ok: clean"
        # a new transaction starts from zero
        await c.cmd("MAIL FROM:<a@example.test>")
        assert (await c.cmd("RCPT TO:<again@example.test>")).startswith("250")
    finally:
        await c.close()


async def test_default_recipient_limit_on_a_verdict_only_listener(avgate: StartAvgate) -> None:
    """The reproduction: a verdict-only listener with the defaults, 1,200 RCPTs."""
    gw = await avgate(listener={"next_hop": "discard"})
    c = await RawClient.connect(gw.port)
    try:
        await c.cmd("EHLO client.test")
        await c.cmd("MAIL FROM:<a@example.test>")
        await c.send(b"".join(b"RCPT TO:<u%d@example.test>\r\n" % i for i in range(1200)))
        replies = [await c.reply() for _ in range(1200)]
    finally:
        await c.close()
    assert sum(r.startswith("250") for r in replies) == 1000
    assert replies[1000].startswith("452 4.5.3")


async def test_overshooting_recipients_end_the_session(avgate: StartAvgate) -> None:
    """Past the limit RCPTs cost nothing but a reply; past twice the limit they are errors."""
    gw = await avgate(listener={"next_hop": "discard", "max_recipients": 5, "max_errors": 3})
    c = await RawClient.connect(gw.port)
    try:
        await c.cmd("EHLO client.test")
        await c.cmd("MAIL FROM:<a@example.test>")
        await c.send(b"".join(b"RCPT TO:<u%d@example.test>\r\n" % i for i in range(40)))
        replies = []
        with pytest.raises(ConnectionError):
            while True:
                replies.append(await c.reply())
    finally:
        await c.close()
    assert replies[-1].startswith("421 4.7.0"), replies[-1]
    assert len(replies) == 5 + 5 + 3 + 1  # accepted, overshoot, errors, then 421


@pytest.mark.parametrize("command", ["NOOP", "RSET", "HELO client.test", "EHLO client.test",
                                     "VRFY <bob@example.test>", "HELP"])
async def test_commands_without_a_message_are_limited(avgate: StartAvgate,
                                                      command: str) -> None:
    gw = await avgate(listener={"next_hop": "discard", "max_junk_commands": 10})
    c = await RawClient.connect(gw.port)
    try:
        await c.cmd("EHLO client.test")
        for _ in range(9):
            assert (await c.cmd(command))[:1] in ("2", "5"), command
        last = await c.cmd(command)
        assert last.startswith("421 4.7.0"), last
        with pytest.raises(ConnectionError):
            await c.cmd("NOOP")
    finally:
        await c.close()


async def test_a_message_resets_the_command_count(avgate: StartAvgate) -> None:
    gw = await avgate(listener={"next_hop": "discard", "max_junk_commands": 5})
    c = await RawClient.connect(gw.port)
    try:
        for _ in range(3):
            for _ in range(3):
                assert (await c.cmd("NOOP")).startswith("250")
            assert (await c.cmd("EHLO client.test")).startswith("250")
            await c.cmd("MAIL FROM:<a@example.test>")
            await c.cmd("RCPT TO:<b@example.test>")
            await c.cmd("DATA")
            assert (await c.cmd(make_message() + b".\r\n")).startswith("250")
    finally:
        await c.close()


async def test_errors_end_the_session(avgate: StartAvgate) -> None:
    gw = await avgate(listener={"next_hop": "discard"})  # max_errors = 20
    c = await RawClient.connect(gw.port)
    try:
        await c.cmd("EHLO client.test")
        for _ in range(20):
            assert (await c.cmd("RCPT TO:<b@example.test>")).startswith("503")
        assert (await c.cmd("RCPT TO:<b@example.test>")).startswith("421 4.7.0")
        with pytest.raises(ConnectionError):
            await c.cmd("NOOP")
    finally:
        await c.close()


async def test_ehlo_does_not_grow_the_mail_command_limit(avgate: StartAvgate) -> None:
    gw = await avgate(listener={"next_hop": "discard"})
    c = await RawClient.connect(gw.port)
    try:
        for _ in range(60):
            await c.cmd("EHLO client.test")
        # 512 + SIZE (26) + SMTPUTF8 (10) is the most a MAIL command may be
        long_mail = "MAIL FROM:<" + "a" * 600 + "@example.test>"
        assert (await c.cmd(long_mail)).startswith("500")
        other = await RawClient.connect(gw.port)
        try:
            await other.cmd("EHLO other.test")
            assert (await other.cmd(long_mail)).startswith("500")
        finally:
            await other.close()
    finally:
        await c.close()
