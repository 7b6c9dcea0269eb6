"""The aiosmtpd side of the SMTP filter: one adapter over aiosmtpd's internals, and the
server session built on it.

:class:`AiosmtpdAdapter` is the only class that touches aiosmtpd's private names (what starts
with ``_``); ``tests/integration/smtp/test_aiosmtpd_adapter.py`` pins the aiosmtpd behaviour
it relies on, so an aiosmtpd upgrade that changes it fails loudly there. :class:`FilterSMTP`
(per-session limits, XFORWARD/XCLIENT, DATA streamed into a Spool) uses aiosmtpd's public
API (``push``, ``smtp_*`` commands, ``@syntax``, ``session``/``envelope``) and the adapter's.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import ipaddress
import logging
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AnyStr, ClassVar

from aiosmtpd.smtp import (
    ALLOWED_BEFORE_STARTTLS,
    BOGUS_LIMIT,
    DATA_SIZE_DEFAULT,
    TLSSetupException,
    _AuthMechAttr,
    login_always_fail,
    make_loop,
    sanitized_log,
    syntax,
)
from aiosmtpd.smtp import SMTP as _AioSMTP
from aiosmtpd.smtp import Session as _AioSession
from aiosmtpd.smtp import __ident__ as _AIOSMTPD_IDENT
from aiosmtpd.smtp import log as _aiosmtpd_log

from ..errors import SpoolError
from ..protocols.smtp import XCLIENT_ATTRS, DataReceiver, parse_xattrs

if TYPE_CHECKING:
    from ..observability import ScanLog
    from .smtp import FilterHandler, SMTPListener

log = logging.getLogger("avgate.smtp")

REPLY_TOO_MANY = "421 4.7.0 Too many connections, try again later"
REPLY_SPOOL_FAILED = "451 4.3.0 Cannot spool the message, try again later"
REPLY_INTERNAL = "451 4.3.0 Internal error, try again later"
REPLY_NOT_AUTHORIZED = "550 5.7.0 Error: insufficient authorization"  # Postfix's words
REPLY_TOO_MANY_RCPTS = "452 4.5.3 Error: too many recipients"
REPLY_TOO_MANY_COMMANDS = "421 4.7.0 Error: too many commands without a message, closing"
REPLY_TOO_MANY_ERRORS = "421 4.7.0 Error: too many errors, closing"
REPLY_IN_TRANSACTION = "503 5.5.1 Error: MAIL transaction in progress"

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_PATH = re.compile(  # <dot-atom@domain>, then nothing or parameters (no comment)
    rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>[ \t]*((?:[^ \t(\r\n].*)?)\Z",
    re.DOTALL)


@functools.lru_cache(maxsize=1024)
def _client_ip(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client address parsed (IPv4-mapped IPv6 as IPv4), None if it is not one. Cached:
    EHLO asks for two allow-lists per connection, and clients come back."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def trusted(addr: str, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]
            ) -> bool:
    """Whether a client address is in an allow-list (IPv4-mapped IPv6 counts as IPv4)."""
    ip = _client_ip(addr)
    return ip is not None and any(ip in net for net in networks)


def peer_addr(session: _AioSession | None) -> str:
    """The connected client's address ("" when unknown)."""
    peer = session.peer if session is not None else None
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


TRACE_TEXT = 200  # characters of a command argument or reply in a debug line


def trace_arg(verb: str, arg: str | None) -> str | None:
    """A command's argument as a debug line shows it: AUTH keeps only its mechanism (the
    rest is a credential), everything else is cut to TRACE_TEXT characters."""
    if arg is None:
        return None
    if verb == "AUTH":
        return arg.split(" ", 1)[0][:TRACE_TEXT]
    return arg[:TRACE_TEXT]


def _traced(verb: str, method: Callable[[Any, str], Awaitable[None]]
            ) -> Callable[[Any, str], Awaitable[None]]:
    """``smtp_<verb>`` with a debug line first (when the scan log's level is debug); keeps
    the ``@syntax`` attributes (HELP lists and explains the command)."""
    @functools.wraps(method)
    async def traced(self: AiosmtpdAdapter, arg: str) -> None:
        log = self.tracing = self.debug_log()
        if log is not None:
            log.debug({"event": "smtp_command", **self.trace_fields(), "command": verb,
                       "arg": trace_arg(verb, arg)})
        await method(self, arg)
    return traced


