"""clamd codec: byte fixtures in both directions, session ids, limits, malformed input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avgate.errors import ProtocolError
from avgate.protocols import clamd as p
from avgate.protocols.clamd import (
    NEED_DATA,
    ClamdProtocolError,
    Command,
    ConnectionClosed,
    InstreamChunk,
    InstreamEnd,
    Prefix,
    ReplyKind,
    ServerParser,
)

# -- client side: encoding ----------------------------------------------------------------

COMMANDS = [
    (("INSTREAM", "", Prefix.Z), b"zINSTREAM\0"),
    (("PING", "", Prefix.Z), b"zPING\0"),
    (("VERSION", "", Prefix.Z), b"zVERSION\0"),
    (("IDSESSION", "", Prefix.Z), b"zIDSESSION\0"),
    (("END", "", Prefix.Z), b"zEND\0"),
    (("PING", "", Prefix.N), b"nPING\n"),
    (("PING", "", Prefix.LEGACY), b"PING\n"),
    (("SCAN", "/tmp/a b", Prefix.Z), b"zSCAN /tmp/a b\0"),
    (("CONTSCAN", "/x", Prefix.N), b"nCONTSCAN /x\n"),
]


@pytest.mark.parametrize(("args", "wire"), COMMANDS)
def test_encode_command(args: tuple[str, str, Prefix], wire: bytes) -> None:
    assert p.encode_command(*args) == wire


@pytest.mark.parametrize(("args", "wire"), COMMANDS)
def test_server_parses_what_the_client_encodes(args: tuple[str, str, Prefix],
                                               wire: bytes) -> None:
    parser = ServerParser()
    parser.receive_data(wire)
    assert parser.next_event() == Command(args[0], args[2], args[1],
                                          session_id=None)


def test_encode_command_refuses_unknown_and_embedded_terminators() -> None:
    with pytest.raises(ValueError):
        p.encode_command("FROB")
    with pytest.raises(ValueError):
        p.encode_command("SCAN", "/tmp/a\nzSHUTDOWN", Prefix.N)
    with pytest.raises(ValueError):
        p.encode_command("SCAN", "/tmp/a\0", Prefix.Z)


def test_chunk_framing() -> None:
    assert p.chunk_header(5) == b"\0\0\0\x05"
    assert p.encode_chunk(b"hello") == b"\0\0\0\x05hello"
    assert p.chunk_header(0x01020304) == b"\x01\x02\x03\x04"
    assert p.INSTREAM_END == b"\0\0\0\0"
    with pytest.raises(ValueError):
        p.encode_chunk(b"")


# -- client side: replies -----------------------------------------------------------------

REPLIES = [
    (b"stream: OK\0", ReplyKind.OK, {"path": "stream"}),
    (b"stream: Eicar-Test-Signature.UNOFFICIAL FOUND\0", ReplyKind.FOUND,
     {"path": "stream", "virus": "Eicar-Test-Signature.UNOFFICIAL"}),
    (b"/tmp/a: b: Win.Test-1 FOUND\n", ReplyKind.FOUND,
     {"path": "/tmp/a: b", "virus": "Win.Test-1"}),
    (b"/tmp/x: OK\n", ReplyKind.OK, {"path": "/tmp/x"}),
    (b"INSTREAM size limit exceeded. ERROR\0", ReplyKind.ERROR,
     {"path": "", "message": "INSTREAM size limit exceeded."}),
    (b"/nonexist: File path check failure: No such file or directory. ERROR\n", ReplyKind.ERROR,
     {"path": "/nonexist", "message": "File path check failure: No such file or directory."}),
    (b"PONG\0", ReplyKind.PONG, {}),
    (b"ClamAV 1.4.6\0", ReplyKind.VERSION, {}),
    (b"UNKNOWN COMMAND\0", ReplyKind.OTHER, {}),
    (b"\x00garbage\xff", ReplyKind.OTHER, {}),
    # a name with a space cannot be a signature: not a FOUND reply
    (b"stream: two words FOUND\0", ReplyKind.OTHER, {}),
]


@pytest.mark.parametrize(("wire", "kind", "fields"), REPLIES)
def test_parse_reply(wire: bytes, kind: ReplyKind, fields: dict[str, str]) -> None:
    reply = p.parse_reply(wire)
    assert reply.kind is kind
    for name, value in fields.items():
        assert getattr(reply, name) == value
    assert reply.session_id is None


def test_size_limit_reply_is_recognised() -> None:
    assert p.parse_reply(b"INSTREAM size limit exceeded. ERROR\0").size_limit_exceeded
    assert not p.parse_reply(b"stream: Some error. ERROR\0").size_limit_exceeded


def test_session_replies_carry_their_id() -> None:
    reply = p.parse_reply(b"3: stream: Eicar FOUND\0", session=True)
    assert (reply.session_id, reply.kind, reply.virus) == (3, ReplyKind.FOUND, "Eicar")
    assert p.parse_reply(b"1: PONG", session=True).kind is ReplyKind.PONG
    # outside a session the number is part of the text
    assert p.parse_reply(b"1: PONG").kind is ReplyKind.OTHER


def test_reply_reader_splits_a_session_stream() -> None:
    reader = p.ReplyReader(Prefix.Z)
    wire = b"1: PONG\x002: ClamAV 1.4.6\x003: stream: X FOUND\0"
    replies = []
    for i in range(len(wire)):  # one byte at a time: framing must not depend on reads
        reader.feed(wire[i:i + 1])
        while (r := reader.next_reply()) is not None:
            replies.append(p.parse_reply(r, session=True))
    assert [(r.session_id, r.kind) for r in replies] == [
        (1, ReplyKind.PONG), (2, ReplyKind.VERSION), (3, ReplyKind.FOUND)]


def test_reply_reader_is_bounded() -> None:
    reader = p.ReplyReader(Prefix.Z, max_reply_length=100)
    reader.feed(b"x" * 100)
    assert reader.next_reply() is None
    reader.feed(b"x")
    with pytest.raises(ClamdProtocolError):
        reader.next_reply()


@pytest.mark.parametrize(("text", "program", "engine", "db", "date", "dbpart"), [
    ("ClamAV 1.4.6/27000/Mon Nov 23 09:18:14 2024", "ClamAV 1.4.6", "1.4.6", 27000,
     "Mon Nov 23 09:18:14 2024", "27000/Mon Nov 23 09:18:14 2024"),
    ("ClamAV 1.4.6", "ClamAV 1.4.6", "1.4.6", None, "", "ClamAV 1.4.6"),
    ("ClamAV 0.103.12/26800\n", "ClamAV 0.103.12", "0.103.12", 26800, "", "26800"),
])
def test_parse_version(text: str, program: str, engine: str, db: int | None, date: str,
                       dbpart: str) -> None:
    v = p.parse_version(text)
    assert (v.program, v.engine_version, v.db_version, v.db_date, v.db) == (
        program, engine, db, date, dbpart)


@pytest.mark.parametrize("text", ["PONG", "", "ClamAV", "ClamAV 1.4.6/abc/x"])
def test_parse_version_rejects_non_versions(text: str) -> None:
    with pytest.raises(ValueError):
        p.parse_version(text)


# -- server side: replies -----------------------------------------------------------------

@pytest.mark.parametrize(("text", "prefix", "session", "wire"), [
    (p.ok_reply(), Prefix.Z, None, b"stream: OK\0"),
    (p.ok_reply(), Prefix.N, None, b"stream: OK\n"),
    (p.ok_reply(), Prefix.LEGACY, None, b"stream: OK\n"),
    (p.found_reply("Eicar-Test-Signature"), Prefix.Z, None,
     b"stream: Eicar-Test-Signature FOUND\0"),
    (p.found_reply("X", "/tmp/f"), Prefix.N, 7, b"7: /tmp/f: X FOUND\n"),
    (p.error_reply("Access denied.", "/etc/shadow"), Prefix.Z, None,
     b"/etc/shadow: Access denied. ERROR\0"),
    (p.SIZE_LIMIT_EXCEEDED, Prefix.Z, 2, b"2: INSTREAM size limit exceeded. ERROR\0"),
    (p.PONG, Prefix.Z, 1, b"1: PONG\0"),
])
def test_format_reply(text: str, prefix: Prefix, session: int | None, wire: bytes) -> None:
    out = p.format_reply(text, prefix, session)
    assert out == wire
    # and the client side reads back what the server side wrote
    back = p.parse_reply(out, session=session is not None)
    assert back.text == text and back.session_id == session


def test_found_reply_refuses_names_clients_cannot_parse() -> None:
    with pytest.raises(ValueError):
        p.found_reply("two words")
    with pytest.raises(ValueError):
        p.found_reply("")


# -- server side: command parser ----------------------------------------------------------

def events(parser: ServerParser, data: bytes = b"") -> list[object]:
    if data:
        parser.receive_data(data)
    out: list[object] = []
    while (ev := parser.next_event()) is not NEED_DATA:
        out.append(ev)
        if isinstance(ev, ConnectionClosed):
            break
    return out


@pytest.mark.parametrize(("wire", "name", "prefix", "args"), [
    (b"zPING\0", "PING", Prefix.Z, ""),
    (b"nVERSION\n", "VERSION", Prefix.N, ""),
    (b"PING\n", "PING", Prefix.LEGACY, ""),
    (b"PING\r\n", "PING", Prefix.LEGACY, ""),
    (b"zRELOAD\0", "RELOAD", Prefix.Z, ""),
    (b"zSHUTDOWN\0", "SHUTDOWN", Prefix.Z, ""),
    (b"zSTATS\0", "STATS", Prefix.Z, ""),
    (b"zFILDES\0", "FILDES", Prefix.Z, ""),
    (b"zVERSIONCOMMANDS\0", "VERSIONCOMMANDS", Prefix.Z, ""),
    (b"SCAN /tmp/with space\n", "SCAN", Prefix.LEGACY, "/tmp/with space"),
    (b"zMULTISCAN /var\0", "MULTISCAN", Prefix.Z, "/var"),
    (b"nALLMATCHSCAN /x\n", "ALLMATCHSCAN", Prefix.N, "/x"),
])
def test_server_commands(wire: bytes, name: str, prefix: Prefix, args: str) -> None:
    parser = ServerParser()
    assert events(parser, wire) == [Command(name, prefix, args)]


@pytest.mark.parametrize("wire", [
    b"zFROB\0", b"zPING extra\0", b"zSCAN\0", b"zSCAN \0", b"nping\n", b"STREAM\n",
    b"\xff\xfe\n",
])
def test_unknown_commands_get_clamds_reply(wire: bytes) -> None:
    parser = ServerParser()
    parser.receive_data(wire)
    with pytest.raises(ClamdProtocolError) as info:
        parser.next_event()
    assert info.value.reply_hint == "UNKNOWN COMMAND"
    assert isinstance(info.value, ProtocolError)
    terminator = b"\0" if wire.startswith(b"z") else b"\n"
    assert info.value.reply() == b"UNKNOWN COMMAND" + terminator
    # the parser stays failed: nothing after a protocol error is interpreted
    with pytest.raises(ClamdProtocolError):
        parser.next_event()


def test_instream_events() -> None:
    parser = ServerParser()
    wire = b"zINSTREAM\0" + p.encode_chunk(b"hello ") + p.encode_chunk(b"world") + p.INSTREAM_END
    evs = events(parser, wire)
    cmd = Command("INSTREAM", Prefix.Z)
    assert evs == [cmd, InstreamChunk(b"hello "), InstreamChunk(b"world"), InstreamEnd(cmd, 11)]


def test_instream_delivers_partial_chunks_without_buffering_them() -> None:
    parser = ServerParser()
    events(parser, b"zINSTREAM\0" + p.chunk_header(1000))
    assert events(parser, b"a" * 300) == [InstreamChunk(b"a" * 300)]
    assert events(parser, b"b" * 700 + b"\0\0") == [InstreamChunk(b"b" * 700)]
    end = events(parser, b"\0\0")
    assert len(end) == 1 and isinstance(end[0], InstreamEnd) and end[0].total == 1000


def test_instream_byte_by_byte_equals_all_at_once() -> None:
    wire = (b"zINSTREAM\0" + p.encode_chunk(b"abc") + p.encode_chunk(b"de")
            + p.INSTREAM_END)
    parser = ServerParser()
    data = b""
    for i in range(len(wire)):
        for ev in events(parser, wire[i:i + 1]):
            if isinstance(ev, InstreamChunk):
                data += ev.data
            elif isinstance(ev, InstreamEnd):
                assert ev.total == 5
    assert data == b"abcde"


def test_stream_max_length_is_checked_on_the_chunk_header() -> None:
    parser = ServerParser(stream_max_length=10)
    evs = events(parser, b"zINSTREAM\0" + p.encode_chunk(b"123456"))
    assert evs[-1] == InstreamChunk(b"123456")
    # 6 + 5 > 10: refused as soon as the header arrives, before any of its data
    parser.receive_data(p.chunk_header(5))
    with pytest.raises(ClamdProtocolError) as info:
        parser.next_event()
    assert info.value.reply() == b"INSTREAM size limit exceeded. ERROR\0"


def test_huge_chunk_length_is_refused_not_buffered() -> None:
    parser = ServerParser(stream_max_length=25 << 20)
    parser.receive_data(b"nINSTREAM\n" + struct.pack(">I", 0xFFFFFFFF) + b"abc")
    assert parser.next_event() == Command("INSTREAM", Prefix.N)
    with pytest.raises(ClamdProtocolError) as info:
        parser.next_event()
    assert info.value.reply() == b"INSTREAM size limit exceeded. ERROR\n"


def test_stream_of_exactly_the_limit_is_accepted() -> None:
    parser = ServerParser(stream_max_length=10)
    evs = events(parser, b"zINSTREAM\0" + p.encode_chunk(b"x" * 10) + p.INSTREAM_END)
    assert isinstance(evs[-1], InstreamEnd) and evs[-1].total == 10


def test_command_longer_than_the_bound_is_refused() -> None:
    parser = ServerParser(max_command_length=64)
    parser.receive_data(b"zSCAN /" + b"a" * 100)  # no terminator yet: must not wait forever
    with pytest.raises(ClamdProtocolError) as info:
        parser.next_event()
    assert info.value.reply_hint == "UNKNOWN COMMAND"


def test_command_at_the_bound_is_accepted() -> None:
    path = "/" + "a" * 58
    wire = f"zSCAN {path}".encode()
    parser = ServerParser(max_command_length=len(wire) - 1)
    assert events(parser, wire + b"\0") == [Command("SCAN", Prefix.Z, path)]


def test_idsession_numbers_commands_and_replies() -> None:
    parser = ServerParser()
    wire = (b"zIDSESSION\0zPING\0zVERSION\0zINSTREAM\0" + p.encode_chunk(b"x")
            + p.INSTREAM_END + b"zEND\0")
    evs = events(parser, wire)
    assert evs[0] == Command("IDSESSION", Prefix.Z)
    assert evs[1] == Command("PING", Prefix.Z, session_id=1)
    assert evs[2] == Command("VERSION", Prefix.Z, session_id=2)
    instream = Command("INSTREAM", Prefix.Z, session_id=3)
    assert evs[3:6] == [instream, InstreamChunk(b"x"), InstreamEnd(instream, 1)]
    assert evs[6] == Command("END", Prefix.Z)
    assert not parser.in_session
    assert evs[1].reply("PONG") == b"1: PONG\0"  # type: ignore[union-attr]
    assert instream.reply(p.ok_reply()) == b"3: stream: OK\0"


def test_size_error_inside_a_session_carries_the_id() -> None:
    parser = ServerParser(stream_max_length=4)
    events(parser, b"zIDSESSION\0zPING\0zINSTREAM\0")
    parser.receive_data(p.chunk_header(5))
    with pytest.raises(ClamdProtocolError) as info:
        parser.next_event()
    assert info.value.reply() == b"2: INSTREAM size limit exceeded. ERROR\0"


def test_nested_idsession_is_refused() -> None:
    parser = ServerParser()
    events(parser, b"zIDSESSION\0")
    parser.receive_data(b"zIDSESSION\0")
    with pytest.raises(ClamdProtocolError):
        parser.next_event()


@pytest.mark.parametrize(("wire", "clean"), [
    (b"", True),
    (b"zPI", False),
    (b"zINSTREAM\0\0\0", False),
    (b"zINSTREAM\0\0\0\0\x05ab", False),
])
def test_eof(wire: bytes, clean: bool) -> None:
    parser = ServerParser()
    evs = events(parser, wire)
    parser.receive_data(b"")
    evs += events(parser)
    assert evs[-1] == ConnectionClosed(clean)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=20))
def test_fuzz_server_parser_is_bounded(pieces: list[bytes]) -> None:
    """Arbitrary input: events or a defined error, and never more buffered than the bound."""
    parser = ServerParser(stream_max_length=1000, max_command_length=100)
    try:
        for piece in pieces:
            parser.receive_data(piece)
            events(parser)
            # a command under construction never exceeds the bound (+ prefix, terminator)
            assert len(parser._buf) <= 100 + 2
    except ClamdProtocolError as exc:
        assert exc.reply_hint in ("UNKNOWN COMMAND", p.SIZE_LIMIT_EXCEEDED)
