"""Sans-IO SMTP helpers: the DATA phase in both directions, replies, client commands,
XFORWARD/XCLIENT.

No I/O and no asyncio here; the SMTP front-end (:mod:`avgate.frontends.smtp`) and the SMTP
client (:mod:`avgate.smtpclient`) feed bytes in and write bytes out.

Receiving DATA (:class:`DataReceiver`): only ``<CR><LF>.<CR><LF>`` ends the data (the
``<CR><LF>`` may be the one that ended the ``DATA`` command). Every other look-alike —
``<LF>.<LF>``, ``<LF>.<CR><LF>``, ``<CR>.<CR>``, ``<CR><LF>.<LF>`` — is content, so an SMTP
smuggling attempt can never split one message into two here. A bare ``<LF>`` or bare ``<CR>``
in the content is, by ``bare_lf``:

* ``"reject"`` (default): the data is read to its end and refused with
  ``550 5.6.11 bare LF not allowed`` (or ``bare CR``); nothing is scanned or relayed.
* ``"normalize"``: each bare ``<LF>``/``<CR>`` becomes ``<CR><LF>``. A smuggled ``<LF>.<LF>``
  then becomes a content line holding a single dot, which :func:`encode_data` dot-stuffs.

Sending DATA (:func:`encode_data`): line endings normalised to ``<CR><LF>``, every line
starting with ``.`` gets another one, ``.<CR><LF>`` appended. The result never contains a
sequence a next hop could read as an early end of data, whatever its own parser accepts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

CRLF = b"\r\n"

REPLY_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
REPLY_LINE_TOO_LONG = "500 5.5.2 Line too long"
REPLY_BARE_LF = "550 5.6.11 bare LF not allowed"
REPLY_BARE_CR = "550 5.6.11 bare CR not allowed"

BARE_LF_MODES = ("reject", "normalize")
DEFAULT_MAX_LINE_LENGTH = 2048  # Postfix's line_length_limit; counted without the CRLF

_LINE_END = re.compile(rb"\r\n|\r|\n")
_DOT_AT_LINE_START = re.compile(rb"(?m)^\.")  # after normalisation ^ follows \n only
_CR_OR_LF = re.compile(rb"[\r\n]")


@dataclass(frozen=True, slots=True)
class DataProblem:
    """Why received DATA is refused; ``reply`` is the full SMTP reply to send."""

    kind: str  # "too_big" | "line_too_long" | "bare_lf" | "bare_cr"
    reply: str


class DataReceiver:
    """Byte-stream parser for the DATA phase: dot-unstuffing, end of data, limits, bare LF.

    ``feed(data)`` returns the content bytes to keep (unstuffed, normalised when asked) and
    sets :attr:`done` once the terminating ``<CR><LF>.<CR><LF>`` was seen; bytes after the
    terminator are kept in :attr:`trailing` (pipelined commands) and never parsed as data.
    Problems are recorded in :attr:`problem` (first the size, then line length, then bare
    line endings) while parsing goes on to the end: SMTP answers only after the final dot.
    Once a problem is recorded no more content is returned, so memory stays bounded.
    """

    # states: at the start of a line (after a real CRLF) / inside a line /
    # after a CR / at line start having seen "." / after "." + CR at line start
    _BOL, _MID, _CR, _DOT, _DOT_CR = range(5)

    def __init__(self, *, max_size: int | None = None,
                 max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
                 bare_lf: str = "reject") -> None:
        if bare_lf not in BARE_LF_MODES:
            raise ValueError(f"bare_lf must be one of {BARE_LF_MODES}, got {bare_lf!r}")
        self.max_size = max_size
        self.max_line_length = max_line_length
        self.normalize = bare_lf == "normalize"
        self.done = False
        self.trailing = b""
        self.size = 0  # content bytes after unstuffing/normalising, counted even when refused
        self.problem: DataProblem | None = None
        self._state = self._BOL
        self._line_len = 0
        self._too_long = False
        self._bare: str | None = None

    def _flag_size(self) -> None:
        if self.max_size is not None and self.size > self.max_size:
            self.problem = DataProblem("too_big", REPLY_TOO_BIG)

    @property
    def separator(self) -> bytes | None:
        """What to read up to next (``StreamReader.readuntil``), or None: read one byte.

        The rest of the end-of-data marker given what was already consumed, so the first
        match of it in the stream ends at or before the real terminator: a front-end reading
        ``readuntil(separator)`` (or, after ``LimitOverrunError``, ``read(consumed)``) never
        reads past the end of the data, and pipelined commands stay in its reader. At the
        start of a line (None) one byte decides between a dot line and an ordinary one.
        """
        return _SEPARATORS[self._state]

    def feed(self, data: bytes) -> bytes:
        """Consume wire bytes; return the content they carry (may be empty)."""
        if self.done:
            self.trailing += data
            return b""
        if not data:
            return b""
        state = self._state
        if state != self._BOL and state != self._MID:
            return self._feed_slow(data)
        # Fast path (C-speed bulk operations): a region ending at a CRLF with no bare CR/LF.
        if state == self._BOL and data[:3] == b".\r\n":
            self.done = True
            self.trailing = bytes(data[3:])
            return self._result(b"")
        idx = data.find(b"\r\n.\r\n")
        if idx >= 0:
            cut, rest = idx + 2, b""
        else:
            cut = data.rfind(b"\r\n") + 2
            if cut < 2:
                return self._feed_slow(data)
            rest = data[cut:]
        region = data[:cut] if cut < len(data) else data
        limit = self.max_line_length
        lines = region.split(b"\r\n") if len(region) + self._line_len > limit else None
        n_crlf = len(lines) - 1 if lines is not None else region.count(b"\r\n")
        if region.count(b"\r") != n_crlf or region.count(b"\n") != n_crlf:
            return self._feed_slow(data)  # bare CR/LF somewhere: byte by byte
        if state == self._BOL and region[:1] == b".":
            region = region[1:]  # dot-stuffed first line
        body = region.replace(b"\r\n.", b"\r\n") if b"\r\n." in region else region
        if lines is not None and (len(lines[0]) + self._line_len > limit
                                  or max(map(len, lines)) > limit):
            # measured with stuffing dots: measure the content exactly
            lines = body.split(b"\r\n")
            if len(lines[0]) + self._line_len > limit or max(map(len, lines)) > limit:
                self._too_long = True
        self._line_len = 0
        self._state = self._BOL
        if idx >= 0:
            self.done = True
            self.trailing = bytes(data[idx + 5:])
            self.size += len(body)
            return self._result(body)
        if rest:
            self.size += len(body)
            tail = self._feed_slow(rest)  # checks the limits for both
            return b"" if self.problem is not None else body + tail
        self.size += len(body)
        return self._result(body)

    def _result(self, out: bytes) -> bytes:
        """Record limits/problems after ``size`` was updated; the content to keep."""
        self._flag_size()
        if self.problem is not None:
            return b""
        if self._too_long:
            self.problem = DataProblem("line_too_long", REPLY_LINE_TOO_LONG)
            return b""
        if self._bare is not None and not self.normalize:
            self.problem = DataProblem(
                self._bare, REPLY_BARE_LF if self._bare == "bare_lf" else REPLY_BARE_CR)
            return b""
        return out

    def _feed_slow(self, data: bytes) -> bytes:
        """The state machine, one special byte at a time (runs of ordinary bytes in bulk)."""
        out = bytearray()
        i, n = 0, len(data)
        state = self._state
        special = _CR_OR_LF.search
        while i < n:
            b = data[i]
            if b != 13 and b != 10 and (state == self._MID or (state == self._BOL and b != 46)):
                # copy up to the next CR or LF
                m = special(data, i)
                j = m.start() if m is not None else n
                self._line_len += j - i
                out += data[i:j]
                i = j
                state = self._MID
                continue
            c = data[i]
            i += 1
            if state == self._BOL and c == 46:  # "." at line start
                state = self._DOT
            elif state == self._DOT:
                if c == 13:
                    state = self._DOT_CR
                else:
                    # dot-stuffed line (".." → "."), or a lone "." line start: the first dot
                    # was transparency; this byte is reprocessed as ordinary content
                    state = self._MID
                    i -= 1
            elif state == self._DOT_CR:
                if c == 10:  # CRLF . CRLF: end of data
                    self.done = True
                    self.trailing = bytes(data[i:])
                    break
                # "." CR x: the CR was bare; the dot was transparency
                self._bare_cr(out)
                state = self._MID
                i -= 1
            elif state == self._CR:
                if c == 10:
                    out += CRLF
                    self._end_line()
                    state = self._BOL
                else:
                    self._bare_cr(out)
                    state = self._MID
                    i -= 1
            elif c == 13:
                state = self._CR
            elif c == 10:  # a LF with no CR before it
                self._bare_lf(out)
                state = self._MID  # a bare LF never starts a line: no unstuffing after it
            else:  # only reached for "\r" "\n" handled above; defensive
                out.append(c)
                state = self._MID
        self._state = state
        self.size += len(out)
        return self._result(bytes(out))

    def _end_line(self) -> None:
        if self._line_len > self.max_line_length:
            self._too_long = True
        self._line_len = 0

    def _bare_lf(self, out: bytearray) -> None:
        self._bare = self._bare or "bare_lf"
        out += CRLF
        self._end_line()

    def _bare_cr(self, out: bytearray) -> None:
        self._bare = self._bare or "bare_cr"
        out += CRLF
        self._end_line()

    def finish(self) -> DataProblem | None:
        """After :attr:`done`: the problem to reply with, or None when the data is fine."""
        if not self.done:
            raise ValueError("DATA not finished")
        if self._line_len > self.max_line_length:  # cannot happen after CRLF; defensive
            self._too_long = True
        return self.problem


# DataReceiver state → the rest of the end-of-data marker (see DataReceiver.separator)
_SEPARATORS: dict[int, bytes | None] = {
    DataReceiver._BOL: None, DataReceiver._MID: b"\r\n.\r\n", DataReceiver._CR: b"\n.\r\n",
    DataReceiver._DOT: b"\r\n", DataReceiver._DOT_CR: b"\n",
}


def normalize_line_endings(data: bytes) -> bytes:
    """Every CRLF, bare CR and bare LF becomes CRLF."""
    return _LINE_END.sub(CRLF, data)


def encode_data(message: bytes) -> bytes:
    """Wire form of a message for the DATA phase, terminator included."""
    body = normalize_line_endings(message)
    if body and not body.endswith(CRLF):
        body += CRLF
    return _DOT_AT_LINE_START.sub(b"..", body) + b".\r\n"


class DataEncoder:
    """:func:`encode_data` in pieces: ``feed(chunk)`` for each piece of the message, then
    ``finish()``; the outputs joined equal ``encode_data(b"".join(chunks))``.

    Line endings are normalised and dot-stuffing is done per chunk with bulk ``bytes``
    operations (the common case, CRLF-only content, costs three ``count`` and one
    ``replace`` per chunk); a CR at the end of a chunk waits for the next one.
    """

    def __init__(self) -> None:
        self._bol = True  # the output so far ends at the start of a line
        self._cr = False  # a CR held back from the previous chunk

    def feed(self, data: bytes) -> bytes:
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data[-1:] == b"\r":
            data = data[:-1]
            self._cr = True
        if not data:
            return b""
        n_crlf = data.count(CRLF)
        if data.count(b"\r") != n_crlf or data.count(b"\n") != n_crlf:
            data = normalize_line_endings(data)
        out = data.replace(b"\n.", b"\n..")
        if self._bol and out[:1] == b".":
            out = b"." + out
        self._bol = out[-1:] == b"\n"
        return out

    def finish(self) -> bytes:
        """The end of the data: a CRLF when the content did not end with one, then ``.``."""
        if self._cr or not self._bol:
            self._cr, self._bol = False, True
            return b"\r\n.\r\n"
        return b".\r\n"


def decode_data(wire: bytes) -> bytes:
    """Inverse of :func:`encode_data` for well-formed input (tests, tools)."""
    r = DataReceiver(max_line_length=1 << 30, bare_lf="normalize")
    out = r.feed(wire)
    if not r.done:
        raise ValueError("no end-of-data marker")
    return out


# -- replies ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: code, and its text lines (enhanced status code included)."""

    code: int
    lines: tuple[str, ...] = ("",)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def render(self) -> str:
        """Reply lines joined with CRLF, without the final CRLF (aiosmtpd's ``push`` adds it)."""
        if len(self.lines) == 1:
            return f"{self.code} {_safe_text(self.lines[0])}".rstrip()
        lines = [_safe_text(x) for x in self.lines] or [""]
        rendered = [f"{self.code}-{x}" for x in lines[:-1]] + [f"{self.code} {lines[-1]}"]
        return "\r\n".join(x.rstrip() for x in rendered)


