"""MIME decomposition: the leaves of a mail message, decoded (base64, QP, uuencode).

Parsing uses the stdlib ``email`` package with ``compat32``, its fastest policy. Parts are
numbered as in IMAP: a multipart's children are 1..n, a single-part message's body is 1;
a part with a file name gets it as an extra path segment (``message/2/archive.zip``).

Where mail parsers disagree, every interpretation is scanned, so a message cannot hide
content from us by looking different to us than to the recipient's client:

* a Content-Type with several ``boundary=`` parameters (CVE-2024-28054): Python uses the
  first, other parsers the last; the message is parsed again with the last one
  (paths ``message~boundary2/...``);
* several Content-Transfer-Encoding headers on one part: each encoding is decoded
  (``.../2~cte2``);
* base64 with padding in the middle: Python stops at the first ``=``, other decoders go
  on; the rest is decoded too (``.../2~b64``).

The preamble and epilogue of a multipart (text before the first and after the last
boundary) are parts of their own when they hold more than whitespace
(``message/preamble``, ``message/epilogue``): mail clients show or save them, and a
signature anchored at offset 0 would never see them inside the whole message.

Limits come first: a message with more boundary lines than ``max_files`` is refused before
it is parsed (a count of delimiter lines, a few ``bytes.count`` calls), and both parsers
stop at ``max_files`` entities anyway (:class:`mimeparse.TooManyParts`), so no input
builds a tree of more than ``max_files`` entities. Parameter lists are parsed in linear
time (:class:`mimeparse.MimeMessage`).
"""

from __future__ import annotations

import binascii
import hashlib
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.header import decode_header
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from email.utils import collapse_rfc2231_value

from ..result import LimitKind, ScanStatus
from . import (
    REASON_FILES,
    REASON_RECURSION,
    Budget,
    Children,
    Part,
    Problem,
    join_path,
    mimeparse,
    sanitize_name,
)

# The email package's parse, as the fast parser mirrors it (see mimeparse.MimeMessage).
_PARSER = BytesParser(_class=mimeparse.MimeMessage, policy=compat32)


# -- uuencode ---------------------------------------------------------------------------------
# "begin MODE NAME" starts a uuencoded block (up to "end"); "begin-base64 MODE NAME" (what
# ``uuencode -m`` writes and ``uudecode`` reads) starts a base64 one, up to "====".
_UU_BEGIN = re.compile(rb"(?m)^begin(-base64)? +[0-7]{1,4} +([^\r\n]*)\r?$")
_BEGIN = re.compile(rb"begin[ -]")
_B64_END = re.compile(rb"(?m)^====[ \t]*\r?$")


def _uudecode_at(data: bytes, pos: int) -> tuple[bytes, int]:
    """Decode uuencoded lines from ``pos`` up to ``end``; return them and where reading stopped.

    Stops quietly at a line that is not uuencoded, so a broken block costs one line.
    """
    out = bytearray()
    size = len(data)
    while pos < size:
        eol = data.find(b"\n", pos)
        if eol == -1:
            eol = size
        line = data[pos:eol].rstrip(b"\r")
        pos = eol + 1
        if line.strip() == b"end":
            break
        if not line or line in (b"`", b" "):
            continue
        try:
            out += binascii.a2b_uu(line)
        except binascii.Error:
            # Encoders that pad lines with extra characters: use only what the length
            # byte announces (the same repair as the former stdlib uu module).
            nbytes = (((line[0] - 32) & 63) * 4 + 5) // 3
            try:
                out += binascii.a2b_uu(line[:nbytes])
            except binascii.Error:
                break
    return bytes(out), pos


def _b64decode_at(data: bytes, pos: int) -> tuple[bytes, int]:
    """Decode a ``begin-base64`` block from ``pos`` up to its ``====`` line (or the end).

    Characters outside the base64 alphabet are skipped, as GNU uudecode and the email
    package do; padding in the middle does not hide what follows (see decode_base64).
    """
    end = _B64_END.search(data, pos)
    stop, resume = (len(data), len(data)) if end is None else (end.start(), end.end())
    decoded = decode_base64(data[pos:stop])
    return decoded[-1], resume


