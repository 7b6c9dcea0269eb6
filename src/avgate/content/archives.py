"""Archive members, extracted in memory under the limits: zip, tar, gzip, bzip2, xz, 7z.

Each ``*_members(part, budget)`` yields the direct members of ``part`` (depth + 1) or a
:class:`Problem`; the caller recurses into members. Before a library lists anything, the
entry count and directory/header size the archive declares are read by hand (a few
``struct`` reads) and checked against the limits, so a few kilobytes that declare half a
million entries are refused before any per-entry object exists. Sizes are checked on the
declared values first, then every read is capped (``Budget.cap``) so a lying header cannot
make us decompress more than a limit allows. Nothing is ever written to disk.

Every Problem says which kind of limit it is (``LimitKind``): the shape of the content
(entry counts, header sizes, ratio, nesting) is structural, max_file_size/max_scan_size are
size limits; encrypted or corrupt members are no limit at all. Reasons are fixed texts and
numbers: no bytes of the archive other than sanitized member names.
"""

from __future__ import annotations

import bz2
import io
import lzma
import re
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from typing import Protocol

from ..limits import KiB, Limits
from ..result import LimitKind, ScanStatus
from . import (
    REASON_FILE_SIZE,
    REASON_FILES,
    REASON_RATIO,
    REASON_SCAN_SIZE,
    Budget,
    Children,
    Part,
    Problem,
    join_path,
    sanitize_name,
)
from .filetype import Kind, detect
from .mime import uuencoded_parts

_ZIP_AES = 99  # WinZip AES: the member is encrypted whatever the flag bits say


_UNPRINTABLE = re.compile(r"[^ -~]+")


def _safe_text(text: str, limit: int = 120) -> str:
    """A library's error text, printable ASCII only: it may quote bytes of the archive."""
    return _UNPRINTABLE.sub("?", text)[:limit]


def _corrupt(path: str, exc: BaseException | str) -> Problem:
    text = exc if isinstance(exc, str) else (str(exc).splitlines() or [type(exc).__name__])[0]
    return Problem(path, ScanStatus.UNKNOWN, f"corrupt archive: {_safe_text(text)}")


def _over_cap(budget: Budget, path: str, size: int, compressed: int | None) -> Problem:
    """The Problem for a member that produced more than ``Budget.cap`` allowed."""
    return budget.refuse(path, size, compressed) or Problem(
        path, ScanStatus.SKIPPED, REASON_FILE_SIZE, LimitKind.SIZE)


def _structural(path: str, reason: str) -> Problem:
    """A container refused unopened for its shape (entry count, header size)."""
    return Problem(path, ScanStatus.SKIPPED, reason, LimitKind.STRUCTURAL)


# Entries that are no file (directories) are not scanned and do not count as files, but
# listing them costs the same: an archive may hold at most this many entries per max_files.
ENTRIES_PER_FILE = 2


def _entry_count_problem(path: str, entries: int, limits: Limits) -> Problem:
    return _structural(path, f"entry count limit ({entries} entries > "
                             f"{ENTRIES_PER_FILE} x max_files {limits.max_files})")


def _file_count_problem(path: str, limits: Limits) -> Problem:
    # The same words as decompose's own count (REASON_FILES), for rules matching on them.
    return _structural(path, f"{REASON_FILES} (more than max_files {limits.max_files} files "
                             "in the archive)")


# -- zip ------------------------------------------------------------------------------------
# The central directory (CD) may hold this much per entry on average: 46 fixed bytes, a name
# (a long path is a few hundred bytes), extra fields (zip64, timestamps, unix ids: tens of
# bytes) and a rarely used comment. A directory past the bound is refused unread.
CD_BYTES_PER_ENTRY = 1 * KiB
_CD_ENTRY = struct.Struct("<4s24xHHH12x")  # signature; name, extra, comment lengths
_CD_ENTRY_SIZE = 46
_CD_MAGIC = b"PK\x01\x02"
_ZIP64_EOCD_SIG = b"PK\x06\x06"
_ZIP64_EOCD_AND_LOCATOR = 56 + 20


