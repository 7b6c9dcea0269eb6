"""Issue 20: every format sample through every front-end of ONE real ``avgate serve``.

The samples are the issue 20 formats of the generated corpus (``document_samples()``: PDF,
MS-TNEF, HTML, message/partial; ``container_samples()``: RAR, CAB, ISO 9660, cpio, LHA, ARJ,
lenient zip, OLE2/VBA, RTF, OOXML): each infected with EICAR or with the test body signature
(``Test.Body.Pattern``), each with a clean twin, and the ones the corpus expects to be
undecidable (``unknown``: an encrypted RAR, an ARJ member in a method with no reader, a lone
message/partial fragment, a message/external-body): the default policy accepts those (no
structural limit), so every front-end must pass them on unchanged, and wherever its
protocol can say so (the mail headers, the HTTP API, the CLI) say ``unknown``, never clean.
Behind every case, the scan log's line for the object (found by its sha256: what was hashed
is what was scanned) must carry the sample's expected status.

One ``avgate serve`` (embedded engine, the test signatures of tests/clamd_daemon.py) listens
with every front-end on free loopback ports, in front of real peers: an aiosmtpd next hop,
a Dovecot (POP3 and IMAP), a pyftpdlib server, a small HTTP origin. Each front-end is driven
by a real client, one session per front-end where its protocol allows:

====================  ==========================================================================
front-end             client; infected → what the client must see; clean → what must pass
====================  ==========================================================================
SMTP                  smtplib, one session: ``550 5.7.1 Virus found: NAME``; relayed to the next
                      hop, ``X-Virus-Status: Clean`` on top of the original bytes
milter                the project's MTA driver (tests/integration/milter), one connection:
                      ``550 ... NAME``; accept, ``X-Virus-Status: Clean``, body not replaced
ICAP                  ``c-icap-client``: RESPMOD without ``Allow: 204`` (``X-Infection-Found
                      ... Threat=NAME``; clean: 204 after the preview, or 200 with the body
                      byte-identical) and REQMOD of a POST upload (the same; clean: 204)
HTTP API              httpx ``POST /v1/scan?enforce=true``: 403 with NAME; 200 clean; the
                      reported sha256 is the sample's
clamd listener        INSTREAM, one IDSESSION: ``stream: NAME FOUND``; ``clamdscan --stream``
                      and ``clamdscan --fdpass`` (unix socket), one run each over every file
HTTP proxy            httpx through the proxy from a local origin: GET → 403 page with NAME,
                      clean byte-identical; POST upload → 403, never forwarded, clean forwarded
                      byte-identical
POP3, IMAP proxies    poplib and imaplib, one session each (one Dovecot for both): RETR and
                      FETCH get a notice naming NAME, the clean message byte-identical to what
                      Dovecot serves (POP3 tags an unknown one: ``X-Virus-Status: Unknown``);
                      IMAP APPEND: ``NO ... Virus found: NAME``, clean stored byte-identical
FTP proxy             ftplib, one session: RETR and STOR refused ``550 ... NAME`` (an infected
                      upload never reaches the server); clean byte-identical
CLI                   ``avgate scan --json`` over a directory of every sample (one run)
====================  ==========================================================================

SMTP, milter, POP3 and IMAP carry mail: a sample that is not itself a message (``.eml``)
travels as a base64 attachment of one. A body larger than the keep-back (the ISO images,
370 KB) streams through the HTTP proxy and ICAP RESPMOD under the default keep-back
trickling: an infected one is cut short before its end (the front-end's block for a body
already on its way); the finding name is then read from the scan log's line for it.
smtp/test_documents.py (a TNEF and a disguised PDF through the in-process SMTP front-end)
is left as it was; the SMTP column here covers the same samples and every other one.
The qmail-queue wrapper is not in the matrix: it is one process per message (about 2 s
each here, for 47 samples), tested on its own in smtp/test_qmail.py.

Each (front-end, sample) pair is one test case; the traffic of a front-end is sent once per
module (a batch) and the cases read their own outcome from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ftplib
import hashlib
import http.server
import imaplib
import io
import json
import poplib
import re
import smtplib
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller

from avgate.protocols import milter as m
from avgate.result import ScanStatus
from tests.clamd_daemon import write_signatures
from tests.corpus import Sample, container_samples, document_samples, mail
from tests.helpers import require_binary, wait_until
from tests.integration.avgate_proc import AvgateServe, avgate_command, free_port

pyftpdlib = pytest.importorskip("pyftpdlib", reason="pyftpdlib (test extra) missing")
from pyftpdlib.authorizers import DummyAuthorizer  # noqa: E402
from pyftpdlib.handlers import FTPHandler  # noqa: E402
from pyftpdlib.servers import ThreadedFTPServer  # noqa: E402

from tests.integration.milter.conftest import MtaClient  # noqa: E402
from tests.integration.proxies.dovecot import PASSWORD, USER, Dovecot  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SAMPLES: list[Sample] = [*document_samples(), *container_samples()]
BY_NAME = {s.name: s for s in SAMPLES}
FTP_USER, FTP_PASSWORD = "alice", "ftp-pass-20"


def as_mail(s: Sample) -> bytes:
    """What the mail front-ends carry: the message itself, or a message with the sample
    attached (base64)."""
    if s.name.endswith(".eml"):
        return s.data
    return mail(attachments=[(s.name, s.data)], subject=f"sample {s.name}")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a client saw for one sample.

    ``passed``: the front-end let it through (accepted, relayed, 200, OK); ``text``: the
    front-end's own verdict text (reply, notice, page, JSON) where a finding name must
    appear; ``relayed``/``original``: what reached the other side and what was sent, where
    the front-end relays content (None where it relays nothing); ``verdict``: the status
    the client was told (``X-Virus-Status``, the API's or the CLI's ``status``)."""

    passed: bool
    text: str
    relayed: bytes | None = None
    original: bytes | None = None
    verdict: str | None = None  # the status the front-end told the client, where it can


