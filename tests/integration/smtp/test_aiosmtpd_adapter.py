"""Pins the aiosmtpd behaviour :class:`avgate.frontends.smtpd.AiosmtpdAdapter` relies on.

The adapter overrides aiosmtpd internals (names starting with ``_``), which aiosmtpd may
change in any release. Each test here checks one thing the adapter assumes, on a bare
adapter (no avgate session logic), so an aiosmtpd upgrade that breaks an assumption fails
here, by name, instead of somewhere in the SMTP filter.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosmtpd
import pytest
from aiosmtpd.smtp import SMTP

from avgate.frontends.smtpd import AiosmtpdAdapter
from tests.helpers import async_wait_until
from tests.integration.smtp.conftest import RawClient

pytestmark = pytest.mark.timeout(60)

#: aiosmtpd internals the adapter uses (methods on the class)
PRIVATE_METHODS = ("_handle_client", "_reset_timeout", "_timeout_cb", "_set_post_data_state",
                   "_set_rset_state", "_getaddr", "_cb_client_connected")


class Probe(AiosmtpdAdapter):
    """A bare adapter with test verbs and counters."""

    instances: list[Probe] = []

    def __init__(self, *, admit: bool = True, **kw: Any) -> None:
        self.admitted = admit
        self.resets = 0
        self.closed = False
        super().__init__(object(), **kw)
        Probe.instances.append(self)

    async def admit(self) -> bool:
        if not self.admitted:
            await self.push("421 go away")
        return self.admitted

    def session_closed(self) -> None:
        self.closed = True

    def transaction_reset(self) -> None:
        self.resets += 1

    async def smtp_XREAD(self, arg: str) -> None:
        """Read a payload up to END from the command stream (as DATA is read)."""
        data = await self.reader.readuntil(b"END")
        await self.push(f"250 read {len(data)}")

    async def smtp_XBUSY(self, arg: str) -> None:
        """Work longer than the idle timeout, flagged busy."""
        self.busy = True
        try:
            await asyncio.sleep(float(arg))
        finally:
            self.busy = False
            self.reset_idle_timer()
        await self.push("250 done")

    async def smtp_XSTART(self, arg: str) -> None:
        self.start_over()
        await self.push("250 started over")


Serve = Callable[..., Any]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[asyncio.Server] = []

    async def _serve(**kw: Any) -> int:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: Probe(hostname="probe.test", ident="probe", loop=loop, **kw),
            "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    Probe.instances.clear()
    try:
        yield _serve
    finally:
        for server in servers:
            server.close()


def test_aiosmtpd_release_and_private_names() -> None:
    """The adapter was written against aiosmtpd 1.4 (pyproject pins >=1.4.6,<1.5)."""
    assert aiosmtpd.__version__.startswith("1.4."), aiosmtpd.__version__
    for name in PRIVATE_METHODS:
        assert callable(getattr(SMTP, name, None)), f"aiosmtpd.smtp.SMTP.{name} is gone"
    # class attributes the adapter reads or replaces
    assert isinstance(SMTP.line_length_limit, int)
    assert isinstance(SMTP.command_size_limit, int) and SMTP.command_size_limit == 512
    assert isinstance(SMTP.command_size_limits, dict)  # shared by every connection
    assert hasattr(SMTP, "local_part_limit")


async def test_instance_attributes_the_adapter_uses() -> None:
    s = SMTP(object(), timeout=7, ident="x", loop=asyncio.get_running_loop())
    assert s._timeout_duration == 7
    assert s._timeout_handle is None
    assert s.__ident__ == "x"
    # aiosmtpd clears the (shared, class-level) dict in __init__: the adapter gives each
    # session its own before calling it
    a = Probe(loop=asyncio.get_running_loop())
    assert a.command_size_limits is not SMTP.command_size_limits


@pytest.mark.parametrize("arg", [
    "<a@b.example>", "<a@b.example> SIZE=100", "<a.b+c@d-e.example>\tBODY=8BITMIME",
    "<a@b.example> (comment)", "<\"q p\"@b.example>", "<a@[192.0.2.1]>", "a@b.example",
    "<@relay:a@b.example>", "<a@b.example", "<>", "<a@b.example>  ", "<a..b@c.example>",
])
async def test_getaddr_fast_path_gives_aiosmtpd_results(arg: str) -> None:
    loop = asyncio.get_running_loop()
    plain, fast = SMTP(object(), loop=loop), Probe(loop=loop)
    assert fast._getaddr(arg) == plain._getaddr(arg)


async def test_reader_is_the_command_stream_with_the_adapters_limit(serve: Serve) -> None:
    """DATA is read from ``reader`` with the StreamReader limit ``line_length_limit`` gives
    (aiosmtpd's own 1001 would raise LimitOverrunError on 10,000 bytes without a marker);
    unknown verbs (XFORWARD, XCLIENT) reach ``smtp_<VERB>``."""
    c = await RawClient.connect(await serve())
    try:
        await c.send(b"XREAD\r\n" + b"x" * 10_000 + b"END")
        assert await c.reply() == "250 read 10003"
    finally:
        await c.close()


async def test_command_size_limits_are_per_session(serve: Serve) -> None:
    """aiosmtpd raises MAIL's limit by 26 (SIZE) + 10 (SMTPUTF8) at each EHLO, in the dict
    it reads through ``self``: the adapter's starts afresh, and the class's is untouched."""
    before = dict(SMTP.command_size_limits)
    c = await RawClient.connect(await serve(data_size_limit=1000, enable_SMTPUTF8=True))
    try:
        for _ in range(3):
            assert (await c.cmd("EHLO client.test")).startswith("250")
        [probe] = Probe.instances
        assert probe.command_size_limits["MAIL"] == 512 + 26 + 10
        assert (await c.cmd("MAIL FROM:<" + "a" * 526 + "@b.example>")).startswith("250")
        assert (await c.cmd("MAIL FROM:<" + "a" * 527 + "@b.example>")).startswith("500")
    finally:
        await c.close()
    assert dict(SMTP.command_size_limits) == before


async def test_state_hooks(serve: Serve) -> None:
    """``_set_rset_state`` (RSET, EHLO, start_over) runs ``_set_post_data_state``, which
    makes a new envelope: the adapter's transaction_reset hook sees each."""
    c = await RawClient.connect(await serve())
    try:
        [probe] = Probe.instances
        assert (await c.cmd("EHLO client.test")).startswith("250")
        n = probe.resets
        assert (await c.cmd("MAIL FROM:<a@b.example>")).startswith("250")
        assert (await c.cmd("RSET")).startswith("250")
        assert probe.resets == n + 1
        assert (await c.cmd("MAIL FROM:<a@b.example>")).startswith("250")
        assert await c.cmd("XSTART") == "250 started over"
        assert probe.resets == n + 2
        assert (await c.cmd("RCPT TO:<c@d.example>")).startswith("503")  # envelope is new
    finally:
        await c.close()
    assert await async_wait_until(lambda: probe.closed, timeout=5)


async def test_admit_and_greeting(serve: Serve) -> None:
    """``_handle_client`` runs the session (greeting first: it carries ``ident``); refusing
    in admit() closes the connection before the greeting."""
    port = await serve()
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert (await asyncio.wait_for(r.readline(), 10)) == b"220 probe.test probe\r\n"
    finally:
        w.close()
    port = await serve(admit=False)
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert (await asyncio.wait_for(r.readline(), 10)) == b"421 go away\r\n"
        assert (await asyncio.wait_for(r.read(), 10)) == b""
    finally:
        w.close()


async def test_idle_timer(serve: Serve) -> None:
    """aiosmtpd re-arms the timer through ``_reset_timeout`` and ends an idle session
    through ``_timeout_cb``; the adapter's lazy timer keeps a busy session alive."""
    c = await RawClient.connect(await serve(timeout=0.3))
    try:
        assert await c.cmd("XBUSY 1.0") == "250 done"  # busy longer than the idle timeout
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await c.reply(timeout=10)  # idle: the server hangs up
        assert loop.time() - start < 5
    finally:
        await c.close()


class Hooks:
    """A handler with hooks, as avgate's FilterHandler has."""

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        return responses

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 ok"


def _state(obj: Any) -> dict[str, Any]:
    """An instance's attributes, comparable across two instances: bound methods by their
    function, per-instance objects (reader, futures, loop) by type."""
    def norm(v: Any) -> Any:
        if inspect.ismethod(v):
            return ("method", v.__func__, type(v.__self__))
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, tuple):
            return tuple(norm(x) for x in v)
        if isinstance(v, str | int | float | bool | type(None)):
            return v
        return ("object", type(v))
    return {k: norm(v) for k, v in vars(obj).items()}


