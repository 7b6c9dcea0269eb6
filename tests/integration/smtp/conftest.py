"""Fixtures for SMTP front-end tests: recording sinks (the next hop) and a running avgate.

* :class:`Sink` — an aiosmtpd next hop that records each delivered message (envelope, bytes,
  the XFORWARD attributes it was given) and can be told to misbehave: refuse or defer some
  recipients, answer DATA with a chosen reply, answer DATA late.
* :class:`RawSink` — a minimal next hop that records the exact bytes on the wire (for the
  smuggling tests: what avgate relays must hold exactly one end-of-data marker).
* ``avgate`` — a factory fixture: ``await avgate(listener={...}, policy={...}, engines=[...])``
  builds a Gateway from a real config and starts the SMTP front-end on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import smtplib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from avgate import config as config_mod
from avgate.frontends.listen import ListenOptions
from avgate.frontends.smtp import SMTPListener, start
from avgate.gateway import Gateway
from tests.corpus import EICAR as EICAR  # re-exported for the SMTP tests
from tests.corpus import make_message as make_message


# -- sinks ----------------------------------------------------------------------------------
@dataclass
class Delivered:
    sender: str
    recipients: list[str]
    data: bytes
    xforward: dict[str, str]


@dataclass
class Sink:
    """A recording next hop (aiosmtpd)."""

    refuse: set[str] = field(default_factory=set)  # RCPT → 550
    defer: set[str] = field(default_factory=set)  # RCPT → 450
    data_reply: str | None = None  # e.g. "554 5.7.1 no" / "452 4.3.1 full"
    data_delay: float = 0.0
    utf8: bool = False  # offer SMTPUTF8
    messages: list[Delivered] = field(default_factory=list)
    connections: int = 0
    server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> Sink:
        sink = self

        class Handler:
            def __init__(self) -> None:
                self.xforward: dict[str, str] = {}

            async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                                  options: list[str]) -> str:
                if address in sink.refuse:
                    return "550 5.1.1 no such user"
                if address in sink.defer:
                    return "450 4.2.1 try later"
                envelope.rcpt_tos.append(address)
                return "250 2.1.5 Ok"

            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                if sink.data_delay:
                    await asyncio.sleep(sink.data_delay)
                if sink.data_reply:
                    return sink.data_reply
                sink.messages.append(Delivered(envelope.mail_from, list(envelope.rcpt_tos),
                                               envelope.original_content, dict(self.xforward)))
                self.xforward = {}
                return f"250 2.0.0 Ok: queued as SINK{len(sink.messages)}"

        class SinkSMTP(SMTP):
            async def smtp_XFORWARD(self, arg: str) -> None:
                for item in (arg or "").split():
                    k, _, v = item.partition("=")
                    self.event_handler.xforward[k.upper()] = v
                await self.push("250 2.0.0 Ok")

        async def ehlo(server: Any, session: Any, envelope: Any, hostname: str,
                       responses: list[str]) -> list[str]:
            session.host_name = hostname
            return [*responses[:-1], "250-XFORWARD NAME ADDR PROTO HELO PORT", responses[-1]]

        def factory() -> SinkSMTP:
            sink.connections += 1
            h = Handler()
            h.handle_EHLO = ehlo  # type: ignore[attr-defined]
            return SinkSMTP(h, hostname="sink.test", data_size_limit=None,
                            enable_SMTPUTF8=sink.utf8, loop=asyncio.get_running_loop())

        self.server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


class RawSink:
    """Records the raw bytes each client sends; ends DATA only at CRLF.CRLF."""

    def __init__(self) -> None:
        self.wire: list[bytes] = []
        self.server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        log = bytearray()
        self.wire.append(b"")
        idx = len(self.wire) - 1
        writer.write(b"220 raw.test ESMTP\r\n")
        try:
            while True:
                line = await reader.readuntil(b"\r\n")
                log += line
                cmd = line[:4].upper()
                if cmd == b"DATA":
                    writer.write(b"354 go\r\n")
                    data = await reader.readuntil(b"\r\n.\r\n")
                    log += data
                    writer.write(b"250 2.0.0 Ok raw\r\n")
                elif cmd == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                elif cmd == b"EHLO":
                    writer.write(b"250-raw.test\r\n250 8BITMIME\r\n")
                else:
                    writer.write(b"250 Ok\r\n")
                self.wire[idx] = bytes(log)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.wire[idx] = bytes(log)
            writer.close()

    async def start(self) -> RawSink:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = await Sink().start()
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture
async def raw_sink() -> AsyncIterator[RawSink]:
    s = await RawSink().start()
    try:
        yield s
    finally:
        await s.stop()


# -- avgate -----------------------------------------------------------------------------------
@dataclass
class Running:
    gateway: Gateway
    listeners: list[SMTPListener]

    @property
    def port(self) -> int:
        return self.listeners[0].port

    def listener(self, name: str) -> SMTPListener:
        return next(x for x in self.listeners if x.name == name)


StartAvgate = Callable[..., Awaitable[Running]]


@pytest.fixture
async def avgate(tmp_path: Path) -> AsyncIterator[StartAvgate]:
    """Factory: ``await avgate(listener={...} | listeners=[...], policy={...}, engines=[...])``."""
    running: list[Running] = []

    async def _start(listener: dict[str, Any] | None = None,
                     listeners: list[dict[str, Any]] | None = None,
                     policy: dict[str, Any] | None = None,
                     engines: list[dict[str, Any]] | None = None,
                     **sections: Any) -> Running:
        tables = listeners or [listener or {}]
        data: dict[str, Any] = {
            "smtp": {"listeners": [{"listen": "127.0.0.1:0", "hostname": "avgate.test",
                                    **t} for t in tables]},
            "quarantine": {"path": str(tmp_path / "quarantine")},
            "engines": engines or [{"type": "embedded"}],
            **sections,
        }
        if policy:
            data["policy"] = policy
        cfg = config_mod.from_dict(data, base_dir=str(tmp_path))
        gw = Gateway.from_config(cfg)
        await gw.start()
        started = await start(gw, ListenOptions(drain_timeout=2, base_dir=str(tmp_path)))
        r = Running(gw, started)
        running.append(r)
        return r

    try:
        yield _start
    finally:
        for r in running:
            for x in r.listeners:
                await x.aclose()
            await r.gateway.close()


# -- clients ----------------------------------------------------------------------------------
async def swaks(port: int, *args: str, timeout: float = 30) -> tuple[int, str]:  # noqa: ASYNC109
    """Run swaks against 127.0.0.1:port; (exit code, transcript)."""
    exe = shutil.which("swaks")
    if exe is None:
        pytest.skip("swaks not installed (apt-get install swaks)")
    proc = await asyncio.create_subprocess_exec(
        exe, "--server", f"127.0.0.1:{port}", "--helo", "client.test", "--timeout", "20",
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return int(proc.returncode or 0), out.decode("utf-8", "replace")


def swaks_reply(transcript: str, after: str = "DATA") -> str:
    """The server reply line (last one) following the end of data in a swaks transcript."""
    lines = transcript.splitlines()
    replies = [x for x in lines if re.match(r"^<[~*-]* +\d{3}[ -]", x)]
    return re.sub(r"^<[~*-]* +", "", replies[-2] if replies and " 221" in replies[-1]
                  else replies[-1]) if replies else ""


class RawClient:
    """A line-level SMTP client over asyncio streams, for protocol edge cases."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        c = cls(r, w)
        await c.reply()
        return c

    async def reply(self, timeout: float = 15) -> str:  # noqa: ASYNC109
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), timeout)).decode()
            if not line:
                raise ConnectionError("closed: " + "".join(lines))
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return "".join(lines).rstrip("\r\n")

    async def cmd(self, line: str | bytes) -> str:
        self.writer.write(line if isinstance(line, bytes) else line.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def send(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()

    async def envelope(self, sender: str = "alice@example.test",
                       rcpts: tuple[str, ...] = ("bob@example.test",)) -> None:
        assert (await self.cmd("EHLO client.test")).startswith("250")
        assert (await self.cmd(f"MAIL FROM:<{sender}>")).startswith("250")
        for r in rcpts:
            assert (await self.cmd(f"RCPT TO:<{r}>")).startswith("250")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
            await self.writer.wait_closed()


def send_smtplib(port: int, msg: bytes, sender: str = "alice@example.test",
                 rcpts: tuple[str, ...] = ("bob@example.test",)) -> tuple[int, bytes]:
    """Blocking helper (run in a thread): (DATA reply code, text)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        code, text = s.mail(sender)
        if code != 250:
            return code, text
        for r in rcpts:
            s.rcpt(r)
        return s.data(msg)
