"""PDF: every stream decoded through its filters, embedded files by name, object streams.

Malware PDFs are often malformed on purpose (wrong ``/Length``, a broken cross-reference
table, names written with ``#xx`` escapes), so this is a tolerant scan of the file as clamd
does it, not a reader that trusts the cross-reference table: every ``N G obj`` header is
visited in file order, its dictionary parsed (no further than the next header, so a broken
object hides nothing after it and no byte is parsed twice), and when ``stream`` follows, the
stream's bytes (``/Length`` when it points at ``endstream``, else up to the next
``endstream``) are decoded through ``/Filter`` (FlateDecode, ASCIIHexDecode, ASCII85Decode,
LZWDecode, RunLengthDecode, chained, with PNG/TIFF predictors) and yielded as a part of
their own. An image codec (DCT, JPX, JBIG2, CCITT) or a filter no viewer knows leaves the
bytes as they are; a stream that breaks off is scanned as far as it decodes (a viewer gets
no more out of it either). A ``>> stream`` no header leads to is read too (``stream@N``),
a stream without ``/Filter`` that is zlib data is also inflated (``objN~flate``), and a zip
appended to the PDF (a polyglot) is read as a zip as well.

Names: a stream that a file specification's ``/EF`` points at (the ``/EmbeddedFiles`` name
tree and ``/FileAttachment`` annotations both end in one) is named by the specification's
``/UF`` or ``/F``; every other stream is ``objN``. Object streams (``/Type /ObjStm``) are
yielded too, and the objects inside them searched for file specifications. JavaScript
written as a string (``/JS (...)``) is a part of its own (``jsN``).

Limits: every decoded stream is bounded by :meth:`Budget.cap` (zlib with ``max_length``: a
deflate bomb never materialises), the number of objects by :data:`OBJECTS_PER_FILE` per
``max_files``, the nesting of arrays and dictionaries by :data:`MAX_NESTING`.

Encryption: a trailer (or cross-reference stream) with ``/Encrypt`` is decrypted when the
empty user password opens it (standard security handler, RC4 and AES, revisions 2 to 6:
what a viewer opens without asking), else the PDF is ``unknown``.
"""

from __future__ import annotations

import binascii
import bisect
import collections
import functools
import hashlib
import re
import struct
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from ..result import LimitKind, ScanStatus
from . import (
    REASON_FILE_SIZE,
    Budget,
    Children,
    Part,
    Problem,
    join_path,
    sanitize_name,
)
from .filetype import zip_at_end
from .mime import uuencoded_parts

__all__ = ["MAX_NESTING", "OBJECTS_PER_FILE", "Name", "PdfObject", "Ref", "decode_stream",
           "pdf_parts"]

# Objects visited per max_files: a 25 MB PDF with 200,000 small objects is a big document,
# not an attack; more are refused (parsing each costs some tens of µs of Python).
OBJECTS_PER_FILE = 20
MAX_NESTING = 32  # arrays/dictionaries inside each other (real files: under 10)
_ENDSTREAM_SLACK = 64  # bytes of blanks tolerated between a stream's data and "endstream"


class Ref(NamedTuple):
    """An indirect reference ``N G R``."""

    num: int
    gen: int


class Name(str):
    """A PDF name (``/FlateDecode``), ``#xx`` escapes decoded; a ``str`` without the slash."""

    __slots__ = ()


# A parsed PDF object: strings are bytes, names Name, dictionaries keyed by name.
PdfObject = (dict[str, "PdfObject"] | list["PdfObject"] | bytes | Name | int | float | bool
             | Ref | None)


class Malformed(Exception):
    """The object syntax could not be read (too deep, truncated)."""


# -- the object syntax -------------------------------------------------------------------------
_WS = rb"\x00\t\n\x0c\r "
_DELIMS = rb"()<>\[\]{}/%"
_SKIP = re.compile(rb"(?:[" + _WS + rb"]+|%[^\r\n]*)*")
_REGULAR = rb"[^" + _WS + _DELIMS + rb"]"
# One token per match, blanks and comments before it included: a name, a number (with the
# "G R" that makes it a reference), a bracket, a hex string, the start of a literal string,
# a keyword, or any other byte.
_TOKEN = re.compile(
    rb"(?:[" + _WS + rb"]+|%[^\r\n]*)*+(?:"
    rb"/(?P<name>" + _REGULAR + rb"*)"
    rb"|(?P<num>[+-]?(?:\d+\.?\d*|\.\d+))(?:[" + _WS + rb"]+(?P<gen>\d{1,10})[" + _WS
    + rb"]+R(?!" + _REGULAR + rb"))?"
    rb"|(?P<open><<|\[)"
    rb"|(?P<close>>>|\])"
    rb"|<(?P<hex>[^>]*)>?"
    rb"|(?P<str>\()"
    rb"|(?P<word>" + _REGULAR + rb"+)"
    rb"|(?P<other>[\s\S]))")
