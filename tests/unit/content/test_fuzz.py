"""Hostile input: random bytes and mutated corpus samples must never make decompose raise."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avgate.content import Part, Problem, decompose
from avgate.limits import Limits
from tests.corpus import corpus

# Small limits, so the fuzzer reaches them and checks they hold.
LIMITS = Limits(max_scan_size=96 * 1024, max_file_size=48 * 1024, max_files=25,
                max_recursion=4)
SEEDS = [s.data for s in corpus() if len(s.data) <= LIMITS.max_file_size]

EXAMPLES = int(os.environ.get("AVGATE_FUZZ_EXAMPLES", "200"))


def check(data: bytes) -> None:
    items = list(decompose(data, LIMITS, "fuzz"))
    assert items, "the root is always reported"
    found = [i for i in items if isinstance(i, Part)]
    assert all(isinstance(i, Part | Problem) for i in items)
    # The catch-all in decompose means a decomposer met an exception it did not expect.
    assert not [i for i in items if isinstance(i, Problem) and i.reason.startswith("cannot")]
    assert sum(len(p.data) for p in found) <= LIMITS.max_scan_size
    assert all(len(p.data) <= LIMITS.max_file_size for p in found)
    assert len(found) - 1 <= LIMITS.max_files
    assert all(p.depth <= LIMITS.max_recursion for p in found)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif action == "insert":
            data[pos:pos] = draw(st.binary(max_size=32))
        else:
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 512))]
    return bytes(data)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    check(data)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([b"PK\x03\x04", b"\x1f\x8b\x08", b"BZh91AY&SY", b"\xfd7zXZ\x00",
                        b"7z\xbc\xaf\x27\x1c", b"From: a@b\r\nContent-Type: multipart/mixed;"
                        b" boundary=x; boundary=y\r\n\r\n--y\r\n"]),
       st.binary(max_size=1024))
def test_magic_followed_by_garbage(magic: bytes, rest: bytes) -> None:
    check(magic + rest)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_corpus(data: bytes) -> None:
    check(data)


def test_regression_nul_in_charset_with_non_ascii_body() -> None:
    # found by test_mutated_corpus: the stdlib's get_payload() lets ValueError("embedded null
    # character") escape for such a charset; the part must still be scanned as sent
    data = (b"From: a@example.org\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=\x00s-ascii\r\x80\r\n\r\n"
            b"caf\xe9 THIS-IS-A-TEST-MALWARE-MARKER\r\n")
    check(data)
    assert any(isinstance(i, Part) and b"THIS-IS-A-TEST-MALWARE-MARKER" in i.data
               for i in decompose(data, LIMITS, "fuzz"))


def test_regression_zip_member_with_an_empty_name() -> None:
    # found by test_mutated_corpus: ZipInfo.is_dir() raises IndexError for an empty name
    import zlib

    from tests.corpus import EICAR, raw_zip

    data = raw_zip([("", 0, 0, zlib.crc32(EICAR), len(EICAR), EICAR)])
    check(data)
    assert any(isinstance(i, Part) and i.data == EICAR for i in decompose(data, LIMITS, "fuzz"))
