"""Fixtures for the reliability suite: faults (clamd killed / hung, next hop down, disk full,
avgate restarted) and hostile input on every listener.

Every test here counts every message it sends with a :class:`Ledger`:
``sent == delivered + rejected + tempfailed + quarantined``, exactly, and no infected message
is ever delivered (the recording sink's bytes are searched for EICAR and the marker).

Helpers:

* ``own_clamd`` — factory for PRIVATE clamd daemons (killed, stopped, restarted at will; the
  session-wide ``clamd`` fixture other tests share is never touched). Always cleaned up.
* ``tmpfs`` — factory for a small tmpfs (``mount -t tmpfs -o size=2m``); unmounted in
  teardown; the test is skipped with the reason when mounting is not permitted.
* ``serve`` — factory running ``avgate serve`` as a subprocess from a TOML text; every
  listener's port parsed from its start-up lines; always stopped (TERM, then KILL).
* The SMTP fixtures (``sink``, ``raw_sink``, ``avgate``) are re-used from
  ``tests/integration/smtp/conftest.py``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.clamd_daemon import ClamdDaemon
from tests.corpus import EICAR, MARKER, MARKER_NDB
from tests.helpers import require_clamd
from tests.integration.avgate_proc import AvgateServe
from tests.integration.smtp.conftest import (  # noqa: F401 - fixtures re-exported
    RawClient,
    Sink,
    avgate,
    raw_sink,
    sink,
)

# -- messages -------------------------------------------------------------------------------

def unique_message(kind: str = "clean", *, size: int = 0, tag: str = "") -> tuple[str, bytes]:
    """(message id, CRLF message). ``kind``: clean | eicar | marker. Every message is unique
    (so no verdict cache hides a scan) and ends with a trailer line naming its id, so a
    truncated (half-delivered) copy at the sink is recognisable."""
    mid = f"{tag or kind}-{uuid.uuid4().hex[:12]}"
    filler = os.urandom(max(size // 2, 16)).hex().encode()
    text = f"Message {mid}.\r\n".encode() + b"".join(
        filler[i:i + 76] + b"\r\n" for i in range(0, len(filler), 76))
    if kind == "marker":
        text += b"text " + MARKER + b" text\r\n"
    head = (f"From: a@example.test\r\nTo: b@example.test\r\nSubject: {mid}\r\n"
            f"Message-ID: <{mid}@example.test>\r\nMIME-Version: 1.0\r\n").encode()
    if kind == "eicar":  # an attachment that decodes to exactly the 68 EICAR bytes
        b64 = base64.encodebytes(EICAR).replace(b"\n", b"\r\n")
        head += b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n--B\r\n'
        text = (b"Content-Type: text/plain\r\n\r\n" + text + b"--B\r\n"
                b"Content-Type: application/octet-stream\r\n"
                b'Content-Disposition: attachment; filename="eicar.com"\r\n'
                b"Content-Transfer-Encoding: base64\r\n\r\n" + b64 + b"--B--\r\n")
    else:
        head += b"Content-Type: text/plain\r\n\r\n"
    body = text
    return mid, head + body + f"END-OF-{mid}\r\n".encode()


EICAR_B64 = base64.b64encode(EICAR)[:60]  # as it sits in a base64 attachment


def infected(data: bytes) -> bool:
    """EICAR (raw or base64) or the marker anywhere in ``data``."""
    return EICAR in data or MARKER in data or EICAR_B64 in data.replace(b"\r\n", b"")


# -- accounting -----------------------------------------------------------------------------
@dataclass
class Ledger:
    """What happened to every message sent, by the final reply the client got."""

    outcomes: dict[str, str] = field(default_factory=dict)  # id -> delivered|rejected|...
    replies: dict[str, str] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)

    def record(self, mid: str, kind: str, reply: str) -> str:
        """Classify a final SMTP reply (or ``ERR ...`` when the connection broke: the client
        still holds the message and retries — a temporary failure)."""
        if reply.startswith("250") and ("discarded" in reply or "quarantined" in reply):
            outcome = "quarantined"
        elif reply.startswith("250"):
            outcome = "delivered"
        elif reply[:1] == "5":
            outcome = "rejected"
        elif reply[:1] == "4" or reply.startswith("ERR"):
            outcome = "tempfailed"
        else:
            outcome = f"odd:{reply[:40]}"
        self.outcomes[mid] = outcome
        self.replies[mid] = reply
        self.kinds[mid] = kind
        return outcome

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.outcomes.values() if o == outcome)

    def ids(self, outcome: str) -> set[str]:
        return {m for m, o in self.outcomes.items() if o == outcome}

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    def summary(self) -> dict[str, int]:
        return {o: self.count(o) for o in ("delivered", "rejected", "tempfailed", "quarantined")}

    def check(self, sink_messages: list[bytes], *, sent: int) -> None:
        """The invariants every test asserts."""
        s = self.summary()
        assert self.sent == sent, (self.sent, sent)
        assert sum(s.values()) == sent, (s, {m: r for m, r in self.replies.items()
                                             if self.outcomes[m].startswith("odd")})
        # no infected message was acknowledged as delivered, nor reached the next hop
        bad = [m for m in self.ids("delivered") if self.kinds[m] != "clean"]
        assert not bad, [(m, self.replies[m]) for m in bad]
        leaked = [d[:200] for d in sink_messages if infected(d)]
        assert not leaked, leaked
        # the sink holds exactly the delivered messages, each one complete, once
        at_sink = []
        for data in sink_messages:
            m = re.search(rb"Subject: (\S+)", data)
            assert m, data[:200]
            mid = m.group(1).decode()
            assert f"END-OF-{mid}".encode() in data, f"half-delivered: {mid}"
            at_sink.append(mid)
        assert sorted(at_sink) == sorted(self.ids("delivered")), (
            sorted(set(at_sink) ^ self.ids("delivered")), self.replies)


async def smtp_send(port: int, msg: bytes, *, timeout: float = 20) -> str:  # noqa: ASYNC109
    """One transaction on a new connection; the final reply, or ``ERR ...``."""
    c: RawClient | None = None
    try:
        async with asyncio.timeout(timeout):
            c = await RawClient.connect(port)
            r = await c.cmd("EHLO client.test")
            if not r.startswith("250"):
                return r
            for cmd in ("MAIL FROM:<a@example.test>", "RCPT TO:<b@example.test>"):
                r = await c.cmd(cmd)
                if not r.startswith("250"):
                    return r
            r = await c.cmd("DATA")
            if not r.startswith("354"):
                return r
            reply = await c.cmd(msg + b".\r\n")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.cmd("QUIT"), 2)
            return reply
    except (OSError, ConnectionError, TimeoutError, asyncio.IncompleteReadError) as exc:
        return f"ERR {type(exc).__name__}: {exc}"
    finally:
        if c is not None:
            await c.close()


# -- private clamd --------------------------------------------------------------------------
@pytest.fixture
def own_clamd() -> Iterator[Callable[[], ClamdDaemon]]:
    """Factory: a started private clamd per call; all of them killed and removed at the end."""
    binary = require_clamd()
    daemons: list[ClamdDaemon] = []

    def make() -> ClamdDaemon:
        d = ClamdDaemon(binary, workdir=tempfile.mkdtemp(prefix="avg-rel-clamd-"))
        daemons.append(d)
        d.start()
        return d

    try:
        yield make
    finally:
        for d in daemons:
            d.resume()
            d.cleanup()


# -- tmpfs ----------------------------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Factory: a fresh 2 MiB tmpfs mounted at tmp_path/NAME (unmounted afterwards)."""
    mounted: list[Path] = []
    mount, umount = shutil.which("mount"), shutil.which("umount")

    def make(name: str, size: str = "2m") -> Path:
        target = tmp_path / name
        target.mkdir()
        if os.geteuid() != 0 or mount is None or umount is None:
            pytest.skip("mounting a tmpfs needs root and mount(8)")
        proc = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                              capture_output=True, text=True, timeout=10)
        if proc.returncode != 0:
            pytest.skip(f"mount -t tmpfs not permitted here: {proc.stderr.strip()}")
        mounted.append(target)
        return target

    try:
        yield make
    finally:
        for target in reversed(mounted):
            assert umount is not None
            if subprocess.run([umount, str(target)], capture_output=True,
                              timeout=10).returncode != 0:
                subprocess.run([umount, "-l", str(target)], capture_output=True, timeout=10)


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill a filesystem until at most ``leave`` bytes are free; returns the filler file."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                st = os.statvfs(directory)
                free = st.f_bavail * st.f_frsize
                if free <= leave:
                    break
                f.write(bytes(min(65536, max(free - leave, 1))))
                f.flush()
    return filler