Batch = dict[str, Outcome]


# -- the peers --------------------------------------------------------------------------------
@dataclass
class SmtpSink:
    """An aiosmtpd next hop (its own thread) recording every message."""

    messages: list[bytes] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(bytes(envelope.original_content))
        return "250 2.0.0 Ok: queued"


class Origin(http.server.ThreadingHTTPServer):
    """The HTTP origin: GET /NAME serves the sample; POST records the body it got."""

    def __init__(self) -> None:
        self.uploads: dict[str, bytes] = {}
        super().__init__(("127.0.0.1", 0), _OriginHandler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _OriginHandler(http.server.BaseHTTPRequestHandler):
    server: Origin
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        s = BY_NAME.get(self.path.lstrip("/"))
        if s is None:
            self._reply(404, b"no such sample\n")
        else:
            self._reply(200, s.data)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.uploads[self.path.lstrip("/")] = body
        self._reply(200, b"stored\n")


@dataclass
class Env:
    root: Path
    samples_dir: Path
    serve: AvgateServe
    sink: SmtpSink
    dovecot: Dovecot
    ftp_home: Path
    origin: Origin
    config: Path
    clamd_unix: Path
    _log: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    _log_offset: int = 0

    def logged(self, frontend: str, name: str) -> str:
        """The scan log's verdict on sample ``name`` (by its URL) through ``frontend``."""
        path = self.root / "scan.log"

        def find() -> dict[str, Any] | None:
            for line in path.read_text().splitlines() if path.exists() else []:
                event = json.loads(line)
                if (event.get("event") == "scan" and event.get("frontend") == frontend
                        and str(event.get("ids", {}).get("url", "")).endswith("/" + name)):
                    return dict(event)
            return None

        wait_until(find)
        event = find()
        if event is None:
            return "no scan log line"
        names = sorted({f["name"] for f in event.get("findings", [])})
        return f"scan log: {event['status']} {names} {event.get('actions')}"

    def statuses(self, frontend: str, objects: set[bytes]) -> list[str]:
        """The statuses of the scan log's lines for any of ``objects`` (by sha256) through
        ``frontend``, once there is one (a line may follow the client's answer)."""
        wanted = {hashlib.sha256(o).hexdigest() for o in objects}

        def find() -> list[str]:
            return [status for sha in wanted for status in self._read_log().get(
                (frontend, sha), [])]

        wait_until(find)
        return find()

    def _read_log(self) -> dict[tuple[str, str], list[str]]:
        """The scan log's statuses by (front-end, sha256), read on from where it was left."""
        path = self.root / "scan.log"
        if path.exists():
            with path.open("rb") as f:
                f.seek(self._log_offset)
                data = f.read()
            complete = data[:data.rfind(b"\n") + 1]  # a line being written waits
            self._log_offset += len(complete)
            for line in complete.splitlines():
                event = json.loads(line)
                if event.get("event") == "scan":
                    key = (event["frontend"], event["sha256"])
                    self._log.setdefault(key, []).append(event["status"])
        return self._log

    def addr(self, frontend: str) -> tuple[str, int]:
        host, _, port = self.serve.listeners[frontend][0].rpartition(":")
        return host.rpartition("/")[2], int(port.partition("/")[0])


def _smtp_port(serve: AvgateServe) -> int:
    for line in serve.lines():
        found = re.match(r"^avgate: smtp: listening on \S+ 127\.0\.0\.1:(\d+)", line)
        if found:
            return int(found.group(1))
    raise AssertionError("no SMTP listener line:\n" + serve.output())


#: every front-end under uvloop (the default) and under asyncio's own loop ([serve] loop)
@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def env(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
        ) -> Iterator[Env]:
    loop = request.param
    root = tmp_path_factory.mktemp(f"formats-{loop}")
    write_signatures(root / "sigs")
    samples_dir = root / "samples"
    samples_dir.mkdir()
    for s in SAMPLES:
        (samples_dir / s.name).write_bytes(s.data)
    ftp_home = root / "ftp"
    (ftp_home / "up").mkdir(parents=True)
    for s in SAMPLES:
        (ftp_home / s.name).write_bytes(s.data)

    with contextlib.ExitStack() as stack:
        yield _start(root, samples_dir, ftp_home, stack, loop)


def _start(root: Path, samples_dir: Path, ftp_home: Path, stack: contextlib.ExitStack,
           loop: str) -> Env:
    """Start the peers and ``avgate serve``; ``stack`` stops each (in reverse order)."""
    sink = SmtpSink()
    sink_port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=sink_port, ready_timeout=10)
    controller.start()
    stack.callback(controller.stop)
    dovecot = Dovecot(protocols=("pop3", "imap"))
    stack.callback(dovecot.stop)
    dovecot.start()
    auth = DummyAuthorizer()
    auth.add_user(FTP_USER, FTP_PASSWORD, str(ftp_home), perm="elradfmwMT")
    ftp_server = ThreadedFTPServer(("127.0.0.1", 0), type("H", (FTPHandler,),
                                                          {"authorizer": auth}))
    threading.Thread(target=ftp_server.serve_forever, kwargs={"timeout": 0.2},
                     daemon=True).start()
    stack.callback(ftp_server.close_all)
    origin = Origin()
    threading.Thread(target=origin.serve_forever, kwargs={"poll_interval": 0.2},
                     daemon=True).start()
    stack.callback(origin.server_close)
    stack.callback(origin.shutdown)

    clamd_unix = root / "clamd.sock"
    config = root / "avgate.toml"
    config.write_text(f"""
[serve]
loop = "{loop}"
[scan]
cache = false
[log]
path = "{root / 'scan.log'}"
[quarantine]
path = "{root / 'quarantine'}"
[[engines]]
type = "embedded"
name = "embedded"
signatures = ["{root / 'sigs'}"]
clamav_db = ""  # only the test signatures: a system ClamAV database would add names
[[smtp.listeners]]
listen = "127.0.0.1:0"
next_hop = "127.0.0.1:{sink_port}"
mode = "before_queue"
[milter]
listen = "127.0.0.1:0"
[icap]
listen = "127.0.0.1:0"
service = "avscan"
[http]
listen = "127.0.0.1:0"
[clamd_listener]
listen = "127.0.0.1:0"
unix_socket = "{clamd_unix}"
[http_proxy]
listen = "127.0.0.1:0"
[pop3_proxy]
listen = "127.0.0.1:0"
server = "127.0.0.1:{dovecot.pop3_port}"
[imap_proxy]
listen = "127.0.0.1:0"
server = "127.0.0.1:{dovecot.imap_port}"
[ftp_proxy]
listen = "127.0.0.1:0"
server = "127.0.0.1:{ftp_server.socket.getsockname()[1]}"
data_timeout = 20
""")
    serve = AvgateServe(config)
    stack.callback(serve.stop)
    serve.start(timeout=60)
    return Env(root, samples_dir, serve, sink, dovecot, ftp_home, origin, config, clamd_unix)