@dataclass(frozen=True)
class _Tables:
    """What aiosmtpd's ``SMTP.__init__`` finds by introspection, per (session class,
    handler class): taken once from the first instance aiosmtpd built itself."""

    smtp: tuple[tuple[str, Callable[[Any, str], Awaitable[None]]], ...]  # verb, traced
    plain: dict[str, Callable[[Any, str | None], Awaitable[None]]]  # verb: smtp_<verb>
    auth: tuple[tuple[str, str, bool], ...]  # mechanism, attribute, builtin (on the session)
    hooks: tuple[str, ...]  # the handler's handle_* attributes
    ehlo_hook_ver: str | None

    @classmethod
    def of(cls, smtp: AiosmtpdAdapter, handler: Any) -> _Tables:
        auth = []
        for mech, impl in smtp._auth_methods.items():
            owner = smtp if impl.is_builtin else handler
            name = next(n for n, m in inspect.getmembers(owner) if m == impl.method)
            auth.append((mech, name, impl.is_builtin))
        return cls(smtp=tuple((verb, _traced(verb, getattr(type(smtp), f"smtp_{verb}")))
                              for verb in smtp._smtp_methods),
                   plain={verb: getattr(type(smtp), f"smtp_{verb}")
                          for verb in smtp._smtp_methods},
                   auth=tuple(auth),
                   hooks=tuple(f"handle_{verb}" for verb in smtp._handle_hooks),
                   ehlo_hook_ver=smtp._ehlo_hook_ver)