def uu_blocks(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, decoded bytes) for every ``begin MODE NAME`` / ``begin-base64`` block."""
    if _BEGIN.search(data) is None:  # the common case (b"begin" not in data, but faster)
        return
    pos = 0
    while (match := _UU_BEGIN.search(data, pos)) is not None:
        if match.group(1):
            decoded, pos = _b64decode_at(data, match.end())
        else:
            decoded, pos = _uudecode_at(data, match.end())
        yield match.group(2).decode("latin-1").strip(), decoded


def uuencoded_parts(part: Part, budget: Budget) -> Children:
    """Files uuencoded inside a text leaf (``begin 644 name`` blocks)."""
    for index, (name, data) in enumerate(uu_blocks(part.data), 1):
        path = join_path(part.path, sanitize_name(name, f"uu{index}"))
        yield Part(path, data, part.depth + 1)


# -- transfer encodings ---------------------------------------------------------------------
_PADDING_RUN = re.compile(rb"=+")


def _b64(raw: bytes) -> bytes:
    try:
        return binascii.a2b_base64(raw)
    except binascii.Error:
        pass
    try:  # missing padding, as the email package repairs it
        return binascii.a2b_base64(raw + b"==")
    except binascii.Error:
        return raw  # undecodable: scan the text itself, as the email package would


def decode_base64(raw: bytes) -> list[bytes]:
    """The base64 decoding of ``raw``; a second one when padding hides data after it."""
    primary = _b64(raw)
    # Is there a "=" before the trailing padding and blanks? (Without copying ``raw``.)
    first = raw.find(b"=")
    if first == -1 or not raw[first:].rstrip(b" \t\r\n="):
        return [primary]
    body = raw.rstrip(b" \t\r\n=")
    # Padding in the middle: Python stops there, other decoders decode every group.
    whole = b"".join(_b64(chunk) for chunk in _PADDING_RUN.split(body) if chunk.strip())
    return [primary, whole] if whole != primary else [primary]


def _decode(raw: bytes, cte: str) -> list[bytes]:
    if cte == "base64":
        return decode_base64(raw)
    if cte == "quoted-printable":
        return [binascii.a2b_qp(raw)]
    if cte in ("x-uuencode", "uuencode", "x-uue", "uue"):
        blocks = list(uu_blocks(raw))
        return [blocks[0][1]] if blocks else [raw]
    return [raw]  # 7bit, 8bit, binary, or something unknown: the bytes as sent


def _transfer_encodings(entity: Message) -> list[str]:
    values = entity.get_all("content-transfer-encoding") or [""]
    # The first value is what Python (and most parsers) use; others are alternatives.
    return list(dict.fromkeys(str(v).strip().lower() for v in values))


def _decode_words(name: str) -> str:
    try:
        return "".join(
            chunk.decode(charset or "latin-1", "replace") if isinstance(chunk, bytes) else chunk
            for chunk, charset in decode_header(name)
        )
    except Exception:
        return name


def _filename(entity: Message) -> str | None:
    try:
        name = mimeparse.filename(entity)  # the same, faster, for simple parameter lists
    except mimeparse.Unsupported:
        try:
            name = entity.get_filename()
        except Exception:
            return None
    if not name:
        return None
    name = str(name)
    if "=?" in name:  # RFC 2047 encoded-word, common in attachment names
        name = _decode_words(name)
    # Bytes the parser could not decode are surrogates: make them printable.
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# -- the message tree -----------------------------------------------------------------------
def _leaves(entity: Message, payload: str, path: str, depth: int,
            is_message: bool) -> Iterator[Part]:
    """The decoded ``payload`` (get_payload()) of a non-multipart entity, and alternatives."""
    if is_message:  # a single-part message: its body is part 1
        path, depth = join_path(path, "1"), depth + 1
    name = _filename(entity)
    if name:
        path = join_path(path, sanitize_name(name))
    # The parser decoded the bytes as ASCII + surrogateescape, which this reverses; a
    # payload it altered (e.g. replacement characters) still encodes, as UTF-8.
    raw = payload.encode("utf-8", "surrogateescape")
    declared = entity.get_content_type() if "content-type" in entity else ""
    if declared == PARTIAL_TYPE:  # our renaming (partial_view): the type as sent
        declared = "message/partial"
    seen: list[bytes] = []
    for n, cte in enumerate(_transfer_encodings(entity), 1):
        for data in _decode(raw, cte):
            if data in seen:
                continue
            suffix = "" if not seen else (f"~cte{n}" if n > 1 else "~b64")
            seen.append(data)
            yield Part(path + suffix, data, depth, declared)


def _walk(message: Message, path: str, depth: int, max_depth: int,
          fragments: list[Fragment] | None = None) -> Iterator[Part | Problem]:
    # Explicit stack: a hostile message can nest multiparts far deeper than Python recurses.
    # A str on the stack is a preamble or epilogue, due after the parts before it.
    stack: list[tuple[Message | str, str, int, bool]] = [(message, path, depth, True)]
    while stack:
        entity, path, depth, is_message = stack.pop()
        if isinstance(entity, str):
            yield Part(path, entity.encode("utf-8", "surrogateescape"), depth)
            continue
        payload = getattr(entity, "_payload", None)
        if not (isinstance(payload, list) or (isinstance(payload, str) and payload.isascii())):
            # get_payload() returns a list or an ASCII str as it is; it re-decodes the rest.
            try:
                payload = entity.get_payload()
            except ValueError:
                # the stdlib catches only LookupError for a bad charset; a charset with a
                # NUL in it ("charset=\0us-ascii") raises ValueError: keep the bytes as sent
                pass
        opaque = _opaque_type(entity)
        if opaque is not None:  # message/partial or /external-body: what there is is read on
            yield from _opaque(entity, opaque, payload, path, fragments)
        if isinstance(payload, list):
            if entity.get_content_maintype() == "message":
                # message/rfc822: the enclosed message takes this part's place in the tree.
                inner = [(m, path, depth, True) for m in payload if isinstance(m, Message)]
                stack.extend(reversed(inner))
                continue
            if depth + 1 > max_depth:
                yield Problem(path, ScanStatus.UNKNOWN, REASON_RECURSION, LimitKind.STRUCTURAL)
                continue
            children: list[tuple[Message | str, str, int, bool]] = [
                (child, join_path(path, str(i)), depth + 1, False)
                for i, child in enumerate(payload, 1) if isinstance(child, Message)
            ]
            preamble, epilogue = _text_around(entity)
            if epilogue is not None:
                stack.append((epilogue, join_path(path, "epilogue"), depth + 1, False))
            stack.extend(reversed(children))
            if preamble is not None:
                yield Part(join_path(path, "preamble"),
                           preamble.encode("utf-8", "surrogateescape"), depth + 1)
        elif isinstance(payload, str):
            yield from _leaves(entity, payload, path, depth, is_message)


def _text_around(entity: Message) -> tuple[str | None, str | None]:
    """A multipart's preamble and epilogue, each None unless it holds more than blanks."""
    found: list[str | None] = []
    for text in (entity.preamble, entity.epilogue):
        found.append(text if isinstance(text, str) and text.strip() else None)
    return found[0], found[1]


