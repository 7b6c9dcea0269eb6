"""avgate.content.simplemail: the parts of a simple mail, read without the decomposer, are
exactly the parts decompose() yields — for every mail it accepts (hypothesis over generated
multipart mails and over mutations an attacker would make to slip a part past the check),
and it does accept the mail shapes it is for."""

from __future__ import annotations

import base64
import binascii
import os
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as fuzz_settings
from hypothesis import strategies as st

from avgate import content
from avgate.content import Part, decompose, join_path
from avgate.content.simplemail import MAX_SIZE, simple_mail_parts
from avgate.limits import Limits

LIMITS = Limits()
EXAMPLES = int(os.environ.get("AVGATE_FUZZ_EXAMPLES", "200"))
EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")


def b64(data: bytes, eol: bytes = b"\r\n") -> bytes:
    s = base64.b64encode(data)
    return eol.join(s[i:i + 76] for i in range(0, len(s), 76))


def multipart(parts: list[tuple[list[bytes], bytes]], *, boundary: bytes = b"=_b1234",
              preamble: bytes = b"This is a multi-part message in MIME format.",
              epilogue: bytes = b"", eol: bytes = b"\r\n",
              ctype: bytes = b"multipart/mixed") -> bytes:
    lines = [b"From: a@example.org", b"To: b@example.com", b"Subject: test",
             b"MIME-Version: 1.0", ctype + b'; boundary="' + boundary + b'"', b""]
    lines[4] = b"Content-Type: " + lines[4]
    if preamble:
        lines += [preamble, b""]
    for headers, body in parts:
        lines += [b"--" + boundary, *headers, b"", body, b""]
    lines += [b"--" + boundary + b"--", epilogue]
    return eol.join(lines)


TEXT = ([b"Content-Type: text/plain; charset=us-ascii", b"Content-Transfer-Encoding: 7bit"],
        b"Hello,\r\n\r\nplease find the report attached.\r\n")
PDF_LIKE = ([b'Content-Type: application/octet-stream; name="report.bin"',
             b"Content-Transfer-Encoding: base64",
             b'Content-Disposition: attachment; filename="report.bin"'],
            b64(bytes(range(256)) * 8))


@contextmanager
def long_way() -> Iterator[None]:
    """decompose() without its own use of the shortcut: what the decomposers yield."""
    content.SIMPLE_MAIL = False
    try:
        yield
    finally:
        content.SIMPLE_MAIL = True


def full(data: bytes, limits: Limits = LIMITS, name: str = "") -> tuple[Part | object, ...]:
    with long_way():
        return tuple(decompose(data, limits, name=name))


def test_decompose_reads_a_simple_mail_the_short_way_under_any_name() -> None:
    assert content.SIMPLE_MAIL_MAX == MAX_SIZE
    data = multipart([TEXT, PDF_LIKE])
    for name in ("", "msg", "a/b.eml"):
        short = simple_mail_parts(data, LIMITS, name)
        assert short is not None and short[3].path == join_path(name, "2/report.bin")
        assert tuple(decompose(data, LIMITS, name)) == short == full(data, LIMITS, name)


# -- examples -----------------------------------------------------------------------------------
def test_the_load_generators_mail_is_read_as_decompose_reads_it() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "shared" / "peers"))
    try:
        import loadgen
    except ImportError:
        pytest.skip("the peer kit's load generator is not beside the project")
    finally:
        sys.path.pop(0)
    rng = random.Random(7)
    for i, kind in enumerate(("clean", "eicar", "marker")):
        data = loadgen.make_message(i, kind, rng)
        parts = simple_mail_parts(data, LIMITS)
        assert parts is not None and parts == full(data), kind
        assert [p.path for p in parts][:4] == ["", "preamble", "1", f"2/data-{i}.bin"]