# -- the batches: one per front-end -----------------------------------------------------------
def smtp_batch(env: Env) -> Batch:
    out: Batch = {}
    with smtplib.SMTP("127.0.0.1", _smtp_port(env.serve), timeout=60) as client:
        for s in SAMPLES:
            message = as_mail(s)
            before = len(env.sink.messages)
            try:
                client.sendmail("sender@example.org", ["rcpt@example.com"], message)
            except smtplib.SMTPDataError as e:
                error = e.smtp_error
                text = error.decode() if isinstance(error, bytes) else error
                out[s.name] = Outcome(False, f"{e.smtp_code} {text}")
                continue
            # before-queue: avgate answers DATA after the next hop has taken the message
            relayed = env.sink.messages[before] if len(env.sink.messages) > before else b""
            if not message.endswith(b"\r\n"):
                message += b"\r\n"  # smtplib ends the data with a line end
            # what avgate adds goes on top: the original follows it unchanged
            tail = relayed[len(relayed) - len(message):] if len(relayed) >= len(message) else b""
            added = relayed[:len(relayed) - len(message)].decode(errors="replace")
            status = re.search(r"^X-Virus-Status: (\w+)", added, re.MULTILINE)
            out[s.name] = Outcome(bool(relayed), added, tail, message,
                                  status.group(1) if status else "(none)")
    return out


