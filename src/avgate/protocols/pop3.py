r"""Sans-IO POP3 codec for a proxy: client commands and server responses (no asyncio, no sockets).

RFC 1939 (POP3), RFC 2449 (CAPA, response codes), RFC 2595 (STLS), RFC 5034 (SASL AUTH).
Used by :mod:`avgate.frontends.pop3`; bytes go in, events come out, and the encoders give the
bytes to send.

Client side (:class:`CommandReader`)
    one command per line: ``VERB[ args]CRLF`` (a bare LF is accepted and sent on as CRLF),
    at most ``max_line`` bytes; during a SASL exchange (``AUTH mech``) each line is the
    client's base64 answer (:class:`SaslLine`), not a command. A line with NUL or a bare CR
    in it, or a verb that is not 1-16 letters/digits, is refused
    (:class:`Pop3ProtocolError`): such a line would be read differently by the server.

Server side (:class:`ResponseReader`)
    before each response the caller says what to expect (:func:`response_kind`): a status
    line only (``SINGLE``), a status line and, after ``+OK``, a multi-line body ending with
    ``CRLF.CRLF`` (``MULTI``), or SASL continuations (``+ base64``) until ``+OK``/``-ERR``
    (``SASL``). The body comes out dot-unstuffed in :class:`Data` events of any size (a line
    of the body may be longer than any buffer: nothing waits for its end) and ends with
    :class:`EndOfData`. A line that is ``.`` alone, with CRLF or with a bare LF, ends the
    body (what Python's poplib and most clients accept), so what the proxy scans is what the
    client would read.

Encoding (:class:`DotStuffer`)
    the unstuffed body back to the wire: every line starting with ``.`` gets one more, and
    the terminator follows. A body received from a conforming server comes out byte-identical.

Anything a peer sends that cannot be read (an over-long status line, a status that is
neither ``+OK`` nor ``-ERR``) raises :class:`Pop3ProtocolError`; the codec never buffers
more than ``max_line`` bytes of an unfinished line.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Final

from ..errors import ProtocolError
from . import NEED_DATA as NEED_DATA  # re-exported: callers use <codec>.NEED_DATA
from . import NeedData

__all__ = [
    "DEFAULT_MAX_LINE", "DEFAULT_MAX_SASL_LINE", "NEED_DATA", "Command", "CommandReader",
    "ConnectionClosed", "Continuation", "Data", "DotStuffer", "EndOfData", "Kind",
    "Pop3ProtocolError", "ResponseReader", "SaslLine", "StatusLine", "capability_names",
    "filter_capabilities", "response_kind", "status_line", "stuff",
]

#: RFC 2449: commands are at most 255 octets, responses 512; we allow some slack
DEFAULT_MAX_LINE: Final = 4096
#: a SASL answer (GSSAPI tickets are several KiB of base64)
DEFAULT_MAX_SASL_LINE: Final = 64 * 1024
TERMINATOR: Final = b".\r\n"
_VERB = re.compile(rb"[A-Za-z0-9]{1,16}")


class Pop3ProtocolError(ProtocolError):
    """A peer broke POP3; ``reply_hint`` is the ``-ERR`` line to send the client."""

    def __init__(self, message: str, reply_hint: str = "-ERR Protocol error") -> None:
        super().__init__(message, reply_hint)




# -- events ----------------------------------------------------------------------------------
#: commands whose arguments are secrets: never in a repr (and so never in a log)
SECRET_VERBS: Final = frozenset({"PASS", "APOP", "AUTH", "USER"})


@dataclass(frozen=True, slots=True)
class Command:
    """One client command; ``line`` is what to send to the server (ends in CRLF)."""

    verb: str  # upper case
    args: bytes = field(repr=False)
    line: bytes = field(repr=False)

    def __repr__(self) -> str:
        shown = "<hidden>" if self.verb in SECRET_VERBS else self.args.decode("ascii", "replace")
        return f"Command({self.verb!r}, {shown!r})"

    @property
    def arguments(self) -> list[str]:
        """The arguments split on spaces (latin-1, so every byte survives)."""
        return self.args.decode("latin-1").split()


@dataclass(frozen=True, slots=True)
class SaslLine:
    """The client's answer in a SASL exchange (a secret: never shown)."""

    line: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class StatusLine:
    """``+OK text`` or ``-ERR text``; ``line`` is the whole line as received."""

    ok: bool
    text: bytes
    line: bytes


