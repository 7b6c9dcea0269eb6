"""Fuzz the ICAP codec: arbitrary bytes (and mutated valid messages) either parse or raise
IcapProtocolError — never another exception, never unbounded buffering."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avgate.protocols import icap as proto

EXAMPLES = int(os.environ.get("AVGATE_FUZZ_EXAMPLES", "200"))
REQ = (proto.encode_request("RESPMOD", "icap://h/avscan", [("Allow", "204"), ("Preview", "4")],
                            req_hdr=b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
                            res_hdr=b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n",
                            body="res-body")
       + b"4\r\nabcd\r\n0\r\n\r\n4\r\nefgh\r\n0\r\n\r\n")
RESP = (proto.encode_response(200, [("X-Virus-ID", "X")],
                              res_hdr=b"HTTP/1.1 403 Forbidden\r\n\r\n", body="res-body")
        + proto.encode_body(b"page"))


def run(role: str, data: bytes, step: int) -> None:
    p = proto.IcapParser(role, max_header_size=4096)  # type: ignore[arg-type]
    try:
        for i in range(0, len(data), step):
            p.receive_data(data[i:i + step])
            for _ in range(10_000):
                ev = p.next_event()
                if ev is proto.NEED_DATA:
                    if p.awaiting_continue:
                        p.continue_body()
                        continue
                    break
            assert p.buffered <= 4096 + len(data)
        p.receive_data(b"")
        for _ in range(10_000):
            if p.next_event() is proto.NEED_DATA:
                break
    except proto.IcapProtocolError as exc:
        assert exc.status in (400, 505)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048), st.sampled_from(["server", "client"]), st.integers(1, 64))
def test_random_bytes(data: bytes, role: str, step: int) -> None:
    run(role, data, step)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.sampled_from([("server", REQ), ("client", RESP)]),
       st.lists(st.tuples(st.integers(0, 400), st.binary(min_size=0, max_size=4)), max_size=6),
       st.integers(1, 64))
def test_mutated_messages(base: tuple[str, bytes], edits: list[tuple[int, bytes]],
                          step: int) -> None:
    role, data = base
    buf = bytearray(data)
    for pos, repl in edits:
        pos %= len(buf) + 1
        buf[pos:pos + len(repl)] = repl
    run(role, bytes(buf), step)