_SIMPLE_STRING = re.compile(rb"\(([^()\\]*)\)")
_NAME_ESCAPE = re.compile(rb"#([0-9A-Fa-f]{2})")
_STRING_SPECIAL = re.compile(rb"[()\\]")
_NOT_HEX = re.compile(rb"[^0-9A-Fa-f]+")
_OCTAL = re.compile(rb"[0-7]{1,3}")
_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b",
            ord("f"): b"\f", ord("("): b"(", ord(")"): b")", ord("\\"): b"\\"}
_KEYWORDS: dict[bytes, PdfObject] = {b"true": True, b"false": False}


def _name(raw: bytes) -> Name:
    if b"#" in raw:
        raw = _NAME_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), raw)
    return Name(raw.decode("latin-1"))


def _dictionary(items: list[PdfObject]) -> dict[str, PdfObject]:
    """Keys and values in turn; junk where a key should be is skipped, as viewers do."""
    out: dict[str, PdfObject] = {}
    index, size = 0, len(items)
    while index < size:
        key = items[index]
        if isinstance(key, Name):
            out[key] = items[index + 1] if index + 1 < size else None
            index += 2
        else:
            index += 1
    return out


class _Parser:
    """Reads one object at a time from ``data[pos:end]`` (positions are offsets into data).

    A token regex and a stack of open arrays and dictionaries: one regex match per token,
    no recursion, nesting bounded by :data:`MAX_NESTING`.
    """

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def value(self) -> PdfObject:
        """The next object; Malformed where it breaks off (the end) or nests too deep."""
        data, end = self.data, self.end
        stack: list[tuple[bool, list[PdfObject]]] = []  # (is a dictionary, items so far)
        while True:
            match = _TOKEN.match(data, self.pos, end)
            if match is None or match.lastgroup is None:
                raise Malformed("truncated")
            self.pos = match.end()
            kind = match.lastgroup
            item: PdfObject
            if kind == "name":
                item = _name(match.group("name"))
            elif kind in ("num", "gen"):
                text = match.group("num")
                gen = match.group("gen")
                if gen is not None and b"." not in text:
                    item = Ref(int(text), int(gen))
                else:
                    item = float(text) if b"." in text else int(text)
                    if gen is not None:  # "1.5 0 R": not a reference; read on after the number
                        self.pos = match.end("num")
            elif kind == "open":
                if len(stack) >= MAX_NESTING:
                    raise Malformed("nesting too deep")
                stack.append((match.group("open") == b"<<", []))
                continue
            elif kind == "close":
                if not stack:
                    return None  # a stray closing bracket
                is_dict, items = stack.pop()
                item = _dictionary(items) if is_dict else items
            elif kind == "hex":
                item = _unhex(match.group("hex"))
            elif kind == "str":
                item = self.string(match.start("str"))
            elif kind == "word":
                item = _KEYWORDS.get(match.group("word"))
            else:  # a stray delimiter: ")", "{", "}"
                item = None
            if not stack:
                return item
            stack[-1][1].append(item)

    def string(self, start: int) -> bytes:
        """A literal string at ``start``: balanced parentheses, backslash escapes."""
        data, end = self.data, self.end
        simple = _SIMPLE_STRING.match(data, start, end)
        if simple is not None:
            self.pos = simple.end()
            return simple.group(1)
        pos = start + 1
        out = bytearray()
        level = 1
        while True:
            match = _STRING_SPECIAL.search(data, pos, end)
            if match is None:
                raise Malformed("unterminated string")
            out += data[pos:match.start()]
            pos = match.end()
            char = match.group()
            if char == b"(":
                level += 1
                out += char
            elif char == b")":
                level -= 1
                if level == 0:
                    self.pos = pos
                    return bytes(out)
                out += char
            else:
                nxt = data[pos:pos + 1] if pos < end else b""
                octal = _OCTAL.match(data, pos, end)
                if octal is not None:
                    out.append(int(octal.group(), 8) & 0xFF)
                    pos = octal.end()
                elif nxt in (b"\r", b"\n"):  # a line continuation
                    pos += 2 if data.startswith(b"\r\n", pos) else 1
                elif nxt:
                    out += _ESCAPES.get(nxt[0], nxt)
                    pos += 1


def _unhex(text: bytes) -> bytes:
    digits = _NOT_HEX.sub(b"", text)
    if len(digits) % 2:
        digits += b"0"
    return binascii.unhexlify(digits)


# -- filters -------------------------------------------------------------------------------
class _Overflow(Exception):
    """A filter produced more than the cap allows."""


_FLATE_CHUNK = 64 * 1024


