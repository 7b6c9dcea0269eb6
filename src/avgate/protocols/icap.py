"""Sans-IO ICAP codec (RFC 3507) for both sides: our server front-end and our client engine.

No I/O here: feed bytes with :meth:`IcapParser.receive_data`, pull events with
:meth:`IcapParser.next_event` until it returns :data:`NEED_DATA`; build bytes to send with the
``encode_*`` functions. One parser class reads either requests (``role="server"``) or
responses (``role="client"``); the message layout is the same:

    ICAP start line + ICAP headers, CRLF CRLF
    encapsulated HTTP header blocks (req-hdr, res-hdr), their lengths given by the
        ``Encapsulated`` header offsets
    one body (req-body / res-body / opt-body: HTTP/1.1 chunked, with the ICAP ``ieof``
        extension on the last chunk of a complete preview) or ``null-body``

Events, in order, for one message: :class:`Request` or :class:`Response` (head and
encapsulated headers), any number of :class:`BodyChunk`, then :class:`BodyEnd`. A request with
``Preview: n`` gives :class:`PreviewEnd` after the preview data; the server then calls
:meth:`IcapParser.continue_body` (it answered ``100 Continue``) or :meth:`IcapParser.skip_body`
(it answered already; the client sends no more body). ``PreviewEnd(ieof=True)`` means the whole
body was in the preview: :class:`BodyEnd` follows at once.

Body data is handed out as it arrives, also in the middle of a chunk, so a 1 GiB chunk never
sits in memory. Malformed input raises :class:`IcapProtocolError` whose ``status`` is the ICAP
reply the server sends (400, or 505 for a version it does not speak) before closing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from ..errors import ProtocolError
from . import NEED_DATA as NEED_DATA  # re-exported: callers use <codec>.NEED_DATA
from . import NeedData

DEFAULT_MAX_HEADER_SIZE: Final = 64 * 1024
_HEX_DIGITS: Final = b"0123456789abcdefABCDEF"
MAX_CHUNK_LINE: Final = 1024  # chunk-size line incl. extensions; real ones are ~10 bytes
BODY_KINDS: Final = (b"req-body", b"res-body", b"opt-body", b"null-body")
HEADER_KINDS: Final = (b"req-hdr", b"res-hdr")
METHODS: Final = ("OPTIONS", "REQMOD", "RESPMOD")

REASONS: Final = {
    100: "Continue", 200: "OK", 204: "No Content", 206: "Partial Content",
    400: "Bad Request", 403: "Forbidden", 404: "ICAP Service Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 500: "Server Error",
    501: "Method Not Implemented", 502: "Bad Gateway", 503: "Service Overloaded",
    505: "ICAP Version Not Supported",
}
HTTP_REASONS: Final = {200: "OK", 403: "Forbidden", 503: "Service Unavailable"}

LAST_CHUNK: Final = b"0\r\n\r\n"
IEOF_CHUNK: Final = b"0; ieof\r\n\r\n"
CONTINUE: Final = b"ICAP/1.0 100 Continue\r\n\r\n"




class IcapProtocolError(ProtocolError):
    """The peer broke ICAP; ``status`` is the ICAP status to answer (server side)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message, reply_hint=status)
        self.status = status


# -- headers -----------------------------------------------------------------------------------
class Headers:
    """ICAP or HTTP header fields in order; lookup by case-insensitive name.

    Values are ``str`` decoded as latin-1 (headers are bytes on the wire). Folded
    continuation lines are kept, joined with ``"\\n"`` (``X-Violations-Found`` needs them).
    """

    __slots__ = ("_index", "items")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self.items: list[tuple[str, str]] = list(items)
        self._index: dict[str, str] | None = None

    def get(self, name: str, default: str = "") -> str:
        """The first value of ``name`` (or ``default``)."""
        if self._index is None:
            index: dict[str, str] = {}
            for k, v in self.items:
                index.setdefault(k.lower(), v)
            self._index = index
        return self._index.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name, "\0") != "\0"

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"Headers({self.items!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self.items == other.items

    def list_values(self, name: str) -> list[str]:
        """Comma-separated tokens of ``name``, stripped (e.g. ``Allow: 204, 206``)."""
        return [t.strip() for t in self.get(name).split(",") if t.strip()]


#: what ``bytes.strip()`` strips (ASCII whitespace), for the same result on latin-1 text
#: (``str.strip()`` would also strip \x1c-\x1f, \x85 and \xa0)
_WS: Final = " \t\n\r\x0b\x0c"


