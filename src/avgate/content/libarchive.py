"""RAR (v4, v5), CAB, ISO 9660, cpio and LHA/LZH archives, read in memory by libarchive.

The `libarchive-c` binding drives the system's libarchive (Debian ``libarchive13``). Each
archive is opened with the one format reader :func:`~avgate.content.filetype.detect` chose
(never libarchive's "all"), from memory, inside the scan worker like every decomposer.
Members are read in chunks and never past :meth:`Budget.cap`: the size an entry header
declares is attacker-controlled and only used to refuse early, never to allocate.

A format without a reader is never clean: UDF-only images (which libarchive does not read),
and every format here when libarchive itself is missing, are ``unknown`` with the reason
``no reader for <format>``. Encrypted entries are ``unknown``. ARJ, which libarchive lacks
too, has a reader of its own for stored members (:mod:`avgate.content.arj`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

from ..result import ScanStatus
from . import Budget, Children, Part, Problem, join_path, sanitize_name
from .archives import (
    ENTRIES_PER_FILE,
    _entry_count_problem,
    _over_cap,
    _safe_text,
)
from .filetype import Kind

__all__ = ["FORMATS", "libarchive_members", "reader_available"]

# libarchive format reader per Kind; the label used in reasons
FORMATS: dict[Kind, tuple[str, str]] = {
    Kind.CAB: ("cab", "CAB"),
    Kind.ISO9660: ("iso9660", "ISO 9660"),
    Kind.CPIO: ("cpio", "cpio"),
    Kind.LHA: ("lha", "LHA"),
}
_RAR5_MAGIC = b"Rar!\x1a\x07\x01\x00"
_STORED_ONLY = frozenset(("cpio", "iso9660"))  # formats without compression (zisofs aside)
_NO_READER = {Kind.UDF: "UDF"}  # detected, but libarchive cannot read it
_CHUNK = 64 * 1024
_ARCHIVE_EOF = 1

_lib: Any = None  # the libarchive-c module once loaded; False when it cannot be


def _load() -> Any:
    """libarchive-c, or None when it (or the C library under it) is missing."""
    global _lib
    if _lib is None:
        try:
            import libarchive
            import libarchive.ffi as ffi

            # find_library("archive") finds nothing without libarchive13, and ctypes then
            # loads the program itself: the first libarchive symbol is missing.
            ffi.version_number()
            entry_is_encrypted = ffi.libarchive.archive_entry_is_encrypted
            entry_is_encrypted.argtypes = [ctypes.c_void_p]
            entry_is_encrypted.restype = ctypes.c_int
            _lib = libarchive
        except (ImportError, OSError, AttributeError, TypeError):
            _lib = False
    return _lib or None


def reader_available() -> bool:
    """Whether libarchive can be used here (the Python binding and the C library)."""
    return _load() is not None


def _format_of(kind: Kind, data: bytes) -> tuple[str, str] | None:
    if kind is Kind.RAR:
        return ("rar5", "RAR") if data.startswith(_RAR5_MAGIC) else ("rar", "RAR")
    return FORMATS.get(kind)


def libarchive_members(part: Part, budget: Budget, kind: Kind) -> Children:
    """Members of a ``kind`` archive (regular files only), or why they cannot be read."""
    label = _NO_READER.get(kind)
    fmt = _format_of(kind, part.data)
    lib = _load()
    if label is not None or fmt is None or lib is None:
        name = label or (fmt[1] if fmt is not None else kind.value)
        yield Problem(part.path, ScanStatus.UNKNOWN, f"no reader for {name}")
        return
    format_name, label = fmt
    ffi = lib.ffi
    depth = part.depth + 1
    encrypted = rar5_encrypted(part.data) if format_name == "rar5" else set()
    if 0 in encrypted:
        yield Problem(part.path, ScanStatus.UNKNOWN, "encrypted")
        return
    max_entries = ENTRIES_PER_FILE * budget.limits.max_files
    data = part.data  # kept referenced: libarchive reads this buffer in place
    try:
        with lib.memory_reader(data, format_name=format_name, filter_name="none") as archive:
            entries = iter(archive)
            index = 0
            while True:
                try:
                    entry = next(entries)
                except StopIteration:
                    break
                index += 1
                if index > max_entries:
                    yield _entry_count_problem(part.path, index, budget.limits)
                    return
                if not entry.isreg:
                    continue
                name = _entry_name(entry)
                path = join_path(part.path, sanitize_name(name, f"member{index}"))
                if (index in encrypted
                        or ffi.libarchive.archive_entry_is_encrypted(entry._entry_p)):
                    yield Problem(path, ScanStatus.UNKNOWN, "encrypted")
                    continue
                declared = entry.size if ffi.entry_size_is_set(entry._entry_p) else 0
                # the archive is the most compressed data a member can come from; a member
                # of a format without compression is no bomb, and no larger than the archive
                compressed = None if format_name in _STORED_ONLY else len(data)
                if compressed is None:
                    declared = min(declared, len(data))
                problem = budget.refuse(path, max(declared, 0), compressed)
                if problem is not None:
                    yield problem
                    if budget.stopped:
                        return
                    continue
                cap = budget.cap(compressed)
                out, error = _read_entry(ffi.read_data, archive._pointer, cap)
                if len(out) > cap:
                    yield _over_cap(budget, path, len(out), compressed)
                    if budget.stopped:
                        return
                    continue
                if out or error is None:
                    yield Part(path, out, depth)
                if error is not None:
                    yield _corrupt(path, label, error)
                    return  # libarchive's state after a failed read is not to be trusted
    except lib.ArchiveError as exc:
        yield _corrupt(part.path, label, exc)


def _read_entry(read: Callable[[int, Any, int], int], archive_p: int,
                cap: int) -> tuple[bytes, BaseException | None]:
    """The current entry's bytes, at most ``cap + 1`` of them, and the error that ended it."""
    out = bytearray()
    buf = ctypes.create_string_buffer(_CHUNK)
    try:
        while len(out) <= cap:
            size = read(archive_p, buf, min(_CHUNK, cap + 1 - len(out)))
            if size < 0:  # ARCHIVE_WARN and ARCHIVE_RETRY come back without an exception
                return bytes(out), OSError(f"read error {size}")
            if size == 0:
                break
            out += buf.raw[:size]
    except Exception as exc:  # libarchive.ArchiveError: a corrupt or unsupported member
        return bytes(out), exc
    return bytes(out), None


