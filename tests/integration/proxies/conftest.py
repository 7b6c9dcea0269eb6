"""Fixtures for the mail proxies: one Dovecot (POP3 and IMAP, with a test certificate: STLS
offered) for the session, the test mailbox emptied and filled per test, and avgate's proxy
in this process (an event loop in a thread), so a test can look at the gateway and the scan
log."""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from avgate import config
from avgate.frontends import imap as imap_fe
from avgate.frontends import pop3 as pop3_fe
from avgate.frontends.listen import ListenOptions
from avgate.gateway import Gateway
from avgate.observability import ScanLog
from avgate.policy import Policy
from avgate.scan import ScanService
from tests.helpers import require_binary
from tests.integration.proxies.dovecot import Dovecot

T = TypeVar("T")
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
CLEAN = (b"From: Alice <alice@example.test>\r\nTo: tester@example.test\r\n"
         b"Date: Tue, 1 Dec 2026 10:00:00 +0000\r\nSubject: hello\r\n"
         b"Message-ID: <clean@example.test>\r\n\r\nclean body\r\n.leading dot\r\n..two\r\n"
         b"\r\nbye\r\n")
INFECTED = (b"From: Mallory <mallory@example.test>\r\nTo: tester@example.test\r\n"
            b"Date: Tue, 1 Dec 2026 11:00:00 +0000\r\nSubject: invoice\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
            b"--b1\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n"
            b"--b1\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Disposition: attachment; filename=eicar.com\r\n\r\n" + EICAR
            + b"\r\n--b1--\r\n")


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = require_binary("openssl", "openssl")
    root = tmp_path_factory.mktemp("certs")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    cert.chmod(0o644)
    key.chmod(0o644)  # Dovecot reads it as its own user (a throwaway test key)
    return cert, key


@pytest.fixture(scope="session")
def dovecot(certificate: tuple[Path, Path]) -> Iterator[Dovecot]:
    server = Dovecot(cert=certificate[0], key=certificate[1], protocols=("pop3", "imap")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mailbox(dovecot: Dovecot) -> Dovecot:
    """The INBOX with two messages: 1 clean, 2 with EICAR attached."""
    dovecot.clear()
    dovecot.add_message(CLEAN)
    dovecot.add_message(INFECTED)
    return dovecot


@dataclass
class Proxy:
    """A started proxy: its ``port``, the ``gateway``, the scan log path."""

    port: int
    gateway: Gateway
    log_path: Path
    listener: Any


class InProcess:
    """An event loop in a thread running avgate front-ends built from ``config``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.stops: list[Callable[[], Coroutine[Any, Any, None]]] = []

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        for stop in reversed(self.stops):
            self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[InProcess]:
    runner = InProcess()
    try:
        yield runner
    finally:
        runner.close()


@pytest.fixture
def in_process(loop_thread: InProcess) -> Iterator[InProcess]:
    """The session's event loop; what a test starts there is stopped after the test."""
    stops = len(loop_thread.stops)
    try:
        yield loop_thread
    finally:
        while len(loop_thread.stops) > stops:
            loop_thread.call(loop_thread.stops.pop()())


@pytest.fixture(scope="session")
def scanner(loop_thread: InProcess) -> Iterator[ScanService]:
    """One started scan service (embedded engine, no verdict cache, messages over 1 MiB
    spooled to a file): its scan workers start once (seconds), not once per test."""
    service = ScanService.from_config(config.from_dict(
        {"scan": {"cache": False, "spool_memory": "1 MiB"}}))
    loop_thread.call(service.start())
    try:
        yield service
    finally:
        loop_thread.call(service.close())


StartProxy = Callable[..., Proxy]
StartPop3 = StartProxy


def _starter(section: str, module: Any, port: int, in_process: InProcess,
             scanner: ScanService, tmp_path: Path) -> StartProxy:
    def start(engines: list[dict[str, Any]] | None = None, policy: dict[str, Any] | None = None,
              scan: dict[str, Any] | None = None, **settings: Any) -> Proxy:
        log_path = tmp_path / f"{section}.log"
        raw: dict[str, Any] = {
            "scan": {"cache": False, **(scan or {})},
            "quarantine": {"path": str(tmp_path / "q")},
            section: {"listen": "127.0.0.1:0", "server": f"127.0.0.1:{port}",
                      "server_verify": False, **settings},
        }
        if engines is not None:
            raw["engines"] = engines
        if policy is not None:
            raw["policy"] = policy
        cfg = config.from_dict(raw, base_dir=str(tmp_path))
        own = engines is not None or scan is not None
        gateway = Gateway(cfg, ScanService.from_config(cfg) if own else scanner,
                          Policy.from_settings(cfg.policy), log=ScanLog(str(log_path)))

        async def up() -> Any:
            if own:
                await gateway.start()
            return (await module.start(gateway, ListenOptions(base_dir=str(tmp_path))))[0]

        listener = in_process.call(up())

        async def down() -> None:
            await listener.aclose()
            if own:
                await gateway.close()
            if gateway.log is not None:
                gateway.log.close()

        in_process.stops.append(down)
        return Proxy(listener.port, gateway, log_path, listener)

    return start


@pytest.fixture
def pop3_proxy(in_process: InProcess, dovecot: Dovecot, scanner: ScanService,
               tmp_path: Path) -> StartProxy:
    """``pop3_proxy(**settings, engines=..., policy=...)`` → a started POP3 proxy in front of
    the module's Dovecot (``server_verify = false``: Dovecot has a self-signed test cert).
    Without ``engines``/``scan`` it uses the module's scan service."""
    return _starter("pop3_proxy", pop3_fe, dovecot.pop3_port, in_process, scanner, tmp_path)


@pytest.fixture
def imap_proxy(in_process: InProcess, dovecot: Dovecot, scanner: ScanService,
               tmp_path: Path) -> StartProxy:
    """The same for the IMAP proxy."""
    return _starter("imap_proxy", imap_fe, dovecot.imap_port, in_process, scanner, tmp_path)
