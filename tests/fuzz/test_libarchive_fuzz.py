"""Fuzz the libarchive reader (avgate.content.libarchive: RAR 4 and 5, CAB, ISO 9660, cpio,
LHA) with time and memory bounds (tests/fuzz/bounded.py: libarchive allocates in C).

Seeds are the corpus builders' archives with small members; mutations add the formats'
own size and offset values. An ISO image is 370 KB, mostly zeros: its mutations go to the
sectors that hold its structures (16 to 33: volume descriptors, path tables, directories).
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avgate.limits import Limits
from tests.corpus import (
    CLEAN_TEXT,
    EICAR,
    MARKER,
    make_cab,
    make_cpio,
    make_iso,
    make_lha,
    make_rar4,
    make_rar5,
)
from tests.fuzz.bounded import check
from tests.fuzz.documents import EXAMPLES, mutated

MEMBERS = [[("docs/eicar.com", EICAR)], [("a.txt", CLEAN_TEXT), ("b/c.txt", b"x " + MARKER)]]
SEEDS = [build(members) for build in (make_rar5, make_rar4, make_cab, make_cpio, make_lha)
         for members in MEMBERS] + [make_rar5(MEMBERS[0], encrypted=True),
                                    make_rar4(MEMBERS[0], encrypted=True)]
TOKENS = [struct.pack("<I", n) for n in (0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF)] + [
    b"Rar!\x1a\x07\x01\x00", b"Rar!\x1a\x07\x00", b"MSCF\0\0\0\0", b"070701", b"070707",
    b"-lh0-", b"-lh5-", b"\xff\xff\xff\xff\x0f",  # a RAR 5 vint at its longest
    b"CD001", b"\x01CD001\x01"]
ISO = make_iso(MEMBERS[0])
ISO_HOT = (16 * 2048, 34 * 2048)  # the sectors holding the image's structures
ISO_LIMITS = Limits(max_scan_size=1024 * 1024, max_file_size=512 * 1024, max_files=25,
                    max_recursion=4, max_ratio=20)


@st.composite
def iso_mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(ISO)
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(*ISO_HOT))
        if draw(st.booleans()):
            data[pos] = draw(st.integers(0, 255))
        else:  # a block number or size (ISO 9660 writes both byte orders) set to extremes
            value = draw(st.sampled_from([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
            data[pos:pos + 8] = struct.pack("<I", value) + struct.pack(">I", value)
    return bytes(data[:len(ISO)])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(SEEDS, TOKENS))
def test_mutated_archives(data: bytes) -> None:
    check(data)


@settings(max_examples=max(EXAMPLES // 4, 10), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(iso_mutated())
def test_mutated_iso(data: bytes) -> None:
    check(data, ISO_LIMITS)
