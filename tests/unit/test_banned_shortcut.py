"""The banned-type check's shortcut on the event loop (avgate.banned.inspect_simple_mail):
a simple mail is matched as its parts without a worker round trip, and the shortcut never
answers differently from the full decomposition (hypothesis, over mutated mails that an
attacker would shape to slip something past it). The parts themselves are held to
decompose() in tests/unit/test_simplemail.py.
"""

from __future__ import annotations

import os
from email.message import EmailMessage

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as fuzz_settings
from hypothesis import strategies as st

from avgate import config
from avgate.banned import (
    BannedCheck,
    BannedSettings,
    Inspection,
    Matcher,
    compile_rules,
    inspect_bytes,
    inspect_simple_mail,
)
from avgate.content import Part
from avgate.content.simplemail import MAX_SIZE, simple_mail_parts
from avgate.context import Context
from avgate.limits import Limits
from avgate.result import ScanStatus
from avgate.scan import ScanService, VerdictCache
from avgate.spool import Spool
from tests.unit.test_scan_service import CountingEngine
from tests.unit.test_simplemail import full, long_way

LIMITS = Limits()


def long_inspection(data: bytes, matchers: tuple[Matcher, ...], limits: Limits) -> Inspection:
    """The workers' answer, from the decomposers (not decompose()'s own shortcut)."""
    with long_way():
        return inspect_bytes(data, matchers, limits)

SMTP = Context("smtp", sender="someone@example.org", recipients=["user@example.com"])
EXAMPLES = int(os.environ.get("AVGATE_FUZZ_EXAMPLES", "200"))

# the built-in set, and rules that a plain-text mail itself can meet: its declared type,
# the types printable text can be detected as (a VHD/DMG/ISO signature is printable)
SETTINGS = BannedSettings.model_validate({"rules": [
    {"name": "text", "mime_type": "text/*"},
    {"name": "disk", "detected_type": ["img", "iso"]},
    {"name": "named", "filename": "*"},
]})
MATCHERS = compile_rules(SETTINGS)[0]
DEFAULT_MATCHERS = compile_rules(BannedSettings())[0]

PLAIN = (b"From: a@example.org\r\nTo: b@example.com\r\nSubject: hello\r\n"
         b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n"
         b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n"
         b"Content-Transfer-Encoding: 7bit\r\n\r\nHello,\r\n\r\nsee you at noon.\r\n")


def text_mail(body: str = "Hello,\nsee you at noon.\n") -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "a@example.org", "b@example.com", "plain"
    m.set_content(body)
    return m.as_bytes()


def test_plain_text_mail_is_matched_without_decomposing() -> None:
    for data in (PLAIN, PLAIN.replace(b"\r\n", b"\n"), text_mail(),
                 b"Subject: x\n\n", b"From: a@example.org\n\nno type at all\n"):
        found = simple_mail_parts(data, LIMITS)
        assert found is not None and len(found) == 2, data
        for matchers in (MATCHERS, DEFAULT_MATCHERS):
            assert inspect_simple_mail(data, matchers, LIMITS) == long_inspection(
                data, matchers, LIMITS)
    assert simple_mail_parts(PLAIN, LIMITS) == (
        Part("", PLAIN, 0), Part("1", b"Hello,\r\n\r\nsee you at noon.\r\n", 1, "text/plain"))
    assert simple_mail_parts(b"Subject: x\n\nbody\n", LIMITS) == (
        Part("", b"Subject: x\n\nbody\n", 0), Part("1", b"body\n", 1))


def test_a_plain_text_mail_that_a_rule_bans_is_still_banned() -> None:
    # a rule over the declared type, and a body detected as a disk image (printable magic)
    inspection = inspect_simple_mail(PLAIN, MATCHERS, LIMITS)
    assert inspection is not None and [p for p, _ in inspection.hits] == ["1"]
    vhd = PLAIN.replace(b"Hello,", b"conectix", 1)
    disk = inspect_simple_mail(vhd, compile_rules(BannedSettings.model_validate(
        {"rules": [{"name": "disk", "detected_type": "img"}]}))[0], LIMITS)
    assert disk is not None and disk == long_inspection(vhd, compile_rules(
        BannedSettings.model_validate({"rules": [{"name": "disk", "detected_type": "img"}]}))[0],
        LIMITS)
    assert [p for p, _ in disk.hits] == ["1"]


