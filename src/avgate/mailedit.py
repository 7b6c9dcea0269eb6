"""Applying a policy Decision to RFC 5322 message bytes.

Adding headers and prefixing the subject are textual edits of the header block: every other
byte of the message is kept, in the message's own line ending (CRLF or LF). Only replacing
infected parts re-serialises the message through the email package (compat32, the same
parser decomposition uses, so part numbers agree).

Part paths (``Finding.part``) follow :mod:`avgate.content.mime`, root name ``""``: a
multipart's children are ``1..n`` (nested ``2/3``), a single-part message's body is ``1``, a
part with a file name adds it as a segment (``2/evil.zip``), archive members follow
(``2/evil.zip/x.exe``), and ``~...`` suffixes mark alternative decodings. The first
non-numeric segment ends the walk: that part is replaced as a whole. A path that cannot be
resolved in our parse (``~boundary2``: a reading other parsers make) replaces the whole
body: the infected content must not get through because we could not find it.

``replace`` on a ``skipped``/``unknown`` result (Kernun's REPLACE-AV-UNKNOWN) replaces the
parts that were not scanned: the paths of the result's ``details`` (the decomposition's
problems: an encrypted archive, a part over a limit), with the policy's unscanned notice;
a result without part paths (an engine that only said "not scanned") has its whole body
replaced. :func:`apply_decision` says which of the decision's edits it carried out, so a
front-end logs what it did, not what was asked.

Removing header fields (:class:`HeaderFilter`, :func:`strip_headers`): before avgate adds
its verdict headers, every incoming copy of every header it may write is removed (a sender's
own ``X-Virus-Status: Clean`` must never reach the recipient). The filter reads the header
block only, in linear time and in pieces (a 100 MB message relayed from its spool file is
never held or parsed whole); the body passes through untouched. It is deliberately generous
about what a header line is: CRLF, LF and a bare CR all end a line (as Python's email parser
and some MUAs read them), ``Name :`` (obsolete syntax) matches ``Name:``, case is ignored,
and a removed field takes its continuation lines with it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from email.charset import QP, Charset
from email.generator import BytesGenerator
from email.header import Header
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from io import BytesIO
from typing import TYPE_CHECKING

from .result import ScanResult, ScanStatus

if TYPE_CHECKING:
    from .decision import Decision

_HEADER_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")  # match() anchors at pos
_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP


@dataclass(frozen=True, slots=True)
class Edited:
    """The edited message and the decision's edits that were carried out (``replace``,
    ``prefix_subject``, ``tag``; ``replaced``: how many parts were replaced)."""

    data: bytes
    applied: tuple[str, ...] = ()
    replaced: int = 0


def apply_decision(data: bytes, decision: Decision, result: ScanResult,
                   remove: Iterable[str] = ()) -> Edited:
    """``data`` with the decision's part replacements, subject prefix and headers applied,
    and what of that was done.

    ``remove``: header names (any case) whose incoming copies are removed first, normally
    ``gateway.policy.own_header_names()`` (read per message), so that the only verdict
    headers the recipient sees are the ones added here.
    """
    applied: list[str] = []
    replaced = 0
    data = strip_headers(data, remove)
    if decision.replace and replace_targets(result):
        data, replaced = _replace(data, result, decision.notice, decision.refid)
        if replaced:
            applied.append("replace")
    if decision.subject_prefix:
        data = prefix_subject(data, decision.subject_prefix)
        applied.append("prefix_subject")
    if decision.headers:
        data = add_headers(data, decision.headers)
        if any(n != decision.refid_header for n, _ in decision.headers):
            applied.append("tag")
    return Edited(data, tuple(applied), replaced)


def edit_message(data: bytes, decision: Decision, result: ScanResult,
                 remove: Iterable[str] = ()) -> bytes:
    """``data`` with the decision's edits applied (see :func:`apply_decision`)."""
    return apply_decision(data, decision, result, remove).data


