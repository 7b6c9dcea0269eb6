"""The parts :func:`~avgate.content.decompose` yields for a *simple* mail, found in a few
linear passes (no parser, no tree): the banned-type check's shortcut on the event loop.

Most mail is a plain-text message or one multipart of text and attachments. Sending each
such message to a scan worker only to learn its parts' names and types costs a worker round
trip and a full decomposition (about 1 ms of CPU for a 20 KB mail); reading them here costs
about a tenth of that. The claim — "these are exactly the parts decompose() yields" — holds
only for a deliberately narrow shape, so that it is easy to check; hypothesis compares the
two on mutated mails (tests/unit/test_simplemail.py). Everything else returns None and is
decomposed in full by a worker.

A simple mail is at most :data:`MAX_SIZE` bytes of printable ASCII, its header blocks and
delimiter lines with one kind of line end, no text that makes the mail decomposer read it a
second way (a ``message/partial`` Content-Type line, obsolete ``Name :`` header syntax, a
second ``boundary`` parameter), and either:

* **plain**: strict ``Name:`` header fields whose only ``Content-*`` fields are at most one
  ``Content-Type: text/plain`` (a charset at most) and one 7bit/8bit
  ``Content-Transfer-Encoding``; its parts are the message and its body (``1``); or
* **one multipart** (mixed, alternative or related) with a single ``boundary`` parameter
  (the word appears once in the whole message) and no nested multipart: every occurrence of
  ``--boundary`` is a delimiter line of its own, every part has strict header fields (a
  folded Content-Type or Content-Disposition is fine), a leaf type (not ``message/*`` or
  ``multipart/*``), at most one Content-Type, Content-Transfer-Encoding (base64,
  quoted-printable, 7bit, 8bit, binary) and Content-Disposition, and simple parameters (no
  RFC 2231 ``*``, no RFC 2047 ``=?``, no quotes inside); its parts are the message, the
  preamble and epilogue when they hold more than blanks, and each part decoded, with its
  file name as a path segment.

Every part below the message must be detected as nothing a decomposer opens (no archive,
HTML, PDF, enclosed mail, uuencoded block), and the limits must let every part through;
otherwise: None. Bounded: a few passes over at most 64 KiB, so it may run on the event loop.
"""

from __future__ import annotations

import itertools
import re

from ..limits import Limits
from . import SIMPLE_MAIL_MAX, Part, join_path, sanitize_name
from .filetype import Kind, detect
from .mime import (
    _BEGIN,
    _OBS_HEADER,
    _PARTIAL_FIELD,
    _PARTIAL_HINT,
    _decode,
    _two_boundary_params,
    header_line_budget,
    part_count_problem,
)

__all__ = ["MAX_SIZE", "simple_mail_parts"]

#: the largest message looked at (every step is a bytes or regex pass over it)
MAX_SIZE = SIMPLE_MAIL_MAX
#: the most parts below the message (a multipart's parts, preamble and epilogue)
MAX_PARTS = 64
_PRINTABLE = b"\t\r\n" + bytes(range(0x20, 0x7F))
_FIELD = re.compile(rb"[!-9;-~]+:")
_PLAIN_TYPE = re.compile(rb'[ \t]*text/plain[ \t]*(?:;[ \t]*charset="?[A-Za-z0-9._-]{1,40}"?'
                         rb"[ \t]*)?", re.IGNORECASE)
_RAW_ENCODING = re.compile(rb"[ \t]*(?:7bit|8bit)[ \t]*", re.IGNORECASE)
_MULTIPART = re.compile(rb'[ \t]*multipart/(?:mixed|alternative|related);[ \t]*boundary='
                        rb'(?:"([A-Za-z0-9\'()+_,./:=?-]{1,70})"|([A-Za-z0-9\'+_.-]{1,70}))'
                        rb"[ \t]*", re.IGNORECASE)
# a leaf part's Content-Type or Content-Disposition value: a token (type/subtype for the
# type), then "; key=value" parameters, quoted or not; blanks and folding between them
_TOKEN = rb"[A-Za-z0-9!#$&^_.+-]+"
_PARAMS = rb'((?:;[ \t\r\n]*[A-Za-z0-9_.+-]+=(?:"[^"\\;<>()\r\n]*"|[A-Za-z0-9!#$&^_.+-]+)[ \t]*)*)'
_LEAF_TYPE = re.compile(rb"[ \t]*(" + _TOKEN + rb"/" + _TOKEN + rb")[ \t]*" + _PARAMS)
_DISPOSITION = re.compile(rb"[ \t]*(?:attachment|inline)[ \t]*" + _PARAMS, re.IGNORECASE)
_PARAM = re.compile(rb';[ \t\r\n]*([A-Za-z0-9_.+-]+)=("[^"]*"|[^;\s]*)')
_ENCODINGS = frozenset({b"base64", b"quoted-printable", b"7bit", b"8bit", b"binary"})
_PART_FIELDS = (b"content-type", b"content-transfer-encoding", b"content-disposition")