@dataclass(frozen=True, slots=True)
class Continuation:
    """A SASL server challenge (``+ base64``)."""

    line: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Data:
    """A piece of a multi-line body, dot-unstuffed."""

    data: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"Data(<{len(self.data)} bytes>)"


@dataclass(frozen=True, slots=True)
class EndOfData:
    """The multi-line body ended (its terminator line was read)."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the connection; ``partial`` bytes of an unfinished line were lost."""

    partial: int = 0


ClientEvent = Command | SaslLine | ConnectionClosed | NeedData
ServerEvent = StatusLine | Continuation | Data | EndOfData | ConnectionClosed | NeedData


class Kind(enum.Enum):
    """What a response looks like."""

    SINGLE = "single"  # one status line
    MULTI = "multi"  # a status line and, after +OK, a dot-terminated body
    SASL = "sasl"  # "+ challenge" lines (the exchange goes on), then +OK/-ERR


def response_kind(command: Command) -> Kind | None:
    """The shape of the server's response to ``command``; None for a command this codec
    does not know (a proxy cannot frame its response, so it must not pass it on)."""
    verb, has_args = command.verb, bool(command.args.strip())
    if verb in ("USER", "PASS", "APOP", "QUIT", "STAT", "DELE", "NOOP", "RSET", "STLS",
                "UTF8"):
        return Kind.SINGLE
    if verb in ("LIST", "UIDL", "LANG"):
        return Kind.SINGLE if has_args else Kind.MULTI
    if verb in ("RETR", "TOP", "CAPA"):
        return Kind.MULTI
    if verb == "AUTH":
        return Kind.SASL if has_args else Kind.MULTI  # bare AUTH lists the mechanisms
    return None


