"""FTP proxy: clients transfer files through avgate; downloads and uploads are scanned.

Settings: :class:`FtpProxySettings` (``[ftp_proxy]``); runs only when the section is present
(``server`` is the real FTP server). The control channel is relayed command by command
(:mod:`avgate.protocols.ftp` frames it); data connections end on the proxy on both sides.

Data connections
    Towards the client: passive (``PASV``/``EPSV`` open a port on the proxy, on the address
    the client reached it on or ``passive_address``) or active (``PORT``/``EPRT``, only to
    the client's own address: a PORT naming a third host — the FTP bounce attack — is refused
    with ``500``). Towards the server: always passive (``EPSV``, then ``PASV``), connecting to
    the server's control address whatever address its 227 names (a server cannot point the
    proxy elsewhere either).

Transfers
    ``RETR``: the server's data goes into a spool (memory, then a temp file) and on to the
    client as it arrives, holding back the tail by ``[ftp_proxy.trickle]`` (default keep-back
    32 KiB, :mod:`avgate.trickle`), so a client's timeout does not fire on a large file. Once
    the server's data ends it is scanned (``gateway.process``, front-end ``ftp_proxy``):
    accepted → the rest goes out and the client gets the server's ``226``; refused → the data
    connection is closed without the rest (the client has an incomplete file) and the client
    gets ``550 ... virus found`` (``451`` when the scan failed, so it retries).
    ``STOR``/``APPE``/``STOU``: store-and-forward. The client's data is spooled (at most
    ``max_upload_size``) and scanned before the server hears of the upload; refused → ``550``
    and nothing reaches the server; accepted → the proxy opens the server's data connection,
    sends the command and the spooled bytes, and relays the server's answer.
    ``LIST``/``NLST``/``MLSD``: relayed unscanned. ``REST`` is refused (``502``): a download
    that starts in the middle could never be scanned whole. ``AUTH`` (TLS) is refused
    (``502``): this proxy speaks plain FTP, clients continue without TLS unless told to
    require it.

Limits: ``max_connections``; ``idle_timeout`` on the control channel; ``data_timeout`` for a
data connection to open and between its reads; lines of ``MAX_LINE`` bytes. ``clients``: the
networks allowed to use the proxy (others get ``421``). Passwords are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, field_validator

from ..decision import Disposition
from ..errors import SpoolError
from ..gateway import Context, Gateway
from ..limits import GiB
from ..policy import Networks
from ..protocols import ftp as proto
from ..settings import Listen, Section, Size
from ..smtpclient import parse_next_hop
from ..spool import Spool
from ..trickle import Gate, Relay, TrickleSettings
from .listen import Listener, ListenOptions, bind, parse_listen

CHUNK = 64 * 1024
DOWNLOADS = ("RETR",)
UPLOADS = ("STOR", "APPE", "STOU")
LISTINGS = ("LIST", "NLST", "MLSD")


def _server(value: Any) -> Any:
    if isinstance(value, str):
        parse_next_hop(value, 21)  # ValueError says what is wrong
    return value


class FtpProxySettings(Section):
    """``[ftp_proxy]``: listen (default ``127.0.0.1:10021``), server (``host[:port]``, the
    real FTP server, required), clients (allowed networks), passive_address (the IPv4 address
    PASV replies name; default: the one the client reached), max_connections, idle_timeout,
    data_timeout, max_upload_size, and ``[ftp_proxy.trickle]`` (see :mod:`avgate.trickle`)."""

    listen: Listen = parse_listen("127.0.0.1:10021")
    server: Annotated[str, BeforeValidator(_server)]
    clients: Networks = ("0.0.0.0/0", "::/0")
    passive_address: str = ""
    max_connections: int = Field(100, gt=0)
    idle_timeout: float = Field(300.0, gt=0)
    data_timeout: float = Field(60.0, gt=0)
    max_upload_size: Size = 1 * GiB
    trickle: TrickleSettings = TrickleSettings()

    @field_validator("passive_address")
    @classmethod
    def _ipv4(cls, value: str) -> str:
        if value:
            ip = ipaddress.ip_address(value)
            if ip.version != 4:
                raise ValueError("passive_address must be an IPv4 address (PASV)")
        return value

    @property
    def server_address(self) -> tuple[str, int]:
        return parse_next_hop(self.server, 21)


class SessionEnd(Exception):
    """The session is over (the client or the server went away, or broke the protocol)."""


class _DataSide:
    """How the client's next data connection is made: a listener (passive) or an address."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue(1))
        self.active: tuple[str, int] | None = None

    @property
    def ready(self) -> bool:
        return self.server is not None or self.active is not None

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        self.active = None