def parse_header_lines(lines: Sequence[str]) -> Headers:
    """Header field lines (no start line, no empty line), decoded as latin-1 (one decode
    per header block), into :class:`Headers`."""
    items: list[tuple[str, str]] = []
    ws = _WS
    for line in lines:
        if line[:1] in (" ", "\t"):
            if not items:
                raise IcapProtocolError("header continuation line before any header")
            prev_name, prev_value = items[-1]
            items[-1] = (prev_name, prev_value + "\n" + line.strip(ws))
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip(ws) or " " in name:
            raise IcapProtocolError(
                f"malformed header line {line[:60].encode('latin-1')!r}")
        items.append((name, value.strip(ws)))
    return Headers(items)


def encode_headers(headers: Iterable[tuple[str, str]]) -> bytes:
    """``Name: value`` lines, each CRLF-terminated (no final empty line)."""
    out = []
    for name, value in headers:
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise ValueError(f"header {name!r} contains a line break or bad name")
        out.append(f"{name}: {value}\r\n")
    return "".join(out).encode("latin-1")


# -- encapsulated HTTP headers ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HttpHead:
    """An encapsulated HTTP request or response head (start line + headers)."""

    start_line: str
    headers: Headers = field(default_factory=Headers)

    @classmethod
    def parse(cls, raw: bytes) -> HttpHead:
        """Parse ``raw`` (ends with an empty line); raises IcapProtocolError if malformed."""
        lines = raw.decode("latin-1").split("\r\n")
        while lines and lines[-1] == "":
            lines.pop()
        if not lines or not lines[0]:
            raise IcapProtocolError("empty encapsulated HTTP header")
        return cls(lines[0], parse_header_lines(lines[1:]))

    @property
    def status(self) -> int:
        """Status code of a response head (0 if this is no response)."""
        parts = self.start_line.split(None, 2)
        if len(parts) >= 2 and parts[0].startswith("HTTP/") and parts[1].isascii() \
                and parts[1].isdigit():
            return int(parts[1])
        return 0

    @property
    def url(self) -> str:
        """Request target of a request head ("" for a response)."""
        return request_target(self.start_line)

    @property
    def media_type(self) -> str:
        """``Content-Type`` without parameters, lower case."""
        return self.headers.get("content-type").split(";", 1)[0].strip().lower()


def request_target(start_line: str) -> str:
    """The request target of an HTTP start line ("" for a response's status line)."""
    parts = start_line.split(None, 2)
    return parts[1] if len(parts) >= 2 and not parts[0].startswith("HTTP/") else ""


def encode_http_response(status: int, headers: Iterable[tuple[str, str]],
                         reason: str | None = None) -> bytes:
    """An HTTP/1.1 response head for use as an encapsulated ``res-hdr``."""
    reason = reason if reason is not None else HTTP_REASONS.get(status, "Unknown")
    return f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1") + encode_headers(headers) + b"\r\n"


# -- messages ------------------------------------------------------------------------------
BodyKind = Literal["req-body", "res-body", "opt-body", "null-body"]


@dataclass(frozen=True, slots=True)
class Request:
    """Head of an ICAP request, with its encapsulated HTTP headers (raw bytes)."""

    method: str
    uri: str
    headers: Headers
    req_hdr: bytes = b""
    res_hdr: bytes = b""
    body: BodyKind = "null-body"
    preview: int | None = None
    version: str = "ICAP/1.0"

    @property
    def service(self) -> str:
        """The service name: the URI path without the leading slash and query."""
        rest = self.uri.split("://", 1)[1] if "://" in self.uri else self.uri
        path = rest.split("/", 1)[1] if "/" in rest else ""
        return path.split("?", 1)[0]

    @property
    def allow_204(self) -> bool:
        return "204" in self.headers.list_values("allow")

    @property
    def keep_alive(self) -> bool:
        return self.headers.get("connection").lower() != "close"

    @property
    def has_body(self) -> bool:
        return self.body != "null-body"


@dataclass(frozen=True, slots=True)
class Response:
    """Head of an ICAP response, with its encapsulated HTTP headers (raw bytes)."""

    status: int
    reason: str
    headers: Headers
    req_hdr: bytes = b""
    res_hdr: bytes = b""
    body: BodyKind = "null-body"
    version: str = "ICAP/1.0"

    @property
    def has_body(self) -> bool:
        return self.body != "null-body"

    @property
    def keep_alive(self) -> bool:
        return self.headers.get("connection").lower() != "close"


