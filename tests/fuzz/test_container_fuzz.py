"""Fuzz the issue 20 part B readers: lenient zip, libarchive formats (RAR, CAB, ISO 9660,
cpio, LHA), ARJ, OLE2/VBA and RTF. Mutated corpus samples through ``decompose`` must never
raise past it (no "cannot decompose"), never exceed the limits, and finish in bounded time;
the sans-IO helpers (MS-OVBA decompressor, \\objdata decoder, dir-stream, RAR 5 and ARJ
header walks) take any bytes and stay within their caps."""

from __future__ import annotations

import os
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avgate.content import Part, Problem, decompose
from avgate.content.arj import ArjError, arj_entries
from avgate.content.libarchive import rar5_encrypted
from avgate.content.office import VbaError, decompress_vba, objdata_bytes, vba_modules
from avgate.limits import Limits
from tests.corpus import container_samples, ovba_compress

EXAMPLES = int(os.environ.get("AVGATE_FUZZ_EXAMPLES", "200"))
LIMITS = Limits(max_scan_size=512 * 1024, max_file_size=256 * 1024, max_files=25,
                max_recursion=4)
# the ISO images are 370 KB of mostly zeros: mutations there find little; the rest are small
SEEDS = [s.data for s in container_samples() if len(s.data) <= 64 * 1024]
SLOW = 5.0  # seconds for one sample, on a loaded 2-core machine


def check(data: bytes) -> None:
    start = time.perf_counter()
    items = list(decompose(data, LIMITS, "fuzz"))
    assert time.perf_counter() - start < SLOW
    found = [i for i in items if isinstance(i, Part)]
    assert all(isinstance(i, Part | Problem) for i in items)
    assert not [i for i in items if isinstance(i, Problem) and i.reason.startswith("cannot")]
    assert sum(len(p.data) for p in found) <= LIMITS.max_scan_size
    assert all(len(p.data) <= LIMITS.max_file_size for p in found)
    assert len(found) - 1 <= LIMITS.max_files


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "dup", "u32"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif action == "insert":
            data[pos:pos] = draw(st.binary(max_size=32))
        elif action == "dup":
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 256))]
        else:  # a size or offset field set to something extreme
            value = draw(st.sampled_from([0, 1, 0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFF]))
            data[pos:pos + 4] = value.to_bytes(4, "little")
    return bytes(data)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_containers(data: bytes) -> None:
    check(data)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=4096), st.integers(0, 8192))
def test_ovba_decompressor_any_bytes(data: bytes, cap: int) -> None:
    for blob in (data, b"\x01" + data):
        try:
            out = decompress_vba(blob, cap)
        except VbaError:
            continue
        assert len(out) <= cap + 1


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=2048))
def test_ovba_round_trip(text: bytes) -> None:
    assert decompress_vba(ovba_compress(text), len(text) + 10) == text


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=2048), st.integers(0, 4096))
def test_objdata_decoder_any_bytes(data: bytes, cap: int) -> None:
    out, end = objdata_bytes(data, 0, cap)
    assert len(out) <= cap + 1
    if b"\\bin" not in data:  # \binN may skip past the end (nothing is read there)
        assert 0 <= end <= len(data)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=2048))
def test_header_walkers_any_bytes(data: bytes) -> None:
    vba_modules(data)
    assert all(i >= 0 for i in rar5_encrypted(b"Rar!\x1a\x07\x01\x00" + data))
    for blob in (data, b"\x60\xea" + data):
        try:
            entries = list(arj_entries(blob, 50))
        except ArjError:
            continue
        assert len(entries) <= 50
