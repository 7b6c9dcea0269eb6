"""Fixtures for milter front-end tests.

* ``milter`` — a factory: ``await milter(policy={...}, milter={...}, engines=[...])`` builds a
  Gateway from a real config file and starts the milter front-end on a free loopback port.
* :class:`MtaClient` — the MTA side of the protocol over a real socket, built on our codec
  (the same way Postfix drives a milter: OPTNEG, macros, envelope, headers, body, EOM).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from avgate import config as config_mod
from avgate.frontends.listen import Listener, ListenOptions
from avgate.frontends.milter import MilterListener, start
from avgate.gateway import Gateway
from avgate.protocols import milter as m
from tests.corpus import EICAR as EICAR  # re-exported for the milter tests
from tests.corpus import make_message as make_message

#: What Postfix 3.x offers with milter_protocol = 6.
POSTFIX_ACTIONS = 0x1FF
POSTFIX_PROTOCOL = 0x1FFFFF


def split_message(msg: bytes, leadspc: bool) -> tuple[list[m.Header], bytes]:
    """Headers as an MTA sends them (folded lines joined by LF) and the body."""
    head, _, body = msg.partition(b"\r\n\r\n")
    headers: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and headers:
            headers[-1] = (headers[-1][0], headers[-1][1] + b"\n" + line)
        else:
            name, _, value = line.partition(b":")
            if not leadspc and value.startswith(b" "):
                value = value[1:]
            headers.append((name, value))
    return [m.Header(n, v) for n, v in headers], body


@dataclass
class Result:
    """The filter's answer to one message: modifications, then the final response."""

    final: m.Packet
    mods: list[m.Packet] = field(default_factory=list)

    def of(self, cls: type) -> list[Any]:
        return [x for x in self.mods if isinstance(x, cls)]

    @property
    def added_headers(self) -> dict[str, str]:
        return {h.name: h.value.strip() for h in self.of(m.AddHeader)}

    @property
    def new_body(self) -> bytes:
        return b"".join(x.chunk for x in self.of(m.ReplaceBody))