@pytest.mark.parametrize("data", [
    # anything with a name, an encoding that decodes, or more than one part
    PLAIN.replace(b"Content-Transfer-Encoding: 7bit", b"Content-Transfer-Encoding: base64"),
    PLAIN.replace(b"7bit", b"quoted-printable"),
    PLAIN.replace(b"charset=us-ascii", b'name="run.exe"'),
    PLAIN.replace(b"MIME-Version", b"Content-Disposition: attachment; filename=a.exe\r\nX"),
    PLAIN.replace(b"text/plain", b"text/html"),
    PLAIN.replace(b"text/plain; charset=us-ascii", b"multipart/mixed; boundary=x"),
    PLAIN.replace(b"Content-Type:", b"Content-Type :"),  # obsolete syntax: a second reading
    PLAIN.replace(b"Content-Type: text/plain; charset=us-ascii",
                  b"Content-Type: text/plain;\r\n charset=us-ascii"),  # folded
    PLAIN.replace(b"Subject", b"Content-Type: text/plain\r\nSubject"),  # a second one
    PLAIN + b"begin 644 invoice.exe\r\n#0V%T\r\n`\r\nend\r\n",  # uuencoded
    PLAIN + b"begin-base64 644 a.exe\r\nTVo=\r\n====\r\n",
    PLAIN.replace(b"Hello,", b"<html><body>hi</body></html>"),  # decomposed as HTML
    PLAIN.replace(b"Hello,", b"%PDF-1.4"),
    PLAIN.replace(b"Hello,", b"From: x@example.org\r\nSubject: inner"),  # an enclosed mail
    PLAIN.replace(b"Hello,", b"Hell\xc3\xb6,"),  # not ASCII
    PLAIN.replace(b"Hello,", b"MZ\x90\x00"),  # control bytes
    PLAIN.replace(b"\r\n", b"\n", 1),  # mixed line ends
    PLAIN.replace(b"\r\n\r\nHello", b"\r\nHello"),  # no blank line
    b" folded: first\r\n\r\nbody\r\n",
    b"From sender Mon Jan  1 00:00:00 2024\r\nSubject: x\r\n\r\nbody\r\n",  # mbox From_
    b"\r\nbody only\r\n",
    PLAIN + b"x" * MAX_SIZE,  # too big for the event loop
])
def test_anything_else_goes_to_the_workers(data: bytes) -> None:
    assert simple_mail_parts(data, LIMITS) is None
    assert inspect_simple_mail(data, MATCHERS, LIMITS) is None


def test_limits_that_would_refuse_the_parts_disable_it() -> None:
    assert simple_mail_parts(PLAIN, Limits(max_file_size=len(PLAIN) - 1)) is None
    assert simple_mail_parts(PLAIN, Limits(max_scan_size=len(PLAIN) + 5)) is None
    # the tightest limits that still let both parts through: the same parts as decompose()
    for limits in (Limits(max_recursion=1), Limits(max_files=1)):
        assert simple_mail_parts(PLAIN, limits) == full(PLAIN, limits)


# -- hypothesis: the shortcut never says anything else than the full check ----------------------
TOKENS = [
    b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"\n\n", b" ", b"\t", b":", b" :", b";", b"=",
    b"Content-Type: ", b"content-type:", b"CONTENT-TYPE:text/plain", b"text/plain",
    b"text/html", b"application/x-msdownload", b"multipart/mixed; boundary=b", b"--b",
    b"message/partial; id=1", b"message/rfc822", b"charset=us-ascii", b'name="a.exe"',
    b"filename=x.exe", b"Content-Disposition: attachment; filename=a.js",
    b"Content-Transfer-Encoding: 7bit", b"Content-Transfer-Encoding: base64", b"8bit",
    b"quoted-printable", b"=?utf-8?q?a.exe?=", b"begin 644 a.exe\n", b"begin-base64 644 a\n",
    b"TVqQAAMAAAAEAAAA", b"MZ", b"PK\x03\x04", b"\x7fELF", b"conectix", b"koly", b"vhdxfile",
    b"CD001", b"ustar", b"<html>", b"<hta:application>", b"%PDF-", b"{\\rtf1", b"From: x\n",
    b"Subject: y\r\n", b"X-Y: z", b"=", b"=3D", b"\x00", b"\xff", b"end\n",
]


