"""Spool: content received from a client, in memory up to a threshold, then in a temp file.

Every front-end streams what it receives into a :class:`Spool`; the sha256 and size are
computed on the way in, so nobody reads the object twice for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from .errors import SpoolError
from .limits import DEFAULT_SPOOL_MEMORY


class _PreadFile:
    """``read()`` through a descriptor with ``pread``, from offset 0, leaving its offset."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0

    def read(self, size: int) -> bytes:
        data = os.pread(self.fd, size, self.pos)
        self.pos += len(data)
        return data


class Spool:
    """A write-once byte container. ``write`` while receiving, then ``finish``, then read."""

    def __init__(self, memory_limit: int = DEFAULT_SPOOL_MEMORY, directory: str | None = None):
        self._memory_limit = memory_limit
        self._directory = directory
        self._buf: io.BytesIO | None = io.BytesIO()
        self._file: BinaryIO | None = None
        self._path: str | None = None
        self._hash = hashlib.sha256()
        self._size = 0
        self._sha256: str | None = None
        #: a snapshot that stopped at max_size + 1 bytes: the object is larger than that
        self.truncated = False

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, data: bytes) -> Spool:
        s = cls(memory_limit=max(len(data), 1))
        s.write(data)
        s.finish()
        return s

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], *, max_size: int | None = None,
                  memory_limit: int = DEFAULT_SPOOL_MEMORY,
                  directory: str | None = None) -> Spool:
        """Snapshot a file: read it once into a new spool, hashing as it is read.

        The file is read exactly once, so what was hashed is what every engine scans even if
        someone rewrites the file meanwhile (a path is never read twice across a trust
        boundary). ``max_size``: stop after ``max_size + 1`` bytes; the spool is then
        ``truncated`` and its size says only that the file is over the limit.
        """
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise SpoolError(f"cannot read {os.fspath(path)}: {exc.strerror}") from exc
        with f:
            return cls.from_file(f, max_size=max_size, memory_limit=memory_limit,
                                 directory=directory, label=os.fspath(path))

    @classmethod
    def from_fd(cls, fd: int, *, max_size: int | None = None,
                memory_limit: int = DEFAULT_SPOOL_MEMORY, directory: str | None = None,
                label: str = "") -> Spool:
        """Snapshot what can be read through an open descriptor (FILDES); ``fd`` stays open.

        Reads with ``pread`` from offset 0, as clamd does: the whole file, and the client's
        file offset is neither used nor moved. Only the descriptor's own rights apply: an
        O_PATH or write-only descriptor cannot be read (``SpoolError``), and nothing is
        reopened with avgate's own credentials.
        """
        return cls.from_file(_PreadFile(fd), max_size=max_size, memory_limit=memory_limit,
                             directory=directory, label=label or f"descriptor {fd}")

    @classmethod
    def from_file(cls, f: BinaryIO | _PreadFile, *, max_size: int | None = None,
                  memory_limit: int = DEFAULT_SPOOL_MEMORY, directory: str | None = None,
                  label: str = "") -> Spool:
        """Copy a readable file object into a new spool (see :meth:`from_path`)."""
        s = cls(memory_limit=memory_limit, directory=directory)
        budget = None if max_size is None else max_size + 1
        try:
            while budget is None or budget > 0:
                chunk = f.read(1 << 20 if budget is None else min(1 << 20, budget))
                if not chunk:
                    break
                s.write(chunk)
                if budget is not None:
                    budget -= len(chunk)
        except OSError as exc:
            s.close()
            raise SpoolError(f"cannot read {label or 'file'}: {exc.strerror or exc}") from exc
        except SpoolError:
            s.close()
            raise
        s.truncated = budget is not None and budget <= 0
        return s.finish()

    # -- writing ------------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._sha256 is not None:
            raise SpoolError("spool already finished")
        self._hash.update(data)
        self._size += len(data)
        try:
            if self._buf is not None:
                self._buf.write(data)
                if self._buf.tell() > self._memory_limit:
                    self._to_file()
            else:
                assert self._file is not None
                self._file.write(data)
        except OSError as exc:
            raise SpoolError(f"cannot spool content: {exc.strerror or exc}") from exc

    def _to_file(self) -> None:
        assert self._buf is not None
        fd, path = tempfile.mkstemp(prefix="avgate-spool-", dir=self._directory)
        self._path = path
        self._file = os.fdopen(fd, "w+b")
        self._file.write(self._buf.getbuffer())
        self._buf = None

    def finish(self) -> Spool:
        if self._sha256 is None:
            self._sha256 = self._hash.hexdigest()
            if self._file is not None:
                try:
                    self._file.flush()
                except OSError as exc:
                    raise SpoolError(f"cannot spool content: {exc.strerror}") from exc
        return self

    # -- reading ------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            raise SpoolError("spool not finished")
        return self._sha256

    @property
    def in_memory(self) -> bool:
        return self._buf is not None

    def getvalue(self) -> bytes:
        """The whole content as bytes (reads the file if spooled to disk)."""
        if self._buf is not None:
            return self._buf.getvalue()
        with self.open() as f:
            return f.read()

    def getbuffer(self) -> memoryview | bytes:
        if self._buf is not None:
            return self._buf.getbuffer()
        return self.getvalue()

    def open(self) -> BinaryIO:
        """A new independent reader positioned at the start."""
        if self._buf is not None:
            return io.BytesIO(self._buf.getvalue())
        assert self._path is not None
        return open(self._path, "rb")

    def chunks(self, size: int = 1 << 16) -> Iterator[bytes]:
        with self.open() as f:
            while chunk := f.read(size):
                yield chunk

    def reopen_fd(self) -> int | None:
        """A new read-only descriptor of the spool's own file — the same inode that was
        written and hashed, with its own offset (opened through /proc/self/fd, never by
        name) — or None for a spool in memory. The caller closes it."""
        if self._file is None:
            return None
        self._file.flush()
        return os.open(f"/proc/self/fd/{self._file.fileno()}", os.O_RDONLY | os.O_CLOEXEC)

    def path(self) -> str:
        """A filesystem path holding the content (moves memory content to a temp file)."""
        if self._path is None:
            assert self._buf is not None
            self._to_file()
            assert self._file is not None
            self._file.flush()
        assert self._path is not None
        return self._path

    def close(self) -> None:
        """Release the content; never raises (a full disk may fail the final flush)."""
        try:
            if self._file is not None:
                f, self._file = self._file, None
                with contextlib.suppress(OSError):
                    f.close()
        finally:
            if self._path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self._path)
            self._path = None
            self._buf = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._path is not None:
            try:
                os.unlink(self._path)
            except OSError:
                pass
