"""Milter codec: byte fixtures in both directions, negotiation, malformed packets."""

from __future__ import annotations

import struct

import pytest

from avgate.errors import ProtocolError
from avgate.protocols import milter as m


def pkt(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + cmd + data


# (event, exact wire bytes) for every command the MTA sends
COMMANDS = [
    (m.OptNeg(6, 0x1FF, 0x1FFFFF), pkt(b"O", b"\0\0\0\x06\0\0\x01\xff\0\x1f\xff\xff")),
    (m.Macro(b"C", (("j", "mx.example"), ("{daemon_name}", "smtpd"))),
     pkt(b"D", b"Cj\0mx.example\0{daemon_name}\0smtpd\0")),
    (m.Macro(b"E"), pkt(b"D", b"E")),
    (m.Connect("client.example", "4", 40000, "192.0.2.1"),
     pkt(b"C", b"client.example\0" + b"4\x9c\x40" + b"192.0.2.1\0")),
    (m.Connect("[2001:db8::1]", "6", 25, "2001:db8::1"),
     pkt(b"C", b"[2001:db8::1]\0" + b"6\0\x19" + b"2001:db8::1\0")),
    (m.Connect("localhost", "L", 0, "/run/sock"), pkt(b"C", b"localhost\0L\0\0/run/sock\0")),
    (m.Connect("unknown", "U"), pkt(b"C", b"unknown\0U")),
    (m.Helo("client.example"), pkt(b"H", b"client.example\0")),
    (m.Mail(("<a@example.org>", "SIZE=100", "BODY=8BITMIME")),
     pkt(b"M", b"<a@example.org>\0SIZE=100\0BODY=8BITMIME\0")),
    (m.Rcpt(("<b@example.net>",)), pkt(b"R", b"<b@example.net>\0")),
    (m.Data(), pkt(b"T")),
    (m.Header(b"Subject", b"hello world"), pkt(b"L", b"Subject\0hello world\0")),
    (m.Header(b"X-Empty", b""), pkt(b"L", b"X-Empty\0\0")),
    (m.Header(b"Received", b"from a\n\tby b"), pkt(b"L", b"Received\0from a\n\tby b\0")),
    (m.EndOfHeaders(), pkt(b"N")),
    (m.Body(b"line 1\r\nline 2\r\n"), pkt(b"B", b"line 1\r\nline 2\r\n")),
    (m.EndOfMessage(), pkt(b"E")),
    (m.EndOfMessage(b"last\r\n"), pkt(b"E", b"last\r\n")),
    (m.Abort(), pkt(b"A")),
    (m.Quit(), pkt(b"Q")),
    (m.QuitNewConnection(), pkt(b"K")),
    (m.Unknown("XFOO bar"), pkt(b"U", b"XFOO bar\0")),
]

# (response, exact wire bytes) for every response a filter sends
RESPONSES = [
    (m.OptNeg(6, 0x3F, 0x0F0000), pkt(b"O", b"\0\0\0\x06\0\0\0\x3f\0\x0f\0\0")),
    (m.OptNeg(6, 0x13F, 0, ((m.SMFIM_CONNECT, "j {client_addr}"), (m.SMFIM_EOM, "i"))),
     pkt(b"O", b"\0\0\0\x06\0\0\x01\x3f\0\0\0\0" + b"\0\0\0\0j {client_addr}\0"
         + b"\0\0\0\x05i\0")),
    (m.Accept(), pkt(b"a")),
    (m.Continue(), pkt(b"c")),
    (m.Reject(), pkt(b"r")),
    (m.Tempfail(), pkt(b"t")),
    (m.Discard(), pkt(b"d")),
    (m.Progress(), pkt(b"p")),
    (m.Skip(), pkt(b"s")),
    (m.Shutdown(), pkt(b"4")),
    (m.ConnFail(), pkt(b"f")),
    (m.ReplyCode("550 5.7.1 Virus found: X"), pkt(b"y", b"550 5.7.1 Virus found: X\0")),
    (m.ReplyCode("550 5.7.1 100% bad"), pkt(b"y", b"550 5.7.1 100%% bad\0")),
    (m.AddHeader("X-Virus-Status", "Clean"), pkt(b"h", b"X-Virus-Status\0Clean\0")),
    (m.InsertHeader(0, "X-A", "b"), pkt(b"i", b"\0\0\0\0X-A\0b\0")),
    (m.ChangeHeader(2, "Subject", ""), pkt(b"m", b"\0\0\0\x02Subject\0\0")),
    (m.ReplaceBody(b"new body\r\n"), pkt(b"b", b"new body\r\n")),
    (m.AddRecipient("<c@example.com>"), pkt(b"+", b"<c@example.com>\0")),
    (m.AddRecipientPar("<c@example.com>", "NOTIFY=NEVER"),
     pkt(b"2", b"<c@example.com>\0NOTIFY=NEVER\0")),
    (m.DeleteRecipient("<b@example.net>"), pkt(b"-", b"<b@example.net>\0")),
    (m.ChangeFrom("<new@example.org>"), pkt(b"e", b"<new@example.org>\0")),
    (m.ChangeFrom("<new@example.org>", "SIZE=1"), pkt(b"e", b"<new@example.org>\0SIZE=1\0")),
    (m.Quarantine("avgate: Eicar"), pkt(b"q", b"avgate: Eicar\0")),
]


def server() -> m.MilterServer:
    s = m.MilterServer()
    s.negotiated = m.OptNeg(6, 0, 0)  # as if OPTNEG had happened
    return s


@pytest.mark.parametrize(("event", "wire"), COMMANDS, ids=lambda x: type(x).__name__)
def test_command_encodes_to_fixture(event: m.Packet, wire: bytes) -> None:
    assert m.encode(event) == wire


@pytest.mark.parametrize(("event", "wire"), COMMANDS, ids=lambda x: type(x).__name__)
def test_command_decodes_from_fixture(event: m.Packet, wire: bytes) -> None:
    s = server()
    s.receive_data(wire)
    assert s.next_event() == event
    assert s.next_event() is None


@pytest.mark.parametrize(("response", "wire"), RESPONSES, ids=lambda x: type(x).__name__)
def test_response_encodes_to_fixture(response: m.Packet, wire: bytes) -> None:
    assert m.encode(response) == wire


@pytest.mark.parametrize(("response", "wire"), RESPONSES, ids=lambda x: type(x).__name__)
def test_response_decodes_from_fixture(response: m.Packet, wire: bytes) -> None:
    c = m.MilterClient()
    c.receive_data(wire)
    assert c.next_event() == response
    assert c.next_event() is None


def test_every_command_and_response_code_has_a_fixture() -> None:
    assert {ord(type(e).CODE) for e, _ in COMMANDS} == set(m.COMMANDS)
    assert {ord(type(r).CODE) for r, _ in RESPONSES} == set(m.RESPONSES)


def test_stream_split_at_every_byte_gives_the_same_events() -> None:
    wire = b"".join(w for _, w in COMMANDS)
    s = server()
    got = []
    for i in range(len(wire)):
        s.receive_data(wire[i:i + 1])
        while (ev := s.next_event()) is not None:
            got.append(ev)
    assert got == [e for e, _ in COMMANDS]


def test_many_packets_in_one_read() -> None:
    wire = b"".join(w for _, w in COMMANDS) * 50
    s = server()
    s.receive_data(wire)
    n = 0
    while s.next_event() is not None:
        n += 1
    assert n == len(COMMANDS) * 50
    assert s.buffered == 0


def test_body_packet_then_part_of_the_next_then_more_data() -> None:
    """A body packet taken out of a longer buffer is its exact bytes (one copy, bytes), and
    the buffer keeps taking data afterwards (no view of it is left behind)."""
    chunk = bytes(range(256)) * 80  # 20 KiB
    body, header = m.encode(m.Body(chunk)), m.encode(m.Header(b"Subject", b"hi"))
    s = server()
    s.receive_data(body + header[:5])
    event = s.next_event()
    assert event == m.Body(chunk) and type(event.chunk) is bytes  # type: ignore[union-attr]
    assert s.next_event() is None
    s.receive_data(header[5:] + body)
    assert s.next_event() == m.Header(b"Subject", b"hi")
    assert s.next_event() == m.Body(chunk) and s.buffered == 0


def test_buffer_taken_over_from_bytearray_and_memoryview_is_a_copy() -> None:
    """Whole packets from a bytes read are sliced from it directly; any other buffer type is
    copied first, so the caller reusing its buffer cannot change events not yet returned."""
    wire = bytearray(pkt(b"L", b"Subject\0hi\0") + pkt(b"B", b"body"))
    s = server()
    s.receive_data(wire)
    wire[:] = b"\xff" * len(wire)  # the caller reuses its buffer
    view = memoryview(bytearray(pkt(b"B", b"more") + pkt(b"L", b"To\0x\0")[:6]))
    assert s.next_event() == m.Header(b"Subject", b"hi")
    s.receive_data(view)  # a partial packet after unread ones: gathered in a bytearray
    view[:] = b"\xff" * len(view)
    got = [s.next_event(), s.next_event(), s.next_event()]
    assert got == [m.Body(b"body"), m.Body(b"more"), None]
    assert all(type(e.chunk) is bytes for e in got[:2])  # type: ignore[union-attr]
    s.receive_data(pkt(b"L", b"To\0x\0")[6:])
    assert s.next_event() == m.Header(b"To", b"x") and s.buffered == 0
    s.receive_data(pkt(b"E"))  # everything was consumed: the next read is the buffer
    assert s.next_event() == m.EndOfMessage() and s.next_event() is None


def test_needs_reply_follows_negotiated_however_it_is_set() -> None:
    s = m.MilterServer()
    assert s.needs_reply(m.Header(b"a", b"b")) and s.actions == 0 and s.protocol == 0
    s.negotiated = m.OptNeg(6, m.SMFIF_ADDHDRS, m.SMFIP_NR_HDR | m.SMFIP_NR_BODY)
    assert (s.actions, s.protocol) == (m.SMFIF_ADDHDRS, m.SMFIP_NR_HDR | m.SMFIP_NR_BODY)
    assert not s.needs_reply(m.Header(b"a", b"b")) and not s.needs_reply(m.Body(b"x"))
    assert s.needs_reply(m.Rcpt(("<x>",))) and s.needs_reply(m.EndOfMessage())
    s.negotiated = None
    assert s.needs_reply(m.Body(b"x")) and s.protocol == 0


def test_strings_of_a_packet_decode_like_each_string_alone() -> None:
    """One decode per packet, then split at NUL: invalid UTF-8 next to a NUL is escaped
    exactly as when each string is decoded by itself (NUL is never inside a sequence)."""
    raw = [b"<\xc3@x>", b"\xe2\x82", b"SIZE=\xff1", b""]
    s = server()
    s.receive_data(pkt(b"M", b"\0".join(raw) + b"\0"))
    ev = s.next_event()
    assert isinstance(ev, m.Mail)
    assert ev.args == tuple(r.decode("utf-8", "surrogateescape") for r in raw)


def test_envelope_helpers() -> None:
    assert m.Mail(("<a@b>", "SIZE=1")).sender == "a@b"
    assert m.Mail(("<>",)).sender == ""
    assert m.Rcpt(("c@d",)).recipient == "c@d"


def test_non_utf8_bytes_round_trip() -> None:
    wire = pkt(b"M", b"<\xff\xfe@example>\0")
    s = server()
    s.receive_data(wire)
    ev = s.next_event()
    assert isinstance(ev, m.Mail)
    assert m.encode(ev) == wire


# -- negotiation ---------------------------------------------------------------------------
def test_negotiate_takes_only_what_the_mta_offers() -> None:
    s = m.MilterServer()
    s.receive_data(m.encode(m.OptNeg(6, m.SMFIF_ADDHDRS | m.SMFIF_CHGHDRS, 0x7F)))
    offer = s.next_event()
    assert isinstance(offer, m.OptNeg)
    reply = s.negotiate(offer, actions=m.SMFIF_ADDHDRS | m.SMFIF_CHGBODY,
                        protocol=m.SMFIP_NR_HDR | m.SMFIP_NODATA | m.SMFIP_NOEOH,
                        macros=((m.SMFIM_EOM, "i"),))
    # no CHGBODY (not offered), no NR_HDR/NODATA (not offered), no macro lists (no SETSYMLIST)
    assert reply == m.OptNeg(6, m.SMFIF_ADDHDRS, m.SMFIP_NOEOH)
    assert s.needs_reply(m.Header(b"a", b"b"))
    assert not s.needs_reply(m.Macro(b"C"))
    assert s.needs_reply(m.EndOfMessage())


def test_negotiate_v6_no_reply_flags_and_macro_lists() -> None:
    s = m.MilterServer()
    reply = s.negotiate(m.OptNeg(6, 0x1FF, 0x1FFFFF), actions=m.SMFIF_ADDHDRS,
                        protocol=m.SMFIP_NR_HDR | m.SMFIP_NR_BODY,
                        macros=((m.SMFIM_EOM, "i"),))
    assert reply == m.OptNeg(6, m.SMFIF_ADDHDRS | m.SMFIF_SETSYMLIST,
                             m.SMFIP_NR_HDR | m.SMFIP_NR_BODY, ((m.SMFIM_EOM, "i"),))
    assert not s.needs_reply(m.Header(b"a", b"b"))
    assert not s.needs_reply(m.Body(b"x"))
    assert s.needs_reply(m.Rcpt(("<x>",)))
    assert s.needs_reply(m.EndOfMessage())
    assert not s.needs_reply(m.Abort())
    assert not s.needs_reply(m.Quit())


def test_negotiate_older_mta_version_is_kept() -> None:
    s = m.MilterServer()
    assert s.negotiate(m.OptNeg(2, 0x3F, 0x7F), actions=0x3F, protocol=0).version == 2
    with pytest.raises(ProtocolError):
        m.MilterServer().negotiate(m.OptNeg(1, 0x3F, 0x7F), actions=0x3F, protocol=0)


def test_client_tracks_reply_expectation() -> None:
    c = m.MilterClient()
    c.receive_data(m.encode(m.OptNeg(6, 0x3F, m.SMFIP_NR_HDR)))
    assert isinstance(c.next_event(), m.OptNeg)
    assert not c.expects_reply(m.Header(b"a", b"b"))
    assert c.expects_reply(m.Body(b"x"))
    assert c.expects_reply(m.EndOfMessage())


def test_command_before_optneg_is_an_error() -> None:
    s = m.MilterServer()
    s.receive_data(pkt(b"H", b"x\0"))
    with pytest.raises(ProtocolError, match="before option negotiation"):
        s.next_event()


# -- replies -------------------------------------------------------------------------------
@pytest.mark.parametrize(("given", "expected"), [
    ("550 5.7.1 Virus found: X", "550 5.7.1 Virus found: X"),
    ("550 Virus found", "550 5.7.1 Virus found"),
    ("451 4.7.1 Scanner down", "451 4.7.1 Scanner down"),
    ("451 5.7.1 wrong class", "451 4.7.1 wrong class"),
    ("554-5.7.0 multi", "554 5.7.0 multi"),
    ("550 5.7.1 two\r\nlines", "550 5.7.1 two lines"),
    ("250 ok", "550 5.7.1 Message rejected"),
    ("", "550 5.7.1 Message rejected"),
])
def test_milter_reply_is_what_postfix_accepts(given: str, expected: str) -> None:
    assert m.milter_reply(given) == expected


# -- malformed input ---------------------------------------------------------------------
MALFORMED = [
    (struct.pack(">I", 0), "zero-length"),
    (struct.pack(">I", m.DEFAULT_MAX_PACKET + 1) + b"B", "over the limit"),
    (struct.pack(">I", 0xFFFFFFFF), "over the limit"),
    (pkt(b"Z"), "unknown command 'Z'"),
    (pkt(b"\x00", b"x"), "unknown command"),
    (pkt(b"L", b"Subject\0no terminator"), "HEADER"),
    (pkt(b"L", b"Subject"), "HEADER"),
    (pkt(b"L", b"a\0b\0c\0"), "HEADER"),
    (pkt(b"L", b"\0value\0"), "HEADER"),
    (pkt(b"C", b"host\0"), "CONNECT"),
    (pkt(b"C", b"host\0X\0\0addr\0"), "address family"),
    (pkt(b"C", b"host\x004\0"), "CONNECT"),
    (pkt(b"C", b"host\0U extra"), "CONNECT"),
    (pkt(b"D"), "MACRO"),
    (pkt(b"D", b"Cj\0"), "MACRO"),
    (pkt(b"D", b"Cj\0v"), "MACRO"),
    (pkt(b"M", b"<a@b>"), "MAIL"),
    (pkt(b"H", b"a\0b\0"), "HELO"),
    (pkt(b"A", b"x"), "ABORT"),
    (pkt(b"Q", b"x"), "QUIT"),
    (pkt(b"T", b"x"), "DATA"),
]


@pytest.mark.parametrize(("wire", "message"), MALFORMED, ids=[m_ for _, m_ in MALFORMED])
def test_malformed_packet_is_a_protocol_error(wire: bytes, message: str) -> None:
    s = server()
    s.receive_data(wire)
    with pytest.raises(ProtocolError, match=message) as info:
        s.next_event()
    assert info.value.reply_hint == "close"
    with pytest.raises(ProtocolError):  # stays broken: no resynchronisation on garbage
        s.next_event()


def test_optneg_too_short_and_bad_macro_lists() -> None:
    for data in (b"\0\0\0\x06", b"\0" * 12 + b"\0\0", b"\0" * 12 + b"\0\0\0\0abc"):
        s = m.MilterServer()
        s.receive_data(pkt(b"O", data))
        with pytest.raises(ProtocolError, match="OPTNEG"):
            s.next_event()


def test_oversized_length_is_refused_before_buffering_the_data() -> None:
    s = m.MilterServer(max_packet=1024)
    s.negotiated = m.OptNeg(6, 0, 0)
    s.receive_data(struct.pack(">I", 1025))  # only the length: refused at once
    with pytest.raises(ProtocolError, match="over the limit of 1024"):
        s.next_event()


def test_truncated_packet_waits_then_fails_at_eof() -> None:
    s = server()
    s.receive_data(pkt(b"L", b"Subject\0x\0")[:-3])
    assert s.next_event() is None
    s.receive_data(b"")
    with pytest.raises(ProtocolError, match="closed after"):
        s.next_event()


def test_truncated_length_at_eof() -> None:
    s = server()
    s.receive_data(b"\0\0")
    assert s.next_event() is None
    s.receive_data(b"")
    with pytest.raises(ProtocolError, match="packet length"):
        s.next_event()


def test_clean_eof_is_not_an_error() -> None:
    s = server()
    s.receive_data(pkt(b"Q"))
    s.receive_data(b"")
    assert s.next_event() == m.Quit()
    assert s.next_event() is None


def test_malformed_responses() -> None:
    for wire in (pkt(b"y", b"550 no nul"), pkt(b"m", b"\0\0"), pkt(b"h", b"only\0"),
                 pkt(b"a", b"x"), pkt(b"Z")):
        c = m.MilterClient()
        c.receive_data(wire)
        with pytest.raises(ProtocolError):
            c.next_event()


def test_encoding_refuses_nul_in_strings() -> None:
    with pytest.raises(ValueError):
        m.encode(m.AddHeader("X-A", "a\0b"))
    with pytest.raises(ValueError):
        m.encode(m.Header(b"X\0", b""))
    with pytest.raises(ValueError):
        m.encode(m.Mail(()))
