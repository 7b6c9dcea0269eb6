"""Attacker-chosen "not scanned" must not mean delivered (issue: verdict integrity, section 4).

Anyone can shape content to hit a structural limit (parts, members, nesting, ratio, the
worker budget); by default such content is refused on every front-end. Size limits reject
in mail and pass with a tag on the web; encrypted archives still pass with a tag.
Every sample is generated here; the gateway, policy and embedded engine are the real ones.
"""

from __future__ import annotations

import io
import zipfile

import pytest

from avgate import config
from avgate.gateway import Gateway
from avgate.observability import ScanLog
from avgate.policy import Context, Disposition
from avgate.result import LimitKind, ScanStatus
from avgate.spool import Spool
from tests.corpus import EICAR

MAIL = ("smtp", "milter", "qmail")
WEB = ("icap", "http")


def gateway(tmp_path, extra: str = "") -> Gateway:
    cfg = config.loads(f'[quarantine]\npath = "{tmp_path}/q"\n[log]\npath = "{tmp_path}/log"\n'
                       f"[scan]\nworkers = 1\n" + extra)
    return Gateway.from_config(cfg, log=ScanLog(str(tmp_path / "log")))


def many_parts(n: int, last: bytes) -> bytes:
    """A multipart message with ``n`` text parts and ``last`` as part n + 1."""
    boundary = "b0undary"
    out = [f"From: a@example.org\r\nTo: b@example.net\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
           f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'.encode()]
    for i in range(n):
        out.append(f"--{boundary}\r\nContent-Type: text/plain\r\n\r\npart {i}\r\n".encode())
    out.append(f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
               f"Content-Transfer-Encoding: 8bit\r\n\r\n".encode() + last + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


def zip_with(members: int, last: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for i in range(members):
            z.writestr(f"f{i}.txt", b"")
        z.writestr("eicar.com", last)
    return buf.getvalue()


def nested_zip(depth: int, inner: bytes) -> bytes:
    data = inner
    for i in range(depth):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            z.writestr(f"level{i}.zip" if i else "eicar.com", data)
        data = buf.getvalue()
    return data


def encrypted_zip() -> bytes:
    """A zip whose one member has the 'encrypted' flag (the content is never decrypted)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("secret.txt", b"x" * 32)
    data = bytearray(buf.getvalue())
    # general purpose flag bit 0 in the local header (offset 6) and the central directory
    data[6] |= 1
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 8] |= 1
    return bytes(data)


async def verdict(tmp_path, data: bytes, frontend: str, extra: str = ""):
    g = gateway(tmp_path, extra)
    try:
        with Spool.from_bytes(data) as spool:
            return await g.process(spool, Context(frontend))
    finally:
        await g.scanner.close()


@pytest.mark.parametrize("frontend", MAIL + WEB)
async def test_eicar_as_part_10002_is_refused(tmp_path, frontend: str) -> None:
    out = await verdict(tmp_path, many_parts(10_001, EICAR), frontend)
    assert out.result.status is not ScanStatus.CLEAN
    if out.result.status is not ScanStatus.INFECTED:
        assert out.result.limit is LimitKind.STRUCTURAL, out.result
    assert out.decision.disposition is Disposition.REJECT, out.decision
    if frontend in MAIL and out.result.status is not ScanStatus.INFECTED:
        assert out.decision.reply.startswith("552 5.3.4 "), out.decision.reply


@pytest.mark.parametrize("frontend", ["smtp", "icap"])
async def test_zip_with_10001_members_is_refused(tmp_path, frontend: str) -> None:
    out = await verdict(tmp_path, zip_with(10_001, EICAR), frontend)
    assert out.result.status is not ScanStatus.CLEAN
    assert out.decision.disposition is Disposition.REJECT, (out.result, out.decision)


@pytest.mark.parametrize("frontend", ["smtp", "http"])
async def test_nesting_deeper_than_the_limit_is_refused(tmp_path, frontend: str) -> None:
    out = await verdict(tmp_path, nested_zip(18, EICAR), frontend)
    assert out.result.status is ScanStatus.UNKNOWN
    assert out.result.limit is LimitKind.STRUCTURAL
    assert out.decision.disposition is Disposition.REJECT
    assert "recursion" in out.decision.reply


async def test_size_limit_rejects_mail_and_tags_web(tmp_path) -> None:
    data = b"A" * 5000
    extra = "[limits]\nmax_scan_size = 4096\n"
    mail = await verdict(tmp_path, data, "smtp", extra)
    assert mail.result.status is ScanStatus.SKIPPED and mail.result.limit is LimitKind.SIZE
    assert mail.decision.disposition is Disposition.REJECT
    assert mail.decision.reply.startswith("552 5.3.4 Message too large to scan")
    web = await verdict(tmp_path, data, "icap", extra)
    assert web.decision.disposition is Disposition.ACCEPT
    assert ("X-Virus-Status", "Skipped") in web.decision.headers


async def test_encrypted_archive_still_passes_with_a_tag(tmp_path) -> None:
    out = await verdict(tmp_path, encrypted_zip(), "smtp")
    assert out.result.status is ScanStatus.UNKNOWN and out.result.limit is None
    assert out.decision.disposition is Disposition.ACCEPT
    assert ("X-Virus-Status", "Unknown") in out.decision.headers


async def test_rules_can_match_the_limit_and_reason(tmp_path) -> None:
    extra = ('[[policy.rules]]\nname = "let-deep-through"\nlimit = "structural"\n'
             'reason = "*recursion*"\naction = ["accept", "tag"]\n')
    out = await verdict(tmp_path, nested_zip(18, b"harmless"), "smtp", extra)
    assert out.decision.rule == "let-deep-through"
    assert out.decision.disposition is Disposition.ACCEPT


async def test_the_reject_reply_is_a_single_bounded_line(tmp_path) -> None:
    name = "x" * 600 + "\r\n250 fake"
    buf = io.BytesIO()
    data = b"payload"
    for _ in range(18):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            z.writestr(name, data)
        data = buf.getvalue()
    out = await verdict(tmp_path, data, "smtp")
    assert out.decision.disposition is Disposition.REJECT
    assert "\r" not in out.decision.reply and "\n" not in out.decision.reply
    assert len(out.decision.reply) < 300


def test_sample_generator_makes_that_many_parts() -> None:
    # guard for the generator itself: the stdlib parser sees every part
    from email import message_from_bytes

    parsed = message_from_bytes(many_parts(3, b"x"))
    assert len(parsed.get_payload()) == 4


async def test_clamd_protocol_reports_a_refused_limit_as_found(tmp_path) -> None:
    """clamd clients know FOUND/OK/ERROR: a refused object must not answer OK."""
    from avgate.frontends.clamd import as_clamd_verdict, verdict_lines

    out = await verdict(tmp_path, nested_zip(18, b"harmless"), "clamd")
    assert out.decision.disposition is Disposition.REJECT
    lines = verdict_lines(as_clamd_verdict(out.result, out.decision), "stream")
    assert lines == ["stream: Heuristics.Limits.Exceeded.MaxRecursion FOUND"]
    size = await verdict(tmp_path, b"A" * 5000, "clamd", "[limits]\nmax_scan_size = 4096\n")
    assert verdict_lines(as_clamd_verdict(size.result, size.decision), "stream") == [
        "stream: OK"]