# -- message/partial and message/external-body (RFC 2046 5.2.2, 5.2.3) ---------------------
# Both parsers read the body of any message/* entity as an enclosed message, which loses the
# raw text a fragment is (the next fragment goes on in the middle of a line or a part). When
# the message may hold fragments, it is read with their type renamed, so the body stays the
# text as sent; the fragments of one id, all present, are put back together in order and
# scanned as the message they were cut from. A fragment alone is unknown: the rest of the
# content is not here to scan. So is an external body (only where to fetch it is here).
PARTIAL_TYPE = "application/x-avgate-message-partial"
_PARTIAL_HINT = re.compile(rb"/[Pp][Aa][Rr][Tt][Ii][Aa][Ll]")  # "/" is a literal prefix: fast
_PARTIAL_FIELD = re.compile(
    rb"(?im)^(content-type[ \t]*:[ \t]*(?:\r?\n[ \t]+)?)message/partial(?![!#$%&'*+.^_`|~\w-])")
_OPAQUE_TYPES = frozenset({"message/partial", "message/external-body", PARTIAL_TYPE})
REASON_PARTIAL = "message/partial fragment (content not present)"
REASON_EXTERNAL = "message/external-body (content not present)"
_MAX_NUMBER = 1_000_000


def partial_view(data: bytes) -> bytes | None:
    """``data`` with each ``message/partial`` Content-Type renamed :data:`PARTIAL_TYPE`, or
    None when it has none (the usual case: one search for "/partial" tells)."""
    if _PARTIAL_HINT.search(data) is None:
        return None
    view, count = _PARTIAL_FIELD.subn(rb"\1" + PARTIAL_TYPE.encode(), data)
    return view if count else None


@dataclass(slots=True)
class Fragment:
    """One message/partial entity: its parameters and, when read as text, its body."""

    path: str
    ident: str
    number: int | None
    total: int | None
    body: bytes | None  # None: the parser read it as an enclosed message (no raw text)


