"""clamd client IDSESSION codec: request numbering, reply matching, everything that cannot be
matched is refused (clamd 1.4 wire bytes as fixtures)."""

from __future__ import annotations

import pytest

from avgate.protocols import clamd as p
from avgate.protocols.clamd import ClamdProtocolError, ClientSession, ReplyKind


def opened() -> ClientSession:
    s = ClientSession()
    assert s.open() == b"zIDSESSION\0"
    return s


def test_requests_are_numbered_from_one_and_framed() -> None:
    s = opened()
    assert s.request("INSTREAM") == (1, b"zINSTREAM\0")
    assert s.request("FILDES") == (2, b"zFILDES\0\0")  # with the descriptor's dummy byte
    assert s.request("PING") == (3, b"zPING\0")
    assert s.outstanding == {1, 2, 3}


def test_replies_are_matched_to_their_request_in_any_order() -> None:
    s = opened()
    s.request("INSTREAM")
    s.request("FILDES")
    # clamd answers as scans finish: out of order, split across reads
    s.receive_data(b"2: fd[11]: Eicar-Test-Signature.UNOFFICIAL FOUND\0" b"1: stre")
    found = s.next_reply()
    assert found is not None and found.session_id == 2
    assert found.kind is ReplyKind.FOUND and found.virus == "Eicar-Test-Signature.UNOFFICIAL"
    assert found.path == "fd[11]"
    assert s.next_reply() is None and not s.idle
    s.receive_data(b"am: OK\0")
    ok = s.next_reply()
    assert ok is not None and (ok.session_id, ok.kind, ok.text) == (1, ReplyKind.OK,
                                                                    "stream: OK")
    assert s.idle and not s.outstanding


@pytest.mark.parametrize("wire", [
    b"COMMAND READ TIMED OUT\n\0",  # clamd's idle-session drop: no id
    b"stream: OK\0",  # a reply without session id
    b"HELLO THERE\0",
    b"01: stream: OK\0",  # clamd never zero-pads
    b"-1: stream: OK\0",
    b"4294967296: stream: OK\0",  # beyond %u
    b"\xd9\xa1: stream: OK\0",  # a non-ASCII digit
    b": stream: OK\0",
])
def test_a_reply_without_a_valid_id_breaks_the_session(wire: bytes) -> None:
    s = opened()
    s.request("INSTREAM")
    s.receive_data(wire)
    with pytest.raises(ClamdProtocolError, match="without a request id"):
        s.next_reply()
    assert s.broken and not s.idle


@pytest.mark.parametrize("wire", [b"2: stream: OK\0", b"1: stream: OK\0" b"1: stream: OK\0"])
def test_a_reply_for_a_request_not_outstanding_breaks_the_session(wire: bytes) -> None:
    s = opened()
    s.request("INSTREAM")
    s.receive_data(wire)
    with pytest.raises(ClamdProtocolError, match="not outstanding"):
        while s.next_reply() is not None:
            pass
    assert s.broken


def test_an_error_reply_is_returned_but_breaks_the_session() -> None:
    # clamd 1.4.6 to a descriptor sent without FILDES: two replies with the same id, close
    s = opened()
    s.request("INSTREAM")
    s.receive_data(b"1: PROTOCOL ERROR: ancillary data sent without FILDES. ERROR\0"
                   b"1: Error processing command. ERROR\0")
    reply = s.next_reply()
    assert reply is not None and reply.kind is ReplyKind.ERROR and reply.session_id == 1
    assert s.broken and not s.idle
    with pytest.raises(ClamdProtocolError):
        s.next_reply()


def test_size_limit_reply_in_a_session() -> None:
    s = opened()
    s.request("INSTREAM")
    s.receive_data(b"1: INSTREAM size limit exceeded. ERROR\0")
    reply = s.next_reply()
    assert reply is not None and reply.size_limit_exceeded and s.broken


def test_an_endless_reply_is_refused() -> None:
    s = ClientSession(max_reply_length=64)
    s.open()
    s.request("PING")
    s.receive_data(b"1: " + b"A" * 100)
    with pytest.raises(ClamdProtocolError, match="longer than 64"):
        s.next_reply()
    assert s.broken


def test_unsent_data_keeps_the_session_busy() -> None:
    s = opened()
    s.request("PING")
    s.receive_data(b"1: PONG\0" b"2")
    assert s.next_reply() is not None
    assert s.pending == b"2" and not s.idle  # something nobody asked for is waiting


def test_usage_errors() -> None:
    s = ClientSession()
    with pytest.raises(RuntimeError):
        s.request("PING")  # before IDSESSION
    s.open()
    with pytest.raises(RuntimeError):
        s.open()
    with pytest.raises(ValueError, match="not allowed inside IDSESSION"):
        s.request("MULTISCAN")
    assert s.end() == b"zEND\0"
    assert not s.idle
    with pytest.raises(RuntimeError):
        s.request("PING")


def test_parse_session_reply() -> None:
    reply = p.parse_session_reply(b"12: /a: b: Win.Test-1 FOUND\0")
    assert (reply.session_id, reply.path, reply.virus) == (12, "/a: b", "Win.Test-1")
    assert p.parse_session_reply("4294967295: PONG").kind is ReplyKind.PONG


def test_a_non_ascii_digit_is_no_session_id() -> None:
    """"²" is a digit to ``str.isdigit()`` but not to ``int()``: no id, never a ValueError."""
    assert p.parse_reply("\u00b2: stream: OK", session=True).session_id is None
    with pytest.raises(ClamdProtocolError):
        p.parse_session_reply("\u00b2: stream: OK".encode())
