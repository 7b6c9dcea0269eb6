"""Office documents: OLE2 compound files (olefile) and RTF embedded objects.

OLE2 (``.doc``, ``.xls``, ``.ppt``, ``.msg``, ``vbaProject.bin``, the ``.bin`` objects that
OOXML keeps under ``word/embeddings/``): every stream is a part named by its path in the
file. VBA modules are decompressed (MS-OVBA 2.4.1) at the offsets the project's ``dir``
stream gives, and ``Ole10Native`` streams (the Packager's embedded files) are unwrapped to
the file they carry, under its own name. OOXML and ODF are zips: their embedded OLE objects
come here through the normal recursion.

RTF: each ``\\objdata`` group is decoded from hex (``\\bin`` runs included) to bytes, and
the OLE1 object in it is unwrapped to its native data (an OLE2 file, or a Packager file).

The MS-OVBA decompressor is written here (about 40 lines, fuzzed): oletools has one, but
oletools brings pyparsing, colorclass, easygui, msoffcrypto-tool and cryptography for it,
and its decompressor has no output bound. Sizes are bounded as everywhere: a stream larger
than the file itself is a lie (a sector chain that loops); a chain that loops is refused
before olefile reads it, so no stream can cost more memory than the file.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Iterator
from typing import Any

from ..result import ScanStatus
from . import Budget, Children, Part, Problem, join_path, sanitize_name
from .archives import ENTRIES_PER_FILE, _corrupt, _entry_count_problem, _over_cap

__all__ = ["decompress_vba", "ole_parts", "parse_ole1", "parse_ole10native", "rtf_parts",
           "vba_modules"]


# -- MS-OVBA compression ---------------------------------------------------------------------
class VbaError(ValueError):
    """A compressed container that does not decompress."""


_CHUNK_OUT = 4096


def decompress_vba(data: bytes, cap: int) -> bytes:
    """Decompress an MS-OVBA CompressedContainer, to at most ``cap + 1`` bytes.

    VbaError for a container that does not start with its signature byte or whose chunks
    do not parse; a container that ends early gives what decompressed so far.
    """
    if not data or data[0] != 0x01:
        raise VbaError("no compressed container signature")
    out = bytearray()
    pos, end = 1, len(data)
    while pos + 2 <= end and len(out) <= cap:
        header = data[pos] | data[pos + 1] << 8
        if header >> 12 & 0x7 != 0b011:
            raise VbaError("bad chunk signature")
        chunk_end = min(pos + (header & 0x0FFF) + 3, end)
        pos += 2
        if not header & 0x8000:  # an uncompressed chunk: 4096 bytes as they are
            out += data[pos:pos + _CHUNK_OUT]
            pos = chunk_end
            continue
        chunk = bytearray()
        while pos < chunk_end:
            flags = data[pos]
            pos += 1
            for bit in range(8):
                if pos >= chunk_end:
                    break
                if not flags >> bit & 1:
                    chunk.append(data[pos])
                    pos += 1
                    continue
                if pos + 2 > chunk_end:
                    raise VbaError("truncated copy token")
                token = data[pos] | data[pos + 1] << 8
                pos += 2
                done = len(chunk)
                bits = max((done - 1).bit_length(), 4)
                length = (token & (0xFFFF >> bits)) + 3
                offset = (token >> (16 - bits)) + 1
                if offset > done or done + length > _CHUNK_OUT:
                    raise VbaError("copy token out of range")
                start = done - offset
                if offset >= length:
                    chunk += chunk[start:start + length]
                else:  # the copy overlaps what it writes
                    for i in range(length):
                        chunk.append(chunk[start + i])
            if len(chunk) > _CHUNK_OUT:
                raise VbaError("chunk too long")
        out += chunk
    return bytes(out[:cap + 1])


def vba_modules(dir_data: bytes) -> list[tuple[str, int]]:
    """(stream name, source offset) of each module in a decompressed VBA ``dir`` stream.

    The records are id (2 bytes), size (4), data; PROJECTVERSION (0x0009) is the one whose
    size field does not count its data. A record running past the end ends the list.
    """
    modules: list[tuple[str, int]] = []
    name: str | None = None
    offset = 0
    pos = 0
    while pos + 6 <= len(dir_data):
        rid, size = struct.unpack_from("<HL", dir_data, pos)
        pos += 6
        if rid == 0x0009:
            size = 6
        body = dir_data[pos:pos + size]
        pos += size
        if rid == 0x001A and name is None:  # MODULESTREAMNAME (MBCS)
            name = body.decode("latin-1")
        elif rid == 0x0032:  # its Unicode twin
            name = body.decode("utf-16-le", "replace")
        elif rid == 0x0031 and len(body) >= 4:  # MODULEOFFSET
            offset = int.from_bytes(body[:4], "little")
        elif rid == 0x002B:  # end of a module
            if name is not None:
                modules.append((name, offset))
            name, offset = None, 0
    return modules


# -- OLE1 / Packager --------------------------------------------------------------------------
def _cstring(data: bytes, pos: int, limit: int = 4096) -> tuple[bytes, int]:
    end = data.find(b"\x00", pos, pos + limit)
    if end < 0:
        raise ValueError("unterminated string")
    return data[pos:end], end + 1


def parse_package(data: bytes) -> tuple[str, bytes]:
    """A Packager object (the ``Package`` class's native data): (file name, content).

    Layout: 2 bytes, label, original path (NUL-terminated), 4 bytes, a length-prefixed
    temporary path, the content's length and the content. ValueError if it does not parse.
    """
    label, pos = _cstring(data, 2)
    path, pos = _cstring(data, pos)
    pos += 4
    (temp_len,) = struct.unpack_from("<L", data, pos)
    pos += 4 + temp_len
    (size,) = struct.unpack_from("<L", data, pos)
    pos += 4
    if pos + size > len(data):
        raise ValueError("content past the end")
    raw_name = (path.replace(b"\\", b"/").rsplit(b"/", 1)[-1] or label)
    return raw_name.decode("latin-1"), data[pos:pos + size]


def parse_ole10native(data: bytes) -> tuple[str, bytes]:
    """An ``\\x01Ole10Native`` stream: (file name, content). A stream that is no Packager
    object gives its native data (after the 4-byte size) under the name "native"."""
    if len(data) < 4:
        raise ValueError("truncated")
    (size,) = struct.unpack_from("<L", data)
    native = data[4:4 + size]
    try:
        return parse_package(native)
    except (ValueError, struct.error):
        return "native", native


def parse_ole1(data: bytes) -> tuple[str, bytes] | None:
    """An OLE1 embedded object (RTF ``\\objdata``): (class name, native data), or None.

    ObjectHeader: OLEVersion, FormatID (2: embedded), then ClassName, TopicName and ItemName
    as length-prefixed strings, then the native data's size and the data.
    """
    try:
        _, format_id = struct.unpack_from("<LL", data)
        if format_id != 2:
            return None
        pos = 8
        names = []
        for _ in range(3):
            (length,) = struct.unpack_from("<L", data, pos)
            if length > 1024:
                return None
            names.append(data[pos + 4:pos + 4 + length].partition(b"\x00")[0])
            pos += 4 + length
        (size,) = struct.unpack_from("<L", data, pos)
    except struct.error:
        return None
    pos += 4
    return names[0].decode("latin-1"), data[pos:pos + size]


# -- OLE2 -------------------------------------------------------------------------------------
def _bounded_ole(olefile: Any) -> Any:
    """An OleFileIO whose streams are refused when their sector chain loops.

    olefile follows a chain for as many sectors as the stream's declared size needs (up to
    the whole FAT): a chain that loops back makes a small file read as gigabytes. With every
    chain checked first, no stream can be larger than the file.
    """
    class BoundedOle(olefile.OleFileIO):  # type: ignore[misc]
        def _open(self, start: int, size: int = olefile.UNKNOWN_SIZE,
                  force_FAT: bool = False) -> Any:
            if size < self.minisectorcutoff and not force_FAT:
                ole: Any = self
                if not ole.ministream:
                    ole.loadminifat()
                    ole.ministream = ole._open(ole.root.isectStart, ole.root.size,
                                               force_FAT=True)
                _check_chain(ole.minifat, start)
            else:
                _check_chain(self.fat, start)
            return super()._open(start, size, force_FAT)

    return BoundedOle


def _check_chain(fat: Any, start: int) -> None:
    seen: set[int] = set()
    sect = start
    while 0 <= sect < len(fat):
        if sect in seen:
            raise OSError("sector chain loops")
        seen.add(sect)
        sect = fat[sect] & 0xFFFFFFFF


_ENCRYPTED_STREAMS = ("EncryptedPackage",)  # an encrypted OOXML document inside OLE2


def ole_parts(part: Part, budget: Budget) -> Children:
    """Every stream of an OLE2 file, VBA sources and Ole10Native contents; see above."""
    try:
        import olefile
    except ImportError:  # pragma: no cover - olefile is a dependency
        yield Problem(part.path, ScanStatus.UNKNOWN, "no reader for OLE2")
        return
    depth = part.depth + 1
    try:
        ole = _bounded_ole(olefile)(io.BytesIO(part.data))
    except Exception as exc:  # olefile raises OSError, struct.error, IndexError, ...
        yield _corrupt(part.path, f"OLE2: {exc}")
        return
    with ole:
        try:
            streams = ole.listdir(streams=True, storages=False)
        except Exception as exc:
            yield _corrupt(part.path, f"OLE2: {exc}")
            return
        if len(streams) > ENTRIES_PER_FILE * budget.limits.max_files:
            yield _entry_count_problem(part.path, len(streams), budget.limits)
            return
        contents: dict[tuple[str, ...], bytes] = {}
        for index, entry in enumerate(streams, 1):
            key = tuple(entry)
            path = join_path(part.path, sanitize_name("/".join(entry), f"stream{index}"))
            if entry[-1] in _ENCRYPTED_STREAMS:
                yield Problem(path, ScanStatus.UNKNOWN, "encrypted")
                continue
            data, problem = _read_stream(ole, entry, path, budget, len(part.data))
            if problem is not None:
                yield problem
                if budget.stopped:
                    return
                continue
            contents[key] = data
            yield Part(path, data, depth)
            if entry[-1] == "\x01Ole10Native":
                yield from _native_parts(path, data, depth + 1)
        yield from _vba_parts(part.path, contents, budget, depth + 1)


def _read_stream(ole: Any, entry: list[str], path: str, budget: Budget,
                 file_size: int) -> tuple[bytes, Problem | None]:
    try:
        size = ole.get_size(entry)
        if size > file_size:  # only a looping chain can make a stream larger than its file
            return b"", _corrupt(path, "OLE2 stream larger than the file")
        problem = budget.refuse(path, size)
        if problem is not None:
            return b"", problem
        with ole.openstream(entry) as stream:
            data: bytes = stream.read(size + 1)
    except Exception as exc:
        return b"", _corrupt(path, f"OLE2: {exc}")
    return data, None


def _native_parts(path: str, data: bytes, depth: int) -> Iterator[Part | Problem]:
    try:
        name, content = parse_ole10native(data)
    except (ValueError, struct.error) as exc:
        yield _corrupt(path, f"Ole10Native: {exc}")
        return
    yield Part(join_path(path, sanitize_name(name, "native")), content, depth)


def _vba_parts(root: str, contents: dict[tuple[str, ...], bytes], budget: Budget,
               depth: int) -> Children:
    """The source of each VBA module: every storage with a ``dir`` stream is a project."""
    for key, data in list(contents.items()):
        if key[-1].lower() != "dir" or len(key) < 2 or key[-2].upper() != "VBA":
            continue
        storage = key[:-1]
        dir_path = join_path(root, sanitize_name("/".join(key)))
        try:
            modules = vba_modules(decompress_vba(data, budget.cap(len(data))))
        except VbaError as exc:
            yield _corrupt(dir_path, f"VBA dir stream: {exc}")
            continue
        names = {k[-1].lower(): k for k in contents if k[:-1] == storage}
        for name, offset in modules:
            stream_key = names.get(name.lower())
            if stream_key is None:
                continue  # a module without its stream: nothing to read
            source = contents[stream_key][offset:]
            path = join_path(join_path(root, sanitize_name("/".join(stream_key))), "source.vba")
            cap = budget.cap(len(source))
            try:
                text = decompress_vba(source, cap)
            except VbaError as exc:
                yield _corrupt(path, f"VBA module: {exc}")
                continue
            if len(text) > cap:
                yield _over_cap(budget, path, len(text), len(source))
                if budget.stopped:
                    return
                continue
            yield Part(path, text, depth)


# -- RTF --------------------------------------------------------------------------------------
_OBJDATA = re.compile(rb"\\objdata(?![A-Za-z])")
# Inside \objdata: hex digits, \binN (N raw bytes follow), other control words and symbols
# (ignored, as Word ignores them), groups (skipped whole), and anything else (ignored).
_RTF_TOKEN = re.compile(rb"([0-9A-Fa-f]{1,65536})|\\bin(-?\d{1,10}) ?"
                        rb"|(\\[A-Za-z]{1,32}(?:-?\d{1,10})? ?|\\.)|([{}])|[^0-9A-Fa-f\\{}]+")
_MAX_NESTING = 1000


def objdata_bytes(data: bytes, pos: int, cap: int) -> tuple[bytes, int]:
    """The bytes of the ``\\objdata`` group whose content starts at ``pos``, at most
    ``cap + 1`` of them, and where the group ends."""
    out = bytearray()
    nibble: int | None = None
    depth = 0
    while len(out) <= cap and (match := _RTF_TOKEN.match(data, pos)) is not None:
        pos = match.end()
        hex_digits, binary, _, brace = match.groups()
        if brace is not None:
            if brace == b"}" and depth == 0:
                break
            depth += 1 if brace == b"{" else -1
            if depth > _MAX_NESTING:
                break
        elif binary is not None:
            count = max(int(binary), 0)
            if not depth:
                out += data[pos:pos + count]
            pos += count  # raw bytes, not RTF
        elif hex_digits is not None and not depth:  # a group inside: not part of the data
            digits = hex_digits.decode("ascii")
            if nibble is not None:
                digits = f"{nibble:x}{digits}"
                nibble = None
            if len(digits) % 2:
                nibble = int(digits[-1], 16)
                digits = digits[:-1]
            out += bytes.fromhex(digits)
    return bytes(out[:cap + 1]), pos


def rtf_parts(part: Part, budget: Budget) -> Children:
    """The embedded objects of an RTF document (``\\objdata``), decoded and unwrapped."""
    data, depth = part.data, part.depth + 1
    max_entries = ENTRIES_PER_FILE * budget.limits.max_files
    index = 0
    pos = 0
    while (match := _OBJDATA.search(data, pos)) is not None:
        index += 1
        if index > max_entries:
            yield _entry_count_problem(part.path, index, budget.limits)
            return
        path = join_path(part.path, f"object{index}")
        cap = budget.cap()
        raw, pos = objdata_bytes(data, match.end(), cap)
        if len(raw) > cap:
            yield _over_cap(budget, path, len(raw), None)
            if budget.stopped:
                return
            continue
        yield Part(path, raw, depth)
        ole1 = parse_ole1(raw)
        if ole1 is None:
            continue
        class_name, native = ole1
        native_path = join_path(path, sanitize_name(class_name, "native"))
        yield Part(native_path, native, depth + 1)
        if class_name == "Package":
            try:
                name, content = parse_package(native)
            except (ValueError, struct.error) as exc:
                yield _corrupt(native_path, f"Package: {exc}")
                continue
            yield Part(join_path(native_path, sanitize_name(name, "file")), content, depth + 2)
