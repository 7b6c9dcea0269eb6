"""Hypothesis fuzzing of the sans-IO SMTP DATA codec (bounded by AVGATE_FUZZ_EXAMPLES)."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from avgate.protocols.smtp import DataReceiver, encode_data, normalize_line_endings

EXAMPLES = int(os.environ.get("AVGATE_FUZZ_EXAMPLES", "200"))
# bytes rich in the characters that matter to the DATA phase
smtp_bytes = st.lists(st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"a", b"\x00", b"\xff"]),
                      max_size=60).map(b"".join) | st.binary(max_size=200)


@settings(max_examples=EXAMPLES, deadline=None)
@given(content=smtp_bytes, cuts=st.lists(st.integers(min_value=1, max_value=7), max_size=40))
def test_encode_then_receive_roundtrips(content: bytes, cuts: list[int]) -> None:
    wire = encode_data(content)
    r = DataReceiver(max_line_length=1 << 20, bare_lf="reject")
    out, pos = b"", 0
    for n in [*cuts, len(wire)]:
        out += r.feed(wire[pos:pos + n])
        pos += n
        if r.done:
            break
    out += r.feed(wire[pos:]) if not r.done else b""
    assert r.done and r.problem is None and r.trailing == b""
    expected = normalize_line_endings(content)
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert out == expected
    # the wire form holds exactly one end-of-data marker for every lenient reader
    for marker in (b"\r\n.\r\n", b"\n.\n", b"\n.\r\n", b"\r.\r"):
        idx = (b"\r\n" + wire).find(marker)
        assert idx in (-1, len(wire) + 2 - len(marker))


@settings(max_examples=EXAMPLES, deadline=None)
@given(wire=smtp_bytes, mode=st.sampled_from(["reject", "normalize"]))
def test_receiver_ends_only_at_crlf_dot_crlf(wire: bytes, mode: str) -> None:
    r = DataReceiver(bare_lf=mode, max_size=1000, max_line_length=50)
    out = r.feed(wire)
    ends_at = (b"\r\n" + wire).find(b"\r\n.\r\n")
    assert r.done == (ends_at != -1)
    if r.done:
        assert r.trailing == wire[ends_at + 3:]
    if mode == "normalize" and r.problem is None:
        # normalised content never carries a bare CR or LF
        assert normalize_line_endings(out) == out
