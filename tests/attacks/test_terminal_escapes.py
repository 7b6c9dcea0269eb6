"""Terminal escapes through ``avgate quarantine`` (issue 11, section 5).

Envelope fields (sender, recipients, HELO), file names inside the message and virus names are
chosen by whoever sent the object. ``avgate quarantine list`` / ``show`` printed them as they
were, so an administrator's terminal received ``ESC ] 0 ; ... BEL`` (set the window title),
``ESC [ 2 J`` (clear the screen), C1 CSI and bidi overrides. Text output now shows every such
character as an escape (``\\x1b``); ``--json`` stays exact (and ASCII).

The record is generated here and put straight into a quarantine store, as a front-end would.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from avgate.cli_quarantine import quarantine_app
from avgate.quarantine import Envelope, QuarantineStore
from avgate.result import EngineInfo, Finding, ScanResult, ScanStatus

TITLE = "\x1b]0;pwned\x07"
CLEAR = "\x1b[2J"
SENDER = f"evil{TITLE}@example.org{CLEAR}"
RCPT = "bob\x1b[31m@example.net\u202eexe.txt"
HELO = "helo\x9b2J.example\x7f"
VIRUS = f"Eicar-Test-Signature{CLEAR}"
FILENAME = f"invoice{TITLE}.pdf"
# what a terminal must never receive: C0 except LF (line ends), DEL, C1, bidi controls
CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def _message() -> bytes:
    return (b"From: a@example.org\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
            b"Content-Type: application/octet-stream\r\n"
            b'Content-Disposition: attachment; filename="' + FILENAME.encode() + b'"\r\n\r\n'
            + EICAR + b"\r\n--b--\r\n")


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, str]:
    cfg = tmp_path / "avgate.toml"
    cfg.write_text(f'[quarantine]\npath = "{tmp_path / "q"}"\nnext_hop = "127.0.0.1:9"\n')
    result = ScanResult(ScanStatus.INFECTED,
                        findings=(Finding(VIRUS, f"embedded{CLEAR}", f"message/2/{FILENAME}"),),
                        engines=(EngineInfo("embedded", f"1.0{TITLE}"),))
    with QuarantineStore(tmp_path / "q") as store:
        rid = store.put(_message(), Envelope(SENDER, (RCPT, "carol@example.net"),
                                             "192.0.2.1", HELO, "smtp"), result,
                        frontend="smtp", listener=f"smtp{CLEAR}", rule=f"rule{TITLE}",
                        actions=("reject", f"quarantine{CLEAR}"))
    return cfg, rid


def run(*args: str) -> Any:
    # color=True: click strips (some) ANSI sequences when output is not a terminal; an
    # administrator's terminal gets everything, so test what a terminal would get
    return CliRunner().invoke(quarantine_app, list(args), color=True)


def test_list_escapes_control_characters(setup: tuple[Path, str]) -> None:
    cfg, rid = setup
    out = run("list", "-c", str(cfg))
    assert out.exit_code == 0, out.output
    assert not CONTROL.search(out.output), repr(out.output)
    assert "evil\\x1b]0;pwned\\x07@example.org\\x1b[2J" in out.output
    assert "bob\\x1b[31m@example.net\\u202eexe.txt" in out.output
    assert "Eicar-Test-Signature\\x1b[2J" in out.output
    assert rid in out.output


def test_show_escapes_control_characters(setup: tuple[Path, str]) -> None:
    cfg, rid = setup
    out = run("show", rid, "-c", str(cfg))
    assert out.exit_code == 0, out.output
    assert not CONTROL.search(out.output), repr(out.output)
    for shown in ("evil\\x1b]0;pwned\\x07@example.org\\x1b[2J", "helo\\x9b2J.example\\x7f",
                  "Eicar-Test-Signature\\x1b[2J", "embedded\\x1b[2J", "rule\\x1b]0;pwned\\x07",
                  "quarantine\\x1b[2J", "smtp\\x1b[2J", "invoice\\x1b]0;pwned\\x07.pdf"):
        assert shown in out.output, shown


def test_json_output_is_exact_and_ascii(setup: tuple[Path, str]) -> None:
    cfg, rid = setup
    listed = run("list", "--json", "-c", str(cfg))
    assert not CONTROL.search(listed.output) and listed.output.isascii()
    (rec,) = [json.loads(line) for line in listed.output.splitlines()]
    assert rec["sender"] == SENDER and rec["recipients"][0] == RCPT and rec["helo"] == HELO
    shown = run("show", rid, "--json", "-c", str(cfg))
    assert not CONTROL.search(shown.output) and shown.output.isascii()
    assert json.loads(shown.output)["viruses"] == [VIRUS]


def test_errors_are_escaped_too(setup: tuple[Path, str]) -> None:
    cfg, rid = setup
    out = run("release", rid, "-c", str(cfg), "--to", f"admin{TITLE}@example.org")
    assert out.exit_code == 2  # an invalid address: nothing was sent
    assert not CONTROL.search(out.output), repr(out.output)
    assert "invalid address" in out.output
    out = run("release", rid, "-c", str(cfg), "--to", "admin@example.org\r\nRCPT TO:<x@y.z>")
    assert out.exit_code == 2 and "\r" not in out.output


@pytest.mark.parametrize(("raw", "shown"), [
    ("\x1b[2J", "\\x1b[2J"), ("\x00\x07\x08\x09\x0a\x0d", "\\x00\\x07\\x08\\x09\\x0a\\x0d"),
    ("\x7f\x80\x9b\x9f", "\\x7f\\x80\\x9b\\x9f"), ("a\u202eb\u2066c", "a\\u202eb\\u2066c"),
    ("line\u2028sep", "line\\u2028sep"), ("\ud800", "\\ud800"),
    ("plain ascii, é, € and 日本", "plain ascii, é, € and 日本"),
])
def test_safe(raw: str, shown: str) -> None:
    from avgate.cli_quarantine import safe

    assert safe(raw) == shown
