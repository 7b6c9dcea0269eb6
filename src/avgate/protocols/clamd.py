r"""Sans-IO codec for the clamd protocol, both directions (no asyncio, no sockets).

Used by the clamd client engine (:mod:`avgate.engines.clamd`) and by avgate's own
clamd-protocol listener. Wire format, as spoken by ClamAV 1.x clamd:

Commands (client → server)
    ``z<COMMAND>[ <args>]\0``   NUL-terminated; replies end with ``\0``   (preferred)
    ``n<COMMAND>[ <args>]\n``   newline-terminated; replies end with ``\n``
    ``<COMMAND>[ <args>]\n``    legacy, no prefix; replies end with ``\n``

    Commands without argument: PING, VERSION, VERSIONCOMMANDS, RELOAD, SHUTDOWN, INSTREAM,
    FILDES, STATS, IDSESSION, END. Commands taking a path (one space, then the rest of the
    line): SCAN, CONTSCAN, MULTISCAN, ALLMATCHSCAN.

INSTREAM body (after ``zINSTREAM\0``)
    repeated ``<uint32 big-endian length><length bytes>`` chunks, ended by a zero-length
    chunk ``\0\0\0\0``. When the running total exceeds the server's StreamMaxLength the server
    replies ``INSTREAM size limit exceeded. ERROR`` and closes the connection, possibly while
    the client is still sending.

Replies (server → client), one per command, with the command's terminator
    ``PONG``                                           PING
    ``ClamAV 1.4.6/27000/Mon Nov 23 09:18:14 2024``    VERSION (program/db version/db date;
                                                       just ``ClamAV 1.4.6`` without an
                                                       official database)
    ``stream: OK``                                     INSTREAM, nothing found
    ``stream: Eicar-Test-Signature FOUND``             INSTREAM, found (``<path>: <name>
                                                       FOUND`` for SCAN; third-party
                                                       signatures carry ``.UNOFFICIAL``)
    ``INSTREAM size limit exceeded. ERROR``            StreamMaxLength exceeded
    ``/path: File path check failure: ... ERROR``      any failure ends in `` ERROR``
    ``UNKNOWN COMMAND``                                unparseable command (then close)

IDSESSION
    ``zIDSESSION\0`` opens a session: the connection stays open, the commands that follow are
    numbered from 1 and each reply is prefixed ``<id>: `` (``1: PONG\0``); ``zEND\0`` ends it.
    clamd answers in the order scans finish, not the order asked. Seen from clamd 1.4.6: an
    idle session is dropped after ReadTimeout with an unnumbered ``COMMAND READ TIMED
    OUT\n``; an ERROR reply may be followed by a second one with the same id, then close
    (``7: PROTOCOL ERROR: ancillary data sent without FILDES. ERROR\0`` ``7: Error
    processing command. ERROR\0``). :class:`ClientSession` is the client side.

FILDES passes a file descriptor as SCM_RIGHTS ancillary data, unix sockets only: the client
sends ``zFILDES\0`` and one dummy byte carrying the descriptor (both may go in one
``sendmsg``); the reply names it ``fd[N]: OK``. clamd reads the file from offset 0. Over TCP,
or without a descriptor: ``No file descriptor received. ERROR``. The server-side parser only
reports the command; the front-end receives the descriptor.

Malformed input never makes the codec buffer without bound: a command longer than
``max_command_length`` or a chunk that would exceed ``stream_max_length`` raises
:class:`ClamdProtocolError` whose ``reply_hint`` is the exact reply clamd would send.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from ..errors import ProtocolError
from . import NEED_DATA as NEED_DATA  # re-exported: callers use <codec>.NEED_DATA
from . import NeedData

# -- shared ------------------------------------------------------------------------------


class Prefix(enum.Enum):
    """Command framing; decides the reply terminator."""

    Z = "z"  # NUL-terminated
    N = "n"  # newline-terminated
    LEGACY = ""  # no prefix, newline-terminated

    @property
    def terminator(self) -> bytes:
        return b"\0" if self is Prefix.Z else b"\n"


#: commands that take no argument
SIMPLE_COMMANDS: Final = frozenset({
    "PING", "VERSION", "VERSIONCOMMANDS", "RELOAD", "SHUTDOWN", "INSTREAM", "FILDES",
    "STATS", "IDSESSION", "END",
})
#: commands followed by one space and a path
PATH_COMMANDS: Final = frozenset({"SCAN", "CONTSCAN", "MULTISCAN", "ALLMATCHSCAN"})

PONG: Final = "PONG"
UNKNOWN_COMMAND: Final = "UNKNOWN COMMAND"
SIZE_LIMIT_EXCEEDED: Final = "INSTREAM size limit exceeded. ERROR"
INSTREAM_END: Final = b"\0\0\0\0"

DEFAULT_MAX_COMMAND_LENGTH: Final = 4096 + 64  # PATH_MAX plus the longest command name
DEFAULT_STREAM_MAX_LENGTH: Final = 25 * 1024 * 1024  # clamd's own default StreamMaxLength
DEFAULT_MAX_REPLY_LENGTH: Final = 64 * 1024  # STATS is the longest reply, a few hundred bytes

_LENGTH = struct.Struct(">I")


class ClamdProtocolError(ProtocolError):
    """The peer broke the protocol; ``reply_hint`` is the exact clamd reply text to send."""

    def __init__(self, message: str, reply_hint: str, prefix: Prefix = Prefix.LEGACY,
                 session_id: int | None = None) -> None:
        super().__init__(message, reply_hint)
        self.prefix = prefix
        self.session_id = session_id

    def reply(self) -> bytes:
        """The reply bytes a server sends before closing the connection."""
        return format_reply(str(self.reply_hint), self.prefix, self.session_id)


# -- client side: encoding ---------------------------------------------------------------


def encode_command(name: str, args: str = "", prefix: Prefix = Prefix.Z) -> bytes:
    """``encode_command("INSTREAM") == b"zINSTREAM\\0"``; args are separated by one space."""
    if name not in SIMPLE_COMMANDS and name not in PATH_COMMANDS:
        raise ValueError(f"unknown clamd command {name!r}")
    terminator = prefix.terminator
    line = f"{name} {args}" if args else name
    raw = line.encode("utf-8", "surrogateescape")
    if terminator in raw or (prefix is not Prefix.Z and b"\0" in raw):
        raise ValueError(f"clamd command {line!r} contains its terminator")
    return prefix.value.encode() + raw + terminator


def chunk_header(length: int) -> bytes:
    """The 4-byte big-endian length that precedes an INSTREAM chunk."""
    return _LENGTH.pack(length)


def encode_chunk(data: bytes | bytearray | memoryview) -> bytes:
    """One INSTREAM chunk (header + data). An empty chunk would end the stream: refused."""
    if not data:
        raise ValueError("an empty INSTREAM chunk ends the stream; use INSTREAM_END")
    return _LENGTH.pack(len(data)) + data


# -- client side: replies ----------------------------------------------------------------


class ReplyKind(enum.Enum):
    OK = "ok"  # "<path>: OK"
    FOUND = "found"  # "<path>: <name> FOUND"
    ERROR = "error"  # "... ERROR"
    PONG = "pong"
    VERSION = "version"  # "ClamAV ..."
    OTHER = "other"  # anything else (STATS body, UNKNOWN COMMAND, garbage)


@dataclass(frozen=True, slots=True)
class Reply:
    """One parsed reply line."""

    kind: ReplyKind
    text: str  # the reply without terminator and session id
    path: str = ""  # "stream" for INSTREAM
    virus: str = ""  # FOUND only
    message: str = ""  # ERROR only: the text before " ERROR" (after "<path>: " if any)
    session_id: int | None = None

    @property
    def size_limit_exceeded(self) -> bool:
        return self.kind is ReplyKind.ERROR and self.text == SIZE_LIMIT_EXCEEDED


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """A parsed VERSION reply: ``ClamAV 1.4.6/27000/Mon Nov 23 09:18:14 2024``."""

    raw: str
    program: str  # "ClamAV 1.4.6"
    engine_version: str  # "1.4.6"
    db_version: int | None = None  # 27000; None without an official database
    db_date: str = ""

    @property
    def db(self) -> str:
        """The database part (``27000/Mon Nov ...``), or the whole string without one."""
        if self.db_version is None:
            return self.raw
        return f"{self.db_version}/{self.db_date}" if self.db_date else str(self.db_version)


def parse_version(text: str) -> VersionInfo:
    """Parse a VERSION reply; raises ValueError when it is not one."""
    text = text.strip()
    program, sep, rest = text.partition("/")
    name, _, engine_version = program.partition(" ")
    if not name or not engine_version or " " in engine_version:
        raise ValueError(f"not a clamd VERSION reply: {text[:80]!r}")
    if not sep:
        return VersionInfo(text, program, engine_version)
    db, _, date = rest.partition("/")
    try:
        db_version = int(db)
    except ValueError:
        raise ValueError(f"bad database version in VERSION reply: {text[:80]!r}") from None
    return VersionInfo(text, program, engine_version, db_version, date)


def parse_reply(raw: bytes | str, *, session: bool = False) -> Reply:
    """Parse one reply (terminator optional). ``session=True`` strips the ``<id>: `` prefix.

    ``<path>: <name> FOUND`` is split from the right because a path may contain ``": "``
    while signature names never contain spaces.
    """
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = text.rstrip("\0\n")
    session_id: int | None = None
    if session:
        head, sep, rest = text.partition(": ")
        if sep and head.isascii() and head.isdigit():
            session_id, text = int(head), rest
    return _classify(text, session_id)


def _classify(text: str, session_id: int | None) -> Reply:
    """A reply's text (terminator and session id removed) into a :class:`Reply`."""
    if text == PONG:
        return Reply(ReplyKind.PONG, text, session_id=session_id)
    if text.endswith(" FOUND"):
        path, sep, virus = text[: -len(" FOUND")].rpartition(": ")
        if sep and virus and " " not in virus:
            return Reply(ReplyKind.FOUND, text, path=path, virus=virus, session_id=session_id)
    if text.endswith(": OK"):
        return Reply(ReplyKind.OK, text, path=text[: -len(": OK")], session_id=session_id)
    if text.endswith(" ERROR") or text == "ERROR":
        body = text[: -len("ERROR")].rstrip()
        path, sep, message = body.partition(": ")
        if not sep:
            path, message = "", body
        return Reply(ReplyKind.ERROR, text, path=path, message=message, session_id=session_id)
    if text.startswith("ClamAV "):
        return Reply(ReplyKind.VERSION, text, session_id=session_id)
    return Reply(ReplyKind.OTHER, text, session_id=session_id)