async def _milter_batch(port: int) -> Batch:
    out: Batch = {}
    client = await MtaClient.connect(port)
    try:
        await client.connect_event()
        for n, s in enumerate(SAMPLES):
            result = await client.message(as_mail(s), queue_id=f"Q{n:04d}")
            final = result.final
            if isinstance(final, m.ReplyCode):
                out[s.name] = Outcome(False, final.reply)
            elif isinstance(final, (m.Reject, m.Tempfail, m.Discard)):
                out[s.name] = Outcome(False, type(final).__name__)
            else:
                status = result.added_headers.get("X-Virus-Status", "")
                changed = {c.name: c.value.strip() for c in result.of(m.ChangeHeader)}
                status = status or changed.get("X-Virus-Status", "")
                body_replaced = bool(result.of(m.ReplaceBody))
                out[s.name] = Outcome(isinstance(final, (m.Accept, m.Continue))
                                      and not body_replaced,
                                      f"{type(final).__name__} X-Virus-Status: {status}"
                                      + (" body replaced" if body_replaced else ""),
                                      verdict=status or "(none)")
    finally:
        await client.close()
    return out


def milter_batch(env: Env) -> Batch:
    return asyncio.run(_milter_batch(env.addr("milter")[1]))


def _cicap(env: Env, s: Sample, mode: str) -> Outcome:
    binary = require_binary("c-icap-client", "c-icap")
    _, port = env.addr("icap")
    out = env.root / f"icap-{mode}-{s.name}.out"
    args = (["-resp", f"http://origin.test/{s.name}", "-no204"] if mode == "respmod" else
            ["-req", f"http://origin.test/{s.name}?upload=1", "-method", "POST"])
    proc = subprocess.run(
        [binary, "-i", "127.0.0.1", "-p", str(port), "-s", "avscan", "-v",
         "-f", str(env.samples_dir / s.name), "-o", str(out), *args],
        capture_output=True, timeout=60, check=False)
    text = (proc.stdout + proc.stderr).decode(errors="replace")
    body = out.read_bytes() if out.exists() else b""
    if proc.returncode != 0:
        return Outcome(False, f"c-icap-client exit {proc.returncode}: {text}")
    if re.search(r"X-Infection-Found: [^\n]*Threat=", text):
        return Outcome(False, text + body.decode(errors="replace"))
    if "ICAP/1.0 204" in text:  # no modification: allowed after a preview (RFC 3507 4.6)
        return Outcome(True, text)
    if mode == "respmod" and "ICAP/1.0 200" in text:  # the body comes back after its header
        got = body[len(body) - len(s.data):]
        if len(body) < len(s.data):  # keep-back: an infected body is cut short
            return Outcome(False, f"cut after {len(body)} of {len(s.data)} bytes; "
                           + env.logged("icap", s.name))
        return Outcome(True, text, got, s.data)
    return Outcome(False, text + body.decode(errors="replace"))