# -- textual header edits -------------------------------------------------------------------
def line_ending(data: bytes) -> bytes:
    """The message's own line ending: CRLF if its first line ends so, else LF."""
    nl = data.find(b"\n")
    return b"\r\n" if nl > 0 and data[nl - 1:nl] == b"\r" else b"\n"


def _header_end(data: bytes) -> int:
    """Offset where the header block ends (start of the empty line), or len(data)."""
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        line = data[pos:] if nl < 0 else data[pos:nl + 1]
        if line in (b"\n", b"\r\n"):
            return pos
        if nl < 0:
            return len(data)
        pos = nl + 1
    return len(data)


def _clean_value(value: str) -> bytes:
    """A header value as one safe line: no CR/LF (header injection), RFC 2047 if not ASCII."""
    value = " ".join(value.replace("\r", " ").replace("\n", " ").split())
    if value.isascii():
        return value.encode("ascii")
    return Header(value, "utf-8").encode(linesep="\n").replace("\n", "").encode("ascii")


def add_headers(data: bytes, headers: tuple[tuple[str, str], ...] | list[tuple[str, str]]
                ) -> bytes:
    """Insert ``headers`` (in order) at the top of the header block; nothing else changes."""
    if not headers:
        return data
    eol = line_ending(data)
    lines = []
    for name, value in headers:
        if not _HEADER_NAME.match(name.encode("ascii", "replace") + b":"):
            raise ValueError(f"bad header name {name!r}")
        lines.append(name.encode("ascii") + b": " + _clean_value(value) + eol)
    return b"".join(lines) + data


# -- removing header fields ------------------------------------------------------------------
_TERMINATOR = re.compile(rb"\r\n|\r|\n")
_CONTINUATIONS = re.compile(rb"(?:[ \t][^\r\n]*(?:\r\n|\r|\n|\Z))*")
_LONG_LINE = 8192  # an unterminated line longer than this is decided on from its start


@functools.lru_cache(maxsize=64)
def _name_patterns(names: frozenset[bytes]) -> tuple[re.Pattern[bytes], re.Pattern[bytes]]:
    """(a whole field with one of ``names``, continuation lines included; the start of a
    long line that begins one). A field starts at the start of the text or after any line
    terminator."""
    alt = b"|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    eol = rb"(?:\r\n|\r|\n|\Z)"
    field = re.compile(rb"(?<![^\r\n])(?:" + alt + rb")[ \t]*:[^\r\n]*" + eol
                       + rb"(?:[ \t][^\r\n]*" + eol + rb")*", re.IGNORECASE)
    # a line too long to hold is removed when it starts with a name and white space up to
    # a colon or up to all that was seen of it (a bizarre line, harmless to remove)
    start = re.compile(rb"(?:" + alt + rb")[ \t]*(?::|\Z)", re.IGNORECASE)
    return field, start


@functools.lru_cache(maxsize=64)
def _wanted_names(names: frozenset[str]) -> frozenset[bytes]:
    """Header names as :class:`HeaderFilter` matches them: stripped, lower-cased, ASCII."""
    return frozenset(n.strip().lower().encode("ascii") for n in names
                     if n.strip() and n.isascii())


def _header_block_end(buf: bytes, pos: int) -> int:
    """Where the empty line ending the header block starts, looking from ``pos`` (a line
    start), or -1. A line is ended by CRLF, LF or a bare CR."""
    if buf[pos:pos + 1] in (b"\r", b"\n"):
        return pos
    start, end = max(pos - 1, 0), len(buf)
    for pair in (b"\n\n", b"\n\r", b"\r\r"):  # each search stops where one was found
        i = buf.find(pair, start, end)
        if i >= 0:
            end = i + 1
    return end if end < len(buf) else -1


