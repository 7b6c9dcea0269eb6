"""Hypothesis fuzzing of the FTP control-channel codec (bounded by AVGATE_FUZZ_EXAMPLES): any
bytes in any pieces give commands/replies or FtpError, never another exception; nothing is
buffered past the line limit; the address parsers accept or refuse, never crash."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from avgate.protocols import ftp as p

EXAMPLES = int(os.environ.get("AVGATE_FUZZ_EXAMPLES", "200"))
ftp_bytes = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"220", b"150-", b" ", b"-",
                                      b"RETR", b"PASV", b"a", b"\x00", b"\xff", b"230 x\r\n"]),
                     max_size=80).map(b"".join) | st.binary(max_size=300)
cuts = st.lists(st.integers(min_value=1, max_value=40), max_size=30)


def pieces(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos = [], 0
    for n in sizes:
        out.append(data[pos:pos + n])
        pos += n
    out.append(data[pos:])
    return [x for x in out if x]


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=ftp_bytes, sizes=cuts)
def test_commands(data: bytes, sizes: list[int]) -> None:
    r = p.CommandReader()
    try:
        for chunk in pieces(data, sizes):
            for cmd in r.feed(chunk):
                assert cmd.verb.isalpha() and cmd.verb.isupper() and 3 <= len(cmd.verb) <= 4
                assert cmd.line.endswith(b"\r\n") and b"\r" not in cmd.line[:-2]
            assert len(r._buf) <= p.MAX_LINE
    except p.FtpError:
        pass


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=ftp_bytes, sizes=cuts)
def test_replies(data: bytes, sizes: list[int]) -> None:
    r = p.ReplyReader()
    try:
        for chunk in pieces(data, sizes):
            for reply in r.feed(chunk):
                assert 0 <= reply.code <= 999 and reply.lines
                assert all(line.endswith(b"\n") for line in reply.lines)
            assert len(r._buf) <= p.MAX_LINE
    except p.FtpError:
        pass


@settings(max_examples=EXAMPLES, deadline=None)
@given(text=st.text(max_size=60) | st.from_regex(r"\(\d{1,3}(,\d{1,3}){5}\)", fullmatch=True))
def test_address_parsers(text: str) -> None:
    for parse in (p.parse_pasv, p.parse_epsv, p.parse_port, p.parse_eprt):
        try:
            value = parse(text)
        except p.FtpError:
            continue
        port = value if isinstance(value, int) else value[1]
        assert 0 < port < 65536