def icap_batch(env: Env, mode: str) -> Batch:
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda s: _cicap(env, s, mode), SAMPLES))
    return {s.name: o for s, o in zip(SAMPLES, outcomes, strict=True)}


def http_api_batch(env: Env) -> Batch:
    host, port = env.addr("http")
    out: Batch = {}
    with httpx.Client(base_url=f"http://{host}:{port}", timeout=60) as client:
        for s in SAMPLES:
            r = client.post("/v1/scan", params={"enforce": "true"}, content=s.data)
            body = r.json()
            names = [f["name"] for f in body.get("findings", [])]
            same = body.get("sha256") == hashlib.sha256(s.data).hexdigest()
            out[s.name] = Outcome(r.status_code == 200 and same,
                                  f"{r.status_code} {body['status']} {names} sha256 "
                                  f"{'matches' if same else 'differs'}",
                                  verdict=body["status"])
    return out


def _clamd_reply(sock: socket.socket) -> bytes:
    reply = b""
    while not reply.endswith(b"\0"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
    return reply


def clamd_instream_batch(env: Env) -> Batch:
    out: Batch = {}
    with socket.create_connection(env.addr("clamd_listener"), timeout=60) as sock:
        sock.sendall(b"zIDSESSION\0")
        for n, s in enumerate(SAMPLES, 1):
            sock.sendall(b"zINSTREAM\0" + struct.pack(">I", len(s.data)) + s.data
                         + b"\0\0\0\0")
            reply = _clamd_reply(sock).rstrip(b"\0").decode(errors="replace")
            prefix = f"{n}: stream: "
            out[s.name] = Outcome(reply == prefix + "OK", reply)
        sock.sendall(b"zEND\0")
    return out


def clamdscan_batch(env: Env, mode: str) -> Batch:
    binary = require_binary("clamdscan", "clamdscan")
    conf = env.root / f"clamd-{mode}.conf"
    host, port = env.addr("clamd_listener")
    conf.write_text(f"LocalSocket {env.clamd_unix}\n" if mode == "fdpass" else
                    f"TCPSocket {port}\nTCPAddr {host}\n")
    paths = [str(env.samples_dir / s.name) for s in SAMPLES]
    proc = subprocess.run([binary, f"--config-file={conf}", "--no-summary", f"--{mode}",
                           *paths], capture_output=True, text=True, timeout=60, check=False)
    lines = {line.partition(": ")[0]: line.partition(": ")[2]
             for line in proc.stdout.splitlines()}
    assert proc.returncode == 1, proc  # some found, no error
    return {s.name: Outcome(lines.get(p) == "OK", lines.get(p, f"no line: {proc.stderr}"))
            for s, p in zip(SAMPLES, paths, strict=True)}


def http_proxy_batch(env: Env, method: str) -> Batch:
    host, port = env.addr("http_proxy")
    out: Batch = {}
    with httpx.Client(proxy=f"http://{host}:{port}", timeout=60) as client:
        for s in SAMPLES:
            url = f"http://127.0.0.1:{env.origin.port}/{s.name}"
            if method == "GET":
                try:
                    r = client.get(url)
                except httpx.RemoteProtocolError as e:  # keep-back: an infected body is cut
                    out[s.name] = Outcome(False, f"{e}; " + env.logged("http_proxy", s.name))
                    continue
                out[s.name] = Outcome(r.status_code == 200, f"{r.status_code} {r.text}",
                                      r.content, s.data)
            else:
                r = client.post(url + ".upload", content=s.data)
                got = env.origin.uploads.get(s.name + ".upload")
                text = f"{r.status_code} {r.text}"
                if r.status_code != 200 and got is not None:
                    text += " (but the upload reached the origin)"
                out[s.name] = Outcome(r.status_code == 200 or got is not None, text, got,
                                      s.data)
    return out


def _fill_mailbox(env: Env) -> list[bytes]:
    """Every sample's message into the INBOX, in order (APPEND straight to Dovecot)."""
    env.dovecot.clear()
    messages = [as_mail(s) for s in SAMPLES]
    client = imaplib.IMAP4("127.0.0.1", env.dovecot.imap_port, timeout=30)
    try:
        client.login(USER, PASSWORD)
        for message in messages:
            typ, data = client.append("INBOX", "", None, message)
            assert typ == "OK", data
    finally:
        client.logout()
    return messages


@pytest.fixture(scope="module")
def mailbox(env: Env) -> list[bytes]:
    return _fill_mailbox(env)


def _pop3_all(port: int) -> list[tuple[bytes, bytes]]:
    client = poplib.POP3("127.0.0.1", port, timeout=60)
    try:
        client.user(USER)
        client.pass_(PASSWORD)
        count, _ = client.stat()
        out = []
        for n in range(1, count + 1):
            status, lines, _ = client.retr(n)
            out.append((status, b"".join(line + b"\r\n" for line in lines)))
        return out
    finally:
        client.quit()


def pop3_batch(env: Env, mailbox: list[bytes]) -> Batch:
    direct = _pop3_all(env.dovecot.pop3_port)
    proxied = _pop3_all(env.addr("pop3_proxy")[1])
    assert len(direct) == len(proxied) == len(SAMPLES)
    out: Batch = {}
    for s, sent, (_, want), (status, got) in zip(SAMPLES, mailbox, direct, proxied,
                                                  strict=True):
        assert want.rstrip(b"\r\n") == sent.rstrip(b"\r\n")  # Dovecot serves what was stored
        notice = b"replaced by avgate" in status
        text = (status + b"\r\n" + got).decode(errors="replace")
        verdict = None
        if not notice and got != want and got.endswith(want):  # tagged: headers on top
            added = got[:len(got) - len(want)].decode(errors="replace")
            found = re.search(r"^X-Virus-Status: (\w+)", added, re.MULTILINE)
            verdict = found.group(1) if found else "(none)"
            got = got[len(got) - len(want):]
        out[s.name] = Outcome(not notice, text, got, want, verdict)
    return out


def _imap_all(port: int) -> list[bytes]:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=60)
    try:
        client.login(USER, PASSWORD)
        _, data = client.select("INBOX", readonly=True)
        out = []
        for n in range(1, int(data[0] or 0) + 1):
            typ, fetched = client.fetch(str(n), "(BODY.PEEK[])")
            assert typ == "OK", fetched
            first = fetched[0]
            assert isinstance(first, tuple), fetched
            out.append(bytes(first[1]))
        return out
    finally:
        client.logout()


