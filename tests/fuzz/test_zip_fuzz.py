"""Fuzz the lenient zip path (avgate.content.archives: members read from the central
directory and from every local header) with time and memory bounds (tests/fuzz/bounded.py:
zlib, bz2 and lzma inflate outside tracemalloc's view).

Besides mutated corpus zips, :func:`zips` builds archives byte by byte from drawn fields
(``tests.corpus.raw_zip``): any method, flags, CRC and declared size over real or junk
data, so the local-header walk, the data-descriptor search and the inflaters' caps are
reached with consistent framing.
"""

from __future__ import annotations

import struct
import zipfile
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.corpus import (
    CLEAN_TEXT,
    EICAR,
    make_zip,
    raw_zip,
    zip_corrupt_extra,
    zip_duplicate_names,
    zip_local_only,
    zip_method_mismatch,
    zip_streamed,
)
from tests.fuzz.bounded import check
from tests.fuzz.documents import EXAMPLES, mutated

SEEDS = [zip_local_only("eicar.com", EICAR), zip_method_mismatch("eicar.com", EICAR),
         zip_corrupt_extra("eicar.com", EICAR), zip_streamed("eicar.com", EICAR),
         zip_duplicate_names(EICAR), make_zip([("a.txt", CLEAN_TEXT), ("eicar.com", EICAR)]),
         make_zip([("inner.zip", make_zip([("eicar.com", EICAR)]))], zipfile.ZIP_STORED)]
TOKENS = [b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x07\x08", b"PK\x06\x06",
          b"PK\x06\x07"] + [struct.pack("<I", n) for n in (0, 1, 0xFFFFFFFF, 0x7FFFFFFF)] + [
    struct.pack("<H", n) for n in (0, 8, 12, 14, 99, 0xFFFF)]


def _payload(method: int, data: bytes) -> bytes:
    if method == zipfile.ZIP_DEFLATED:
        raw = zlib.compressobj(6, zlib.DEFLATED, -15)
        return raw.compress(data) + raw.flush()
    return data


@st.composite
def zips(draw: st.DrawFn) -> bytes:
    entries = []
    for _ in range(draw(st.integers(1, 5))):
        data = draw(st.sampled_from([EICAR, CLEAN_TEXT, bytes(5000)]) | st.binary(max_size=200))
        method = draw(st.sampled_from([0, 8, 12, 14, 99]))
        stored = draw(st.sampled_from([_payload(method, data), data, data[:10], b""]))
        size = draw(st.sampled_from([len(data), 0, 1, 0xFFFFFFFF]) | st.integers(0, 1 << 20))
        crc = draw(st.sampled_from([zlib.crc32(data), 0]))
        flags = draw(st.sampled_from([0, 1, 8, 0x800, 0x41]))
        name = draw(st.sampled_from(["a.txt", "../x", "", "d/", "eicar.com"]))
        entries.append((name, method, flags, crc, size, stored))
    data = raw_zip(entries)
    cut = draw(st.sampled_from([len(data), len(data) - 22, len(data) // 2]))
    return data[:cut]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(SEEDS, TOKENS))
def test_mutated_zips(data: bytes) -> None:
    check(data)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(zips())
def test_built_zips(data: bytes) -> None:
    check(data)
