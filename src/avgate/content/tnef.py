"""MS-TNEF (``winmail.dat``, ``application/ms-tnef``): the attachments inside, by name.

A TNEF stream is a signature (0x223E9F78), a 2-byte key, then attributes: level (1 byte),
attribute id (4: type << 16 | id), length (4), that many bytes, a 2-byte checksum. An
attachment starts at ``attAttachRendData``; its bytes are ``attAttachData`` or the MAPI
property ``PR_ATTACH_DATA_BIN``/``_OBJ`` inside ``attAttachment``, its name
``PR_ATTACH_LONG_FILENAME``, else ``attAttachTitle``, else ``PR_ATTACH_FILENAME``. An
embedded message (``PR_ATTACH_DATA_OBJ``) is a TNEF stream itself and is decomposed in
turn. The message body properties (``attBody``, ``PR_BODY``, ``PR_BODY_HTML``,
``PR_RTF_COMPRESSED``) are parts too.

Written here rather than taken from ``tnefparse`` (last release 2021): that library copies
the rest of the stream for every attribute (quadratic in time and memory on a stream of
many small attributes), loops as often as a recipient count says, and raises on an
attachment attribute before the first ``attAttachRendData``. This reader never copies more
than an attribute's own bytes, checks every declared length and count against the bytes
left before using it, and ignores checksums (as clamd and Outlook do): a bad checksum does
not keep an attachment from being scanned.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..result import LimitKind, ScanStatus
from . import REASON_FILES, Budget, Children, Part, Problem, join_path, sanitize_name

__all__ = ["mapi_properties", "tnef_parts"]

# The signature (0x223E9F78) is what detect() recognises (filetype.py); the reader starts
# after it and the 2-byte key.
_ATTRIBUTE = struct.Struct("<BII")  # level, id (type << 16 | id), length
_LEVEL_ATTACHMENT = 2

# attribute ids (low 16 bits)
_ATT_BODY = 0x800C
_ATT_ATTACH_DATA = 0x800F
_ATT_ATTACH_TITLE = 0x8010
_ATT_ATTACH_REND_DATA = 0x9002
_ATT_MAPI_PROPS = 0x9003
_ATT_ATTACHMENT = 0x9005

# MAPI property ids and types
_PR_ATTACH_DATA = 0x3701  # PR_ATTACH_DATA_BIN (binary) or PR_ATTACH_DATA_OBJ (object)
_PR_ATTACH_FILENAME = 0x3704
_PR_ATTACH_LONG_FILENAME = 0x3707
_PR_BODY = 0x1000
_PR_RTF_COMPRESSED = 0x1009
_PR_BODY_HTML = 0x1013
_BODY_NAMES = {_PR_BODY: "body.txt", _PR_RTF_COMPRESSED: "body.rtf.lzfu",
               _PR_BODY_HTML: "body.html"}
_PT_STRING8, _PT_UNICODE, _PT_BINARY, _PT_OBJECT = 0x001E, 0x001F, 0x0102, 0x000D
_VARIABLE = frozenset({_PT_STRING8, _PT_UNICODE, _PT_BINARY, _PT_OBJECT})
_FIXED = {0x0002: 4, 0x0003: 4, 0x0004: 4, 0x000A: 4, 0x000B: 4, 0x0005: 8, 0x0006: 8,
          0x0007: 8, 0x0014: 8, 0x0040: 8, 0x0048: 16, 0x0001: 0, 0x0000: 0}
_MULTI = 0x1000
_IID = 16  # a PT_OBJECT value starts with the interface id


class Corrupt(Exception):
    """The stream breaks off or declares more than it holds."""


@dataclass(slots=True)
class _Attachment:
    data: list[bytes] = field(default_factory=list)
    title: str = ""
    long_name: str = ""
    short_name: str = ""

    def name(self, index: int) -> str:
        return sanitize_name(self.long_name or self.title or self.short_name,
                             f"attachment{index}")


def _attributes(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(level, id, bytes) of each attribute; Corrupt where one breaks off."""
    pos, size = 6, len(data)
    while pos < size:
        if pos + _ATTRIBUTE.size > size:
            raise Corrupt("truncated attribute header")
        level, ident, length = _ATTRIBUTE.unpack_from(data, pos)
        start = pos + _ATTRIBUTE.size
        if length > size - start:
            yield level, ident & 0xFFFF, data[start:]  # scanned as far as it goes
            raise Corrupt("attribute longer than the stream")
        yield level, ident & 0xFFFF, data[start:start + length]
        pos = start + length + 2  # checksum: not checked


