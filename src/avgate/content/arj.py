"""ARJ archives: stored members read here, compressed ones ``unknown``.

No maintained library reads ARJ (libarchive has no ARJ reader, and no Python package does),
while clamd (unarj) does: an EICAR file in an ``.arj`` is found by clamd. ARJ's headers are
simple (a signature, a size, a basic header with a CRC-32, extended headers), and ``arj``
stores files that do not compress, as every small test file: those members (method 0) are
read here, checked against their CRC-32, and scanned. Members compressed with methods 1-4
have no reader: ``unknown`` (never clean). :func:`arj_entries` is the sans-IO header walk.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from ..result import ScanStatus
from . import Budget, Children, Part, Problem, join_path, sanitize_name
from .archives import ENTRIES_PER_FILE, _corrupt, _entry_count_problem

__all__ = ["ArjEntry", "ArjError", "arj_entries", "arj_members"]

_MAGIC = b"\x60\xea"
_MAX_BASIC = 2600  # ARJ's own bound on a basic header
_FIXED = struct.Struct("<BBBBBBBBLLLLHHH")  # the first 30 bytes of a basic header
_GARBLED = 0x01  # flag: the member is encrypted
_FILE_TYPES = (0, 1)  # binary, 7-bit text (2: comment, 3: directory, 4: volume label)
_STORED = 0


class ArjError(ValueError):
    """A header that does not parse (a fixed text: no archive bytes)."""


@dataclass(frozen=True, slots=True)
class ArjEntry:
    name: str
    flags: int
    method: int
    file_type: int
    csize: int
    size: int
    crc: int
    start: int  # where its data starts

    @property
    def is_file(self) -> bool:
        return self.file_type in _FILE_TYPES


def _header(data: bytes, pos: int) -> tuple[bytes, int] | None:
    """The basic header at ``pos`` and where the data after it starts; None at the end."""
    if data[pos:pos + 2] != _MAGIC:
        raise ArjError("no header signature")
    if pos + 4 > len(data):
        raise ArjError("truncated header")
    (size,) = struct.unpack_from("<H", data, pos + 2)
    if size == 0:
        return None  # the end of the archive
    if size > _MAX_BASIC or size < _FIXED.size:
        raise ArjError("bad header size")
    end = pos + 4 + size
    if end + 4 > len(data):
        raise ArjError("truncated header")
    basic = data[pos + 4:end]
    if zlib.crc32(basic) != struct.unpack_from("<L", data, end)[0]:
        raise ArjError("bad header CRC-32")
    at = end + 4
    while True:  # extended headers: size, data, CRC-32; a size of 0 ends them
        if at + 2 > len(data):
            raise ArjError("truncated header")
        (extended,) = struct.unpack_from("<H", data, at)
        at += 2
        if extended == 0:
            return basic, at
        at += extended + 4


def arj_entries(data: bytes, max_entries: int) -> Iterator[ArjEntry]:
    """The entries after the main header, in order; ArjError where a header does not parse
    and where there are more than ``max_entries`` (raised after that many were yielded)."""
    main = _header(data, 0)
    if main is None:
        return
    pos = main[1]
    for _ in range(max_entries + 1):
        found = _header(data, pos)
        if found is None:
            return
        basic, start = found
        (first, _, _, _, flags, method, file_type, _, _, csize, size, crc, _, _,
         _) = _FIXED.unpack_from(basic)
        if first < _FIXED.size or first > len(basic):
            raise ArjError("bad header size")
        name = basic[first:].partition(b"\x00")[0].decode("latin-1")
        yield ArjEntry(name, flags, method, file_type, csize, size, crc, start)
        pos = start + csize
    raise ArjError("too many entries")


def arj_members(part: Part, budget: Budget) -> Children:
    """Stored members of an ARJ archive; compressed or encrypted ones are ``unknown``."""
    data, depth = part.data, part.depth + 1
    max_entries = ENTRIES_PER_FILE * budget.limits.max_files
    index = 0
    try:
        for entry in arj_entries(data, max_entries):
            index += 1
            if not entry.is_file:
                continue
            path = join_path(part.path, sanitize_name(entry.name, f"member{index}"))
            if entry.flags & _GARBLED:
                yield Problem(path, ScanStatus.UNKNOWN, "encrypted")
                continue
            if entry.method != _STORED:
                yield Problem(path, ScanStatus.UNKNOWN, f"no reader for ARJ method {entry.method}")
                continue
            available = max(0, min(entry.csize, len(data) - entry.start))
            problem = budget.refuse(path, available)
            if problem is not None:
                yield problem
                if budget.stopped:
                    return
                continue
            content = data[entry.start:entry.start + available]
            yield Part(path, content, depth)
            if available < entry.csize:
                yield _corrupt(path, "truncated member")
                return
            if zlib.crc32(content) != entry.crc:
                yield _corrupt(path, "bad CRC-32")
    except ArjError as exc:
        if str(exc) == "too many entries":
            yield _entry_count_problem(part.path, index + 1, budget.limits)
        else:
            yield _corrupt(part.path, f"ARJ: {exc}")
