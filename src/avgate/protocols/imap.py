r"""Sans-IO IMAP framing for a proxy: lines and literals, both directions (RFC 9051, RFC 3501,
RFC 7888 LITERAL+/LITERAL-, RFC 3516 BINARY literal8).

An IMAP command or response is one logical line that may carry literals: a line ending in
``{n}`` (synchronizing: the client waits for ``+``), ``{n+}`` (non-synchronizing, LITERAL+)
or ``~{n}`` (literal8, BINARY) is followed by exactly ``n`` octets, and then the line goes on.
:class:`Reader` turns bytes into

* :class:`Segment` — the text of a line up to a literal announcement (``text`` without the
  ``{n}``) or up to its CRLF (``literal`` None: the logical line ends here); ``first`` marks
  the first segment of a logical line;
* :class:`LiteralData` pieces (a literal is never buffered whole) and :class:`LiteralEnd`;
* :class:`ConnectionClosed`.

The proxy decides per literal what to do (spool and scan a message, pass anything else on),
so a body section of any size goes through with bounded memory. Limits: a segment longer
than ``max_line`` and a literal larger than ``max_literal`` (sizes near 2**32 included: at
most 20 digits are read, then compared) raise :class:`ImapProtocolError`.

Helpers: :func:`literal_header` (the announcement to write), :func:`parse_tag`,
:func:`body_section` (which FETCH item a literal belongs to), :func:`filter_capabilities`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from ..errors import ProtocolError
from . import NEED_DATA as NEED_DATA  # re-exported: callers use <codec>.NEED_DATA
from . import NeedData

__all__ = [
    "DEFAULT_MAX_LINE", "DEFAULT_MAX_LITERAL", "NEED_DATA", "ConnectionClosed",
    "ImapProtocolError", "Literal", "LiteralData", "LiteralEnd", "Reader", "Segment",
    "body_section", "clean_text", "filter_capabilities", "literal_header", "parse_tag",
]

DEFAULT_MAX_LINE: Final = 64 * 1024
DEFAULT_MAX_LITERAL: Final = 1 << 30
_LITERAL = re.compile(rb"(~?)\{(\d{1,20})(\+?)\}\r?\n\Z")
_TAG = re.compile(rb"[\x21-\x7e]+")


class ImapProtocolError(ProtocolError):
    """A peer broke IMAP framing; ``reply_hint`` is the text of a ``BAD``/``BYE``."""

    def __init__(self, message: str, reply_hint: str = "Protocol error") -> None:
        super().__init__(message, reply_hint)




@dataclass(frozen=True, slots=True)
class Literal:
    size: int
    sync: bool = True  # {n}: the sender waits for "+"
    binary: bool = False  # ~{n}


@dataclass(frozen=True, slots=True)
class Segment:
    """Line text up to a literal (``literal`` set) or through CRLF (``literal`` None)."""

    text: bytes = field(repr=False)
    literal: Literal | None = None
    first: bool = True


@dataclass(frozen=True, slots=True)
class LiteralData:
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class LiteralEnd:
    pass


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    partial: int = 0


Event = Segment | LiteralData | LiteralEnd | ConnectionClosed | NeedData


class Reader:
    """Bytes from one peer → segments and literal data."""

    def __init__(self, max_line: int = DEFAULT_MAX_LINE,
                 max_literal: int = DEFAULT_MAX_LITERAL) -> None:
        self.max_line = max_line
        self.max_literal = max_literal
        self._buf = bytearray()
        self._closed = False
        self._searched = 0  # bytes at the front known to hold no newline
        self._remaining = 0  # literal octets still to come
        self._in_literal = False
        self._first = True

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` means it closed the connection."""
        if not data:
            self._closed = True
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def in_line(self) -> bool:
        """Inside a logical line (between its first segment and its CRLF)."""
        return not self._first

    def next_event(self) -> Event:
        if self._in_literal:
            if self._remaining == 0:
                self._in_literal = False
                return LiteralEnd()
            if not self._buf:
                return ConnectionClosed() if self._closed else NEED_DATA
            take = min(self._remaining, len(self._buf))
            data = bytes(self._buf[:take])
            del self._buf[:take]
            self._searched = 0
            self._remaining -= take
            return LiteralData(data)
        nl = self._buf.find(b"\n", self._searched, self.max_line + 1)
        if nl < 0:
            self._searched = min(len(self._buf), self.max_line + 1)
            if len(self._buf) > self.max_line:
                raise ImapProtocolError(f"line longer than {self.max_line} bytes",
                                        "Line too long")
            return ConnectionClosed(len(self._buf)) if self._closed else NEED_DATA
        line = bytes(self._buf[:nl + 1])
        del self._buf[:nl + 1]
        self._searched = 0
        first, self._first = self._first, False
        m = _LITERAL.search(line, max(0, len(line) - 32))  # the announcement ends the line
        if m is None:
            self._first = True
            return Segment(line, None, first)
        size = int(m.group(2))
        if size > self.max_literal:
            raise ImapProtocolError(f"literal of {size} bytes over the limit "
                                    f"({self.max_literal})", "Literal too large")
        self._in_literal, self._remaining = True, size
        return Segment(line[:m.start()], Literal(size, sync=not m.group(3),
                                                 binary=bool(m.group(1))), first)