def zip_directory_problem(path: str, data: bytes, limits: Limits) -> Problem | None:
    """Refuse a zip whose central directory breaks the limits, before zipfile parses it.

    Reads the end of central directory record (zip64 included) exactly as zipfile does:
    over ``ENTRIES_PER_FILE * max_files`` declared entries, or a directory larger than
    :data:`CD_BYTES_PER_ENTRY` per allowed entry, is refused outright. The declared count
    may lie (zipfile reads entries for as long as the directory size says), so the entries
    are then walked as zipfile will (46 fixed bytes + three lengths each), stopping at the
    first entry over the limits: at most ``ENTRIES_PER_FILE * max_files + 1`` steps.
    None when the archive fits, or when zipfile will find it corrupt anyway.
    """
    try:
        endrec = zipfile._EndRecData(io.BytesIO(data))  # type: ignore[attr-defined]
    except (zipfile.BadZipFile, OSError, ValueError, struct.error):
        return None  # zipfile raises the same: reported as corrupt
    if endrec is None:
        return None
    signature, entries, cd_size, cd_offset, location = (endrec[0], endrec[4], endrec[5],
                                                        endrec[6], endrec[9])
    max_entries = ENTRIES_PER_FILE * limits.max_files
    if entries > max_entries:
        return _entry_count_problem(path, entries, limits)
    cd_bound = max_entries * CD_BYTES_PER_ENTRY + 64 * KiB
    if cd_size > cd_bound:
        return _structural(path, f"central directory size limit ({cd_size} bytes > "
                                 f"{cd_bound} for max_files {limits.max_files})")
    # zipfile: data before the archive (a self-extracting stub) shifts every offset
    start = location - cd_size
    if signature == _ZIP64_EOCD_SIG:
        start -= _ZIP64_EOCD_AND_LOCATOR
    if cd_offset > start:
        return None  # "bad offset for central directory"
    end = min(start + cd_size, len(data))
    pos, seen, files = start, 0, 0
    while pos - start < cd_size:
        if pos + _CD_ENTRY_SIZE > end:
            return None  # truncated: zipfile says so
        magic, name_len, extra_len, comment_len = _CD_ENTRY.unpack_from(data, pos)
        if magic != _CD_MAGIC:
            return None
        name = data[pos + _CD_ENTRY_SIZE:pos + _CD_ENTRY_SIZE + name_len].partition(b"\0")[0]
        seen += 1
        if not name.endswith(b"/"):  # ZipInfo.is_dir()
            files += 1
            if files > limits.max_files:
                return _file_count_problem(path, limits)
        if seen > max_entries:
            return _entry_count_problem(path, seen, limits)
        pos += _CD_ENTRY_SIZE + name_len + extra_len + comment_len
    return None


def zip_members(part: Part, budget: Budget) -> Children:
    """Members of a zip archive; encrypted members are ``unknown``, never guessed clean.

    The archive may start anywhere (data before it: a self-extracting stub, junk), as
    unzip and zipfile read a zip from its end; that leading data is searched for
    uuencoded blocks as any other leaf would be.
    """
    refused = zip_directory_problem(part.path, part.data, budget.limits)
    if refused is not None:
        yield refused
        return
    try:
        zf = zipfile.ZipFile(io.BytesIO(part.data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError,
            NotImplementedError, struct.error) as exc:
        yield _corrupt(part.path, exc)
        return
    depth = part.depth + 1
    with zf:
        # zipfile has shifted every offset by the length of any data before the archive
        prefix = min([i.header_offset for i in infos] + [zf.start_dir])
        if prefix > 0:
            yield from uuencoded_parts(Part(part.path, part.data[:prefix], part.depth), budget)
        for index, info in enumerate(infos, 1):
            if info.is_dir():
                continue
            path = join_path(part.path, sanitize_name(info.filename, f"member{index}"))
            if info.flag_bits & 0x1 or info.compress_type == _ZIP_AES:
                yield Problem(path, ScanStatus.UNKNOWN, "encrypted")
                continue
            # A stored member cannot be a bomb; its "ratio" is meaningless, and it cannot
            # produce more than its stored bytes whatever size it declares. A declared
            # compressed size larger than the archive is a lie: the archive is the bound.
            if info.compress_type == zipfile.ZIP_STORED:
                compressed, declared = None, min(info.file_size, info.compress_size)
            else:
                compressed = min(info.compress_size, len(part.data))
                declared = info.file_size
            problem = budget.refuse(path, declared, compressed)
            if problem is None:
                cap = budget.cap(compressed)
                try:
                    data, error = _read_zip_member(zf, info, part.data, cap)
                except NotImplementedError as exc:
                    problem = Problem(path, ScanStatus.UNKNOWN,
                                      f"unsupported: {_safe_text(str(exc))}")
                else:
                    if len(data) > cap:
                        problem = _over_cap(budget, path, len(data), compressed)
                    else:
                        if data or error is None:
                            yield Part(path, data, depth)
                        if error is None:
                            continue
                        problem = _corrupt(path, error)
            yield problem
            if budget.stopped:
                return


_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError,
               RuntimeError, struct.error)
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature; name and extra field lengths
_CHUNK = 256 * KiB