def simple_mail_parts(data: bytes, limits: Limits, name: str = "") -> tuple[Part, ...] | None:
    """The parts ``decompose(data, limits, name)`` yields, in its order, when ``data`` is a
    simple mail (see the module docstring); None for anything else."""
    if (len(data) > min(MAX_SIZE, limits.max_file_size, limits.max_scan_size)
            or limits.max_recursion < 1 or limits.max_files < 1
            or data.translate(None, _PRINTABLE)):  # a byte that is not printable ASCII
        return None
    eol = b"\r\n" if b"\r" in data else b"\n"
    end = data.find(eol + eol)
    if end <= 0:
        return None
    fields = _header_fields(data[:end], eol, folding=False)
    if fields is None:
        return None
    if _two_boundary_params(data):  # nested, or read a second way (on the last boundary)
        return None
    body = end + 2 * len(eol)
    if not any(field == b"content-type" and b"multipart/" in value.lower()
               for field, value in fields):
        found = _plain(fields, data[body:])
    else:
        found = _multipart(data, fields, body, eol)
    if found is None or not _admitted(data, found, limits):
        return None
    if name:
        found = [Part(join_path(name, p.path), p.data, p.depth, p.content_type) for p in found]
    return (Part(name, data, 0), *found)


def _header_fields(block: bytes, eol: bytes, *, folding: bool
                   ) -> list[tuple[bytes, bytes]] | None:
    """(lower-cased name, value as compat32 keeps it) for every field of ``block``, or None
    unless every line is a strict ``Name:`` field or a continuation line. Content-* fields
    may be folded only where ``folding`` (else a continuation must follow another field)."""
    if eol == b"\r\n" and not block.count(b"\r") == block.count(b"\n") == block.count(eol):
        return None  # a bare CR or LF: a line break to the parser, not to this split
    fields: list[tuple[bytes, bytes]] = []
    for line in block.split(eol):
        if line[:1] in (b" ", b"\t"):  # a continuation line
            if not fields or (not folding and fields[-1][0].startswith(b"content-")):
                return None
            name, value = fields[-1]
            fields[-1] = (name, value + eol + line)
            continue
        field = _FIELD.match(line)
        if field is None:
            return None
        fields.append((line[:field.end() - 1].lower(), line[field.end():]))
    return fields


def _plain(fields: list[tuple[bytes, bytes]], body: bytes) -> list[Part] | None:
    """The body of a plain-text message, or None unless its Content-* fields are plain."""
    declared = ""
    encoding = False
    for name, value in fields:
        if not name.startswith(b"content-"):
            continue
        if name == b"content-type" and not declared and _PLAIN_TYPE.fullmatch(value):
            declared = "text/plain"
        elif name == b"content-transfer-encoding" and not encoding and _RAW_ENCODING.fullmatch(
                value):
            encoding = True
        else:
            return None
    return [Part("1", body, 1, declared)] if _read_once(body) else None


def _multipart(data: bytes, fields: list[tuple[bytes, bytes]], start: int, eol: bytes
               ) -> list[Part] | None:
    """The preamble, parts and epilogue of a one-level multipart whose body starts at
    ``start``, or None unless its shape is the simple one."""
    boundary = b""
    for name, value in fields:
        if not name.startswith(b"content-"):
            continue
        match = _MULTIPART.fullmatch(value) if name == b"content-type" else None
        if match is not None and not boundary:
            boundary = match.group(1) or match.group(2)
        elif not (name == b"content-transfer-encoding" and _RAW_ENCODING.fullmatch(value)):
            return None
    if not boundary or boundary[-1:] in (b" ", b"\t"):
        return None
    sep = b"--" + boundary
    if data.find(sep, 0, start) != -1:
        return None
    # every occurrence of the separator: a line of its own, "--" after the last one only
    lines: list[tuple[int, int]] = []  # (start of the delimiter line, end of it)
    pos = data.find(sep, start)
    closed = False
    while pos != -1:
        if closed or len(lines) > MAX_PARTS or (pos != start and data[pos - len(eol):pos] != eol):
            return None
        after = pos + len(sep)
        if data.startswith(eol, after):
            lines.append((pos, after + len(eol)))
        elif data.startswith(b"--" + eol, after) or (after + 2 == len(data) and data.endswith(
                b"--", after)):
            closed = True
            lines.append((pos, min(after + 2 + len(eol), len(data))))
        else:
            return None
        pos = data.find(sep, after)
    if not closed or len(lines) < 2:
        return None
    found: list[Part] = []
    first = lines[0][0]
    if first > start:  # the preamble, without the line break of the boundary line
        preamble = data[start:first - len(eol)]
        if not _read_once(preamble):
            return None
        if preamble.strip():
            found.append(Part("preamble", preamble, 1))
    for number, ((_, begin), (end, _)) in enumerate(itertools.pairwise(lines), 1):
        part = _leaf(data[begin:end], eol, str(number))
        if part is None:
            return None
        found.append(part)
    epilogue = data[lines[-1][1]:]
    if not _read_once(epilogue):
        return None
    if epilogue.strip():
        found.append(Part("epilogue", epilogue, 1))
    return found


