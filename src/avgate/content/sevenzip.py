"""7z archives: a hand-written check of the header's counts and sizes, then py7zr.

py7zr parses the whole header and builds a dict per entry before anything can be refused,
so :func:`sevenzip_header_problem` reads the signature header, bounds and decodes the (often
compressed) next header itself and counts folders, streams and files against the limits
first (a format codec of its own: struct reads only). :func:`sevenzip_members` then extracts
in memory with py7zr, under the caps of :class:`~avgate.content.Budget`.
"""

from __future__ import annotations

import bz2
import io
import lzma
import struct
import zlib
from collections.abc import Callable

from ..limits import KiB, Limits
from ..result import LimitKind, ScanStatus
from . import (
    REASON_RATIO,
    REASON_SCAN_SIZE,
    Budget,
    Children,
    Part,
    Problem,
    join_path,
    sanitize_name,
)
from .archives import (
    ENTRIES_PER_FILE,
    _corrupt,
    _Decompressor,
    _entry_count_problem,
    _file_count_problem,
    _over_cap,
    _structural,
)

# -- 7z -------------------------------------------------------------------------------------
# Before py7zr sees an archive, its header is inspected by hand: py7zr parses the whole
# header and builds a dict per entry, so a 3 KB archive whose Deflate-coded header lists
# 500,000 empty files took 77 s and 1.2 GiB. The pre-check reads the 32-byte signature
# header, bounds the next header's size, reads an encoded header's declared unpack size
# from its streams info, decodes it (never past the bound) and walks the raw header as far
# as its counts: folders, pack streams, substreams and files. Only sizes and counts are
# kept; the walk costs O(max_files), whatever the archive declares.
#
# The bound on a header's (decoded) size: a legitimate header needs per file at most a name
# (UTF-16: 2 bytes a character, a long path is a few hundred bytes), three 8-byte times,
# 4-byte attributes, a CRC and a few size numbers: well under 1 KiB. Counts are checked on
# their own, so this bound is not what stops an entry bomb (an empty file costs ~3 header
# bytes); it bounds the memory and time spent decoding a header before counting it.
HEADER_BYTES_PER_FILE = 1 * KiB
_SIGNATURE_HEADER = struct.Struct("<6s2sIQQI")  # magic, version, CRC, next offset/size/CRC
_SIGNATURE_SIZE = 32
# Property ids (7zFormat.txt; py7zr.properties.Property)
_END, _HEADER, _ARCHIVE_PROPERTIES, _ADDITIONAL_STREAMS = 0x00, 0x01, 0x02, 0x03
_MAIN_STREAMS = 0x04
_FILES_INFO, _PACK_INFO, _UNPACK_INFO, _SUBSTREAMS_INFO, _SIZE = 0x05, 0x06, 0x07, 0x08, 0x09
_CRC, _FOLDER, _CODERS_UNPACK_SIZE, _NUM_UNPACK_STREAM = 0x0A, 0x0B, 0x0C, 0x0D
_EMPTY_STREAM, _EMPTY_FILE, _ENCODED_HEADER = 0x0E, 0x0F, 0x17
_MAX_CODERS = 64  # per folder, and streams per folder: 7-Zip's k_Scan_NumCoders_MAX
_CODERS_PER_FOLDER = 4  # on average, over all folders (BCJ2 chains use 4)
_AES = b"\x06\xf1\x07\x01"


class _Bad7z(Exception):
    """The header does not parse: a corrupt archive (the reason is a fixed text)."""


