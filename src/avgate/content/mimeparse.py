"""A fast equivalent of ``BytesParser(policy=compat32).parsebytes`` for ordinary messages.

The stdlib feed parser reads a message line by line (one ``readline`` per line, each line
checked against every enclosing boundary regex), which costs ~400 µs for a typical 20 KB
mail. This module builds the *same* :class:`email.message.Message` tree — the same headers,
default types and payload strings for every entity — but finds boundary lines with
``str.find`` and handles bodies as slices, so a 20 KB message parses in a few tens of µs.

It mirrors ``email.feedparser.FeedParser._parsegen`` step for step (the same "false EOF"
stack of enclosing boundaries, preamble and close-delimiter handling, duplicate boundary
lines, the line break before a boundary belonging to the boundary, a start boundary that
never comes), keeping what the tree holds, preambles and epilogues included (they are
scanned as parts of their own); defects are not recorded, as nothing in avgate reads them.
Whatever it does not mirror raises :class:`Unsupported`, and the caller uses the email
package instead, so correctness never depends on this module handling a corner:

* a bare CR (a line end to the feed parser) in a header block or next to a boundary line;
* a boundary containing CR or LF, or nesting deeper than :data:`MAX_DEPTH`;
* ``message/delivery-status``;
* a ``From `` line at the end of a header block (the feed parser pushes it back);
* a line after a part that matches no boundary (the feed parser's ``assert``).

The differential tests in ``tests/unit/content/test_mimeparse.py`` compare both parsers.

Both parsers build :class:`MimeMessage` entities: an ``email.message.Message`` whose
parameter parser is linear (the stdlib's ``_parseparam`` is quadratic in the number of
``;`` inside a quoted value: a 62 KB header took seconds), with the same results. Both
stop with :class:`TooManyParts` once a message has more entities than allowed, so a
100,000-part message never becomes a 100,000-entity tree.
"""

from __future__ import annotations

import re
from email import utils
from email.feedparser import FeedParser, headerRE  # type: ignore[attr-defined]
from email.message import Message
from email.policy import compat32
from typing import Any

__all__ = ["MAX_DEPTH", "MimeLimit", "MimeMessage", "TooManyHeaderLines", "TooManyParts",
           "Unsupported", "filename", "param", "parse", "parse_email_package", "parse_params"]

MAX_DEPTH = 64  # entities nested deeper than this: left to the email package


class Unsupported(Exception):
    """The message uses something this parser does not mirror: use the email package."""


class MimeLimit(Exception):
    """The message is larger in some count than allowed: parsing stopped."""


class TooManyParts(MimeLimit):
    """The message has more entities (parts, nested parts, enclosed messages) than allowed."""


class TooManyHeaderLines(MimeLimit):
    """The header blocks of the message hold more lines, in all, than allowed."""


# -- parameter lists in linear time -----------------------------------------------------
_UNESCAPED_QUOTE = re.compile(r'(?<!\\)"')


def parse_params(value: str) -> list[str]:
    """``email.message._parseparam(value)``, in linear time.

    The stdlib ends a parameter at the first ``;`` before which the parameter holds an even
    number of quotes (``"`` not preceded by a backslash), counting from the start of the
    parameter at every candidate ``;`` and copying the rest of the string after each
    parameter: quadratic for a quoted value full of ``;``. Here the parity is carried from
    quote to quote instead (a ``;`` can only end the parameter after a quote changed it), so
    every character is looked at a bounded number of times; the result is the same list.
    """
    s = ";" + str(value)
    size = len(s)
    plist: list[str] = []
    pos = 0  # s[pos] == ";" while pos < size
    while pos < size:
        start = pos + 1
        end = s.find(";", start)
        if end > start and (s.count('"', start, end) - s.count('\\"', start, end)) % 2:
            while True:  # an odd number of quotes before ``end``: it is inside a quoted value
                quote = _UNESCAPED_QUOTE.search(s, end)
                if quote is None:
                    end = -1
                    break
                after = quote.end()
                end = s.find(";", after)
                if end < 0:
                    break
                # s[after - 1] is a quote, no backslash: the counts need no look behind
                if not (s.count('"', after, end) - s.count('\\"', after, end)) % 2:
                    break
        if end < 0:
            end = size
        f = s[start:end]
        if "=" in f:
            i = f.index("=")
            f = f[:i].strip().lower() + "=" + f[i + 1:].strip()
        plist.append(f.strip())
        pos = end
    return plist


