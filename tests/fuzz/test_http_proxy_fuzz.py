"""Fuzz the HTTP proxy's sans-IO request path: arbitrary bytes (and mutated valid requests)
through h11 and the proxy's head checks either give a well-formed target and forwardable
headers, or a clear refusal (h11's RemoteProtocolError, TargetError with a 4xx/5xx status)
— never another exception; and the relay window always reassembles the body exactly."""

from __future__ import annotations

import os

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avgate.frontends.http_proxy.headers import (
    HOP_BY_HOP,
    TargetError,
    check_head,
    connection_tokens,
    forward_headers,
)
from avgate.spool import Spool
from avgate.trickle import Relay

EXAMPLES = int(os.environ.get("AVGATE_FUZZ_EXAMPLES", "200"))
MAX_HEAD = 4096
VALID = (b"POST http://example.com:8080/up?x=1 HTTP/1.1\r\nHost: example.com\r\n"
         b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nVia: 1.0 other\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")


def run(data: bytes, step: int) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    try:
        for i in range(0, len(data) + 1, step):
            conn.receive_data(data[i:i + step] if i < len(data) else b"")
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA or isinstance(ev, h11.ConnectionClosed | h11.EndOfMessage):
                    break
                if isinstance(ev, h11.Request):
                    check_request(ev)
            if isinstance(ev, h11.ConnectionClosed | h11.EndOfMessage):
                return
    except h11.RemoteProtocolError as exc:
        assert 400 <= exc.error_status_hint < 600


def check_request(req: h11.Request) -> None:
    headers = list(req.headers.raw_items())
    try:
        target = check_head(req.method, req.target, headers, max_request_line=1024,
                            max_header_size=MAX_HEAD)
    except TargetError as exc:
        assert exc.status in (400, 414, 431, 501)
        return
    assert 0 < target.port < 65536
    assert target.host and target.host == target.host.lower()
    if req.method != b"CONNECT":
        assert target.path.startswith("/") and target.url.startswith("http://")
        assert "#" not in target.url
    out = forward_headers(headers, via="fuzz", version=b"1.1", host=target.authority)
    named = connection_tokens(headers)
    for name, _ in out:
        assert name.lower() not in HOP_BY_HOP and name.lower() not in named
    assert [n for n, _ in out].count(b"Host") == 1
    # what goes upstream must be a request h11 itself accepts to send
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=req.method, target=target.path.encode("ascii")
                            if req.method != b"CONNECT" else req.target, headers=out))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048), st.integers(1, 64))
def test_random_bytes(data: bytes, step: int) -> None:
    run(data, step)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(VALID)), st.binary(min_size=0, max_size=6)),
                max_size=6), st.integers(1, 64))
def test_mutated_requests(edits: list[tuple[int, bytes]], step: int) -> None:
    buf = bytearray(VALID)
    for pos, repl in edits:
        pos %= len(buf) + 1
        buf[pos:pos + len(repl)] = repl
    run(bytes(buf), step)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=300), max_size=30),
       st.one_of(st.none(), st.integers(0, 3000)), st.integers(0, 2000),
       st.integers(16, 4096))
def test_relay_reassembles(chunks: list[bytes], window: int | None, hold: int,
                           memory: int) -> None:
    data = b"".join(chunks)
    with Spool(memory_limit=memory) as spool:
        relay = Relay(spool, window)
        out = b""
        for chunk in chunks:
            relay.add(chunk)
            out += relay.take(relay.received - hold)
            assert relay.sent <= max(relay.received - hold, 0) or relay.sent == 0
            if window is not None:
                assert relay.buffered_until <= window
        spool.finish()
        out += b"".join(relay.rest(97))
        assert out == data
