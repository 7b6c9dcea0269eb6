"""Sans-IO codec for the Sendmail milter protocol (versions 2 to 6), both directions.

No I/O here: feed bytes with ``receive_data`` and pull events with ``next_event`` (``None``
means "need more data"); turn events into bytes with :func:`encode`. :class:`MilterServer`
is the filter side (decodes MTA commands, encodes our responses, remembers what was
negotiated); :class:`MilterClient` is the MTA side (tests, benchmarks).

Packet format (every packet, both directions)::

    uint32 len (network order; counts the command byte and the data) | char cmd | data[len-1]

Strings are NUL-terminated; ``uint32``/``uint16`` are network order. ``len == 0`` and
``len > max_packet`` are protocol errors: the length is checked before a byte of data is
buffered, so a hostile peer cannot make us allocate more than ``max_packet`` per connection.
The default, 256 KiB, is four times libmilter's own default command limit
(``MILTER_MAX_DATA_SIZE`` 65535, what clamav-milter and opendkim accept): the MTA sends the
body in chunks of at most ``MILTER_CHUNK_SIZE`` (65535) bytes, macros and envelope packets
are small, and the largest packet Postfix sends is one header, bounded by its
``header_size_limit`` (102400 bytes by default).

Commands, MTA → filter (``SMFIC_*``)::

    'O' OPTNEG   uint32 version, uint32 actions, uint32 protocol   (what the MTA offers)
    'D' MACRO    char stage (the command code they belong to), then name\\0value\\0 ...
    'C' CONNECT  hostname\\0, char family ('U' unknown: nothing follows; 'L' unix,
                 '4' inet, '6' inet6: uint16 port, address\\0)
    'H' HELO     helo\\0
    'M' MAIL     sender\\0 [esmtp-arg\\0 ...]
    'R' RCPT     recipient\\0 [esmtp-arg\\0 ...]
    'T' DATA     (empty)
    'L' HEADER   name\\0value\\0   (the MTA drops one space after the colon unless
                 SMFIP_HDR_LEADSPC was negotiated; folded values contain "\\n")
    'N' EOH      (empty)
    'B' BODY     raw body chunk (CRLF line ends; Postfix sends at most 65535 bytes)
    'E' BODYEOB  optional last body chunk (libmilter delivers it as BODY, then EOB)
    'A' ABORT    (empty) end this message, keep the connection state
    'Q' QUIT     (empty)
    'K' QUIT_NC  (empty) quit, a new connection (CONNECT ...) follows on this socket
    'U' UNKNOWN  smtp command line\\0

Responses, filter → MTA (``SMFIR_*``)::

    'O' OPTNEG     uint32 version, uint32 actions, uint32 protocol, then optional macro
                   lists: (uint32 stage SMFIM_*, "name name ..."\\0) ...
    'a' ACCEPT  'c' CONTINUE  'r' REJECT  't' TEMPFAIL  'd' DISCARD  'p' PROGRESS
    's' SKIP    '4' SHUTDOWN  'f' CONN_FAIL                        (all without data)
    'y' REPLYCODE  "550 5.7.1 text"\\0  ('%' doubled: the MTA treats it as a format;
                   Postfix insists the enhanced code's class equals the reply's)
    'h' ADDHEADER  name\\0value\\0
    'i' INSHEADER  uint32 index (0 = top), name\\0value\\0
    'm' CHGHEADER  uint32 index (1 = first header of that name), name\\0value\\0
                   (an empty value deletes that header)
    'b' REPLBODY   body chunk (several in a row make up the new body)
    '+' ADDRCPT    recipient\\0         '2' ADDRCPT_PAR  recipient\\0 esmtp-args\\0
    '-' DELRCPT    recipient\\0         'e' CHGFROM      sender\\0 [esmtp-args\\0]
    'q' QUARANTINE reason\\0            (Postfix: put the message on hold)

Modification responses are valid only in reply to BODYEOB, before the final response.
Text is decoded as UTF-8 with ``surrogateescape``, so every byte string round-trips exactly.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, Final, TypeAlias

from ..errors import ProtocolError

# -- constants -------------------------------------------------------------------------------
MILTER_VERSION: Final = 6
#: See the module docstring: above every packet Postfix and Sendmail send by default.
DEFAULT_MAX_PACKET: Final = 256 * 1024
#: Body chunks we send (REPLBODY) are at most this big, like libmilter's MILTER_CHUNK_SIZE.
MAX_BODY_CHUNK: Final = 65535

# actions (SMFIF_*): what the filter may do at end of message
SMFIF_ADDHDRS: Final = 0x01
SMFIF_CHGBODY: Final = 0x02
SMFIF_ADDRCPT: Final = 0x04
SMFIF_DELRCPT: Final = 0x08
SMFIF_CHGHDRS: Final = 0x10
SMFIF_QUARANTINE: Final = 0x20
SMFIF_CHGFROM: Final = 0x40
SMFIF_ADDRCPT_PAR: Final = 0x80
SMFIF_SETSYMLIST: Final = 0x100

# protocol flags (SMFIP_*): events the filter does not want / will not answer
SMFIP_NOCONNECT: Final = 0x01
SMFIP_NOHELO: Final = 0x02
SMFIP_NOMAIL: Final = 0x04
SMFIP_NORCPT: Final = 0x08
SMFIP_NOBODY: Final = 0x10
SMFIP_NOHDRS: Final = 0x20
SMFIP_NOEOH: Final = 0x40
SMFIP_NR_HDR: Final = 0x80
SMFIP_NOUNKNOWN: Final = 0x100
SMFIP_NODATA: Final = 0x200
SMFIP_SKIP: Final = 0x400
SMFIP_RCPT_REJ: Final = 0x800
SMFIP_NR_CONN: Final = 0x1000
SMFIP_NR_HELO: Final = 0x2000
SMFIP_NR_MAIL: Final = 0x4000
SMFIP_NR_RCPT: Final = 0x8000
SMFIP_NR_DATA: Final = 0x10000
SMFIP_NR_UNKN: Final = 0x20000
SMFIP_NR_EOH: Final = 0x40000
SMFIP_NR_BODY: Final = 0x80000
SMFIP_HDR_LEADSPC: Final = 0x100000

# macro stages for the OPTNEG macro lists (SMFIM_*)
SMFIM_CONNECT: Final = 0
SMFIM_HELO: Final = 1
SMFIM_ENVFROM: Final = 2
SMFIM_ENVRCPT: Final = 3
SMFIM_DATA: Final = 4
SMFIM_EOM: Final = 5
SMFIM_EOH: Final = 6

_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_OPTNEG = struct.Struct(">III")


def _err(message: str) -> ProtocolError:
    # A milter has no error reply: the front-end closes the connection and the MTA applies
    # its milter_default_action. The hint says so.
    return ProtocolError(message, reply_hint="close")


def _s(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _cstrings(payload: bytes, what: str) -> list[str]:
    """NUL-terminated strings, decoded; the payload must end in NUL (an unterminated one is
    truncated). Decoded at once, then split: NUL is never part of a UTF-8 sequence, so this
    is the same as decoding each string, with one decode per packet."""
    if payload[-1:] != b"\0":
        raise _err(f"{what}: string not NUL-terminated")
    return payload[:-1].decode("utf-8", "surrogateescape").split("\0")


def _nostr(s: str, what: str) -> bytes:
    b = _b(s)
    if b"\0" in b:
        raise ValueError(f"{what} must not contain NUL")
    return b


# -- events ----------------------------------------------------------------------------------
class Packet:
    """Base of every command and response: ``CODE`` is the one-byte command."""

    __slots__ = ()
    CODE: ClassVar[bytes] = b""

    def payload(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class OptNeg(Packet):
    """Option negotiation; from the MTA it offers, from the filter it chooses.

    ``macros``: (SMFIM_* stage, "space separated macro names") lists the filter asks for
    (only in the filter's reply, and only when the MTA offered SMFIF_SETSYMLIST).
    """

    version: int
    actions: int
    protocol: int
    macros: tuple[tuple[int, str], ...] = ()
    CODE: ClassVar[bytes] = b"O"

    def payload(self) -> bytes:
        out = _OPTNEG.pack(self.version, self.actions, self.protocol)
        for stage, names in self.macros:
            out += _U32.pack(stage) + _nostr(names, "macro list") + b"\0"
        return out


@dataclass(frozen=True, slots=True)
class Macro(Packet):
    """Macro values for the command ``stage`` (b"C", b"H", b"M", b"R", b"T", b"N", b"E"...)."""

    stage: bytes
    macros: tuple[tuple[str, str], ...] = ()
    CODE: ClassVar[bytes] = b"D"

    def payload(self) -> bytes:
        parts = [self.stage]
        for name, value in self.macros:
            parts += [_nostr(name, "macro name"), b"\0", _nostr(value, "macro value"), b"\0"]
        return b"".join(parts)


@dataclass(frozen=True, slots=True)
class Connect(Packet):
    """The SMTP client: host name, family ("U", "L", "4", "6"), port and address."""

    hostname: str
    family: str = "U"
    port: int = 0
    address: str = ""
    CODE: ClassVar[bytes] = b"C"

    def payload(self) -> bytes:
        out = _nostr(self.hostname, "hostname") + b"\0" + self.family.encode("ascii")
        if self.family != "U":
            out += _U16.pack(self.port) + _nostr(self.address, "address") + b"\0"
        return out


@dataclass(frozen=True, slots=True)
class Helo(Packet):
    name: str
    CODE: ClassVar[bytes] = b"H"

    def payload(self) -> bytes:
        return _nostr(self.name, "helo") + b"\0"


def _args_payload(args: tuple[str, ...], what: str) -> bytes:
    if not args:
        raise ValueError(f"{what} needs at least one argument")
    return b"".join(_nostr(a, what) + b"\0" for a in args)


@dataclass(frozen=True, slots=True)
class Mail(Packet):
    """MAIL FROM: ``args[0]`` is the sender (usually in <>), then ESMTP parameters."""

    args: tuple[str, ...]
    CODE: ClassVar[bytes] = b"M"

    @property
    def sender(self) -> str:
        return strip_brackets(self.args[0])

    def payload(self) -> bytes:
        return _args_payload(self.args, "MAIL argument")


@dataclass(frozen=True, slots=True)
class Rcpt(Packet):
    """RCPT TO: ``args[0]`` is the recipient, then ESMTP parameters."""

    args: tuple[str, ...]
    CODE: ClassVar[bytes] = b"R"

    @property
    def recipient(self) -> str:
        return strip_brackets(self.args[0])

    def payload(self) -> bytes:
        return _args_payload(self.args, "RCPT argument")


@dataclass(frozen=True, slots=True)
class Data(Packet):
    CODE: ClassVar[bytes] = b"T"


@dataclass(frozen=True, slots=True)
class Header(Packet):
    """One message header as the MTA sent it (raw bytes: they go straight to the spool)."""

    name: bytes
    value: bytes
    CODE: ClassVar[bytes] = b"L"

    def payload(self) -> bytes:
        if b"\0" in self.name or b"\0" in self.value:
            raise ValueError("header must not contain NUL")
        return self.name + b"\0" + self.value + b"\0"


@dataclass(frozen=True, slots=True)
class EndOfHeaders(Packet):
    CODE: ClassVar[bytes] = b"N"


@dataclass(frozen=True, slots=True)
class Body(Packet):
    chunk: bytes
    CODE: ClassVar[bytes] = b"B"

    def payload(self) -> bytes:
        return self.chunk


@dataclass(frozen=True, slots=True)
class EndOfMessage(Packet):
    """End of body; ``chunk`` is a last piece of body some MTAs send with it."""

    chunk: bytes = b""
    CODE: ClassVar[bytes] = b"E"

    def payload(self) -> bytes:
        return self.chunk


@dataclass(frozen=True, slots=True)
class Abort(Packet):
    CODE: ClassVar[bytes] = b"A"


@dataclass(frozen=True, slots=True)
class Quit(Packet):
    CODE: ClassVar[bytes] = b"Q"


@dataclass(frozen=True, slots=True)
class QuitNewConnection(Packet):
    CODE: ClassVar[bytes] = b"K"


@dataclass(frozen=True, slots=True)
class Unknown(Packet):
    """An SMTP command the MTA did not know."""

    command: str
    CODE: ClassVar[bytes] = b"U"

    def payload(self) -> bytes:
        return _nostr(self.command, "command") + b"\0"


# responses without data
@dataclass(frozen=True, slots=True)
class Accept(Packet):
    CODE: ClassVar[bytes] = b"a"


@dataclass(frozen=True, slots=True)
class Continue(Packet):
    CODE: ClassVar[bytes] = b"c"


@dataclass(frozen=True, slots=True)
class Reject(Packet):
    CODE: ClassVar[bytes] = b"r"


@dataclass(frozen=True, slots=True)
class Tempfail(Packet):
    CODE: ClassVar[bytes] = b"t"


@dataclass(frozen=True, slots=True)
class Discard(Packet):
    CODE: ClassVar[bytes] = b"d"


@dataclass(frozen=True, slots=True)
class Progress(Packet):
    CODE: ClassVar[bytes] = b"p"


@dataclass(frozen=True, slots=True)
class Skip(Packet):
    CODE: ClassVar[bytes] = b"s"


@dataclass(frozen=True, slots=True)
class Shutdown(Packet):
    CODE: ClassVar[bytes] = b"4"


@dataclass(frozen=True, slots=True)
class ConnFail(Packet):
    CODE: ClassVar[bytes] = b"f"


@dataclass(frozen=True, slots=True)
class ReplyCode(Packet):
    """A full SMTP reply, e.g. "550 5.7.1 Virus found". ``%`` is doubled on the wire."""

    reply: str
    CODE: ClassVar[bytes] = b"y"

    def payload(self) -> bytes:
        return _nostr(self.reply, "reply").replace(b"%", b"%%") + b"\0"


@dataclass(frozen=True, slots=True)
class AddHeader(Packet):
    name: str
    value: str
    CODE: ClassVar[bytes] = b"h"

    def payload(self) -> bytes:
        return _nostr(self.name, "header name") + b"\0" + _nostr(self.value, "value") + b"\0"


def _indexed_header(index: int, name: str, value: str) -> bytes:
    """INSHEADER/CHGHEADER payload: index (uint32), name NUL, value NUL."""
    return (_U32.pack(index) + _nostr(name, "header name") + b"\0"
            + _nostr(value, "value") + b"\0")


@dataclass(frozen=True, slots=True)
class InsertHeader(Packet):
    """Insert a header at ``index`` (0 = above every other header)."""

    index: int
    name: str
    value: str
    CODE: ClassVar[bytes] = b"i"

    def payload(self) -> bytes:
        return _indexed_header(self.index, self.name, self.value)


@dataclass(frozen=True, slots=True)
class ChangeHeader(Packet):
    """Change the ``index``-th (1-based) header called ``name``; "" deletes it."""

    index: int
    name: str
    value: str
    CODE: ClassVar[bytes] = b"m"

    def payload(self) -> bytes:
        return _indexed_header(self.index, self.name, self.value)


@dataclass(frozen=True, slots=True)
class ReplaceBody(Packet):
    chunk: bytes
    CODE: ClassVar[bytes] = b"b"

    def payload(self) -> bytes:
        return self.chunk


@dataclass(frozen=True, slots=True)
class AddRecipient(Packet):
    recipient: str
    CODE: ClassVar[bytes] = b"+"

    def payload(self) -> bytes:
        return _nostr(self.recipient, "recipient") + b"\0"


@dataclass(frozen=True, slots=True)
class AddRecipientPar(Packet):
    recipient: str
    args: str = ""
    CODE: ClassVar[bytes] = b"2"

    def payload(self) -> bytes:
        return (_nostr(self.recipient, "recipient") + b"\0" + _nostr(self.args, "args")
                + b"\0")


@dataclass(frozen=True, slots=True)
class DeleteRecipient(Packet):
    recipient: str
    CODE: ClassVar[bytes] = b"-"

    def payload(self) -> bytes:
        return _nostr(self.recipient, "recipient") + b"\0"


@dataclass(frozen=True, slots=True)
class ChangeFrom(Packet):
    sender: str
    args: str = ""
    CODE: ClassVar[bytes] = b"e"

    def payload(self) -> bytes:
        out = _nostr(self.sender, "sender") + b"\0"
        if self.args:
            out += _nostr(self.args, "args") + b"\0"
        return out


@dataclass(frozen=True, slots=True)
class Quarantine(Packet):
    """Ask the MTA to hold the message (Postfix: hold queue) with ``reason``."""

    reason: str
    CODE: ClassVar[bytes] = b"q"

    def payload(self) -> bytes:
        return _nostr(self.reason, "reason") + b"\0"


Command: TypeAlias = (OptNeg | Macro | Connect | Helo | Mail | Rcpt | Data | Header
                      | EndOfHeaders | Body | EndOfMessage | Abort | Quit | QuitNewConnection
                      | Unknown)
Response: TypeAlias = (OptNeg | Accept | Continue | Reject | Tempfail | Discard | Progress
                       | Skip | Shutdown | ConnFail | ReplyCode | AddHeader | InsertHeader
                       | ChangeHeader | ReplaceBody | AddRecipient | AddRecipientPar
                       | DeleteRecipient | ChangeFrom | Quarantine)


def encode(packet: Packet) -> bytes:
    """The wire bytes of one command or response."""
    data = packet.payload()
    return _U32.pack(len(data) + 1) + packet.CODE + data


def encode_all(packets: Iterable[Packet]) -> bytes:
    """Several packets in one buffer (one write, one TCP segment where possible)."""
    return b"".join(encode(p) for p in packets)


def strip_brackets(addr: str) -> str:
    """``<user@example>`` → ``user@example`` (the MTA sends envelope addresses in <>)."""
    if len(addr) >= 2 and addr[0] == "<" and addr[-1] == ">":
        return addr[1:-1]
    return addr


def milter_reply(reply: str, default: str = "550 5.7.1 Message rejected") -> str:
    """An SMTP reply fit for SMFIR_REPLYCODE: one line, 4xx/5xx, with an enhanced status
    code whose class matches the reply code (Postfix rejects the reply otherwise)."""
    reply = " ".join(reply.replace("\r", " ").replace("\n", " ").replace("\0", " ").split())
    if len(reply) < 3 or reply[0] not in "45" or not reply[:3].isdigit():
        reply = default
    code, _, text = reply.partition(" ")
    if len(code) != 3:
        code, text = reply[:3], reply[3:].lstrip(" -")
    first, _, rest = text.partition(" ")
    enhanced = first.split(".")
    if len(enhanced) == 3 and all(p.isdigit() for p in enhanced):
        if enhanced[0] != code[0]:
            first = f"{code[0]}.{enhanced[1]}.{enhanced[2]}"
        return f"{code} {first} {rest}".rstrip()
    return f"{code} {code[0]}.7.1 {text}".rstrip()


# -- decoding --------------------------------------------------------------------------------
def _d_optneg(p: bytes) -> OptNeg:
    if len(p) < 12:
        raise _err(f"OPTNEG: {len(p)} bytes of data, need 12")
    version, actions, protocol = _OPTNEG.unpack_from(p)
    macros: list[tuple[int, str]] = []
    pos = 12
    while pos < len(p):
        if len(p) - pos < 5:
            raise _err("OPTNEG: truncated macro list")
        (stage,) = _U32.unpack_from(p, pos)
        end = p.find(b"\0", pos + 4)
        if end < 0:
            raise _err("OPTNEG: macro list not NUL-terminated")
        macros.append((stage, _s(p[pos + 4:end])))
        pos = end + 1
    return OptNeg(version, actions, protocol, tuple(macros))


def _d_macro(p: bytes) -> Macro:
    if not p:
        raise _err("MACRO: missing stage")
    stage = p[:1]
    rest = p[1:]
    if not rest:
        return Macro(stage)
    items = _cstrings(rest, "MACRO")
    if len(items) % 2:
        raise _err("MACRO: name without value")
    return Macro(stage, tuple(zip(items[::2], items[1::2], strict=True)))


def _d_connect(p: bytes) -> Connect:
    end = p.find(b"\0")
    if end < 0 or end + 1 >= len(p):
        raise _err("CONNECT: truncated")
    hostname = _s(p[:end])
    family = chr(p[end + 1])
    if family == "U":
        if end + 2 != len(p):
            raise _err("CONNECT: data after unknown family")
        return Connect(hostname, "U")
    if family not in "L46":
        raise _err(f"CONNECT: unknown address family {family!r}")
    rest = p[end + 2:]
    if len(rest) < 3 or not rest.endswith(b"\0") or b"\0" in rest[2:-1]:
        raise _err("CONNECT: truncated address")
    (port,) = _U16.unpack_from(rest)
    return Connect(hostname, family, port, _s(rest[2:-1]))


def _one_string(p: bytes, what: str) -> str:
    items = _cstrings(p, what)
    if len(items) != 1:
        raise _err(f"{what}: expected one string, got {len(items)}")
    return items[0]


def _d_args(p: bytes, what: str) -> tuple[str, ...]:
    return tuple(_cstrings(p, what))


def _d_header(p: bytes) -> Header:
    # The fast path of the whole protocol (one packet per header): one find, two slices.
    nul = p.find(b"\0")
    if nul <= 0 or p[-1:] != b"\0" or p.find(b"\0", nul + 1) != len(p) - 1:
        raise _err("HEADER: expected name\\0value\\0")
    return Header(p[:nul], p[nul + 1:-1])


def _empty(cls: Callable[[], Packet], name: str) -> Callable[[bytes], Packet]:
    instance = cls()  # stateless: one shared instance, no allocation per packet

    def decode(p: bytes) -> Packet:
        if p:
            raise _err(f"{name}: unexpected data ({len(p)} bytes)")
        return instance

    return decode


def _d_two(p: bytes, what: str, optional_second: bool = False) -> tuple[str, str]:
    items = _cstrings(p, what)
    if len(items) == 1 and optional_second:
        return items[0], ""
    if len(items) != 2:
        raise _err(f"{what}: expected 2 strings, got {len(items)}")
    return items[0], items[1]


def _d_indexed(p: bytes, what: str) -> tuple[int, str, str]:
    if len(p) < 4:
        raise _err(f"{what}: truncated index")
    (index,) = _U32.unpack_from(p)
    name, value = _d_two(p[4:], what)
    return index, name, value


def _d_replycode(p: bytes) -> ReplyCode:
    text = _one_string(p, "REPLYCODE")
    return ReplyCode(text.replace("%%", "%"))


Decoder: TypeAlias = Callable[[bytes], Packet]

COMMANDS: Final[dict[int, Decoder]] = {
    ord("O"): _d_optneg,
    ord("D"): _d_macro,
    ord("C"): _d_connect,
    ord("H"): lambda p: Helo(_one_string(p, "HELO")),
    ord("M"): lambda p: Mail(_d_args(p, "MAIL")),
    ord("R"): lambda p: Rcpt(_d_args(p, "RCPT")),
    ord("T"): _empty(Data, "DATA"),
    ord("L"): _d_header,
    ord("N"): _empty(EndOfHeaders, "EOH"),
    ord("B"): Body,
    ord("E"): EndOfMessage,
    ord("A"): _empty(Abort, "ABORT"),
    ord("Q"): _empty(Quit, "QUIT"),
    ord("K"): _empty(QuitNewConnection, "QUIT_NC"),
    ord("U"): lambda p: Unknown(_one_string(p, "UNKNOWN")),
}

RESPONSES: Final[dict[int, Decoder]] = {
    ord("O"): _d_optneg,
    ord("a"): _empty(Accept, "ACCEPT"),
    ord("c"): _empty(Continue, "CONTINUE"),
    ord("r"): _empty(Reject, "REJECT"),
    ord("t"): _empty(Tempfail, "TEMPFAIL"),
    ord("d"): _empty(Discard, "DISCARD"),
    ord("p"): _empty(Progress, "PROGRESS"),
    ord("s"): _empty(Skip, "SKIP"),
    ord("4"): _empty(Shutdown, "SHUTDOWN"),
    ord("f"): _empty(ConnFail, "CONN_FAIL"),
    ord("y"): _d_replycode,
    ord("h"): lambda p: AddHeader(*_d_two(p, "ADDHEADER")),
    ord("i"): lambda p: InsertHeader(*_d_indexed(p, "INSHEADER")),
    ord("m"): lambda p: ChangeHeader(*_d_indexed(p, "CHGHEADER")),
    ord("b"): ReplaceBody,
    ord("+"): lambda p: AddRecipient(_one_string(p, "ADDRCPT")),
    ord("2"): lambda p: AddRecipientPar(*_d_two(p, "ADDRCPT_PAR", optional_second=True)),
    ord("-"): lambda p: DeleteRecipient(_one_string(p, "DELRCPT")),
    ord("e"): lambda p: ChangeFrom(*_d_two(p, "CHGFROM", optional_second=True)),
    ord("q"): lambda p: Quarantine(_one_string(p, "QUARANTINE")),
}


class PacketReader:
    """Splits a byte stream into packets and decodes them with a command table.

    The buffer is the received ``bytes`` object itself while it holds only whole packets
    (the usual case: an MTA writes whole packets), so a payload is one slice of what was
    read; only a packet split across reads is gathered in a ``bytearray``.
    """

    def __init__(self, table: dict[int, Decoder], *, max_packet: int = DEFAULT_MAX_PACKET,
                 side: str = "packet") -> None:
        if max_packet < 1:
            raise ValueError("max_packet must be >= 1")
        self._table = table
        self._max = max_packet
        self._side = side
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._eof = False
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as events."""
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("receive_data after end of stream")
        buf = self._buf
        pos = self._pos
        if pos == len(buf):  # everything consumed: the new bytes are the buffer
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
        elif isinstance(buf, bytes):  # a partial packet: gather it and what follows
            gathered = bytearray(memoryview(buf)[pos:])
            gathered += data
            self._buf = gathered
            self._pos = 0
        else:
            if pos > 65536:  # do not grow the buffer forever
                del buf[:pos]
                self._pos = 0
            buf += data

    def next_event(self) -> Packet | None:
        """The next decoded packet, or None when more data is needed.

        Raises ProtocolError on a malformed packet (and from then on, every time).
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < 4:
            if self._eof and avail:
                raise self._fail("connection closed in the middle of a packet length")
            return None
        (length,) = _U32.unpack_from(buf, pos)
        if length == 0:
            raise self._fail("zero-length packet")
        if length > self._max:
            raise self._fail(f"packet of {length} bytes is over the limit of {self._max}")
        end = pos + 4 + length
        if end > len(buf):
            if self._eof:
                raise self._fail(f"connection closed after {avail - 4} of {length} bytes "
                                 "of a packet")
            return None
        code = buf[pos + 4]
        if type(buf) is bytes:
            payload = buf[pos + 5:end]
        else:
            # one copy out of the buffer (a bytearray slice then bytes() would be two); the
            # view is released before the buffer can be resized again
            with memoryview(buf) as view:
                payload = bytes(view[pos + 5:end])
        self._pos = end
        decoder = self._table.get(code)
        if decoder is None:
            raise self._fail(f"unknown {self._side} {chr(code)!r} (0x{code:02x})")
        try:
            return decoder(payload)
        except ProtocolError as exc:
            self._error = exc
            raise

    def _fail(self, message: str) -> ProtocolError:
        self._error = _err(message)
        return self._error


# -- the two ends ----------------------------------------------------------------------------
#: Replies a filter must send per event unless the matching SMFIP_NR_* flag was negotiated.
_NO_REPLY_FLAG: Final[dict[type, int]] = {
    Connect: SMFIP_NR_CONN, Helo: SMFIP_NR_HELO, Mail: SMFIP_NR_MAIL, Rcpt: SMFIP_NR_RCPT,
    Data: SMFIP_NR_DATA, Unknown: SMFIP_NR_UNKN, Header: SMFIP_NR_HDR,
    EndOfHeaders: SMFIP_NR_EOH, Body: SMFIP_NR_BODY,
}
_NEVER_REPLY: Final = (Macro, Abort, Quit, QuitNewConnection)
_COMMAND_TYPES: Final = (OptNeg, Macro, Connect, Helo, Mail, Rcpt, Data, Header, EndOfHeaders,
                         Body, EndOfMessage, Abort, Quit, QuitNewConnection, Unknown)


@functools.lru_cache(maxsize=64)
def _replied(protocol: int) -> frozenset[type]:
    """The command types a filter answers under the negotiated ``protocol`` flags."""
    return frozenset(t for t in _COMMAND_TYPES if t not in _NEVER_REPLY
                     and not protocol & _NO_REPLY_FLAG.get(t, 0))


class MilterServer:
    """Filter side: decode the MTA's commands, negotiate, say which events need a reply.

    Before option negotiation only OPTNEG is accepted (every MTA starts with it).
    """

    def __init__(self, *, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        self._reader = PacketReader(COMMANDS, max_packet=max_packet, side="command")
        self._negotiated: OptNeg | None = None
        self.actions = 0  #: the negotiated SMFIF_* actions (0 before OPTNEG)
        self.protocol = 0  #: the negotiated SMFIP_* protocol flags (0 before OPTNEG)
        self._replied = _replied(0)

    @property
    def negotiated(self) -> OptNeg | None:
        """Our OPTNEG reply (what was negotiated), None before option negotiation."""
        return self._negotiated

    @negotiated.setter
    def negotiated(self, reply: OptNeg | None) -> None:
        self._negotiated = reply
        self.actions = reply.actions if reply else 0
        self.protocol = reply.protocol if reply else 0
        self._replied = _replied(self.protocol)

    @property
    def buffered(self) -> int:
        return self._reader.buffered

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._reader.receive_data(data)

    def next_event(self) -> Command | None:
        event = self._reader.next_event()
        if self._negotiated is None and event is not None and type(event) is not OptNeg:
            raise self._reader._fail(
                f"{type(event).__name__} before option negotiation")
        return event  # type: ignore[return-value]  # the command table yields Commands

    def negotiate(self, offer: OptNeg, *, actions: int, protocol: int,
                  macros: tuple[tuple[int, str], ...] = ()) -> OptNeg:
        """Our OPTNEG reply to ``offer``: the wanted actions and protocol flags the MTA
        offers (never more: Postfix drops a filter that asks for more), macro lists only
        if the MTA allows SMFIF_SETSYMLIST. Remembers the result."""
        if offer.version < 2:
            raise self._reader._fail(f"milter protocol version {offer.version} not supported")
        version = min(offer.version, MILTER_VERSION)
        acts = actions & offer.actions
        if macros and offer.actions & SMFIF_SETSYMLIST:
            acts |= SMFIF_SETSYMLIST
        else:
            macros = ()
        reply = OptNeg(version, acts, protocol & offer.protocol, macros)
        self.negotiated = reply
        return reply

    def needs_reply(self, event: Command) -> bool:
        """Whether the MTA waits for a reply to ``event`` (OPTNEG and EOM always do)."""
        return type(event) in self._replied

    def send(self, response: Response) -> bytes:
        return encode(response)


class MilterClient:
    """MTA side (tests, benchmarks): encode commands, decode the filter's responses."""

    def __init__(self, *, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        self._reader = PacketReader(RESPONSES, max_packet=max_packet, side="response")
        self.negotiated: OptNeg | None = None

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._reader.receive_data(data)

    def next_event(self) -> Response | None:
        event = self._reader.next_event()
        if isinstance(event, OptNeg):
            self.negotiated = event
        return event  # type: ignore[return-value]

    def expects_reply(self, command: Command) -> bool:
        """Whether the filter will answer ``command`` (after negotiation)."""
        flag = _NO_REPLY_FLAG.get(type(command))
        proto = self.negotiated.protocol if self.negotiated else 0
        if flag is not None:
            return not proto & flag
        return not isinstance(command, _NEVER_REPLY)

    def send(self, command: Command) -> bytes:
        return encode(command)


__all__ = [
    "COMMANDS", "DEFAULT_MAX_PACKET", "MAX_BODY_CHUNK", "MILTER_VERSION", "RESPONSES",
    "Abort", "Accept", "AddHeader", "AddRecipient", "AddRecipientPar", "Body", "ChangeFrom",
    "ChangeHeader", "Command", "ConnFail", "Connect", "Continue", "Data", "DeleteRecipient",
    "Discard", "EndOfHeaders", "EndOfMessage", "Header", "Helo", "InsertHeader", "Macro",
    "Mail", "MilterClient", "MilterServer", "OptNeg", "Packet", "PacketReader", "Progress",
    "Quarantine", "Quit", "QuitNewConnection", "Rcpt", "Reject", "ReplaceBody", "ReplyCode",
    "Response", "Shutdown", "Skip", "Tempfail", "Unknown", "encode", "encode_all",
    "milter_reply", "strip_brackets",
]