def _opaque_type(entity: Message) -> str | None:
    value = entity.get("content-type")
    if not isinstance(value, str):
        return None
    low = value.lower()
    if "partial" not in low and "external" not in low:
        return None  # the usual case, without parsing the field
    ctype = entity.get_content_type()
    return ctype if ctype in _OPAQUE_TYPES else None


def _content_param(entity: Message, name: str) -> str | None:
    try:
        return mimeparse.param(entity, "content-type", name)
    except mimeparse.Unsupported:
        value = entity.get_param(name)
        return None if value is None else collapse_rfc2231_value(value)


def _number(entity: Message, name: str) -> int | None:
    value = (_content_param(entity, name) or "").strip()
    if not (value.isascii() and value.isdigit() and len(value) <= 7):
        return None
    return int(value) if 0 < int(value) <= _MAX_NUMBER else None


def _opaque(entity: Message, ctype: str, payload: object, path: str,
            fragments: list[Fragment] | None) -> Iterator[Problem]:
    if ctype == "message/external-body":
        yield Problem(path, ScanStatus.UNKNOWN, REASON_EXTERNAL)
        return
    body = payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else None
    fragment = Fragment(path, _content_param(entity, "id") or "", _number(entity, "number"),
                        _number(entity, "total"), body)
    if fragments is None:
        yield Problem(path, ScanStatus.UNKNOWN, REASON_PARTIAL)
    else:
        fragments.append(fragment)


def reassembled(fragments: list[Fragment], path: str, depth: int) -> Iterator[Part | Problem]:
    """For each fragment id: the whole message when every fragment is here, else a Problem
    per fragment. A number present twice with different bodies is undecidable."""
    groups: dict[str, list[Fragment]] = {}
    for fragment in fragments:
        groups.setdefault(fragment.ident, []).append(fragment)
    for index, (ident, group) in enumerate(groups.items(), 1):
        whole = _whole(group) if ident else None
        if whole is not None:
            yield Part(join_path(path, f"partial{index}"), whole, depth + 1)
            continue
        for fragment in group:
            yield Problem(fragment.path, ScanStatus.UNKNOWN, REASON_PARTIAL)


def _whole(group: list[Fragment]) -> bytes | None:
    totals = {f.total for f in group if f.total is not None}
    if len(totals) != 1:
        return None
    total = totals.pop()
    bodies: dict[int, bytes] = {}
    for fragment in group:
        if fragment.number is None or fragment.body is None or fragment.number > total:
            return None
        if bodies.setdefault(fragment.number, fragment.body) != fragment.body:
            return None
    if len(bodies) != total:
        return None
    return b"".join(bodies[n] for n in range(1, total + 1))


# -- part count ---------------------------------------------------------------------------------
# Boundary parameters, as far as a regex finds them: enough for a lower bound on the parts.
# Searched in a lower-cased copy (a literal prefix is found at memchr speed; IGNORECASE is
# ten times slower), the values taken from the original bytes.
_BOUNDARY_VALUE = re.compile(rb'boundary[ \t]*=[ \t]*(?:"([^"\r\n]+)"|([^\s;"]+))')
_MAX_BOUNDARIES = 64  # distinct values counted; more are left to the parsers' own count


def part_count_problem(path: str, data: bytes, max_files: int) -> Problem | None:
    """Refuse a message with more than ``max_files`` parts before parsing it.

    Every part begins after a separator line, ``--`` + a boundary at the start of a line.
    When the message is short or the lines that start with ``--`` are few (the usual case:
    at most one ``bytes.count``), nothing more is done; else the separator lines of each
    boundary parameter found in the message are counted (``--b`` + CRLF or LF exactly).
    That is a lower bound (a boundary hidden from the regex, or a separator line with
    trailing blanks, is not counted): the parsers stop at ``max_files`` entities
    themselves whatever this says.
    """
    # A separator line is at least 4 bytes ("--b" and a line end): a message this short
    # cannot hold too many; most are, and are not even counted.
    if len(data) <= 4 * max_files or data.count(b"\n--") <= max_files:
        return None
    boundaries: set[bytes] = set()
    for match in _BOUNDARY_VALUE.finditer(data.lower()):
        group = 1 if match.start(1) >= 0 else 2
        boundaries.add(data[match.start(group):match.end(group)])
        if len(boundaries) >= _MAX_BOUNDARIES:
            break
    count = 0
    for boundary in boundaries:
        line = b"\n--" + boundary
        count += data.count(line + b"\n") + data.count(line + b"\r\n")
        if count > max_files:
            return _too_many_parts(path, max_files, count)
    return None