def _read_zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, data: bytes,
                     cap: int) -> tuple[bytes, str | None]:
    """A member's bytes (at most ``cap + 1``) and what went wrong, if anything.

    Read the way unzip extracts: a CRC mismatch does not lose the member (it is scanned,
    then reported), nor does a local header whose name differs from the central
    directory's (zipfile refuses that one; the data is read from the local header on).
    A member that breaks off is scanned as far as it decompressed. NotImplementedError
    for a compression method zipfile lacks.
    """
    out = bytearray()
    try:
        member = zf.open(info)
    except NotImplementedError:
        raise
    except _ZIP_ERRORS as exc:
        return _read_zip_member_raw(info, data, cap, exc)
    with member:
        if hasattr(member, "_expected_crc"):
            member._expected_crc = None  # checked below, once the data is safe
        try:
            while len(out) <= cap:
                chunk = member.read(min(_CHUNK, cap + 1 - len(out)))
                if not chunk:
                    break
                out += chunk
        except _ZIP_ERRORS as exc:
            return bytes(out), _error_text(exc)
    return bytes(out), _crc_error(info, out, cap)


def _read_zip_member_raw(info: zipfile.ZipInfo, data: bytes, cap: int,
                         why: BaseException) -> tuple[bytes, str | None]:
    """A member read from its local header on, after zipfile refused to open it."""
    try:
        signature, name_len, extra_len = _LOCAL_HEADER.unpack_from(data, info.header_offset)
    except struct.error:
        return b"", _error_text(why)
    if signature != b"PK\x03\x04":
        return b"", _error_text(why)
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    raw = data[start:start + info.compress_size]
    if info.compress_type == zipfile.ZIP_STORED:
        out = raw[:cap + 1]
        return out, _crc_error(info, out, cap)
    new = _RAW_DECOMPRESSORS.get(info.compress_type)
    if new is None:
        return b"", _error_text(why)
    out, error = _inflate(new, raw, cap, Kind.OTHER, chained=False)
    return out, error or _crc_error(info, out, cap)


_RAW_DECOMPRESSORS: dict[int, Callable[[], _Decompressor]] = {
    zipfile.ZIP_DEFLATED: lambda: zlib.decompressobj(-zlib.MAX_WBITS),
    zipfile.ZIP_BZIP2: bz2.BZ2Decompressor,
}


def _crc_error(info: zipfile.ZipInfo, data: bytes | bytearray, cap: int) -> str | None:
    if len(data) > cap or zlib.crc32(data) == info.CRC:
        return None
    return "bad CRC-32"


def _error_text(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0] or type(exc).__name__


# -- tar ------------------------------------------------------------------------------------
def tar_members(part: Part, budget: Budget) -> Children:
    """Regular files of an (uncompressed) tar archive; links and devices are ignored.

    tarfile reads one 512-byte header per ``next()`` (and keeps a TarInfo for each), so
    counting stops the listing: past ``ENTRIES_PER_FILE * max_files`` entries (directories,
    links... included) the rest is refused unread; regular files stop at max_files when
    decompose admits them. A member's bytes are a slice of the archive: a declared size
    beyond the end of the archive is a truncated member (scanned as far as it goes, then
    reported corrupt), not a size limit.
    """
    try:
        tf = tarfile.open(fileobj=io.BytesIO(part.data), mode="r:")
    except (tarfile.TarError, ValueError, OSError, EOFError) as exc:
        yield _corrupt(part.path, exc)
        return
    depth = part.depth + 1
    max_entries = ENTRIES_PER_FILE * budget.limits.max_files
    with tf:
        members = iter(tf)
        index = 0
        while True:
            try:
                info = next(members)
            except StopIteration:
                return
            except (tarfile.TarError, ValueError, OSError, EOFError) as exc:
                yield _corrupt(part.path, exc)
                return
            index += 1
            if index > max_entries:
                yield _entry_count_problem(part.path, index, budget.limits)
                return
            if not info.isreg():
                continue
            path = join_path(part.path, sanitize_name(info.name, f"member{index}"))
            available = max(0, min(info.size, len(part.data) - info.offset_data))
            problem = budget.refuse(path, available)
            if problem is None:
                if info.sparse is None:
                    data = part.data[info.offset_data:info.offset_data + available]
                else:  # GNU sparse: tarfile puts the holes back (never more than info.size)
                    cap = budget.cap()
                    try:
                        member = tf.extractfile(info)
                        data = member.read(cap + 1) if member is not None else b""
                    except (tarfile.TarError, ValueError, OSError, EOFError) as exc:
                        yield _corrupt(path, exc)
                        continue
                    if len(data) > cap:
                        problem = _over_cap(budget, path, len(data), None)
                if problem is None:
                    yield Part(path, data, depth)
                    if info.sparse is None and available < info.size:
                        yield _corrupt(path, "truncated member")
                        return
                    continue
            yield problem
            if budget.stopped:
                return


