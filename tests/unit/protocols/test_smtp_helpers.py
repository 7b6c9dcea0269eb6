"""Byte-fixture tables for the sans-IO SMTP helpers (DATA in both directions, replies, xattrs)."""

from __future__ import annotations

import random

import pytest

from avgate.protocols.smtp import (
    MAX_REPLY_SIZE,
    REPLY_BARE_CR,
    REPLY_BARE_LF,
    REPLY_LINE_TOO_LONG,
    REPLY_TOO_BIG,
    DataEncoder,
    DataReceiver,
    Reply,
    decode_data,
    ehlo_keywords,
    encode_data,
    mail_command,
    normalize_line_endings,
    parse_reply,
    parse_xattrs,
    rcpt_command,
    relay_mail_options,
    smtp_path,
    take_reply,
    xattr_commands,
    xtext_decode,
    xtext_encode,
)

# wire bytes after "DATA\r\n" → (content, trailing) in reject mode
RECEIVE = [
    (b".\r\n", b"", b""),
    (b"a\r\n.\r\n", b"a\r\n", b""),
    (b"..x\r\n.\r\n", b".x\r\n", b""),
    (b"...\r\n.\r\n", b"..\r\n", b""),
    (b"..\r\n.\r\n", b".\r\n", b""),
    (b"a\r\n.\r\nQUIT\r\n", b"a\r\n", b"QUIT\r\n"),
    (b"a.\r\nb\r\n.\r\n", b"a.\r\nb\r\n", b""),
    (b"\r\n\r\n.\r\n", b"\r\n\r\n", b""),
]


@pytest.mark.parametrize(("wire", "content", "trailing"), RECEIVE)
@pytest.mark.parametrize("split", [0, 1, 2, 3])
def test_receive_table(wire: bytes, content: bytes, trailing: bytes, split: int) -> None:
    r = DataReceiver()
    if split == 0:
        out = r.feed(wire)
    else:  # every chunking gives the same result
        out = b"".join(r.feed(wire[i:i + split]) for i in range(0, len(wire), split))
    assert r.done and r.problem is None
    assert out == content
    assert r.trailing == trailing