class MtaClient:
    """A milter client on a real socket, speaking through :class:`avgate.protocols.milter`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.codec = m.MilterClient()
        self.negotiated: m.OptNeg | None = None

    @classmethod
    async def connect(cls, target: str | int, *, actions: int = POSTFIX_ACTIONS,
                      protocol: int = POSTFIX_PROTOCOL) -> MtaClient:
        if isinstance(target, int):
            r, w = await asyncio.open_connection("127.0.0.1", target)
        else:
            r, w = await asyncio.open_unix_connection(target)
        client = cls(r, w)
        await client.send(m.OptNeg(6, actions, protocol))
        reply = await client.receive()
        assert isinstance(reply, m.OptNeg), reply
        client.negotiated = reply
        return client

    @property
    def leadspc(self) -> bool:
        return bool(self.negotiated and self.negotiated.protocol & m.SMFIP_HDR_LEADSPC)

    async def send(self, packet: m.Packet) -> None:
        self.writer.write(m.encode(packet))
        await self.writer.drain()

    async def receive(self, wait: float = 10) -> m.Packet | None:
        """The next response, or None when the filter closed the connection."""
        while True:
            ev = self.codec.next_event()
            if ev is not None:
                return ev
            data = await asyncio.wait_for(self.reader.read(65536), wait)
            self.codec.receive_data(data)
            if not data:
                return self.codec.next_event()

    async def step(self, packet: m.Packet, *, no_flag: int = 0) -> m.Packet | None:
        """Send one event unless negotiated away; wait for its reply if one is due."""
        assert self.negotiated is not None
        if self.negotiated.protocol & no_flag:
            return None
        await self.send(packet)
        if not self.codec.expects_reply(packet):  # type: ignore[arg-type]
            return None
        reply = await self.receive()
        assert isinstance(reply, m.Continue), reply
        return reply

    async def connect_event(self, *, addr: str = "192.0.2.10", auth: str = "") -> None:
        await self.send(m.Macro(b"C", (("j", "mx.example.test"), ("{daemon_name}", "smtpd"),
                                       ("{client_addr}", addr))))
        await self.step(m.Connect("client.example.test", "4", 40000, addr),
                        no_flag=m.SMFIP_NOCONNECT)
        await self.step(m.Helo("client.example.test"), no_flag=m.SMFIP_NOHELO)

    async def message(self, msg: bytes, *, sender: str = "alice@example.test",
                      recipients: tuple[str, ...] = ("bob@example.test",),
                      queue_id: str = "4ABCDEF", auth: str = "") -> Result:
        """Send one message; return the filter's modifications and final response."""
        mail_macros: tuple[tuple[str, str], ...] = (("i", queue_id),)
        if auth:
            mail_macros += (("{auth_authen}", auth),)
        await self.send(m.Macro(b"M", mail_macros))
        await self.step(m.Mail((f"<{sender}>",)), no_flag=m.SMFIP_NOMAIL)
        for rcpt in recipients:
            await self.step(m.Rcpt((f"<{rcpt}>",)), no_flag=m.SMFIP_NORCPT)
        await self.step(m.Data(), no_flag=m.SMFIP_NODATA)
        headers, body = split_message(msg, self.leadspc)
        for h in headers:
            await self.step(h, no_flag=m.SMFIP_NOHDRS)
        await self.step(m.EndOfHeaders(), no_flag=m.SMFIP_NOEOH)
        for i in range(0, len(body), 65535):
            await self.step(m.Body(body[i:i + 65535]), no_flag=m.SMFIP_NOBODY)
        await self.send(m.Macro(b"E", (("i", queue_id),)))
        await self.send(m.EndOfMessage())
        mods: list[m.Packet] = []
        while True:
            reply = await self.receive()
            assert reply is not None, "filter closed the connection at end of message"
            if isinstance(reply, (m.Accept, m.Continue, m.Reject, m.Tempfail, m.Discard,
                                  m.ReplyCode)):
                return Result(reply, mods)
            if not isinstance(reply, m.Progress):
                mods.append(reply)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.send(m.Quit())
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def write_config(tmp: Path, *, milter: dict[str, Any], policy: dict[str, Any] | None = None,
                 engines: list[dict[str, Any]] | None = None) -> Path:
    """A real TOML config file (so the same validation as ``avgate serve`` applies)."""
    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
        raise TypeError(v)

    lines = ["[milter]"] + [f"{k} = {val(v)}" for k, v in milter.items()]
    lines += ["[quarantine]", f"path = {val(str(tmp / 'quarantine'))}"]
    policy = dict(policy or {})
    rules = policy.pop("rules", [])
    lines += ["[policy]"] + [f"{k} = {val(v)}" for k, v in policy.items()]
    for rule in rules:
        lines += ["[[policy.rules]]"] + [f"{k} = {val(v)}" for k, v in rule.items()]
    for engine in engines or [{"type": "embedded", "name": "embedded"}]:
        lines += ["[[engines]]"] + [f"{k} = {val(v)}" for k, v in engine.items()]
    path = tmp / "avgate.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


MilterFactory = Callable[..., Awaitable[MilterListener]]


@pytest.fixture
async def milter(tmp_path: Path) -> AsyncIterator[MilterFactory]:
    """Start avgate's milter front-end (on a free port unless ``milter["listen"]`` says)."""
    started: list[tuple[Gateway, list[Listener]]] = []

    async def factory(*, milter: dict[str, Any] | None = None,
                      policy: dict[str, Any] | None = None,
                      engines: list[dict[str, Any]] | None = None) -> MilterListener:
        table = {"listen": "127.0.0.1:0", **(milter or {})}
        cfg = config_mod.load(write_config(tmp_path, milter=table, policy=policy,
                                           engines=engines))
        gateway = Gateway.from_config(cfg)
        await gateway.start()
        listeners = await start(gateway, ListenOptions(base_dir=cfg.base_dir))
        started.append((gateway, listeners))
        assert isinstance(listeners[0], MilterListener)
        return listeners[0]

    yield factory
    for gateway, listeners in started:
        for listener in listeners:
            await listener.aclose()
        await gateway.close()
