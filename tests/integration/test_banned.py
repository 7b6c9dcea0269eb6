"""Banned file types end to end: ``avgate serve`` with the default set, a mail client (swaks)
on the SMTP front-end and the HTTP scan API.

A mail with ``invoice.pdf.exe`` (PE bytes) is refused at DATA with the rule name in the reply;
a text mail and a zip of text pass; the scan log names the banned part. Over HTTP, a
configured rule (the default set is for mail) blocks an executable with ``enforce=true``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest

from tests.helpers import wait_until
from tests.integration.avgate_proc import AvgateServe, free_port
from tests.unit.content.test_typeid import pe_bytes, zip_bytes

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def config_text(root: Path, smtp_port: int) -> str:
    return f"""
[scan]
workers = 1
[log]
path = "{root / 'scan.log'}"
[quarantine]
path = "{root / 'quarantine'}"
[[smtp.listeners]]
listen = "127.0.0.1:{smtp_port}"
mode = "verdict"
[http]
listen = "127.0.0.1:0"

[[banned.rules]]          # web downloads: only what is configured
name = "exe-download"
detected_type = "pe"
frontend = "http"
"""


class Served(NamedTuple):
    serve: AvgateServe
    root: Path
    smtp_port: int  # chosen here: serve's start-up line names the listener, not its port


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    if shutil.which("swaks") is None:
        pytest.skip("swaks not installed (apt-get install swaks)")
    root = tmp_path_factory.mktemp("banned")
    config = root / "avgate.toml"
    port = free_port()
    config.write_text(config_text(root, port))
    serve = AvgateServe(config).start()
    try:
        yield Served(serve, root, port)
    finally:
        serve.stop()


def message(*attachments: tuple[str, bytes]) -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "sender@example.org", "user@example.com", "files"
    m.set_content("Hello,\nthe files are attached.\n")
    for name, data in attachments:
        m.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return m.as_bytes()


def send(served: Served, data: bytes) -> str:
    """Send ``data`` with swaks; the server's reply to the end of DATA."""
    path = served.root / "message.eml"
    path.write_bytes(data)
    out = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{served.smtp_port}", "--helo", "client.test",
         "--from", "sender@example.org", "--to", "user@example.com", "--timeout", "20",
         "--data", str(path)], capture_output=True, text=True, timeout=60, check=False)
    replies = [line.lstrip("<~*- ") for line in out.stdout.splitlines()
               if line.startswith(("<-", "<~", "<*", "<**"))]
    # the reply after the message: the one before QUIT's 221
    return replies[-2] if replies and replies[-1].startswith("221") else replies[-1]


def log_events(root: Path) -> list[dict[str, object]]:
    path = root / "scan.log"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_smtp_rejects_double_extension_executable(served: Served) -> None:
    root = served.root
    before = len(log_events(root))
    reply = send(served, message(("invoice.pdf.exe", pe_bytes())))
    assert reply.startswith("554 5.7.1 Banned content: Banned.executable (RefID "), reply
    assert wait_until(lambda: len(log_events(root)) > before, 10)
    event = log_events(root)[-1]
    assert event["status"] == "infected" and event["rule"] == "default:banned"
    assert "Banned.executable" in json.dumps(event)
    assert "2/invoice.pdf.exe" in json.dumps(event)


def test_smtp_accepts_clean_text_and_zip(served: Served) -> None:
    assert send(served, message()).startswith("250"), served.serve.output()
    zipped = zip_bytes({"notes/readme.txt": b"hello", "data.csv": b"a,b\n1,2\n"})
    assert send(served, message(("notes.zip", zipped),
                                     ("report.pdf", b"%PDF-1.4\n%%EOF\n"))).startswith("250")


def test_smtp_virus_wins_over_banned_type(served: Served) -> None:
    reply = send(served, message(("run.js", b"WScript.Echo(1)"), ("eicar.com", EICAR)))
    assert reply.startswith("550 5.7.1 Virus found: Eicar-Test-Signature"), reply


def test_http_api_blocks_by_configured_rule(served: Served) -> None:
    port = served.serve.port("http")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
        blocked = c.post("/v1/scan", params={"enforce": "true"}, content=pe_bytes())
        assert blocked.status_code == 403, blocked.text
        body = blocked.json()
        assert body["error"] == "Blocked by policy: banned content (Banned.exe-download)"
        assert [f["name"] for f in body["findings"]] == ["Banned.exe-download"]
        # the mail default set does not apply to the web: a script download passes
        ok = c.post("/v1/scan", params={"enforce": "true"}, content=b"WScript.Echo(1)")
        assert ok.status_code == 200 and ok.json()["status"] == "clean"
