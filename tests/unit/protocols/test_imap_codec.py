"""IMAP framing: lines and literals in any cut, limits, sections, capabilities."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avgate.protocols import imap as p


def events(chunks: list[bytes], **kw: int) -> list[object]:
    reader = p.Reader(**kw)
    out: list[object] = []
    for chunk in chunks:
        reader.receive_data(chunk)
        while (event := reader.next_event()) is not p.NEED_DATA:
            out.append(event)
            if isinstance(event, p.ConnectionClosed):
                return out
    return out


def joined(evs: list[object]) -> list[object]:
    """Literal pieces joined (how a stream is cut must not matter)."""
    out: list[object] = []
    for e in evs:
        if isinstance(e, p.LiteralData) and out and isinstance(out[-1], p.LiteralData):
            out[-1] = p.LiteralData(out[-1].data + e.data)
        else:
            out.append(e)
    return out


FETCH = b"* 1 FETCH (UID 7 BODY[] {11}\r\nhello\r\nworl FLAGS (\\Seen))\r\na1 OK done\r\n"
EXPECTED = [p.Segment(b"* 1 FETCH (UID 7 BODY[] ", p.Literal(11), True),
            p.LiteralData(b"hello\r\nworl"), p.LiteralEnd(),
            p.Segment(b" FLAGS (\\Seen))\r\n", None, False),
            p.Segment(b"a1 OK done\r\n", None, True)]


def test_literal_in_a_fetch_response_any_cut() -> None:
    assert joined(events([FETCH])) == EXPECTED
    for cut in range(1, len(FETCH)):
        assert joined(events([FETCH[:cut], FETCH[cut:]])) == EXPECTED, cut


@pytest.mark.parametrize(("line", "literal", "header"), [
    (b"a APPEND INBOX {3}\r\n", p.Literal(3, sync=True), b"{3}\r\n"),
    (b"a APPEND INBOX {3+}\r\n", p.Literal(3, sync=False), b"{3+}\r\n"),
    (b"a APPEND INBOX (\\Seen) ~{3}\r\n", p.Literal(3, binary=True), b"~{3}\r\n"),
    (b"a LOGIN {3}\n", p.Literal(3), b"{3}\r\n"),  # a bare LF is read too, sent as CRLF
])
def test_literal_forms(line: bytes, literal: p.Literal, header: bytes) -> None:
    [segment, data, end] = joined(events([line + b"abc"]))
    assert isinstance(segment, p.Segment) and segment.literal == literal
    assert data == p.LiteralData(b"abc") and end == p.LiteralEnd()
    assert p.literal_header(literal) == header


def test_literal_header_recalculated() -> None:
    assert p.literal_header(p.Literal(5), 12) == b"{12}\r\n"
    assert p.literal_header(p.Literal(5), sync=False) == b"{5+}\r\n"
    assert p.literal_header(p.Literal(5, binary=True)) == b"~{5}\r\n"


@pytest.mark.parametrize("size", [2**32, 2**32 - 1, 2**64, 10**19])
def test_huge_literal_sizes_refused(size: int) -> None:
    with pytest.raises(p.ImapProtocolError, match="over the limit"):
        events([b"a APPEND INBOX {%d}\r\n" % size], max_literal=1 << 30)


def test_more_than_20_digits_is_not_a_literal() -> None:
    [segment] = events([b"a NOOP {" + b"9" * 30 + b"}\r\n"])
    assert isinstance(segment, p.Segment) and segment.literal is None


def test_line_limit_and_unterminated_literal() -> None:
    with pytest.raises(p.ImapProtocolError, match="longer than 1024"):
        events([b"a " + b"x" * 2000], max_line=1024)
    evs = events([b"a APPEND INBOX {100}\r\nonly ten..", b""])
    assert isinstance(evs[-1], p.ConnectionClosed)
    assert p.LiteralEnd() not in evs


def test_zero_length_literal() -> None:
    assert joined(events([b"a LOGIN {0}\r\n \"\"\r\n"])) == [
        p.Segment(b"a LOGIN ", p.Literal(0), True), p.LiteralEnd(),
        p.Segment(b' ""\r\n', None, False)]


def test_tags_and_sections() -> None:
    assert p.parse_tag(b"a1 append INBOX ") == (b"a1", b"APPEND")
    assert p.parse_tag(b"DONE\r\n") == (b"DONE", b"")
    assert p.body_section(b"* 1 FETCH (BODY[] ") == ("BODY", "", False)
    assert p.body_section(b"* 1 FETCH (UID 3 BINARY[] ") == ("BINARY", "", False)
    assert p.body_section(b"* 1 FETCH (BODY[1.2]<0> ") == ("BODY", "1.2", True)
    assert p.body_section(b"* 1 FETCH (BODY[HEADER.FIELDS (SUBJECT)] ") == (
        "BODY", "HEADER.FIELDS (SUBJECT)", False)
    assert p.body_section(b"* 1 FETCH (RFC822 ") == ("RFC822", "", False)
    assert p.body_section(b"* 1 FETCH (rfc822.text ") == ("RFC822", "TEXT", False)
    assert p.body_section(b"* 1 FETCH (ENVELOPE (NIL ") is None


def test_capabilities_filtered() -> None:
    line = (b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED COMPRESS=DEFLATE CATENATE "
            b"URLAUTH IDLE LITERAL+\r\n")
    assert p.rewrite_capabilities(line, starttls=False) == \
        b"* CAPABILITY IMAP4rev1 IDLE LITERAL+\r\n"
    assert p.rewrite_capabilities(b"a1 OK [CAPABILITY IMAP4rev1 COMPRESS=DEFLATE] hi\r\n",
                                  starttls=True) == b"a1 OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n"
    assert p.rewrite_capabilities(b"* 1 FETCH (FLAGS ())\r\n", starttls=True) == \
        b"* 1 FETCH (FLAGS ())\r\n"


@given(st.lists(st.binary(max_size=30), max_size=5), st.lists(st.integers(1, 30), max_size=20))
@settings(max_examples=200, deadline=None)
def test_literals_roundtrip(literals: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(b"a APPEND X {%d}\r\n" % len(lit) + lit + b"\r\n" for lit in literals)
    chunks, pos = [], 0
    for n in cuts:
        chunks.append(wire[pos:pos + n])
        pos += n
    chunks.append(wire[pos:])
    got = [e.data for e in joined(events([c for c in chunks if c]))
           if isinstance(e, p.LiteralData)]
    assert got == [lit for lit in literals if lit]


def test_clean_text() -> None:
    assert p.clean_text(p.Segment(b"a1 LOGIN x y\r\n"))
    assert p.clean_text(p.Segment(b"a1 LOGIN x y\n"))
    assert p.clean_text(p.Segment(b"a1 APPEND INBOX ", p.Literal(3)))
    for bad in (b"a1 LOGIN x\0y\r\n", b"a1 LOGIN x\ry\r\n", b"a1 NOOP\r\r\n"):
        assert not p.clean_text(p.Segment(bad))
    assert not p.clean_text(p.Segment(b"a1 APPEND \0", p.Literal(3)))


def test_section_search_is_linear_on_hostile_text() -> None:
    import time

    text = b"* 1 FETCH (ENVELOPE (\"" + b"BODY[" * 13_000 + b"\") BODY[] "
    started = time.perf_counter()
    assert p.body_section(text) == ("BODY", "", False)
    assert p.body_section(b"BODY[" * 13_000) is None
    assert time.perf_counter() - started < 0.5
