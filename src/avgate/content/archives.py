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

import bisect
import bz2
import io
import lzma
import re
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
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
    """Members of a zip archive, read every way a zip reader might read them.

    A zip describes each member twice: in the central directory (CD) at its end, and in the
    local header before the data. Readers disagree about which to trust (unzip and zipfile
    take the CD; streaming readers, mail filters and some AV engines walk local headers),
    so an attacker can show each one something else. Here every interpretation is read:
    each CD entry (with its own name, method and sizes, at the data its local header points
    to), and every local header found by scanning for ``PK\\x03\\x04`` (data descriptors
    and entries missing from the CD included). Reads of the same bytes the same way are
    done once. An interpretation that does not decode is ``unknown`` only when no other
    interpretation of that entry could be read; encryption, unsupported methods and limits
    are always reported. The archive may start anywhere (data before it: a self-extracting
    stub, junk); that leading data is searched for uuencoded blocks as any leaf would be.
    """
    refused = zip_directory_problem(part.path, part.data, budget.limits)
    if refused is not None:
        yield refused
        return
    reader = _ZipReader(part, budget)
    first_local = part.data.find(_LOCAL_MAGIC)
    starts = [o for o in (first_local, reader.cd_start) if o >= 0]
    starts += [entry.header for entry in reader.central]
    prefix = min(starts, default=0)
    if prefix > 0:
        yield from uuencoded_parts(Part(part.path, part.data[:prefix], part.depth), budget)
    yield from reader.members()


_LOCAL = struct.Struct("<4sHHHHHLLLHH")  # signature ... name and extra field lengths
_CENTRAL = struct.Struct("<4sHHHHHHLLLHHHHHLL")  # signature ... local header offset
_LOCAL_MAGIC = b"PK\x03\x04"
_DESCRIPTOR_MAGIC = b"PK\x07\x08"
_U32 = 0xFFFFFFFF
_ZIP64_EXTRA = 0x0001
# Methods a local header found by scanning may have; any other value is no header at all.
_METHODS = frozenset((0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 18, 19, 20, 93, 94, 95,
                      96, 97, 98, 99))
_DESCRIPTOR_SEARCH = 4096  # candidate data descriptors looked at for one stored member
_CHUNK = 256 * KiB


@dataclass(frozen=True, slots=True)
class _CentralEntry:
    name: str
    flags: int
    method: int
    crc: int
    csize: int
    usize: int
    header: int  # where its local header should be (offsets shifted by any leading data)


@dataclass(frozen=True, slots=True)
class _View:
    """One interpretation of an entry: a name, how its data is coded, where it lies."""

    name: str
    flags: int
    method: int
    crc: int | None  # None: not known (a data descriptor follows)
    csize: int | None  # None: not known, read to the end of the compressed stream
    usize: int
    start: int  # where the data starts
    local: bool = False  # what the local header says (not the CD)

    @property
    def is_dir(self) -> bool:
        # an empty deflate stream is two bytes: anything longer is read, whatever the name
        return self.name.endswith("/") and not self.usize and (self.csize or 0) <= 2

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & 0x1) or self.method == _ZIP_AES


