"""ICAP codec: byte fixtures in both directions (parse and encode), errors with their status."""

from __future__ import annotations

import pytest

from avgate.protocols import icap as proto
from avgate.protocols.icap import (
    BodyChunk,
    BodyEnd,
    Headers,
    IcapParser,
    IcapProtocolError,
    PreviewEnd,
    Request,
    Response,
)

REQ_HDR = b"GET http://example.test/a.bin HTTP/1.1\r\nHost: example.test\r\n\r\n"
RES_HDR = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\n"


def events(data: bytes, role: str = "server", step: int = 0) -> list[object]:
    """All events for ``data``, fed whole or ``step`` bytes at a time."""
    p = IcapParser(role)  # type: ignore[arg-type]
    out: list[object] = []
    pieces = [data] if not step else [data[i:i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        p.receive_data(piece)
        out.extend(p)
    return _merge(out)


def _merge(evs: list[object]) -> list[object]:
    merged: list[object] = []
    for ev in evs:
        if isinstance(ev, BodyChunk) and merged and isinstance(merged[-1], BodyChunk):
            merged[-1] = BodyChunk(merged[-1].data + ev.data)
        else:
            merged.append(ev)
    return merged


RESPMOD = (b"RESPMOD icap://icap.test/avscan ICAP/1.0\r\nHost: icap.test\r\nAllow: 204\r\n"
           b"Encapsulated: req-hdr=0, res-hdr=%d, res-body=%d\r\n\r\n"
           % (len(REQ_HDR), len(REQ_HDR) + len(RES_HDR))
           + REQ_HDR + RES_HDR + b"b\r\nhello world\r\n0\r\n\r\n")

# (name, wire bytes, expected events) — requests, server side
REQUEST_TABLE = [
    ("options",
     b"OPTIONS icap://icap.test/avscan ICAP/1.0\r\nHost: icap.test\r\n\r\n",
     [Request("OPTIONS", "icap://icap.test/avscan", Headers([("Host", "icap.test")]))]),
    ("respmod", RESPMOD,
     [Request("RESPMOD", "icap://icap.test/avscan",
              Headers([("Host", "icap.test"), ("Allow", "204"),
                       ("Encapsulated", f"req-hdr=0, res-hdr={len(REQ_HDR)}, "
                                        f"res-body={len(REQ_HDR) + len(RES_HDR)}")]),
              REQ_HDR, RES_HDR, "res-body"),
      BodyChunk(b"hello world"), BodyEnd()]),
    ("reqmod null-body",
     b"REQMOD icap://i/avscan ICAP/1.0\r\nEncapsulated: req-hdr=0, null-body=%d\r\n\r\n"
     % len(REQ_HDR) + REQ_HDR,
     [Request("REQMOD", "icap://i/avscan",
              Headers([("Encapsulated", f"req-hdr=0, null-body={len(REQ_HDR)}")]),
              REQ_HDR, b"", "null-body")]),
    ("preview with ieof",
     b"RESPMOD icap://i/avscan ICAP/1.0\r\nPreview: 5\r\nEncapsulated: res-hdr=0, res-body=%d"
     b"\r\n\r\n" % len(RES_HDR) + RES_HDR + b"5\r\nhello\r\n0; ieof\r\n\r\n",
     [Request("RESPMOD", "icap://i/avscan",
              Headers([("Preview", "5"), ("Encapsulated", f"res-hdr=0, res-body={len(RES_HDR)}")]),
              b"", RES_HDR, "res-body", 5),
      BodyChunk(b"hello"), PreviewEnd(ieof=True), BodyEnd()]),
]


@pytest.mark.parametrize("step", [0, 1, 7])
@pytest.mark.parametrize(("name", "wire", "expected"), REQUEST_TABLE,
                         ids=[t[0] for t in REQUEST_TABLE])
def test_parse_requests(name: str, wire: bytes, expected: list[object], step: int) -> None:
    assert events(wire, step=step) == expected


def test_encode_request_round_trip() -> None:
    wire = proto.encode_request("RESPMOD", "icap://icap.test/avscan",
                                [("Host", "icap.test"), ("Allow", "204")],
                                req_hdr=REQ_HDR, res_hdr=RES_HDR, body="res-body")
    wire += proto.encode_body(b"hello world")
    assert wire == RESPMOD
    assert events(wire)[1:] == [BodyChunk(b"hello world"), BodyEnd()]


def test_preview_then_continue() -> None:
    p = IcapParser("server")
    head = (b"RESPMOD icap://i/avscan ICAP/1.0\r\nPreview: 4\r\n"
            b"Encapsulated: res-body=0\r\n\r\n4\r\nabcd\r\n0\r\n\r\n")
    p.receive_data(head)
    assert isinstance(p.next_event(), Request)
    assert p.next_event() == BodyChunk(b"abcd")
    assert p.next_event() == PreviewEnd(ieof=False)
    assert p.next_event() is proto.NEED_DATA and p.awaiting_continue
    p.continue_body()
    p.receive_data(b"3\r\nefg\r\n0\r\n\r\n")
    assert list(p) == [BodyChunk(b"efg"), BodyEnd()]
    assert p.idle


def test_preview_then_early_answer_next_request() -> None:
    p = IcapParser("server")
    p.receive_data(b"RESPMOD icap://i/s ICAP/1.0\r\nPreview: 0\r\nEncapsulated: res-body=0"
                   b"\r\n\r\n0\r\n\r\n")
    assert [type(e) for e in p] == [Request, PreviewEnd]
    p.skip_body()
    p.receive_data(b"OPTIONS icap://i/s ICAP/1.0\r\n\r\n")
    assert [e.method for e in p if isinstance(e, Request)] == ["OPTIONS"]


# (name, wire, expected status) — malformed requests
BAD_REQUESTS = [
    ("missing encapsulated", b"RESPMOD icap://i/s ICAP/1.0\r\nHost: i\r\n\r\n", 400),
    ("bad chunk size", b"RESPMOD icap://i/s ICAP/1.0\r\nEncapsulated: res-body=0\r\n\r\n"
     b"zz\r\nhello\r\n0\r\n\r\n", 400),
    ("negative chunk size", b"RESPMOD icap://i/s ICAP/1.0\r\nEncapsulated: res-body=0\r\n\r\n"
     b"-5\r\nhello\r\n", 400),
    ("chunk without CRLF", b"RESPMOD icap://i/s ICAP/1.0\r\nEncapsulated: res-body=0\r\n\r\n"
     b"2\r\nhelloXX", 400),
    ("offsets decreasing", b"RESPMOD icap://i/s ICAP/1.0\r\n"
     b"Encapsulated: res-hdr=0, res-body=0\r\n\r\n", 400),
    ("body not last", b"RESPMOD icap://i/s ICAP/1.0\r\n"
     b"Encapsulated: res-body=0, res-hdr=10\r\n\r\n", 400),
    ("bad version", b"RESPMOD icap://i/s ICAP/2.0\r\nEncapsulated: null-body=0\r\n\r\n", 505),
    ("not icap", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("header line without colon", b"OPTIONS icap://i/s ICAP/1.0\r\nbogus\r\n\r\n", 400),
    ("preview overrun", b"RESPMOD icap://i/s ICAP/1.0\r\nPreview: 2\r\n"
     b"Encapsulated: res-body=0\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400),
    ("ieof outside preview", b"RESPMOD icap://i/s ICAP/1.0\r\nEncapsulated: res-body=0"
     b"\r\n\r\n0; ieof\r\n\r\n", 400),
    ("encapsulated header without empty line", b"REQMOD icap://i/s ICAP/1.0\r\n"
     b"Encapsulated: req-hdr=0, null-body=5\r\n\r\nGET /", 400),
]


@pytest.mark.parametrize(("name", "wire", "status"), BAD_REQUESTS, ids=[t[0] for t in BAD_REQUESTS])
def test_malformed_requests(name: str, wire: bytes, status: int) -> None:
    p = IcapParser("server")
    p.receive_data(wire)
    with pytest.raises(IcapProtocolError) as info:
        list(p)
    assert info.value.status == status
    assert info.value.reply_hint == status


def test_huge_header_rejected_without_terminator() -> None:
    p = IcapParser("server", max_header_size=1024)
    p.receive_data(b"OPTIONS icap://i/s ICAP/1.0\r\n" + b"X-Pad: " + b"a" * 2000)
    with pytest.raises(IcapProtocolError, match="larger than 1024"):
        p.next_event()


BODY_START = b"RESPMOD icap://i/s ICAP/1.0\r\nEncapsulated: res-body=0\r\n\r\n"


def test_chunk_size_line_is_bounded() -> None:
    """A chunk-size line (extensions included) longer than MAX_CHUNK_LINE is refused before
    its end arrives: nothing grows with it."""
    p = IcapParser("server")
    p.receive_data(BODY_START + b"5;" + b"x" * proto.MAX_CHUNK_LINE)
    with pytest.raises(IcapProtocolError, match="chunk-size line too long"):
        list(p)
    q = IcapParser("server")
    q.receive_data(BODY_START + b"0" * 17 + b"5\r\n")  # 18 hex digits: no such chunk
    with pytest.raises(IcapProtocolError, match="malformed chunk size"):
        list(q)


def test_chunked_trailer_is_bounded_in_total() -> None:
    """Trailer lines are skipped, but all of them together count against max_header_size:
    an endless trailer of short lines is an error, not an endless message."""
    p = IcapParser("server", max_header_size=1024)
    p.receive_data(BODY_START + b"0\r\n")
    list(p)
    with pytest.raises(IcapProtocolError, match="trailer too large"):
        for _ in range(200):
            p.receive_data(b"X-T: 1\r\n")
            list(p)
    q = IcapParser("server", max_header_size=1024)
    q.receive_data(BODY_START + b"0\r\n" + b"X-T: 1\r\n" * 10 + b"\r\n")
    assert [type(e) for e in q] == [Request, BodyEnd]  # a few trailer lines are fine


def test_encapsulated_headers_are_bounded() -> None:
    p = IcapParser("server", max_header_size=1024)
    p.receive_data(b"RESPMOD icap://i/s ICAP/1.0\r\nEncapsulated: res-hdr=0, res-body=5000"
                   b"\r\n\r\n")
    with pytest.raises(IcapProtocolError, match="encapsulated headers too large"):
        list(p)


def test_eof_mid_body_is_an_error_and_clean_eof_is_not() -> None:
    p = IcapParser("server")
    p.receive_data(b"RESPMOD icap://i/s ICAP/1.0\r\nEncapsulated: res-body=0\r\n\r\n5\r\nhe")
    list(p)
    p.receive_data(b"")
    with pytest.raises(IcapProtocolError, match="closed"):
        p.next_event()
    q = IcapParser("server")
    q.receive_data(b"")
    assert q.next_event() is proto.NEED_DATA and q.idle


def test_big_chunk_is_streamed_not_buffered() -> None:
    p = IcapParser("server")
    p.receive_data(b"RESPMOD icap://i/s ICAP/1.0\r\nEncapsulated: res-body=0\r\n\r\n"
                   b"40000000\r\n")  # a 1 GiB chunk announced
    assert isinstance(p.next_event(), Request)
    for _ in range(3):
        p.receive_data(b"x" * 65536)
        assert p.next_event() == BodyChunk(b"x" * 65536)
        assert p.buffered == 0


def test_chunk_out_of_a_longer_buffer_then_more_data() -> None:
    """A chunk taken from the middle of the buffer is the exact bytes (one copy out), and the
    buffer takes more data afterwards (no view of it is left behind)."""
    p = IcapParser("server")
    body = bytes(range(256)) * 80  # 20 KiB
    p.receive_data(b"RESPMOD icap://i/s ICAP/1.0\r\nEncapsulated: res-body=0\r\n\r\n"
                   + b"%x\r\n" % len(body) + body + b"\r\n5\r\nab")
    assert isinstance(p.next_event(), Request)
    chunk = p.next_event()
    assert chunk == BodyChunk(body) and type(chunk.data) is bytes  # type: ignore[union-attr]
    assert p.next_event() == BodyChunk(b"ab")  # what is there of the second chunk
    p.receive_data(b"cde\r\n0\r\n\r\n")
    assert list(p) == [BodyChunk(b"cde"), BodyEnd()]
    assert p.idle


# -- responses (client side) ---------------------------------------------------------------
BLOCK_HDR = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\n"
RESPONSE_TABLE = [
    ("204", b"ICAP/1.0 204 No Content\r\nISTag: \"x1\"\r\nEncapsulated: null-body=0\r\n\r\n",
     [Response(204, "No Content", Headers([("ISTag", '"x1"'),
                                          ("Encapsulated", "null-body=0")]))]),
    ("100", b"ICAP/1.0 100 Continue\r\n\r\n", [Response(100, "Continue", Headers())]),
    ("200 block page",
     b"ICAP/1.0 200 OK\r\nX-Virus-ID: EICAR\r\nEncapsulated: res-hdr=0, res-body=%d\r\n\r\n"
     % len(BLOCK_HDR) + BLOCK_HDR + b"4\r\nnope\r\n0\r\n\r\n",
     [Response(200, "OK", Headers([("X-Virus-ID", "EICAR"),
                                   ("Encapsulated", f"res-hdr=0, res-body={len(BLOCK_HDR)}")]),
               b"", BLOCK_HDR, "res-body"),
      BodyChunk(b"nope"), BodyEnd()]),
    ("options", b"ICAP/1.0 200 OK\r\nMethods: RESPMOD\r\nPreview: 1024\r\n"
     b"Encapsulated: null-body=0\r\n\r\n",
     [Response(200, "OK", Headers([("Methods", "RESPMOD"), ("Preview", "1024"),
                                   ("Encapsulated", "null-body=0")]))]),
]


@pytest.mark.parametrize("step", [0, 1, 5])
@pytest.mark.parametrize(("name", "wire", "expected"), RESPONSE_TABLE,
                         ids=[t[0] for t in RESPONSE_TABLE])
def test_parse_responses(name: str, wire: bytes, expected: list[object], step: int) -> None:
    assert events(wire, role="client", step=step) == expected


def test_encode_responses() -> None:
    assert proto.encode_response(204, [("ISTag", '"x1"')]) == RESPONSE_TABLE[0][1]
    assert proto.CONTINUE == RESPONSE_TABLE[1][1]
    wire = proto.encode_response(200, [("X-Virus-ID", "EICAR")], res_hdr=BLOCK_HDR,
                                 body="res-body") + proto.encode_body(b"nope")
    assert wire == RESPONSE_TABLE[2][1]
    assert proto.encode_http_response(403, [("Content-Length", "4")]) == BLOCK_HDR


def test_response_stream_of_two() -> None:
    assert [type(e) for e in events(RESPONSE_TABLE[1][1] + RESPONSE_TABLE[0][1], "client")] \
        == [Response, Response]


@pytest.mark.parametrize("wire", [b"ICAP/1.0 2x0 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n",
                                  b"ICAP/1.0 200 OK\r\nEncapsulated: res-body=x\r\n\r\n"])
def test_malformed_responses(wire: bytes) -> None:
    p = IcapParser("client")
    p.receive_data(wire)
    with pytest.raises(IcapProtocolError):
        list(p)


# -- threat names ----------------------------------------------------------------------------
def test_threats_from_headers() -> None:
    p = IcapParser("client")
    p.receive_data(b"ICAP/1.0 200 OK\r\n"
                   b"X-Infection-Found: Type=0; Resolution=2; Threat=Eicar-Test-Signature;\r\n"
                   b"X-Violations-Found: 2\r\n\tfile.zip\r\n\tW32.Foo\r\n\t0\r\n\t2\r\n"
                   b"\tother.exe\r\n\tTrojan.Bar\r\n\t1\r\n\t2\r\n"
                   b"X-Virus-ID: Eicar-Test-Signature\r\nEncapsulated: null-body=0\r\n\r\n")
    resp = p.next_event()
    assert isinstance(resp, Response)
    assert proto.threats_from_headers(resp.headers) == [
        "Eicar-Test-Signature", "W32.Foo", "Trojan.Bar"]
    assert proto.threats_from_headers(Headers([("X-Virus-ID", "no threats")])) == []


def test_http_head_helpers() -> None:
    head = proto.HttpHead.parse(b"HTTP/1.1 403 Forbidden\r\nContent-Type: Text/HTML; charset=x"
                                b"\r\n\r\n")
    assert head.status == 403 and head.media_type == "text/html"
    assert proto.HttpHead.parse(REQ_HDR).url == "http://example.test/a.bin"
    req = Request("RESPMOD", "icap://host:1344/avscan?x=1", Headers([("Allow", "204, 206")]))
    assert req.service == "avscan" and req.allow_204


def test_encode_headers_refuses_injection() -> None:
    with pytest.raises(ValueError):
        proto.encode_headers([("X-Virus-ID", "a\r\nInjected: yes")])


# -- the fast paths (issue 19): the same results as the general ones ----------------------------
@pytest.mark.parametrize(("line", "size"), [(b"a", 10), (b"A", 10), (b"00ff", 255),
                                            (b"F" * 16, 16**16 - 1), (b"10; ext=1", 16)])
def test_chunk_size_lines_accepted(line: bytes, size: int) -> None:
    body = b"x" * min(size, 300)
    p = IcapParser("server", max_header_size=1 << 20)
    p.receive_data(b"RESPMOD icap://i/s ICAP/1.0\r\nEncapsulated: res-body=0\r\n\r\n"
                   + line + b"\r\n" + body)
    assert isinstance(p.next_event(), Request)
    assert p.next_event() == BodyChunk(body)
    assert p._remaining == size - len(body)


@pytest.mark.parametrize("line", [b"0x10", b"0X10", b"1_0", b"+10", b"-1", b" 10x",
                                  b"1" * 17, b"g", b"10;ieof"])
def test_chunk_size_lines_refused(line: bytes) -> None:
    p = IcapParser("server")
    p.receive_data(b"RESPMOD icap://i/s ICAP/1.0\r\nEncapsulated: res-body=0\r\n\r\n"
                   + line + b"\r\nxxxxxxxxxxxxxxxx\r\n0\r\n\r\n")
    with pytest.raises(IcapProtocolError):
        list(p)


def test_header_values_strip_ascii_whitespace_only() -> None:
    """Headers are decoded once per block as latin-1; stripping stays ``bytes.strip()``'s
    (a latin-1 no-break space or \\x1c is part of the value, as before)."""
    head = proto.HttpHead.parse(b"HTTP/1.1 200 OK\r\nX-A: \xa0v\xa0 \t\r\nX-B:\x1cw\r\n"
                                b"X-C: one\r\n \t two\r\n\r\n")
    assert head.headers.get("x-a") == "\xa0v\xa0"
    assert head.headers.get("x-b") == "\x1cw"
    assert head.headers.get("x-c") == "one\ntwo"
    with pytest.raises(IcapProtocolError):
        proto.HttpHead.parse(b"HTTP/1.1 200 OK\r\nX-A : v\r\n\r\n")
    with pytest.raises(IcapProtocolError):
        proto.HttpHead.parse(b"HTTP/1.1 200 OK\r\n\xa0X-A: v\r\n\r\n".replace(b"\xa0", b" "))


def test_encapsulated_values_are_remembered_and_errors_are_not() -> None:
    value = "req-hdr=0, res-hdr=7, res-body=19"
    proto._ENCAP_CACHE.clear()
    first = proto._encapsulated_entries(value)
    assert first == (((b"req-hdr", 0), (b"res-hdr", 7), (b"res-body", 19)), "res-body")
    assert proto._encapsulated_entries(value) is first
    assert first == (tuple(proto.parse_encapsulated(value)[0]), "res-body")
    for _ in range(2):  # a bad value fails every time (nothing cached for it)
        with pytest.raises(IcapProtocolError):
            proto._encapsulated_entries("res-body=1, res-hdr=0")
    assert len(proto._ENCAP_CACHE) == 1
    for i in range(proto._ENCAP_CACHE_SIZE + 5):  # bounded: distinct values do not pile up
        proto._encapsulated_entries(f"req-hdr=0, res-body={i + 1}")
    assert len(proto._ENCAP_CACHE) <= proto._ENCAP_CACHE_SIZE


def test_requests_in_a_row_keep_their_own_fields() -> None:
    """The request head's fields wait in the parser until its encapsulated headers come:
    a request never gets the fields of the one before it."""
    p = IcapParser("server")
    p.receive_data(b"REQMOD icap://i/a ICAP/1.0\r\nPreview: 4\r\nEncapsulated: req-hdr=0, "
                   b"req-body=%d\r\n\r\n" % len(REQ_HDR) + REQ_HDR[:10])
    assert p.next_event() is proto.NEED_DATA
    p.receive_data(REQ_HDR[10:] + b"0; ieof\r\n\r\n"
                   b"OPTIONS icap://i/b ICAP/1.0\r\nEncapsulated: null-body=0\r\n\r\n")
    first = p.next_event()
    assert isinstance(first, Request)
    assert (first.method, first.service, first.preview, first.req_hdr, first.body) == \
        ("REQMOD", "a", 4, REQ_HDR, "req-body")
    assert list(p)[:2] == [PreviewEnd(ieof=True), BodyEnd()]
    p.receive_data(b"RESPMOD icap://i/c ICAP/1.0\r\nEncapsulated: res-hdr=0, null-body=%d"
                   b"\r\n\r\n" % len(RES_HDR) + RES_HDR)
    second = p.next_event()
    assert isinstance(second, Request)
    assert (second.method, second.service, second.preview, second.res_hdr, second.body) == \
        ("RESPMOD", "c", None, RES_HDR, "null-body")


@pytest.mark.parametrize("wire", [
    b"RESPMOD icap://i/s ICAP/1.0\r\nPreview: \xb2\r\nEncapsulated: null-body=0\r\n\r\n",
    b"RESPMOD icap://i/s ICAP/1.0\r\nEncapsulated: res-body=\xb2\r\n\r\n",
])
def test_non_ascii_digits_are_a_400(wire: bytes) -> None:
    """latin-1 "²" is a digit to ``str.isdigit()`` but not to ``int()``: a clear 400, never a
    ValueError."""
    p = IcapParser("server")
    p.receive_data(wire)
    with pytest.raises(IcapProtocolError) as info:
        list(p)
    assert info.value.status == 400


def test_non_ascii_digits_in_responses_and_heads() -> None:
    p = IcapParser("client")
    p.receive_data(b"ICAP/1.0 2\xb20 OK\r\nEncapsulated: null-body=0\r\n\r\n")
    with pytest.raises(IcapProtocolError):
        list(p)
    assert proto.HttpHead.parse(b"HTTP/1.1 2\xb20 OK\r\n\r\n").status == 0
    assert proto.threats_from_headers(Headers([("X-Violations-Found", "\xb2\nf\nEICAR\n0\n0"),
                                               ("X-Virus-ID", "V")])) == ["V"]
