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
"""

from __future__ import annotations

import re
from email.charset import QP, Charset
from email.generator import BytesGenerator
from email.header import Header
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from io import BytesIO
from typing import TYPE_CHECKING

from .result import ScanResult

if TYPE_CHECKING:
    from .policy import Decision

_HEADER_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")  # match() anchors at pos
_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP


def edit_message(data: bytes, decision: Decision, result: ScanResult) -> bytes:
    """``data`` with the decision's part replacements, subject prefix and headers applied."""
    if decision.replace and result.findings:
        data = replace_parts(data, result, decision.notice)
    if decision.subject_prefix:
        data = prefix_subject(data, decision.subject_prefix)
    if decision.headers:
        data = add_headers(data, decision.headers)
    return data


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
def _notice_text(template: str, virus: str, filename: str) -> str:
    # plain replace, not str.format: a notice with other braces must not raise
    return template.replace("{virus}", virus).replace("{filename}", filename or "-")


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


def replace_parts(data: bytes, result: ScanResult, notice_template: str) -> bytes:
    """Replace every MIME part a finding points at with a text/plain notice."""
    root = BytesParser(policy=compat32).parsebytes(data)
    done: list[Message] = []
    for finding in result.findings:
        target = _resolve(root, finding.part)
        if target is None:
            target = root
        if any(t is target for t in done):
            continue
        filename = target.get_filename() or finding.part.rsplit("/", 1)[-1]
        notice = _make_notice(_notice_text(notice_template, finding.name, str(filename)))
        parent = _parent_of(root, target)
        if parent is None:  # the message itself (single-part or unresolvable): its body
            _replace_in_place(target, notice)
            done.append(target)
            break  # nothing of the old body is left to replace
        payload = parent.get_payload()
        assert isinstance(payload, list)
        payload[next(i for i, p in enumerate(payload) if p is target)] = notice
        done.append(target)
    out = BytesIO()
    pol = compat32.clone(linesep=line_ending(data).decode("ascii"))
    BytesGenerator(out, mangle_from_=False, maxheaderlen=0, policy=pol).flatten(root)
    return out.getvalue()