_UNSAFE_TEXT = re.compile(r"[\r\n\0]")


def _safe_text(s: str) -> str:
    if "\r" in s or "\n" in s or "\0" in s:
        return _UNSAFE_TEXT.sub(" ", s)
    return s


_LINE_BREAK = re.compile(r"\r?\n")


def parse_reply(text: str) -> Reply:
    """Parse ``"550 5.7.1 text"`` or a multi-line ``"250-a\\r\\n250 b"``."""
    text = text.strip("\r\n")
    if "\n" in text:
        lines = [x for x in _LINE_BREAK.split(text) if x]
    else:  # one line (most replies): no split
        lines = [text] if text else []
    if not lines:
        raise ValueError("empty reply")
    code_s = lines[0][:3]
    if not (code_s.isdigit() and len(lines[0]) >= 3 and code_s[0] in "2345"):
        raise ValueError(f"not an SMTP reply: {lines[0]!r}")
    body: list[str] = []
    for line in lines:
        if line[:3] != code_s or (len(line) > 3 and line[3] not in " -"):
            raise ValueError(f"inconsistent reply line: {line!r}")
        body.append(line[4:])
    return Reply(int(code_s), tuple(body))


MAX_REPLY_SIZE = 64 * 1024  # a reply longer than this (without its last line) is refused


