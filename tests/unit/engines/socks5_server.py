"""A tiny SOCKS5 server for tests (RFC 1928 CONNECT, RFC 1929 username/password).

It relays to the requested host for real, so a clamd (fake or real) behind it sees the
engine's bytes; ``fault`` makes it misbehave instead: ``"refuse"`` (reply 0x05, connection
refused by the target), ``"close"`` (hang up right after the greeting), ``"garbage"``
(answer the greeting with bytes that are not SOCKS).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import struct
from typing import Any


class Socks5Server:
    def __init__(self, user: str = "", password: str = "", fault: str = "") -> None:
        self.user = user
        self.password = password
        self.fault = fault
        self.targets: list[tuple[str, int]] = []  # CONNECT requests, as sent by the client
        self.logins: list[tuple[str, str]] = []  # (user, password) offered
        self.relayed = 0  # client → target bytes
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    port = 0  # set by start()

    def url(self, user: str | None = None, password: str | None = None) -> str:
        user = self.user if user is None else user
        password = self.password if password is None else password
        auth = f"{user}:{password}@" if user else ""
        return f"socks5://{auth}127.0.0.1:{self.port}"

    async def start(self) -> Socks5Server:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._session(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ver, n = await reader.readexactly(2)
        methods = await reader.readexactly(n)
        assert ver == 5
        if self.fault == "close":
            return
        if self.fault == "garbage":
            writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            await writer.drain()
            return
        want = 2 if self.user else 0
        if want not in methods:
            writer.write(b"\x05\xff")
            return
        writer.write(bytes([5, want]))
        if want == 2:
            _, ulen = await reader.readexactly(2)
            user = (await reader.readexactly(ulen)).decode()
            (plen,) = await reader.readexactly(1)
            password = (await reader.readexactly(plen)).decode()
            self.logins.append((user, password))
            ok = (user, password) == (self.user, self.password)
            writer.write(b"\x01\x00" if ok else b"\x01\x01")
            if not ok:
                await writer.drain()
                return
        ver, cmd, _, atyp = await reader.readexactly(4)
        if atyp == 1:
            host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
        elif atyp == 4:
            host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
        else:
            (hlen,) = await reader.readexactly(1)
            host = (await reader.readexactly(hlen)).decode()
        (port,) = struct.unpack(">H", await reader.readexactly(2))
        self.targets.append((host, port))
        bound = b"\x01\x00\x00\x00\x00\x00\x00"
        if cmd != 1:
            writer.write(b"\x05\x07\x00" + bound)  # command not supported
            return
        if self.fault == "refuse":
            writer.write(b"\x05\x05\x00" + bound)
            return
        try:
            t_reader, t_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.write(b"\x05\x05\x00" + bound)
            return
        writer.write(b"\x05\x00\x00" + bound)
        await writer.drain()
        try:
            await asyncio.gather(self._pipe(reader, t_writer, count=True),
                                 self._pipe(t_reader, writer))
        finally:
            t_writer.close()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    count: bool = False) -> None:
        try:
            while data := await src.read(65536):
                if count:
                    self.relayed += len(data)
                dst.write(data)
                await dst.drain()
        except ConnectionError:
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                dst.write_eof()
