"""Streaming ``multipart/form-data`` for ``POST /v1/scan``: every part (file or plain field)
is kept, with bounded memory per request, and handed out one spool at a time.

A part stays in memory while it is small (:data:`PART_MEMORY`) and the request's parts in
memory stay under :data:`REQUEST_PART_MEMORY`; everything else goes to one temp file per
request (one descriptor, however many parts). Part names come from a linear-time
Content-Disposition parser (RFC 2231/5987 extended values decoded).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
import urllib.parse
from typing import IO

from python_multipart.multipart import MultipartParser

from ...gateway import Gateway
from ...spool import Spool

# a part stays in memory up to PART_MEMORY bytes while the request's parts in memory stay
# under REQUEST_PART_MEMORY; everything else goes to one temp file.
PART_MEMORY = 64 * 1024
REQUEST_PART_MEMORY = 1 << 20
MAX_NAME = 1024  # characters of a part's field name / filename kept for the answer and log
# a part's Content-Disposition is parsed up to this many bytes (a 255-byte UTF-8 file name
# percent-encoded is under 800): the names are labels, the content is scanned regardless
MAX_DISPOSITION = 2048

# one parameter: ;name=token or ;name="quoted \"string\"" (an unterminated quote runs to the
# end). Unrolled, unambiguous patterns: one linear pass, whatever the input.
_PARAM = re.compile(r';[ \t]*([^=;\s]+)[ \t]*=[ \t]*(?:"([^"\\]*(?:\\.[^"\\]*)*)"?|([^;]*))')
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)
_CONTINUATION = re.compile(r"^([^*]+)\*(\d{1,3})(\*?)$")


def disposition_params(value: str) -> dict[str, str]:
    """The parameters of a Content-Disposition value, in one linear pass.

    Quoted strings may hold ``;``; the first occurrence of a name wins; RFC 2231/5987
    extended values (``filename*=UTF-8''x.com``, ``filename*0*=...; filename*1=...``) are
    decoded and win over the plain parameter of the same name.
    """
    plain: dict[str, str] = {}
    extended: dict[str, str] = {}
    pieces: dict[str, dict[int, tuple[str, bool]]] = {}
    for m in _PARAM.finditer(value):
        name = m.group(1).lower()
        quoted = m.group(2)
        val = _QUOTED_PAIR.sub(r"\1", quoted) if quoted is not None else m.group(3).strip()
        cont = _CONTINUATION.match(name)
        if cont is not None:
            pieces.setdefault(cont.group(1), {}).setdefault(
                int(cont.group(2)), (val, bool(cont.group(3))))
        elif name.endswith("*"):
            extended.setdefault(name[:-1], _ext_value(val))
        else:
            plain.setdefault(name, val)
    for base, parts in pieces.items():
        if base in extended:
            continue
        joined: list[str] = []
        charset = "utf-8"
        for k in sorted(parts):
            text, encoded = parts[k]
            if encoded:
                if k == 0 and text.count("'") >= 2:
                    charset, _, rest = text.partition("'")
                    text = rest.partition("'")[2]
                joined.append(_pct_decode(text, charset or "utf-8"))
            else:
                joined.append(text)
        extended[base] = "".join(joined)
    return {**plain, **extended}


def _pct_decode(text: str, charset: str) -> str:
    data = urllib.parse.unquote_to_bytes(text)
    try:
        return data.decode(charset, "replace")
    except LookupError:
        return data.decode("utf-8", "replace")


def _ext_value(value: str) -> str:
    """An RFC 5987 ``charset'language'percent-encoded`` value."""
    if value.count("'") < 2:
        return _pct_decode(value, "utf-8")
    charset, _, rest = value.partition("'")
    return _pct_decode(rest.partition("'")[2], charset or "utf-8")


class Part:
    """One part of a multipart body: its names and where its bytes are."""

    __slots__ = ("buf", "content_type", "field", "filename", "offset", "size")

    def __init__(self, field: str, filename: str, content_type: str) -> None:
        self.field = field
        self.filename = filename
        self.content_type = content_type
        self.size = 0
        self.buf: bytearray | None = bytearray()  # None once the bytes are in the temp file
        self.offset = 0  # where they start in the temp file

    @property
    def name(self) -> str:
        """The name to show: the file name, else the form field's name."""
        return self.filename or self.field


