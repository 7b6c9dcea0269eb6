"""POP3 codec: commands, status lines, multi-line bodies split anywhere, SASL, limits, CAPA."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avgate.errors import ProtocolError
from avgate.protocols import pop3 as p


def client_events(data: bytes, *, sasl: bool = False, **kw: int) -> list[object]:
    reader = p.CommandReader(**kw)
    reader.sasl = sasl
    reader.receive_data(data)
    out: list[object] = []
    while (event := reader.next_event()) is not p.NEED_DATA:
        out.append(event)
        if isinstance(event, p.ConnectionClosed):
            break
    return out


def response(chunks: list[bytes], kind: p.Kind = p.Kind.MULTI,
             reader: p.ResponseReader | None = None) -> tuple[list[object], bytes]:
    """Events of one response after a ``+OK`` greeting, fed in ``chunks``; the body joined."""
    if reader is None:
        reader = p.ResponseReader()
        reader.receive_data(b"+OK ready\r\n")
        assert reader.next_event() == p.StatusLine(True, b"ready", b"+OK ready\r\n")
    reader.expect(kind)
    events: list[object] = []
    body = b""
    for chunk in chunks:
        reader.receive_data(chunk)
        while (event := reader.next_event()) is not p.NEED_DATA:
            if isinstance(event, p.Data):
                body += event.data
            else:
                events.append(event)
            if isinstance(event, p.EndOfData | p.ConnectionClosed):
                return events, body
            if isinstance(event, p.StatusLine) and (kind is not p.Kind.MULTI or not event.ok):
                return events, body
    return events, body


# -- client side ---------------------------------------------------------------------------------
def test_commands_upper_cased_and_sent_on_with_crlf() -> None:
    events = client_events(b"user tester\r\nretr 1\nQUIT\r\n")
    assert [(e.verb, e.args, e.line) for e in events if isinstance(e, p.Command)] == [
        ("USER", b"tester", b"user tester\r\n"), ("RETR", b"1", b"retr 1\r\n"),
        ("QUIT", b"", b"QUIT\r\n")]


def test_credentials_never_in_repr() -> None:
    [user, password, apop, auth] = client_events(
        b"USER alice\r\nPASS hunter2\r\nAPOP alice 0123abcd\r\nAUTH PLAIN AGFsaWNlAGh1bnRlcjI=\r\n")
    for event in (user, password, apop, auth):
        assert "alice" not in repr(event) and "hunter2" not in repr(event)
    [answer] = client_events(b"AGFsaWNlAGh1bnRlcjI=\r\n", sasl=True)
    assert isinstance(answer, p.SaslLine) and "AGFs" not in repr(answer)


@pytest.mark.parametrize("line", [b"US\0ER x\r\n", b"USER a\rb\r\n", b"\xffUSER\r\n",
                                  b" USER x\r\n", b"\r\n"])
def test_malformed_command_refused(line: bytes) -> None:
    with pytest.raises(p.Pop3ProtocolError) as info:
        client_events(line)
    assert isinstance(info.value, ProtocolError)
    assert str(info.value.reply_hint).startswith("-ERR ")


def test_command_line_limit_without_newline() -> None:
    reader = p.CommandReader(max_line=512)
    reader.receive_data(b"A" * 512)
    assert reader.next_event() is p.NEED_DATA  # still within the limit
    reader.receive_data(b"A")
    with pytest.raises(p.Pop3ProtocolError, match="longer than 512"):
        reader.next_event()


def test_sasl_lines_have_their_own_limit() -> None:
    [answer] = client_events(b"A" * 10_000 + b"\r\n", sasl=True)
    assert isinstance(answer, p.SaslLine) and len(answer.line) == 10_002
    with pytest.raises(p.Pop3ProtocolError):
        client_events(b"A" * 10_000 + b"\r\n")


def test_client_eof_with_partial_line() -> None:
    assert client_events(b"RET") == []  # waiting
    reader = p.CommandReader()
    reader.receive_data(b"RET")
    reader.receive_data(b"")
    assert reader.next_event() == p.ConnectionClosed(3)


def test_buffered_counts_what_follows_a_command() -> None:
    reader = p.CommandReader()
    reader.receive_data(b"STLS\r\nUSER evil\r\n")
    assert isinstance(reader.next_event(), p.Command)
    assert reader.buffered == len(b"USER evil\r\n")


@pytest.mark.parametrize(("line", "kind"), [
    (b"USER x", p.Kind.SINGLE), (b"PASS x", p.Kind.SINGLE), (b"STAT", p.Kind.SINGLE),
    (b"LIST", p.Kind.MULTI), (b"LIST 1", p.Kind.SINGLE), (b"UIDL", p.Kind.MULTI),
    (b"UIDL 3", p.Kind.SINGLE), (b"RETR 1", p.Kind.MULTI), (b"TOP 1 0", p.Kind.MULTI),
    (b"CAPA", p.Kind.MULTI), (b"AUTH", p.Kind.MULTI), (b"AUTH PLAIN", p.Kind.SASL),
    (b"STLS", p.Kind.SINGLE), (b"QUIT", p.Kind.SINGLE), (b"XTND XMIT", None),
    (b"LANG", p.Kind.MULTI), (b"LANG en", p.Kind.SINGLE),
])
def test_response_kind(line: bytes, kind: p.Kind | None) -> None:
    [cmd] = client_events(line + b"\r\n")
    assert isinstance(cmd, p.Command)
    assert p.response_kind(cmd) is kind


# -- server side --------------------------------------------------------------------------------
WIRE_BODY = (b"From: a@example.test\r\nSubject: dots\r\n\r\n..leading dot\r\n...\r\n"
             b"middle . dot\r\n..\r\nlast\r\n")
BODY = (b"From: a@example.test\r\nSubject: dots\r\n\r\n.leading dot\r\n..\r\n"
        b"middle . dot\r\n.\r\nlast\r\n")


def test_multiline_unstuffed_and_restuffed_identically() -> None:
    events, body = response([b"+OK 99 octets\r\n" + WIRE_BODY + b".\r\n"])
    assert events == [p.StatusLine(True, b"99 octets", b"+OK 99 octets\r\n"), p.EndOfData()]
    assert body == BODY
    assert p.stuff(body) == WIRE_BODY + b".\r\n"


def test_multiline_split_at_every_byte() -> None:
    wire = b"+OK\r\n" + WIRE_BODY + b".\r\n"
    for cut in range(1, len(wire)):
        events, body = response([wire[:cut], wire[cut:]])
        assert body == BODY and events[-1] == p.EndOfData(), cut
    events, body = response([bytes([b]) for b in wire])
    assert body == BODY and events[-1] == p.EndOfData()


def test_bare_lf_terminator_ends_the_body() -> None:
    # poplib (and others) end the body at ".\n" too: what we scan is what they read
    events, body = response([b"+OK\r\nline\n.\nextra"])
    assert body == b"line\n" and events[-1] == p.EndOfData()


def test_err_has_no_body() -> None:
    events, body = response([b"-ERR no such message\r\n"])
    assert events == [p.StatusLine(False, b"no such message", b"-ERR no such message\r\n")]
    assert body == b""


def test_single_line_responses_and_status_case() -> None:
    events, _ = response([b"+ok fine\r\n"], kind=p.Kind.SINGLE)
    assert events == [p.StatusLine(True, b"fine", b"+ok fine\r\n")]


@pytest.mark.parametrize("line", [b"OK\r\n", b"+OKAY\r\n", b"* 1 EXISTS\r\n", b"+ go\r\n"])
def test_not_a_status_line(line: bytes) -> None:
    with pytest.raises(p.Pop3ProtocolError):
        response([line], kind=p.Kind.SINGLE)


def test_sasl_continuations_then_status() -> None:
    reader2 = p.ResponseReader()
    reader2.receive_data(b"+OK\r\n")
    reader2.next_event()
    reader2.expect(p.Kind.SASL)
    reader2.receive_data(b"+ dGVzdA==\r\n+\r\n")
    assert reader2.next_event() == p.Continuation(b"+ dGVzdA==\r\n")
    assert reader2.next_event() == p.Continuation(b"+\r\n")  # the exchange goes on
    assert not reader2.idle
    reader2.receive_data(b"+OK Logged in.\r\n")
    assert reader2.next_event() == p.StatusLine(True, b"Logged in.", b"+OK Logged in.\r\n")


def test_unsolicited_server_data_is_an_error() -> None:
    reader = p.ResponseReader()
    reader.receive_data(b"+OK\r\n+OK extra\r\n")
    reader.next_event()
    with pytest.raises(p.Pop3ProtocolError, match="nobody asked"):
        reader.next_event()


def test_expect_before_the_previous_response_ended() -> None:
    reader = p.ResponseReader()
    with pytest.raises(RuntimeError):
        reader.expect(p.Kind.SINGLE)  # the greeting is still expected


def test_status_line_limit() -> None:
    reader = p.ResponseReader(max_line=600)
    reader.receive_data(b"+OK " + b"x" * 700)
    with pytest.raises(p.Pop3ProtocolError, match="longer than 600"):
        reader.next_event()


def test_body_lines_have_no_length_limit() -> None:
    long_line = b"x" * 1_000_000 + b"\r\n"
    events, body = response([b"+OK\r\n", long_line[:300_000], long_line[300_000:], b".\r\n"])
    assert body == long_line and events[-1] == p.EndOfData()


def test_server_eof_inside_the_body() -> None:
    reader = p.ResponseReader()
    reader.receive_data(b"+OK\r\n")
    reader.next_event()
    events, body = response([b"+OK\r\npartial\r\n.", b""], reader=reader)
    assert events[-1] == p.ConnectionClosed(1)
    assert body == b"partial\r\n"


def test_server_eof_while_idle_and_in_a_status_line() -> None:
    reader = p.ResponseReader()
    reader.receive_data(b"+OK\r\n")
    reader.next_event()
    reader.receive_data(b"")
    assert isinstance(reader.next_event(), p.ConnectionClosed)
    reader = p.ResponseReader()
    reader.receive_data(b"+OK rea")
    reader.receive_data(b"")
    assert reader.next_event() == p.ConnectionClosed(7)


def test_next_response_after_a_body() -> None:
    reader = p.ResponseReader()
    reader.receive_data(b"+OK\r\n")
    reader.next_event()
    _, body = response([b"+OK\r\na\r\n.\r\n"], reader=reader)
    assert body == b"a\r\n" and reader.idle
    events, _ = response([b"+OK bye\r\n"], kind=p.Kind.SINGLE, reader=reader)
    assert events == [p.StatusLine(True, b"bye", b"+OK bye\r\n")]


# -- encoding ------------------------------------------------------------------------------------
def test_dot_stuffer_across_pieces_and_missing_final_newline() -> None:
    s = p.DotStuffer()
    assert s.feed(b"a\r\n") + s.feed(b".b\r\n.") + s.feed(b"c") + s.finish() == \
        b"a\r\n..b\r\n..c\r\n.\r\n"
    assert p.stuff(b"") == b".\r\n"


def test_status_line_is_one_line() -> None:
    assert p.status_line(False, "bad\r\nUSER x") == b"-ERR bad USER x\r\n"


@given(st.lists(st.sampled_from([b".", b"..", b"\r\n", b"\n", b"x", b"\r", b" ", b".\r\n"]),
                max_size=40).map(b"".join),
       st.lists(st.integers(1, 50), min_size=1, max_size=10))
@settings(max_examples=100, deadline=None)
def test_roundtrip_any_body_any_split(body: bytes, cuts: list[int]) -> None:
    """stuff(body) parsed back gives body, however the wire is cut (bodies ending without a
    newline get one: a POP3 body is whole lines)."""
    wire = b"+OK\r\n" + p.stuff(body)
    chunks, pos = [], 0
    for n in cuts:
        chunks.append(wire[pos:pos + n])
        pos += n
    chunks.append(wire[pos:])
    events, parsed = response(chunks)
    assert events[-1] == p.EndOfData()
    expected = body if body.endswith(b"\n") or not body else body + b"\r\n"
    assert parsed == expected
    assert p.stuff(parsed) == wire[5:]  # a conforming body comes back byte-identical


# -- CAPA ----------------------------------------------------------------------------------------
def test_filter_capabilities() -> None:
    body = (b"CAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nSTLS\r\n"
            b"USER\r\nSASL PLAIN LOGIN\r\nXFANCY 1\r\n")
    assert p.filter_capabilities(body, stls=False) == (
        b"CAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nUSER\r\n"
        b"SASL PLAIN LOGIN\r\n")
    assert p.filter_capabilities(body, stls=True).endswith(b"SASL PLAIN LOGIN\r\nSTLS\r\n")
    assert p.capability_names(body.splitlines()) >= {"STLS", "SASL", "XFANCY"}
