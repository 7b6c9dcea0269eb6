"""Fuzz the milter codec: arbitrary bytes never crash it, valid packets round-trip.

Bounded: ``AVGATE_FUZZ_EXAMPLES`` examples per property (default 200).
"""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avgate.errors import ProtocolError
from avgate.protocols import milter as m

EXAMPLES = int(os.environ.get("AVGATE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
MAX_PACKET = 4096


def _drain(reader: m.MilterServer | m.MilterClient, chunks: list[bytes]) -> int:
    """Feed ``chunks`` then EOF; return events seen. Only ProtocolError may escape."""
    n = 0
    try:
        for chunk in [*chunks, b""]:
            reader.receive_data(chunk)
            while reader.next_event() is not None:
                n += 1
                assert n < 100_000
    except ProtocolError as exc:
        assert exc.reply_hint == "close"
    return n


@FUZZ
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=8))
def test_random_bytes_never_crash_server(chunks: list[bytes]) -> None:
    s = m.MilterServer(max_packet=MAX_PACKET)
    s.negotiated = m.OptNeg(6, 0, 0)
    _drain(s, chunks)


@FUZZ
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=8))
def test_random_bytes_never_crash_client(chunks: list[bytes]) -> None:
    _drain(m.MilterClient(max_packet=MAX_PACKET), chunks)


@FUZZ
@given(st.sampled_from(sorted(m.COMMANDS)), st.binary(max_size=200))
def test_well_framed_random_payloads(code: int, payload: bytes) -> None:
    """A packet with a known command and any payload: an event that re-encodes to the same
    bytes, or a ProtocolError (strict parsing, no silent repair)."""
    wire = struct.pack(">I", len(payload) + 1) + bytes([code]) + payload
    s = m.MilterServer()
    s.negotiated = m.OptNeg(6, 0, 0)
    s.receive_data(wire)
    try:
        ev = s.next_event()
    except ProtocolError:
        return
    assert ev is not None
    assert m.encode(ev) == wire


text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
               max_size=40)
nul_free = st.binary(max_size=60).map(lambda b: b.replace(b"\0", b""))
header_name = nul_free.filter(bool)
commands = st.one_of(
    st.builds(m.Helo, text),
    st.builds(m.Mail, st.lists(text, min_size=1, max_size=3).map(tuple)),
    st.builds(m.Rcpt, st.lists(text, min_size=1, max_size=3).map(tuple)),
    st.builds(m.Header, header_name, nul_free),
    st.builds(m.Body, st.binary(max_size=200)),
    st.builds(m.EndOfMessage, st.binary(max_size=50)),
    st.builds(m.Macro, st.sampled_from([b"C", b"M", b"E"]),
              st.lists(st.tuples(text, text), max_size=3).map(tuple)),
    st.builds(m.Connect, text, st.sampled_from(["4", "6", "L"]),
              st.integers(0, 65535), text),
    st.just(m.Abort()), st.just(m.Quit()), st.just(m.Data()),
)


@FUZZ
@given(st.lists(commands, max_size=20), st.integers(1, 64))
def test_command_streams_round_trip_in_any_split(events: list[m.Packet], step: int) -> None:
    wire = b"".join(m.encode(e) for e in events)
    s = m.MilterServer()
    s.negotiated = m.OptNeg(6, 0, 0)
    got = []
    for i in range(0, len(wire), step):
        s.receive_data(wire[i:i + step])
        while (ev := s.next_event()) is not None:
            got.append(ev)
    assert got == events


@FUZZ
@given(st.lists(commands, max_size=12), st.lists(st.integers(1, 80), min_size=1, max_size=8),
       st.sampled_from([bytes, bytearray, memoryview]))
def test_reads_of_any_size_and_buffer_type_give_the_events(
        events: list[m.Packet], steps: list[int], kind: type) -> None:
    """Reads of varying sizes (whole packets, several, a packet split across reads) as
    bytes, bytearray or memoryview: the same events, and the caller may reuse its buffer."""
    wire = b"".join(m.encode(e) for e in events)
    s = m.MilterServer()
    s.negotiated = m.OptNeg(6, 0, 0)
    got = []
    pos = i = 0
    while pos < len(wire):
        step = steps[i % len(steps)]
        chunk = bytearray(wire[pos:pos + step])
        s.receive_data(kind(chunk))
        chunk[:] = b"\0" * len(chunk)  # reused by the caller before the events are read
        while (ev := s.next_event()) is not None:
            got.append(ev)
        pos += step
        i += 1
    assert got == events and s.buffered == 0