@dataclass(frozen=True, slots=True)
class BodyChunk:
    data: bytes


@dataclass(frozen=True, slots=True)
class PreviewEnd:
    """End of the preview data; ``ieof``: the preview held the whole body."""

    ieof: bool


@dataclass(frozen=True, slots=True)
class BodyEnd:
    pass


Event = Request | Response | BodyChunk | PreviewEnd | BodyEnd
_BODY_END = BodyEnd()


#: parsed Encapsulated values (a proxy sends few distinct ones); bounded, cleared when full
_ENCAP_CACHE: dict[str, tuple[tuple[tuple[bytes, int], ...], BodyKind]] = {}
_ENCAP_CACHE_SIZE: Final = 512


def _encapsulated_entries(value: str) -> tuple[tuple[tuple[bytes, int], ...], BodyKind]:
    """:func:`parse_encapsulated`, remembered per value (only values that parsed)."""
    cached = _ENCAP_CACHE.get(value)
    if cached is None:
        entries, body = parse_encapsulated(value)
        if len(_ENCAP_CACHE) >= _ENCAP_CACHE_SIZE:
            _ENCAP_CACHE.clear()
        cached = _ENCAP_CACHE[value] = (tuple(entries), body)
    return cached


def parse_encapsulated(value: str) -> tuple[list[tuple[bytes, int]], BodyKind]:
    """``req-hdr=0, res-hdr=137, res-body=296`` → ([(b"req-hdr", 0), ...], "res-body").

    Header sections come first in increasing order; exactly one body entry comes last.
    """
    if not value.strip():
        raise IcapProtocolError("empty Encapsulated header")
    entries: list[tuple[bytes, int]] = []
    for item in value.split(","):
        key, sep, num = item.strip().partition("=")
        num = num.strip()
        if not sep or not (num.isascii() and num.isdigit()) or len(num) > 12:
            raise IcapProtocolError(f"malformed Encapsulated entry {item.strip()[:40]!r}")
        entries.append((key.strip().lower().encode("ascii", "replace"), int(num)))
    *heads, (body_name, _) = entries
    if body_name not in BODY_KINDS:
        raise IcapProtocolError("Encapsulated must end with a body entry "
                                f"(got {body_name.decode('latin-1')!r})")
    if entries[0][1] != 0:
        raise IcapProtocolError("the first Encapsulated offset must be 0")
    last = -1
    for _, off in entries:
        if off <= last and not (off == 0 and last == -1):
            raise IcapProtocolError("Encapsulated offsets are not increasing")
        last = off
    seen = set()
    for name, _ in heads:
        if name not in HEADER_KINDS or name in seen:
            raise IcapProtocolError(f"unexpected Encapsulated entry {name.decode('latin-1')!r}")
        seen.add(name)
    return entries, body_name.decode("ascii")  # type: ignore[return-value]


# -- parser --------------------------------------------------------------------------------
_HEAD, _ENCAP, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _AWAIT, _ERROR = range(8)



def _shown(line: str) -> str:
    """A start line in an error message: its first 60 characters, as the bytes sent."""
    return repr(line[:60].encode("latin-1"))