@pytest.mark.parametrize("smuggle", [
    b"a\n.\nMAIL FROM:<x>\r\n", b"a\n.\r\nMAIL FROM:<x>\r\n", b"a\r\n.\nMAIL FROM:<x>\r\n",
    b"a\r.\rMAIL FROM:<x>\r\n", b"a\r.\r\nMAIL FROM:<x>\r\n",
])
def test_smuggled_terminators_are_content(smuggle: bytes) -> None:
    r = DataReceiver(bare_lf="normalize")
    out = r.feed(smuggle)
    assert not r.done  # no early end of data
    out += r.feed(b".\r\n")
    assert r.done and r.problem is None
    assert b"MAIL FROM:<x>" in out
    wire = encode_data(out)
    # only one end-of-data marker, at the very end, in any parser's reading
    for marker in (b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r\n"):
        assert wire.find(marker) in (-1, len(wire) - len(marker))


@pytest.mark.parametrize(("wire", "reply"), [
    (b"a\nb\r\n.\r\n", REPLY_BARE_LF),
    (b"a\rb\r\n.\r\n", REPLY_BARE_CR),
    (b"a\n.\nb\r\n.\r\n", REPLY_BARE_LF),
    (b".\n\r\n.\r\n", REPLY_BARE_LF),
])
def test_bare_line_endings_rejected_after_the_end(wire: bytes, reply: str) -> None:
    r = DataReceiver()
    assert r.feed(wire) == b""
    assert r.done
    assert r.finish() is not None and r.finish().reply == reply  # type: ignore[union-attr]


def test_normalize_mode_rewrites_bare_endings() -> None:
    r = DataReceiver(bare_lf="normalize")
    assert r.feed(b"a\nb\rc\r\n.\r\n") == b"a\r\nb\r\nc\r\n"
    assert r.problem is None


def test_size_limit_reads_to_the_end() -> None:
    r = DataReceiver(max_size=10)
    assert r.feed(b"0123456789\r\n") == b""
    assert not r.done
    r.feed(b"more\r\n.\r\n")
    assert r.done and r.problem is not None and r.problem.reply == REPLY_TOO_BIG
    assert r.size == 18


def test_line_length_limit() -> None:
    r = DataReceiver(max_line_length=5)
    r.feed(b"12345\r\n")
    assert r.problem is None
    r.feed(b"123456\r\n.\r\n")
    assert r.done and r.problem is not None and r.problem.reply == REPLY_LINE_TOO_LONG


def test_bad_mode() -> None:
    with pytest.raises(ValueError):
        DataReceiver(bare_lf="allow")


# content → wire
ENCODE = [
    (b"", b".\r\n"),
    (b"a", b"a\r\n.\r\n"),
    (b"a\r\n", b"a\r\n.\r\n"),
    (b".a\r\n", b"..a\r\n.\r\n"),
    (b"a\r\n.\r\n", b"a\r\n..\r\n.\r\n"),
    (b"a\n.\nb", b"a\r\n..\r\nb\r\n.\r\n"),
    (b"a\r.\rb", b"a\r\n..\r\nb\r\n.\r\n"),
]


@pytest.mark.parametrize(("content", "wire"), ENCODE)
def test_encode_table(content: bytes, wire: bytes) -> None:
    assert encode_data(content) == wire
    assert decode_data(wire) == normalize_line_endings(content) + (
        b"\r\n" if content and not normalize_line_endings(content).endswith(b"\r\n") else b"")


REPLIES = [
    ("250 2.0.0 Ok", Reply(250, ("2.0.0 Ok",))),
    ("550 5.7.1 Virus found: X", Reply(550, ("5.7.1 Virus found: X",))),
    ("250-a\r\n250 b", Reply(250, ("a", "b"))),
    ("421", Reply(421, ("",))),
]


@pytest.mark.parametrize(("text", "reply"), REPLIES)
def test_reply_table(text: str, reply: Reply) -> None:
    assert parse_reply(text) == reply
    assert parse_reply(reply.render()) == reply


@pytest.mark.parametrize("bad", ["", "hello", "99 x", "250-a\r\n251 b", "2500 x"])
def test_bad_replies(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_reply(bad)


def test_reply_render_strips_injection() -> None:
    assert "\r\n" not in Reply(550, ("a\r\nRCPT TO:<x>",)).render()
    assert Reply(451, ("a", "b")).render() == "451-a\r\n451 b"


def test_xtext_and_xattrs() -> None:
    assert xtext_encode("a b+c=") == "a+20b+2Bc+3D"
    assert xtext_decode("a+20b+2Bc+3D") == "a b+c="
    assert parse_xattrs("NAME=mx.test addr=192.0.2.1") == {"NAME": "mx.test",
                                                           "ADDR": "192.0.2.1"}
    for bad in ("", "NAME", "BOGUS=1"):
        with pytest.raises(ValueError):
            parse_xattrs(bad)
    attrs = {"NAME": "mx.test", "ADDR": "192.0.2.1", "IDENT": "x y"}
    assert xattr_commands("XFORWARD", attrs, ["NAME", "ADDR"]) == [
        "XFORWARD NAME=mx.test ADDR=192.0.2.1"]
    lines = xattr_commands("XFORWARD", {"NAME": "n" * 300, "HELO": "h" * 300},
                           ["NAME", "HELO"])
    assert len(lines) == 2 and all(len(x) <= 500 for x in lines)


def test_ehlo_and_mail_options() -> None:
    kws = ehlo_keywords("mx.test\nPIPELINING\nSIZE 1000\n8BITMIME\nXFORWARD NAME ADDR")
    assert kws == {"PIPELINING": "", "SIZE": "1000", "8BITMIME": "", "XFORWARD": "NAME ADDR"}
    assert relay_mail_options(["BODY=8BITMIME", "SIZE=10", "SMTPUTF8"], kws) == [
        "BODY=8BITMIME", "SIZE=10"]
    assert relay_mail_options(["BODY=8BITMIME"], {}) == []


@pytest.mark.parametrize(("content", "wire"), ENCODE)
@pytest.mark.parametrize("split", [1, 2, 3, 1000])
def test_encoder_in_chunks_equals_encode_data(content: bytes, wire: bytes, split: int) -> None:
    enc = DataEncoder()
    out = b"".join(enc.feed(content[i:i + split]) for i in range(0, len(content), split))
    assert out + enc.finish() == wire


def test_encoder_random_chunkings() -> None:
    rng = random.Random(7)
    pieces = [b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.", b"..", b"xyz", b"\r\n.\r\n"]
    for _ in range(3000):
        content = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(len(content) + 1), min(len(content), 3)))
        enc, out, prev = DataEncoder(), b"", 0
        for c in [*cuts, len(content)]:
            out += enc.feed(content[prev:c])
            prev = c
        assert out + enc.finish() == encode_data(content), (content, cuts)


def _read_by_separator(wire: bytes, limit: int, **kw: object) -> tuple[DataReceiver, bytes, int]:
    """Read ``wire`` the way the front-end does (readuntil(separator), read(consumed) after
    a limit overrun, one byte at a line start); (receiver, content, bytes consumed)."""
    r = DataReceiver(**kw)  # type: ignore[arg-type]
    out, pos = b"", 0
    while not r.done and pos < len(wire):
        sep = r.separator
        if sep is None:
            chunk = wire[pos:pos + 1]
        else:
            i = wire.find(sep, pos)
            if i >= 0 and i - pos <= limit:
                chunk = wire[pos:i + len(sep)]
            elif i >= 0 and i - pos < limit + len(sep):
                chunk = wire[pos:i]
            else:
                end = min(len(wire), pos + limit + len(sep)) + 1 - len(sep)
                chunk = wire[pos:max(pos + 1, end)]
        pos += len(chunk)
        out += r.feed(chunk)
    return r, out, pos


def test_separator_reading_never_passes_the_end_of_data() -> None:
    rng = random.Random(11)
    pieces = [b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.", b"..", b"xyz", b"\r\n..x"]
    for _ in range(3000):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        wire = body + b"\r\n.\r\nQUIT\r\n"
        whole = DataReceiver(bare_lf="normalize")
        content = whole.feed(wire)
        r, out, pos = _read_by_separator(wire, rng.choice([1, 4, 7, 64]), bare_lf="normalize")
        assert r.done and pos == len(wire) - len(whole.trailing), wire
        assert out == content and r.trailing == b"", wire


def test_bulk_fast_path_matches_line_by_line() -> None:
    lines = [b"plain line\r\n", b".dot line\r\n", b"..two\r\n", b"\r\n", b"x" * 70 + b"\r\n"]
    wire = b"".join(lines * 50) + b".\r\n"
    bulk, by_line = DataReceiver(), DataReceiver()
    out_bulk = bulk.feed(wire)
    out_lines = b"".join(by_line.feed(x) for x in wire.splitlines(keepends=True))
    assert out_bulk == out_lines == decode_data(wire)
    assert bulk.done and by_line.done and bulk.size == by_line.size
    too_long = DataReceiver(max_line_length=69)
    too_long.feed(wire)
    assert too_long.problem is not None and too_long.problem.reply == REPLY_LINE_TOO_LONG


# -- client side: replies from a byte buffer, commands ---------------------------------------
def test_take_reply_from_a_buffer() -> None:
    buf = bytearray(b"250-first\r\n250-SIZE 10\r\n250 last\r\n354 go\r")
    assert take_reply(buf) == Reply(250, ("first", "SIZE 10", "last"))
    assert take_reply(buf) is None and buf == b"354 go\r"  # incomplete: kept
    buf += b"\n"
    assert take_reply(buf) == Reply(354, ("go",)) and buf == b""
    assert take_reply(bytearray(b"220 bare LF ok\n")) == Reply(220, ("bare LF ok",))


@pytest.mark.parametrize("bad", [b"hello\r\n", b"250-a\r\n251 b\r\n", b"600 x\r\n"])
def test_take_reply_refuses_what_is_not_a_reply(bad: bytes) -> None:
    with pytest.raises(ValueError, match="bad reply"):
        take_reply(bytearray(bad))


def test_take_reply_bounds_an_endless_reply() -> None:
    buf = bytearray(b"250-" + b"x" * 100 + b"\r\n") * (MAX_REPLY_SIZE // 100)
    with pytest.raises(ValueError, match="too long"):
        take_reply(buf)
    assert take_reply(bytearray(b"250-" + b"x" * 1000)) is None  # no line end yet, short


def test_commands() -> None:
    assert smtp_path("") == smtp_path("<>") == b"<>"
    assert smtp_path("j\u00f6rg@b\u00fccher.example") == "<j\u00f6rg@b\u00fccher.example>".encode()
    assert mail_command("a@b.example", ["SIZE=10", "SMTPUTF8"]) == (
        b"MAIL FROM:<a@b.example> SIZE=10 SMTPUTF8")
    assert mail_command("") == b"MAIL FROM:<>"
    assert rcpt_command("c@d.example") == b"RCPT TO:<c@d.example>"