def imap_batch(env: Env, mailbox: list[bytes]) -> Batch:
    direct = _imap_all(env.dovecot.imap_port)
    proxied = _imap_all(env.addr("imap_proxy")[1])
    assert direct == mailbox
    out: Batch = {}
    for s, want, got in zip(SAMPLES, direct, proxied, strict=True):
        notice = got != want and b"virus removed" in got.split(b"\r\n\r\n", 1)[0]
        out[s.name] = Outcome(not notice, got.decode(errors="replace"), got, want)
    return out


def imap_append_batch(env: Env) -> Batch:
    """APPEND every sample's message through the proxy into a mailbox of its own; then read
    back from Dovecot directly what was stored."""
    direct = imaplib.IMAP4("127.0.0.1", env.dovecot.imap_port, timeout=30)
    direct.login(USER, PASSWORD)
    direct.create("Uploads")
    out: Batch = {}
    stored: list[str] = []
    client = imaplib.IMAP4("127.0.0.1", env.addr("imap_proxy")[1], timeout=60)
    try:
        client.login(USER, PASSWORD)
        for s in SAMPLES:
            typ, data = client.append("Uploads", "", None, as_mail(s))
            out[s.name] = Outcome(typ == "OK", f"{typ} {data!r}")
            if typ == "OK":
                stored.append(s.name)
    finally:
        client.logout()
    try:
        _, count = direct.select("Uploads", readonly=True)
        assert int(count[0] or 0) == len(stored), (count, stored)
        for n, name in enumerate(stored, 1):
            typ, fetched = direct.fetch(str(n), "(BODY.PEEK[])")
            first = fetched[0]
            assert typ == "OK" and isinstance(first, tuple), fetched
            want = as_mail(BY_NAME[name])
            out[name] = Outcome(out[name].passed, out[name].text, bytes(first[1]), want)
    finally:
        direct.logout()
    return out