class _Refused(Exception):
    """The header breaks a limit."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.reason)
        self.problem = problem


class _Folder:
    __slots__ = ("coders", "crc_defined", "out_streams", "unpack_sizes")

    def __init__(self) -> None:
        self.coders: list[tuple[bytes, bytes | None]] = []  # (method id, properties)
        self.out_streams = 0
        self.unpack_sizes: list[int] = []
        self.crc_defined = False


class _Streams:
    __slots__ = ("folders", "pack_pos", "pack_sizes")

    def __init__(self) -> None:
        self.pack_pos = 0
        self.pack_sizes: list[int] = []
        self.folders: list[_Folder] = []


class _HeaderReader:
    """A cursor over a 7z header: bytes, 7z NUMBERs, bit vectors; _Bad7z past the end."""

    __slots__ = ("buf", "limits", "max_entries", "path", "pos")

    def __init__(self, buf: bytes, path: str, limits: Limits) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path
        self.limits = limits
        self.max_entries = ENTRIES_PER_FILE * limits.max_files

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise _Bad7z("truncated header")
        value = self.buf[self.pos]
        self.pos += 1
        return value

    def number(self) -> int:
        """7-Zip's ReadNumber: the leading 1 bits of the first byte count extra bytes."""
        first = self.byte()
        mask = 0x80
        value = 0
        for i in range(8):
            if not first & mask:
                return value + ((first & (mask - 1)) << (8 * i))
            value |= self.byte() << (8 * i)
            mask >>= 1
        return value

    def skip(self, size: int) -> int:
        """Skip ``size`` bytes; return where they started."""
        start = self.pos
        if size > len(self.buf) - start:
            raise _Bad7z("truncated header")
        self.pos = start + size
        return start

    def bits(self, count: int, start: int | None = None, available: int | None = None) -> int:
        """How many of ``count`` bits (MSB first) are set; read here or at ``start``."""
        size = (count + 7) // 8
        if start is None:
            start = self.skip(size)
        elif available is not None:
            size = min(size, available)
        raw = self.buf[start:start + size]
        return (int.from_bytes(raw, "big") >> max(0, len(raw) * 8 - count)).bit_count()

    def bit_list(self, count: int) -> list[bool]:
        start = self.skip((count + 7) // 8)
        return [bool(self.buf[start + i // 8] & (0x80 >> (i % 8))) for i in range(count)]

    def digests(self, count: int) -> list[bool]:
        """A digests record: which of ``count`` items have a CRC (the CRCs are skipped)."""
        defined = [True] * count if self.byte() else self.bit_list(count)
        self.skip(4 * sum(defined))
        return defined

    def count(self, what: str) -> int:
        """A count of entries of some kind: refused past ENTRIES_PER_FILE * max_files."""
        value = self.number()
        if value > self.max_entries:
            raise _Refused(_structural(self.path, (
                f"7z {what} count limit ({value} > {ENTRIES_PER_FILE} x max_files "
                f"{self.limits.max_files})")))
        return value

    # -- structures ----------------------------------------------------------------------------
    def streams(self) -> _Streams:
        streams = _Streams()
        pid = self.byte()
        if pid == _PACK_INFO:
            streams.pack_pos = self.number()
            count = self.count("pack stream")
            pid = self.byte()
            if pid == _SIZE:
                streams.pack_sizes = [self.number() for _ in range(count)]
                pid = self.byte()
            if pid == _CRC:
                self.digests(count)
                pid = self.byte()
            if pid != _END:
                raise _Bad7z("bad pack info")
            pid = self.byte()
        if pid == _UNPACK_INFO:
            streams.folders = self.folders()
            pid = self.byte()
        if pid == _SUBSTREAMS_INFO:
            self.substreams(streams.folders)
            pid = self.byte()
        if pid != _END:
            raise _Bad7z("bad streams info")
        return streams

    def folders(self) -> list[_Folder]:
        if self.byte() != _FOLDER:
            raise _Bad7z("bad unpack info")
        count = self.count("folder")
        if self.byte() != 0:
            raise _Bad7z("external folders")
        folders = []
        coders = 0
        for _ in range(count):
            folder = self.folder()
            coders += len(folder.coders)
            if coders > _CODERS_PER_FOLDER * self.max_entries:
                raise _Refused(_structural(self.path, (
                    f"7z coder count limit (more than {_CODERS_PER_FOLDER * self.max_entries})")))
            folders.append(folder)
        if self.byte() != _CODERS_UNPACK_SIZE:
            raise _Bad7z("bad unpack info")
        for folder in folders:
            folder.unpack_sizes = [self.number() for _ in range(folder.out_streams)]
        pid = self.byte()
        if pid == _CRC:
            for folder, defined in zip(folders, self.digests(count), strict=True):
                folder.crc_defined = defined
            pid = self.byte()
        if pid != _END:
            raise _Bad7z("bad unpack info")
        return folders

    def folder(self) -> _Folder:
        folder = _Folder()
        count = self.number()
        if not 0 < count <= _MAX_CODERS:
            raise _Bad7z("bad coder count")
        ins = 0
        for _ in range(count):
            flags = self.byte()
            start = self.skip(flags & 0x0F)
            method = self.buf[start:self.pos]
            if flags & 0x10:
                n_in, n_out = self.number(), self.number()
            else:
                n_in = n_out = 1
            ins += n_in
            folder.out_streams += n_out
            if ins > _MAX_CODERS or folder.out_streams > _MAX_CODERS:
                raise _Bad7z("bad coder streams")
            properties = None
            if flags & 0x20:
                start = self.skip(self.number())
                properties = self.buf[start:self.pos]
            folder.coders.append((method, properties))
        bind_pairs = folder.out_streams - 1
        for _ in range(2 * bind_pairs):
            self.number()
        packed = ins - bind_pairs
        if packed < 1:
            raise _Bad7z("bad coder streams")
        if packed > 1:
            for _ in range(packed):
                self.number()
        return folder

    def substreams(self, folders: list[_Folder]) -> None:
        numbers = [1] * len(folders)
        pid = self.byte()
        if pid == _NUM_UNPACK_STREAM:
            total = 0
            for index in range(len(folders)):
                numbers[index] = self.number()
                total += numbers[index]
                if total > self.max_entries:
                    raise _Refused(_structural(self.path, (
                        f"7z substream count limit (more than {ENTRIES_PER_FILE} x max_files "
                        f"{self.limits.max_files})")))
            pid = self.byte()
        if pid == _SIZE:
            for number in numbers:
                for _ in range(number - 1):
                    self.number()
            pid = self.byte()
        if pid == _CRC:
            self.digests(sum(n for n, f in zip(numbers, folders, strict=True)
                             if n != 1 or not f.crc_defined))
            pid = self.byte()
        if pid != _END:
            raise _Bad7z("bad substreams info")

    def header(self) -> None:
        """A raw header (kHeader ... kEnd): refused past the entry counts."""
        if self.byte() != _HEADER:
            raise _Bad7z("no header")
        pid = self.byte()
        if pid == _ARCHIVE_PROPERTIES:
            while self.number():
                self.skip(self.number())
            pid = self.byte()
        if pid == _ADDITIONAL_STREAMS:
            self.streams()
            pid = self.byte()
        if pid == _MAIN_STREAMS:
            self.streams()
            pid = self.byte()
        if pid == _FILES_INFO:
            self.files()
            pid = self.byte()
        if pid != _END:
            raise _Bad7z("bad header")

    def files(self) -> None:
        limits = self.limits
        entries = self.number()
        if entries > self.max_entries:
            raise _Refused(_entry_count_problem(self.path, entries, limits))
        empty = empty_files = 0
        while (prop := self.byte()) != _END:
            size = self.number()
            start = self.skip(size)
            if prop == _EMPTY_STREAM:  # entries without data: empty files and directories
                empty = self.bits(entries, start, size)
            elif prop == _EMPTY_FILE:  # which of those are files
                empty_files = self.bits(empty, start, size)
        if entries - empty + empty_files > limits.max_files:
            raise _Refused(_file_count_problem(self.path, limits))


def _lzma_dict(size: int, limit: int) -> int:
    # A dictionary larger than the output is never used: a header decoded to no more than
    # ``limit`` bytes needs no more, whatever it declares (liblzma allocates it up front).
    return max(4096, min(size, limit + 1))


def _header_decoder(method: bytes, properties: bytes | None,
                    limit: int) -> Callable[[], _Decompressor] | None:
    """A decompressor factory for the codings 7-Zip, p7zip, py7zr and libarchive use for
    headers (one coder: LZMA, LZMA2, Deflate, BZip2; Copy needs none); None for others."""
    props = properties or b""
    if method == b"\x03\x01\x01" and len(props) >= 5:  # LZMA
        lc_lp_pb, dict_size = props[0], int.from_bytes(props[1:5], "little")
        if lc_lp_pb >= 9 * 5 * 5:
            raise _Bad7z("bad LZMA properties")
        lzma1 = {"id": lzma.FILTER_LZMA1, "dict_size": _lzma_dict(dict_size, limit),
                 "lc": lc_lp_pb % 9, "lp": lc_lp_pb // 9 % 5, "pb": lc_lp_pb // 45}
        return lambda: lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[lzma1])
    if method == b"\x21" and len(props) >= 1:  # LZMA2
        bits = props[0] & 0x3F
        if bits > 40:
            raise _Bad7z("bad LZMA2 properties")
        dict_size = 0xFFFFFFFF if bits == 40 else (2 | bits & 1) << (bits // 2 + 11)
        lzma2 = {"id": lzma.FILTER_LZMA2, "dict_size": _lzma_dict(dict_size, limit)}
        return lambda: lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[lzma2])
    if method == b"\x04\x01\x08":  # Deflate
        return lambda: zlib.decompressobj(-zlib.MAX_WBITS)
    if method == b"\x04\x02\x02":  # BZip2
        return bz2.BZ2Decompressor
    return None


def _decode(new: Callable[[], _Decompressor], packed: bytes, limit: int) -> bytes:
    """Decode one stream to at most ``limit + 1`` bytes (a header has no concatenation)."""
    out = bytearray()
    dec = new()
    pending = packed
    try:
        while len(out) <= limit:
            chunk = dec.decompress(pending, limit + 1 - len(out))
            out += chunk
            if dec.eof:
                break
            tail: bytes = getattr(dec, "unconsumed_tail", b"")
            needs_input = getattr(dec, "needs_input", not tail)
            if (needs_input and not tail) or not (chunk or tail):
                break  # input used up (LZMA without an end marker ends so)
            pending = tail
    except (zlib.error, OSError, lzma.LZMAError, EOFError, ValueError, MemoryError) as exc:
        raise _Bad7z("undecodable header") from exc
    return bytes(out)


def sevenzip_header_problem(path: str, data: bytes, limits: Limits) -> Problem | None:
    """Refuse a 7z whose header breaks the limits, before py7zr parses it (see above).

    None when it fits (or is encrypted: py7zr says so); a structural Problem for a header
    too large or too many entries; an ``unknown`` corrupt Problem for a header that does
    not parse, never a silent pass.
    """
    try:
        _check_sevenzip_header(path, data, limits)
    except _Refused as refused:
        return refused.problem
    except _Bad7z as exc:
        return _corrupt(path, f"7z header: {exc}")
    return None


def _check_sevenzip_header(path: str, data: bytes, limits: Limits) -> None:
    if len(data) < _SIGNATURE_SIZE:
        raise _Bad7z("truncated signature header")
    _, _, _, next_offset, next_size, _ = _SIGNATURE_HEADER.unpack_from(data)
    if next_size == 0:
        return  # an empty archive
    bound = limits.max_files * HEADER_BYTES_PER_FILE + 64 * KiB
    if next_size > bound:
        raise _Refused(_structural(path, f"7z header size limit ({next_size} bytes > {bound} "
                                         f"for max_files {limits.max_files})"))
    start = _SIGNATURE_SIZE + next_offset
    if start + next_size > len(data):
        raise _Bad7z("next header outside the archive")
    reader = _HeaderReader(data[start:start + next_size], path, limits)
    if data[start] != _ENCODED_HEADER:
        reader.header()
        return
    reader.pos = 1
    streams = reader.streams()
    if not streams.folders or not streams.pack_sizes:
        raise _Bad7z("encoded header without packed stream")
    declared = sum(max(f.unpack_sizes, default=0) for f in streams.folders)
    if declared > bound:
        raise _Refused(_structural(path, f"7z header size limit ({declared} bytes > {bound} "
                                         f"for max_files {limits.max_files})"))
    if any(method == _AES for f in streams.folders for method, _ in f.coders):
        return  # an encrypted header: py7zr reports the archive as encrypted
    folder = streams.folders[0]
    if len(streams.folders) != 1 or len(folder.coders) != 1 or len(streams.pack_sizes) != 1:
        # a coding no writer uses for headers: not inspected, and not let through
        raise _Refused(_structural(path, "7z header coding limit (not inspectable)"))
    method, properties = folder.coders[0]
    packed_start = _SIGNATURE_SIZE + streams.pack_pos
    packed_end = packed_start + streams.pack_sizes[0]
    if packed_end > len(data):
        raise _Bad7z("packed header outside the archive")
    size = folder.unpack_sizes[0]
    if method in (b"", b"\x00"):  # Copy
        raw = data[packed_start:min(packed_end, packed_start + size)]
    else:
        new = _header_decoder(method, properties, bound)
        if new is None:
            raise _Refused(_structural(path, "7z header coding limit (not inspectable)"))
        raw = _decode(new, data[packed_start:packed_end], bound)
        if len(raw) > bound:
            raise _Refused(_structural(path, f"7z header size limit (more than {bound} "
                                             f"bytes for max_files {limits.max_files})"))
    if len(raw) < size:
        raise _Bad7z("truncated encoded header")
    _HeaderReader(raw[:size], path, limits).header()


class _Overflow(Exception):
    """A 7z member produced more than its cap (defence in depth: py7zr obeys the header)."""


def sevenzip_members(part: Part, budget: Budget) -> Children:
    """Members of a 7z archive, decompressed in memory with py7zr once its header passed
    :func:`sevenzip_header_problem`."""
    refused = sevenzip_header_problem(part.path, part.data, budget.limits)
    if refused is not None:
        yield refused
        return
    try:
        import py7zr
        from py7zr import io as py7zr_io
    except ImportError:  # pragma: no cover - py7zr is a dependency
        yield Problem(part.path, ScanStatus.UNKNOWN, "7z support not installed")
        return

    cap = budget.cap()

    class Writer(py7zr_io.Py7zIO):
        """Keeps one member in memory, refusing to grow past ``cap``."""

        def __init__(self) -> None:
            self.buffer = bytearray()

        def write(self, s: bytes | bytearray) -> int:
            if len(self.buffer) + len(s) > cap:
                raise _Overflow(len(self.buffer) + len(s))
            self.buffer += s
            return len(s)

        def read(self, size: int | None = None) -> bytes:
            return bytes(self.buffer)

        def seek(self, offset: int, whence: int = 0) -> int:
            return 0

        def flush(self) -> None:
            return None

        def size(self) -> int:
            return len(self.buffer)

    class Factory(py7zr_io.WriterFactory):
        def __init__(self) -> None:
            self.products: list[tuple[str, Writer]] = []

        def create(self, filename: str) -> py7zr_io.Py7zIO:
            writer = Writer()
            self.products.append((filename, writer))
            return writer

    remaining = budget.limits.max_scan_size - budget.scanned
    depth = part.depth + 1
    factory = Factory()
    paths: dict[str, str] = {}  # the name py7zr extracts a member under -> its part path
    problem: Problem | None = None
    try:
        # max_extract_size bounds everything py7zr decompresses, including members it
        # only decodes to reach a wanted one in a solid block.
        with py7zr.SevenZipFile(io.BytesIO(part.data), mode="r",
                                max_extract_size=max(remaining, 1)) as archive:
            if archive.needs_password():
                yield Problem(part.path, ScanStatus.UNKNOWN, "encrypted")
                return
            listing = archive.list()
            infos = [i for i in listing if not i.is_directory]
            declared = sum(i.uncompressed or 0 for i in infos)
            # Solid blocks have no per-member compressed size: judge the archive as a whole.
            if budget.over_ratio(declared, len(part.data)):
                yield Problem(part.path, ScanStatus.SKIPPED, REASON_RATIO, LimitKind.STRUCTURAL)
                return
            prepared = _prepare_members(archive, len(listing))
            labels, crcs = prepared if prepared is not None else ([], {})
            wanted: set[str] = set()
            # Members are extracted before decompose counts them: never more than it admits.
            allowed = budget.limits.max_files - budget.files
            for index, info in enumerate(listing):
                if info.is_directory:
                    continue
                if len(wanted) >= allowed:
                    problem = _file_count_problem(part.path, budget.limits)
                    break
                path = join_path(part.path, sanitize_name(info.filename, f"member{index + 1}"))
                refused = budget.refuse(path, info.uncompressed or 0)
                if refused is not None:
                    yield refused
                    if budget.stopped:
                        return
                else:
                    label = labels[index] if labels else info.filename
                    wanted.add(label)
                    paths[label] = path
            if wanted:
                archive.extract(targets=wanted, factory=factory)
    except py7zr.PasswordRequired:
        yield Problem(part.path, ScanStatus.UNKNOWN, "encrypted")
        return
    except py7zr.DecompressionBombError:
        budget.stopped = True
        yield Problem(part.path, ScanStatus.SKIPPED, REASON_SCAN_SIZE, LimitKind.SIZE)
        return
    except _Overflow as exc:
        # the member that overflowed: refused, not scanned in part
        over = factory.products.pop()[0] if factory.products else ""
        problem = _over_cap(budget, paths.get(over, part.path), int(exc.args[0]), None)
    except Exception as exc:
        # A CRC error, a truncated or undecodable block: what was extracted is still
        # scanned (7-Zip extracts it too), then the archive is reported corrupt.
        problem = _corrupt(part.path, exc)
    bad_crc = []
    for index, (filename, writer) in enumerate(factory.products, 1):
        path = paths.get(filename) or join_path(part.path,
                                                sanitize_name(filename, f"member{index}"))
        yield Part(path, bytes(writer.buffer), depth)
        expected = crcs.get(filename)
        if expected is not None and zlib.crc32(writer.buffer) != expected:
            bad_crc.append(path)
    for path in bad_crc:
        yield _corrupt(path, "bad CRC-32")
    if problem is not None:
        yield problem


def _prepare_members(archive: object, count: int) -> tuple[list[str], dict[str, int]] | None:
    """Give every entry of an open py7zr archive a plain name of its own ("0", "1", ...),
    and take its CRCs away from py7zr: (labels, expected CRC by label).

    py7zr checks each name as a path below the extraction directory even when it
    extracts into memory, and refuses the whole archive for one name such as
    ``../x``, ``/x`` or ``C:x`` that 7-Zip extracts (after stripping); and it stops at the
    first member whose CRC does not match, where 7-Zip extracts the others (and that one,
    with an error). Either would let one member hide every other one. Our part paths use
    the sanitized original names, py7zr only ever sees the labels, and CRCs are checked
    on the extracted bytes afterwards. None if py7zr's structures are not as expected (it
    then extracts as it would anyway).
    """
    try:
        entries = archive.files.files_list  # type: ignore[attr-defined]
        if len(entries) != count:
            return None
        labels = [str(index) for index in range(count)]
        crcs: dict[str, int] = {}
        for entry, label in zip(entries, labels, strict=True):
            entry["filename"] = label
            digest = entry.pop("digest", None)
            if isinstance(digest, int):
                crcs[label] = digest
        streams = archive.header.main_streams  # type: ignore[attr-defined]
        if streams is not None:
            for folder in streams.unpackinfo.folders:
                folder.crc = None  # the CRC of a whole block: its members are checked
    except (AttributeError, KeyError, TypeError):
        return None
    return labels, crcs