def _entry_name(entry: Any) -> str:
    try:
        name = entry.pathname
    except (UnicodeError, ValueError):
        return ""
    if isinstance(name, bytes):
        return name.decode("latin-1")
    return name if isinstance(name, str) else ""


def _corrupt(path: str, label: str, exc: BaseException) -> Problem:
    # ArchiveError's str() carries a pointer value; its msg may be None
    text = getattr(exc, "msg", None) if hasattr(exc, "msg") else str(exc)
    text = text or "unreadable (truncated or damaged)"
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    return Problem(path, ScanStatus.UNKNOWN, f"corrupt {label} archive: {_safe_text(str(text))}")


def decomposers() -> dict[Kind, Callable[[Part, Budget], Children]]:
    """The Kind → decomposer entries for :func:`avgate.content.decompose`: the archive
    formats libarchive reads, UDF (no reader), and ARJ (:mod:`avgate.content.arj`)."""
    from .arj import arj_members

    def bind(kind: Kind) -> Callable[[Part, Budget], Children]:
        return lambda part, budget: libarchive_members(part, budget, kind)

    table = {kind: bind(kind) for kind in (Kind.RAR, *FORMATS, *_NO_READER)}
    table[Kind.ARJ] = arj_members
    return table


# -- RAR 5 encryption ------------------------------------------------------------------------
# libarchive before 3.7 does not report RAR 5 file encryption: it would hand back the
# ciphertext as the member's content, and that would scan clean. The block headers are
# walked here (a few vint reads a block) to find the file headers that carry an encryption
# record. RAR 5 format: signature, then blocks of CRC32, header size, type, flags,
# [extra area size], [data size], type-specific fields, extra area, data.
_RAR5_FILE, _RAR5_ENCRYPTION_HEADER, _RAR5_END = 2, 4, 5
_RAR5_CRYPT_RECORD = 1


class _Rar5Error(Exception):
    pass


def _vint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise _Rar5Error("bad vint")


def rar5_encrypted(data: bytes, max_blocks: int = 1 << 20) -> set[int]:
    """The 1-based ordinals of the RAR 5 file headers that carry an encryption record.

    An encrypted archive header (all headers encrypted) marks every entry: libarchive then
    cannot list the archive and reports it corrupt. Stops quietly at the first block that
    does not parse: libarchive reports the same archive as corrupt.
    """
    found: set[int] = set()
    pos, files = len(_RAR5_MAGIC), 0
    try:
        for _ in range(max_blocks):
            size, fields = _vint(data, pos + 4, min(len(data), pos + 7))
            end = fields + size
            if size == 0 or end > len(data):
                break
            head_type, at = _vint(data, fields, end)
            flags, at = _vint(data, at, end)
            extra_size = data_size = 0
            if flags & 0x1:
                extra_size, at = _vint(data, at, end)
            if flags & 0x2:
                data_size, at = _vint(data, at, end)
            if head_type == _RAR5_ENCRYPTION_HEADER:
                return {0}  # the headers are encrypted: nothing can be listed
            if head_type == _RAR5_FILE:
                files += 1
                if extra_size and _has_crypt_record(data, end - extra_size, end):
                    found.add(files)
            if head_type == _RAR5_END:
                break
            pos = end + data_size
    except _Rar5Error:
        pass
    return found


def _has_crypt_record(data: bytes, pos: int, end: int) -> bool:
    while pos < end:
        size, at = _vint(data, pos, end)
        record_type, _ = _vint(data, at, end)
        if record_type == _RAR5_CRYPT_RECORD:
            return True
        if size == 0:
            return False
        pos = at + size
    return False
