"""Archive members, extracted in memory under the limits: zip, tar, gzip, bzip2, xz.

7z lives in :mod:`avgate.content.sevenzip` (it has a header codec of its own).

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
    text = exc if isinstance(exc, str) else _error_text(exc)
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
            if info.filename.endswith("/"):  # is_dir() raises for an empty name
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
