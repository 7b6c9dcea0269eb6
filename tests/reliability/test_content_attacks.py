"""Hostile content through the SMTP front-end (embedded engine unless said otherwise):
SMTP smuggling variants hiding an infected second message, duplicate-boundary MIME, a zip
bomb, ``../`` archive member names, and file names full of shell metacharacters through the
command engine. Every message is counted; nothing infected reaches the next hop."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.corpus import EICAR, MARKER, duplicate_boundary_mail, mail, make_zip, zip_bomb
from tests.reliability.conftest import (
    Ledger,
    RawClient,
    Sink,
    infected,
    smtp_send,
    unique_message,
)

# the smuggled second message carries the marker (an .ndb body signature: found at any
# offset), so whatever way the bytes are read, one message or two, it is infected
SMUGGLED = (b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\n" + MARKER + b"\r\n")
FAKE_ENDS = {
    "lf.lf": b"\n.\n", "lf.crlf": b"\n.\r\n", "crlf.lf": b"\r\n.\n", "cr.cr": b"\r.\r",
    "cr.crlf": b"\r.\r\n", "crlf.cr": b"\r\n.\r", "crlf.nul.crlf": b"\r\n.\0\r\n",
    "crlf.sp.crlf": b"\r\n. \r\n",
}


@pytest.mark.parametrize("bare_lf", ["reject", "normalize"])
async def test_smuggling_variants_never_split_the_message(avgate: Any, raw_sink: Any,
                                                          embedded: Any, bare_lf: str) -> None:
    gw = await avgate(listener={"next_hop": raw_sink.address, "bare_lf": bare_lf},
                      engines=embedded)
    replies = {}
    for name, fake in FAKE_ENDS.items():
        _, msg = unique_message("clean", tag=f"smuggle-{name}")
        c = await RawClient.connect(gw.port)
        try:
            await c.envelope()
            assert (await c.cmd("DATA")).startswith("354")
            await c.send(msg.rstrip(b"\r\n") + fake + SMUGGLED + b".\r\n")
            replies[name] = await c.reply()
            await c.cmd("QUIT")
        finally:
            await c.close()
    await asyncio.sleep(0.1)
    for name, reply in replies.items():
        # one message holding the marker: refused outright, for the bare line ending or as
        # infected; never 250, never a second transaction
        assert reply[:1] == "5", (name, reply)
    for w in raw_sink.wire:  # the next hop saw envelopes (forwarded early), never any data
        assert b"DATA\r\n" not in w and b"evil@attacker.test" not in w, w[:300]
        assert not infected(w)


async def test_duplicate_boundary_eicar_rejected_through_smtp(avgate: Any, sink: Sink) -> None:
    """CVE-2024-28054 shape: EICAR only under the second boundary parameter."""
    gw = await avgate(listener={"next_hop": sink.address})
    reply = await smtp_send(gw.port, duplicate_boundary_mail(EICAR))
    assert reply.startswith("550 5.7.1"), reply
    assert sink.messages == []


async def test_zip_bomb_is_refused_fast_with_bounded_memory(avgate: Any, sink: Sink) -> None:
    bomb = zip_bomb()  # 200 MiB of zeros in ~200 KB
    msg = mail("bomb attached", [("bomb.zip", bomb)], subject="bomb")
    gw = await avgate(listener={"next_hop": sink.address, "max_message_size": 5_000_000})
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    reply = await smtp_send(gw.port, msg, timeout=30)
    elapsed = time.monotonic() - t0
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # a structural limit (the ratio) is never a free pass: refused, with the reason
    assert reply.startswith("552 5.3.4"), reply
    assert "compression ratio limit" in reply
    assert elapsed < 10, elapsed
    # the gateway process did not inflate it (the scan worker refused before inflating)
    assert peak_after - peak_before < 100 * 1024, (peak_before, peak_after)  # KiB: < 100 MiB
    assert sink.messages == []


async def test_path_traversal_member_names_are_scanned_not_extracted(
        avgate: Any, sink: Sink, tmp_path: Path) -> None:
    evil = make_zip([("../../evil.com", EICAR), ("/abs/evil2.com", EICAR),
                     ("..\\..\\evil3.com", EICAR)])
    gw = await avgate(listener={"next_hop": sink.address})
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        reply = await smtp_send(gw.port, mail("see zip", [("x.zip", evil)], subject="trav"))
    finally:
        os.chdir(cwd)
    assert reply.startswith("550 5.7.1"), reply
    assert sink.messages == []
    for p in (tmp_path, tmp_path.parent, tmp_path.parent.parent, Path("/abs"), Path(cwd)):
        assert not list(p.glob("evil*.com")), p


SCANNER = """#!/bin/sh
# a QHPSI-style scanner: exit 1 with "<path>: Found-It FOUND" when the file holds EICAR
f="$1"
printf '%s\\n' "$f" >> "$(dirname "$0")/argv.log"
# raw, or base64 as in a mail attachment (a real scanner decodes MIME; this one just greps)
if grep -q -e 'EICAR-STANDARD-ANTIVIRUS-TEST-FILE' \\
    -e 'WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNU' "$f"; then
  printf '%s: Test.Found FOUND\\n' "$f"; exit 1