class AiosmtpdAdapter(_AioSMTP):
    """aiosmtpd's SMTP with the overrides of its internals that avgate needs, in one place.

    * ``line_length_limit`` is aiosmtpd's StreamReader limit: raised so that DATA is read in
      large pieces (command lines stay held to ``command_size_limit`` by aiosmtpd).
    * ``command_size_limits`` is one dict per session: aiosmtpd's is shared by every
      connection and EHLO raises its MAIL entry by 36 bytes each time (unbounded); here it
      starts afresh at each EHLO.
    * The idle timer is one timer per connection, re-armed lazily: a command or received
      DATA bytes only move a deadline (aiosmtpd cancels and re-creates a timer per line);
      :attr:`busy` (scanning/relaying) keeps it from cutting the connection.
    * ``__init__`` does what aiosmtpd's does without its per-connection introspection
      (``inspect.getmembers``/``dir`` of the session and the handler, ``inspect.signature``
      of ``handle_EHLO``: ~10% of the CPU per one-message connection): the tables come from
      the first session of each kind, which aiosmtpd builds itself (:class:`_Tables`).
    * ``_getaddr`` has a fast path for a plain ``<dot-atom@domain>`` (aiosmtpd's builds a
      class and runs the RFC 5322 header parser per call); anything else goes to aiosmtpd's.
    * ``_handle_client`` runs the adapter's command loop (:meth:`_command_loop`: aiosmtpd's,
      without the PROXY handshake and call limits avgate never sets): aiosmtpd's per-line
      log calls (a regex each to hide AUTH data) only when its logger is enabled, and the
      command called without the trace wrapper when not tracing. ``push`` writes the reply
      itself (:meth:`write_reply`) and calls ``StreamWriter.drain()`` only when it has
      something to do (writing paused, connection lost, reader failed).
    * Hooks for the session: :meth:`admit` before the greeting, :meth:`session_closed`
      after the last command, :meth:`transaction_reset` whenever aiosmtpd starts a new
      envelope; :meth:`start_over` (RSET state), :meth:`end_transaction` (post-DATA state),
      :meth:`reset_idle_timer`, :attr:`reader`, :attr:`ident`.
    """

    line_length_limit = 64 * 1024
    #: the keyword arguments :meth:`__init__` sets up itself (anything else: aiosmtpd's own)
    FAST_INIT_KW = frozenset({"data_size_limit", "enable_SMTPUTF8", "decode_data", "hostname",
                              "ident", "tls_context", "timeout", "loop"})
    _tables: ClassVar[dict[tuple[type, type], _Tables]] = {}

    def __init__(self, handler: Any, **kw: Any) -> None:
        self._deadline = 0.0
        self.busy = False  # scanning/relaying: the idle timer must not cut the connection
        self.in_data = False  # receiving DATA: received bytes are activity
        self.tracing: ScanLog | None = None  # debug lines go here (see debug_log)
        self.command_size_limits = collections.defaultdict(lambda: _AioSMTP.command_size_limit)
        key = (type(self), type(handler))
        tables = self._tables.get(key)
        if tables is not None and self.FAST_INIT_KW.issuperset(kw):
            self._init(handler, tables, **kw)
        else:  # aiosmtpd's own: the first session of its kind, or other arguments
            super().__init__(handler, **kw)
            tables = _Tables.of(self, handler)
            if self.FAST_INIT_KW.issuperset(kw):
                self._tables[key] = tables
        # every command through one wrapper: a debug line per command when level = debug
        self._smtp_methods = {verb: traced.__get__(self) for verb, traced in tables.smtp}
        self._plain_methods = tables.plain  # the same, unwrapped: the loop's when not tracing

    def _init(self, handler: Any, tables: _Tables, *,
              data_size_limit: int | None = DATA_SIZE_DEFAULT, enable_SMTPUTF8: bool = False,
              decode_data: bool = False,
              hostname: str | None = None, ident: str | None = None,
              tls_context: ssl.SSLContext | None = None, timeout: float = 300,
              loop: asyncio.AbstractEventLoop | None = None) -> None:
        """What aiosmtpd's ``SMTP.__init__`` does with these arguments (and the defaults of
        the others: no AUTH required, no call limits, no PROXY protocol), with the tables it
        builds by introspection on every connection (``inspect.getmembers``, ``dir``,
        ``inspect.signature``: ~10% of the CPU per message) taken from :class:`_Tables`.
        ``test_aiosmtpd_adapter.py`` checks that both give the same instance state."""
        self.__ident__ = ident or _AIOSMTPD_IDENT
        self.loop = loop or make_loop()
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=self.loop)
        self.event_handler = handler
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = enable_SMTPUTF8
        self._decode_data = decode_data
        self.hostname = hostname or socket.getfqdn()
        self.tls_context = tls_context
        if tls_context and tls_context.verify_mode not in {ssl.CERT_NONE, ssl.CERT_OPTIONAL}:
            _aiosmtpd_log.warning("tls_context.verify_mode not in {CERT_NONE, CERT_OPTIONAL}; "
                                  "this might cause client connection problems")
        elif tls_context and tls_context.check_hostname:
            _aiosmtpd_log.warning("tls_context.check_hostname == True; "
                                  "this might cause client connection problems")
        self.require_starttls = tls_context and False  # aiosmtpd: ... and require_starttls
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._auth_callback = login_always_fail
        self._authenticator = None
        self._auth_required = False
        self._auth_methods = {
            mech: _AuthMechAttr(getattr(self if builtin else handler, name), builtin)
            for mech, name, builtin in tables.auth}
        if _aiosmtpd_log.isEnabledFor(logging.INFO):
            _aiosmtpd_log.info("Available AUTH mechanisms: " + " ".join(
                m + "(builtin)" if impl.is_builtin else m
                for m, impl in sorted(self._auth_methods.items())))
        self._handle_hooks = {name[7:]: getattr(handler, name) for name in tables.hooks}
        self._ehlo_hook_ver = tables.ehlo_hook_ver
        self._enforce_call_limit = False

    # debug trace ([log] level = "debug"): commands and replies, never AUTH data or DATA -------
    def trace_log(self) -> ScanLog | None:
        """Where debug lines go (the gateway's scan log); None: no tracing."""
        return None

    def trace_fields(self) -> dict[str, Any]:
        """What identifies this session in a debug line."""
        return {"frontend": "smtp", "client": peer_addr(self.session)}

    def debug_log(self) -> ScanLog | None:
        """The trace log when its level is debug, else None. Looked up before the greeting
        and at each command (:attr:`tracing`); the replies to it use that."""
        log = self.trace_log()
        return log if log is not None and log.debug_enabled else None

    async def push(self, status: AnyStr) -> None:
        if self.write_reply(status):
            await self._writer.drain()

    def write_reply(self, status: AnyStr) -> bool:
        """aiosmtpd's ``push`` up to its ``StreamWriter.drain()``, and whether that is needed:
        drain() only waits while writing is paused, and raises when the connection is lost
        or the reader failed (asyncio's FlowControlMixin flags, pinned by
        ``test_aiosmtpd_adapter.py``); otherwise it is two coroutines for nothing."""
        log = self.tracing
        if log is not None:
            text = status if isinstance(status, str) else status.decode("utf-8", "replace")
            log.debug({"event": "smtp_reply", **self.trace_fields(),
                       "reply": text[:TRACE_TEXT]})
        response = (status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")
                    if isinstance(status, str) else status)
        writer = self._writer
        writer.write(response + b"\r\n")
        if _aiosmtpd_log.isEnabledFor(logging.DEBUG):
            assert self.session is not None
            _aiosmtpd_log.debug("%r << %r", self.session.peer, response)
        return bool(self._paused or self._connection_lost  # type: ignore[attr-defined]
                    or writer.transport.is_closing() or self._reader.exception() is not None)

    # hooks and helpers for subclasses --------------------------------------------------------
    async def admit(self) -> bool:
        """Before the greeting: False ends the connection (after the subclass said why)."""
        return True

    def session_closed(self) -> None:
        """The connection is over (whatever ended it)."""

    def transaction_reset(self) -> None:
        """aiosmtpd started a new envelope (after DATA, RSET, HELO/EHLO, XCLIENT)."""

    @property
    def reader(self) -> asyncio.StreamReader:
        """The client's byte stream (commands, and DATA read by the subclass)."""
        reader: asyncio.StreamReader = self._reader
        return reader

    @property
    def ident(self) -> str:
        """The software name in the greeting."""
        return str(self.__ident__)

    def start_over(self) -> None:
        """The state after RSET: a new envelope, the greeting kept."""
        self._set_rset_state()  # type: ignore[no-untyped-call]

    def end_transaction(self) -> None:
        """The state after DATA: a new envelope."""
        self._set_post_data_state()

    def reset_idle_timer(self) -> None:
        self._reset_timeout()

    # overrides of aiosmtpd internals ---------------------------------------------------------
    async def _handle_client(self) -> None:
        self.tracing = self.debug_log()
        if not await self.admit():
            if self.transport is not None:
                self.transport.close()
            return
        try:
            if self._proxy_timeout is None and not self._enforce_call_limit:
                await self._command_loop()
            else:  # PROXY protocol or call limits (avgate sets neither): aiosmtpd's own loop
                await super()._handle_client()
        finally:
            self.session_closed()

    async def _command_loop(self) -> None:
        """aiosmtpd's ``_handle_client`` (1.4.6) without the PROXY handshake and call limits
        (never set here), with two changes: its debug/info lines of each command line (a
        regex each, to hide AUTH data) only when aiosmtpd's logger is enabled for them, and
        the command called directly, not through the trace wrapper, when not tracing."""
        reader = self._reader  # (STARTTLS keeps the reader, and starts a new session)
        plain = self._plain_methods
        _aiosmtpd_log.info("%r handling connection", getattr(self.session, "peer", None))
        await self.push(f"220 {self.hostname} {self.__ident__}")
        bogus_budget = BOGUS_LIMIT
        while self.transport is not None:
            try:
                try:
                    line: bytes = await reader.readuntil()
                except asyncio.LimitOverrunError as error:
                    # Line too long: read to its end, then answer 500.
                    await reader.read(error.consumed)
                    while True:
                        try:
                            await reader.readuntil()
                            break
                        except asyncio.LimitOverrunError as e:
                            await reader.read(e.consumed)
                    await self.push("500 Command line too long")
                    continue
                session = self.session  # (a new one if STARTTLS completed meanwhile)
                assert session is not None
                if _aiosmtpd_log.isEnabledFor(logging.DEBUG):
                    sanitized_log(_aiosmtpd_log.debug, "_handle_client readline: %r", line)
                line = line.rstrip(b"\r\n")
                if _aiosmtpd_log.isEnabledFor(logging.INFO):
                    sanitized_log(_aiosmtpd_log.info, "%r >> %r", session.peer, line)
                if not line:
                    await self.push("500 Error: bad syntax")
                    continue
                command_bytes, _, arg_bytes = line.partition(b" ")
                try:
                    command = command_bytes.upper().decode(encoding="ascii")
                except UnicodeDecodeError:
                    await self.push("500 Error: bad syntax")
                    continue
                arg: str | None
                if not arg_bytes:
                    arg = None
                else:
                    arg_bytes = arg_bytes.strip()
                    if self.enable_SMTPUTF8:
                        arg = str(arg_bytes, encoding="utf-8", errors="surrogateescape")
                    else:
                        try:
                            arg = str(arg_bytes, encoding="ascii", errors="strict")
                        except UnicodeDecodeError:
                            await self.push("500 Error: strict ASCII mode")
                            continue
                max_sz = (self.command_size_limits[command] if session.extended_smtp
                          else self.command_size_limit)
                if len(line) > max_sz:
                    await self.push("500 Command line too long")
                    continue
                if not self._tls_handshake_okay and command != "QUIT":
                    await self.push("554 Command refused due to lack of security")
                    continue
                if (self.require_starttls and not self._tls_protocol
                        and command not in ALLOWED_BEFORE_STARTTLS):
                    await self.push("530 Must issue a STARTTLS command first")
                    continue
                method = self._smtp_methods.get(command)
                if method is None:
                    _aiosmtpd_log.warning("%r unrecognised: %s", session.peer, command)
                    bogus_budget -= 1
                    if bogus_budget < 1:
                        _aiosmtpd_log.warning("%r too many bogus commands", session.peer)
                        await self.push("502 5.5.1 Too many unrecognized commands, goodbye.")
                        self.transport.close()
                        continue
                    await self.push(f'500 Error: command "{command}" not recognized')
                    continue
                self._reset_timeout()
                self.tracing = self.debug_log()
                if self.tracing is None:
                    await plain[command](self, arg)
                else:
                    await method(arg)
            except (asyncio.CancelledError, ConnectionResetError):
                # the connection was lost (during DATA, or a reply's drain)
                _aiosmtpd_log.info("%r Connection lost during _handle_client()",
                                   getattr(self.session, "peer", None))
                self._writer.close()
                raise
            except Exception as error:
                status = None
                try:
                    status = await self.handle_exception(error)
                except Exception as inner_error:
                    try:
                        _aiosmtpd_log.exception("%r Exception in handle_exception()",
                                                getattr(self.session, "peer", None))
                        status = (f"500 Error: ({inner_error.__class__.__name__}) "
                                  f"{inner_error}")
                    except Exception:
                        status = "500 Error: Cannot describe error"
                finally:
                    if isinstance(error, TLSSetupException):
                        self.transport.close()
                        self.connection_lost(error)
                    else:
                        await self.push(status)  # type: ignore[type-var]

    def _set_post_data_state(self) -> None:
        super()._set_post_data_state()  # type: ignore[no-untyped-call]
        self.transaction_reset()

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        self.command_size_limits.pop("MAIL", None)  # SIZE/SMTPUTF8 are added afresh
        await super().smtp_EHLO(hostname)

    def _reset_timeout(self, duration: float | None = None) -> None:
        loop = self.loop
        self._deadline = loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = loop.call_at(self._deadline, self._timeout_check)

    def _timeout_check(self) -> None:
        now = self.loop.time()
        if self.busy or now < self._deadline:
            when = now + self._timeout_duration if self.busy else self._deadline
            self._timeout_handle = self.loop.call_at(when, self._timeout_check)
            return
        self._timeout_cb()  # type: ignore[no-untyped-call]

    def data_received(self, data: bytes) -> None:
        if self.in_data:  # the client is sending: that is activity
            self._deadline = self.loop.time() + self._timeout_duration
        super().data_received(data)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        m = _PLAIN_PATH.match(arg)
        if m is not None and not self.local_part_limit:
            return m.group(1), m.group(2)
        return super()._getaddr(arg)