class MimeMessage(Message):
    """An ``email.message.Message`` whose parameter lists are parsed in linear time."""

    def _get_params_preserve(self, failobj: Any, header: str) -> Any:
        # Message._get_params_preserve, with parse_params for _parseparam.
        missing = object()
        value = self.get(header, missing)
        if value is missing:
            return failobj
        params = []
        for p in parse_params(str(value)):
            try:
                name, val = p.split("=", 1)
                name = name.strip()
                val = val.strip()
            except ValueError:
                # Must have been a bare attribute
                name = p.strip()
                val = ""
            params.append((name, val))
        return utils.decode_params(params)


class _CountingFactory:
    """The feed parser's message factory: refuses to make more than ``limit`` parts."""

    __slots__ = ("count", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = -1  # the root is no part

    def __call__(self, policy: Any = compat32) -> MimeMessage:
        self.count += 1
        if self.count > self.limit:
            raise TooManyParts(self.limit)
        return MimeMessage(policy=policy)


class _LimitedFeedParser(FeedParser):
    """The feed parser, counting the header lines of every entity it parses."""

    def __init__(self, factory: Any, max_header_lines: int | None) -> None:
        super().__init__(_factory=factory, policy=compat32)
        self._header_budget = max_header_lines

    def _parse_headers(self, lines: list[str]) -> None:
        if self._header_budget is not None:
            self._header_budget -= len(lines)
            if self._header_budget < 0:
                raise TooManyHeaderLines()
        super()._parse_headers(lines)  # type: ignore[misc]


def parse_email_package(data: bytes, max_parts: int | None = None,
                        max_header_lines: int | None = None) -> Message:
    """``BytesParser(_class=MimeMessage, policy=compat32).parsebytes(data)``, stopped with
    :class:`TooManyParts` at the entity after ``max_parts``, with :class:`TooManyHeaderLines`
    past ``max_header_lines`` header lines in all (None: no limit)."""
    factory = _CountingFactory(max_parts if max_parts is not None else -1)
    parser = _LimitedFeedParser(factory if max_parts is not None else MimeMessage,
                                max_header_lines)
    factory.count = -1  # the feed parser makes one message to try the factory out
    text = data.decode("ascii", "surrogateescape")
    for start in range(0, len(text), 8192):  # as Parser.parse feeds it
        parser.feed(text[start:start + 8192])
    return parser.close()


_source_parse = compat32.header_source_parse
# A run of lines the feed parser's header loop takes (headerRE, then the rest of the line).
# Possessive: the match is always the longest run, and a backtracking point saved for each of
# a million lines would cost hundreds of megabytes.
_HEADER_LINES = re.compile(r"(?:(?:From |[\041-\071\073-\176]*+:|[\t ])[^\n]*+(?:\n|\Z))*+")
# One field of a block whose lines all start with a name and ":" or a blank (continuation):
# compat32's header_source_parse (name up to ":", value without its leading blanks and,
# once the caller strips it, the final line break) for every field at once.
_FIELD = re.compile(r"([\041-\071\073-\176]*):[ \t]*([^\n]*(?:\n|\Z)(?:[\t ][^\n]*(?:\n|\Z))*)")
_ODD_FIRST = frozenset(" \t:")  # a continuation or an empty name first
assert headerRE.pattern == r"^(From |[\041-\071\073-\176]*:|[\t ])"  # the same rule


def parse(data: bytes, max_parts: int | None = None,
          max_header_lines: int | None = None) -> Message:
    """The Message ``email.parser.BytesParser(policy=compat32).parsebytes(data)`` returns
    (of :class:`MimeMessage` entities, as :func:`parse_email_package` makes).

    Raises :class:`Unsupported` for input it does not handle exactly like the email
    package, :class:`TooManyParts` past ``max_parts`` entities below the root,
    :class:`TooManyHeaderLines` past ``max_header_lines`` header lines in all.
    """
    # The feed parser works on this text too; ASCII bytes are one character each, others
    # become lone surrogates, so payload slices are exactly the feed parser's strings.
    parser = _Parser(data.decode("ascii", "surrogateescape"), data.isascii())
    if max_parts is not None:
        parser.max_parts = max_parts
    if max_header_lines is not None:
        parser.header_budget = max_header_lines
    return parser.message()


# -- parameters -------------------------------------------------------------------------
# Message.get_param parses a parameter list in four layers (_parseparam, decode_params, two
# unquotes, collapse_rfc2231_value); for the usual list — no RFC 2231 "*", no escapes, no
# "<>" — that comes down to these two patterns. Anything else: Unsupported.
_SIMPLE_PARAMS = re.compile(
    r'[^;"=\\*<>]*'  # the type or disposition (has no "=", so it is no parameter)
    r'(?:;[ \t\r\n]*[A-Za-z0-9_.+-]+[ \t]*=[ \t]*(?:"[^"\\;<>]*"|[^"\\;<>\s]*)[ \t\r\n]*)*\Z')
_PARAM = re.compile(r';[ \t\r\n]*([A-Za-z0-9_.+-]+)[ \t]*=[ \t]*("[^"\\;<>]*"|[^"\\;<>\s]*)')


def param(msg: Message, header: str, name: str) -> str | None:
    """``collapse_rfc2231_value(msg.get_param(name, header=header))``, None when missing.

    ``name`` is lower case. Raises Unsupported where the parameter list is not a simple one.
    """
    value = msg.get(header)
    if value is None:
        return None
    if not isinstance(value, str) or not value.isascii() or not _SIMPLE_PARAMS.match(value):
        raise Unsupported("parameter list")
    first = value.partition(";")[0]
    if first.strip().lower() == name:  # get_param would return this "parameter"
        raise Unsupported("parameter list")
    key: str
    raw: str
    for key, raw in _PARAM.findall(value, len(first)):
        if key.lower() == name:
            return raw[1:-1] if raw[:1] == '"' else raw
    return None


def filename(msg: Message) -> str | None:
    """``msg.get_filename()``; raises Unsupported where :func:`param` does."""
    name = param(msg, "content-disposition", "filename")
    if name is None:
        name = param(msg, "content-type", "name")
    return None if name is None else name.strip()


class _Parser:
    """One parse: the text, where reading is, and the enclosing boundaries (false EOFs)."""

    __slots__ = ("ascii", "end", "eofstack", "header_budget", "last", "last_multipart",
                 "matches", "max_parts", "parts", "pos", "text")

    def __init__(self, text: str, ascii: bool) -> None:
        self.parts = 0  # entities made below the root
        self.max_parts = -1  # no limit
        self.header_budget = -1  # header lines left to parse; no limit when negative
        self.text = text
        self.ascii = ascii
        self.end = len(text)
        self.pos = 0
        self.eofstack: list[str] = []  # separators ("--" + boundary), innermost last
        # separator → (start of its next boundary line, same) or (-1, up to where there is
        # none), as found from some earlier position (see next_match)
        self.matches: dict[str, tuple[int, int]] = {}
        self.last: Message | None = None  # the feed parser's _last: whose line break to trim
        self.last_multipart = False  # whether self.last is a multipart

    # -- lines ------------------------------------------------------------------------------
    # Positions handed around are line starts, in the feed parser's sense as well: lines end
    # in LF or CRLF. A bare CR (also a line end to the feed parser) is looked for only where
    # it could make a difference — in header blocks and before or after a separator — and
    # raises Unsupported there; anywhere else it is inside a payload either way.
    def eol_after_blanks(self, pos: int) -> int | None:
        """End of the line if only blanks follow ``pos`` on it; None otherwise."""
        text, end = self.text, self.end
        while pos < end and text[pos] in " \t":
            pos += 1
        if pos == end:
            return end
        char = text[pos]
        if char == "\n":
            return pos + 1
        if char == "\r":
            if text.startswith("\r\n", pos):
                return pos + 2
            raise Unsupported("bare CR")
        return None

    def boundary_tail(self, pos: int) -> tuple[bool, int] | None:
        """For a line whose separator ends at ``pos``: (close delimiter?, end of the line).

        The feed parser's ``(?P<end>--)?(?P<ws>[ \\t]*)(?P<linesep>\\r\\n|\\r|\\n)?$`` applied
        to the rest of the line; None when it does not match.
        """
        if self.text.startswith("--", pos):
            found = self.eol_after_blanks(pos + 2)
            if found is not None:
                return True, found
        found = self.eol_after_blanks(pos)
        return None if found is None else (False, found)

    def line_matches(self, pos: int, sep: str) -> tuple[bool, int] | None:
        """Whether the line starting at ``pos`` is a boundary line for ``sep``."""
        if not self.text.startswith(sep, pos):
            return None
        return self.boundary_tail(pos + len(sep))

    def next_match(self, sep: str, pos: int, limit: int) -> int:
        """Start of the first boundary line for ``sep`` in [``pos``, ``limit``), else ``limit``.

        ``pos`` is a line start, and never smaller than in an earlier call. Searches stop at
        ``limit`` (where an enclosing boundary ends the entity anyway), so that a boundary
        that never comes back is not looked for to the end of the message again and again.
        """
        start = pos
        cached = self.matches.get(sep)
        if cached is not None:
            found, covered = cached  # a match at found, or none from an earlier pos to covered
            if found >= 0:
                if found >= pos:
                    return found if found < limit else limit
            elif covered > pos:
                if covered >= limit:
                    return limit
                start = covered
        text, size = self.text, len(sep)
        at = text.find(sep, start, limit + size - 1)  # every start before limit
        while at != -1:
            if at == pos or text[at - 1] == "\n":
                if self.boundary_tail(at + size) is not None:
                    self.matches[sep] = (at, at)
                    return at
            elif text[at - 1] == "\r":  # not followed by LF: a bare CR starts this line
                raise Unsupported("bare CR")
            at = text.find(sep, at + 1, limit + size - 1)
        self.matches[sep] = (-1, limit)
        return limit

    def eof_at(self, pos: int) -> int:
        """Where the current entity ends: the first line that is an enclosing boundary."""
        found = self.end
        for sep in self.eofstack:  # outermost first: it bounds the searches for the others
            found = self.next_match(sep, pos, found)
        return found

    def at_eof(self) -> bool:
        """What the feed parser's ``readline() == ''`` says at the current position."""
        pos = self.pos
        if pos >= self.end:
            return True
        for sep in self.eofstack:
            if self.line_matches(pos, sep) is not None:
                return True
        return False

    # -- entities ---------------------------------------------------------------------------
    def message(self) -> Message:
        return self.entity(None, "", 0)

    def entity(self, parent: Message | None, parent_type: str, depth: int) -> Message:
        """``_parsegen``: one entity from the current position to its (false) EOF."""
        if depth > MAX_DEPTH:
            raise Unsupported("nesting depth")
        msg = MimeMessage(policy=compat32)
        if parent is not None:
            self.parts += 1
            if self.parts > self.max_parts >= 0:
                raise TooManyParts(self.max_parts)
            if parent_type == "multipart/digest":
                msg.set_default_type("message/rfc822")
            parent.attach(msg)
        self.last = msg
        self.headers(msg)
        ctype = msg.get_content_type()
        maintype = ctype.split("/")[0]
        self.last_multipart = maintype == "multipart"
        if maintype == "message":
            if ctype == "message/delivery-status":
                raise Unsupported(ctype)
            self.entity(msg, ctype, depth + 1)  # the enclosed message, to the same EOF
        elif maintype == "multipart":
            self.multipart(msg, ctype, depth)
        else:
            start, self.pos = self.pos, self.eof_at(self.pos)
            msg.set_payload(self.text[start:self.pos])
        return msg

    def headers(self, msg: Message) -> None:
        """The header loop of ``_parsegen`` followed by ``_parse_headers``."""
        text, start = self.text, self.pos
        # The lines the header loop takes: header lines up to the (false) EOF.
        limit = self.eof_at(start) if self.eofstack else self.end
        found = _HEADER_LINES.match(text, start, limit)
        pos = found.end()  # type: ignore[union-attr]
        block = text[start:pos]
        if self.header_budget >= 0:
            # the lines the feed parser would hand _parse_headers (the last may lack a LF)
            self.header_budget -= block.count("\n") + (not block.endswith("\n") and bool(block))
            if self.header_budget < 0:
                raise TooManyHeaderLines()
        if "\r" in block and block.count("\r") != block.count("\r\n"):
            raise Unsupported("bare CR")
        if pos < limit:  # the line that ended the block
            char = text[pos]
            if char == "\n":
                pos += 1  # the blank line between header and body
            elif char == "\r":
                if not text.startswith("\r\n", pos):
                    raise Unsupported("bare CR")
                pos += 2
            # Otherwise the line is the first of the body (a defect, not recorded).
        self.pos = pos
        if not block:
            return
        store: list[tuple[str, str]] = msg._headers  # type: ignore[attr-defined]
        if (block[0] not in _ODD_FIRST and not block.startswith("From ")
                and "\nFrom " not in block and "\n:" not in block):
            # The usual block: every field is a name, ":", a value and continuation lines.
            store.extend([(name, raw.rstrip("\r\n")) for name, raw in _FIELD.findall(block)])
            return
        lines = block.split("\n")
        tail = lines.pop()  # "" after a final LF, else a last line without one
        lines = [line + "\n" for line in lines]
        if tail:
            lines.append(tail)
        last = len(lines) - 1
        value: list[str] = []
        for lineno, line in enumerate(lines):
            if line[0] in " \t":
                if value:
                    value.append(line)
                # else: a continuation line first (a defect): ignored
                continue
            if value:
                store.append(_source_parse(value))
                value = []
            if line.startswith("From "):
                if lineno == 0:
                    continue  # the Unix envelope line (set_unixfrom)
                if lineno == last:
                    raise Unsupported("From line ends the header block")
                continue  # a misplaced envelope line (a defect): ignored
            if line[0] == ":":
                continue  # no header name (a defect): ignored
            value = [line]
        if value:
            store.append(_source_parse(value))

    def multipart(self, msg: Message, ctype: str, depth: int) -> None:
        """The multipart branch of ``_parsegen``."""
        try:
            boundary = param(msg, "content-type", "boundary")
            if boundary is not None:
                boundary = boundary.rstrip()
        except Unsupported:
            boundary = msg.get_boundary()
        if boundary is None:
            # No boundary: everything to the EOF is the payload (a defect).
            start, self.pos = self.pos, self.eof_at(self.pos)
            msg.set_payload(self.text[start:self.pos])
            return
        if "\r" in boundary or "\n" in boundary:
            raise Unsupported("line break in boundary")
        if not self.ascii:
            # The feed parser looks at the transfer encoding here (for a defect): the same
            # call, so that a header it cannot handle fails both parsers alike.
            str(msg.get("content-transfer-encoding", "8bit")).lower()
        sep = "--" + boundary
        # The preamble: lines up to the first boundary line, unless an enclosing boundary
        # (or the end) comes first — then there are no parts and the preamble is the payload.
        start = self.pos
        eof = self.eof_at(start)
        first = self.next_match(sep, start, eof)
        if eof <= first:  # an enclosing boundary wins a tie, as readline checks those first
            self.pos = eof
            msg.set_payload(self.text[start:eof])
            msg.epilogue = ""
            return
        close, self.pos = self.boundary_tail(first + len(sep))  # type: ignore[misc]
        if close:
            # The close delimiter before any part: the preamble is the payload, and what
            # follows up to the EOF is read as an epilogue and dropped (the feed parser's
            # epilogue is then empty).
            msg.set_payload(self.text[start:first])
            self.pos = self.eof_at(self.pos)
            msg.epilogue = ""
            return
        if first > start:  # the preamble, without the line break of the boundary line
            msg.preamble = _strip_eol(self.text[start:first])
        while True:
            # After a separator line: further boundary lines (even a close delimiter) are
            # skipped, as the feed parser does not make empty parts of doubled boundaries.
            while not self.at_eof():
                found = self.line_matches(self.pos, sep)
                if found is None:
                    break
                self.pos = found[1]
            self.eofstack.append(sep)
            self.entity(msg, ctype, depth + 1)
            # The line break before the boundary line belongs to the boundary: it comes off
            # the payload of the part before it, or off the epilogue of a multipart.
            last = self.last
            assert last is not None
            if not self.last_multipart:
                payload = vars(last)["_payload"]  # what get_payload() would transform
                if isinstance(payload, str):
                    last.set_payload(_strip_eol(payload))
            elif last.epilogue == "":
                last.epilogue = None
            elif last.epilogue is not None:
                last.epilogue = _strip_eol(last.epilogue)
            self.eofstack.pop()
            self.last, self.last_multipart = msg, True
            if self.at_eof():
                return  # no close delimiter (a defect)
            found = self.line_matches(self.pos, sep)
            if found is None:
                raise Unsupported("line after a part is no boundary")
            close, self.pos = found
            if close:
                start, self.pos = self.pos, self.eof_at(self.pos)
                msg.epilogue = self.text[start:self.pos]
                return


def _strip_eol(text: str) -> str:
    """``text`` without one final CRLF, LF or CR (the feed parser's NLCRE_eol)."""
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith(("\n", "\r")):
        return text[:-1]
    return text