def take_reply(buf: bytearray) -> Reply | None:
    """The first complete reply in ``buf`` (removed from it), or None while it is incomplete.

    A reply ends with a line whose code is not followed by ``-``. ``ValueError``: the bytes
    are not an SMTP reply, or more than :data:`MAX_REPLY_SIZE` arrived without its end.
    """
    pos = 0
    while True:
        nl = buf.find(b"\n", pos)
        if nl < 0:
            if len(buf) > MAX_REPLY_SIZE:
                raise ValueError("reply too long")
            return None
        if nl - pos < 4 or buf[pos + 3] != 45:  # not "ddd-": the last line
            text = bytes(buf[:nl + 1]).decode("utf-8", "replace")
            del buf[:nl + 1]
            try:
                return parse_reply(text)
            except ValueError:
                raise ValueError(f"bad reply: {text[:100]!r}") from None
        pos = nl + 1


# -- commands (client side) ---------------------------------------------------------------
def smtp_path(address: str) -> bytes:
    """An envelope address as an SMTP path: ``<address>``, ``<>`` for the null sender."""
    if address in ("", "<>"):
        return b"<>"
    return b"<" + address.encode("utf-8", "surrogateescape") + b">"


def mail_command(sender: str, options: Iterable[str] = ()) -> bytes:
    """``MAIL FROM:<sender>`` with its parameters (no CRLF)."""
    return b" ".join([b"MAIL FROM:" + smtp_path(sender), *(o.encode() for o in options)])


