"""The subject a quarantine record keeps (the console's subject column and filter).

Sans-IO: :func:`subject_of` takes the first bytes of a held message and returns its
``Subject:`` as one clean line of text; :func:`head_of` takes those bytes from the content
:meth:`~.base.Store.put` was given. What is read is bounded: at most :data:`HEAD_LIMIT` bytes
(the first header block only), so an attacker-sized header costs a 64 KiB parse, and that
parse runs where ``put`` runs: in a worker thread for the gateway (``asyncio.to_thread``),
directly in the CLI and on-demand scans — never on the event loop.

The value is decoded (RFC 2047 encoded words, by :mod:`email`'s ``policy.default``; raw
8-bit UTF-8 as UTF-8, other raw bytes as U+FFFD), unfolded, stripped of control, bidi and
line-separator characters (a subject is shown on terminals and web pages), whitespace runs
collapsed, and cut to :data:`SUBJECT_MAX` characters. Objects of the front-ends that carry
no mail (:data:`NON_MAIL_FRONTENDS`: ICAP, HTTP, the HTTP and FTP proxies, clamd) have none.
"""

from __future__ import annotations

import email.parser
import email.policy
import re

from ..spool import Spool

HEAD_LIMIT = 64 * 1024  # bytes of a message read for its subject
SUBJECT_MAX = 998  # characters kept (RFC 5322's line limit)
#: front-ends whose objects are files or web content, not mail: no subject
NON_MAIL_FRONTENDS = frozenset({"icap", "http", "http_proxy", "ftp_proxy", "clamd"})

_HEAD_END = re.compile(rb"\r?\n\r?\n")
# the start of a header field (a line that is not a folded continuation)
_FIELD_START = re.compile(rb"\n(?=[^ \t])")
# C0 and C1 controls, DEL; bidi embeddings, overrides, isolates and marks; line and
# paragraph separators; lone surrogates; the BOM / zero-width no-break space
_UNWANTED = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                       "\u2066-\u2069\ud800-\udfff\ufeff]")
_SPACES = re.compile(r"\s+")


def head_of(content: Spool | bytes | bytearray | memoryview, limit: int = HEAD_LIMIT
            ) -> bytes:
    """The first ``limit`` bytes of ``content`` (a Spool on disk: one bounded read; in
    memory: a slice, no copy of the rest). Anything else (an iterator of chunks): nothing,
    since reading it would consume it. A spool that cannot be read gives nothing too (the
    store's own read of it then fails with a QuarantineError)."""
    if isinstance(content, Spool):
        if content.in_memory:
            view = content.getbuffer()
            try:
                return bytes(view[:limit])
            finally:
                if isinstance(view, memoryview):
                    view.release()  # the spool's buffer may grow again
        try:
            with content.open() as f:
                return f.read(limit)
        except OSError:
            return b""
    if isinstance(content, bytes | bytearray | memoryview):
        return bytes(content[:limit])
    return b""


def header_block(head: bytes, complete: bool) -> bytes:
    """The header block at the start of ``head``: up to the first empty line, or all of a
    ``complete`` message without one; when ``head`` was cut before its end, up to the last
    field that is certainly whole (a field's value ends where the next field starts)."""
    if head.startswith((b"\n", b"\r\n")):
        return b""  # an empty header block: no fields at all
    end = _HEAD_END.search(head)
    if end is not None:
        return head[:end.start()] + b"\r\n"
    if complete:
        return head
    starts = [m.start() for m in _FIELD_START.finditer(head)]
    return head[:starts[-1] + 1] if starts else b""


def clean_text(value: str, limit: int = SUBJECT_MAX) -> str:
    """``value`` as one safe line: unfolded, controls and bidi characters removed,
    whitespace runs made one space, at most ``limit`` characters."""
    value = _UNWANTED.sub(lambda m: " " if m.group() in "\t\r\n" else "", value)
    return _SPACES.sub(" ", value).strip()[:limit].rstrip()


def subject_of(head: bytes, limit: int = HEAD_LIMIT) -> str:
    """The decoded, cleaned ``Subject:`` of the message starting with ``head`` (its first
    ``limit`` bytes, see :func:`head_of`; a shorter ``head`` is the whole message); "" when
    the first header block has none (not mail, or a message without a subject). Never
    raises."""
    block = header_block(head[:limit], complete=len(head) < limit)
    if not block:
        return ""
    try:
        msg = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(block)
        value = msg.get("Subject")
        if value is None:
            return ""
        text = str(value)
    except Exception:  # a malformed header costs the subject, not the record
        return _raw_subject(block)
    return clean_text(text)


def _raw_subject(block: bytes) -> str:
    """The undecoded Subject of a header block read as UTF-8 (the fallback)."""
    m = re.search(rb"(?im)^subject[ \t]*:(.*(?:\r?\n[ \t].*)*)", block)
    if m is None:
        return ""
    return clean_text(m.group(1).decode("utf-8", "replace"))