def _junk(verb: str, usage: str) -> Callable[[Any, str], Awaitable[None]]:
    """An ``smtp_<verb>`` command of the adapter that counts as a junk command first."""
    command = getattr(AiosmtpdAdapter, f"smtp_{verb}")

    @syntax(usage)
    async def counted(self: FilterSMTP, arg: str) -> None:
        if not await self._junk_command():
            await command(self, arg)

    counted.__name__ = f"smtp_{verb}"
    return counted


class FilterSMTP(AiosmtpdAdapter):
    """The filter's server session: DATA streamed into a Spool, XFORWARD/XCLIENT from trusted
    clients, a connection limit and per-session limits (recipients, junk commands, errors).

    Command lines are held to 512 bytes (MAIL: 548 with SIZE and SMTPUTF8) by aiosmtpd, DATA
    lines to ``max_line_length``. Limits are read from the listener's current settings
    (:attr:`SMTPListener.current`) when they are checked, so they follow a reload.
    """

    def __init__(self, handler: FilterHandler, listener: SMTPListener, **kw: Any) -> None:
        self.listener = listener
        self.filter = handler
        self._junk = 0  # junk commands since the last message
        self._errors = 0  # error replies since the last message
        self._overshoot = 0  # RCPTs refused for the recipient limit in this transaction
        self._count_errors = True
        self._warned = False
        super().__init__(handler, **kw)

    def trace_log(self) -> ScanLog | None:
        return self.listener.gateway.log

    def trace_fields(self) -> dict[str, Any]:
        return {"frontend": "smtp", "listener": self.listener.name,
                "session": self.filter.session_id, "client": peer_addr(self.session)}

    # connection ------------------------------------------------------------------------------
    async def admit(self) -> bool:
        listener = self.listener
        if listener.active >= listener.current.max_connections:
            await self.push(REPLY_TOO_MANY)
            return False
        listener.active += 1
        listener.sessions.add(self)
        return True

    def session_closed(self) -> None:
        listener = self.listener
        listener.active -= 1
        listener.sessions.discard(self)
        self.filter.close()

    def transaction_reset(self) -> None:
        self._overshoot = 0

    # per-session limits ------------------------------------------------------------------------
    async def push(self, status: AnyStr) -> None:
        """Every reply; error replies to commands are counted (``max_errors``)."""
        first = status[:1]
        if first not in ("4", "5", b"4", b"5"):  # the adapter's push, one coroutine less
            if self.write_reply(status):
                await self._writer.drain()
            return
        if self._count_errors and status[:3] not in ("421", b"421"):
            self._errors += 1
            if self._errors > self.listener.current.max_errors:
                log.warning("%s: %s: too many errors, closing", self.listener.name,
                            peer_addr(self.session))
                await self._hangup(REPLY_TOO_MANY_ERRORS)
                return
        await super().push(status)

    async def _hangup(self, reply: str) -> None:
        await AiosmtpdAdapter.push(self, reply)
        if self.transport is not None:
            self.transport.close()

    async def _junk_command(self) -> bool:
        """Count a command that does not move a message forward; True: the session is over."""
        self._junk += 1
        if self._junk <= self.listener.current.max_junk_commands:
            return False
        log.warning("%s: %s: too many commands without a message, closing",
                    self.listener.name, peer_addr(self.session))
        await self._hangup(REPLY_TOO_MANY_COMMANDS)
        return True

    def _refused(self, command: str, key: str) -> None:
        """Log an unauthorised XFORWARD/XCLIENT once per session (a misconfigured upstream
        shows up; a client repeating it does not flood the log)."""
        if not self._warned:
            self._warned = True
            log.warning("%s: %s refused from %s (not in %s)", self.listener.name,
                        command, peer_addr(self.session), key)

    # commands that do not move a message forward: counted (max_junk_commands)
    smtp_HELO = _junk("HELO", "HELO hostname")
    smtp_EHLO = _junk("EHLO", "EHLO hostname")
    smtp_NOOP = _junk("NOOP", "NOOP [ignored]")
    smtp_RSET = _junk("RSET", "RSET")
    smtp_VRFY = _junk("VRFY", "VRFY <address>")
    smtp_HELP = _junk("HELP", "HELP [command]")

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        envelope = self.envelope
        limit = self.listener.current.max_recipients
        if envelope is not None and envelope.mail_from and len(envelope.rcpt_tos) >= limit:
            # RFC 5321 4.5.3.1.10: 452, the client sends the rest in another transaction.
            # Pipelining clients may send many more: those are free up to as many again.
            self._overshoot += 1
            if self._overshoot > limit:
                await self.push(REPLY_TOO_MANY_RCPTS)
            else:
                await AiosmtpdAdapter.push(self, REPLY_TOO_MANY_RCPTS)
            return
        await super().smtp_RCPT(arg)

    # XFORWARD / XCLIENT ----------------------------------------------------------------------
    async def _may(self, command: str, key: str) -> bool:
        """The checks XFORWARD and XCLIENT share: junk count, allow-list, no transaction."""
        if await self._junk_command():
            return False
        if not trusted(peer_addr(self.session), getattr(self.listener.current, key)):
            self._refused(command, key)
            await self.push(REPLY_NOT_AUTHORIZED)
            return False
        assert self.envelope is not None
        if self.envelope.mail_from:
            await self.push(REPLY_IN_TRANSACTION)
            return False
        return True

    async def smtp_XFORWARD(self, arg: str | None) -> None:
        """XFORWARD (Postfix): a trusted upstream MTA tells us who its client was."""
        if not self.listener.current.xforward:
            if not await self._junk_command():
                await self.push('502 5.5.1 Error: command "XFORWARD" not implemented')
            return
        if not await self._may("XFORWARD", "xforward_hosts"):
            return
        try:
            self.filter.xforward.update(parse_xattrs(arg or ""))
        except ValueError as exc:
            await self.push(f"501 5.5.4 Syntax: XFORWARD attribute=value... ({exc})")
            return
        await self.push("250 2.0.0 Ok")

    async def smtp_XCLIENT(self, arg: str | None) -> None:
        """XCLIENT (Postfix): a trusted proxy replaces the client for the rest of the
        session; answered with a new greeting, after which the client says EHLO again."""
        if not await self._may("XCLIENT", "xclient_hosts"):
            return
        assert self.session is not None
        try:
            attrs = parse_xattrs(arg or "", XCLIENT_ATTRS)
        except ValueError as exc:
            await self.push(f"501 5.5.4 Syntax: XCLIENT attribute=value... ({exc})")
            return
        self.filter.xclient.update(attrs)
        self.filter.xforward = {}
        await self.filter.abort()
        self.start_over()
        self.session.host_name = None
        self.session.extended_smtp = False
        await self.push(f"220 {self.hostname} {self.ident}")

    # DATA --------------------------------------------------------------------------------------
    async def smtp_DATA(self, arg: str | None) -> None:
        """Read DATA into a Spool, then answer only once the outcome is final."""
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        settings = self.listener.current
        receiver = DataReceiver(max_size=settings.max_message_size,
                                max_line_length=settings.max_line_length,
                                bare_lf=settings.bare_lf)
        spool = self.listener.gateway.new_spool()
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            self.in_data = True
            spooled = await self._receive(receiver, spool)
            if spooled is None:
                return  # client went away mid-DATA: nothing is relayed
            self.in_data = False
            self.reset_idle_timer()
            self._junk = self._errors = 0  # a message was transferred: the limits start over
            problem = receiver.problem
            if problem is not None or not spooled:
                await self.filter.abort()
                self.end_transaction()
                await self._data_reply(problem.reply if problem is not None
                                       else REPLY_SPOOL_FAILED)
                return
            await self._data_reply(await self._deliver(spool))
        finally:
            self.in_data = False
            spool.close()

    async def _receive(self, receiver: DataReceiver, spool: Any) -> bool | None:
        """Read the data into ``spool``: True, False (the spool failed: read to the end
        anyway), None (the client went away)."""
        spooled = True
        reader = self.reader
        while not receiver.done:
            # up to the rest of the end-of-data marker: never past it, so pipelined
            # commands after the data stay in the reader
            sep = receiver.separator
            try:
                if sep is None:
                    chunk = await reader.readexactly(1)
                else:
                    chunk = await reader.readuntil(sep)
            except asyncio.LimitOverrunError as exc:
                # no marker within the limit: take what cannot be part of one
                chunk = await reader.read(exc.consumed)
            except asyncio.IncompleteReadError:
                return None
            content = receiver.feed(chunk)
            if content and spooled:
                try:
                    spool.write(content)
                except SpoolError as exc:
                    log.error("%s: %s", self.listener.name, exc)
                    spooled = False
        return spooled

    async def _deliver(self, spool: Any) -> str:
        """Scan, decide, relay (scanning and relaying have their own timeouts: the idle
        timer must not cut the connection while the client waits for the answer)."""
        self.busy = True
        self.listener.processing += 1
        try:
            assert self.envelope is not None
            reply = await self.filter.deliver(self.session, self.envelope, spool)
        except Exception:
            log.exception("%s: delivery failed", self.listener.name)
            await self.filter.abort()
            reply = REPLY_INTERNAL
        finally:
            self.listener.processing -= 1
            self.busy = False
            self.reset_idle_timer()
        self.end_transaction()
        return reply

    async def _data_reply(self, reply: str) -> None:
        """The answer to a transferred message: never counted as a command error."""
        self._count_errors = False
        try:
            await self.push(reply)
        finally:
            self._count_errors = True


__all__ = ["AiosmtpdAdapter", "FilterSMTP", "peer_addr", "trusted"]