class ReplyReader:
    """Splits a byte stream into replies for one prefix; bounded by ``max_reply_length``."""

    def __init__(self, prefix: Prefix = Prefix.Z,
                 max_reply_length: int = DEFAULT_MAX_REPLY_LENGTH) -> None:
        self._terminator = prefix.terminator
        self._max = max_reply_length
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        """Add received bytes."""
        self._buf += data

    def next_reply(self) -> bytes | None:
        """The next complete reply without its terminator, or None when more data is needed."""
        end = self._buf.find(self._terminator)
        if end < 0:
            if len(self._buf) > self._max:
                raise ClamdProtocolError(
                    f"clamd reply longer than {self._max} bytes without terminator", "")
            return None
        reply = bytes(self._buf[:end])
        del self._buf[: end + 1]
        return reply

    @property
    def pending(self) -> bytes:
        """Bytes received but not yet part of a complete reply."""
        return bytes(self._buf)


# -- client side: IDSESSION --------------------------------------------------------------

#: FILDES with its one dummy byte; the descriptor travels as SCM_RIGHTS with these bytes
FILDES_WITH_DUMMY: Final = b"zFILDES\0\0"
IDSESSION: Final = b"zIDSESSION\0"
END: Final = b"zEND\0"
#: argument-less commands a client may send inside IDSESSION (clamd also takes SCAN there,
#: not CONTSCAN, MULTISCAN, ...)
SESSION_COMMANDS: Final = frozenset({"PING", "VERSION", "VERSIONCOMMANDS", "INSTREAM",
                                     "FILDES", "STATS"})
