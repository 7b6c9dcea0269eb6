"""Hostile samples, generated: archive and MIME bombs, and content shaped to slip past.

Used by the content unit tests and by ``tests/attacks``; every builder is fast (a 500,000-
entry 7z is ~2 KB and builds in well under a second) and deterministic.
"""

from __future__ import annotations

import base64
import bz2
import lzma
import struct
import zlib

from tests.corpus import EICAR, make_zip

SEVENZIP_MAGIC = b"7z\xbc\xaf\x27\x1c"


# -- 7z by hand -------------------------------------------------------------------------------
def sz_number(value: int) -> bytes:
    """A 7z NUMBER: the count of leading 1 bits in the first byte says how many follow."""
    for extra in range(8):
        if value < 1 << (7 * (extra + 1)):
            high = value >> (8 * extra)
            first = (0xFF00 >> extra) & 0xFF | high
            return bytes([first]) + (value & ((1 << (8 * extra)) - 1)).to_bytes(extra, "little")
    return b"\xff" + value.to_bytes(8, "little")


def sz_bits(count: int) -> bytes:
    """A 7z bit vector of ``count`` set bits (MSB first)."""
    full, rest = divmod(count, 8)
    return b"\xff" * full + (bytes([(0xFF << (8 - rest)) & 0xFF]) if rest else b"")


def sz_raw_header(entries: int, name: str = "a", directories: bool = False) -> bytes:
    """A raw 7z header (kHeader) listing ``entries`` empty files (or directories)."""
    names = (name.encode("utf-16-le") + b"\0\0") * entries
    empty = sz_bits(entries)
    files = (b"\x05" + sz_number(entries)
             + b"\x0e" + sz_number(len(empty)) + empty)
    if not directories:  # empty files, not directories
        files += b"\x0f" + sz_number(len(empty)) + empty
    files += b"\x11" + sz_number(len(names) + 1) + b"\x00" + names + b"\x00"
    return b"\x01" + files + b"\x00"


_CODERS = {
    # coder record (flags | id size, id, properties), how to pack
    "deflate": (b"\x03\x04\x01\x08", lambda raw: _deflate(raw)),
    "lzma": (b"\x23\x03\x01\x01\x05\x5d\x00\x00\x10\x00",
             lambda raw: lzma.compress(raw, lzma.FORMAT_RAW, filters=[
                 {"id": lzma.FILTER_LZMA1, "dict_size": 1 << 20}])),
    "bzip2": (b"\x03\x04\x02\x02", lambda raw: bz2.compress(raw)),
    "copy": (b"\x01\x00", lambda raw: raw),
}


def _deflate(raw: bytes) -> bytes:
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    return co.compress(raw) + co.flush()


def sevenzip(header: bytes, coding: str | None = "deflate", *,
             declared: int | None = None) -> bytes:
    """A 7z archive whose next header is ``header``: raw (coding None) or a kEncodedHeader
    packing it with ``coding``; ``declared`` overrides the unpack size it declares."""
    if coding is None:
        body, next_header = b"", header
    else:
        coder, pack = _CODERS[coding]
        packed = pack(header)
        size = len(header) if declared is None else declared
        next_header = (b"\x17"
                       + b"\x06" + sz_number(0) + sz_number(1) + b"\x09" + sz_number(len(packed))
                       + b"\x00"
                       + b"\x07\x0b" + sz_number(1) + b"\x00" + b"\x01" + coder
                       + b"\x0c" + sz_number(size)
                       + b"\x0a\x01" + struct.pack("<I", zlib.crc32(header))
                       + b"\x00"
                       + b"\x00")
        body = packed
    start = struct.pack("<QQI", len(body), len(next_header), zlib.crc32(next_header))
    return (SEVENZIP_MAGIC + b"\x00\x04" + struct.pack("<I", zlib.crc32(start)) + start
            + body + next_header)


def sevenzip_entry_bomb(entries: int = 500_000, coding: str | None = "deflate") -> bytes:
    """The issue's sample: a tiny 7z whose (Deflate-coded) header lists ``entries`` files."""
    return sevenzip(sz_raw_header(entries), coding)


# -- zip by hand ------------------------------------------------------------------------------
def zip_entry_bomb(entries: int, *, declared: int | None = None) -> bytes:
    """A zip of ``entries`` empty stored files named "a" (minimal headers); ``declared``
    overrides the entry count in the end of central directory record (zipfile ignores it)."""
    local = struct.pack("<4sHHHHHLLLHH", b"PK\x03\x04", 20, 0, 0, 0, 0x21, 0, 0, 0, 1, 0) + b"a"
    central = b"".join(
        struct.pack("<4sHHHHHHLLLHHHHHLL", b"PK\x01\x02", 20, 20, 0, 0, 0, 0x21, 0, 0, 0, 1,
                    0, 0, 0, 0, 0, i * len(local)) + b"a"
        for i in range(entries))
    count = entries if declared is None else declared
    eocd = struct.pack("<4sHHHHLLH", b"PK\x05\x06", 0, 0, min(count, 0xFFFF),
                       min(count, 0xFFFF), len(central), entries * len(local), 0)
    return local * entries + central + eocd


def eicar_zip() -> bytes:
    return make_zip([("eicar.com", EICAR)])


