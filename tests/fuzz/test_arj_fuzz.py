"""Fuzz the ARJ reader (avgate.content.arj) with time and memory bounds (tests/fuzz/bounded.py).

ARJ headers carry a CRC-32, so byte mutations mostly stop at "bad header CRC-32": besides
mutated archives, :func:`archives` builds whole archives from drawn fields with valid CRCs
(lying sizes, any method, flags and file type, extended headers, a missing end marker), so
the reader's walk past the CRC check is what gets fuzzed.
"""

from __future__ import annotations

import struct
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avgate.content.arj import ArjError, arj_entries
from tests.corpus import CLEAN_TEXT, EICAR, make_arj
from tests.fuzz.bounded import check
from tests.fuzz.documents import EXAMPLES, mutated

SEEDS = [make_arj([("docs/eicar.com", EICAR)]), make_arj([("a.txt", CLEAN_TEXT)] * 3),
         make_arj([("eicar.com", EICAR)], method=1), make_arj([("x", EICAR)], flags=1)]
TOKENS = [b"\x60\xea", b"\x60\xea\x00\x00", struct.pack("<H", 2600), struct.pack("<H", 0xFFFF)]
SIZES = st.sampled_from([0, 1, 68, 0x7FFFFFFF, 0xFFFFFFFF]) | st.integers(0, 4096)


def header(basic: bytes, extended: list[bytes]) -> bytes:
    """A header with a valid CRC-32 and ``extended`` headers (each with its own CRC)."""
    out = b"\x60\xea" + struct.pack("<H", len(basic)) + basic + struct.pack(
        "<L", zlib.crc32(basic))
    for ext in extended:
        out += struct.pack("<H", len(ext)) + ext + struct.pack("<L", zlib.crc32(ext))
    return out + b"\x00\x00"


@st.composite
def archives(draw: st.DrawFn) -> bytes:
    main = (bytes([30, 11, 1, 2, 0x10, 0, 2, 0]) + struct.pack("<LLLLHH", 0x58210000, 0x58210000,
                                                               0, 0, 0, 0)
            + bytes(2) + b"fuzz.arj\x00\x00")
    out = [header(main, [])]
    for _ in range(draw(st.integers(0, 6))):
        data = draw(st.sampled_from([EICAR, CLEAN_TEXT, b""]) | st.binary(max_size=256))
        first = draw(st.sampled_from([30, 0, 1, 29, 200]))
        basic = (bytes([first, 11, 1, 2, draw(st.integers(0, 255)), draw(st.integers(0, 9)),
                        draw(st.sampled_from([0, 1, 2, 3, 4, 255])), 0])
                 + struct.pack("<LLLL", 0x58210000, draw(SIZES), draw(SIZES),
                               draw(st.sampled_from([zlib.crc32(data), 0])))
                 + struct.pack("<HHH", 0, 0x20, 0)
                 + draw(st.binary(max_size=40).filter(lambda b: b"\0" not in b)) + b"\0\0")
        extended = draw(st.lists(st.binary(max_size=64), max_size=2))
        out += [header(basic[:draw(st.sampled_from([len(basic), 20, 29]))], extended), data]
    if draw(st.booleans()):
        out.append(b"\x60\xea\x00\x00")  # the end marker (absent: a truncated archive)
    return b"".join(out)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(SEEDS, TOKENS))
def test_mutated_arj(data: bytes) -> None:
    check(data)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(archives())
def test_built_arj(data: bytes) -> None:
    check(data)
    try:
        entries = list(arj_entries(data, 50))
    except ArjError:
        return
    assert len(entries) <= 50
    assert all(0 <= e.start <= len(data) + 0xFFFFFFFF for e in entries)