def _ftp(env: Env) -> ftplib.FTP:
    client = ftplib.FTP()  # noqa: S321 - plain FTP is what the proxy speaks
    client.connect(*env.addr("ftp_proxy"), timeout=60)
    client.login(FTP_USER, FTP_PASSWORD)
    return client


def ftp_batch(env: Env, command: str) -> Batch:
    out: Batch = {}
    with _ftp(env) as client:
        for s in SAMPLES:
            try:
                if command == "RETR":
                    got = io.BytesIO()
                    reply = client.retrbinary(f"RETR {s.name}", got.write)
                    out[s.name] = Outcome(True, reply, got.getvalue(), s.data)
                else:
                    reply = client.storbinary(f"STOR up/{s.name}", io.BytesIO(s.data))
                    stored = env.ftp_home / "up" / s.name
                    out[s.name] = Outcome(True, reply, stored.read_bytes()
                                          if stored.exists() else None, s.data)
            except ftplib.error_perm as e:
                text = str(e)
                if command == "STOR" and (env.ftp_home / "up" / s.name).exists():
                    text += " (but the file reached the server)"
                    out[s.name] = Outcome(True, text)
                else:
                    out[s.name] = Outcome(False, text)
    return out


def cli_batch(env: Env) -> Batch:
    proc = subprocess.run([*avgate_command(), "scan", "--json", "--no-progress", "--config",
                           str(env.config), str(env.samples_dir)],
                          capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 1, proc  # infected found, no error
    rows = {Path(r["path"]).name: r for r in map(json.loads, proc.stdout.splitlines())}
    return {s.name: Outcome(rows[s.name]["status"] != "infected",
                            json.dumps(rows[s.name].get("findings")),
                            verdict=rows[s.name]["status"])
            for s in SAMPLES if s.name in rows}


FRONTENDS: dict[str, Callable[..., Batch]] = {
    "smtp": smtp_batch,
    "milter": milter_batch,
    "icap-respmod": lambda env: icap_batch(env, "respmod"),
    "icap-reqmod": lambda env: icap_batch(env, "reqmod"),
    "http-api": http_api_batch,
    "clamd-instream": clamd_instream_batch,
    "clamdscan-stream": lambda env: clamdscan_batch(env, "stream"),
    "clamdscan-fdpass": lambda env: clamdscan_batch(env, "fdpass"),
    "http-proxy-get": lambda env: http_proxy_batch(env, "GET"),
    "http-proxy-post": lambda env: http_proxy_batch(env, "POST"),
    "pop3": pop3_batch,
    "imap": imap_batch,
    "imap-append": imap_append_batch,
    "ftp-retr": lambda env: ftp_batch(env, "RETR"),
    "ftp-stor": lambda env: ftp_batch(env, "STOR"),
    "cli": cli_batch,
}
MAIL_BOX = {"pop3", "imap"}
#: the front-end names the scan log writes
LOGGED_AS = {"smtp": "smtp", "milter": "milter", "icap-respmod": "icap", "icap-reqmod": "icap",
             "http-api": "http", "clamd-instream": "clamd", "clamdscan-stream": "clamd",
             "clamdscan-fdpass": "clamd", "http-proxy-get": "http_proxy",
             "http-proxy-post": "http_proxy", "pop3": "pop3_proxy", "imap": "imap_proxy",
             "imap-append": "imap_proxy", "ftp-retr": "ftp_proxy", "ftp-stor": "ftp_proxy",
             "cli": "ondemand"}

#: (front-end, sample) → why it fails today; each is an xfail(strict=True): a fix shows.
KNOWN: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def batches(env: Env, request: pytest.FixtureRequest) -> Callable[[str], Batch]:
    done: dict[str, Batch | BaseException] = {}

    def get(frontend: str) -> Batch:
        if frontend not in done:  # once: a batch that failed fails each of its cases
            args: list[Any] = [env]
            if frontend in MAIL_BOX:
                args.append(request.getfixturevalue("mailbox"))
            try:
                done[frontend] = FRONTENDS[frontend](*args)
            except Exception as e:  # re-raised in every case of the batch
                e.add_note("avgate serve said:\n" + env.serve.output()[-4000:])
                done[frontend] = e
        got = done[frontend]
        if isinstance(got, BaseException):
            raise got
        return got

    return get


def _cases() -> list[Any]:
    cases = []
    for frontend in FRONTENDS:
        for s in SAMPLES:
            marks = []
            if (frontend, s.name) in KNOWN:
                marks.append(pytest.mark.xfail(strict=True, reason=KNOWN[frontend, s.name]))
            cases.append(pytest.param(frontend, s.name, marks=marks, id=f"{frontend}-{s.name}"))
    return cases


@pytest.mark.parametrize(("frontend", "name"), _cases())
def test_sample_through_frontend(env: Env, batches: Callable[[str], Batch], frontend: str,
                                 name: str) -> None:
    s = BY_NAME[name]
    outcome = batches(frontend).get(name)
    assert outcome is not None, f"{frontend} reported nothing for {name}"
    if s.expected is ScanStatus.INFECTED:
        assert s.virus is not None
        assert not outcome.passed, f"{name} passed {frontend}: {outcome.text[:2000]}"
        assert s.virus in outcome.text, outcome.text[:2000]
        if outcome.relayed is not None:  # a notice, a block page: never the object itself
            assert outcome.relayed != outcome.original, f"{name} relayed by {frontend}"
    else:  # clean, or unknown that the default policy accepts (tagged where it can be)
        assert outcome.passed, f"{name} refused by {frontend}: {outcome.text[:2000]}"
        if outcome.original is not None:
            assert outcome.relayed == outcome.original, f"{name} altered by {frontend}"
        if outcome.verdict is not None:
            assert outcome.verdict.lower() == s.expected.value, outcome.text[:2000]
    # what the front-end scanned is the object (its hash), with the expected verdict
    objects = {s.data, as_mail(s), as_mail(s) + b"\r\n"}
    statuses = env.statuses(LOGGED_AS[frontend], objects)
    assert statuses, f"no scan log line for {name} through {frontend}"
    assert set(statuses) == {s.expected.value}, statuses


def test_matrix_covers_every_issue20_format() -> None:
    names = set(BY_NAME)
    for wanted in ("eicar-flate.pdf", "marker-lzw.pdf", "clean.pdf", "winmail.dat",
                   "marker.tnef", "clean.tnef", "eicar-smuggling.html",
                   "marker-data-uri.html", "clean.html", "mail-partial-3.eml",
                   "mail-partial-marker.eml", "eicar.rar", "marker-v4.rar", "clean.rar",
                   "eicar.cab", "clean.cab", "eicar.iso", "clean.iso", "eicar.cpio",
                   "marker.cpio", "clean.cpio", "eicar.lzh", "clean.lzh", "eicar.arj",
                   "clean.arj", "zip-local-only.zip", "clean-streamed.zip",
                   "eicar-package.doc", "marker-macro.doc", "clean-macro.doc",
                   "eicar-package.rtf", "marker-ole-object.rtf", "clean-object.rtf",
                   "eicar-embedded-ole.docx", "clean-embedded-ole.docx"):
        assert wanted in names, wanted