def test_text_and_attachments_are_decoded_with_names_and_types() -> None:
    exe = ([b"Content-Type: application/x-msdownload;\r\n\tname=\"setup.exe\"",
            b"Content-Transfer-Encoding: base64",
            b"Content-Disposition: attachment;\r\n filename=\"Setup 2.exe\""],
           b64(b"MZ\x90\x00" + bytes(300)))
    qp = ([b"Content-Type: text/plain; charset=utf-8",
           b"Content-Transfer-Encoding: quoted-printable"], b"caf=C3=A9 =3D soon=\r\nly\r\n")
    eicar = ([b"Content-Type: application/octet-stream", b"Content-Transfer-Encoding: base64",
              b"Content-Disposition: attachment; filename=eicar.com"], b64(EICAR))
    data = multipart([TEXT, exe, qp, eicar], epilogue=b"trailing words\r\n")
    parts = simple_mail_parts(data, LIMITS)
    assert parts is not None and parts == full(data)
    assert [(p.path, p.content_type) for p in parts] == [
        ("", ""), ("preamble", ""), ("1", "text/plain"),
        ("2/Setup 2.exe", "application/x-msdownload"), ("3", "text/plain"),
        ("4/eicar.com", "application/octet-stream"), ("epilogue", "")]
    assert parts[3].data.startswith(b"MZ\x90\x00") and parts[5].data == EICAR
    assert parts[4].data == "café = soonly\r\n\r\n".encode()
    # LF line ends, unquoted boundary, alternative
    lf = multipart([TEXT], ctype=b"multipart/alternative").replace(
        b'boundary="=_b1234"', b"boundary=b1234").replace(b"=_b1234", b"b1234").replace(
        b"\r\n", b"\n")
    assert simple_mail_parts(lf, LIMITS) == full(lf) and simple_mail_parts(lf, LIMITS)


@pytest.mark.parametrize("data", [
    # nested multipart, enclosed mail, HTML and archives: the decomposer reads further
    multipart([([b"Content-Type: multipart/alternative; boundary=inner"],
                b"--inner\r\nContent-Type: text/plain\r\n\r\nx\r\n--inner--")]),
    multipart([([b"Content-Type: message/rfc822"], b"Subject: inner\r\n\r\nbody")]),
    multipart([([b"Content-Type: text/html"], b"<html><body>hi</body></html>")]),
    multipart([([b"Content-Type: application/zip", b"Content-Transfer-Encoding: base64"],
                b64(b"PK\x03\x04" + bytes(40)))]),
    multipart([([b"Content-Type: text/plain"], b"begin 644 a.exe\r\n#0V%T\r\n`\r\nend")]),
    # what makes the decomposer read the message a second way
    multipart([TEXT]).replace(b'boundary="=_b1234"', b'boundary="x"; boundary="=_b1234"'),
    # (a plain mail too: the decomposer reads its body as a multipart on the last boundary)
    b"From: a@b\nSubject: x\n\nhello\nContent-Type: text/plain; boundary=a; boundary=b\nbye\n",
    multipart([([b"Content-Type: text/plain"], b"Content-Type : text/plain")]),
    multipart([([b"Content-Type: text/plain"],
                b"Content-Type: message/partial; id=1; number=1")]),
    # parameters readers disagree on
    multipart([([b"Content-Type: application/octet-stream; name*=utf-8''a.exe"], b"x")]),
    multipart([([b'Content-Disposition: attachment; filename="=?utf-8?q?a.exe?="'], b"x")]),
    multipart([([b'Content-Disposition: attachment; filename="a.txt"; filename="a.exe"'],
                b"x")]),
    multipart([([b"Content-Type: text/plain", b"Content-Type: application/x-msdownload"],
                b"x")]),
    multipart([([b"Content-Type: text/plain", b"Content-Transfer-Encoding: base64",
                 b"Content-Transfer-Encoding: 7bit"], b"TVo=")]),
    # delimiters that are not exactly lines, a missing close, base64 with two readings
    multipart([TEXT]).replace(b"\r\n--=_b1234\r\nContent-Type: text/plain",
                              b"\r\n--=_b1234 \r\nContent-Type: text/plain"),
    multipart([TEXT]).replace(b"--=_b1234--", b""),
    multipart([TEXT]).replace(b"attached.", b"attached. --=_b1234"),
    multipart([([b"Content-Transfer-Encoding: base64"], b"TVo=TVqQ")]),
    multipart([TEXT]).replace(b"please", b"pl\xc3\xa9ase"),  # not ASCII
    multipart([TEXT]).replace(b"Subject: test\r\n", b"Subject: test\n"),  # mixed line ends
    multipart([TEXT] * 70),  # more parts than the shortcut reads
    multipart([PDF_LIKE]) + b"x" * MAX_SIZE,  # too big for the event loop
])
def test_anything_else_is_left_to_the_decomposer(data: bytes) -> None:
    assert simple_mail_parts(data, LIMITS) is None