@st.composite
def mutated_mails(draw: st.DrawFn) -> bytes:
    data = draw(st.sampled_from([PLAIN, PLAIN.replace(b"\r\n", b"\n"), text_mail(),
                                 b"Subject: x\n\nbody\n"]))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.integers(0, 3))
        if kind == 0:  # insert a token
            data = data[:pos] + draw(st.sampled_from(TOKENS)) + data[pos:]
        elif kind == 1:  # delete a few bytes
            data = data[:pos] + data[pos + draw(st.integers(1, 8)):]
        elif kind == 2:  # a token at a fixed offset the type checks read (ISO: 32 KiB + 1)
            offset = draw(st.sampled_from([0, 257, 510, 0x8001]))
            token = draw(st.sampled_from(TOKENS))
            data = data.ljust(offset + len(token) + 2, b"a")
            data = data[:offset] + token + data[offset + len(token):]
        else:  # printable noise
            data = data[:pos] + draw(st.binary(max_size=6)) + data[pos:]
    return data


@fuzz_settings(max_examples=EXAMPLES, deadline=None,
               suppress_health_check=[HealthCheck.too_slow])
@given(mutated_mails())
def test_shortcut_never_disagrees_with_the_full_check(data: bytes) -> None:
    for matchers in (MATCHERS, DEFAULT_MATCHERS):
        shortcut = inspect_simple_mail(data, matchers, LIMITS)
        if shortcut is not None:
            # the same hits, part by part, and no problem the full check would report
            assert shortcut == long_inspection(data, matchers, LIMITS)


# -- in the service: no worker for a plain-text mail, the workers for the rest -----------------
async def test_service_decides_plain_text_on_the_event_loop() -> None:
    cfg = config.loads('[scan]\nworkers = 1\n[[banned.rules]]\nname = "text"\n'
                       'mime_type = "text/*"\n')
    engine = CountingEngine("clamd", ScanStatus.CLEAN)
    check = BannedCheck.from_config(cfg, workers=1)
    assert check is not None
    service = ScanService([engine], cache=VerdictCache(), banned=check)
    async with service:
        with Spool.from_bytes(text_mail()) as spool:
            result = await service.scan(spool, SMTP)
        # the rule over the declared type holds: the shortcut bans as the workers would
        assert result.status is ScanStatus.INFECTED and result.virus_names == ("Banned.text",)
        assert check.shortcuts == 1 and check._pool is not None
        tasks = check._pool.stats().tasks
        assert tasks == 0  # no worker was asked
        with Spool.from_bytes(text_mail() + b"begin 644 a.exe\n`\nend\n") as spool:
            await service.scan(spool, SMTP)
        assert check.shortcuts == 1 and check._pool.stats().tasks == 1


async def test_service_bans_an_attachment_of_a_simple_multipart_without_a_worker() -> None:
    from tests.unit.test_simplemail import TEXT, b64, multipart

    exe = ([b'Content-Type: application/octet-stream; name="Invoice.pdf.exe"',
            b"Content-Transfer-Encoding: base64"], b64(b"MZ\x90\x00" + bytes(200)))
    cfg = config.loads("[scan]\nworkers = 1\n")
    check = BannedCheck.from_config(cfg, workers=1)
    assert check is not None
    service = ScanService([CountingEngine("clamd", ScanStatus.CLEAN)], cache=VerdictCache(),
                          banned=check)
    async with service:
        with Spool.from_bytes(multipart([TEXT, exe])) as spool:
            result = await service.scan(spool, SMTP)
        assert result.status is ScanStatus.INFECTED
        # the built-in set: the name has a double extension (the bytes are no whole PE)
        assert result.virus_names == ("Banned.double-extension",)
        assert [f.part for f in result.findings] == ["2/Invoice.pdf.exe"]
        with Spool.from_bytes(multipart([TEXT])) as spool:
            assert (await service.scan(spool, SMTP)).status is ScanStatus.CLEAN
        assert check.shortcuts == 2 and check._pool is not None
        assert check._pool.stats().tasks == 0  # no worker was asked
