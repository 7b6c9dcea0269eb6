"""Cheap content type detection from magic bytes: which decomposer, if any, applies.

Only the first few hundred bytes are looked at, plus the last 64 KiB for a zip's end of
central directory record and, for text that starts like a mail header, its header block,
so detection costs about the same for a 1 KB and a 100 MB object. A false positive is
harmless (the decomposer reports a corrupt container); a false negative means the content
is only scanned as one blob.
"""

from __future__ import annotations

import enum
import re
import struct
import zlib


class Kind(enum.Enum):
    """What a blob is, as far as decomposition cares."""

    ZIP = "zip"
    GZIP = "gzip"
    BZIP2 = "bzip2"
    XZ = "xz"
    SEVENZIP = "7z"
    TAR = "tar"
    MAIL = "mail"
    # through libarchive (content/libarchive.py); ARJ and UDF have no reader: unknown
    RAR = "rar"
    CAB = "cab"
    ISO9660 = "iso9660"
    UDF = "udf"
    CPIO = "cpio"
    LHA = "lha"
    ARJ = "arj"
    # Office (content/office.py)
    OLE = "ole2"
    RTF = "rtf"
    # documents (content/tnef.py, pdf.py, html.py)
    TNEF = "tnef"
    PDF = "pdf"
    HTML = "html"
    OTHER = "other"  # a leaf: scanned as is (uuencoded blocks inside are still looked for)


# Local file header, empty archive (end of central directory), spanned-archive marker.
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
_GZIP_MAGIC = b"\x1f\x8b\x08"  # deflate is the only method gzip defines
_XZ_MAGIC = b"\xfd7zXZ\x00"
_SEVENZIP_MAGIC = b"7z\xbc\xaf\x27\x1c"
# "BZh" + block size digit + block magic (pi) or end-of-stream magic (sqrt pi, empty stream)
_BZIP2_RE = re.compile(rb"BZh[1-9](?:1AY&SY|\x17rE8P\x90)")
_TAR_MAGIC_OFFSET = 257  # "ustar\0" (POSIX) or "ustar " (GNU) in the first header block

# A zip is read from its end: the end of central directory record (EOCD) lies in the last
# 22 bytes + a comment of up to 64 KiB, wherever the archive starts (a self-extracting
# stub or any junk may come first; unzip, ClamAV and Python's zipfile all cope).
_EOCD = b"PK\x05\x06"
_EOCD_SIZE = 22
ZIP_TAIL = _EOCD_SIZE + 0xFFFF
_EOCD_STRUCT = struct.Struct("<4sHHHHLLH")
_ZIP64_LOCATOR = b"PK\x06\x07"
_CENTRAL_DIR = b"PK\x01\x02"

# A mail message starts with a header block: RFC 5322 field lines (a field name, printable
# ASCII except ":" and space, then ":") and their continuation lines, or an mbox "From "
# line first. Requiring a well-known field name in the block keeps random text such as
# "Note: ..." from being parsed as mail. The first field may be as long as the sender likes:
# the block is followed up to HEADER_PROBE, and a block that runs past it counts as mail.
_NAME_BYTES = bytes(range(0x21, 0x3A)) + bytes(range(0x3B, 0x7F))
# Names of up to 998 characters (the line limit) are matched by the regex; a longer one
# (the email package takes any) is checked with find/translate, so that a long line that is
# no field costs a memchr, not a character-class loop over it.
# Blanks before the colon are the obsolete syntax (RFC 5322 4.5.3) that many readers accept.
_FIELD_START = re.compile(rb"From |[!-9;-~]{1,998}+[ \t]*+:")
_HEADER_BLOCK_RE = re.compile(
    rb"(?:(?:From |[!-9;-~]{1,998}+[ \t]*+:|[ \t])[^\n]*+(?:\n|\Z))*+")
_KNOWN_FIELDS = (
    rb"from|to|cc|subject|date|message-id|mime-version|content-type|received"
    rb"|return-path|reply-to|sender|delivered-to|x-[!-9;-~]{0,998}+|dkim-signature"
    rb"|content-transfer-encoding|references|in-reply-to")
# After a line break (a literal prefix: the regex engine skips to each one), and at offset 0.
_KNOWN_FIELD_RE = re.compile(rb"\n(?i:" + _KNOWN_FIELDS + rb")[ \t]*+:")
_KNOWN_FIRST_RE = re.compile(rb"(?i:" + _KNOWN_FIELDS + rb")[ \t]*+:")
# The header block is looked at up to here. A block of field lines that runs past it counts
# as mail even without a known field: 64 KiB of header lines is a message (or hostile; real
# header blocks are a few KiB), and parsing a text as mail costs nothing in safety.
HEADER_PROBE = 64 * 1024


