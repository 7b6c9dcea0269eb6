"""``avgate serve`` with the HTTP API, started as a subprocess on a free port."""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.avgate_proc import AvgateServe, free_port

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
TOKEN = "test-token-5f1d"  # noqa: S105 - a test token with every role
READ_TOKEN = "second-token"  # noqa: S105 - may list and show quarantine records only
SCAN_TOKEN = "scan-token-9a2c"  # noqa: S105 - a plain string token: scan only
TOKENS_TOML = (f'tokens = [{{ token = "{TOKEN}", roles = ["scan", "read", "admin"] }}, '
               f'{{ token = "{READ_TOKEN}", roles = ["read"] }}, "{SCAN_TOKEN}"]')
MAX_UPLOAD = 8 * 1024 * 1024


@dataclass
class HttpEnv:
    serve: AvgateServe
    root: Path
    base_url: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}


def start_http(root: Path, extra: str = "", *, http: str = "", quarantine: str = "") -> HttpEnv:
    """Write a config with an ``[http]`` section (plus ``extra``) and start serve."""
    config = root / "avgate.toml"
    config.write_text(f"""
[scan]
cache = false
[log]
path = "{root / 'scan.log'}"
[quarantine]
path = "{root / 'quarantine'}"
{quarantine}
[http]
listen = "127.0.0.1:0"
{http}
{extra}
""")
    serve = AvgateServe(config).start()
    where = serve.listeners["http"][0]
    scheme = "https" if "tls_cert" in http else "http"
    return HttpEnv(serve, root, f"{scheme}://{where}")


class _Collect:
    """aiosmtpd handler keeping what it received (the release's next hop)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                              bytes(envelope.original_content or envelope.content)))
        return "250 2.0.0 Ok: queued"


@dataclass
class SmtpSink:
    port: int
    handler: _Collect


@pytest.fixture(scope="module")
def smtp_sink() -> Iterator[SmtpSink]:
    """A real SMTP server (aiosmtpd) as the quarantine's release next hop."""
    from aiosmtpd.controller import Controller

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    handler = _Collect()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield SmtpSink(port, handler)
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def http_env(tmp_path_factory: pytest.TempPathFactory,
             smtp_sink: SmtpSink) -> Iterator[HttpEnv]:
    """Tokens configured (admin, read-only, scan-only), scanning open, infected objects
    quarantined, 8 MiB upload limit."""
    root = tmp_path_factory.mktemp("http")
    env = start_http(root, http=f"{TOKENS_TOML}\nmax_upload_size = {MAX_UPLOAD}",
                     quarantine=f'next_hop = "127.0.0.1:{smtp_sink.port}"', extra="""
[[policy.rules]]
name = "hold-infected"
status = "infected"
action = ["reject", "quarantine"]
""")
    try:
        yield env
    finally:
        env.serve.stop()


@pytest.fixture
def make_http(tmp_path: Path) -> Iterator[Callable[..., HttpEnv]]:
    """Start a one-off server for a test (stopped afterwards)."""
    started: list[HttpEnv] = []

    def make(extra: str = "", *, http: str = "") -> HttpEnv:
        env = start_http(tmp_path, extra, http=http)
        started.append(env)
        return env

    yield make
    for env in started:
        env.serve.stop()


# -- the web console ([http] console = true) --------------------------------------------------
HTML_ATTACK = b"<script>alert('pwned')</script><img src=http://evil.example/x.png>"


def held_message(subject: str) -> bytes:
    return (b"From: <eve@example.test>\r\nTo: <bob@example.test>\r\nSubject: " +
            subject.encode() + b'\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; '
            b'boundary="B"\r\n\r\n--B\r\nContent-Type: text/html\r\n\r\n' + HTML_ATTACK +
            b"\r\n--B\r\nContent-Type: application/octet-stream\r\n"
            b'Content-Disposition: attachment; filename="eicar.com"\r\n\r\n' + EICAR +
            b"\r\n--B--\r\n")


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, smtp_sink: SmtpSink
            ) -> Iterator[tuple[HttpEnv, int]]:
    root = tmp_path_factory.mktemp("console")
    smtp_port, partners_port = free_port(), free_port()
    env = start_http(root, http=f'{TOKENS}\nconsole = true\nconsole_idle_timeout = 600',
                     quarantine=f'next_hop = "127.0.0.1:{smtp_sink.port}"\n'
                                'report_to = "lab@example.test"', extra=f"""
[[smtp.listeners]]
mode = "verdict"
listen = "127.0.0.1:{smtp_port}"
[[smtp.listeners]]
name = "partners"
mode = "verdict"
listen = "127.0.0.1:{partners_port}"
[[policy.rules]]
name = "hold-infected"
status = "infected"
action = ["reject", "quarantine"]
""")
    try:
        # one message through each listener (the console filters by listener)
        send(smtp_port, held_message("first held"))
        send(partners_port, held_message("second held: 50% & more"))
        yield env, smtp_port
    finally:
        env.serve.stop()


TOKENS = (f'tokens = [{{ token = "{TOKEN}", roles = ["scan", "read", "admin"], '
          f'name = "alice-admin" }}, {{ token = "{READ_TOKEN}", roles = ["read"] }}, '
          f'"{SCAN_TOKEN}"]')


def send(port: int, msg: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        try:
            s.sendmail("eve@example.test", ["bob@example.test"], msg)
        except smtplib.SMTPDataError as exc:
            assert exc.smtp_code == 550  # refused and held