class HeaderFilter:
    """Removes every header field named in ``names`` from a message fed in pieces.

    ``feed(piece)`` returns what to pass on (possibly empty), ``finish()`` the rest; the
    outputs joined are :func:`strip_headers` of the pieces joined, however the message was
    cut. Only the header block is examined; once its end is seen every piece is returned
    as it is. Memory: at most one unterminated line of up to ``_LONG_LINE`` bytes is held
    (a longer one is passed on or dropped as it comes, decided by its start). ``removed``
    counts the fields removed.
    """

    def __init__(self, names: Iterable[str]) -> None:
        # the same frozenset for every message (Policy.own_header_names): normalised once
        wanted = _wanted_names(frozenset(names))
        self._needles = tuple(wanted)
        patterns = _name_patterns(wanted) if wanted else None
        self._field: re.Pattern[bytes] | None = patterns[0] if patterns else None
        self._start: re.Pattern[bytes] | None = patterns[1] if patterns else None
        self.done = not wanted  # past the header block (or nothing to remove)
        self.removed = 0
        self._pending = b""  # an unterminated line (or a CR that may be half of a CRLF)
        self._drop = False  # the field being read is being removed
        self._midline = False  # inside a long line whose fate is self._drop

    def feed(self, data: bytes) -> bytes:
        if self.done:
            if self._pending:
                data, self._pending = self._pending + data, b""
            return data
        if not data:
            return b""
        buf = self._pending + data if self._pending else data
        self._pending = b""
        out: list[bytes | memoryview] = []
        pos = 0
        if self._midline:  # the rest of a long line: up to its terminator
            m = _TERMINATOR.search(buf)
            if m is None or (m.end() == len(buf) and buf[-1:] == b"\r"):
                keep = buf[:-1] if buf[-1:] == b"\r" else buf
                self._pending = buf[len(keep):]
                return b"" if self._drop else keep
            if not self._drop:
                out.append(buf[:m.end()])
            pos = m.end()
            self._midline = False
        end = _header_block_end(buf, pos)
        if end >= 0:  # the header block ends in this piece
            self.done = True
            head = buf[pos:end]
            kept = self._strip_lines(head)
            if kept is head and not out and pos == 0 and buf is data:
                return data  # nothing removed: no copy of a large piece
            out.append(kept)
            out.append(memoryview(buf)[end:])
            return b"".join(out)
        # complete lines only; a CR at the very end may be half of a CRLF: wait for more
        limit = len(buf) - 1 if buf[-1:] == b"\r" else len(buf)
        cut = max(buf.rfind(b"\n", pos, limit), buf.rfind(b"\r", pos, limit)) + 1
        if cut > pos:
            out.append(self._strip_lines(buf[pos:cut]))
            pos = cut
        rest = buf[pos:]
        if len(rest) <= _LONG_LINE:
            self._pending = rest
        else:  # a long unterminated line: its start says whose it is
            assert self._start is not None
            continuation = rest[:1] in (b" ", b"\t")
            if not continuation:
                self._drop = self._start.match(rest) is not None
                self.removed += self._drop
            body = rest[:-1] if rest[-1:] == b"\r" else rest
            self._pending = rest[len(body):]
            if not self._drop:
                out.append(body)
            self._midline = True
        return b"".join(out)

    def finish(self) -> bytes:
        """The held-back end of the message (call once, after the last piece)."""
        rest, self._pending = self._pending, b""
        if self.done or not rest:
            return rest
        if self._midline:
            self._midline = False
            return b"" if self._drop else rest
        return self._strip_lines(rest)

    def _strip_lines(self, lines: bytes) -> bytes:
        """Complete header lines (the last may lack its terminator only in ``finish``),
        starting at a line start, with the named fields removed; follows ``_drop``."""
        if self._drop:  # continuation lines of a field removed in an earlier piece
            m = _CONTINUATIONS.match(lines)
            if m is not None and m.end():
                lines = lines[m.end():]
            if not lines:
                return b""
        self._drop = False
        low = lines.lower()
        hits = [i for i in map(low.find, self._needles) if i >= 0]
        if not hits:  # the common case: C-speed finds, no regex
            return lines
        assert self._field is not None
        kept: list[bytes] = []
        last = 0
        for m in self._field.finditer(lines, min(hits)):
            kept.append(lines[last:m.start()])
            last = m.end()
            self.removed += 1
        kept.append(lines[last:])
        # the last field was removed: continuation lines in the next piece go with it
        self._drop = last == len(lines) and last > 0
        return b"".join(kept)