def _too_many_parts(path: str, max_files: int, count: int | None = None) -> Problem:
    found = f"{count} MIME parts >" if count is not None else "more MIME parts than"
    return Problem(path, ScanStatus.SKIPPED, f"{REASON_FILES} ({found} max_files {max_files})",
                   LimitKind.STRUCTURAL)


# -- ambiguous boundaries (CVE-2024-28054) --------------------------------------------------
_PARAM_EQUALS = re.compile(rb"[ \t]*=")
_CONTENT_TYPE_FIELD = re.compile(rb"(?i)content-type[ \t]*:")


def _header_start(data: bytes, pos: int, known: tuple[int, int] = (-1, 0)) -> int:
    """Start of the (possibly folded) header field that contains offset ``pos``.

    ``known`` is (an earlier offset, the start of its field): reaching the line that holds
    it ends the walk, so that finding the fields of many offsets in one long folded field
    costs one walk over it rather than one per offset.
    """
    before, before_start = known
    start = data.rfind(b"\n", 0, pos) + 1
    while start > 0 and data[start:start + 1] in (b" ", b"\t"):  # a continuation line
        if start <= before:
            return before_start  # the line holding ``before``: the same field
        start = data.rfind(b"\n", 0, start - 1) + 1
    return start


def _boundary_params(data: bytes) -> dict[int, list[int]]:
    """Offsets of ``boundary=`` parameters, grouped by the Content-Type field holding them."""
    lower = data.lower()
    fields: dict[int, list[int]] = {}
    known = (-1, 0)
    pos = lower.find(b"boundary")
    while pos != -1:
        # A parameter: preceded by ";" (whitespace and folding allowed), followed by "=".
        before = lower[max(0, pos - 64):pos].rstrip(b" \t\r\n")
        if before.endswith(b";") and _PARAM_EQUALS.match(lower, pos + 8):
            start = _header_start(lower, pos, known)
            known = (pos, start)
            if _CONTENT_TYPE_FIELD.match(lower, start):
                fields.setdefault(start, []).append(pos)
        pos = lower.find(b"boundary", pos + 8)
    return fields


# ";", blanks or line breaks, "boundary": how every boundary parameter starts.
_BOUNDARY_PARAM_START = re.compile(rb";[ \t\r\n]*[Bb][Oo][Uu][Nn][Dd][Aa][Rr][Yy]")
_FEW_SEMICOLONS = 16


def _two_boundary_params(data: bytes) -> bool:
    """False when ``data`` cannot hold two ``boundary=`` parameters (a quick, safe test).

    Every parameter :func:`_boundary_params` accepts follows a ";" and blanks or line
    breaks; a message has only a few ";" outside text bodies, so looking at each is cheaper
    than lower-casing the whole message.
    """
    count = 0
    pos = data.find(b";")
    for _ in range(_FEW_SEMICOLONS):
        if pos == -1:
            return False
        if _BOUNDARY_PARAM_START.match(data, pos):
            count += 1
            if count == 2:
                return True
        pos = data.find(b";", pos + 1)
    if pos == -1:
        return False
    return count + len(_BOUNDARY_PARAM_START.findall(data, pos)) >= 2


def last_boundary_view(data: bytes) -> bytes | None:
    """``data`` with only the last ``boundary=`` of each Content-Type kept, or None.

    None when no Content-Type field has more than one boundary parameter, the usual case,
    found with a few ``bytes.find`` calls rather than a regex over the whole message.
    """
    if not _two_boundary_params(data):
        return None
    duplicates = sorted(p for ps in _boundary_params(data).values() if len(ps) > 1
                        for p in ps[:-1])
    if not duplicates:
        return None
    out: list[bytes] = []
    last = 0
    for pos in duplicates:
        # Rename the attribute, so Python's parser ignores it and takes the last one.
        out += [data[last:pos], b"x-ignored-"]
        last = pos
    out.append(data[last:])
    return b"".join(out)


# -- obsolete header syntax (RFC 5322 4.5.3: blanks before the colon) ----------------------
# "Content-Type : multipart/mixed" is a header to many readers (obs-optional allows WSP
# before ":"), but Python's parser ends the header block at such a line, so everything after
# it becomes body and the attachments are never decoded. When a line of that shape exists,
# the message is read a second time with the blanks removed.
_OBS_HEADER = re.compile(rb"(?m)^([!-9;-~]{1,998})[ \t]++:")