class TooManyParts(Exception):
    """More than ``max_parts`` parts in one body (the request is answered 413)."""


class MultipartReceiver:
    """Callbacks for python-multipart's streaming parser: every part (file or field) is kept.

    Memory is bounded per request, not per part: a part stays in memory only while it is
    small (PART_MEMORY) and the request's parts in memory stay under REQUEST_PART_MEMORY;
    everything else is appended to one temp file (one descriptor per request, however many
    parts). The work per part on the event loop is constant: no spool, no scan while
    receiving. More than ``max_parts`` parts raises TooManyParts out of ``write``.
    """

    def __init__(self, boundary: bytes, max_parts: int, spool_dir: str | None) -> None:
        self.parts: list[Part] = []
        self.max_parts = max_parts
        self.ended = False
        self.memory = 0
        self._spool_dir = spool_dir
        self._file: IO[bytes] | None = None
        self._file_end = 0
        self._begun = 0
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._current: Part | None = None
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }, max_header_count=16, max_header_size=8192)

    def write(self, data: bytes) -> None:
        self.parser.write(data)

    def _part_begin(self) -> None:
        self._begun += 1
        if self._begun > self.max_parts:
            raise TooManyParts
        self._headers = {}
        self._current = None

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers.setdefault(self._header_field.decode("latin-1").lower(),
                                 bytes(self._header_value))
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        disposition = self._headers.get("content-disposition", b"")[:MAX_DISPOSITION].decode(
            "utf-8", "replace")
        params = disposition_params(disposition)
        ctype = self._headers.get("content-type", b"").decode("latin-1")
        self._current = Part(params.get("name", "")[:MAX_NAME],
                              params.get("filename", "")[:MAX_NAME], ctype[:MAX_NAME])
        self.parts.append(self._current)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current
        if part is None:  # python-multipart calls headers_finished first; be safe anyway
            return
        n = end - start
        part.size += n
        if part.buf is not None:
            if (len(part.buf) + n <= PART_MEMORY
                    and self.memory + n <= REQUEST_PART_MEMORY):
                part.buf += data[start:end]
                self.memory += n
                return
            self._spill(part)
        assert self._file is not None
        self._file.write(memoryview(data)[start:end])
        self._file_end += n

    def _spill(self, part: Part) -> None:
        """Move a part's bytes from memory to the end of the temp file (it is the last)."""
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="avgate-multipart-",
                                                dir=self._spool_dir)
        assert part.buf is not None
        part.offset = self._file_end
        self._file.write(part.buf)
        self._file_end += len(part.buf)
        self.memory -= len(part.buf)
        part.buf = None

    def _part_end(self) -> None:
        self._current = None

    def _end(self) -> None:
        self.ended = True

    def finish(self) -> None:
        if self._file is not None:
            self._file.flush()

    async def spool(self, part: Part, gateway: Gateway) -> Spool:
        """A spool with the part's bytes (hashed as they are copied into it)."""
        spool = gateway.new_spool()
        try:
            if part.buf is not None:
                spool.write(part.buf)
                part.buf = None
            elif part.size:
                assert self._file is not None
                await asyncio.to_thread(self._copy, spool, self._file.fileno(), part.offset,
                                        part.size)
            return spool.finish()
        except BaseException:
            spool.close()
            raise

    @staticmethod
    def _copy(spool: Spool, fd: int, offset: int, size: int) -> None:
        while size > 0:
            chunk = os.pread(fd, min(size, 1 << 20), offset)
            if not chunk:
                raise OSError("multipart temp file is shorter than expected")
            spool.write(chunk)
            offset += len(chunk)
            size -= len(chunk)

    def close(self) -> None:
        """Drop every part's bytes and the temp file (an unnamed file: nothing to unlink)."""
        for part in self.parts:
            part.buf = None
        self.memory = 0
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
