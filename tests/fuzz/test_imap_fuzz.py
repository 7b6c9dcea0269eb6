"""Hypothesis fuzzing of the IMAP framing (bounded by AVGATE_FUZZ_EXAMPLES): any bytes give
segments and literal data or an ImapProtocolError, never another exception; literal data
never exceeds what was announced; nothing is buffered past the line limit."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from avgate.protocols import imap as p

EXAMPLES = int(os.environ.get("AVGATE_FUZZ_EXAMPLES", "200"))
MAX_LINE = 256
imap_bytes = st.lists(st.sampled_from([b"{", b"}", b"+", b"~", b"\r\n", b"\n", b"\r", b"1",
                                       b"0", b"99999999999", b"a ", b"* ", b"FETCH", b"x"]),
                      max_size=80).map(b"".join) | st.binary(max_size=300)


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=imap_bytes, sizes=st.lists(st.integers(1, 40), max_size=30), eof=st.booleans())
def test_any_bytes(data: bytes, sizes: list[int], eof: bool) -> None:
    reader = p.Reader(max_line=MAX_LINE, max_literal=1000)
    chunks, pos = [], 0
    for n in sizes:
        chunks.append(data[pos:pos + n])
        pos += n
    chunks.append(data[pos:])
    announced = received = 0
    try:
        for chunk in [c for c in chunks if c] + ([b""] if eof else []):
            reader.receive_data(chunk)
            while (event := reader.next_event()) is not p.NEED_DATA:
                if isinstance(event, p.ConnectionClosed):
                    return
                if isinstance(event, p.Segment):
                    assert len(event.text) <= MAX_LINE + 1
                    if event.literal is not None:
                        assert 0 <= event.literal.size <= 1000
                        announced += event.literal.size
                elif isinstance(event, p.LiteralData):
                    received += len(event.data)
                    assert received <= announced
                p.body_section(getattr(event, "text", b""))
            assert reader.buffered <= max(len(data), MAX_LINE + 1)
    except p.ImapProtocolError as exc:
        assert exc.reply_hint
