"""avgate as a milter of a real, private Postfix (smtpd_milters), end to end.

One Postfix instance per module (loopback smtpd, relayhost = a recording aiosmtpd sink);
each test starts avgate's milter with its own policy on the port Postfix points at.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from avgate.quarantine import QuarantineStore
from tests.postfix_instance import PostfixInstance, free_port, require_postfix

from .conftest import EICAR, MilterFactory, make_message

pytestmark = [pytest.mark.postfix, pytest.mark.timeout(90)]


class Recorder:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                              bytes(envelope.original_content or envelope.content)))
        return "250 2.0.0 Ok: recorded"


class Env:
    def __init__(self, postfix: PostfixInstance, sink: Recorder, milter_port: int) -> None:
        self.postfix = postfix
        self.sink = sink
        self.milter_port = milter_port


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_postfix()
    recorder = Recorder()
    sink_port = free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=sink_port)
    controller.start()
    milter_port = free_port()
    pf = PostfixInstance(tmp_path_factory.mktemp("postfix"),
                         relayhost=f"127.0.0.1:{sink_port}", main_cf={
        "smtpd_milters": f"inet:127.0.0.1:{milter_port}",
        "milter_protocol": "6",
        "milter_default_action": "tempfail",
        "milter_connect_timeout": "5s",
        "milter_command_timeout": "10s",
        "milter_content_timeout": "30s",
        "smtpd_peername_lookup": "no",
        "smtp_tls_security_level": "none",
        "smtpd_tls_security_level": "none",
    })
    try:
        pf.start()
        yield Env(pf, recorder, milter_port)
    finally:
        pf.stop()
        controller.stop()


async def send(env: Env, msg: bytes) -> tuple[int, str]:
    """Send over SMTP; (code, text) of the first refusal or of the DATA reply."""
    code, text = await asyncio.to_thread(env.postfix.send, msg)
    return code, text.decode(errors="replace")


async def delivered(env: Env, marker: bytes, wait: float = 30) -> bytes:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        for _, _, data in env.sink.messages:
            if marker in data:
                return data
        await asyncio.sleep(0.2)
    raise AssertionError(f"{marker!r} not delivered; maillog:\n{env.postfix.log(400)[-3000:]}")


async def start_milter(factory: MilterFactory, env: Env, *,
                       milter: dict[str, Any] | None = None, **kw: Any) -> None:
    table = {"listen": f"127.0.0.1:{env.milter_port}", **(milter or {})}
    await factory(milter=table, **kw)


async def test_clean_mail_delivered_with_our_headers(env: Env, milter: MilterFactory) -> None:
    await start_milter(milter, env)
    code, text = await send(env, make_message("pf clean 1"))
    assert code == 250, text
    data = await delivered(env, b"pf clean 1")
    msg = message_from_bytes(data)
    assert msg["X-Virus-Status"] == "Clean"
    assert msg["X-Virus-Scanned"].startswith("avgate ")
    assert msg.get_all("X-Virus-Status") == ["Clean"]
    assert b"Hello there." in data


async def test_eicar_rejected_with_our_text(env: Env, milter: MilterFactory) -> None:
    await start_milter(milter, env)
    code, text = await send(env, make_message("pf virus", attachment=EICAR))
    assert code == 550
    assert "5.7.1 Virus found: Eicar-Test-Signature" in text
    await asyncio.sleep(0.5)
    assert not any(b"pf virus" in d for _, _, d in env.sink.messages)


async def test_replace_mode_delivers_without_the_infected_part(env: Env,
                                                               milter: MilterFactory) -> None:
    await start_milter(milter, env, policy={"rules": [
        {"name": "strip", "status": "infected", "action": ["replace", "tag"]}]})
    code, text = await send(env, make_message("pf replace", attachment=EICAR,
                                              name="eicar.com"))
    assert code == 250, text
    data = await delivered(env, b"pf replace")
    assert EICAR not in data
    msg = message_from_bytes(data)
    parts = list(msg.walk())
    texts = [p.get_payload(decode=True) or b"" for p in parts if not p.is_multipart()]
    assert any(t.startswith(b"Hello there.") for t in texts), data  # the clean part stays
    notice = b"".join(p.get_payload(decode=True) or b"" for p in parts
                      if not p.is_multipart())
    assert b"Eicar-Test-Signature" in notice and b"eicar.com" in notice
    assert msg["X-Virus-Status"].startswith("Infected")


async def test_quarantine_holds_in_postfix_and_our_store(env: Env, milter: MilterFactory,
                                                         tmp_path: Path) -> None:
    await start_milter(milter, env, milter={"quarantine": "both"},
                       policy={"virus_action": "quarantine"})
    code, text = await send(env, make_message("pf hold", attachment=EICAR))
    assert code == 250, text  # accepted by Postfix, but held
    deadline = time.monotonic() + 20
    held: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not held:
        held = [q for q in env.postfix.postqueue_json() if q.get("queue_name") == "hold"]
        await asyncio.sleep(0.2)
    assert len(held) == 1, env.postfix.log(400)[-2000:]
    assert held[0]["recipients"][0]["address"] == "bob@example.test"
    records = QuarantineStore(tmp_path / "quarantine").list()
    assert len(records) == 1
    assert records[0].viruses == ("Eicar-Test-Signature",)
    assert not any(b"pf hold" in d for _, _, d in env.sink.messages)


async def test_scanner_down_tempfails(env: Env, milter: MilterFactory) -> None:
    await start_milter(milter, env, engines=[{"type": "clamd", "name": "clamd",
                                              "servers": [f"tcp://127.0.0.1:{free_port()}"],
                                              "connect_timeout": 1}])
    code, text = await send(env, make_message("pf down"))
    assert code == 451
    assert "4.7.1" in text and "unavailable" in text


async def test_milter_not_running_tempfails(env: Env) -> None:
    """Postfix's own milter_default_action = tempfail when nothing listens."""
    code, _ = await send(env, make_message("pf nobody home"))
    assert code == 451


