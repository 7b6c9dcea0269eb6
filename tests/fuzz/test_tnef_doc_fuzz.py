"""Fuzz the MS-TNEF reader (avgate.content.tnef): mutated streams and random attributes."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.corpus import EICAR, make_tnef
from tests.fuzz.documents import EXAMPLES, check, mutated

SEEDS = [make_tnef([("eicar.com", EICAR)], b"body"),
         make_tnef([("a.txt", b"a"), ("b.txt", b"b" * 300)]),
         make_tnef([("inner.dat", make_tnef([("eicar.com", EICAR)]))])]
TOKENS = [struct.pack("<I", n) for n in (0, 1, 2, 0xFFFFFFFF, 0x7FFFFFFF, 0x10000)] + [
    struct.pack("<BI", 2, 0x00069002), struct.pack("<BI", 2, 0x00069005),
    struct.pack("<BI", 1, 0x00069003), struct.pack("<I", 0x37010102),
    struct.pack("<I", 0x3701000D), struct.pack("<I", 0x80011003)]
IDS = st.sampled_from([0x00069002, 0x00018010, 0x0006800F, 0x00069005, 0x00069003,
                       0x0002800C]) | st.integers(0, 0xFFFFFFFF)


@st.composite
def attributes(draw: st.DrawFn) -> bytes:
    out = b"\x78\x9f\x3e\x22\x00\x00"
    for _ in range(draw(st.integers(0, 12))):
        body = draw(st.binary(max_size=64) | st.sampled_from(TOKENS))
        length = draw(st.sampled_from([len(body), len(body) + 1, 0xFFFFFFFF]))
        out += struct.pack("<BII", draw(st.integers(0, 3)), draw(IDS), length) + body + b"\0\0"
    return out


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(SEEDS, TOKENS))
def test_mutated_tnef(data: bytes) -> None:
    check(data)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attributes())
def test_random_attributes(data: bytes) -> None:
    check(data)