def rcpt_command(recipient: str) -> bytes:
    """``RCPT TO:<recipient>`` (no CRLF)."""
    return b"RCPT TO:" + smtp_path(recipient)


# -- XFORWARD / XCLIENT (Postfix) -------------------------------------------------------
XFORWARD_ATTRS = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
XCLIENT_ATTRS = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR", "DESTPORT")
UNAVAILABLE = "[UNAVAILABLE]"
_XTEXT_SAFE = frozenset(range(33, 127)) - {ord("+"), ord("=")}


def xtext_encode(value: str) -> str:
    """RFC 3461 xtext: ``+`` and ``=``, controls and non-ASCII as ``+HH``."""
    if (value.isascii() and value.isprintable() and " " not in value and "+" not in value
            and "=" not in value):
        return value  # nothing to encode (addresses, ports, host names): no per-byte loop
    return "".join(chr(b) if b in _XTEXT_SAFE else f"+{b:02X}" for b in value.encode())


def xtext_decode(value: str) -> str:
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


def parse_xattrs(arg: str, allowed: Iterable[str] = XFORWARD_ATTRS) -> dict[str, str]:
    """``NAME=x ADDR=y`` → {"NAME": "x", "ADDR": "y"}; raises ValueError on bad syntax."""
    names = set(allowed)
    out: dict[str, str] = {}
    for item in arg.split():
        key, sep, value = item.partition("=")
        key = key.upper()
        if not sep or key not in names:
            raise ValueError(f"bad attribute {item!r}")
        out[key] = xtext_decode(value)
    if not out:
        raise ValueError("no attributes")
    return out