class _ZipReader:
    """The interpretations of one zip's entries, read under one Budget."""

    def __init__(self, part: Part, budget: Budget) -> None:
        self.part = part
        self.budget = budget
        self.data = part.data
        self.central, self.cd_start = _central_directory(part.data)
        self.index = 0
        # Data of members read without error, as a local header describes them: a reader
        # walking local headers steps over it and the CD points elsewhere, so a header in
        # there is a member's content (the recursion looks at it), not an entry of this zip.
        self.stepped_over = _Ranges()
        self.covered = _Ranges()  # data of members read without error, any interpretation
        self.read_names: set[str] = set()

    def members(self) -> Children:
        data, budget = self.data, self.budget
        groups: dict[int, list[_View]] = {}
        orphans: list[_CentralEntry] = []
        for entry in self.central:
            local = _local_view(data, entry.header)
            if local is None:
                orphans.append(entry)
                continue
            groups.setdefault(entry.header, []).append(_View(
                entry.name, entry.flags, entry.method, entry.crc, entry.csize, entry.usize,
                local.start))
        max_entries = ENTRIES_PER_FILE * budget.limits.max_files
        for header, views in groups.items():
            local = _local_view(data, header)
            if local is not None:
                views.append(local)
            yield from self._read_group(views, reported=True)
            if budget.stopped:
                return
        count = len(groups) + len(orphans)
        pos = data.find(_LOCAL_MAGIC)
        while pos >= 0:
            if pos not in groups and pos not in self.stepped_over:
                # the header that made this a zip (at its start) is one even if odd
                local = _local_view(data, pos, strict=pos > 0)
                if local is not None:
                    count += 1
                    if count > max_entries:
                        yield _entry_count_problem(self.part.path, count, budget.limits)
                        return
                    # a header inside a member's data is that member's business when it
                    # does not read: only one that lies between members must read
                    yield from self._read_group([local],
                                                reported=pos not in self.covered)
                    if budget.stopped:
                        return
            pos = data.find(_LOCAL_MAGIC, pos + 4)
        for entry in orphans:
            if entry.name not in self.read_names and not entry.name.endswith("/"):
                self.index += 1
                path = join_path(self.part.path, sanitize_name(entry.name,
                                                               f"member{self.index}"))
                yield _corrupt(path, "no local header where the central directory points")
        if count == 0 and self.cd_start < 0:  # no entry, and not an empty archive either
            yield _corrupt(self.part.path, "no zip entry found")

    def _read_group(self, views: list[_View], reported: bool) -> Children:
        """Read the distinct interpretations of one entry: parts first, then problems."""
        budget, depth = self.budget, self.part.depth + 1
        self.index += 1
        seen: set[tuple[int, int, int | None, bool]] = set()
        outputs: list[bytes] = []
        hard: list[Problem] = []  # always reported: encryption, limits, unsupported
        soft: list[Problem] = []  # undecodable: only when no interpretation read
        success = False
        local_keys = {(v.start, v.method, v.csize, v.encrypted) for v in views if v.local}
        for view in views:
            key = (view.start, view.method, view.csize, view.encrypted)
            if view.is_dir or key in seen:
                continue
            seen.add(key)
            path = join_path(self.part.path, sanitize_name(view.name, f"member{self.index}"))
            if view.encrypted:
                hard.append(Problem(path, ScanStatus.UNKNOWN, "encrypted"))
                continue
            if view.method not in _READERS:
                hard.append(Problem(path, ScanStatus.UNKNOWN,
                                    f"unsupported: compression method {view.method}"))
                continue
            available = len(self.data) - view.start
            # A stored member cannot be a bomb, and cannot produce more than its stored
            # bytes; a compressed size larger than the archive is a lie: the archive bounds it.
            if view.method == zipfile.ZIP_STORED:
                compressed, declared = None, min(view.usize, view.csize or 0, available)
            else:
                compressed = min(view.csize or available, available)
                declared = view.usize
            problem = budget.refuse(path, declared, compressed)
            if problem is not None:
                hard.append(problem)
                continue
            cap = budget.cap(compressed)
            out, error, end = _read_view(self.data, view, cap)
            if len(out) > cap:
                hard.append(_over_cap(budget, path, len(out), compressed))
                continue
            if out not in outputs and (out or error is None):
                outputs.append(out)
                yield Part(path, out, depth)
            if error is not None:
                soft.append(_corrupt(path, error))
                continue
            success = True
            self.read_names.add(view.name)
            self.covered.add(view.start, end)
            if key in local_keys:
                self.stepped_over.add(view.start, end)
        yield from hard
        if not success and reported:
            yield from soft[:1]