def strip_headers(data: bytes, names: Iterable[str]) -> bytes:
    """``data`` without the header fields named in ``names`` (case-insensitive); only the
    header block is read, the body is returned as it is."""
    f = HeaderFilter(names)
    if f.done:
        return data
    out = f.feed(data)
    tail = f.finish()
    return out + tail if tail else out


def _encoded_word(text: str) -> str:
    return Header(text, "utf-8").encode(linesep="\n").replace("\n", "")


def prefix_subject(data: bytes, prefix: str) -> bytes:
    """Prefix the Subject (added when missing) without breaking RFC 2047 encoded words."""
    stripped = prefix.strip()
    if not stripped:
        return data
    eol = line_ending(data)
    end = _header_end(data)
    pos = 0
    while pos < end:
        nl = data.find(b"\n", pos, end)
        line_end = end if nl < 0 else nl + 1
        m = _HEADER_NAME.match(data, pos, line_end)
        if m and m.group(1).lower() == b"subject":
            return data[:pos] + _prefixed(data[pos:line_end], m.end() - pos, prefix) + \
                data[line_end:]
        pos = line_end
    value = stripped if stripped.isascii() else _encoded_word(stripped)
    return b"Subject: " + value.encode("ascii") + eol + data


def _prefixed(line: bytes, colon_end: int, prefix: str) -> bytes:
    """One Subject line (its first physical line) with ``prefix`` before its value."""
    head, rest = line[:colon_end], line[colon_end:]
    value = rest.lstrip(b" \t")
    lead = rest[:len(rest) - len(value)] or b" "
    stripped = prefix.strip()
    if value.startswith(stripped.encode("utf-8")):
        return line  # already prefixed (e.g. the message passed us twice)
    starts_encoded = value.startswith(b"=?")
    if prefix.isascii():
        # A plain word before an encoded word is fine as long as whitespace separates
        # them: decoders keep that whitespace, so the reader sees "PREFIX subject".
        word = stripped.encode("ascii") + b" "
    elif starts_encoded:
        # Whitespace between two encoded words is dropped when decoding: carry the
        # separating space inside ours.
        word = _encoded_word(stripped + " ").encode("ascii") + b" "
    else:
        word = _encoded_word(stripped).encode("ascii") + b" "
    if value in (b"\r\n", b"\n", b""):  # an empty Subject
        word = word.rstrip(b" ")
    return head + lead + word + value


# -- part replacement -----------------------------------------------------------------------
def _notice_text(template: str, virus: str, filename: str, reason: str = "",
                 refid: str = "") -> str:
    # plain replace, not str.format: a notice with other braces must not raise
    return (template.replace("{virus}", virus).replace("{filename}", filename or "-")
            .replace("{reason}", reason or "-").replace("{refid}", refid or "-"))


def replace_targets(result: ScanResult) -> list[tuple[str, str, str]]:
    """(part path, virus name, reason) of what ``replace`` replaces in ``result``: the
    findings of an infected result; the parts not scanned of a skipped/unknown one (its
    ``details``, "status: reason" per path), or the whole body (path "") when the result
    names none; nothing for clean/error results."""
    if result.status is ScanStatus.INFECTED:
        return [(f.part, f.name, "") for f in result.findings]
    if result.status not in (ScanStatus.SKIPPED, ScanStatus.UNKNOWN):
        return []
    targets = []
    for path, note in result.details:
        word, sep, reason = note.partition(": ")
        if sep and word in (ScanStatus.SKIPPED.value, ScanStatus.UNKNOWN.value):
            targets.append((path, "", reason))
    return targets or [("", "", result.reason or result.status.value)]