class IcapParser:
    """Incremental parser of ICAP requests (``role="server"``) or responses (``"client"``)."""

    def __init__(self, role: Literal["server", "client"] = "server", *,
                 max_header_size: int = DEFAULT_MAX_HEADER_SIZE) -> None:
        self.role = role
        self.max_header_size = max_header_size
        self._buf = bytearray()
        self._state = _HEAD
        self._head: Response | None = None  # a response head (client side)
        #: a request head's fields until its encapsulated headers are read (server side)
        self._request: tuple[str, str, Headers, int | None, str] = ("", "", Headers(), None, "")
        self._encap: tuple[tuple[bytes, int], ...] = ()
        self._encap_len = 0
        self._body: BodyKind = "null-body"
        self._remaining = 0  # bytes left in the current chunk
        self._preview: int | None = None  # preview still being read (server side)
        self._pending: Event | None = None  # head waiting for its encapsulated headers
        self._eof = False
        self._ieof = False
        self._trailer_len = 0  # bytes of chunked trailer read so far (bounded)

    # -- input -------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed the connection."""
        if data:
            self._buf += data
        else:
            self._eof = True

    @property
    def idle(self) -> bool:
        """Between messages with nothing buffered (a close here is a clean close)."""
        return self._state == _HEAD and not self._buf and self._pending is None

    @property
    def awaiting_continue(self) -> bool:
        return self._state == _AWAIT

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def continue_body(self) -> None:
        """After ``PreviewEnd(ieof=False)`` we answered 100 Continue: read the rest."""
        if self._state != _AWAIT:
            raise RuntimeError("continue_body() only after a PreviewEnd without ieof")
        self._state = _CHUNK_SIZE

    def skip_body(self) -> None:
        """After ``PreviewEnd(ieof=False)`` we answered without 100: the message is over."""
        if self._state != _AWAIT:
            raise RuntimeError("skip_body() only after a PreviewEnd without ieof")
        self._state = _HEAD

    # -- events ------------------------------------------------------------------------
    def next_event(self) -> Event | NeedData:
        """The next event, or :data:`NEED_DATA`; raises IcapProtocolError on bad input."""
        if self._pending is not None:
            ev, self._pending = self._pending, None
            return ev
        try:
            return self._next()
        except IcapProtocolError:
            self._state = _ERROR
            raise

    def _next(self) -> Event | NeedData:
        state = self._state
        if state == _HEAD:
            return self._parse_head()
        if state == _ENCAP:
            return self._parse_encap()
        if state == _CHUNK_DATA:
            return self._chunk_data()
        if state == _CHUNK_SIZE:
            return self._chunk_size()
        if state == _CHUNK_CRLF:
            buf = self._buf
            if len(buf) < 2:
                return self._need("in chunked body")
            if buf[0] != 13 or buf[1] != 10:
                raise IcapProtocolError("chunk data not followed by CRLF")
            del buf[:2]
            self._state = _CHUNK_SIZE
            return self._chunk_size()
        if state == _TRAILER:
            return self._trailer()
        if state == _AWAIT:
            return NEED_DATA
        raise IcapProtocolError("parser is in an error state")

    def _need(self, where: str) -> NeedData:
        if self._eof:
            raise IcapProtocolError(f"connection closed {where}")
        return NEED_DATA

    def _parse_head(self) -> Event | NeedData:
        buf = self._buf
        # Tolerate stray CRLFs between messages (RFC 7230 3.5 robustness).
        while buf[:2] == b"\r\n":
            del buf[:2]
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > self.max_header_size:
                raise IcapProtocolError(f"ICAP header larger than {self.max_header_size} bytes")
            if self._eof and buf:
                raise IcapProtocolError("connection closed in the ICAP header")
            return NEED_DATA
        if end + 4 > self.max_header_size:
            raise IcapProtocolError(f"ICAP header larger than {self.max_header_size} bytes")
        lines = buf[:end].decode("latin-1").split("\r\n")
        del buf[:end + 4]
        return self._start(lines[0], parse_header_lines(lines[1:]))

    def _start(self, text: str, headers: Headers) -> Event | NeedData:
        """The start line (decoded as latin-1 with its header block) and the headers."""
        parts = text.split(" ", 2)
        if len(parts) < 2:
            raise IcapProtocolError(f"malformed start line {_shown(text)}")
        encap = headers.get("encapsulated")
        if self.role == "server":
            if len(parts) != 3:
                raise IcapProtocolError(f"malformed request line {_shown(text)}")
            method, uri, version = parts
            if not version.startswith("ICAP/"):
                raise IcapProtocolError(f"not an ICAP request line {_shown(text)}")
            if version != "ICAP/1.0":
                raise IcapProtocolError(f"unsupported version {version!r}", status=505)
            if not encap and method != "OPTIONS":
                raise IcapProtocolError("missing Encapsulated header")
            preview: int | None = None
            pv = headers.get("preview")
            if pv:
                # (isascii: str.isdigit() also takes "²", which int() refuses)
                if not (pv.isascii() and pv.isdigit()) or len(pv) > 12:
                    raise IcapProtocolError(f"malformed Preview header {pv[:20]!r}")
                preview = int(pv)
            # the Request itself is made once its encapsulated headers are read
            self._request = (method, uri, headers, preview, version)
            self._head = None
        else:
            version = parts[0]
            code = parts[1]
            if not version.startswith("ICAP/") or not (code.isascii() and code.isdigit()) \
                    or len(code) != 3:
                raise IcapProtocolError(f"malformed status line {_shown(text)}")
            reason = parts[2] if len(parts) > 2 else ""
            status = int(code)
            self._head = Response(status, reason, headers, version=version)
            if status in (100, 204) or not encap:
                encap = "null-body=0"
                if status in (100, 204):
                    # no encapsulated data follows 100/204, whatever the header claims
                    self._state = _HEAD
                    return self._head
        entries, body = _encapsulated_entries(encap or "null-body=0")
        self._encap = entries
        self._body = body
        self._encap_len = entries[-1][1]
        if self._encap_len > self.max_header_size:
            raise IcapProtocolError("encapsulated headers too large")
        self._state = _ENCAP
        return self._parse_encap()

    def _parse_encap(self) -> Event | NeedData:
        buf = self._buf
        n = self._encap_len
        if len(buf) < n:
            return self._need("in the encapsulated headers")
        blob = bytes(buf[:n])
        del buf[:n]
        sections: dict[bytes, bytes] = {}
        entries = self._encap
        for i, (name, off) in enumerate(entries[:-1]):
            section = blob[off:entries[i + 1][1]]
            if not section.endswith(b"\r\n\r\n"):
                raise IcapProtocolError(
                    f"encapsulated {name.decode()} does not end with an empty line")
            sections[name] = section
        response = self._head
        head: Request | Response
        if response is None:  # a request (server side)
            method, uri, headers, preview, version = self._request
            if method == "REQMOD" and b"res-hdr" in sections:
                raise IcapProtocolError("REQMOD must not encapsulate res-hdr")
            if self._body == "opt-body" and method != "OPTIONS":
                raise IcapProtocolError("opt-body only belongs to OPTIONS")
            head = Request(method, uri, headers, sections.get(b"req-hdr", b""),
                           sections.get(b"res-hdr", b""), self._body, preview, version)
            self._preview = preview if self._body != "null-body" else None
        else:
            head = Response(response.status, response.reason, response.headers,
                            sections.get(b"req-hdr", b""), sections.get(b"res-hdr", b""),
                            self._body, response.version)
            self._preview = None
        self._state = _CHUNK_SIZE if self._body != "null-body" else _HEAD
        return head

    def _chunk_size(self) -> Event | NeedData:
        buf = self._buf
        end = buf.find(b"\r\n", 0, MAX_CHUNK_LINE)
        if end < 0:
            if len(buf) >= MAX_CHUNK_LINE:
                raise IcapProtocolError("chunk-size line too long")
            return self._need("in chunked body")
        line = bytes(buf[:end])
        del buf[:end + 2]
        if 0 < end <= 16 and not line.translate(None, _HEX_DIGITS):  # the usual: hex alone
            size, ieof = int(line, 16), False
        else:
            size_part, _, ext = line.partition(b";")
            size_part = size_part.strip()
            try:
                if not size_part or len(size_part) > 16:
                    raise ValueError
                size = int(size_part, 16)
                if (size_part[:1] in (b"+", b"-") or b"_" in size_part
                        or size_part[:2].lower() == b"0x"):
                    raise ValueError
            except ValueError:
                raise IcapProtocolError(f"malformed chunk size {line[:40]!r}") from None
            ieof = ext.strip().lower() == b"ieof"
        if size:
            if ieof:
                raise IcapProtocolError("ieof on a non-empty chunk")
            self._remaining = size
            self._state = _CHUNK_DATA
            return self._chunk_data()
        self._state = _TRAILER
        self._ieof = ieof
        self._trailer_len = 0
        return self._trailer()

    def _chunk_data(self) -> Event | NeedData:
        buf = self._buf
        if not buf:
            return self._need("in chunk data")
        n = min(self._remaining, len(buf))
        if self._preview is not None:
            # the preview may not be longer than announced
            self._preview -= n
            if self._preview < 0:
                raise IcapProtocolError("more preview data than the Preview header announced")
        if n < len(buf):
            # one copy out of the buffer (a bytearray slice then bytes() would be two)
            with memoryview(buf) as view:
                data = bytes(view[:n])
            del buf[:n]
        else:
            data = bytes(buf)
            buf.clear()
        self._remaining -= n
        if not self._remaining:
            self._state = _CHUNK_CRLF
        return BodyChunk(data)

    def _trailer(self) -> Event | NeedData:
        buf = self._buf
        # ICAP bodies carry no trailers, but HTTP/1.1 chunked syntax allows them: skip them,
        # all of them together bounded like a header block (an endless trailer is an error,
        # not an endless message).
        while True:
            end = buf.find(b"\r\n")
            if end < 0:
                if self._trailer_len + len(buf) > self.max_header_size:
                    raise IcapProtocolError("chunked trailer too large")
                return self._need("in chunked body")
            self._trailer_len += end + 2
            if self._trailer_len > self.max_header_size:
                raise IcapProtocolError("chunked trailer too large")
            del buf[:end + 2]
            if end == 0:
                break
        if self._preview is not None:
            self._preview = None
            if self._ieof:
                self._pending = _BODY_END
                self._state = _HEAD
                return PreviewEnd(ieof=True)
            self._state = _AWAIT
            return PreviewEnd(ieof=False)
        if self._ieof:
            raise IcapProtocolError("ieof outside a preview")
        self._state = _HEAD
        return _BODY_END

    def __iter__(self) -> Iterator[Event]:
        """Events until NEED_DATA."""
        while True:
            ev = self.next_event()
            if isinstance(ev, NeedData):
                return
            yield ev