class _Ranges:
    """Disjoint byte ranges, merged as they are added; membership by bisection."""

    __slots__ = ("ends", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        lo = bisect.bisect_left(self.ends, start)  # the first range that ends at/after start
        hi = bisect.bisect_right(self.starts, end)  # past the last range that starts by end
        if lo < hi:
            start, end = min(start, self.starts[lo]), max(end, self.ends[hi - 1])
        self.starts[lo:hi] = [start]
        self.ends[lo:hi] = [end]

    def __contains__(self, pos: object) -> bool:
        if not isinstance(pos, int):
            return False
        index = bisect.bisect_right(self.starts, pos) - 1
        return index >= 0 and pos < self.ends[index]


def _zip64_values(extra: bytes, wanted: int) -> list[int]:
    """Up to ``wanted`` 8-byte values of the zip64 extra field (a corrupt extra: none)."""
    pos = 0
    while pos + 4 <= len(extra):
        field, size = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4:pos + 4 + size]
        if field == _ZIP64_EXTRA:
            count = min(wanted, len(body) // 8)
            return list(struct.unpack_from(f"<{count}Q", body)) if count else []
        pos += 4 + size
    return []


def _central_directory(data: bytes) -> tuple[list[_CentralEntry], int]:
    """The CD's entries as far as they parse, and where the CD starts (-1: no CD).

    Lenient where zipfile is strict: a corrupt extra field loses nothing but the zip64
    values it would hold, and a broken entry ends the listing (the local headers after it
    are still found by scanning).
    """
    try:
        endrec = zipfile._EndRecData(io.BytesIO(data))  # type: ignore[attr-defined]
    except (zipfile.BadZipFile, OSError, ValueError, struct.error):
        return [], -1
    if endrec is None:
        return [], -1
    signature, cd_size, cd_offset, location = endrec[0], endrec[5], endrec[6], endrec[9]
    start = location - cd_size
    if signature == _ZIP64_EOCD_SIG:
        start -= _ZIP64_EOCD_AND_LOCATOR
    if start < 0:
        return [], -1
    concat = max(start - cd_offset, 0)  # leading data (a stub) shifts every offset
    entries: list[_CentralEntry] = []
    pos, end = start, min(start + cd_size, len(data))
    while pos + _CENTRAL.size <= end:
        (magic, _, _, flags, method, _, _, crc, csize, usize, name_len, extra_len,
         comment_len, _, _, _, header) = _CENTRAL.unpack_from(data, pos)
        if magic != _CD_MAGIC:
            break
        name_at = pos + _CENTRAL.size
        raw_name = data[name_at:name_at + name_len]
        extra = data[name_at + name_len:name_at + name_len + extra_len]
        wanted = [value == _U32 for value in (usize, csize, header)]
        values = iter(_zip64_values(extra, sum(wanted)) if any(wanted) else [])
        usize = next(values, usize) if wanted[0] else usize
        csize = next(values, csize) if wanted[1] else csize
        header = next(values, header) if wanted[2] else header
        entries.append(_CentralEntry(_zip_name(raw_name, flags), flags, method, crc, csize,
                                     usize, header + concat))
        pos = name_at + name_len + extra_len + comment_len
    return entries, start


def _zip_name(raw: bytes, flags: int) -> str:
    raw = raw.partition(b"\0")[0]
    return raw.decode("utf-8", "replace") if flags & 0x800 else raw.decode("cp437")


def _local_view(data: bytes, pos: int, strict: bool = False) -> _View | None:
    """The local header at ``pos`` as an interpretation; None if there is none.

    ``strict`` (a header found by scanning, not pointed at): an unknown method or a
    header running past the data means these four bytes are no header.
    """
    if pos < 0 or pos + _LOCAL.size > len(data):
        return None
    (magic, _, flags, method, _, _, crc, csize, usize, name_len,
     extra_len) = _LOCAL.unpack_from(data, pos)
    if magic != _LOCAL_MAGIC:
        return None
    start = pos + _LOCAL.size + name_len + extra_len
    if strict and (method not in _METHODS or start > len(data)):
        return None
    name_at = pos + _LOCAL.size
    extra = data[name_at + name_len:start]
    wanted = [value == _U32 for value in (usize, csize)]
    values = iter(_zip64_values(extra, 2) if any(wanted) else [])
    usize = next(values, usize) if wanted[0] else usize
    csize = next(values, csize) if wanted[1] else csize
    descriptor = bool(flags & 0x8)
    return _View(_zip_name(data[name_at:name_at + name_len], flags), flags, method,
                 None if descriptor else crc,
                 None if descriptor and (csize == 0 or method == zipfile.ZIP_STORED) else csize,
                 usize, start, local=True)


def _stored_end(data: bytes, start: int) -> int | None:
    """Where a stored member with a data descriptor ends: at a descriptor whose size field
    matches the distance (with or without its signature), else None."""
    pos = start
    for _ in range(_DESCRIPTOR_SEARCH):
        pos = data.find(_DESCRIPTOR_MAGIC, pos)
        if pos < 0:
            return None
        if pos + 12 <= len(data) and struct.unpack_from("<L", data, pos + 8)[0] == pos - start:
            return pos
        pos += 1
    return None


def _lzma_decompressor(props: bytes, cap: int) -> _Decompressor:
    if len(props) < 5 or props[0] >= 9 * 5 * 5:
        raise ValueError("bad LZMA properties")
    dict_size = max(4096, min(int.from_bytes(props[1:5], "little"), cap + 1))
    filters = [{"id": lzma.FILTER_LZMA1, "dict_size": dict_size, "lc": props[0] % 9,
                "lp": props[0] // 9 % 5, "pb": props[0] // 45}]
    return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=filters)


_READERS = frozenset((zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                      zipfile.ZIP_LZMA))


def _read_view(data: bytes, view: _View, cap: int) -> tuple[bytes, str | None, int]:
    """An interpretation's bytes (at most ``cap + 1``), what went wrong, where its data ends.

    Read the way unzip extracts: a CRC mismatch does not lose the member (it is scanned,
    then reported); a member that breaks off is scanned as far as it decompressed.
    """
    start, method = view.start, view.method
    if method == zipfile.ZIP_STORED:
        csize = view.csize
        if csize is None:
            end = _stored_end(data, start)
            if end is None:
                return b"", "stored member without a data descriptor", start
            csize = end - start
        out = data[start:start + min(csize, cap + 1)]
        if len(out) > cap:
            return out, None, start + csize
        if start + csize > len(data):
            return out, "truncated member", len(data)
        return out, _crc_error(view.crc, out), start + csize
    stop = len(data) if view.csize is None else min(len(data), start + view.csize)
    raw = memoryview(data)[start:stop]
    dec: _Decompressor
    try:
        if method == zipfile.ZIP_LZMA:  # version (2 bytes), properties size (2), properties
            size = int.from_bytes(raw[2:4], "little")
            dec = _lzma_decompressor(bytes(raw[4:4 + size]), cap)
            raw = raw[4 + size:]
        elif method == zipfile.ZIP_BZIP2:
            dec = bz2.BZ2Decompressor()
        else:
            dec = zlib.decompressobj(-zlib.MAX_WBITS)
    except (ValueError, lzma.LZMAError) as exc:
        return b"", _error_text(exc), start
    out, error, used = _decode_stream(dec, raw, cap)
    end = stop - len(raw) + used
    if error is None and len(out) <= cap:
        error = _crc_error(view.crc, out)
    return out, error, end


def _decode_stream(dec: _Decompressor, raw: memoryview, cap: int) -> tuple[bytes, str | None,
                                                                          int]:
    """Decode one compressed stream to at most ``cap + 1`` bytes: (output, error, bytes of
    ``raw`` used). Trailing data after the stream's end is not part of it."""
    out = bytearray()
    pending: bytes | memoryview = raw
    fed = 0
    while True:
        chunk_in = bytes(pending[:_CHUNK])
        try:
            chunk = dec.decompress(chunk_in, cap + 1 - len(out))
        except (zlib.error, OSError, lzma.LZMAError, EOFError, ValueError) as exc:
            return bytes(out), _error_text(exc), fed
        out += chunk
        if dec.eof:
            return bytes(out), None, fed + len(chunk_in) - len(dec.unused_data)
        if len(out) > cap:
            return bytes(out), None, fed
        tail: bytes = getattr(dec, "unconsumed_tail", b"")
        needs_input = getattr(dec, "needs_input", not tail)
        if tail:  # zlib: input it had no room to use
            pending = bytes(tail) + bytes(pending[len(chunk_in):])
            fed += len(chunk_in) - len(tail)
            continue
        fed += len(chunk_in)
        pending = pending[len(chunk_in):]
        if not pending and needs_input:
            return bytes(out), "truncated stream", fed
        if not pending and not chunk:
            return bytes(out), "truncated stream", fed


def _crc_error(expected: int | None, data: bytes | bytearray) -> str | None:
    if expected is None or zlib.crc32(data) == expected:
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