# -- single-stream compressors --------------------------------------------------------------
class _Decompressor(Protocol):
    """What zlib/bz2/lzma decompressor objects have in common (bz2/lzma buffer input)."""

    @property
    def eof(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...
    def decompress(self, data: bytes, max_length: int = ..., /) -> bytes: ...


def _inflate(new: Callable[[], _Decompressor], data: bytes, cap: int,
             kind: Kind, chained: bool = True) -> tuple[bytes, str | None]:
    """Decompress ``data`` (concatenated streams included) to at most ``cap + 1`` bytes.

    Returns the output and an error text (truncated / corrupt stream) or None. Output
    longer than ``cap`` means a limit was hit; the caller decides which. ``chained``:
    whether another stream of ``kind`` may follow the first one.
    """
    out = bytearray()
    dec = new()
    pending = data
    while True:
        try:
            # max_length keeps a bomb from materialising: never more than cap + 1 bytes.
            chunk = dec.decompress(pending, cap + 1 - len(out))
        except (zlib.error, OSError, lzma.LZMAError, EOFError, ValueError) as exc:
            return bytes(out), str(exc) or type(exc).__name__
        out += chunk
        if len(out) > cap:
            return bytes(out), None
        if dec.eof:
            rest = dec.unused_data
            if chained and rest and detect(rest[:16]) is kind:  # gzip -c a b
                dec, pending = new(), rest
                continue
            return bytes(out), None  # trailing garbage after the stream is ignored
        # zlib hands back input it had no room to use; bz2/lzma keep it internally.
        tail: bytes = getattr(dec, "unconsumed_tail", b"")
        needs_input = getattr(dec, "needs_input", not tail)
        if (needs_input and not tail) or not (chunk or tail):
            return bytes(out), "truncated stream"
        pending = tail


_SUFFIXES = {
    Kind.GZIP: ((".tgz", ".tar"), (".gz", ""), (".z", "")),
    Kind.BZIP2: ((".tbz2", ".tar"), (".tbz", ".tar"), (".bz2", "")),
    Kind.XZ: ((".txz", ".tar"), (".xz", "")),
}


def _inner_name(part: Part, kind: Kind) -> str:
    """``x.tar.gz`` → ``x.tar``; a name that says nothing → ``data``."""
    base = part.path.rsplit("/", 1)[-1]
    lower = base.lower()
    for suffix, replacement in _SUFFIXES[kind]:
        if lower.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)] + replacement
    return "data"


def _gzip_name(data: bytes) -> str | None:
    """The original file name stored in a gzip header (FNAME), if any."""
    flags = data[3] if len(data) > 3 else 0
    if not flags & 0x08:
        return None
    pos = 10
    if flags & 0x04:  # FEXTRA: 2-byte length, then that many bytes
        if len(data) < 12:
            return None
        pos = 12 + int.from_bytes(data[10:12], "little")
    end = data.find(b"\x00", pos, pos + 1024)
    if end == -1:
        return None
    return sanitize_name(data[pos:end].decode("latin-1"), "") or None


def _stream_members(part: Part, budget: Budget, kind: Kind,
                    new: Callable[[], _Decompressor]) -> Children:
    name = (_gzip_name(part.data) if kind is Kind.GZIP else None) or _inner_name(part, kind)
    path = join_path(part.path, name)
    compressed = len(part.data)
    cap = budget.cap(compressed)
    data, error = _inflate(new, part.data, cap, kind)
    if len(data) > cap:
        yield _over_cap(budget, path, len(data), compressed)
        return
    if data or error is None:
        # A truncated stream is still scanned as far as it goes (mail often truncates).
        yield Part(path, data, part.depth + 1)
    if error is not None:
        yield _corrupt(path, error)


def gzip_members(part: Part, budget: Budget) -> Children:
    """The decompressed content of a gzip file."""
    return _stream_members(part, budget, Kind.GZIP,
                           lambda: zlib.decompressobj(16 + zlib.MAX_WBITS))


def bzip2_members(part: Part, budget: Budget) -> Children:
    """The decompressed content of a bzip2 file."""
    return _stream_members(part, budget, Kind.BZIP2, bz2.BZ2Decompressor)


def xz_members(part: Part, budget: Budget) -> Children:
    """The decompressed content of an xz file."""
    return _stream_members(part, budget, Kind.XZ,
                           lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ))


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
