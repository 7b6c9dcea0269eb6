"""Cheap content type detection from magic bytes: which decomposer, if any, applies.

Only the first few hundred bytes are looked at, so detection costs the same for a 1 KB
and a 100 MB object. A false positive is harmless (the decomposer reports a corrupt
container); a false negative means the content is only scanned as one blob.
"""

from __future__ import annotations

import enum
import re


class Kind(enum.Enum):
    """What a blob is, as far as decomposition cares."""

    ZIP = "zip"
    GZIP = "gzip"
    BZIP2 = "bzip2"
    XZ = "xz"
    SEVENZIP = "7z"
    TAR = "tar"
    MAIL = "mail"
    OTHER = "other"  # a leaf: scanned as is (uuencoded blocks inside are still looked for)


# Local file header, empty archive (end of central directory), spanned-archive marker.
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
_GZIP_MAGIC = b"\x1f\x8b\x08"  # deflate is the only method gzip defines
_XZ_MAGIC = b"\xfd7zXZ\x00"
_SEVENZIP_MAGIC = b"7z\xbc\xaf\x27\x1c"
# "BZh" + block size digit + block magic (pi) or end-of-stream magic (sqrt pi, empty stream)
_BZIP2_RE = re.compile(rb"BZh[1-9](?:1AY&SY|\x17rE8P\x90)")
_TAR_MAGIC_OFFSET = 257  # "ustar\0" (POSIX) or "ustar " (GNU) in the first header block

# A mail message starts with a header field (RFC 5322 field name: printable ASCII except
# ":" and space) or an mbox "From " line. Requiring a well-known field name among the first
# header lines keeps random text such as "Note: ..." from being parsed as mail.
_FIRST_LINE_RE = re.compile(rb"(?:From |[!-9;-~]+:)")
_KNOWN_FIELD_RE = re.compile(
    rb"(?im)^(?:from|to|cc|subject|date|message-id|mime-version|content-type|received"
    rb"|return-path|reply-to|sender|delivered-to|x-[!-9;-~]*|dkim-signature"
    rb"|content-transfer-encoding|references|in-reply-to):"
)
_HEADER_PROBE = 4096  # bytes of the header block looked at for a known field


def detect(data: bytes) -> Kind:
    """Classify ``data`` by its first bytes; ``Kind.OTHER`` when nothing applies."""
    head = data[:8]
    if head.startswith(_ZIP_MAGICS):
        return Kind.ZIP
    if head.startswith(_GZIP_MAGIC):
        return Kind.GZIP
    if head.startswith(_XZ_MAGIC):
        return Kind.XZ
    if head.startswith(_SEVENZIP_MAGIC):
        return Kind.SEVENZIP
    if head.startswith(b"BZh") and _BZIP2_RE.match(data, 0, 10):
        return Kind.BZIP2
    if data[_TAR_MAGIC_OFFSET:_TAR_MAGIC_OFFSET + 5] == b"ustar":
        return Kind.TAR
    if looks_like_mail(data):
        return Kind.MAIL
    return Kind.OTHER


def looks_like_mail(data: bytes) -> bool:
    """True when ``data`` starts with a header block that contains a well-known mail field."""
    if not _FIRST_LINE_RE.match(data):
        return False
    probe = data[:_HEADER_PROBE]
    # Only the header block counts: a body line "To: ..." must not make text look like mail.
    # The first blank line, LF or CRLF: "\n\n" is looked for only before the first
    # "\r\n\r\n" (a CRLF message has none, and scanning the whole probe for it is slow).
    end = probe.find(b"\r\n\r\n")
    end_lf = probe.find(b"\n\n", 0, len(probe) if end == -1 else end)
    if end_lf != -1:
        end = end_lf
    if end != -1:
        probe = probe[:end]
    return _KNOWN_FIELD_RE.search(probe) is not None