# -- client side -----------------------------------------------------------------------------
class _LineBuffer:
    """Bytes in, complete lines out; an unfinished line longer than the limit is an error."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._closed = False
        self._searched = 0  # bytes at the front known to hold no newline

    def feed(self, data: bytes) -> None:
        if not data:
            self._closed = True
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def line(self, limit: int, what: str) -> bytes | ConnectionClosed | None:
        nl = self._buf.find(b"\n", self._searched, limit + 1)
        if nl < 0:
            self._searched = min(len(self._buf), limit + 1)  # a line sent byte by byte
            # is searched once, not once per byte
            if len(self._buf) > limit:
                raise Pop3ProtocolError(f"{what} longer than {limit} bytes",
                                        "-ERR Line too long")
            if self._closed:
                return ConnectionClosed(len(self._buf))
            return None
        line = bytes(self._buf[:nl + 1])
        del self._buf[:nl + 1]
        self._searched = 0
        return line

    @property
    def closed(self) -> bool:
        return self._closed

    def unread(self, data: bytes) -> None:
        """Put ``data`` back in front of the buffer."""
        if data:
            self._buf[:0] = data
            self._searched = 0

    def take(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        self._searched = 0
        return data


def _strip_eol(line: bytes) -> bytes:
    return line[:-2] if line.endswith(b"\r\n") else line[:-1]


class CommandReader:
    """Client → proxy: commands (or SASL answers while :attr:`sasl` is set)."""

    def __init__(self, max_line: int = DEFAULT_MAX_LINE,
                 max_sasl_line: int = DEFAULT_MAX_SASL_LINE) -> None:
        self.max_line = max_line
        self.max_sasl_line = max_sasl_line
        #: set by the proxy while a SASL exchange runs: lines are answers, not commands
        self.sasl = False
        self._lines = _LineBuffer()

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` means it closed the connection."""
        self._lines.feed(data)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as an event (STLS needs this to be 0)."""
        return self._lines.buffered

    def next_event(self) -> ClientEvent:
        limit = self.max_sasl_line if self.sasl else self.max_line
        line = self._lines.line(limit, "SASL answer" if self.sasl else "command line")
        if line is None:
            return NEED_DATA
        if isinstance(line, ConnectionClosed):
            return line
        text = _strip_eol(line)
        if b"\0" in text or b"\r" in text:
            raise Pop3ProtocolError("NUL or bare CR in a command line",
                                    "-ERR Invalid characters in command")
        if self.sasl:
            return SaslLine(text + b"\r\n")
        verb, _, args = text.partition(b" ")
        if not _VERB.fullmatch(verb):
            raise Pop3ProtocolError(f"not a POP3 command: {text[:40]!r}",
                                    "-ERR Unknown command")
        return Command(verb.decode("ascii").upper(), args, text + b"\r\n")


def command_line(verb: str, *args: str) -> bytes:
    """A command the proxy sends itself (``command_line("STLS")``)."""
    return " ".join((verb, *args)).encode("ascii") + b"\r\n"


# -- server side -----------------------------------------------------------------------------
class ResponseReader:
    """Server → proxy: status lines, SASL challenges and unstuffed multi-line bodies."""

    def __init__(self, max_line: int = DEFAULT_MAX_LINE,
                 max_sasl_line: int = DEFAULT_MAX_SASL_LINE) -> None:
        self.max_line = max_line
        self.max_sasl_line = max_sasl_line
        self._lines = _LineBuffer()
        self._kind: Kind | None = Kind.SINGLE  # the greeting
        self._in_body = False
        self._line_start = True
        self._end_pending = False

    def expect(self, kind: Kind) -> None:
        """The next response is of ``kind`` (call before sending the command)."""
        if not self.idle:
            raise RuntimeError("the previous response is not finished")
        self._kind = kind

    @property
    def idle(self) -> bool:
        """No response is expected or in progress."""
        return self._kind is None and not self._in_body and not self._end_pending

    @property
    def buffered(self) -> int:
        return self._lines.buffered

    def receive_data(self, data: bytes) -> None:
        """Bytes from the server; ``b""`` means it closed the connection."""
        self._lines.feed(data)

    def next_event(self) -> ServerEvent:
        if self._in_body or self._end_pending:
            return self._body()
        if self._kind is None:
            if self._lines.buffered:
                raise Pop3ProtocolError("the server sent data nobody asked for",
                                        "-ERR Server protocol error")
            closed = self._lines.line(self.max_line, "status line")
            return closed if isinstance(closed, ConnectionClosed) else NEED_DATA
        sasl = self._kind is Kind.SASL
        line = self._lines.line(self.max_sasl_line if sasl else self.max_line, "status line")
        if line is None:
            return NEED_DATA
        if isinstance(line, ConnectionClosed):
            return line
        text = _strip_eol(line)
        if sasl and (text == b"+" or text.startswith(b"+ ")):
            return Continuation(text + b"\r\n")
        status = _status(text)
        if status is None:
            raise Pop3ProtocolError(f"not a POP3 status line: {text[:60]!r}",
                                    "-ERR Server protocol error")
        ok, rest = status
        if ok and self._kind is Kind.MULTI:
            self._in_body, self._line_start = True, True
        self._kind = None
        return StatusLine(ok, rest, text + b"\r\n")

    def _body(self) -> ServerEvent:
        if self._end_pending:
            self._end_pending = False
            return EndOfData()
        raw = self._lines.take()
        if not raw:
            return ConnectionClosed() if self._lines.closed else NEED_DATA
        out: list[bytes] = []
        pos, n = 0, len(raw)
        while pos < n:
            if self._line_start and raw[pos] == 0x2E:  # a line starting with "."
                head = raw[pos:pos + 3]
                if head == b".\r\n" or head[:2] == b".\n":
                    self._lines.unread(raw[pos + (3 if head == b".\r\n" else 2):])
                    self._in_body = False
                    self._end_pending = True
                    break
                if head in (b".", b".\r"):  # the end of what we have: cannot decide yet
                    if self._lines.closed:
                        return ConnectionClosed(len(head))
                    self._lines.unread(head)
                    break
                pos += 1  # a stuffed dot: drop it
            self._line_start = False
            nl = raw.find(b"\n.", pos)
            if nl < 0:
                out.append(raw[pos:])
                self._line_start = raw.endswith(b"\n")
                break
            out.append(raw[pos:nl + 1])
            pos = nl + 1
            self._line_start = True
        data = b"".join(out)
        if data:
            return Data(data)
        if self._end_pending:
            self._end_pending = False
            return EndOfData()
        return ConnectionClosed() if self._lines.closed else NEED_DATA


def _status(text: bytes) -> tuple[bool, bytes] | None:
    """``(ok, rest)`` of a status line, None when it is neither +OK nor -ERR."""
    for word, ok in ((b"+OK", True), (b"-ERR", False)):
        if text[:len(word)].upper() == word:
            rest = text[len(word):]
            if not rest:
                return ok, b""
            if rest[:1] == b" ":
                return ok, rest[1:]
    return None


def status_line(ok: bool, text: str) -> bytes:
    """A status line of the proxy's own (``-ERR [SYS/TEMP] ...``); CR/LF in ``text`` become
    spaces."""
    clean = re.sub(r"[\r\n\0]+", " ", text)
    return (b"+OK " if ok else b"-ERR ") + clean.encode("utf-8", "replace") + b"\r\n"


# -- encoding --------------------------------------------------------------------------------
class DotStuffer:
    """An unstuffed body → the wire: dots doubled at line starts, then the terminator."""

    def __init__(self) -> None:
        self._line_start = True

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        out = data.replace(b"\n.", b"\n..")
        if self._line_start and data[:1] == b".":
            out = b"." + out
        self._line_start = data.endswith(b"\n")
        return out

    def finish(self) -> bytes:
        """The terminator (after a CRLF if the body did not end with a line end)."""
        tail = TERMINATOR if self._line_start else b"\r\n" + TERMINATOR
        self._line_start = True
        return tail


def stuff(body: bytes) -> bytes:
    """A whole body, stuffed and terminated."""
    s = DotStuffer()
    return s.feed(body) + s.finish()


# -- CAPA ------------------------------------------------------------------------------------
#: capabilities a proxy that frames every response by its command can pass on (RFC 2449,
#: RFC 2595, RFC 6856); anything else names commands we could not frame, and is dropped
PROXIED_CAPABILITIES: Final = frozenset({
    "CAPA", "TOP", "USER", "SASL", "RESP-CODES", "LOGIN-DELAY", "PIPELINING", "EXPIRE", "UIDL",
    "IMPLEMENTATION", "AUTH-RESP-CODE", "UTF8", "LANG",
})


def capability_names(lines: list[bytes]) -> set[str]:
    """The capability names (upper case) of a CAPA body's lines."""
    return {line.split(b" ", 1)[0].strip().decode("latin-1").upper()
            for line in lines if line.strip()}


def filter_capabilities(body: bytes, *, stls: bool) -> bytes:
    """A CAPA body (unstuffed lines) with what the proxy cannot pass on removed, and
    ``STLS`` offered when ``stls`` (the proxy's own TLS towards the client)."""
    kept: list[bytes] = []
    for line in body.splitlines():
        name = line.split(b" ", 1)[0].strip().decode("latin-1").upper()
        if name in PROXIED_CAPABILITIES:
            kept.append(line.rstrip(b"\r") + b"\r\n")
    if stls:
        kept.append(b"STLS\r\n")
    return b"".join(kept)