# -- serialisers -------------------------------------------------------------------------------
def _encapsulated(req_hdr: bytes, res_hdr: bytes, body: BodyKind) -> str:
    parts = []
    off = 0
    if req_hdr:
        parts.append("req-hdr=0")
        off = len(req_hdr)
    if res_hdr:
        parts.append(f"res-hdr={off}")
        off += len(res_hdr)
    parts.append(f"{body}={off}")
    return ", ".join(parts)


def encode_request(method: str, uri: str, headers: Iterable[tuple[str, str]] = (), *,
                   req_hdr: bytes = b"", res_hdr: bytes = b"",
                   body: BodyKind = "null-body") -> bytes:
    """An ICAP request head plus its encapsulated headers (the body follows as chunks)."""
    hdrs = list(headers)
    hdrs.append(("Encapsulated", _encapsulated(req_hdr, res_hdr, body)))
    return (f"{method} {uri} ICAP/1.0\r\n".encode("latin-1") + encode_headers(hdrs)
            + b"\r\n" + req_hdr + res_hdr)


def encode_response(status: int, headers: Iterable[tuple[str, str]] = (), *,
                    req_hdr: bytes = b"", res_hdr: bytes = b"",
                    body: BodyKind = "null-body", reason: str | None = None,
                    encapsulated: bool = True) -> bytes:
    """An ICAP response head plus its encapsulated headers (the body follows as chunks).

    ``encapsulated=False`` leaves the Encapsulated header out (100 Continue).
    """
    reason = reason if reason is not None else REASONS.get(status, "Unknown")
    hdrs = list(headers)
    if encapsulated:
        hdrs.append(("Encapsulated", _encapsulated(req_hdr, res_hdr, body)))
    return (f"ICAP/1.0 {status} {reason}\r\n".encode("latin-1") + encode_headers(hdrs)
            + b"\r\n" + req_hdr + res_hdr)