def _leaf(region: bytes, eol: bytes, path: str) -> Part | None:
    """One part of the multipart (``region``: its header block, its body and the line break
    of the next delimiter line), decoded; None unless it is a simple leaf."""
    end = region.find(eol + eol)
    if end <= 0:  # no header block (or none before the next delimiter)
        return None
    fields = _header_fields(region[:end], eol, folding=True)
    if fields is None:
        return None
    body = region[end + 2 * len(eol):]
    if body.endswith(eol):  # the line break before the delimiter belongs to the delimiter
        body = body[:-len(eol)]
    elif body:
        return None
    seen: dict[bytes, bytes] = {}
    for name, value in fields:
        if name in _PART_FIELDS:
            if name in seen:
                return None
            seen[name] = value
        elif name.startswith(b"content-") and name not in (b"content-id", b"content-description"):
            return None
    declared = ""
    names: dict[bytes, bytes] | None = {}  # Content-Type's parameters
    ctype = seen.get(b"content-type")
    if ctype is not None:
        match = _LEAF_TYPE.fullmatch(ctype)
        if match is None:
            return None
        declared = match.group(1).decode().lower()
        if declared.startswith(("message/", "multipart/")):
            return None
        names = _params(match.group(2))
    disposition = seen.get(b"content-disposition")
    if disposition is not None:
        match = _DISPOSITION.fullmatch(disposition)
        found = _params(match.group(1)) if match is not None else None
        if found is None or names is None:
            return None
        # the email package's get_filename(): Content-Disposition's, else Content-Type's
        names = {b"name": found[b"filename"]} if b"filename" in found else names
    if names is None:
        return None
    filename = names.get(b"name")
    if filename is not None:
        if b"=?" in filename:  # RFC 2047 in a parameter: decoded by the decomposer
            return None
        text = filename.decode().strip()
        if text:
            path = join_path(path, sanitize_name(text))
    encoding = seen.get(b"content-transfer-encoding", b"7bit").strip().lower()
    if encoding not in _ENCODINGS:
        return None
    # a base64 body without a colon cannot be read a second way (_read_once)
    read_once = b":" not in body if encoding == b"base64" else _read_once(body)
    if not read_once:
        return None
    decoded = _decode(body, encoding.decode())  # the decomposer's own decoding
    if len(decoded) != 1:  # base64 padding in the middle: two readings, the workers' job
        return None
    return Part(path, decoded[0], 1, declared)


def _params(text: bytes) -> dict[bytes, bytes] | None:
    """The parameters of a parameter list (lower-cased keys, values unquoted); None when a
    parameter is given twice (which one a reader takes differs)."""
    found: dict[bytes, bytes] = {}
    for key, raw in _PARAM.findall(text):
        key = key.lower()
        if key in found:
            return None
        found[key] = raw[1:-1] if raw[:1] == b'"' else raw
    return found


#: the most colons looked at one by one; past it, the two substring searches decide
_FEW_COLONS = 64


def _read_once(text: bytes) -> bool:
    """False when ``text`` (a body as sent, at a line start) holds something that makes
    the mail decomposer read the message a second way: an obsolete ``Name :`` header line
    (mime.obsolete_header_view) or a ``message/partial`` Content-Type (mime.partial_view).
    Header blocks and delimiter lines cannot hold either (their syntax is checked), nor a
    base64 body without a colon; this is asked for every other body."""
    pos = text.find(b":")
    if pos == -1:
        return True  # both need a colon
    for _ in range(_FEW_COLONS):
        if pos == -1:
            break  # no blank before any colon: no obsolete header line
        if text[pos - 1:pos] in (b" ", b"\t"):
            if _OBS_HEADER.search(text) is not None:
                return False
            break
        pos = text.find(b":", pos + 1)
    else:
        if (b" :" in text or b"\t:" in text) and _OBS_HEADER.search(text) is not None:
            return False
    return _PARTIAL_HINT.search(text) is None or _PARTIAL_FIELD.search(text) is None


def _admitted(data: bytes, parts: list[Part], limits: Limits) -> bool:
    """Whether decompose() would yield exactly ``parts`` below the message: each within the
    limits, none that a decomposer opens further, the message itself opened as mail."""
    if (len(parts) > min(MAX_PARTS, limits.max_files)
            or part_count_problem("", data, limits.max_files) is not None
            # every line is a byte at least: a message this short cannot hold more header
            # lines than the decomposer allows (mime.header_line_budget)
            or len(data) >= header_line_budget(limits.max_files)
            or detect(data) is not Kind.MAIL):
        return False
    total = len(data)
    for part in parts:
        total += len(part.data)
        if (len(part.data) > limits.max_file_size or detect(part.data) is not Kind.OTHER
                or (b"begin" in part.data and _BEGIN.search(part.data) is not None)):
            return False
    return total <= limits.max_scan_size
