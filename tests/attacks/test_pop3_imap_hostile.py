"""Hostile clients and servers around the POP3 and IMAP proxies: over-long lines, STLS
command injection, a server that says too much or too little, messages over the size limit,
literal sizes near 2**32, unterminated literals, and hundreds of idle connections. The
upstream is a scripted fake server on loopback (what a real server never does is exactly
what these tests need); the proxy runs in the test's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from avgate import config
from avgate.frontends import imap as imap_fe
from avgate.frontends import pop3 as fe
from avgate.frontends.listen import ListenOptions
from avgate.gateway import Gateway
from tests.helpers import async_wait_until

pytestmark = pytest.mark.timeout(60)

Script = Callable[[str], bytes]


def default_script(line: str) -> bytes:
    verb = line.split(" ", 1)[0].upper()
    if verb == "CAPA":
        return b"+OK\r\nUSER\r\nTOP\r\n.\r\n"
    if verb == "QUIT":
        return b"+OK bye\r\n"
    return b"+OK " + verb.encode() + b"\r\n"


@dataclass
class FakeServer:
    """A POP3 server that answers each line by ``script`` and records what it received."""

    script: Script = default_script
    greeting: bytes = b"+OK fake ready\r\n"
    received: list[str] = field(default_factory=list)
    connections: int = 0
    server: asyncio.Server | None = None

    async def start(self) -> FakeServer:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            writer.write(self.greeting)
            while line := await reader.readline():
                text = line.decode("latin-1").rstrip("\r\n")
                self.received.append(text)
                writer.write(self.script(text))
                await writer.drain()
                if text.upper() == "QUIT":
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    server = await FakeServer().start()
    try:
        yield server
    finally:
        await server.stop()


Start = Callable[..., Any]


@pytest.fixture
async def proxy(fake: FakeServer, tmp_path: Path) -> AsyncIterator[Start]:
    started: list[Any] = []

    async def start(kind: str = "pop3", **settings: Any) -> Any:
        cfg = config.from_dict({
            "scan": {"cache": False}, "quarantine": {"path": str(tmp_path / "q")},
            f"{kind}_proxy": {"listen": "127.0.0.1:0", "server": f"127.0.0.1:{fake.port}",
                              "server_tls": "off", **settings}})
        module = fe if kind == "pop3" else imap_fe
        # no gateway.start(): nothing here is scanned (the scan workers would cost seconds)
        [listener] = await module.start(Gateway.from_config(cfg), ListenOptions())
        started.append(listener)
        return listener

    try:
        yield start
    finally:
        for listener in started:
            await listener.aclose()


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await reader.readline()).startswith(b"+OK")
    return reader, writer


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes) -> bytes:
    writer.write(line)
    await writer.drain()
    return await asyncio.wait_for(reader.readline(), 10)


async def closed(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), 10) == b""


async def test_over_long_command_line(proxy: Start, fake: FakeServer) -> None:
    px = await proxy(max_line_length=1024)
    reader, writer = await connect(px.port)
    writer.write(b"USER " + b"a" * 5000)  # no line end: the proxy must not wait for one
    await writer.drain()
    assert await asyncio.wait_for(reader.readline(), 10) == b"-ERR Line too long\r\n"
    assert await closed(reader)
    assert fake.received == []
    reader, writer = await connect(px.port)  # and the next client is served
    assert await ask(reader, writer, b"STAT\r\n") == b"+OK STAT\r\n"
    writer.close()


async def test_stls_command_injection_is_refused(proxy: Start, fake: FakeServer,
                                                 tmp_path: Path) -> None:
    cert, key = await _certificate(tmp_path)
    px = await proxy(tls_cert=str(cert), tls_key=str(key))
    reader, writer = await connect(px.port)
    writer.write(b"STLS\r\nUSER injected\r\nPASS injected\r\n")
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"-ERR Data after STLS")
    assert await closed(reader)
    assert not any("injected" in line for line in fake.received)


async def _certificate(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    proc = await asyncio.create_subprocess_exec(
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
        "/CN=localhost", "-keyout", str(key), "-out", str(cert),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    assert await proc.wait() == 0
    return cert, key


@pytest.mark.parametrize("reply", [
    b"+OK " + b"x" * 100_000 + b"\r\n",  # an endless status line
    b"+OK one\r\n+OK two\r\n",  # more than was asked: would shift every later answer
    b"* garbage\r\n",  # not POP3
])
async def test_server_breaking_the_protocol_ends_the_session(proxy: Start, fake: FakeServer,
                                                             reply: bytes) -> None:
    fake.script = lambda line: reply if line.startswith("NOOP") else default_script(line)
    px = await proxy()
    reader, writer = await connect(px.port)
    writer.write(b"NOOP\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    assert len(data) < 1000 and b"two" not in data  # closed, never relayed
    assert not px.sessions or await async_wait_until(lambda: not px.sessions)


async def test_message_over_the_size_limit_keeps_the_session_in_step(proxy: Start,
                                                                     fake: FakeServer) -> None:
    body = b"".join(b"line %d\r\n" % i for i in range(20_000))
    fake.script = lambda line: (b"+OK\r\n" + body + b".\r\n" if line.startswith("RETR")
                                else default_script(line))
    px = await proxy(max_message_size=10_000)
    reader, writer = await connect(px.port)
    assert (await ask(reader, writer, b"RETR 1\r\n")).startswith(
        b"-ERR [SYS/PERM] Message too large")
    assert await ask(reader, writer, b"STAT\r\n") == b"+OK STAT\r\n"
    writer.close()


async def test_hundreds_of_idle_connections(proxy: Start, fake: FakeServer) -> None:
    px = await proxy(max_connections=50, idle_timeout=1.5)
    conns = []
    for _ in range(300):
        conns.append(await asyncio.open_connection("127.0.0.1", px.port))
    greetings = await asyncio.gather(*(asyncio.wait_for(r.readline(), 10) for r, _ in conns))
    served = sum(g.startswith(b"+OK") for g in greetings)
    refused = sum(g.startswith(b"-ERR [SYS/TEMP] Too many connections") for g in greetings)
    assert (served, refused) == (50, 250)
    # the idle ones are hung up after idle_timeout; then a new client is served at once
    assert await async_wait_until(lambda: not px.sessions, timeout=15)
    reader, writer = await connect(px.port)
    assert await ask(reader, writer, b"STAT\r\n") == b"+OK STAT\r\n"
    writer.close()
    for _, w in conns:
        w.close()
        with contextlib.suppress(Exception):
            await w.wait_closed()


async def test_server_down_is_a_temporary_err(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config.from_dict({"quarantine": {"path": str(tmp_path / "q")},
                            "pop3_proxy": {"listen": "127.0.0.1:0",
                                           "server": f"127.0.0.1:{port}"}})
    [px] = await fe.start(Gateway.from_config(cfg), ListenOptions())
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", px.port)
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(
            b"-ERR [SYS/TEMP] Mail server unavailable")
        assert await closed(reader)
        writer.close()
    finally:
        await px.aclose()


# -- IMAP ----------------------------------------------------------------------------------------
def imap_script(line: str) -> bytes:
    tag, _, rest = line.partition(" ")
    if rest.upper().startswith("CAPABILITY"):
        return b"* CAPABILITY IMAP4rev1 LITERAL+ IDLE\r\n" + tag.encode() + b" OK done\r\n"
    return tag.encode() + b" OK " + rest.split(" ", 1)[0].encode() + b" done\r\n"


@pytest.fixture
def imap_fake(fake: FakeServer) -> FakeServer:
    fake.greeting = b"* OK fake IMAP ready\r\n"
    fake.script = imap_script
    return fake


async def imap_connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"* OK")
    return reader, writer


@pytest.mark.parametrize("announce", [b"{4294967296}", b"{4294967295+}", b"~{18446744073709551616}",
                                      b"{99999999999999999999}"])
async def test_imap_literal_sizes_near_2_32(proxy: Start, imap_fake: FakeServer,
                                            announce: bytes) -> None:
    px = await proxy("imap")
    reader, writer = await imap_connect(px.port)
    writer.write(b"a1 APPEND INBOX " + announce + b"\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.readline(), 10) == b"* BYE Literal too large\r\n"
    assert await closed(reader)
    assert not any("APPEND" in line for line in imap_fake.received)


async def test_imap_literal_over_max_literal_and_line_limits(proxy: Start,
                                                             imap_fake: FakeServer) -> None:
    px = await proxy("imap", max_literal=1000, max_line_length=4096)
    reader, writer = await imap_connect(px.port)
    writer.write(b"a1 LOGIN {5000}\r\n")  # a password literal far over max_literal
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"a1 NO [TOOBIG]")
    assert await closed(reader)
    reader, writer = await imap_connect(px.port)
    writer.write(b"a2 SEARCH " + b"x" * 10_000)
    await writer.drain()
    assert await asyncio.wait_for(reader.readline(), 10) == b"* BYE Line too long\r\n"
    assert await closed(reader)
    assert not any(line.startswith(("a1", "a2")) for line in imap_fake.received)


async def test_imap_unterminated_literal_sends_nothing(proxy: Start,
                                                       imap_fake: FakeServer) -> None:
    px = await proxy("imap")
    reader, writer = await imap_connect(px.port)
    writer.write(b"a1 APPEND INBOX {100}\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.readline(), 10) == b"+ Ready for literal data\r\n"
    writer.write(b"only ten..")
    await writer.drain()
    writer.close()  # the literal never ends
    assert await async_wait_until(lambda: not px.sessions)
    assert imap_fake.received == ["avgate0 CAPABILITY"]  # the proxy's own question only


async def test_imap_hundreds_of_idle_connections(proxy: Start, imap_fake: FakeServer) -> None:
    px = await proxy("imap", max_connections=40, idle_timeout=1.5)
    conns = [await asyncio.open_connection("127.0.0.1", px.port) for _ in range(200)]
    greetings = await asyncio.gather(*(asyncio.wait_for(r.readline(), 10) for r, _ in conns))
    assert sum(g.startswith(b"* OK") for g in greetings) == 40
    assert sum(g.startswith(b"* BYE [UNAVAILABLE] Too many") for g in greetings) == 160
    assert await async_wait_until(lambda: not px.sessions, timeout=15)
    reader, writer = await imap_connect(px.port)
    writer.write(b"a1 NOOP\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.readline(), 10) == b"a1 OK NOOP done\r\n"
    writer.close()
    for _, w in conns:
        w.close()


async def test_imap_starttls_injection_and_nul(proxy: Start, imap_fake: FakeServer,
                                               tmp_path: Path) -> None:
    cert, key = await _certificate(tmp_path)
    px = await proxy("imap", tls_cert=str(cert), tls_key=str(key))
    reader, writer = await imap_connect(px.port)
    writer.write(b"a1 LOGIN x\0y z\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.readline(), 10) == \
        b"a1 BAD Invalid characters in command\r\n"
    writer.write(b"a2 STARTTLS\r\na3 LOGIN injected secret\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.readline(), 10) == b"a2 BAD Data after STARTTLS\r\n"
    assert await closed(reader)
    assert not any("LOGIN" in line for line in imap_fake.received)