class _Reader:
    """Bounds-checked little-endian reads over one MAPI property block."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise Corrupt("truncated MAPI property")
        value: int = int.from_bytes(self.data[self.pos:self.pos + 4], "little")
        self.pos += 4
        return value

    def take(self, size: int) -> bytes:
        if size > len(self.data) - self.pos:
            raise Corrupt("MAPI value longer than its attribute")
        value = self.data[self.pos:self.pos + size]
        self.pos += size + (-size % 4)  # values are padded to 4 bytes
        return value

    def count(self, smallest: int) -> int:
        """A declared count, refused when the bytes left cannot hold that many items."""
        value = self.u32()
        if value * smallest > len(self.data) - self.pos:
            raise Corrupt(f"MAPI count {value} larger than its attribute")
        return value


def mapi_properties(block: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(property id, type, value) of each value in a MAPI property block.

    Fixed-size values come as their bytes; a multi-valued property yields each value.
    """
    reader = _Reader(block)
    for _ in range(reader.count(4)):
        tag = reader.u32()
        ptype, pid = tag & 0xFFFF, tag >> 16
        if pid >= 0x8000:  # a named property: GUID, kind, then an id or a name
            reader.take(16)
            if reader.u32() == 0:
                reader.u32()
            else:
                reader.take(reader.u32())
        base = ptype & ~_MULTI
        if base in _VARIABLE:
            for _ in range(reader.count(4)):
                yield pid, base, reader.take(reader.u32())
        elif base in _FIXED:
            values = reader.count(_FIXED[base]) if ptype & _MULTI else 1
            for _ in range(values):
                yield pid, base, reader.take(_FIXED[base])
        else:
            raise Corrupt(f"unknown MAPI property type 0x{base:04x}")


def _string(ptype: int, value: bytes) -> str:
    if ptype == _PT_UNICODE:
        return value.decode("utf-16-le", "replace").split("\0", 1)[0]
    return value.split(b"\0", 1)[0].decode("latin-1")


def _read_attachment_props(block: bytes, attachment: _Attachment) -> None:
    for pid, ptype, value in mapi_properties(block):
        if pid == _PR_ATTACH_DATA and ptype == _PT_BINARY:
            attachment.data.append(value)
        elif pid == _PR_ATTACH_DATA and ptype == _PT_OBJECT:
            attachment.data.append(value[_IID:])  # an embedded message: TNEF again
        elif pid == _PR_ATTACH_LONG_FILENAME and ptype in (_PT_STRING8, _PT_UNICODE):
            attachment.long_name = _string(ptype, value)
        elif pid == _PR_ATTACH_FILENAME and ptype in (_PT_STRING8, _PT_UNICODE):
            attachment.short_name = _string(ptype, value)


def tnef_parts(part: Part, budget: Budget) -> Children:
    """The attachments (and message bodies) of a TNEF stream, named by their file names.

    Every part is a slice of the stream: nothing decompresses, so no part is larger than
    the stream; counts and lengths are checked against the bytes left before use.
    """
    depth = part.depth + 1
    max_files = budget.limits.max_files
    attachments: list[_Attachment] = []
    current: _Attachment | None = None
    error: str | None = None
    too_many = False
    try:
        for level, ident, value in _attributes(part.data):
            if ident == _ATT_ATTACH_REND_DATA:
                if len(attachments) >= max_files:
                    # Attachments are collected before they are yielded: a stream of empty
                    # attachment headers must not build millions of them.
                    too_many = True
                    break
                current = _Attachment()
                attachments.append(current)
            elif level == _LEVEL_ATTACHMENT and ident in (_ATT_ATTACH_DATA, _ATT_ATTACH_TITLE,
                                                          _ATT_ATTACHMENT):
                if current is None:  # no attAttachRendData first: an attachment anyway
                    current = _Attachment()
                    attachments.append(current)
                if ident == _ATT_ATTACH_DATA:
                    current.data.append(value)
                elif ident == _ATT_ATTACH_TITLE:
                    current.title = value.split(b"\0", 1)[0].decode("latin-1")
                else:
                    try:
                        _read_attachment_props(value, current)
                    except Corrupt as exc:  # this block only: the attributes go on
                        error = str(exc)
            elif ident == _ATT_BODY:
                yield Part(join_path(part.path, "body.txt"), value, depth)
            elif ident == _ATT_MAPI_PROPS:
                try:
                    bodies = [(pid, prop) for pid, ptype, prop in mapi_properties(value)
                              if pid in _BODY_NAMES and ptype in _VARIABLE]
                except Corrupt as exc:
                    error, bodies = str(exc), []
                for pid, prop in bodies:
                    yield Part(join_path(part.path, _BODY_NAMES[pid]), prop, depth)
    except Corrupt as exc:
        error = str(exc)
    for index, attachment in enumerate(attachments, 1):
        name = attachment.name(index)
        for number, data in enumerate(attachment.data):
            suffix = f"~{number + 1}" if number else ""
            yield Part(join_path(part.path, name + suffix), data, depth)
            if budget.stopped:
                return
    if too_many:
        yield Problem(part.path, ScanStatus.SKIPPED,
                      f"{REASON_FILES} (more than max_files {max_files} TNEF attachments)",
                      LimitKind.STRUCTURAL)
    elif error is not None:
        yield Problem(part.path, ScanStatus.UNKNOWN, f"corrupt TNEF: {error}")