@pytest.mark.parametrize("kw", [{}, {"data_size_limit": 1000, "enable_SMTPUTF8": True,
                                     "hostname": "h.test", "ident": "id", "timeout": 9}])
async def test_fast_init_builds_what_aiosmtpd_builds(kw: dict[str, Any]) -> None:
    """The adapter builds its state without aiosmtpd's per-connection introspection (from
    tables taken at the first connection): the state must be what aiosmtpd's __init__ gives,
    attribute for attribute (an aiosmtpd upgrade that sets something new fails here)."""
    loop = asyncio.get_running_loop()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for handler in (object(), Hooks()):
        AiosmtpdAdapter._tables.pop((_Bare, type(handler)), None)
        slow = _Bare(handler, loop=loop, tls_context=ctx, **kw)  # aiosmtpd's, then the tables
        assert (_Bare, type(handler)) in AiosmtpdAdapter._tables
        fast = _Bare(handler, loop=loop, tls_context=ctx, **kw)
        assert _state(fast) == _state(slow)
        assert set(fast._handle_hooks) == ({"EHLO", "RSET"} if isinstance(handler, Hooks)
                                           else set())
        assert sorted(fast._auth_methods) == ["LOGIN", "PLAIN"]
        assert getattr(fast._auth_methods["LOGIN"].method, "__self__", None) is fast
    # other arguments: aiosmtpd's own __init__, and the tables are not taken from it
    AiosmtpdAdapter._tables.pop((_Bare, object), None)
    odd = _Bare(object(), loop=loop, auth_exclude_mechanism=["LOGIN"])
    assert sorted(odd._auth_methods) == ["PLAIN"]
    assert (_Bare, object) not in AiosmtpdAdapter._tables
    # HELP still sees the commands' @syntax through the trace wrapper
    assert odd._smtp_methods["HELP"].__smtp_syntax__ == "HELP [command]"