def clean_text(segment: Segment) -> bool:
    """No NUL, and no CR or LF but the line's own end: a line with them is read differently
    by different servers (the proxy refuses it rather than pass it on)."""
    text = segment.text
    if segment.literal is None:
        text = text[:-2] if text.endswith(b"\r\n") else text[:-1]
    return not (b"\0" in text or b"\r" in text or b"\n" in text)


def literal_header(literal: Literal, size: int | None = None, *, sync: bool | None = None
                   ) -> bytes:
    """``{n}\\r\\n`` / ``{n+}\\r\\n`` / ``~{n}\\r\\n`` for ``literal`` (another ``size``
    or synchronization when given)."""
    n = literal.size if size is None else size
    plus = "" if (literal.sync if sync is None else sync) else "+"
    return f"{'~' if literal.binary else ''}{{{n}{plus}}}\r\n".encode()


def parse_tag(text: bytes) -> tuple[bytes, bytes]:
    """(tag, command or status word, upper case) of a line's first segment."""
    parts = text.split(None, 2)
    if len(parts) < 2 or not _TAG.fullmatch(parts[0]):
        return (parts[0] if parts else b""), b""
    return parts[0], parts[1].upper()


_SECTION_TAIL = 1024
_SECTION = re.compile(rb"(BODY|BINARY)\[([^\][]*)\](?:<(\d+)>)?\s*\Z|(RFC822(?:\.TEXT)?)\s*\Z",
                      re.IGNORECASE)


def body_section(text: bytes) -> tuple[str, str, bool] | None:
    """For the text before a literal in a FETCH response: (item, section, partial), e.g.
    ``("BODY", "", False)`` for ``BODY[]``, ``("BODY", "2", True)`` for ``BODY[2]<0>``,
    ``("RFC822", "", False)``; None when the literal is not a body section."""
    # the item ends the text: look at its tail only (a 64 KiB line of "BODY[BODY[..." from a
    # message's subject must not cost a quadratic search)
    m = _SECTION.search(text[-_SECTION_TAIL:])
    if m is None:
        return None
    if m.group(4):
        item = m.group(4).decode().upper()
        return ("RFC822", "TEXT" if item.endswith("TEXT") else "", False)
    return (m.group(1).decode().upper(), m.group(2).decode("latin-1").upper(),
            m.group(3) is not None)


#: extensions the proxy cannot relay: compression makes the stream opaque; CATENATE and
#: URLAUTH build messages on the server from parts we never see
UNPROXIED: Final = ("COMPRESS=", "CATENATE", "URLAUTH", "STARTTLS", "LOGINDISABLED")


def filter_capabilities(caps: bytes, *, starttls: bool) -> bytes:
    """A capability list (space-separated) without what the proxy cannot relay; with
    ``STARTTLS`` when the proxy offers it."""
    kept = [c for c in caps.split() if not c.decode("latin-1").upper().startswith(UNPROXIED)]
    if starttls:
        kept.append(b"STARTTLS")
    return b" ".join(kept)


_CAPS = re.compile(rb"(\[CAPABILITY )([^\]]*)(\])|^(\* CAPABILITY )(.*?)(\r?\n)\Z",
                   re.IGNORECASE)


def rewrite_capabilities(line: bytes, *, starttls: bool) -> bytes:
    """A response line with its capability list (``* CAPABILITY ...`` or a
    ``[CAPABILITY ...]`` response code) filtered; other lines unchanged."""
    def sub(m: re.Match[bytes]) -> bytes:
        if m.group(1):
            return m.group(1) + filter_capabilities(m.group(2), starttls=starttls) + m.group(3)
        return m.group(4) + filter_capabilities(m.group(5), starttls=starttls) + m.group(6)

    return _CAPS.sub(sub, line)