fi
exit 0
"""
METACHAR_NAMES = ["$(touch PWNED1)", "`touch PWNED2`", "a; touch PWNED3", "b | touch PWNED4",
                  "c && touch PWNED5 #", "-rf", "d\nx", "e'f\"g", "$HOME*?[x]{y}~"]


@pytest.fixture
def scanner(tmp_path: Path) -> Path:
    d = tmp_path / "scanner"
    d.mkdir()
    script = d / "scan.sh"
    script.write_text(SCANNER)
    script.chmod(0o755)
    return script


def _pwned(*dirs: Path) -> list[Path]:
    return [p for d in dirs for p in d.rglob("PWNED*")]


def test_shell_metacharacter_file_names_through_the_command_engine(
        tmp_path: Path, scanner: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i, name in enumerate(METACHAR_NAMES):
        (data / name).write_bytes(EICAR if i % 2 == 0 else b"clean\n")
    config = tmp_path / "cmd.toml"
    config.write_text(f'[scan]\ncache = false\n[[engines]]\ntype = "command"\n'
                      f'command = "{scanner} {{path}}"\n'
                      f'timeout = 10\n[quarantine]\npath = "{tmp_path / "q"}"\n')
    avgate = Path(sys.executable).with_name("avgate")
    proc = subprocess.run([str(avgate), "scan", "--config", str(config), str(data)],
                          cwd=data, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert not _pwned(tmp_path, Path(os.getcwd()), scanner.parent), proc.stdout
    found = proc.stdout.count("FOUND")
    assert found == len(METACHAR_NAMES[::2]), proc.stdout
    # the scanner got avgate's own snapshot of each file (what was hashed is what is
    # scanned), so the hostile names never reach its command line at all
    argv = (scanner.parent / "argv.log").read_text().splitlines()
    assert len(argv) == len(METACHAR_NAMES), argv
    # each argument is an absolute spool path whose base name is the prefix plus
    # tempfile's random letters only; a plain "-rf" substring test failed about once in
    # 150 runs, when the random part began with "rf"
    for arg in argv:
        assert os.path.isabs(arg), arg
        assert re.fullmatch(r"avgate-spool-[a-z0-9_]+", os.path.basename(arg)), arg


async def test_shell_metacharacter_attachment_names_through_smtp_and_command_engine(
        avgate: Any, sink: Sink, scanner: Path, tmp_path: Path) -> None:
    gw = await avgate(listener={"next_hop": sink.address},
                      engines=[{"type": "command", "command": f"{scanner} {{path}}",
                                "timeout": 10}], scan={"cache": False})
    ledger = Ledger()
    for i, name in enumerate(METACHAR_NAMES):
        kind = "eicar" if i % 2 == 0 else "clean"
        mid, _ = unique_message(kind, tag=f"meta{i}-{kind}")
        payload = EICAR if kind == "eicar" else b"harmless\n"
        msg = mail("x", [(name.replace("\n", " "), payload)], subject=mid)
        msg = msg.replace(b"Message-ID: <test@example.org>", f"Message-ID: <{mid}>".encode())
        msg += f"END-OF-{mid}\r\n".encode()
        ledger.record(mid, kind, await smtp_send(gw.port, msg))
    assert not _pwned(tmp_path, Path(os.getcwd()), scanner.parent)
    ledger.check([x.data for x in sink.messages], sent=len(METACHAR_NAMES))
    assert ledger.count("rejected") == len(METACHAR_NAMES[::2])
    assert b64_absent(sink.messages)


def b64_absent(messages: list[Any]) -> bool:
    needle = base64.b64encode(EICAR)[:40]
    return not any(needle in x.data.replace(b"\r\n", b"") for x in messages)