class _Bare(AiosmtpdAdapter):
    """The adapter with nothing added."""


async def test_help_lists_the_commands(serve: Serve) -> None:
    """HELP goes through the trace wrapper, which keeps aiosmtpd's @syntax attributes."""
    c = await RawClient.connect(await serve())
    try:
        reply = await c.cmd("HELP")
        assert reply.startswith("250 Supported commands:") and "MAIL" in reply.split()
        assert await c.cmd("HELP NOOP") == "250 Syntax: NOOP [ignored]"
    finally:
        await c.close()


async def test_replies_drain_only_when_asyncio_says_so(serve: Serve) -> None:
    """``write_reply`` skips ``StreamWriter.drain()`` unless it has something to do: it reads
    asyncio's FlowControlMixin flags ``_paused`` (writing paused) and ``_connection_lost``
    (an asyncio upgrade that renames them fails here), the transport's closing state and
    the reader's exception."""
    c = await RawClient.connect(await serve())
    try:
        [probe] = Probe.instances
        assert probe._paused is False and probe._connection_lost is False
        assert probe.write_reply("250 a") is False
        probe._paused = True  # as pause_writing() leaves it
        try:
            assert probe.write_reply("250 b") is True
        finally:
            probe._paused = False
        assert await c.reply() == "250 a" and await c.reply() == "250 b"
        probe.pause_writing()
        assert probe.write_reply("250 c") is True
        probe.resume_writing()
        assert await c.reply() == "250 c"
    finally:
        await c.close()
    assert await async_wait_until(lambda: probe.closed, timeout=5)
    assert probe._connection_lost is True
    assert probe.write_reply("250 gone") is True  # drain() raises ConnectionResetError


