"""Fault injection: the next hop down, slow, refusing; the scanner down; clients going away;
size and line limits; STARTTLS. Nothing is ever acknowledged that was not delivered,
rejected or quarantined."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from tests.integration.smtp.conftest import (
    EICAR,
    RawClient,
    Sink,
    StartAvgate,
    closed_port,
    make_message,
    swaks,
    swaks_reply,
)


async def _send(port: int, msg: bytes) -> str:
    c = await RawClient.connect(port)
    try:
        assert (await c.cmd("EHLO client.test")).startswith("250")
        r = await c.cmd("MAIL FROM:<a@example.test>")
        if not r.startswith("250"):
            return r
        r = await c.cmd("RCPT TO:<b@example.test>")
        if not r.startswith("250"):
            return r
        assert (await c.cmd("DATA")).startswith("354")
        return await c.cmd(msg + b".\r\n")
    finally:
        await c.close()


async def test_next_hop_down_tempfails_at_mail(avgate: StartAvgate) -> None:
    gw = await avgate(listener={"next_hop": f"127.0.0.1:{closed_port()}"})
    reply = await _send(gw.port, make_message())
    assert reply.startswith("451 4.4.1"), reply


async def test_next_hop_slow_tempfails_and_nothing_acknowledged(
        avgate: StartAvgate, sink: Sink) -> None:
    sink.data_delay = 3.0
    gw = await avgate(listener={"next_hop": sink.address, "relay_timeout": 0.5})
    reply = await _send(gw.port, make_message())
    assert reply.startswith("451 4.4.2"), reply


async def test_next_hop_permanent_refusal_is_passed_on(avgate: StartAvgate, sink: Sink) -> None:
    sink.data_reply = "554 5.7.1 policy says no"
    gw = await avgate(listener={"next_hop": sink.address})
    assert await _send(gw.port, make_message()) == "554 5.7.1 policy says no"


async def test_next_hop_temporary_refusal_is_451(avgate: StartAvgate, sink: Sink) -> None:
    sink.data_reply = "452 4.3.1 Insufficient system storage"
    gw = await avgate(listener={"next_hop": sink.address})
    assert await _send(gw.port, make_message()) == "451 4.3.1 Insufficient system storage"


@pytest.fixture
def dead_clamd() -> list[dict[str, object]]:
    return [{"type": "clamd", "servers": [f"tcp://127.0.0.1:{closed_port()}"],
             "connect_timeout": 0.5, "scan_timeout": 2}]


async def test_scanner_down_tempfails_by_default(avgate: StartAvgate, sink: Sink,
                                                 dead_clamd: list[dict[str, object]]) -> None:
    gw = await avgate(listener={"next_hop": sink.address}, engines=dead_clamd)
    reply = await _send(gw.port, make_message(attachment=EICAR))
    assert reply.startswith("451 4.7.1 Virus scanner unavailable"), reply
    assert sink.messages == []


async def test_scanner_down_failure_action_keep_delivers_tagged(
        avgate: StartAvgate, sink: Sink, dead_clamd: list[dict[str, object]]) -> None:
    gw = await avgate(listener={"next_hop": sink.address}, engines=dead_clamd,
                      policy={"failure_action": "keep"})
    assert (await _send(gw.port, make_message())).startswith("250")
    [m] = sink.messages
    assert b"X-Virus-Status: Error\r\n" in m.data


async def test_client_disconnect_mid_data_relays_nothing(avgate: StartAvgate,
                                                         sink: Sink) -> None:
    gw = await avgate(listener={"next_hop": sink.address})
    c = await RawClient.connect(gw.port)
    await c.envelope()
    assert (await c.cmd("DATA")).startswith("354")
    await c.send(make_message()[:60])
    await c.close()
    await asyncio.sleep(0.3)
    assert sink.messages == []
    # and the listener keeps working
    assert (await _send(gw.port, make_message())).startswith("250")
    assert len(sink.messages) == 1


async def test_oversize_552_after_reading_to_the_end(avgate: StartAvgate, sink: Sink) -> None:
    gw = await avgate(listener={"next_hop": sink.address, "max_message_size": 2000})
    c = await RawClient.connect(gw.port)
    ehlo = await c.cmd("EHLO client.test")
    assert "SIZE 2000" in ehlo
    assert (await c.cmd("MAIL FROM:<a@example.test> SIZE=5000")).startswith("552")
    assert (await c.cmd("MAIL FROM:<a@example.test>")).startswith("250")
    assert (await c.cmd("RCPT TO:<b@example.test>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    big = make_message(body=b"x" * 70 + b"\r\n") + b"y" * 70 * 100 + b"\r\n"
    reply = await c.cmd(big.replace(b"y" * 70, b"y" * 68 + b"\r\n") + b".\r\n")
    assert reply.startswith("552 5.3.4"), reply
    # the session is still in sync: a normal message goes through afterwards
    assert (await c.cmd("MAIL FROM:<a@example.test>")).startswith("250")
    assert (await c.cmd("RCPT TO:<b@example.test>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    assert (await c.cmd(make_message() + b".\r\n")).startswith("250")
    await c.close()
    assert len(sink.messages) == 1


async def test_line_too_long(avgate: StartAvgate, sink: Sink) -> None:
    gw = await avgate(listener={"next_hop": sink.address, "max_line_length": 100})
    reply = await _send(gw.port, make_message(body=b"z" * 5000 + b"\r\n"))
    assert reply.startswith("500 5.5.2"), reply
    assert sink.messages == []


async def test_starttls(avgate: StartAvgate, sink: Sink, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
               "-subj", "/CN=avgate.test", "-keyout", str(key), "-out", str(cert)]
    await asyncio.to_thread(subprocess.run, openssl, check=True, capture_output=True,
                            timeout=60)
    gw = await avgate(listener={"next_hop": sink.address, "tls_cert": "cert.pem",
                                "tls_key": "key.pem"})
    rc, out = await swaks(gw.port, "--tls", "--to", "bob@example.test",
                          "--from", "a@example.test")
    assert rc == 0, out
    assert "STARTTLS" in out and "250 2.0.0 Ok: queued as SINK1" in swaks_reply(out), out
    assert len(sink.messages) == 1