class FtpSession:
    def __init__(self, proxy: FtpProxy, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.s = proxy.settings
        self.gateway = proxy.gateway
        self.creader, self.cwriter = reader, writer
        self.commands = proto.CommandReader()
        self.replies = proto.ReplyReader()
        self.queued: list[proto.Command] = []
        self.server_replies: list[proto.Reply] = []
        self.sreader: asyncio.StreamReader | None = None
        self.swriter: asyncio.StreamWriter | None = None
        peer = writer.get_extra_info("peername") or ("", 0)
        local = writer.get_extra_info("sockname") or ("127.0.0.1", 0)
        self.client_ip = str(peer[0])
        self.local_ip = str(local[0])
        self.data = _DataSide()
        self.user = ""

    # -- control channel ---------------------------------------------------------------------
    async def send(self, data: bytes) -> None:
        self.cwriter.write(data)
        await self.cwriter.drain()

    async def client_command(self) -> proto.Command:
        while not self.queued:
            try:
                chunk = await asyncio.wait_for(self.creader.read(CHUNK), self.s.idle_timeout)
            except TimeoutError:
                await self.send(proto.reply(421, "Timeout: closing control connection."))
                raise SessionEnd from None
            if not chunk:
                raise SessionEnd
            try:
                self.queued.extend(self.commands.feed(chunk))
            except proto.FtpError as exc:
                await self.send(proto.reply(500, f"Bad command: {exc}."))
                raise SessionEnd from None
        return self.queued.pop(0)

    async def server_reply(self) -> proto.Reply:
        assert self.sreader is not None
        while not self.server_replies:
            try:
                chunk = await asyncio.wait_for(self.sreader.read(CHUNK), self.s.idle_timeout)
            except TimeoutError:
                await self.send(proto.reply(421, "The FTP server did not answer."))
                raise SessionEnd from None
            if not chunk:
                await self.send(proto.reply(421, "The FTP server closed the connection."))
                raise SessionEnd
            try:
                self.server_replies.extend(self.replies.feed(chunk))
            except proto.FtpError as exc:
                await self.send(proto.reply(421, f"The FTP server's answer is not FTP ({exc})."))
                raise SessionEnd from None
        return self.server_replies.pop(0)

    async def to_server(self, cmd: proto.Command) -> proto.Reply:
        assert self.swriter is not None
        self.swriter.write(cmd.line)
        await self.swriter.drain()
        return await self.server_reply()

    async def run(self) -> None:
        host, port = self.s.server_address
        try:
            self.sreader, self.swriter = await asyncio.wait_for(
                asyncio.open_connection(host, port), self.s.data_timeout)
        except (OSError, TimeoutError):
            await self.send(proto.reply(421, "The FTP server is not reachable, try later."))
            return
        greeting = await self.server_reply()
        await self.send(greeting.raw)
        while True:
            cmd = await self.client_command()
            if not await self.command(cmd):
                return

    async def command(self, cmd: proto.Command) -> bool:
        verb = cmd.verb
        if verb == "USER":
            self.user = cmd.arg[:100]
        if verb in ("PASV", "EPSV"):
            await self.passive(verb)
        elif verb in ("PORT", "EPRT"):
            await self.port(cmd)
        elif verb in ("REST", "AUTH", "PBSZ", "PROT", "CCC"):
            await self.send(proto.reply(502, f"{verb} is not supported by the scanning "
                                             "proxy."))
        elif verb in DOWNLOADS or verb in LISTINGS:
            await self.download(cmd, scan=verb in DOWNLOADS)
        elif verb in UPLOADS:
            await self.upload(cmd)
        else:
            answer = await self.to_server(cmd)
            await self.send(answer.raw)
            if verb == "QUIT":
                return False
        return True

    # -- data connections towards the client ---------------------------------------------------
    async def passive(self, verb: str) -> None:
        await self.data.close()
        side = self.data

        async def accepted(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            peer = w.get_extra_info("peername") or ("",)
            if str(peer[0]) != self.client_ip or side.accepted.full():
                w.close()  # only the client may connect to its data port, once
                return
            side.accepted.put_nowait((r, w))

        family = socket.AF_INET6 if ":" in self.local_ip else socket.AF_INET
        side.server = await asyncio.start_server(accepted, self.local_ip, 0, family=family,
                                                 backlog=1)
        port = side.server.sockets[0].getsockname()[1]
        if verb == "EPSV":
            await self.send(proto.format_epsv(port))
            return
        advertised = self.s.passive_address or self.local_ip
        try:
            await self.send(proto.format_pasv(advertised, port))
        except (proto.FtpError, ValueError):
            await self.data.close()
            await self.send(proto.reply(425, "PASV needs IPv4; use EPSV."))

    async def port(self, cmd: proto.Command) -> None:
        await self.data.close()
        try:
            host, port = (proto.parse_port(cmd.arg) if cmd.verb == "PORT"
                          else proto.parse_eprt(cmd.arg))
        except proto.FtpError as exc:
            await self.send(proto.reply(501, f"Bad {cmd.verb}: {exc}."))
            return
        if ipaddress.ip_address(host) != ipaddress.ip_address(self.client_ip) or port < 1024:
            # the FTP bounce attack: data to a third host (or a privileged port)
            await self.send(proto.reply(500, "Illegal PORT command (only to your own address, "
                                             "port 1024 or above)."))
            return
        self.data.active = (host, port)
        await self.send(proto.reply(200, f"{cmd.verb} command successful."))

    async def client_data(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        side = self.data
        try:
            if side.active is not None:
                return await asyncio.wait_for(asyncio.open_connection(*side.active),
                                              self.s.data_timeout)
            return await asyncio.wait_for(side.accepted.get(), self.s.data_timeout)
        finally:
            await side.close()

    # -- data connections towards the server -----------------------------------------------------
    async def server_data(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A passive data connection to the server (EPSV, else PASV); None after a failure
        the client was told about."""
        host = self.s.server_address[0]
        answer = await self.to_server(proto.Command("EPSV", ""))
        try:
            if answer.code == 229:
                port = proto.parse_epsv(answer.text)
            else:
                answer = await self.to_server(proto.Command("PASV", ""))
                if answer.code != 227:
                    await self.send(proto.reply(425, "The FTP server offers no passive "
                                                     "data connection."))
                    return None
                _, port = proto.parse_pasv(answer.text)  # its host is ignored: no bounce
            return await asyncio.wait_for(asyncio.open_connection(host, port),
                                          self.s.data_timeout)
        except (proto.FtpError, OSError, TimeoutError):
            await self.send(proto.reply(425, "Cannot open a data connection to the FTP "
                                             "server."))
            return None

    # -- transfers ---------------------------------------------------------------------------
    async def download(self, cmd: proto.Command, *, scan: bool) -> None:
        if not self.data.ready:
            await self.send(proto.reply(425, "Use PORT, EPRT, PASV or EPSV first."))
            return
        server = await self.server_data()
        if server is None:
            await self.data.close()
            return
        sreader, swriter = server
        try:
            first = await self.to_server(cmd)
            if not first.preliminary:
                await self.data.close()
                await self.send(first.raw)
                return
            await self.send(first.raw)
            try:
                _, cwriter = await self.client_data()
            except (OSError, TimeoutError):
                await self.send(proto.reply(425, "Cannot open the data connection."))
                await self.server_reply()  # the server's end of its transfer
                return
            try:
                if scan:
                    await self.scanned_download(cmd, sreader, cwriter)
                else:
                    await self.relay_data(sreader, cwriter)
                    await self.send((await self.server_reply()).raw)
            finally:
                cwriter.close()
                with contextlib.suppress(OSError):
                    await cwriter.wait_closed()
        finally:
            swriter.close()

    async def relay_data(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while chunk := await asyncio.wait_for(src.read(CHUNK), self.s.data_timeout):
            dst.write(chunk)
            await dst.drain()

    async def scanned_download(self, cmd: proto.Command, sreader: asyncio.StreamReader,
                               cwriter: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        gate = Gate(self.s.trickle, None, loop.time())
        spool = self.gateway.new_spool()
        relay = Relay(spool, None if gate.mode == "keep_back" else self.s.trickle.limit
                      if gate.active else 0)
        try:
            try:
                while True:
                    # trickle mode releases with time, not only with data
                    wake = gate.next_wakeup(loop.time())
                    wait = self.s.data_timeout if wake is None else max(0.0,
                                                                        wake - loop.time())
                    try:
                        chunk = await asyncio.wait_for(sreader.read(CHUNK), wait)
                    except TimeoutError:
                        if wake is None:
                            raise
                        chunk = None  # a trickle step is due
                    if chunk == b"":
                        break
                    if chunk:
                        relay.add(chunk)
                        gate.received(len(chunk))
                    early = relay.take(gate.releasable(loop.time()))
                    if early:
                        cwriter.write(early)
                        await cwriter.drain()
            except (OSError, TimeoutError, SpoolError) as exc:
                await self.send(proto.reply(426, f"Transfer aborted: {type(exc).__name__}."))
                return
            final = await self.server_reply()
            if not final.positive:
                await self.send(final.raw)  # the server's own failure: nothing to scan
                return
            spool.finish()
            gate.complete(loop.time())
            ctx = Context(frontend="ftp_proxy", listener=self.proxy.name,
                          client_addr=self.client_ip, size=spool.size)
            outcome = await self.gateway.process(spool, ctx, ids={"file": cmd.arg[:500]})
            d = outcome.decision
            if d.disposition is Disposition.ACCEPT:
                for data in relay.rest(CHUNK):
                    cwriter.write(data)
                    await cwriter.drain()
                await self.send(final.raw)
                return
            # refused: the client never gets the whole file
            cwriter.transport.abort()
            result = outcome.result
            if d.disposition is Disposition.TEMPFAIL:
                await self.send(proto.reply(451, f"Not scanned, try again later (RefID "
                                                 f"{outcome.refid})."))
            else:
                why = result.virus or result.reason or result.status.value
                await self.send(proto.reply(550, f"Transfer refused: {why} (RefID "
                                                 f"{outcome.refid})."))
        finally:
            spool.close()

    async def upload(self, cmd: proto.Command) -> None:
        if not self.data.ready:
            await self.send(proto.reply(425, "Use PORT, EPRT, PASV or EPSV first."))
            return
        await self.send(proto.reply(150, "Ok to send data (scanned before it is stored)."))
        try:
            creader, cwriter = await self.client_data()
        except (OSError, TimeoutError):
            await self.send(proto.reply(425, "Cannot open the data connection."))
            return
        spool = self.gateway.new_spool()
        try:
            total = 0
            try:
                while chunk := await asyncio.wait_for(creader.read(CHUNK), self.s.data_timeout):
                    total += len(chunk)
                    if total > self.s.max_upload_size:
                        cwriter.transport.abort()
                        await self.send(proto.reply(552, "Upload larger than the proxy "
                                                         "accepts (max_upload_size)."))
                        return
                    spool.write(chunk)
            except (OSError, TimeoutError, SpoolError) as exc:
                await self.send(proto.reply(426, f"Transfer aborted: {type(exc).__name__}."))
                return
            finally:
                cwriter.close()
            spool.finish()
            ctx = Context(frontend="ftp_proxy", listener=self.proxy.name,
                          client_addr=self.client_ip, size=spool.size)
            outcome = await self.gateway.process(spool, ctx, ids={"file": cmd.arg[:500],
                                                                  "upload": "1"})
            d = outcome.decision
            if d.disposition is Disposition.TEMPFAIL:
                await self.send(proto.reply(451, f"Not scanned, try again later (RefID "
                                                 f"{outcome.refid})."))
                return
            if d.disposition is not Disposition.ACCEPT:
                r = outcome.result
                why = r.virus or r.reason or r.status.value
                await self.send(proto.reply(550, f"Upload refused: {why} (RefID "
                                                 f"{outcome.refid})."))
                return
            await self.forward_upload(cmd, spool)
        finally:
            spool.close()

    async def forward_upload(self, cmd: proto.Command, spool: Spool) -> None:
        server = await self.server_data()
        if server is None:
            return
        _, swriter = server
        try:
            first = await self.to_server(cmd)
            if not first.preliminary:
                await self.send(first.raw)
                return
            try:
                for data in spool.chunks(CHUNK):
                    swriter.write(data)
                    await asyncio.wait_for(swriter.drain(), self.s.data_timeout)
            finally:
                swriter.close()
                with contextlib.suppress(OSError):
                    await swriter.wait_closed()
            await self.send((await self.server_reply()).raw)
        finally:
            swriter.close()

    async def close(self) -> None:
        await self.data.close()
        for w in (self.cwriter, self.swriter):
            if w is not None:
                w.close()


class FtpProxy:
    """One listening socket; ``describe()`` and ``aclose()`` for ``avgate serve``."""

    def __init__(self, gateway: Gateway, sock: socket.socket) -> None:
        self.gateway = gateway
        self.sock = sock
        self.name = "ftp_proxy"
        self.active = 0
        self.sessions: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    @property
    def settings(self) -> FtpProxySettings:
        s = self.gateway.config.ftp_proxy
        assert s is not None  # the front-end runs only with its section
        return s

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    async def start(self) -> FtpProxy:
        self.server = await asyncio.start_server(self._session, sock=self.sock)
        return self

    def describe(self) -> str:
        return f"{self.sock.getsockname()[0]}:{self.port} (FTP proxy to {self.settings.server})"

    def _allowed(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in ipaddress.ip_network(n, strict=False) for n in self.settings.clients)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.sessions.add(task)
        session = FtpSession(self, reader, writer)
        started = time.monotonic()
        try:
            if not self._allowed(session.client_ip):
                await session.send(proto.reply(421, "Not allowed from your address."))
                return
            if self.active >= self.settings.max_connections:
                await session.send(proto.reply(421, "Too many connections, try later."))
                return
            self.active += 1
            try:
                await session.run()
            finally:
                self.active -= 1
        except (SessionEnd, ConnectionError, OSError, TimeoutError):
            pass
        finally:
            await session.close()
            self.sessions.discard(task)
            log = self.gateway.log
            if log is not None and log.debug_enabled:
                log.debug({"event": "ftp_session", "frontend": "ftp_proxy",
                           "client": session.client_ip, "user": session.user,
                           "seconds": round(time.monotonic() - started, 3)})

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.sessions):
            task.cancel()
        if self.sessions:
            await asyncio.gather(*self.sessions, return_exceptions=True)


async def start(gateway: Gateway, options: ListenOptions) -> list[Listener]:
    settings = gateway.config.ftp_proxy
    assert settings is not None
    sock = bind(settings.listen, what="ftp_proxy", options=options)
    return [await FtpProxy(gateway, sock).start()]
