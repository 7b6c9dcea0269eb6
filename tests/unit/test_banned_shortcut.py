"""The banned-type check's shortcut on the event loop (avgate.banned.plain_text_body): a
plain-text mail is matched as its two parts without a worker round trip, and the shortcut
never answers differently from the full decomposition (hypothesis, over mutated mails that
an attacker would shape to slip something past it).
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
    SHORTCUT_MAX,
    BannedCheck,
    BannedSettings,
    compile_rules,
    inspect_bytes,
    inspect_plain_text,
    plain_text_body,
)
from avgate.context import Context
from avgate.limits import Limits
from avgate.result import ScanStatus
from avgate.scan import ScanService, VerdictCache
from avgate.spool import Spool
from tests.unit.test_scan_service import CountingEngine

LIMITS = Limits()
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
        found = plain_text_body(data, LIMITS)
        assert found is not None, data
        for matchers in (MATCHERS, DEFAULT_MATCHERS):
            assert inspect_plain_text(data, matchers, LIMITS) == inspect_bytes(
                data, matchers, LIMITS)
    assert plain_text_body(PLAIN, LIMITS) == (b"Hello,\r\n\r\nsee you at noon.\r\n",
                                              "text/plain")
    assert plain_text_body(b"Subject: x\n\nbody\n", LIMITS) == (b"body\n", "")


def test_a_plain_text_mail_that_a_rule_bans_is_still_banned() -> None:
    # a rule over the declared type, and a body detected as a disk image (printable magic)
    inspection = inspect_plain_text(PLAIN, MATCHERS, LIMITS)
    assert inspection is not None and [p for p, _ in inspection.hits] == ["1"]
    vhd = PLAIN.replace(b"Hello,", b"conectix", 1)
    disk = inspect_plain_text(vhd, compile_rules(BannedSettings.model_validate(
        {"rules": [{"name": "disk", "detected_type": "img"}]}))[0], LIMITS)
    assert disk is not None and disk == inspect_bytes(vhd, compile_rules(
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
    PLAIN + b"x" * SHORTCUT_MAX,  # too big for the event loop
])
def test_anything_else_goes_to_the_workers(data: bytes) -> None:
    assert plain_text_body(data, LIMITS) is None
    assert inspect_plain_text(data, MATCHERS, LIMITS) is None


def test_limits_that_would_refuse_the_parts_disable_it() -> None:
    assert plain_text_body(PLAIN, Limits(max_file_size=len(PLAIN) - 1)) is None
    assert plain_text_body(PLAIN, Limits(max_recursion=1)) is None
    assert plain_text_body(PLAIN, Limits(max_files=1)) is None


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
        shortcut = inspect_plain_text(data, matchers, LIMITS)
        if shortcut is not None:
            # the same hits, part by part, and no problem the full check would report
            assert shortcut == inspect_bytes(data, matchers, LIMITS)


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