def xattr_commands(verb: str, attrs: Mapping[str, str], supported: Iterable[str],
                   max_len: int = 500) -> list[str]:
    """Command lines (without CRLF) sending ``attrs`` the peer advertised, split to fit."""
    keep = {a.upper() for a in supported}
    items = [f"{k}={xtext_encode(v) if v != UNAVAILABLE else v}"
             for k, v in attrs.items() if k in keep and v]
    commands: list[str] = []
    line = verb
    for item in items:
        if len(line) + 1 + len(item) > max_len and line != verb:
            commands.append(line)
            line = verb
        line += " " + item
    if line != verb:
        commands.append(line)
    return commands


def ehlo_keywords(ehlo_text: str) -> dict[str, str]:
    """EHLO reply text (lines after the greeting) → {KEYWORD: params}."""
    out: dict[str, str] = {}
    for line in ehlo_text.split("\n")[1:]:
        kw, _, params = line.strip().partition(" ")
        if kw:
            out[kw.upper()] = params
    return out


def relay_mail_options(options: Iterable[str], next_hop_keywords: Mapping[str, str],
                       size: int | None = None) -> list[str]:
    """MAIL FROM parameters to pass on: SIZE, BODY, SMTPUTF8 when the next hop supports them."""
    out: list[str] = []
    for opt in options:
        key, _, value = opt.partition("=")
        key = key.upper()
        if key == "BODY" and "8BITMIME" in next_hop_keywords:
            out.append(f"BODY={value.upper()}")
        elif key == "SMTPUTF8" and "SMTPUTF8" in next_hop_keywords:
            out.append("SMTPUTF8")
        elif key == "SIZE" and "SIZE" in next_hop_keywords and size is None:
            out.append(f"SIZE={value}")
    if size is not None and "SIZE" in next_hop_keywords:
        out.append(f"SIZE={size}")
    return out


__all__ = [
    "DataEncoder", "DataProblem", "DataReceiver", "Reply", "decode_data", "ehlo_keywords",
    "encode_data", "mail_command", "normalize_line_endings", "parse_reply", "parse_xattrs",
    "rcpt_command", "relay_mail_options", "smtp_path", "take_reply",
    "xattr_commands", "xtext_decode", "xtext_encode",
]