async def test_too_many_headers_refused_552_through_postfix(env: Env,
                                                            milter: MilterFactory) -> None:
    """Over [milter] max_headers: our 552 5.3.4 reaches the SMTP client as is (Postfix
    accepts the reply: enhanced code class = reply class) and nothing is delivered."""
    await start_milter(milter, env, milter={"max_headers": 50})
    msg = make_message("pf many headers")
    head, sep, body = msg.partition(b"\r\n\r\n")
    extra = b"".join(b"X-Filler-%d: %d\r\n" % (i, i) for i in range(60))
    code, text = await send(env, head + b"\r\n" + extra.rstrip(b"\r\n") + sep + body)
    assert code == 552, text
    assert "5.3.4" in text and "header" in text
    code, text = await send(env, make_message("pf few headers"))
    assert code == 250, text
    await delivered(env, b"pf few headers")
    assert not any(b"pf many headers" in d for _, _, d in env.sink.messages)


async def test_recipient_removed_and_refid_through_postfix(env: Env,
                                                           milter: MilterFactory) -> None:
    """remove_recipients: Postfix applies DELRCPT; the others (and copy_to) still get it,
    with the RefID header."""
    await start_milter(milter, env, policy={"rules": [
        {"name": "inside-only", "frontend": "milter", "status": "infected",
         "action": ["accept", "replace", "remove_recipients", "copy_to", "tag"],
         "remove_recipients": ["*@outside.test"], "copy_to": ["av@example.test"]}]})
    code, text = await asyncio.to_thread(
        env.postfix.send, make_message("pf remove rcpt", attachment=EICAR),
        to=("bob@example.test", "eve@outside.test"))
    assert code == 250, text
    await delivered(env, b"pf remove rcpt")
    await asyncio.sleep(1)  # Postfix may deliver the recipients in several transactions
    rcpts = sorted(r for _, tos, data in env.sink.messages if b"pf remove rcpt" in data
                   for r in tos)
    assert rcpts == ["av@example.test", "bob@example.test"], env.postfix.log(100)[-2000:]
    data = await delivered(env, b"pf remove rcpt")
    refid = message_from_bytes(data)["X-Avgate-RefID"]
    assert refid and len(refid) == 16 and EICAR not in data
