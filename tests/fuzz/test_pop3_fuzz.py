"""Hypothesis fuzzing of the sans-IO POP3 codec (bounded by AVGATE_FUZZ_EXAMPLES): any bytes
from either peer give events or a Pop3ProtocolError, never another exception, never a
buffer past the line limit, and the body the proxy scans is the body it sends on."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from avgate.protocols import pop3 as p

EXAMPLES = int(os.environ.get("AVGATE_FUZZ_EXAMPLES", "200"))
MAX_LINE = 600
# bytes rich in what matters to POP3 framing
pop3_bytes = st.lists(st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"+OK", b"-ERR", b" ",
                                       b"+ ", b"a", b"\x00", b"\xff", b".\r\n"]),
                      max_size=80).map(b"".join) | st.binary(max_size=300)
cuts = st.lists(st.integers(min_value=1, max_value=40), max_size=30)


def pieces(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos = [], 0
    for n in sizes:
        out.append(data[pos:pos + n])
        pos += n
    out.append(data[pos:])
    return [piece for piece in out if piece]  # b"" would mean the peer closed


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=pop3_bytes, sizes=cuts, kinds=st.lists(st.sampled_from(list(p.Kind)), min_size=1,
                                                  max_size=5), eof=st.booleans())
def test_server_bytes(data: bytes, sizes: list[int], kinds: list[p.Kind], eof: bool) -> None:
    reader = p.ResponseReader(max_line=MAX_LINE, max_sasl_line=MAX_LINE)
    pending = list(kinds)
    body = b""
    try:
        for chunk in [*pieces(data, sizes), *([b""] if eof else [])]:
            reader.receive_data(chunk)
            while True:
                if reader.idle and pending:
                    reader.expect(pending.pop(0))
                event = reader.next_event()
                if event is p.NEED_DATA:
                    break
                assert isinstance(event, p.StatusLine | p.Continuation | p.Data | p.EndOfData
                                  | p.ConnectionClosed)
                if isinstance(event, p.Data):
                    body += event.data
                if isinstance(event, p.ConnectionClosed):
                    return
                if reader.idle and not pending:
                    break
            assert reader.buffered <= len(data)
    except p.Pop3ProtocolError as exc:
        assert str(exc.reply_hint).startswith("-ERR ")
    assert len(body) <= len(data)


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=pop3_bytes, sizes=cuts, sasl=st.booleans())
def test_client_bytes(data: bytes, sizes: list[int], sasl: bool) -> None:
    reader = p.CommandReader(max_line=MAX_LINE, max_sasl_line=MAX_LINE)
    reader.sasl = sasl
    try:
        for chunk in pieces(data, sizes):
            reader.receive_data(chunk)
            while (event := reader.next_event()) is not p.NEED_DATA:
                if isinstance(event, p.Command):
                    # what goes to the server is one clean line
                    assert event.line.endswith(b"\r\n") and event.line.count(b"\n") == 1
                    assert b"\0" not in event.line and event.line.count(b"\r") == 1
                    p.response_kind(event)
                    repr(event)
                elif isinstance(event, p.SaslLine):
                    assert event.line.endswith(b"\r\n") and event.line.count(b"\n") == 1
                else:
                    raise AssertionError(f"no ConnectionClosed before EOF: {event!r}")
            assert reader.buffered <= MAX_LINE
    except p.Pop3ProtocolError as exc:
        assert str(exc.reply_hint).startswith("-ERR ")


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=pop3_bytes, sizes=cuts)
def test_body_scanned_is_body_sent(data: bytes, sizes: list[int]) -> None:
    """Whatever the server sends as a body, re-stuffing what was read and reading it again
    gives the same bytes: a client reads exactly what was scanned."""
    reader = p.ResponseReader()
    reader.receive_data(b"+OK\r\n")
    reader.next_event()
    reader.expect(p.Kind.MULTI)
    reader.receive_data(b"+OK\r\n")
    assert isinstance(reader.next_event(), p.StatusLine)
    body, ended = b"", False
    for chunk in pieces(data + b"\r\n.\r\n", sizes):
        reader.receive_data(chunk)
        while (event := reader.next_event()) is not p.NEED_DATA:
            if isinstance(event, p.Data):
                body += event.data
            elif isinstance(event, p.EndOfData):
                ended = True
                break
        if ended:
            break
    assert ended
    again = p.ResponseReader()
    again.receive_data(b"+OK\r\n")
    again.next_event()
    again.expect(p.Kind.MULTI)
    again.receive_data(b"+OK\r\n" + p.stuff(body))
    assert isinstance(again.next_event(), p.StatusLine)
    reread = b""
    while not isinstance(event := again.next_event(), p.EndOfData):
        assert isinstance(event, p.Data)
        reread += event.data
    assert reread == body and again.buffered == 0