def detect(data: bytes) -> Kind:
    """Classify ``data`` by its first bytes (and a zip by its tail); ``Kind.OTHER`` else."""
    head = data[:8]
    if head.startswith(_ZIP_MAGICS):
        return Kind.ZIP
    if head.startswith(_GZIP_MAGIC):
        return Kind.GZIP
    if head.startswith(_XZ_MAGIC):
        return Kind.XZ
    if head.startswith(_SEVENZIP_MAGIC):
        return Kind.SEVENZIP
    if head.startswith(_TNEF_MAGIC):
        return Kind.TNEF
    if head.startswith(b"BZh") and _BZIP2_RE.match(data, 0, 10):
        return Kind.BZIP2
    if data[_TAR_MAGIC_OFFSET:_TAR_MAGIC_OFFSET + 5] == b"ustar":
        return Kind.TAR
    if (more := _more_kinds(data)) is not None:
        return more
    if looks_like_mail(data):
        return Kind.MAIL
    if b"%PDF-" in data[:PDF_PROBE]:  # after mail: "%PDF-" in a header is no PDF
        return Kind.PDF
    if zip_at_end(data):
        return Kind.ZIP
    if looks_like_html(data):
        return Kind.HTML
    return Kind.OTHER


def looks_like_mail(data: bytes) -> bool:
    """True when ``data`` starts with a header block that contains a well-known mail field.

    The block ends at the first line that is no field and no continuation (the blank line
    before the body, usually): a body line "To: ..." does not make text look like mail.
    The work is a few regex passes and memchr calls over at most :data:`HEADER_PROBE` bytes.
    """
    limit = min(len(data), HEADER_PROBE)
    if not _is_field_line(data, 0, limit):
        return False
    end = _header_block_end(data, limit)
    if _KNOWN_FIRST_RE.match(data, 0, end) or _KNOWN_FIELD_RE.search(data, 0, end):
        return True
    # No known field: mail only if the block runs up to the probe's end (which may cut its
    # last line short: as long as a field name may be).
    return len(data) > HEADER_PROBE and end > limit - 1000


def _is_field_line(data: bytes, pos: int, limit: int) -> bool:
    """Whether the line at ``pos`` starts a header field (or is an mbox "From " line)."""
    if _FIELD_START.match(data, pos, limit):
        return True
    eol = data.find(b"\n", pos, limit)
    colon = data.find(b":", pos, limit if eol < 0 else eol)
    return colon > pos + 998 and not data[pos:colon].translate(None, _NAME_BYTES)


def _header_block_end(data: bytes, limit: int) -> int:
    """Where the header block at the start of ``data`` ends (looked at up to ``limit``)."""
    pos = 0
    while True:
        block = _HEADER_BLOCK_RE.match(data, pos, limit)
        pos = block.end() if block is not None else pos
        if pos >= limit or not _is_field_line(data, pos, limit):
            return pos
        eol = data.find(b"\n", pos, limit)  # a field with a name past the regex's bound
        pos = limit if eol < 0 else eol + 1


def zip_at_end(data: bytes) -> bool:
    """True when a plausible zip end of central directory record ends ``data``.

    The record is looked for as unzip and zipfile do (the last signature in the last
    64 KiB + 22 bytes) and must make sense: its sizes point inside ``data`` and at a
    central directory entry, or at a zip64 locator. A few ``rfind``/``unpack`` calls.
    """
    size = len(data)
    pos = data.rfind(_EOCD, max(0, size - ZIP_TAIL))
    if pos < 0 or size - pos < _EOCD_SIZE:
        return False
    (_, disk, cd_disk, _, entries, cd_size, cd_offset,
     _) = _EOCD_STRUCT.unpack_from(data, pos)
    if pos >= 20 and data[pos - 20:pos - 16] == _ZIP64_LOCATOR:
        return True  # zip64: the sizes are in the zip64 record before the locator
    if disk != cd_disk or entries == 0 or cd_size > pos or cd_offset > pos - cd_size:
        return False
    return data[pos - cd_size:pos - cd_size + 4] == _CENTRAL_DIR


