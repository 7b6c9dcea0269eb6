"""The client IDSESSION codec under arbitrary replies: it returns only replies to requests
that are outstanding, each at most once, or raises ClamdProtocolError and stays broken.
Bounded: ``AVGATE_FUZZ_EXAMPLES`` examples per property (default 200)."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from avgate.protocols.clamd import ClamdProtocolError, ClientSession

EXAMPLES = int(os.environ.get("AVGATE_FUZZ_EXAMPLES", "200"))

REPLY_TEXT = st.sampled_from([
    "stream: OK", "stream: Eicar-Test-Signature FOUND", "fd[7]: OK", "PONG",
    "INSTREAM size limit exceeded. ERROR", "COMMAND READ TIMED OUT", "UNKNOWN COMMAND",
]) | st.text(max_size=40)
REPLY = st.one_of(
    st.tuples(st.integers(-2, 12), REPLY_TEXT).map(
        lambda t: f"{t[0]}: {t[1]}".encode("utf-8", "surrogatepass") + b"\0"),
    st.binary(max_size=60),
)


@settings(max_examples=EXAMPLES, deadline=None)
@given(requests=st.integers(1, 6), replies=st.lists(REPLY, max_size=8),
       cuts=st.lists(st.integers(1, 50), max_size=20))
def test_only_outstanding_requests_get_replies(requests: int, replies: list[bytes],
                                               cuts: list[int]) -> None:
    s = ClientSession(max_reply_length=256)
    s.open()
    ids = [s.request("INSTREAM")[0] for _ in range(requests)]
    wire = b"".join(replies)
    pieces, pos = [], 0
    for cut in cuts:  # arbitrary read boundaries
        pieces.append(wire[pos:pos + cut])
        pos += cut
    pieces.append(wire[pos:])
    answered: list[int] = []
    try:
        for piece in pieces:
            s.receive_data(piece)
            while (reply := s.next_reply()) is not None:
                assert reply.session_id in ids and reply.session_id not in answered
                answered.append(reply.session_id)
    except ClamdProtocolError:
        assert s.broken and not s.idle
        return
    assert s.outstanding == set(ids) - set(answered)
    assert s.idle == (not s.outstanding and not s.pending and not s.broken)
