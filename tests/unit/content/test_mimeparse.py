"""The fast MIME parser against the email package: the same tree, the same Parts and Problems.

``mimeparse.parse`` must build the Message tree ``BytesParser(policy=compat32)`` builds (or
decline with ``Unsupported``), and ``decompose`` must yield the same items with the fast
path on and off: over the corpus, over benchmark-style messages, and over generated MIME
(nested multiparts, boundaries that are prefixes of each other, CRLF/LF/bare CR, preambles
and epilogues, missing close delimiters, base64 with junk, quoted-printable, odd headers).
Examples per property: AVGATE_FUZZ_EXAMPLES (default 200).
"""

from __future__ import annotations

import base64
import binascii
import os
import quopri
import random
from collections.abc import Iterator
from email.message import Message

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avgate.content import Part, Problem, decompose, mime, mimeparse
from avgate.limits import Limits
from tests.corpus import EICAR, MARKER, corpus, mail, nested_mail

EXAMPLES = int(os.environ.get("AVGATE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LIMITS = Limits()
SMALL = Limits(max_recursion=3, max_files=12)


def tree(msg: Message) -> tuple:
    """Everything of a Message that decomposition can see (preamble and epilogue included)."""
    payload = msg._payload
    body = [tree(m) for m in payload] if isinstance(payload, list) else payload
    return (type(msg), list(msg._headers), msg.get_default_type(), body, msg.preamble,
            msg.epilogue)


def reference(data: bytes) -> Message:
    return mime._PARSER.parsebytes(data)


def items(data: bytes, fast: bool, limits: Limits = LIMITS) -> list[Part | Problem]:
    saved = mime.FAST_PARSE
    mime.FAST_PARSE = fast
    try:
        return list(decompose(data, limits, "m"))
    finally:
        mime.FAST_PARSE = saved


def same(data: bytes, *, must_be_fast: bool = False) -> None:
    """Both parsers agree on ``data``: the tree (unless declined) and what decompose yields."""
    try:
        expected = tree(reference(data))
    except Exception:  # the email package fails: the fast parser must decline as well
        expected = None
    try:
        got = tree(mimeparse.parse(data))
    except mimeparse.Unsupported:
        assert not must_be_fast, "the fast parser declined an ordinary message"
    else:
        assert got == expected
    for limits in (LIMITS, SMALL):
        assert items(data, True, limits) == items(data, False, limits)


# -- fixed messages -------------------------------------------------------------------------
@pytest.mark.parametrize("s", corpus(), ids=lambda s: s.name)
def test_corpus(s) -> None:
    same(s.data, must_be_fast=s.name.endswith(".eml"))


def bench_message(i: int, rng: random.Random) -> bytes:
    """A message as bench/engines.py's make_corpus builds them."""
    text = f"Hello {i}\n".encode() * 600
    if i % 100 == 50:
        text += MARKER
    parts = [b"--b\r\nContent-Type: text/plain\r\n\r\n" + text,
             b"--b\r\nContent-Type: application/octet-stream\r\n"
             b"Content-Transfer-Encoding: base64\r\n\r\n"
             + base64.encodebytes(rng.randbytes(10_000))]
    if i % 100 == 0:
        parts.append(b"--b\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Disposition: attachment; filename=eicar.com\r\n"
                     b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(EICAR))
    return (b"From: a@example.org\r\nTo: b@example.net\r\nSubject: bench\r\n"
            b"Message-ID: <" + str(i).encode() + b"@bench>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
            + b"\r\n".join(parts) + b"\r\n--b--\r\n")


def loadgen_message(i: int, rng: random.Random, eicar: bool) -> bytes:
    """A message like the load generator's: ~6 KB of text, ~13 KB of base64, CRLF."""
    boundary = b"=_b%08x" % rng.getrandbits(32)
    words = b" ".join(rng.choice([b"lorem", b"ipsum", b"invoice", b"report"])
                      for _ in range(1200))
    text = b"\r\n".join(words[j:j + 72] for j in range(0, len(words), 72))
    b64 = base64.b64encode(rng.randbytes(10_000))
    att = b"\r\n".join(b64[j:j + 76] for j in range(0, len(b64), 76))
    lines = [b"From: Load Gen <sender@loadgen.test>", b"To: rcpt@example.test",
             b"Subject: loadgen message %d" % i, b"MIME-Version: 1.0",
             b'Content-Type: multipart/mixed; boundary="' + boundary + b'"', b"",
             b"This is a multi-part message in MIME format.", b"",
             b"--" + boundary, b"Content-Type: text/plain; charset=us-ascii",
             b"Content-Transfer-Encoding: 7bit", b"", text, b"",
             b"--" + boundary, b'Content-Type: application/octet-stream; name="d-%d.bin"' % i,
             b"Content-Transfer-Encoding: base64",
             b'Content-Disposition: attachment; filename="d-%d.bin"' % i, b"", att, b""]
    if eicar:
        lines += [b"--" + boundary, b"Content-Transfer-Encoding: base64",
                  b'Content-Disposition: attachment; filename="eicar.bin"', b"",
                  base64.b64encode(EICAR), b""]
    return b"\r\n".join([*lines, b"--" + boundary + b"--", b""])


def test_benchmark_messages() -> None:
    rng = random.Random(7)
    for i in (0, 1, 50):
        same(bench_message(i, rng), must_be_fast=True)
    for i in range(3):
        same(loadgen_message(i, rng, eicar=i == 2), must_be_fast=True)


def test_fast_path_finds_what_the_reference_finds_in_benchmark_messages() -> None:
    data = bench_message(0, random.Random(1))
    found = [p.path for p in items(data, True) if isinstance(p, Part) and p.data == EICAR]
    assert found == ["m/3/eicar.com"]


@pytest.mark.parametrize("data", [
    # a nested multipart with the outer boundary: its parts end at the first outer line
    b"Content-Type: multipart/mixed; boundary=a\n\n--a\nContent-Type: multipart/mixed;"
    b" boundary=a\n\n--a\n\ninner\n--a--\n--a--\n",
    # boundaries that are prefixes of each other
    b"Content-Type: multipart/mixed; boundary=a\n\n--a\nContent-Type: multipart/mixed;"
    b" boundary=aa\n\n--aa\n\nx\n--a\n\ny\n--aa--\n--a--\n",
    # doubled separators, a close delimiter right after a separator, trailing blanks
    b"Content-Type: multipart/mixed; boundary=z\r\n\r\n--z \t\r\n--z\r\n--z--\r\n\r\nb\r\n--z--",
    # no close delimiter, no start boundary, close delimiter first
    b"Content-Type: multipart/mixed; boundary=q\n\n--q\n\nunterminated",
    b"Content-Type: multipart/mixed; boundary=q\n\npreamble only\n",
    b"Content-Type: multipart/mixed; boundary=q\n\npre\n--q--\nepilogue\n--q\n\nx\n",
    # bare CR: declined (and still the same outcome)
    b"Content-Type: multipart/mixed; boundary=q\n\n--q\n\nx\r--q\n\ny\n--q--\n",
    # digest, message/rfc822, delivery-status, no boundary parameter, From lines
    b"Content-Type: multipart/digest; boundary=d\n\n--d\n\nSubject: x\n\nbody\n--d--\n",
    b"Content-Type: message/rfc822\n\nContent-Type: text/plain\n\nforwarded\n",
    b"Content-Type: message/delivery-status\n\nA: b\n\nC: d\n",
    b"Content-Type: multipart/mixed\n\n--x\n\nbody\n",
    b"From a@b Mon Jan 1\nFrom: a\nFrom x\nSubject: s\n\nbody\n",
    b"Subject: s\nFrom x\n\nbody\n",
    b" continuation first\n:no name\nX: y\n z\nnot a header\nbody\n",
])
def test_corner_cases(data: bytes) -> None:
    same(data)
    same(data.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n"))


def test_deep_nesting_is_left_to_the_email_package() -> None:
    depth = mimeparse.MAX_DEPTH + 5
    data = (b"Content-Type: multipart/mixed; boundary=b0\n\n"
            + b"".join(b"--b%d\nContent-Type: multipart/mixed; boundary=b%d\n\n" % (i, i + 1)
                       for i in range(depth)) + b"--b%d\n\ndeep\n" % depth)
    with pytest.raises(mimeparse.Unsupported):
        mimeparse.parse(data)
    same(data)


def test_duplicate_boundary_messages_agree() -> None:
    for s in corpus():
        if "duplicate" in s.name:
            same(s.data, must_be_fast=True)
    same(mail(attachments=[("a.txt", b"alpha")], boundary="x") .replace(
        b'boundary="x"', b'boundary="x"; boundary="y"'))


# -- generated messages ---------------------------------------------------------------------
NAMES = st.sampled_from(["a.txt", "eicar.com", "r\u00e9sum\u00e9.pdf", "x y.zip", ""])


@st.composite
def mime_messages(draw: st.DrawFn) -> bytes:
    """A MIME message, mostly well formed, with the irregularities parsers disagree on."""
    newline = draw(st.sampled_from([b"\r\n", b"\n"]))
    base = draw(st.text("ab=_-.:'()+,/?", min_size=1, max_size=4)).encode()
    pool = [base, base + b"a", base + b"-", base + b"--", b"=_" + base, b"x" + base]
    junk_lines = st.sampled_from([b"", b" ", b"--", b"---", b"text line", b"--" + base + b"x",
                                  b"--" + base + b"-- x", b"Content-Type: text/plain",
                                  b"begin 644 f.bin", b"=41=42", b"From someone", b"\t"])
    pieces: list[bytes] = []

    def line(text: bytes) -> None:
        nl = newline if draw(st.integers(0, 39)) else draw(st.sampled_from(
            [b"\r\n", b"\n", b"\r", b""]))
        pieces.append(text + nl)

    def leaf() -> None:
        kind = draw(st.sampled_from(["plain", "base64", "qp", "uu", "raw"]))
        payload = draw(st.sampled_from([EICAR, b"hello world", b"", bytes(range(256))]))
        name = draw(NAMES)
        disposition = draw(st.sampled_from([
            "", f'attachment; filename="{name}"', f"attachment; filename={name}",
            f"attachment; filename*=UTF-8''{name}", f'inline;\r\n\tfilename="{name}"']))
        if kind == "plain":
            line(b"Content-Type: text/plain; charset=us-ascii")
        elif kind == "base64":
            line(b"Content-Transfer-Encoding: base64")
            if draw(st.booleans()):
                line(b"Content-Transfer-Encoding: 7bit")
        elif kind == "qp":
            line(b"Content-Transfer-Encoding: quoted-printable")
        elif kind == "uu":
            line(b"Content-Transfer-Encoding: x-uuencode")
        if disposition:
            line(disposition.encode("utf-8").join([b"Content-Disposition: ", b""]))
        line(b"")
        if kind == "base64":
            body = base64.encodebytes(payload)
            if draw(st.booleans()):
                body = body[:len(body) // 2] + draw(st.sampled_from([b"!!", b"=", b"QUE="])) \
                    + body[len(body) // 2:]
        elif kind == "qp":
            body = quopri.encodestring(payload)
        elif kind == "uu":
            body = b"begin 644 f\n" + binascii.b2a_uu(payload[:45]) + b"`\nend\n"
        else:
            body = payload if kind == "raw" else b"plain text"
        for text in body.split(b"\n"):
            line(text)

    def entity(depth: int) -> None:
        choice = draw(st.integers(0, 9)) if depth < 4 else 0
        if depth == 0:
            choice = max(choice, 4)  # a multipart or message/rfc822 at the top
        for _ in range(draw(st.integers(0, 2))):
            line(draw(st.sampled_from([b"Subject: s", b"X-A: b", b" folded", b"From x"])))
        if choice < 4:
            leaf()
            return
        if choice == 9:
            line(b"Content-Type: message/rfc822")
            line(b"")
            entity(depth + 1)
            return
        boundary = draw(st.sampled_from(pool))
        subtype = draw(st.sampled_from([b"mixed", b"alternative", b"digest"]))
        quote = b'"' if draw(st.booleans()) else b""
        line(b"Content-Type: multipart/" + subtype + b"; boundary=" + quote + boundary + quote)
        line(b"")
        for _ in range(draw(st.integers(0, 2))):
            line(draw(junk_lines))  # preamble
        for _ in range(draw(st.sampled_from([0, 1, 2, 2, 3, 3]))):
            line(b"--" + boundary + draw(st.sampled_from([b"", b" ", b"\t ", b"--"])))
            if draw(st.integers(0, 5)) == 0:
                line(b"--" + boundary)  # a doubled separator
            entity(depth + 1)
            for _ in range(draw(st.integers(0, 1))):
                line(draw(junk_lines))
        if draw(st.integers(0, 3)):
            line(b"--" + boundary + b"--")
            for _ in range(draw(st.integers(0, 2))):
                line(draw(junk_lines))  # epilogue

    line(b"From: a@b")
    line(b"MIME-Version: 1.0")
    entity(0)
    data = b"".join(pieces)
    if draw(st.integers(0, 4)) == 0:  # a few random bytes somewhere
        pos = draw(st.integers(0, len(data)))
        data = data[:pos] + draw(st.binary(max_size=6)) + data[pos:]
    return data


@FUZZ
@given(mime_messages())
def test_generated_messages(data: bytes) -> None:
    same(data)


@FUZZ
@given(st.sampled_from([s.data for s in corpus() if s.name.endswith(".eml")]),
       st.lists(st.tuples(st.integers(0, 10**6), st.binary(max_size=8)), max_size=4))
def test_mutated_mail(data: bytes, edits: list[tuple[int, bytes]]) -> None:
    for pos, insert in edits:
        pos %= len(data) + 1
        data = data[:pos] + insert + data[pos + len(insert) // 2:]
    same(data)


# -- parameters -----------------------------------------------------------------------------
PARAM_VALUES = st.text(" \t\"\\;<>=*'%aZ09._-\r\n\u00e9", max_size=8)


@st.composite
def parameter_lists(draw: st.DrawFn) -> str:
    head = draw(st.sampled_from(["attachment", "multipart/mixed", "filename", "boundary",
                                 "inline ", "a=b", ""]))
    out = [head]
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["filename", "FileName", "name", "boundary", "size",
                                     "filename*", "name*0", "x"]))
        value = draw(PARAM_VALUES)
        if draw(st.booleans()):
            value = f'"{value}"'
        before = draw(st.sampled_from(["", " ", "\r\n\t"]))
        equals = draw(st.sampled_from(["=", " = ", "=\t"]))
        out.append(before + name + equals + value)
    return ";".join(out) + draw(st.sampled_from(["", ";", " "]))


def stdlib_filename(msg: Message) -> str | None:
    return msg.get_filename()


@FUZZ
@given(parameter_lists())
def test_parameters_match_the_email_package(value: str) -> None:
    msg = Message()
    msg["Content-Type"] = value
    msg["Content-Disposition"] = value
    try:
        name = mimeparse.filename(msg)
    except mimeparse.Unsupported:
        pass
    else:
        assert name == stdlib_filename(msg)
    try:
        boundary = mimeparse.param(msg, "content-type", "boundary")
    except mimeparse.Unsupported:
        pass
    else:
        assert (boundary.rstrip() if boundary is not None else None) == msg.get_boundary()


def test_common_parameter_lists_take_the_fast_path() -> None:
    msg = Message()
    msg["Content-Type"] = 'application/octet-stream; name="d-1.bin"'
    msg["Content-Disposition"] = 'attachment;\r\n\tfilename="d-1.bin"; size=10'
    assert mimeparse.filename(msg) == "d-1.bin"
    msg.replace_header("Content-Type", "multipart/mixed; boundary=\"=_b0a1\"")
    assert mimeparse.param(msg, "content-type", "boundary") == "=_b0a1"


def _all_parts(data: bytes) -> Iterator[Part]:
    return (i for i in decompose(data, LIMITS, "m") if isinstance(i, Part))


def test_nested_rfc822_takes_the_fast_path() -> None:
    data = nested_mail(mail(attachments=[("eicar.com", EICAR)]))
    same(data, must_be_fast=True)
    assert [p.path for p in _all_parts(data) if p.data == EICAR] == ["m/2/2/eicar.com"]


# -- linear parameter parsing and the part limit --------------------------------------------
PARAM_TEXT = st.text('";\\= a\t\'*', max_size=40)


@FUZZ
@given(st.one_of(PARAM_TEXT, parameter_lists()))
def test_parse_params_is_the_stdlib_parseparam(value: str) -> None:
    import email.message

    assert mimeparse.parse_params(value) == email.message._parseparam(value)  # type: ignore[attr-defined]


@FUZZ
@given(parameter_lists())
def test_mime_message_params_match_the_email_package(value: str) -> None:
    ours, theirs = mimeparse.MimeMessage(), Message()
    for msg in (ours, theirs):
        msg["Content-Type"] = value
        msg["Content-Disposition"] = value
    for get in (lambda m: m.get_params(), lambda m: m.get_filename(),
                lambda m: m.get_boundary(), lambda m: m.get_content_charset()):
        try:
            expected = get(theirs)
        except Exception as exc:  # the stdlib fails: ours fails alike
            with pytest.raises(type(exc)):
                get(ours)
        else:
            assert get(ours) == expected


@pytest.mark.parametrize("data", [
    # preambles and epilogues: whitespace only, nested, before an outer boundary, CR LF
    b"Content-Type: multipart/mixed; boundary=o\n\n \t\n--o\n\nx\n--o--\n\n\n",
    b"Content-Type: multipart/mixed; boundary=o\n\npre\n\n--o\nContent-Type: multipart/mixed;"
    b" boundary=i\n\ninner pre\n--i\n\ny\n--i--\ninner epi\n\n--o--\nouter epi",
    b"Content-Type: multipart/mixed; boundary=o\n\n--o\nContent-Type: multipart/mixed;"
    b" boundary=i\n\n--i\n\ny\n--i--\n--o\n\nz\n--o--",
    b"Content-Type: multipart/mixed; boundary=o\n\n--o\nContent-Type: multipart/mixed;"
    b" boundary=i\n\nno start boundary\n--o--\nepi\n",
    b"Content-Type: multipart/mixed; boundary=o\n\n--o\nContent-Type: multipart/mixed;"
    b" boundary=i\n\n--i\n\ny\n--i--",
])
def test_preamble_and_epilogue_corner_cases(data: bytes) -> None:
    same(data)
    same(data.replace(b"\n", b"\r\n"))


def test_both_parsers_stop_at_the_part_limit() -> None:
    data = (b"Content-Type: multipart/mixed; boundary=b\n\n" + b"--b\n\nx\n" * 30 + b"--b--\n")
    assert len(mimeparse.parse(data, 30).get_payload()) == 30
    assert len(mimeparse.parse_email_package(data, 30).get_payload()) == 30
    with pytest.raises(mimeparse.TooManyParts):
        mimeparse.parse(data, 29)
    with pytest.raises(mimeparse.TooManyParts):
        mimeparse.parse_email_package(data, 29)
    # an enclosed message is an entity too
    nested = b"Content-Type: message/rfc822\n\nContent-Type: text/plain\n\nx\n"
    with pytest.raises(mimeparse.TooManyParts):
        mimeparse.parse(nested, 0)
    with pytest.raises(mimeparse.TooManyParts):
        mimeparse.parse_email_package(nested, 0)
    assert tree(mimeparse.parse(nested, 1)) == tree(mimeparse.parse_email_package(nested, 1))