def encode_chunk(data: bytes | bytearray | memoryview) -> bytes:
    """One chunk of a chunked body (empty data gives b"": use LAST_CHUNK to end)."""
    if not data:
        return b""
    return b"%x\r\n" % len(data) + bytes(data) + b"\r\n"


def encode_body(data: bytes) -> bytes:
    """A whole body as one chunk plus the last chunk."""
    return encode_chunk(data) + LAST_CHUNK


# -- threat names in responses -----------------------------------------------------------------
def threats_from_headers(headers: Headers) -> list[str]:
    """Virus names from ``X-Infection-Found``, ``X-Violations-Found`` and ``X-Virus-ID``.

    ``X-Infection-Found: Type=0; Resolution=2; Threat=NAME;`` (draft-stecher-icap-subid);
    ``X-Violations-Found: N`` followed by N groups of four folded lines (filename, threat,
    id, disposition); ``X-Virus-ID: NAME``. Duplicates are removed, order kept.
    """
    names: dict[str, None] = {}
    inf = headers.get("x-infection-found")
    for field_ in inf.replace("\n", " ").split(";"):
        key, sep, value = field_.strip().partition("=")
        if sep and key.strip().lower() == "threat" and value.strip():
            names.setdefault(value.strip(), None)
    vio = headers.get("x-violations-found")
    if vio:
        lines = [ln.strip() for ln in vio.split("\n")]
        count = int(lines[0]) if lines[0].isascii() and lines[0].isdigit() else 0
        for i in range(count):
            idx = 2 + 4 * i
            if idx < len(lines) and lines[idx]:
                names.setdefault(lines[idx], None)
    vid = headers.get("x-virus-id").strip()
    if vid and vid.lower() not in ("no threats", "none", "clean"):
        names.setdefault(vid, None)
    return list(names)