async def test_command_loop_keeps_aiosmtpds_answers(serve: Serve) -> None:
    """The adapter's command loop (aiosmtpd's, without PROXY and call limits) answers bad
    lines as aiosmtpd does: empty line, over-long line (read to its end first), a non-ASCII
    verb, unknown verbs (five end the session), a command over its size limit."""
    c = await RawClient.connect(await serve())
    try:
        assert await c.cmd("") == "500 Error: bad syntax"
        assert await c.cmd(b"NOOP " + b"x" * 70_000 + b"\r\n") == "500 Command line too long"
        assert await c.cmd("NOOP") == "250 OK"  # the rest of the long line was skipped
        assert await c.cmd("NO\xe9P".encode("latin-1") + b"\r\n") == "500 Error: bad syntax"
        assert await c.cmd("EHLO client.test") != ""
        assert await c.cmd("NOOP " + "x" * 600) == "500 Command line too long"
        for _ in range(4):
            assert await c.cmd("BOGUS") == '500 Error: command "BOGUS" not recognized'
        assert await c.cmd("BOGUS") == "502 5.5.1 Too many unrecognized commands, goodbye."
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await c.reply(timeout=10)
    finally:
        await c.close()


async def test_command_lines_logged_by_aiosmtpd_only_when_enabled(
        serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    """aiosmtpd's own debug/info lines of each command line are written when its logger is
    enabled for them (and AUTH data still hidden by its sanitizer), and skipped otherwise."""
    port = await serve()
    with caplog.at_level(logging.WARNING, logger="mail.log"):
        c = await RawClient.connect(port)
        try:
            assert await c.cmd("NOOP quiet") == "250 OK"
        finally:
            await c.close()
    assert not [r for r in caplog.records if "quiet" in r.getMessage()]
    with caplog.at_level(logging.DEBUG, logger="mail.log"):
        c = await RawClient.connect(port)
        try:
            assert await c.cmd("NOOP loud") == "250 OK"
            await c.cmd("AUTH PLAIN c2VjcmV0")
        finally:
            await c.close()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "NOOP loud" in text and "readline" in text
    assert "c2VjcmV0" not in text and "AUTH PLAIN ********" in text


async def test_proxy_protocol_sessions_use_aiosmtpds_loop() -> None:
    """A session with aiosmtpd's PROXY protocol or call limits (avgate sets neither) runs
    aiosmtpd's own command loop, which handles them."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Probe(hostname="probe.test", ident="probe", loop=loop,
                      command_call_limit=2), "127.0.0.1", 0)
    try:
        c = await RawClient.connect(int(server.sockets[0].getsockname()[1]))
        try:
            assert await c.cmd("NOOP") == "250 OK"
            assert await c.cmd("NOOP") == "250 OK"
            assert await c.cmd("NOOP") == "421 4.7.0 NOOP sent too many times"
        finally:
            await c.close()
    finally:
        server.close()


async def test_session_after_starttls_is_the_new_one(serve: Serve, tmp_path: Path) -> None:
    """STARTTLS gives aiosmtpd a new session (not extended until EHLO again): the command
    loop reads the session for each command, so MAIL's size limit is the plain 512 bytes
    until the client says EHLO over TLS, then 512 + SIZE + SMTPUTF8 again."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
               "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=probe.test",
               "-keyout", str(key), "-out", str(cert)]
    await asyncio.to_thread(subprocess.run, openssl, check=True, capture_output=True,
                            timeout=60)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    client_ctx.check_hostname = False
    mail = "MAIL FROM:<" + "a" * 520 + "@b.example>"  # 542 bytes: over 512, within 548
    c = await RawClient.connect(await serve(tls_context=server_ctx, data_size_limit=1000,
                                            enable_SMTPUTF8=True))
    try:
        assert "STARTTLS" in await c.cmd("EHLO client.test")
        assert (await c.cmd("STARTTLS")).startswith("220")
        await c.writer.start_tls(client_ctx)
        assert await c.cmd(mail) == "500 Command line too long"
        assert (await c.cmd("EHLO client.test")).startswith("250")
        assert (await c.cmd(mail)).startswith("250")
    finally:
        await c.close()