_MAX_SESSION_ID: Final = 2**32 - 1  # clamd prints the id with %u


def parse_session_reply(raw: bytes | str) -> Reply:
    """Parse one reply read inside IDSESSION, which must carry its ``<id>: `` prefix.

    Stricter than ``parse_reply(..., session=True)``: a reply without a valid id (``COMMAND
    READ TIMED OUT`` when clamd drops an idle session, garbage) raises ClamdProtocolError,
    because it cannot be matched to a request.
    """
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = text.rstrip("\0\n")
    head, sep, rest = text.partition(": ")
    if not sep or not head.isascii() or not head.isdigit() or head.startswith("0") \
            or len(head) > 10:
        raise ClamdProtocolError(f"{text[:80]!r} without a request id", "")
    session_id = int(head)
    if session_id > _MAX_SESSION_ID:
        raise ClamdProtocolError(f"{text[:80]!r} without a request id", "")
    return _classify(rest, session_id)


#: the bytes of each session command, made once
_SESSION_REQUESTS: Final = {
    name: FILDES_WITH_DUMMY if name == "FILDES" else encode_command(name)
    for name in SESSION_COMMANDS}


class ClientSession:
    """Client side of one IDSESSION connection, sans-IO: numbers the requests, matches each
    reply to its request.

    ``open()`` is the first thing to send; ``request(name)`` numbers a command (clamd counts
    from 1, every command after IDSESSION); feed received bytes to ``receive_data`` and take
    replies with ``next_reply()`` (None: more data needed). Anything that cannot be matched to
    an outstanding request — no id, an id not asked for or already answered, garbage, an
    over-long reply — raises ClamdProtocolError and marks the session ``broken``. An ERROR
    reply marks it ``broken`` too: clamd may close the session after one, or send a second
    reply with the same id (``PROTOCOL ERROR ...`` then ``Error processing command``). A
    broken session must be closed, never used again.
    """

    def __init__(self, max_reply_length: int = DEFAULT_MAX_REPLY_LENGTH) -> None:
        self._reader = ReplyReader(Prefix.Z, max_reply_length)
        self._next_id = 1
        self._outstanding: set[int] = set()
        self.opened = False
        self.ended = False
        self.broken = False

    @property
    def outstanding(self) -> frozenset[int]:
        """Ids of requests not answered yet."""
        return frozenset(self._outstanding)

    @property
    def idle(self) -> bool:
        """Open, not broken, nothing outstanding and nothing unread: safe to reuse."""
        return (self.opened and not self.ended and not self.broken and not self._outstanding
                and not self._reader.pending)

    def open(self) -> bytes:
        if self.opened:
            raise RuntimeError("IDSESSION already sent")
        self.opened = True
        return IDSESSION

    def request(self, name: str) -> tuple[int, bytes]:
        """Number one command: (its id, the bytes to send). INSTREAM chunks and the FILDES
        dummy byte follow the command; they are not numbered."""
        if not self.opened or self.ended or self.broken:
            raise RuntimeError("session not usable")
        if name not in SESSION_COMMANDS:
            raise ValueError(f"{name} is not allowed inside IDSESSION")
        request_id = self._next_id
        if request_id > _MAX_SESSION_ID:
            raise RuntimeError("session ids exhausted")
        self._next_id += 1
        self._outstanding.add(request_id)
        return request_id, _SESSION_REQUESTS[name]

    def end(self) -> bytes:
        """``zEND``: clamd answers nothing and closes when the outstanding requests are done."""
        self.ended = True
        return END

    def receive_data(self, data: bytes) -> None:
        self._reader.feed(data)

    def next_reply(self) -> Reply | None:
        """The next reply (``session_id`` set to the request it answers), or None."""
        try:
            raw = self._reader.next_reply()
            if raw is None:
                return None
            reply = parse_session_reply(raw)
            assert reply.session_id is not None
            if reply.session_id not in self._outstanding:
                raise ClamdProtocolError(
                    f"{reply.text[:80]!r} for request {reply.session_id}, which is not "
                    f"outstanding (waiting for {sorted(self._outstanding)[:5]})", "")
        except ClamdProtocolError:
            self.broken = True
            raise
        self._outstanding.discard(reply.session_id)
        if reply.kind is ReplyKind.ERROR:
            self.broken = True
        return reply

    @property
    def pending(self) -> bytes:
        """Bytes received but not yet part of a complete reply."""
        return self._reader.pending