def test_limits_that_would_refuse_a_part_disable_it() -> None:
    data = multipart([TEXT, PDF_LIKE])
    parts = simple_mail_parts(data, LIMITS)
    assert parts is not None
    biggest = max(len(p.data) for p in parts[1:])
    assert simple_mail_parts(data, Limits(max_file_size=biggest - 1)) is None
    assert simple_mail_parts(data, Limits(max_files=len(parts) - 2)) is None
    assert simple_mail_parts(data, Limits(max_scan_size=sum(len(p.data) for p in parts) - 1)
                             ) is None
    for limits in (Limits(max_files=len(parts) - 1), Limits(max_recursion=1)):
        assert simple_mail_parts(data, limits) == full(data, limits)


# -- hypothesis ---------------------------------------------------------------------------------
# mostly what the shortcut reads (so that most generated mails are accepted and compared),
# some of what it must leave to the decomposer
NAMES = st.sampled_from([b"a.txt", b"Report 2024.pdf", b"setup.exe", b"invoice.pdf.exe",
                         b"x", b" spaced ", b"..", b"dir/evil.com", b"a\\b.js", b"",
                         b"UPPER.JS", b"semi;colon", b"x.lnk. ", b"q'uote.doc", b"(c).txt"])
PAYLOADS = st.one_of(
    st.sampled_from([b"hello\r\n", b"MZ\x90\x00" + bytes(64), EICAR, b"\x7fELF" + bytes(20),
                     b"", bytes(range(256)), b"conectix" + bytes(20), b"=?utf-8?q?x?=",
                     b"Subject: no\r\n", b"a :b\r\n", b"line\rbare\ncr\r\n"]),
    st.binary(max_size=40),
    st.sampled_from([b"PK\x03\x04" + bytes(30), b"%PDF-1.4\n", b"<html>x</html>",
                     b"begin 644 a.exe\n`\nend\n", b"{\\rtf1 x}"]))
TYPES = st.sampled_from([b"text/plain", b"application/octet-stream", b"application/pdf",
                         b"application/x-msdownload", b"image/png", b"TEXT/Plain",
                         b"text/plain; charset=utf-8", b"application/x-msdownload ",
                         b"text/html", b"message/rfc822", b"multipart/mixed", b"bogus"])


@st.composite
def leaf(draw: st.DrawFn) -> tuple[list[bytes], bytes]:
    headers: list[bytes] = []
    name = draw(st.one_of(st.none(), NAMES))
    ctype = draw(st.one_of(st.none(), TYPES))
    if ctype is not None:
        value = b"Content-Type: " + ctype
        if name is not None and draw(st.booleans()):
            sep = draw(st.sampled_from([b"; ", b";\r\n\t", b";", b" ; "]))
            value += sep + b'name="' + name + b'"'
        headers.append(value)
    payload = draw(PAYLOADS)
    encoding = draw(st.sampled_from([None, b"base64", b"quoted-printable", b"7bit", b"8bit",
                                     b"base64", b"binary", b"x-uue", b"BASE64"]))
    if payload.translate(None, bytes(range(32, 127)) + b"\r\n\t") and draw(
            st.integers(0, 4)):  # mostly encoded, as mail clients send bytes
        encoding = b"base64"
    if encoding is not None:
        headers.append(b"Content-Transfer-Encoding: " + encoding)
    if name is not None and draw(st.booleans()):
        quoted = draw(st.booleans())
        headers.append(b"Content-Disposition: attachment; filename="
                       + (b'"' + name + b'"' if quoted else name))
    if draw(st.booleans()):
        headers.insert(draw(st.integers(0, len(headers))), b"X-Attachment-Id: f_1")
    if encoding is not None and encoding.lower() == b"base64":
        body = b64(payload)
    elif encoding == b"quoted-printable":
        body = binascii.b2a_qp(payload)
    else:
        body = payload
    draw(st.randoms()).shuffle(headers)
    return headers, body