def _resolve(root: Message, path: str) -> Message | None:
    """The entity to replace for a finding at ``path``; None when it is not in our parse."""
    if "~boundary2" in path:
        return None
    segments = [s.split("~", 1)[0] for s in path.split("/")] if path else []
    entity = root
    target = root  # what replacing means at this point: a whole part or the message body
    is_message = True
    for seg in segments:
        if entity.get_content_maintype() == "message" and entity.is_multipart():
            inner = entity.get_payload(0)  # message/rfc822: the enclosed message
            assert isinstance(inner, Message)
            entity, is_message = inner, True
        if not seg.isdigit():
            break  # a file name or archive member: replace the part that holds it
        payload = entity.get_payload()
        if isinstance(payload, list):
            index = int(seg) - 1
            child = payload[index] if 0 <= index < len(payload) else None
            if not isinstance(child, Message):
                return None
            entity = target = child
            is_message = False
        elif is_message and seg == "1":
            continue  # a single-part message's body: replace that message's body / part
        else:
            break
    return target


def _make_notice(text: str) -> Message:
    part = Message()
    if text.isascii():
        part["Content-Type"] = 'text/plain; charset="us-ascii"'
        part["Content-Transfer-Encoding"] = "7bit"
        part.set_payload(text)
    else:
        part.set_payload(text, _UTF8_QP)
    part["Content-Disposition"] = 'inline; filename="virus-removed.txt"'
    return part


def _replace_in_place(entity: Message, notice: Message) -> None:
    """Turn ``entity`` (keeping its other headers, e.g. the message's own) into the notice."""
    for name in ("Content-Type", "Content-Transfer-Encoding", "Content-Disposition",
                 "Content-Description", "Content-ID", "MIME-Version"):
        del entity[name]
    if entity is not notice:
        entity["MIME-Version"] = "1.0"
        for name, value in notice.items():
            entity[name] = value
        entity.set_payload(notice.get_payload())
        entity.preamble = entity.epilogue = None


def _parent_of(root: Message, child: Message) -> Message | None:
    for entity in root.walk():
        payload = entity.get_payload()
        if isinstance(payload, list) and any(p is child for p in payload):
            return entity
    return None


def replace_parts(data: bytes, result: ScanResult, notice_template: str,
                  refid: str = "") -> bytes:
    """Replace every MIME part a finding points at (or, for a skipped/unknown result, every
    part not scanned) with a text/plain notice."""
    return _replace(data, result, notice_template, refid)[0]


def _replace(data: bytes, result: ScanResult, notice_template: str,
             refid: str = "") -> tuple[bytes, int]:
    """:func:`replace_parts` and the number of parts replaced."""
    root = BytesParser(policy=compat32).parsebytes(data)
    done: list[Message] = []
    for part_path, virus, reason in replace_targets(result):
        target = _resolve(root, part_path)
        if target is None:
            target = root
        if any(t is target for t in done):
            continue
        filename = target.get_filename() or part_path.rsplit("/", 1)[-1]
        notice = _make_notice(_notice_text(notice_template, virus, str(filename), reason,
                                           refid))
        parent = _parent_of(root, target)
        if parent is None:  # the message itself (single-part or unresolvable): its body
            _replace_in_place(target, notice)
            done.append(target)
            break  # nothing of the old body is left to replace
        payload = parent.get_payload()
        assert isinstance(payload, list)
        payload[next(i for i, p in enumerate(payload) if p is target)] = notice
        done.append(target)
    if not done:
        return data, 0
    out = BytesIO()
    pol = compat32.clone(linesep=line_ending(data).decode("ascii"))
    BytesGenerator(out, mangle_from_=False, maxheaderlen=0, policy=pol).flatten(root)
    return out.getvalue(), len(done)