# -- more archives and Office (issue 20): libarchive.py and office.py read these ------------
_RAR_MAGICS = (b"Rar!\x1a\x07\x00", b"Rar!\x1a\x07\x01\x00")  # RAR 1.5-4.x, RAR 5
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_CAB_MAGIC = b"MSCF\x00\x00\x00\x00"
_ISO_OFFSETS = (0x8001, 0x8801, 0x9001)  # volume descriptors 16, 17, 18: "CD001" / UDF "BEA01"
_CPIO_ASCII = re.compile(rb"070707[0-7]{70}|07070[12][0-9A-Fa-f]{104}")
_LHA_METHOD = re.compile(rb"-(?:lh[0-7d]|lzs|lz[45])-")


def _more_kinds(data: bytes) -> Kind | None:
    """RAR, CAB, ISO 9660/UDF, cpio, LHA, ARJ, OLE2 and RTF by their magic numbers."""
    head = data[:8]
    if head.startswith(_RAR_MAGICS):
        return Kind.RAR
    if head == _OLE_MAGIC:
        return Kind.OLE
    if head.startswith(b"{\\rt"):  # "{\\rtf1", and "{\\rt" that Word also opens
        return Kind.RTF
    if head == _CAB_MAGIC and data[24:26] == b"\x03\x01":  # CFHEADER version 1.3
        return Kind.CAB
    if _CPIO_ASCII.match(data, 0, 110) or _cpio_binary(data):
        return Kind.CPIO
    if _LHA_METHOD.match(data, 2, 7) and len(data) > 21 and data[20] <= 3:
        return Kind.LHA
    if head.startswith(b"\x60\xea") and _arj_header(data):
        return Kind.ARJ
    for offset in _ISO_OFFSETS:
        magic = data[offset:offset + 5]
        if magic == b"CD001":
            return Kind.ISO9660
        if magic in (b"BEA01", b"NSR02", b"NSR03"):
            return _iso_after_udf(data) or Kind.UDF
    return None


def _iso_after_udf(data: bytes) -> Kind | None:
    """A UDF bridge disc (UDF and ISO 9660 volume descriptors) is read as ISO 9660."""
    found = any(data[o:o + 5] == b"CD001" for o in range(0x8001, min(len(data), 0x10001), 0x800))
    return Kind.ISO9660 if found else None


def _cpio_binary(data: bytes) -> bool:
    """Old binary cpio (magic 0o070707 in either byte order) with a sane first header."""
    if len(data) < 28 or data[:2] not in (b"\xc7\x71", b"\x71\xc7"):
        return False
    order = "<" if data[:2] == b"\xc7\x71" else ">"
    mode, namesize = struct.unpack_from(order + "H", data, 6)[0], struct.unpack_from(
        order + "H", data, 20)[0]
    return 0 < namesize <= 4096 and mode & 0o170000 != 0 and data[26 + namesize - 1:
                                                                   26 + namesize] == b"\x00"


def _arj_header(data: bytes) -> bool:
    """An ARJ main header: 0x60 0xEA, its size (up to 2600) and a matching CRC-32."""
    if len(data) < 8:
        return False
    size = int.from_bytes(data[2:4], "little")
    end = 4 + size
    if not 0 < size <= 2600 or len(data) < end + 4:
        return False
    return zlib.crc32(data[4:end]) == int.from_bytes(data[end:end + 4], "little")


# -- documents (issue 20): tnef.py, pdf.py and html.py read these ---------------------------
_TNEF_MAGIC = b"\x78\x9f\x3e\x22"  # 0x223E9F78, little-endian
PDF_PROBE = 1024  # readers accept junk before "%PDF-" up to about here
_HTML_PROBE = 1024
_UTF16_BOMS = ((b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))
# The tags browsers sniff HTML by (WHATWG MIME Sniffing) and those smuggling pages start
# with, anywhere in the first KiB; a tag name ends at a blank, ">" or "/".
_HTML_TAG = re.compile(
    rb"<(?:!doctype[ \t\r\n\x0c]+html|html|head|body|script|iframe|h1|div|font|table|a|style"
    rb"|title|b|br|p|svg|img|object|embed|meta|form|!--)(?=[ \t\r\n\x0c>/])", re.IGNORECASE)


def looks_like_html(data: bytes) -> bool:
    """An HTML tag within the first KiB (UTF-16 by its BOM): a browser renders it as a page."""
    for bom, encoding in _UTF16_BOMS:
        if data.startswith(bom):
            head = data[2:2 + 2 * _HTML_PROBE].decode(encoding, "replace").encode()
            return _HTML_TAG.search(head) is not None
    return _HTML_TAG.search(data, 0, _HTML_PROBE) is not None
