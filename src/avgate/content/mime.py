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
"""

from __future__ import annotations

import binascii
import contextlib
import hashlib
import re
from collections.abc import Iterator
from email.header import decode_header
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32

from ..result import ScanStatus
from . import REASON_RECURSION, Budget, Children, Part, Problem, join_path, mimeparse, sanitize_name

_PARSER = BytesParser(policy=compat32)


# -- uuencode -------------------------------------------------------------------------------
_UU_BEGIN = re.compile(rb"(?m)^begin(?:-base64)? +[0-7]{1,4} +([^\r\n]*)\r?$")
_BEGIN = re.compile(rb"begin ")


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


def uu_blocks(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, decoded bytes) for every ``begin MODE NAME`` block in ``data``."""
    if _BEGIN.search(data) is None:  # the common case (b"begin " not in data, but faster)
        return
    pos = 0
    while (match := _UU_BEGIN.search(data, pos)) is not None:
        decoded, pos = _uudecode_at(data, match.end())
        yield match.group(1).decode("latin-1").strip(), decoded


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
    seen: list[bytes] = []
    for n, cte in enumerate(_transfer_encodings(entity), 1):
        for data in _decode(raw, cte):
            if data in seen:
                continue
            suffix = "" if not seen else (f"~cte{n}" if n > 1 else "~b64")
            seen.append(data)
            yield Part(path + suffix, data, depth)


def _walk(message: Message, path: str, depth: int, max_depth: int) -> Iterator[Part | Problem]:
    # Explicit stack: a hostile message can nest multiparts far deeper than Python recurses.
    stack: list[tuple[Message, str, int, bool]] = [(message, path, depth, True)]
    while stack:
        entity, path, depth, is_message = stack.pop()
        payload = getattr(entity, "_payload", None)
        if not (isinstance(payload, list) or (isinstance(payload, str) and payload.isascii())):
            # get_payload() returns a list or an ASCII str as it is; it re-decodes the rest.
            try:
                payload = entity.get_payload()
            except ValueError:
                # the stdlib catches only LookupError for a bad charset; a charset with a
                # NUL in it ("charset=\0us-ascii") raises ValueError: keep the bytes as sent
                pass
        if isinstance(payload, list):
            if entity.get_content_maintype() == "message":
                # message/rfc822: the enclosed message takes this part's place in the tree.
                inner = [(m, path, depth, True) for m in payload if isinstance(m, Message)]
                stack.extend(reversed(inner))
                continue
            if depth + 1 > max_depth:
                yield Problem(path, ScanStatus.UNKNOWN, REASON_RECURSION)
                continue
            children = [
                (child, join_path(path, str(i)), depth + 1, False)
                for i, child in enumerate(payload, 1) if isinstance(child, Message)
            ]
            stack.extend(reversed(children))
        elif isinstance(payload, str):
            yield from _leaves(entity, payload, path, depth, is_message)


# -- ambiguous boundaries (CVE-2024-28054) --------------------------------------------------
_PARAM_EQUALS = re.compile(rb"[ \t]*=")
_CONTENT_TYPE_FIELD = re.compile(rb"(?i)content-type[ \t]*:")


def _header_start(data: bytes, pos: int) -> int:
    """Start of the (possibly folded) header field that contains offset ``pos``."""
    start = data.rfind(b"\n", 0, pos) + 1
    while start > 0 and data[start:start + 1] in (b" ", b"\t"):  # a continuation line
        start = data.rfind(b"\n", 0, start - 1) + 1
    return start


def _boundary_params(data: bytes) -> dict[int, list[int]]:
    """Offsets of ``boundary=`` parameters, grouped by the Content-Type field holding them."""
    lower = data.lower()
    fields: dict[int, list[int]] = {}
    pos = lower.find(b"boundary")
    while pos != -1:
        # A parameter: preceded by ";" (whitespace and folding allowed), followed by "=".
        before = lower[max(0, pos - 64):pos].rstrip(b" \t\r\n")
        if before.endswith(b";") and _PARAM_EQUALS.match(lower, pos + 8):
            start = _header_start(lower, pos)
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


# The fast parser builds the same Message tree as the email package for ordinary messages
# and declines the rest (see mimeparse); False makes every parse use the email package.
FAST_PARSE = True


def _parse(data: bytes) -> Message:
    if FAST_PARSE:
        # Unsupported (something it does not mirror), or a bug of its own: the email
        # package decides, so the fast path can never lose content.
        with contextlib.suppress(Exception):
            return mimeparse.parse(data)
    return _PARSER.parsebytes(data)


def mail_parts(part: Part, budget: Budget) -> Children:
    """The decoded leaves of a mail message, under every interpretation parsers disagree on."""
    max_depth = budget.limits.max_recursion
    try:
        message = _parse(part.data)
    except Exception as exc:
        yield Problem(part.path, ScanStatus.UNKNOWN, f"unparseable message: {type(exc).__name__}")
        return
    alternative = last_boundary_view(part.data)
    if alternative is None:
        yield from _walk(message, part.path, part.depth, max_depth)
        return
    seen: set[bytes] = set()
    for item in _walk(message, part.path, part.depth, max_depth):
        if isinstance(item, Part):
            seen.add(hashlib.blake2b(item.data, digest_size=16).digest())
        yield item
    # Only what the other reading adds: parts both readings share are not scanned twice.
    for item in _walk(_parse(alternative), part.path + "~boundary2", part.depth, max_depth):
        if isinstance(item, Part):
            if hashlib.blake2b(item.data, digest_size=16).digest() in seen:
                continue
        yield item