TOKENS = [b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b" :", b";", b"=", b'"', b"--",
          b"--=_b1234", b"--=_b1234--", b"boundary=x", b'; boundary="y"', b"begin 644 a\n",
          b"Content-Type: message/partial; id=1", b"Content-Type: text/plain\r\n",
          b"content-transfer-encoding: base64\r\n", b"name*=", b"=?utf-8?b?YS5leGU=?=",
          b"filename=a.exe", b"\x00", b"\xff", b"\x0c", b"MZ", b"PK\x03\x04", b"<html>",
          b"From x", b"multipart/mixed", b"message/rfc822", b"TVqQ", b"==", b"(comment)"]


@st.composite
def mails(draw: st.DrawFn) -> bytes:
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    parts = draw(st.lists(leaf(), min_size=1, max_size=4))
    parts = [(headers, body.replace(b"\r\n", eol)) for headers, body in parts]
    data = multipart(parts, eol=eol,
                     preamble=draw(st.sampled_from([b"", b"This is MIME.", b"  "])),
                     epilogue=draw(st.sampled_from([b"", b"after", b"\r\n\r\n"])),
                     ctype=draw(st.sampled_from([b"multipart/mixed", b"multipart/related",
                                                 b"multipart/digest"])))
    return data.replace(b"\r\n", eol) if eol == b"\n" else data


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = draw(mails())
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.integers(0, 2))
        if kind == 0:
            data = data[:pos] + draw(st.sampled_from(TOKENS)) + data[pos:]
        elif kind == 1:
            data = data[:pos] + data[pos + draw(st.integers(1, 6)):]
        else:
            data = data[:pos] + draw(st.binary(max_size=4)) + data[pos:]
    return data


LIMIT_SETS = st.sampled_from([LIMITS, Limits(max_files=2), Limits(max_files=3),
                              Limits(max_recursion=1), Limits(max_file_size=300),
                              Limits(max_scan_size=2000)])


@fuzz_settings(max_examples=2 * EXAMPLES, deadline=None,
               suppress_health_check=[HealthCheck.too_slow])
@given(mails(), LIMIT_SETS)
def test_generated_mails_are_read_as_decompose_reads_them(data: bytes, limits: Limits) -> None:
    parts = simple_mail_parts(data, limits)
    if parts is not None:
        assert parts == full(data, limits)


@fuzz_settings(max_examples=2 * EXAMPLES, deadline=None,
               suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), LIMIT_SETS)
def test_mutated_mails_are_never_read_differently(data: bytes, limits: Limits) -> None:
    parts = simple_mail_parts(data, limits)
    if parts is not None:
        assert parts == full(data, limits)


@fuzz_settings(max_examples=EXAMPLES, deadline=None,
               suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from([TEXT, PDF_LIKE]), min_size=1, max_size=5),
       st.sampled_from([b"\r\n", b"\n"]))
def test_the_common_shapes_are_all_accepted(parts: list[tuple[list[bytes], bytes]],
                                            eol: bytes) -> None:
    # not vacuous: text and attachments in any order are read here, and read right
    data = multipart(parts)
    if eol == b"\n":
        data = data.replace(b"\r\n", eol)
    found = simple_mail_parts(data, LIMITS)
    assert found is not None and found == full(data)