# -- server side: replies ----------------------------------------------------------------


def format_reply(text: str, prefix: Prefix, session_id: int | None = None) -> bytes:
    """``format_reply("PONG", Prefix.Z, 1) == b"1: PONG\\0"``."""
    if session_id is not None:
        text = f"{session_id}: {text}"
    return text.encode("utf-8", "surrogateescape") + prefix.terminator


def ok_reply(path: str = "stream") -> str:
    return f"{path}: OK"


def found_reply(virus: str, path: str = "stream") -> str:
    if not virus or any(c.isspace() for c in virus):
        # a name with spaces could not be parsed back by clients that split from the right
        raise ValueError(f"invalid signature name {virus!r}")
    return f"{path}: {virus} FOUND"


def error_reply(message: str, path: str = "") -> str:
    return f"{path}: {message} ERROR" if path else f"{message} ERROR"


# -- server side: command parser ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """A complete command. ``session_id`` is set inside IDSESSION (numbered from 1)."""

    name: str
    prefix: Prefix
    args: str = ""
    session_id: int | None = None

    def reply(self, text: str) -> bytes:
        """Frame a reply to this command (terminator and session id)."""
        return format_reply(text, self.prefix, self.session_id)


@dataclass(frozen=True, slots=True)
class InstreamChunk:
    """Stream data, delivered as it arrives (a chunk on the wire may come in pieces)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class InstreamEnd:
    """The zero-length chunk: the stream is complete. ``command`` is the INSTREAM command."""

    command: Command
    total: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The client closed its side. ``clean`` is False when it stopped mid-command/stream."""

    clean: bool