def _flate(data: bytes, cap: int) -> tuple[bytes, str | None]:
    """Inflate ``data`` (zlib, or raw deflate when the header is bad) to at most cap + 1."""
    out, error = _inflate_with(zlib.decompressobj(), data, cap)
    if not out and error is not None:
        out, error = _inflate_with(zlib.decompressobj(-zlib.MAX_WBITS), data, cap)
    return out, error


def _inflate_with(dec: zlib._Decompress, data: bytes, cap: int) -> tuple[bytes, str | None]:
    out = bytearray()
    # Fed in chunks: a checksum error at the end costs only the last chunk's output.
    for start in range(0, len(data), _FLATE_CHUNK):
        pending = data[start:start + _FLATE_CHUNK]
        while pending:
            try:
                out += dec.decompress(pending, cap + 1 - len(out))
            except zlib.error as exc:
                return bytes(out), str(exc)
            if len(out) > cap:
                raise _Overflow
            if dec.eof:
                return bytes(out), None
            pending = dec.unconsumed_tail
    # No flush(): it has no output bound; all input is consumed, and what inflate still
    # holds back is at most one match (258 bytes) of a stream that breaks off here.
    return bytes(out), "truncated stream"


def _ascii_hex(data: bytes, cap: int) -> tuple[bytes, str | None]:
    end = data.find(b">")
    return _unhex(data if end < 0 else data[:end]), None


_A85_JUNK = re.compile(rb"[^!-uz]+")


def _ascii85(data: bytes, cap: int) -> tuple[bytes, str | None]:
    start = data.find(b"<~")
    body = data[start + 2:] if start >= 0 else data
    end = body.find(b"~>")
    body = _A85_JUNK.sub(b"", body if end < 0 else body[:end])
    # Decoded by hand: each "z" is 4 zero bytes, each group of 5 digits 4 bytes, so the
    # output is never over 4 bytes per input byte (no unbounded growth to guard).
    out = bytearray()
    group: list[int] = []
    for char in body:
        if char == 0x7A:  # "z"
            if group:
                return bytes(out), "z inside a group"
            out += b"\0\0\0\0"
        else:
            group.append(char - 33)
            if len(group) == 5:
                value = 0
                for digit in group:
                    value = value * 85 + digit
                if value > 0xFFFFFFFF:
                    return bytes(out), "ASCII85 group out of range"
                out += value.to_bytes(4, "big")
                group.clear()
        if len(out) > cap:
            raise _Overflow
    if group:
        if len(group) == 1:
            return bytes(out), "ASCII85 final group of one digit"
        count = len(group) - 1
        value = 0
        for digit in group + [84] * (5 - len(group)):
            value = value * 85 + digit
        out += (value & 0xFFFFFFFF).to_bytes(4, "big")[:count]
    return bytes(out), None


def _lzw(data: bytes, cap: int, early: int = 1) -> tuple[bytes, str | None]:
    """LZW as PDF writes it (MSB first, 9 to 12 bits, clear 256, EOD 257, early change)."""
    out = bytearray()
    table: list[bytes] = [bytes([i]) for i in range(256)] + [b"", b""]
    width, previous = 9, b""
    bits = value = 0
    for byte in data:
        value = (value << 8) | byte
        bits += 8
        while bits >= width:
            bits -= width
            code = (value >> bits) & ((1 << width) - 1)
            value &= (1 << bits) - 1
            if code == 256:
                del table[258:]
                width, previous = 9, b""
                continue
            if code == 257:
                return bytes(out), None
            if code < len(table):
                entry = table[code]
                if previous and len(table) < 4096:
                    table.append(previous + entry[:1])
            elif code == len(table) and previous and len(table) < 4096:
                entry = previous + previous[:1]
                table.append(entry)
            else:
                return bytes(out), "bad LZW code"
            out += entry
            if len(out) > cap:
                raise _Overflow
            previous = entry
            if len(table) + early >= (1 << width) and width < 12:
                width += 1
    return bytes(out), None


def _run_length(data: bytes, cap: int) -> tuple[bytes, str | None]:
    out = bytearray()
    pos, size = 0, len(data)
    while pos < size:
        length = data[pos]
        if length == 128:
            return bytes(out), None
        if length < 128:
            out += data[pos + 1:pos + 2 + length]
            pos += 2 + length
        else:
            out += data[pos + 1:pos + 2] * (257 - length)
            pos += 2
        if len(out) > cap:
            raise _Overflow
    return bytes(out), None


def _int_param(params: dict[str, PdfObject], key: str, default: int, low: int,
               high: int) -> int:
    value = params.get(key)
    return value if isinstance(value, int) and low <= value <= high else default


