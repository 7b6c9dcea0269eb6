"""``avgate report --false-positive|--false-negative FILE``: rescan, package as
message/rfc822, send to the FP or FN address (a real aiosmtpd sink on loopback)."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from typer.testing import CliRunner

from avgate import config as config_mod
from avgate.cli import app
from avgate.errors import QuarantineError
from avgate.reports import build_file_report, looks_like_message, send_report
from avgate.result import ScanResult, ScanStatus

from .conftest import Sink

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
MAIL = (b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: invoice\r\n\r\n"
        b"Please find the invoice.\r\n\xe9 8bit\r\n")
BINARY = bytes(range(256)) * 40


def config(tmp: Path, sink: Sink, **quarantine: str) -> config_mod.Config:
    return config_mod.from_dict({"quarantine": {
        "path": str(tmp / "q"), "next_hop": sink.next_hop, "report_from": "avgate@example.org",
        **quarantine}})


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_message_attached_verbatim_file_wrapped() -> None:
    result = ScanResult(ScanStatus.CLEAN, sha256="ab" * 32, size=len(MAIL))
    report = build_file_report("invoice.eml", MAIL, result, "false-negative",
                               "avgate@example.org", "fn@vendor.example")
    assert MAIL in report  # byte for byte, not re-encoded
    parts = list(parse(report).iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/rfc822"]
    assert "Rescan status: clean" in parts[0].get_content()
    assert looks_like_message(MAIL) and not looks_like_message(BINARY)
    wrapped = build_file_report("../tool\x1b.exe", BINARY, result, "false-positive",
                                "avgate@example.org", "fp@vendor.example")
    inner = list(parse(wrapped).iter_parts())[1].get_content()
    [attachment] = list(inner.iter_attachments())
    assert attachment.get_filename() == "tool_.exe"
    assert attachment.get_content() == BINARY


async def test_false_positive_rescanned_and_sent_to_fp_address(tmp_path: Path,
                                                               smtp_sink: Sink) -> None:
    cfg = config(tmp_path, smtp_sink, report_fp_to="fp@vendor.example",
                 report_fn_to="fn@vendor.example")
    result, address, sent = await send_report(cfg, "eicar.com", EICAR, "false-positive")
    assert result.status is ScanStatus.INFECTED  # rescanned with today's engines
    assert address == "fp@vendor.example"
    [got] = smtp_sink.received
    assert got.recipients == ["fp@vendor.example"] and got.sender == "avgate@example.org"
    msg = parse(got.data)
    assert msg["Subject"].startswith("[avgate] false positive: Eicar")
    text, attached = msg.iter_parts()
    summary = text.get_content()
    assert "Rescan status: infected" in summary and "Eicar" in summary
    inner = attached.get_content()
    assert [a.get_content() for a in inner.iter_attachments()] == [EICAR]
    assert sent.startswith(b"From: avgate@example.org\r\nTo: fp@vendor.example\r\n")


async def test_false_negative_goes_to_fn_address_else_report_to(tmp_path: Path,
                                                                smtp_sink: Sink) -> None:
    cfg = config(tmp_path, smtp_sink, report_to="all@vendor.example",
                 report_fn_to="fn@vendor.example")
    _, address, _ = await send_report(cfg, "mail.eml", MAIL, "false-negative")
    assert address == "fn@vendor.example"
    _, address, _ = await send_report(cfg, "mail.eml", MAIL, "false-positive")
    assert address == "all@vendor.example"
    assert [r.recipients for r in smtp_sink.received] == [["fn@vendor.example"],
                                                          ["all@vendor.example"]]
    with pytest.raises(QuarantineError, match="report_fp_to"):
        await send_report(config(tmp_path, smtp_sink), "mail.eml", MAIL, "false-positive")


def test_cli_report_command(tmp_path: Path, smtp_sink: Sink) -> None:
    cfg = tmp_path / "avgate.toml"
    cfg.write_text(f'[quarantine]\npath = "{tmp_path}/q"\nnext_hop = "{smtp_sink.next_hop}"\n'
                   'report_fn_to = "fn@vendor.example"\n')
    sample = tmp_path / "missed.eml"
    sample.write_bytes(MAIL)
    runner = CliRunner()
    res = runner.invoke(app, ["report", "--false-negative", str(sample), "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "rescanned: clean" in res.output and "fn@vendor.example" in res.output
    assert smtp_sink.received[0].recipients == ["fn@vendor.example"]
    both = runner.invoke(app, ["report", "--false-negative", str(sample), "--false-positive",
                               str(sample), "--config", str(cfg)])
    assert both.exit_code == 2
    no_fp = runner.invoke(app, ["report", "--false-positive", str(sample), "--config", str(cfg)])
    assert no_fp.exit_code == 2 and "report_fp_to" in no_fp.output
    assert len(smtp_sink.received) == 1
    stdin = runner.invoke(app, ["report", "--false-positive", "-", "--to", "desk@x.example",
                                "--config", str(cfg)], input=EICAR)
    assert stdin.exit_code == 0, stdin.output
    assert "rescanned: infected" in stdin.output
    assert smtp_sink.received[1].recipients == ["desk@x.example"]


def test_quarantine_report_uses_the_fn_address(tmp_path: Path, smtp_sink: Sink) -> None:
    from avgate.quarantine import Envelope, QuarantineStore

    cfg = tmp_path / "avgate.toml"
    cfg.write_text(f'[quarantine]\npath = "{tmp_path}/q"\nnext_hop = "{smtp_sink.next_hop}"\n'
                   'report_to = "all@vendor.example"\nreport_fn_to = "fn@vendor.example"\n')
    with QuarantineStore(tmp_path / "q") as store:
        rid = store.put(MAIL, Envelope("a@example.org", ("b@example.net",)),
                        ScanResult(ScanStatus.CLEAN))
    runner = CliRunner()
    for flag, want in (("--false-negative", "fn@vendor.example"),
                       ("--false-positive", "all@vendor.example")):
        res = runner.invoke(app, ["quarantine", "report", rid, flag, "--config", str(cfg)])
        assert res.exit_code == 0, res.output
        assert want in res.output
    assert [r.recipients for r in smtp_sink.received] == [["fn@vendor.example"],
                                                          ["all@vendor.example"]]