def junk_prefixed_zip(prefix: bytes = b"\x00") -> bytes:
    """A zip with bytes before it: unzip and zipfile still extract it."""
    return prefix + eicar_zip()


# A stand-in self-extractor: a DOS/PE-looking stub; the archive follows it, as `zip -A` or
# `cat unzipsfx archive.zip` make them.
SFX_STUB = b"MZ\x90\x00" + bytes(60) + b"This program cannot be run in DOS mode.\r\n" + bytes(400)


def self_extracting_zip() -> bytes:
    return SFX_STUB + eicar_zip()


# -- mail -------------------------------------------------------------------------------------
def b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def multipart_mail(parts: list[bytes], *, first_header: bytes = b"", preamble: bytes = b"",
                   epilogue: bytes = b"", boundary: bytes = b"b0undary") -> bytes:
    """A CRLF multipart/mixed message of base64 ``parts``; ``first_header`` comes first."""
    head = (first_header + b"From: sender@example.org\r\nTo: rcpt@example.com\r\n"
            b"Subject: hostile\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n')
    body = b"".join(b"--" + boundary + b"\r\nContent-Type: application/octet-stream\r\n"
                    b"Content-Transfer-Encoding: base64\r\n\r\n" + b64(p) for p in parts)
    return head + preamble + body + b"--" + boundary + b"--\r\n" + epilogue


def long_first_header_mail(size: int = 5000, name: bytes = b"Junk") -> bytes:
    """EICAR attached to a mail whose first header field (not a well-known one) is ``size``
    bytes long, so the known fields start after the first 4 KiB."""
    return multipart_mail([EICAR], first_header=name + b": " + b"j" * size + b"\r\n")


def many_parts_mail(parts: int) -> bytes:
    """A multipart message of ``parts`` tiny text parts (~40 bytes each)."""
    body = b"--b\r\n\r\nx\r\n" * parts
    return (b"From: a@example.org\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + body + b"--b--\r\n")


def semicolon_parameter_mail(size: int = 62_000) -> bytes:
    """A mail with one quoted parameter full of ";" (quadratic in the email package)."""
    value = b'"' + b";" * size + b'"'
    return (b"From: a@example.org\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
            b"--b\r\nContent-Type: application/octet-stream; name=" + value + b"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + b64(EICAR) + b"--b--\r\n")


def begin_base64_text(data: bytes = EICAR, name: bytes = b"eicar.com") -> bytes:
    """``uuencode -m`` output: a begin-base64 block in a text body, ended by ``====``."""
    return (b"Hello,\r\n\r\nthe file follows.\r\n\r\nbegin-base64 644 " + name + b"\r\n"
            + b64(data) + b"====\r\n\r\nbye\r\n")


def preamble_mail(text: bytes = EICAR) -> bytes:
    """``text`` as the preamble of a multipart message (before the first boundary)."""
    return multipart_mail([b"harmless"], preamble=text + b"\r\n")


def epilogue_mail(text: bytes = EICAR) -> bytes:
    """``text`` as the epilogue of a multipart message (after the close delimiter)."""
    return multipart_mail([b"harmless"], epilogue=text + b"\r\n")


def renamed_7z(members: list[tuple[str, bytes]]) -> bytes:
    """A 7z whose members have names py7zr refuses to write (``../x``, ``C:x``, ``/x``).

    Written by py7zr under same-length placeholders with a raw (unencoded) header, then the
    names are patched in the header and its CRCs fixed.
    """
    import io

    import py7zr

    placeholders = [chr(ord("A") + index) * len(name) for index, (name, _) in enumerate(members)]
    buf = io.BytesIO()
    with py7zr.SevenZipFile(buf, "w") as archive:
        archive.set_encoded_header_mode(False)
        for placeholder, (_, data) in zip(placeholders, members, strict=True):
            archive.writestr(data, placeholder)
    raw = bytearray(buf.getvalue())
    offset, size = struct.unpack_from("<QQ", raw, 12)
    start = 32 + offset
    header = bytes(raw[start:start + size])
    for placeholder, (name, _) in zip(placeholders, members, strict=True):
        old, new = placeholder.encode("utf-16-le"), name.encode("utf-16-le")
        assert len(old) == len(new) and header.count(old) == 1
        header = header.replace(old, new)
    raw[start:start + size] = header
    struct.pack_into("<I", raw, 28, zlib.crc32(header))
    struct.pack_into("<I", raw, 8, zlib.crc32(bytes(raw[12:32])))
    return bytes(raw)


def corrupt_crc_7z(members: list[tuple[str, bytes]], bad: str) -> bytes:
    """A 7z (stored, non-solid) whose member ``bad`` fails its CRC check."""
    import io

    import py7zr

    buf = io.BytesIO()
    with py7zr.SevenZipFile(buf, "w", filters=[{"id": py7zr.FILTER_COPY}]) as archive:
        archive.set_encoded_header_mode(False)
        for name, data in members:
            archive.writestr(data, name)
    raw = bytearray(buf.getvalue())
    content = dict(members)[bad]
    pos = raw.find(content)
    assert pos > 0
    raw[pos] ^= 0xFF  # the stored bytes change; the CRC in the header does not
    return bytes(raw)
