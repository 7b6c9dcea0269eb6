"""``[log] level = "debug"`` traces each front-end's protocol steps in the scan log (Sun's
DEBUG, Scalix's DEBUG_LEVEL), and every front-end's scan line carries its own protocol's
answer: the clamd listener the clamd verdict, the HTTP API the status (SMTP its reply
where the policy gave one).
Secrets and content never appear: not AUTH data, not header values, not body bytes."""

from __future__ import annotations

import asyncio
import json
import smtplib
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from avgate.frontends.smtpd import trace_arg
from avgate.protocols import milter as m
from tests.corpus import EICAR, make_message
from tests.helpers import wait_until
from tests.integration.avgate_proc import AvgateServe, free_port
from tests.integration.milter.conftest import MtaClient

BODY_MARK = "BODY-NEVER-LOGGED-5c1e"
HEADER_MARK = "header-value-never-logged-9a7b"


def config(root: Path, level: str, smtp_port: int) -> str:
    return f"""
[log]
path = "{root / 'scan.log'}"
level = "{level}"
[quarantine]
path = "{root / 'quarantine'}"
[[smtp.listeners]]
mode = "verdict"
listen = "127.0.0.1:{smtp_port}"
[milter]
listen = "inet:0@127.0.0.1"
[clamd_listener]
listen = "127.0.0.1:0"
[http]
listen = "127.0.0.1:0"
[icap]
listen = "127.0.0.1:0"
"""


def _serve(root: Path, level: str) -> Iterator[tuple[AvgateServe, int, Path]]:
    smtp_port = free_port()
    (root / "avgate.toml").write_text(config(root, level, smtp_port))
    with AvgateServe(root / "avgate.toml", cwd=root) as serve:
        yield serve, smtp_port, root / "scan.log"


@pytest.fixture(scope="module")
def debug_serve(tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[AvgateServe, int, Path]]:
    yield from _serve(tmp_path_factory.mktemp("trace-debug"), "debug")


def _lines(log: Path) -> list[dict[str, Any]]:
    text = log.read_text() if log.exists() else ""
    assert BODY_MARK not in text and HEADER_MARK not in text
    return [json.loads(line) for line in text.splitlines()]


def _smtp(port: int, body: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.sendmail("alice@example.test", ["bob@example.test"], body)


def _clamd(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"zINSTREAM\0" + struct.pack(">I", len(data)) + data + b"\0\0\0\0")
        return s.recv(4096)


async def _milter(port: int) -> m.Packet:
    client = await MtaClient.connect(port)
    await client.connect_event()
    msg = make_message("trace", extra_headers=f"X-Secret: {HEADER_MARK}\r\n".encode(),
                       body=BODY_MARK.encode())
    result = await client.message(msg)
    await client.close()
    return result.final


def _icap_options(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"OPTIONS icap://127.0.0.1/avscan ICAP/1.0\r\nHost: 127.0.0.1\r\n"
                  b"Encapsulated: null-body=0\r\n\r\n")
        return s.recv(4096)


def _drive(serve: AvgateServe, smtp_port: int) -> None:
    icap_port = int(serve.listeners["icap"][0].rsplit(":", 1)[1].split("/")[0])
    assert _icap_options(icap_port).startswith(b"ICAP/1.0 200")
    _smtp(smtp_port, make_message("trace", body=BODY_MARK.encode()))
    assert _clamd(serve.port("clamd_listener"), EICAR).startswith(b"stream: Eicar")
    assert isinstance(asyncio.run(_milter(serve.port("milter"))), m.Accept)
    r = httpx.post(f"http://127.0.0.1:{serve.port('http')}/v1/scan", content=EICAR,
                   timeout=20)
    assert r.status_code == 200  # no token configured: verdict only, not enforced


def test_each_frontend_traces_its_protocol_steps(
        debug_serve: tuple[AvgateServe, int, Path]) -> None:
    serve, smtp_port, log = debug_serve
    _drive(serve, smtp_port)
    assert wait_until(lambda: sum(e.get("event") == "scan" for e in _lines(log)) >= 4, 20)
    assert wait_until(lambda: any(e.get("event") == "http_request" for e in _lines(log)))
    lines = _lines(log)
    debug = [e for e in lines if e.get("level") == "debug"]
    commands = [e["command"] for e in debug if e["event"] == "smtp_command"]
    assert commands[:4] == ["EHLO", "MAIL", "RCPT", "DATA"] and "QUIT" in commands
    assert any(e["event"] == "smtp_reply" and e["reply"].startswith("250") for e in debug)
    milter = [e["command"] for e in debug if e["event"] == "milter_command"]
    assert {"OptNeg", "Connect", "Helo", "Mail", "Rcpt", "Header", "Body",
            "EndOfMessage"} <= set(milter)
    assert any(e["event"] == "milter_command" and e.get("header") == "X-Secret"
               for e in debug)  # the name, never the value (checked by _lines)
    assert any(e["event"] == "milter_reply" for e in debug)
    (clamd,) = [e for e in debug if e["event"] == "clamd_command"]
    assert clamd["command"] == "INSTREAM" and "FOUND" in clamd["reply"]
    (icap,) = [e for e in debug if e["event"] == "icap_request"]
    assert (icap["method"], icap["service"]) == ("OPTIONS", "avscan")
    (http,) = [e for e in debug if e["event"] == "http_request"]
    assert (http["method"], http["path"], http["status"]) == ("POST", "/v1/scan", 200)
    # every scan line carries its front-end's own answer
    scans = {e["frontend"]: e for e in lines if e.get("event") == "scan"}
    assert scans["smtp"]["actions"][0] == "accept"
    assert scans["clamd"]["clamd_reply"] == "Eicar-Test-Signature FOUND"
    assert "reply" not in scans["clamd"]
    assert scans["http"]["http_status"] == 200 and "reply" not in scans["http"]
    assert scans["milter"]["actions"][0] == "accept"


def test_nothing_traced_at_info(tmp_path: Path) -> None:
    served = _serve(tmp_path, "info")
    serve, smtp_port, log = next(served)
    try:
        _drive(serve, smtp_port)
        assert wait_until(lambda: sum(e.get("event") == "scan" for e in _lines(log)) >= 4, 20)
        assert not [e for e in _lines(log) if e.get("level") == "debug"]
    finally:
        served.close()


def test_auth_data_is_never_traced() -> None:
    assert trace_arg("AUTH", "PLAIN AGFsaWNlAHMzY3JldA==") == "PLAIN"
    assert trace_arg("MAIL", "FROM:<a@example.test>") == "FROM:<a@example.test>"
    assert trace_arg("RCPT", "x" * 1000) == "x" * 200
    assert trace_arg("NOOP", None) is None