Event = Command | InstreamChunk | InstreamEnd | ConnectionClosed


class _State(enum.Enum):
    COMMAND = "command"
    CHUNK_HEADER = "chunk-header"
    CHUNK_DATA = "chunk-data"
    CLOSED = "closed"
    ERROR = "error"


class ServerParser:
    """Server side: ``receive_data(bytes)``, then ``next_event()`` until NEED_DATA.

    ``receive_data(b"")`` signals EOF. Outside IDSESSION clamd handles one command per
    connection; the front-end closes after replying unless :attr:`in_session`.
    """

    def __init__(self, *, stream_max_length: int = DEFAULT_STREAM_MAX_LENGTH,
                 max_command_length: int = DEFAULT_MAX_COMMAND_LENGTH) -> None:
        self.stream_max_length = stream_max_length
        self.max_command_length = max_command_length
        self._buf = bytearray()
        self._eof = False
        self._state = _State.COMMAND
        self._session_next: int | None = None  # next id while in IDSESSION
        self._instream: Command | None = None
        self._chunk_left = 0
        self._total = 0

    @property
    def in_session(self) -> bool:
        return self._session_next is not None

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; ``b""`` means the client closed its side."""
        if data:
            if self._eof:
                raise RuntimeError("receive_data after EOF")
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Event | NeedData:
        """The next event, or NEED_DATA. Raises ClamdProtocolError on a protocol violation."""
        if self._state is _State.ERROR:
            raise ClamdProtocolError("parser already failed", UNKNOWN_COMMAND)
        if self._state is _State.CLOSED:
            return NEED_DATA
        try:
            if self._state is _State.COMMAND:
                return self._next_command()
            if self._state is _State.CHUNK_HEADER:
                return self._next_chunk_header()
            return self._next_chunk_data()
        except ClamdProtocolError:
            self._state = _State.ERROR
            self._buf.clear()  # nothing after an error is read
            raise

    # -- states ------------------------------------------------------------------------
    def _closed(self) -> Event | NeedData:
        if not self._eof:
            return NEED_DATA
        clean = self._state is _State.COMMAND and not self._buf
        self._state = _State.CLOSED
        return ConnectionClosed(clean)

    def _next_command(self) -> Event | NeedData:
        if not self._buf:
            return self._closed()
        first = self._buf[0]
        prefix = Prefix.Z if first == 0x7A else Prefix.N if first == 0x6E else Prefix.LEGACY
        end = self._buf.find(prefix.terminator, 0, self.max_command_length + 2)
        if end < 0:
            if len(self._buf) > self.max_command_length + 1:
                raise self._error("command too long", UNKNOWN_COMMAND, prefix)
            return self._closed()
        raw = bytes(self._buf[len(prefix.value):end])
        del self._buf[: end + 1]
        line = raw.decode("utf-8", "surrogateescape")
        if prefix is not Prefix.Z:
            line = line.removesuffix("\r")  # telnet-friendly
        name, sep, args = line.partition(" ")
        if name in SIMPLE_COMMANDS and not sep:
            pass
        elif name in PATH_COMMANDS and sep and args:
            pass
        else:
            raise self._error(f"unknown command {line[:64]!r}", UNKNOWN_COMMAND, prefix)

        session_id = None
        if self._session_next is not None and name != "END":
            if name == "IDSESSION":
                raise self._error("nested IDSESSION", UNKNOWN_COMMAND, prefix)
            session_id = self._session_next
            self._session_next += 1
        command = Command(name, prefix, args, session_id)
        if name == "IDSESSION":
            self._session_next = 1
        elif name == "END":
            self._session_next = None
        elif name == "INSTREAM":
            self._instream = command
            self._total = 0
            self._state = _State.CHUNK_HEADER
        return command

    def _next_chunk_header(self) -> Event | NeedData:
        if len(self._buf) < 4:
            return self._closed()
        (length,) = _LENGTH.unpack_from(self._buf)
        del self._buf[:4]
        assert self._instream is not None
        if length == 0:
            command, self._instream = self._instream, None
            self._state = _State.COMMAND
            return InstreamEnd(command, self._total)
        if self._total + length > self.stream_max_length:
            # checked on the header, before any of the chunk is buffered
            raise self._error(f"stream exceeds {self.stream_max_length} bytes",
                              SIZE_LIMIT_EXCEEDED, self._instream.prefix,
                              self._instream.session_id)
        self._total += length
        self._chunk_left = length
        self._state = _State.CHUNK_DATA
        return self._next_chunk_data()

    def _next_chunk_data(self) -> Event | NeedData:
        if not self._buf:
            return self._closed()
        buf = self._buf
        n = min(self._chunk_left, len(buf))
        if n == len(buf):  # one copy out of the buffer (a slice then bytes() would be two)
            data = bytes(buf)
            buf.clear()
        else:
            with memoryview(buf) as view:
                data = bytes(view[:n])
            del buf[:n]
        self._chunk_left -= n
        if not self._chunk_left:
            self._state = _State.CHUNK_HEADER
        return InstreamChunk(data)

    def _error(self, message: str, reply: str, prefix: Prefix,
               session_id: int | None = None) -> ClamdProtocolError:
        if session_id is None and self._session_next is not None:
            session_id = self._session_next
        return ClamdProtocolError(message, reply, prefix, session_id)