# -- avgate serve ---------------------------------------------------------------------------
_ADDR_RE = re.compile(r"(?:127\.0\.0\.1|localhost):(\d+)")


@dataclass
class Served:
    proc: AvgateServe
    ports: dict[str, int]
    root: Path

    @property
    def pid(self) -> int:
        assert self.proc.proc is not None
        return self.proc.proc.pid

    def rss_kib(self) -> int:
        """Resident memory of the serve process, KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def alive(self) -> bool:
        return self.proc.proc is not None and self.proc.proc.poll() is None


def start_serve(root: Path, toml: str) -> Served:
    config = root / "avgate.toml"
    config.write_text(toml)
    proc = AvgateServe(config, cwd=root).start(timeout=30)
    ports: dict[str, int] = {}
    for line in proc.lines():
        m = re.match(r"^avgate: (\w+): listening on .*?" + _ADDR_RE.pattern, line)
        if m:
            ports.setdefault(m.group(1), int(m.group(2)))
    return Served(proc, ports, root)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[str], Served]]:
    """Factory: ``serve(toml_text)`` → a running ``avgate serve`` (stopped at the end)."""
    running: list[Served] = []

    def make(toml: str) -> Served:
        s = start_serve(tmp_path, toml)
        running.append(s)
        return s

    try:
        yield make
    finally:
        for s in running:
            s.proc.stop(timeout=10)


@pytest.fixture
async def started_sink() -> AsyncIterator[Sink]:
    s = await Sink().start()
    try:
        yield s
    finally:
        await s.stop()


KINDS = ("clean", "eicar", "clean", "marker")


async def send_batch(port: int, ledger: Ledger, n: int, *, concurrency: int = 4,
                     kinds: tuple[str, ...] = KINDS, tag: str = "", size: int = 0,
                     timeout: float = 20) -> dict[str, str]:  # noqa: ASYNC109
    """Send ``n`` unique messages (kinds in rotation), ``concurrency`` at a time; every one is
    recorded in ``ledger``. Returns id → outcome for this batch."""
    sem = asyncio.Semaphore(concurrency)
    out: dict[str, str] = {}

    async def one(i: int) -> None:
        kind = kinds[i % len(kinds)]
        mid, msg = unique_message(kind, size=size, tag=f"{tag}{kind}")
        async with sem:
            reply = await smtp_send(port, msg, timeout=timeout)
        out[mid] = ledger.record(mid, kind, reply)

    await asyncio.gather(*(one(i) for i in range(n)))
    return out


def wrongly_scanned(ledger: Ledger, batch: dict[str, str]) -> list[tuple[str, str]]:
    """(id, reply) of every message of ``batch`` whose outcome is not its scanned verdict
    (clean → delivered, infected → rejected); empty when every one was scanned and acted
    on, so tests read ``assert not wrongly_scanned(ledger, batch)``."""
    want = {"clean": "delivered", "eicar": "rejected", "marker": "rejected"}
    return [(m, ledger.replies[m]) for m, o in batch.items() if o != want[ledger.kinds[m]]]


@pytest.fixture(scope="session")
def marker_sigs(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A signature directory with the marker's .ndb (the embedded engine knows EICAR)."""
    d = tmp_path_factory.mktemp("sigs")
    (d / "marker.ndb").write_text(MARKER_NDB)
    return str(d)


@pytest.fixture
def embedded(marker_sigs: str) -> list[dict[str, object]]:
    """``engines=`` for the embedded engine with EICAR and the marker."""
    return [{"type": "embedded", "signatures": [marker_sigs]}]


# -- a next hop in its own thread (usable from module-scoped fixtures and any event loop) ---
class ThreadSink:
    """aiosmtpd Controller (own thread and loop) recording every delivered message."""

    def __init__(self, port: int = 0) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list[bytes] = []
        me = self

        class Handler:
            async def handle_DATA(self, server: object, session: object,
                                  envelope: object) -> str:
                me.messages.append(envelope.original_content)  # type: ignore[attr-defined]
                return "250 2.0.0 Ok: queued"

        from tests.clamd_daemon import free_port

        self.port = port or free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port,
                                     data_size_limit=None)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ThreadSink:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()
