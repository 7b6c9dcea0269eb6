"""Archive members, extracted in memory under the limits: zip, tar, gzip, bzip2, xz, 7z.

Each ``*_members(part, budget)`` yields the direct members of ``part`` (depth + 1) or a
:class:`Problem`; the caller recurses into members. Sizes are checked on the declared
values first, then every read is capped (``Budget.cap``) so a lying header cannot make us
decompress more than a limit allows. Nothing is ever written to disk.
"""

from __future__ import annotations

import bz2
import io
import lzma
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from typing import Protocol

from ..result import ScanStatus
from . import (
    REASON_FILE_SIZE,
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

_ZIP_AES = 99  # WinZip AES: the member is encrypted whatever the flag bits say


def _corrupt(path: str, exc: BaseException | str) -> Problem:
    text = exc if isinstance(exc, str) else (str(exc).splitlines() or [type(exc).__name__])[0]
    return Problem(path, ScanStatus.UNKNOWN, f"corrupt archive: {text[:200]}")


def _over_cap(budget: Budget, path: str, size: int, compressed: int | None) -> Problem:
    """The Problem for a member that produced more than ``Budget.cap`` allowed."""
    return budget.refuse(path, size, compressed) or Problem(
        path, ScanStatus.SKIPPED, REASON_FILE_SIZE)


# -- zip ------------------------------------------------------------------------------------
def zip_members(part: Part, budget: Budget) -> Children:
    """Members of a zip archive; encrypted members are ``unknown``, never guessed clean."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(part.data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError,
            NotImplementedError) as exc:
        yield _corrupt(part.path, exc)
        return
    depth = part.depth + 1
    with zf:
        for index, info in enumerate(infos, 1):
            if info.is_dir():
                continue
            path = join_path(part.path, sanitize_name(info.filename, f"member{index}"))
            if info.flag_bits & 0x1 or info.compress_type == _ZIP_AES:
                yield Problem(path, ScanStatus.UNKNOWN, "encrypted")
                continue
            # A stored member cannot be a bomb; its "ratio" is meaningless.
            compressed = None if info.compress_type == zipfile.ZIP_STORED else info.compress_size
            problem = budget.refuse(path, info.file_size, compressed)
            if problem is None:
                cap = budget.cap(compressed)
                try:
                    with zf.open(info) as member:
                        data = member.read(cap + 1)
                except NotImplementedError as exc:
                    problem = Problem(path, ScanStatus.UNKNOWN, f"unsupported: {exc}")
                except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError,
                        ValueError, RuntimeError) as exc:
                    problem = _corrupt(path, exc)
                else:
                    if len(data) > cap:
                        problem = _over_cap(budget, path, len(data), compressed)
                    else:
                        yield Part(path, data, depth)
                        continue
            yield problem
            if budget.stopped:
                return


# -- tar ------------------------------------------------------------------------------------
def tar_members(part: Part, budget: Budget) -> Children:
    """Regular files of an (uncompressed) tar archive; links and devices are ignored."""
    try:
        tf = tarfile.open(fileobj=io.BytesIO(part.data), mode="r:")
    except (tarfile.TarError, ValueError, OSError, EOFError) as exc:
        yield _corrupt(part.path, exc)
        return
    depth = part.depth + 1
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
            if not info.isreg():
                continue
            path = join_path(part.path, sanitize_name(info.name, f"member{index}"))
            problem = budget.refuse(path, info.size)
            if problem is None:
                cap = budget.cap()
                try:
                    member = tf.extractfile(info)
                    data = member.read(cap + 1) if member is not None else b""
                except (tarfile.TarError, ValueError, OSError, EOFError) as exc:
                    problem = _corrupt(path, exc)
                else:
                    if len(data) > cap:
                        problem = _over_cap(budget, path, len(data), None)
                    else:
                        yield Part(path, data, depth)
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
             kind: Kind) -> tuple[bytes, str | None]:
    """Decompress ``data`` (concatenated streams included) to at most ``cap + 1`` bytes.

    Returns the output and an error text (truncated / corrupt stream) or None. Output
    longer than ``cap`` means a limit was hit; the caller decides which.
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
            if rest and detect(rest[:16]) is kind:  # concatenated streams (gzip -c a b)
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
class _Overflow(Exception):
    """A 7z member produced more than its cap (defence in depth: py7zr obeys the header)."""


def sevenzip_members(part: Part, budget: Budget) -> Children:
    """Members of a 7z archive, decompressed in memory with py7zr."""
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
    try:
        # max_extract_size bounds everything py7zr decompresses, including members it
        # only decodes to reach a wanted one in a solid block.
        with py7zr.SevenZipFile(io.BytesIO(part.data), mode="r",
                                max_extract_size=max(remaining, 1)) as archive:
            if archive.needs_password():
                yield Problem(part.path, ScanStatus.UNKNOWN, "encrypted")
                return
            infos = [i for i in archive.list() if not i.is_directory]
            declared = sum(i.uncompressed or 0 for i in infos)
            # Solid blocks have no per-member compressed size: judge the archive as a whole.
            if budget.over_ratio(declared, len(part.data)):
                yield Problem(part.path, ScanStatus.SKIPPED, REASON_RATIO)
                return
            wanted: list[str] = []
            for index, info in enumerate(infos, 1):
                path = join_path(part.path, sanitize_name(info.filename, f"member{index}"))
                problem = budget.refuse(path, info.uncompressed or 0)
                if problem is not None:
                    yield problem
                    if budget.stopped:
                        return
                else:
                    wanted.append(info.filename)
            if wanted:
                archive.extract(targets=wanted, factory=factory)
    except py7zr.PasswordRequired:
        yield Problem(part.path, ScanStatus.UNKNOWN, "encrypted")
        return
    except py7zr.DecompressionBombError:
        budget.stopped = True
        yield Problem(part.path, ScanStatus.SKIPPED, REASON_SCAN_SIZE)
        return
    except _Overflow as exc:
        size = int(exc.args[0])
        yield _over_cap(budget, part.path, size, None)
        return
    except Exception as exc:
        yield _corrupt(part.path, exc)
        return
    for index, (filename, writer) in enumerate(factory.products, 1):
        path = join_path(part.path, sanitize_name(filename, f"member{index}"))
        yield Part(path, bytes(writer.buffer), depth)