def _predict(data: bytes, params: dict[str, PdfObject]) -> tuple[bytes, str | None]:
    """Undo a PNG (10-15) or TIFF (2) predictor; anything else leaves ``data`` as it is."""
    predictor = _int_param(params, "Predictor", 1, 1, 15)
    if predictor < 2:
        return data, None
    colors = _int_param(params, "Colors", 1, 1, 32)
    bpc = _int_param(params, "BitsPerComponent", 8, 1, 16)
    columns = _int_param(params, "Columns", 1, 1, 1 << 24)
    pixel = max(1, colors * bpc // 8)
    row = (colors * bpc * columns + 7) // 8
    if predictor == 2:
        return (_tiff(data, row, pixel) if bpc == 8 else data), None
    return _png(data, row, pixel)


def _tiff(data: bytes, row: int, pixel: int) -> bytes:
    out = bytearray(data)
    for start in range(0, len(out), row):
        for i in range(start + pixel, min(start + row, len(out))):
            out[i] = (out[i] + out[i - pixel]) & 0xFF
    return bytes(out)


def _png(data: bytes, row: int, pixel: int) -> tuple[bytes, str | None]:
    out = bytearray()
    # The row length comes from the file: never allocate more than the data (one short row).
    prior = bytearray(min(row, len(data)))
    for start in range(0, len(data), row + 1):
        kind = data[start]
        line = bytearray(data[start + 1:start + 1 + row])
        if kind == 1:  # Sub
            for i in range(pixel, len(line)):
                line[i] = (line[i] + line[i - pixel]) & 0xFF
        elif kind == 2:  # Up
            for i in range(len(line)):
                line[i] = (line[i] + prior[i]) & 0xFF
        elif kind == 3:  # Average
            for i in range(len(line)):
                left = line[i - pixel] if i >= pixel else 0
                line[i] = (line[i] + ((left + prior[i]) >> 1)) & 0xFF
        elif kind == 4:  # Paeth
            for i in range(len(line)):
                a = line[i - pixel] if i >= pixel else 0
                b = prior[i]
                c = prior[i - pixel] if i >= pixel else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 0xFF
        elif kind != 0:
            return bytes(out), f"bad PNG predictor row type {kind}"
        out += line
        prior = line  # only the last row can be shorter, and nothing follows it
    return bytes(out), None


_Filter = Callable[[bytes, int], tuple[bytes, str | None]]
_FILTERS: dict[str, _Filter] = {
    "FlateDecode": _flate, "Fl": _flate,
    "ASCIIHexDecode": _ascii_hex, "AHx": _ascii_hex,
    "ASCII85Decode": _ascii85, "A85": _ascii85,
    "LZWDecode": _lzw, "LZW": _lzw,
    "RunLengthDecode": _run_length, "RL": _run_length,
}
_PREDICTED = frozenset({"FlateDecode", "Fl", "LZWDecode", "LZW"})
# Image codecs: what they decode to is pixels, scanned as stored. "Crypt" is identity here
# (decryption happens before the filters).
_LEAVE = frozenset({"DCTDecode", "DCT", "JPXDecode", "JBIG2Decode", "CCITTFaxDecode", "CCF",
                    "Crypt"})
_ZLIB_HEADER = re.compile(rb"\x78[\x01\x5e\x9c\xda]")


def _as_list(value: PdfObject) -> list[PdfObject]:
    return value if isinstance(value, list) else [value]


def decode_stream(raw: bytes, stream_dict: dict[str, PdfObject],
                  cap: int) -> tuple[bytes, str | None]:
    """``raw`` through the stream's filters, in order; raises _Overflow past ``cap``.

    Decoding stops at the first filter that fails or is not known; what was decoded up to
    there is returned with the error text.
    """
    filters = _as_list(stream_dict.get("Filter"))
    params = _as_list(stream_dict.get("DecodeParms"))
    data = raw
    for index, name in enumerate(filters):
        if name is None:
            continue
        if not isinstance(name, Name):
            return data, "filter is no name"
        if name in _LEAVE:
            return data, None
        decoder = _FILTERS.get(name)
        if decoder is None:
            return data, f"unknown filter {sanitize_name(name)[:40]}"
        param = params[index] if index < len(params) else None
        param = param if isinstance(param, dict) else {}
        if name in ("LZWDecode", "LZW"):
            early = _int_param(param, "EarlyChange", 1, 0, 1)
            data, error = _lzw(data, cap, early)
        else:
            data, error = decoder(data, cap)
        if error is None and name in _PREDICTED:
            data, error = _predict(data, param)
        if error is not None:
            return data, error
    if len(data) > cap:
        raise _Overflow
    return data, None


# -- encryption (standard security handler, empty user password) ---------------------------
_PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


@dataclass(slots=True)
class _Crypt:
    """How to decrypt one file's streams: the file key and the stream cipher."""

    key: bytes
    method: str  # "RC4", "AESV2", "AESV3" or "None"
    revision: int

    def stream(self, data: bytes, ref: Ref) -> bytes:
        if self.method == "None":
            return data
        if self.method == "AESV3":
            key = self.key
        else:
            salt = b"sAlT" if self.method == "AESV2" else b""
            seed = (self.key + ref.num.to_bytes(4, "little")[:3]
                    + ref.gen.to_bytes(4, "little")[:2] + salt)
            key = hashlib.md5(seed, usedforsecurity=False).digest()[:min(len(self.key) + 5, 16)]
        if self.method == "RC4":
            return _rc4(key, data)
        return _aes_cbc(key, data)


def _rc4(key: bytes, data: bytes) -> bytes:
    from Cryptodome.Cipher import ARC4

    return bytes(ARC4.new(key).decrypt(data))


def _aes_cbc(key: bytes, data: bytes, iv: bytes | None = None) -> bytes:
    from Cryptodome.Cipher import AES

    padded = iv is None  # a stream or string: IV first, PKCS#5 padding last
    if iv is None:
        iv, data = data[:16], data[16:]
    if len(iv) < 16:
        return b""
    data = data[:len(data) - len(data) % 16]
    out = AES.new(key, AES.MODE_CBC, iv).decrypt(data)
    pad = out[-1] if out else 0
    if padded and 1 <= pad <= 16 and out.endswith(bytes([pad]) * pad):
        out = out[:-pad]
    return bytes(out)


def _string(value: PdfObject) -> bytes:
    return value if isinstance(value, bytes) and not isinstance(value, Name) else b""


def _open_with_empty_password(encrypt: dict[str, PdfObject], file_id: bytes) -> _Crypt | None:
    """The file key when the empty user password opens the file, else None."""
    if encrypt.get("Filter") != "Standard":
        return None
    revision = _int_param(encrypt, "R", 0, 0, 6)
    version = _int_param(encrypt, "V", 0, 0, 5)
    owner, user = _string(encrypt.get("O")), _string(encrypt.get("U"))
    method = _crypt_method(encrypt) if version >= 4 else "RC4"
    if method is None:
        return None
    if revision in (5, 6):
        return _open_aes256(encrypt, user, revision, method)
    if revision not in (2, 3, 4) or len(owner) < 32 or len(user) < 16:
        return None
    length = _int_param(encrypt, "Length", 40, 40, 128) // 8 if revision >= 3 else 5
    permissions = encrypt.get("P")
    if not isinstance(permissions, int):
        return None
    seed = _PAD + owner[:32] + struct.pack("<i", _signed32(permissions)) + file_id
    if revision >= 4 and encrypt.get("EncryptMetadata") is False:
        seed += b"\xff\xff\xff\xff"
    digest = hashlib.md5(seed, usedforsecurity=False).digest()
    if revision >= 3:
        for _ in range(50):
            digest = hashlib.md5(digest[:length], usedforsecurity=False).digest()
    key = digest[:length]
    if revision == 2:
        ok = _rc4(key, _PAD) == user[:32]
    else:
        check = _rc4(key, hashlib.md5(_PAD + file_id, usedforsecurity=False).digest())
        for i in range(1, 20):
            check = _rc4(bytes(b ^ i for b in key), check)
        ok = check == user[:16]
    return _Crypt(key, method, revision) if ok else None


def _signed32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _crypt_method(encrypt: dict[str, PdfObject]) -> str | None:
    """The stream cipher of a V4/V5 handler (``/StmF`` → ``/CF`` → ``/CFM``)."""
    name = encrypt.get("StmF", Name("Identity"))
    if name == "Identity":
        return "None"
    filters = encrypt.get("CF")
    entry = filters.get(name) if isinstance(filters, dict) and isinstance(name, str) else None
    cfm = entry.get("CFM") if isinstance(entry, dict) else None
    methods = {"V2": "RC4", "AESV2": "AESV2", "AESV3": "AESV3", "None": "None"}
    return methods.get(cfm) if isinstance(cfm, str) else None


def _hash_r6(password: bytes, salt: bytes, udata: bytes) -> bytes:
    """Algorithm 2.B of ISO 32000-2 (revision 6 password hash)."""
    from Cryptodome.Cipher import AES

    k = hashlib.sha256(password + salt + udata).digest()
    rounds = 0
    while True:
        k1 = (password + k + udata) * 64
        e = AES.new(k[:16], AES.MODE_CBC, k[16:32]).encrypt(k1)
        k = (hashlib.sha256, hashlib.sha384, hashlib.sha512)[sum(e[:16]) % 3](e).digest()
        rounds += 1
        if rounds >= 64 and e[-1] <= rounds - 32:
            return k[:32]


def _open_aes256(encrypt: dict[str, PdfObject], user: bytes, revision: int,
                 method: str) -> _Crypt | None:
    user_key = _string(encrypt.get("UE"))
    if len(user) < 48 or len(user_key) < 32:
        return None
    if revision == 6:
        ok = _hash_r6(b"", user[32:40], b"") == user[:32]
        inter = _hash_r6(b"", user[40:48], b"")
    else:
        ok = hashlib.sha256(user[32:40]).digest() == user[:32]
        inter = hashlib.sha256(user[40:48]).digest()
    if not ok:
        return None
    key = _aes_cbc(inter, user_key[:32], iv=b"\0" * 16)
    return _Crypt(key, method, revision) if len(key) == 32 else None


# -- the file ------------------------------------------------------------------------------
# "N G obj": found from the keyword back (``bytes.find`` for "obj", then this regex on the
# few bytes before it), since a regex search for a pattern that starts with digits tries
# every position of the file.
_OBJ_HEAD = re.compile(rb"(?<![0-9])(\d{1,10})[" + _WS + rb"]+(\d{1,5})[" + _WS + rb"]+\Z")
_HEAD_REACH = 64  # bytes before "obj" searched for "N G" (blanks between them included)
_WS_BYTES = frozenset(_WS.decode("unicode_escape").encode("latin-1"))
_REGULAR_BYTES = frozenset(set(range(256)) - _WS_BYTES - set(b"()<>[]{}/%"))
_STREAM = re.compile(rb"[" + _WS + rb"]*stream(?:\r\n|\r|\n)?")
_ENDSTREAM = re.compile(rb"endstream")
_TRAILER = re.compile(rb"trailer[" + _WS + rb"]*<<")
_DICT_STREAM = re.compile(rb">>[" + _WS + rb"]*stream(?:\r\n|\r|\n)")
MAX_TRAILERS = 256
_TRAILER_WINDOW = 64 * 1024


class _Header(NamedTuple):
    """An object header ``N G obj``: where it starts and ends, and its reference."""

    start: int
    end: int
    ref: Ref


def _next_header(data: bytes, pos: int) -> _Header | None:
    """The first object header that ends after ``pos``."""
    while (keyword := data.find(b"obj", pos)) >= 0:
        pos = keyword + 3
        if keyword == 0 or data[keyword - 1] not in _WS_BYTES:
            continue  # "endobj", "xobj"
        if pos < len(data) and data[pos] in _REGULAR_BYTES:
            continue  # "object"
        head = _OBJ_HEAD.search(data, max(0, keyword - _HEAD_REACH), keyword)
        if head is not None:
            return _Header(head.start(), pos, Ref(int(head.group(1)), int(head.group(2))))
    return None


@dataclass(slots=True)
class _Stream:
    ref: Ref
    info: dict[str, PdfObject]
    start: int
    end: int


@dataclass(slots=True)
class _Scan:
    """What one pass over the file found."""

    streams: list[_Stream] = field(default_factory=list)
    objects: dict[Ref, PdfObject] = field(default_factory=dict)
    trailers: list[dict[str, PdfObject]] = field(default_factory=list)
    orphans: list[tuple[int, int]] = field(default_factory=list)  # streams without an object
    too_many: bool = False


def _stream_end(data: bytes, start: int, info: dict[str, PdfObject]) -> int:
    """Where a stream's data ends: at ``/Length`` when ``endstream`` follows, else before
    the next ``endstream`` (or the end of the file)."""
    length = info.get("Length")
    if isinstance(length, int) and 0 <= length <= len(data) - start:
        after = _SKIP.match(data, start + length)
        if after is not None and after.end() - start - length <= _ENDSTREAM_SLACK and \
                data.startswith(b"endstream", after.end()):
            return start + length
    found = _ENDSTREAM.search(data, start)
    end = len(data) if found is None else found.start()
    # The end-of-line before "endstream" belongs to the syntax, not the data.
    if data.startswith(b"\r\n", end - 2) and end - 2 >= start:
        return end - 2
    if data[end - 1:end] in (b"\r", b"\n") and end - 1 >= start:
        return end - 1
    return end


def _scan(data: bytes, max_objects: int) -> _Scan:
    """Visit every ``N G obj`` in file order; record streams, objects and trailers.

    An object is read no further than the next object header: one whose syntax breaks off
    there (an unterminated string, a missing ``>>``) is skipped and the next one read, as a
    viewer that finds objects by their offsets would, and no byte is parsed twice.
    """
    found = _Scan()
    count = 0
    match = _next_header(data, 0)
    while match is not None:
        count += 1
        if count > max_objects:
            found.too_many = True
            break
        after = _next_header(data, match.end)
        window = after.start if after else len(data)
        if data.find(b"<<", match.end, window) < 0:
            # No dictionary in it: no stream, file specification, script or encryption
            # dictionary either (a number array of megabytes is not parsed for nothing).
            match = after
            continue
        parser = _Parser(data, match.end, window)
        try:
            value = parser.value()
        except (Malformed, ValueError):
            match = after
            continue
        ref = match.ref
        found.objects[ref] = value
        stream = _STREAM.match(data, parser.pos)
        if isinstance(value, dict) and stream is not None:
            start = stream.end()
            end = _stream_end(data, start, value)
            found.streams.append(_Stream(ref, value, start, end))
            if after is not None and after.start < end:  # a header inside the data
                after = _next_header(data, end)
        match = after
    if not found.too_many:
        found.orphans = _orphan_streams(data, found.streams)
    for trailer in collections.deque(_TRAILER.finditer(data), maxlen=MAX_TRAILERS):
        start = trailer.end() - 2
        try:
            value = _Parser(data, start, min(len(data), start + _TRAILER_WINDOW)).value()
        except (Malformed, ValueError):
            continue
        if isinstance(value, dict):
            found.trailers.append(value)
    found.trailers += [s.info for s in found.streams if s.info.get("Type") == "XRef"]
    return found


def _orphan_streams(data: bytes, streams: list[_Stream]) -> list[tuple[int, int]]:
    """(start, end) of each ``>> stream`` no object header led to: an object whose
    dictionary did not parse, or no header at all. Read without a dictionary."""
    taken = sorted((s.start, s.end) for s in streams)
    starts = [start for start, _ in taken]
    orphans: list[tuple[int, int]] = []
    pos = 0
    while (match := _DICT_STREAM.search(data, pos)) is not None:
        start = match.end()
        index = bisect.bisect_right(starts, start) - 1
        if index >= 0 and taken[index][0] <= start <= taken[index][1]:
            pos = max(taken[index][1], start)  # the stream of an object (or inside its data)
            continue
        end = _stream_end(data, start, {})
        orphans.append((start, end))
        pos = max(end, start)
    return orphans


def _file_specs(value: PdfObject, names: dict[int, str], scripts: list[bytes],
                decrypt: Callable[[bytes], bytes] | None = None) -> None:
    """Record the names of embedded file streams referenced by file specifications, and
    the JavaScript written as strings (``/JS (...)``; a ``/JS`` stream is a stream)."""
    stack: list[tuple[PdfObject, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_NESTING:
            continue
        if isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, dict):
            ef = item.get("EF")
            if isinstance(ef, dict):
                name = _text(item.get("UF"), decrypt) or _text(item.get("F"), decrypt)
                for target in ef.values():
                    if isinstance(target, Ref) and name:
                        names.setdefault(target.num, name)
            script = item.get("JS")
            if isinstance(script, bytes) and not isinstance(script, Name) and script:
                script = decrypt(script) if decrypt is not None else script
                if script.startswith(b"\xfe\xff"):  # UTF-16BE text: scanned as UTF-8
                    script = script[2:].decode("utf-16-be", "replace").encode()
                scripts.append(script)
            stack.extend((v, depth + 1) for v in item.values())


def _text(value: PdfObject, decrypt: Callable[[bytes], bytes] | None = None) -> str:
    """A PDF text string: UTF-16BE with its BOM, UTF-8 with its BOM, else PDFDocEncoding
    (read as Latin-1: the letters that matter in a file name are the same)."""
    if not isinstance(value, bytes) or isinstance(value, Name):
        return ""
    if decrypt is not None:
        value = decrypt(value)
    if value.startswith(b"\xfe\xff"):
        return value[2:].decode("utf-16-be", "replace")
    if value.startswith(b"\xef\xbb\xbf"):
        return value[3:].decode("utf-8", "replace")
    return value.decode("latin-1")


def _object_stream_objects(decoded: bytes, info: dict[str, PdfObject],
                           max_objects: int) -> Iterator[PdfObject]:
    """The objects inside a decoded object stream (``/N`` pairs, then the objects).

    Each object is parsed within the bytes up to the next one's offset, so offsets that
    all point at one long broken object cost one parse of it, not one each.
    """
    count, first = info.get("N"), info.get("First")
    if not isinstance(count, int) or not isinstance(first, int) or \
            not 0 <= first <= len(decoded):
        return
    parser = _Parser(decoded, 0, first)
    offsets: set[int] = set()
    for _ in range(min(max(count, 0), max_objects)):
        try:
            number, offset = parser.value(), parser.value()
        except (Malformed, ValueError):
            break
        if not isinstance(number, int) or not isinstance(offset, int) or offset < 0:
            break
        offsets.add(first + offset)
    bounds = sorted(o for o in offsets if o < len(decoded))
    if not bounds:
        return
    for start, end in zip(bounds, [*bounds[1:], len(decoded)], strict=True):
        try:
            yield _Parser(decoded, start, end).value()
        except (Malformed, ValueError):
            continue


class _Opened(NamedTuple):
    crypt: _Crypt | None
    problem: str | None


def _encryption(found: _Scan) -> _Opened:
    """How to decrypt the file, or why it cannot be (no trailer with /Encrypt: neither)."""
    trailer = next((t for t in found.trailers if "Encrypt" in t), None)
    if trailer is None:
        return _Opened(None, None)
    encrypt = trailer.get("Encrypt")
    if isinstance(encrypt, Ref):
        encrypt = found.objects.get(encrypt)
    ids = trailer.get("ID")
    file_id = _string(ids[0]) if isinstance(ids, list) and ids else b""
    if not isinstance(encrypt, dict):
        return _Opened(None, "encrypted PDF (encryption dictionary unreadable)")
    try:
        crypt = _open_with_empty_password(encrypt, file_id)
    except ValueError:
        crypt = None
    if crypt is None:
        return _Opened(None, "encrypted PDF (needs a password)")
    return _Opened(crypt, None)


def pdf_parts(part: Part, budget: Budget) -> Children:
    """Every stream of a PDF, decoded; embedded files named by their file specification."""
    depth = part.depth + 1
    data = part.data
    max_objects = OBJECTS_PER_FILE * budget.limits.max_files
    found = _scan(data, max_objects)
    if found.too_many:
        yield Problem(part.path, ScanStatus.SKIPPED,
                      f"PDF object count limit (more than {max_objects} objects, "
                      f"{OBJECTS_PER_FILE} x max_files {budget.limits.max_files})",
                      LimitKind.STRUCTURAL)
        return
    crypt, problem = _encryption(found)
    if problem is not None:
        yield Problem(part.path, ScanStatus.UNKNOWN, problem)
        return
    names: dict[int, str] = {}
    scripts: list[bytes] = []
    for ref, value in found.objects.items():
        decrypt = None if crypt is None else functools.partial(crypt.stream, ref=ref)
        _file_specs(value, names, scripts, decrypt)
    # Object streams first: the file specifications inside them name the embedded files.
    ordered = sorted(found.streams, key=lambda s: s.info.get("Type") != "ObjStm")
    for stream in ordered:
        raw = data[stream.start:stream.end]
        if crypt is not None and stream.info.get("Type") != "XRef":
            raw = crypt.stream(raw, stream.ref)
        name = names.get(stream.ref.num)
        path = join_path(part.path, sanitize_name(name) if name else f"obj{stream.ref.num}")
        decoded = yield from _decoded(raw, stream.info, path, budget)
        if decoded is None:
            if budget.stopped:
                return
            continue
        if stream.info.get("Type") == "ObjStm":
            for value in _object_stream_objects(decoded, stream.info, max_objects):
                _file_specs(value, names, scripts)
        if decoded:
            yield Part(path, decoded, depth)
        if stream.info.get("Filter") is None:
            yield from _unlabelled(raw, path, depth, budget)
    for index, script in enumerate(scripts, 1):
        yield Part(join_path(part.path, f"js{index}"), script, depth)
        if budget.stopped:
            return
    for start, end in found.orphans:
        # A stream no object header led to: its bytes, and inflated if they are zlib data.
        path = join_path(part.path, f"stream@{start}")
        raw = data[start:end]
        if raw:
            yield Part(path, raw, depth)
        yield from _unlabelled(raw, path, depth, budget)
    if zip_at_end(data):
        # A PDF with a zip appended (a polyglot): readers of either format open it.
        from .archives import zip_members

        yield from zip_members(part, budget)
    # What any other leaf gets: "%PDF-" at the top must not hide a uuencoded file.
    yield from uuencoded_parts(part, budget)


def _unlabelled(raw: bytes, path: str, depth: int, budget: Budget) -> Children:
    """A stream without /Filter that is zlib data anyway is inflated as well (as clamd)."""
    if not _ZLIB_HEADER.match(raw) or (raw[0] * 256 + raw[1]) % 31:
        return
    inflated = yield from _decoded(raw, {"Filter": Name("FlateDecode")}, path + "~flate",
                                   budget)
    if inflated:
        yield Part(path + "~flate", inflated, depth)


def _decoded(raw: bytes, info: dict[str, PdfObject], path: str,
             budget: Budget) -> Generator[Problem, None, bytes | None]:
    """``raw`` through its filters under the budget; None (and a Problem) when over it.

    A stream a viewer cannot decode either (a broken or unknown filter) delivers nothing
    more than what decoded: that much is scanned, the rest is no content.
    """
    cap = budget.cap(len(raw))
    try:
        decoded, _error = decode_stream(raw, info, cap)
    except _Overflow:
        yield budget.refuse(path, cap + 1, len(raw)) or Problem(
            path, ScanStatus.SKIPPED, REASON_FILE_SIZE, LimitKind.SIZE)
        return None
    return decoded
