"""The FTP control-channel codec (avgate.protocols.ftp): framing, limits, address grammar."""

from __future__ import annotations

import pytest

from avgate.protocols import ftp as p


def test_commands_split_anywhere() -> None:
    r = p.CommandReader()
    assert r.feed(b"US") == []
    assert r.feed(b"ER alice\r\nPASS s3cret\r\nnoop\r\n") == [
        p.Command("USER", "alice"), p.Command("PASS", "s3cret"), p.Command("NOOP", "")]
    assert p.Command("PASS", "s3cret").shown() == "PASS ***"
    assert p.Command("RETR", "a b.txt").line == b"RETR a b.txt\r\n"


@pytest.mark.parametrize("line", [b"RETR\0x\r\n", b"RE\rTR x\r\n", b"12 x\r\n",
                                  b"TOOLONG x\r\n", b"\r\n"])
def test_bad_commands(line: bytes) -> None:
    with pytest.raises(p.FtpError):
        p.CommandReader().feed(line)


def test_line_limit_before_buffering_more() -> None:
    r = p.CommandReader()
    with pytest.raises(p.FtpError, match="longer than"):
        r.feed(b"A" * (p.MAX_LINE + 1))
    with pytest.raises(p.FtpError, match="longer than"):
        p.CommandReader().feed(b"NOOP " + b"x" * p.MAX_LINE + b"\r\n")


def test_replies_single_and_multi_line() -> None:
    r = p.ReplyReader()
    out = r.feed(b"220 ready\r\n211-Features:\r\n MDTM\r\n211 End\r\n150 ")
    assert [x.code for x in out] == [220, 211]
    assert out[1].lines == (b"211-Features:\r\n", b" MDTM\r\n", b"211 End\r\n")
    assert out[1].text == "Features: MDTM End"
    assert r.feed(b"Opening\r\n") == [p.Reply(150, (b"150 Opening\r\n",))]
    assert p.Reply(150, (b"150 x\r\n",)).preliminary
    with pytest.raises(p.FtpError):
        p.ReplyReader().feed(b"hello\r\n")
    long = p.ReplyReader()
    long.feed(b"211-x\r\n")
    with pytest.raises(p.FtpError, match="lines"):
        long.feed(b" y\r\n" * (p.MAX_REPLY_LINES + 1))


def test_passive_and_port_grammar() -> None:
    assert p.parse_pasv("Entering Passive Mode (127,0,0,1,195,80).") == ("127.0.0.1", 50000)
    assert p.parse_epsv("Entering Extended Passive Mode (|||50001|)") == 50001
    assert p.format_pasv("10.1.2.3", 50000) == b"227 Entering Passive Mode (10,1,2,3,195,80).\r\n"
    assert p.format_epsv(2121) == b"229 Entering Extended Passive Mode (|||2121|)\r\n"
    assert p.parse_port("10,0,0,1,4,1") == ("10.0.0.1", 1025)
    assert p.parse_eprt("|1|192.0.2.7|5282|") == ("192.0.2.7", 5282)
    assert p.parse_eprt("|2|::1|5282|") == ("::1", 5282)
    for bad in ("(256,0,0,1,1,1)", "(1,2,3,4,0,0)", "no address"):
        with pytest.raises(p.FtpError):
            p.parse_pasv(bad)
    for bad_port in ("1,2,3,4,5", "1,2,3,4,256,1", "1,2,3,4,0,0", "a,b,c,d,e,f", "1,2,3,4,1,1111"):
        with pytest.raises(p.FtpError):
            p.parse_port(bad_port)
    for bad_eprt in ("|1|::1|21|", "|2|1.2.3.4|21|", "|1|host|21|", "|1|1.2.3.4|0|", "x1x1x",
                     "|1|1.2.3.4|70000|", "a1a1.2.3.4a21a"):
        with pytest.raises(p.FtpError):
            p.parse_eprt(bad_eprt)
    with pytest.raises(p.FtpError):
        p.format_pasv("::1", 21)


def test_reply_text_cannot_split() -> None:
    assert p.reply(550, "virus\r\n226 fine") == b"550 virus 226 fine\r\n"