def obsolete_header_view(data: bytes) -> bytes | None:
    """``data`` with ``Name :`` header lines rewritten as ``Name:``, or None if there are none.

    Every such line is rewritten, body lines included: this view is scanned *besides* the
    message as sent, so a body line changed here can only add to what is scanned.
    """
    if (b" :" not in data and b"\t:" not in data) or _OBS_HEADER.search(data) is None:
        return None
    return _OBS_HEADER.sub(rb"\1:", data)


# The fast parser builds the same Message tree as the email package for ordinary messages
# and declines the rest (see mimeparse); False makes every parse use the email package.
FAST_PARSE = True


# Header lines (fields and their continuation lines) of all entities of one message: a few
# dozen per entity in real mail. Each becomes a (name, value) pair in the tree, so a message
# of nothing but short header lines must not turn 25 MB into a gigabyte of tuples.
HEADER_LINES_PER_PART = 20
HEADER_LINES_BASE = 100_000


def header_line_budget(max_files: int) -> int:
    return HEADER_LINES_BASE + HEADER_LINES_PER_PART * max_files


def _parse(data: bytes, max_parts: int | None = None,
           max_header_lines: int | None = None) -> Message:
    """The message tree; :class:`mimeparse.MimeLimit` past ``max_parts`` entities or
    ``max_header_lines`` header lines."""
    if FAST_PARSE:
        # Unsupported (something it does not mirror), or a bug of its own: the email
        # package decides, so the fast path can never lose content.
        try:
            return mimeparse.parse(data, max_parts, max_header_lines)
        except mimeparse.MimeLimit:
            raise
        except Exception:  # noqa: S110 - see above
            pass
    return mimeparse.parse_email_package(data, max_parts, max_header_lines)


def _limit_problem(path: str, exc: mimeparse.MimeLimit, max_files: int) -> Problem:
    if isinstance(exc, mimeparse.TooManyHeaderLines):
        return Problem(path, ScanStatus.SKIPPED,
                       f"header line limit (more than {header_line_budget(max_files)})",
                       LimitKind.STRUCTURAL)
    return _too_many_parts(path, max_files)


def mail_parts(part: Part, budget: Budget) -> Children:
    """The decoded leaves of a mail message, under every interpretation parsers disagree on."""
    max_depth = budget.limits.max_recursion
    max_files = budget.limits.max_files
    refused = part_count_problem(part.path, part.data, max_files)
    if refused is not None:
        yield refused
        return
    header_lines = header_line_budget(max_files)
    source = partial_view(part.data) or part.data
    try:
        message = _parse(source, max_files, header_lines)
    except mimeparse.MimeLimit as exc:
        yield _limit_problem(part.path, exc, max_files)
        return
    except Exception as exc:
        yield Problem(part.path, ScanStatus.UNKNOWN, f"unparseable message: {type(exc).__name__}")
        return
    alternatives = [(suffix, view) for suffix, view in (
        ("~boundary2", last_boundary_view(source)),
        ("~obsheader", obsolete_header_view(source))) if view is not None]
    # A "body" that is the whole message again (a parser that gave up on the header block
    # at its first line) was scanned already, as the message: decomposing it once more would
    # only nest the same reading down to the recursion limit.
    # Identical parts within this reading are all kept: replacing infected parts needs
    # every path.
    seen: set[bytes] = set()
    fragments: list[Fragment] = []
    for item in _walk(message, part.path, part.depth, max_depth, fragments):
        if isinstance(item, Part):
            if item.data == part.data or item.data == source:
                continue
            if alternatives:
                seen.add(hashlib.blake2b(item.data, digest_size=16).digest())
        yield item
    yield from reassembled(fragments, part.path, part.depth)
    if not alternatives:
        return
    # Only what another reading adds: parts the readings share are not scanned twice.
    for suffix, view in alternatives:
        path = part.path + suffix
        try:
            message = _parse(view, max_files, header_lines)
        except mimeparse.MimeLimit as exc:
            yield _limit_problem(path, exc, max_files)
            return
        fragments = []
        # reassembled() runs once the walk has found the fragments (chain is lazy)
        for item in itertools.chain(_walk(message, path, part.depth, max_depth, fragments),
                                    reassembled(fragments, path, part.depth)):
            if isinstance(item, Part):
                digest = hashlib.blake2b(item.data, digest_size=16).digest()
                if digest in seen:
                    continue
                seen.add(digest)
            yield item
