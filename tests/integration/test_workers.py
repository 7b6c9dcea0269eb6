"""``avgate serve`` with ``[serve] workers = 2`` and the mail/proxy front-ends: SMTP (relaying to
an aiosmtpd sink), milter and ICAP on fixed TCP ports shared with SO_REUSEPORT, and their unix
sockets opened by one worker only.

Which worker served a connection is read from the kernel: the server side of each held-open
client connection is found in ``/proc/net/tcp`` (by the client's port) and its socket inode
among the ``/proc/<worker>/fd`` links. The SMTP scan log names the worker too (the session id
carries the pid).
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import smtplib
import socket
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from avgate.protocols import icap as proto
from avgate.protocols import milter as m
from tests.helpers import wait_until
from tests.integration.avgate_proc import (
    AvgateServe,
    children,
    free_port,
    server_ends,
    socket_inodes,
)
from tests.integration.milter.conftest import MtaClient
from tests.integration.milter.conftest import make_message as mail_message

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs /proc")]

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
CONNECTIONS = 12  # per front-end: all on one worker by chance is 2 * 2**-12
REQ_HDR = b"GET http://origin.test/f HTTP/1.1\r\nHost: origin.test\r\n\r\n"


# -- helpers ------------------------------------------------------------------------------------
def _serving_pid(workers: list[int], server_port: int, client_port: int) -> int | None:
    """The worker holding the server side of the connection 127.0.0.1:client_port →
    127.0.0.1:server_port."""
    inode, _ = server_ends(server_port).get(client_port, (None, 0))
    if inode is None:
        return None
    return next((pid for pid in workers if inode in socket_inodes(pid)), None)


def _local_port(client: smtplib.SMTP) -> int:
    assert client.sock is not None
    return int(client.sock.getsockname()[1])


def _unix_listeners(workers: list[int], path: Path) -> list[int]:
    """Workers holding the listening unix socket bound to ``path``."""
    inodes = {f[6] for f in (line.split() for line in
                             Path("/proc/net/unix").read_text().splitlines()[1:])
              if len(f) >= 8 and f[7] == str(path)}
    return [pid for pid in workers if inodes & socket_inodes(pid)]


class _Sink:
    """aiosmtpd next hop (in a thread) that records the messages it is given."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages.append(envelope.original_content)
        return "250 2.0.0 Ok: queued"


def _config(tmp: Path, *, smtp: int | None = None, hop: int | None = None,
            milter: str | None = None, icap: str | None = None, extra: str = "",
            direction: str = "inbound", milter_extra: str = "", icap_extra: str = "") -> Path:
    text = f"""
[scan]
cache = false
[log]
path = "{tmp / 'scan.log'}"
[quarantine]
path = "{tmp / 'quarantine'}"
[serve]
workers = 2
drain_timeout = 5
""" + extra
    if smtp is not None:
        text += f"""
[[smtp.listeners]]
name = "in"
listen = "127.0.0.1:{smtp}"
next_hop = "{'discard' if hop is None else f'127.0.0.1:{hop}'}"
hostname = "avgate.test"
direction = "{direction}"
"""
    if milter is not None:
        text += f'[milter]\nlisten = "{milter}"\n{milter_extra}\n'
    if icap is not None:
        text += f'[icap]\nlisten = "{icap}"\nservice = "avscan"\n{icap_extra}\n'
    path = tmp / "avgate.toml"
    path.write_text(text)
    return path


def _log(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "scan.log"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _mail(subject: str, attachment: bytes | None = None) -> bytes:
    return mail_message(subject, attachment=attachment)


def _respmod(body: bytes, ctype: str = "application/octet-stream") -> bytes:
    res_hdr = (f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode()
    return (proto.encode_request("RESPMOD", "icap://t/avscan", [("Host", "t"), ("Allow", "204")],
                                 req_hdr=REQ_HDR, res_hdr=res_hdr, body="res-body")
            + proto.encode_body(body))


def _icap_exchange(sock: socket.socket, request: bytes) -> tuple[proto.Response, bytes]:
    """One request on a kept-alive connection: (response, encapsulated body)."""
    sock.sendall(request)
    parser = proto.IcapParser("client")
    response: proto.Response | None = None
    body = b""
    while True:
        for ev in parser:
            if isinstance(ev, proto.Response):
                response = ev
                if not ev.has_body:
                    return ev, body
            elif isinstance(ev, proto.BodyChunk):
                body += ev.data
            elif isinstance(ev, proto.BodyEnd):
                assert response is not None
                return response, body
        data = sock.recv(65536)
        assert data, "ICAP server closed the connection"
        parser.receive_data(data)


async def _milter_clients(target: str | int, n: int) -> list[MtaClient]:
    clients = []
    for _ in range(n):
        c = await MtaClient.connect(target)
        await c.connect_event(addr="192.0.2.10")
        clients.append(c)
    return clients


# -- tests ----------------------------------------------------------------------------------------
def test_workers_serve_smtp_milter_icap(tmp_path: Path) -> None:
    sink = _Sink()
    controller = Controller(sink, hostname="127.0.0.1", port=free_port())
    controller.start()
    smtp_port, milter_port, icap_port = free_port(), free_port(), free_port()
    config = _config(tmp_path, smtp=smtp_port, hop=controller.port,
                     milter=f"127.0.0.1:{milter_port}", icap=f"127.0.0.1:{icap_port}")
    serve = AvgateServe(config)
    try:
        serve.start(timeout=20)
        assert serve.proc is not None
        assert serve.wait_for_line("avgate: serving", timeout=10)
        ok = lambda: sum("avgate: serving" in x for x in serve.lines()) == 2  # noqa: E731
        assert wait_until(ok), serve.output()
        workers = children(serve.proc.pid)
        assert len(workers) == 2, serve.output()
        for name in ("smtp", "milter", "icap"):
            assert sum(f"avgate: {name}: listening on" in x for x in serve.lines()) == 2, (
                serve.output())

        # SMTP: clean mail relayed, EICAR refused; connections held open to see their worker
        smtp_conns = []
        seen: dict[str, set[int]] = {"smtp": set(), "milter": set(), "icap": set()}
        for i in range(CONNECTIONS):
            c = smtplib.SMTP("127.0.0.1", smtp_port, timeout=10)
            c.ehlo("client.test")
            assert c.sendmail("alice@example.test", ["bob@example.test"],
                              _mail(f"clean {i}")) == {}
            smtp_conns.append(c)
            seen["smtp"].add(_serving_pid(workers, smtp_port, _local_port(c)) or 0)
        for c in smtp_conns[:3]:
            with pytest.raises(smtplib.SMTPDataError) as err:
                c.sendmail("alice@example.test", ["bob@example.test"],
                           _mail("bad", attachment=EICAR))
            assert err.value.smtp_code == 550, err.value
            assert b"Eicar" in err.value.smtp_error
        for c in smtp_conns:
            c.quit()
        assert len(sink.messages) == CONNECTIONS
        assert not any(b"EICAR" in msg for msg in sink.messages)

        # milter
        async def milter_round() -> None:
            clients = await _milter_clients(milter_port, CONNECTIONS)
            try:
                for i, c in enumerate(clients):
                    r = await c.message(_mail(f"milter clean {i}"), queue_id=f"Q{i}")
                    assert isinstance(r.final, m.Accept), r
                    port = c.writer.get_extra_info("sockname")[1]
                    seen["milter"].add(_serving_pid(workers, milter_port, port) or 0)
                for i, c in enumerate(clients[:3]):
                    r = await c.message(_mail("milter bad", attachment=EICAR), queue_id=f"V{i}")
                    assert isinstance(r.final, m.ReplyCode), r
                    assert r.final.reply.startswith("550"), r
            finally:
                for c in clients:
                    await c.close()

        asyncio.run(milter_round())

        # ICAP: clean → 204, EICAR → 200 wrapping the 403 block page
        icap_conns = []
        try:
            for _ in range(CONNECTIONS):
                s = socket.create_connection(("127.0.0.1", icap_port), timeout=10)
                icap_conns.append(s)
                resp, _ = _icap_exchange(s, _respmod(b"harmless content\n"))
                assert resp.status == 204, resp
                seen["icap"].add(_serving_pid(workers, icap_port, s.getsockname()[1]) or 0)
            for s in icap_conns[:3]:
                resp, body = _icap_exchange(s, _respmod(EICAR))
                assert resp.status == 200, resp
                assert b"403" in resp.res_hdr.split(b"\r\n")[0]
                assert "Eicar" in resp.headers.get("X-Virus-ID", ""), resp.headers
                assert b"Eicar" in body
        finally:
            for s in icap_conns:
                s.close()

        # both workers took connections, on every front-end
        for name, pids in seen.items():
            assert pids == set(workers), (name, pids, workers)
        # the scan log agrees for SMTP (its session ids carry the worker's pid)
        scans = [e for e in _log(tmp_path) if e.get("frontend") == "smtp" and "status" in e]
        assert len(scans) == CONNECTIONS + 3
        log_pids = {int(e["ids"]["session"].split("-")[1]) for e in scans}
        assert log_pids == set(workers), (log_pids, workers)
        by_status = [e["status"] for e in _log(tmp_path) if "status" in e]
        assert by_status.count("infected") == 9 and by_status.count("clean") == 3 * CONNECTIONS

        # SIGTERM: every worker drains and exits, then the supervisor
        assert serve.stop() == 0, serve.output()
        assert sum(x == "avgate: stopped" for x in serve.lines()) == 2, serve.output()
        assert not any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in workers)
    finally:
        serve.stop()
        controller.stop()


def test_workers_unix_sockets_in_one_worker(tmp_path: Path) -> None:
    milter_sock, icap_sock = tmp_path / "milter.sock", tmp_path / "icap.sock"
    config = _config(tmp_path, milter=f"unix:{milter_sock}", icap=f"unix:{icap_sock}")
    with AvgateServe(config) as serve:
        assert serve.proc is not None
        ok = lambda: sum("avgate: serving" in x for x in serve.lines()) == 2  # noqa: E731
        assert wait_until(ok), serve.output()
        workers = children(serve.proc.pid)
        assert len(workers) == 2
        # each unix socket is opened once, by the same worker (worker 0)
        assert len(_unix_listeners(workers, milter_sock)) == 1
        assert _unix_listeners(workers, icap_sock) == _unix_listeners(workers, milter_sock)
        assert sum("listening on unix:" in x for x in serve.lines()) == 1, serve.output()

        async def milter_once() -> None:
            [c] = await _milter_clients(str(milter_sock), 1)
            try:
                r = await c.message(_mail("clean over unix"))
                assert isinstance(r.final, m.Accept), r
                r = await c.message(_mail("bad over unix", attachment=EICAR))
                assert isinstance(r.final, m.ReplyCode), r
            finally:
                await c.close()

        asyncio.run(milter_once())
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(icap_sock))
            resp, _ = _icap_exchange(s, proto.encode_request(
                "OPTIONS", "icap://t/avscan", [("Host", "t")]))
            assert resp.status == 200
            resp, _ = _icap_exchange(s, _respmod(EICAR))
            assert resp.status == 200 and resp.headers.get("X-Virus-ID")
        assert serve.stop() == 0, serve.output()
        assert sum(x == "avgate: stopped" for x in serve.lines()) == 2, serve.output()
    assert not milter_sock.exists()


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat[stat.rfind(")") + 2]


RELOAD_POLICY = """
[[policy.rules]]
frontend = "milter"
status = "infected"
action = ["quarantine"]
[[policy.rules]]
direction = "outbound"
status = "infected"
action = ["tempfail"]
"""


def test_workers_reload_front_end_settings(tmp_path: Path) -> None:
    """SIGHUP: every worker's SMTP/milter/ICAP follow the new config (listener direction,
    [milter] quarantine, [icap] skip_content_types) on connections opened before and after."""
    smtp_port, milter_port, icap_port = free_port(), free_port(), free_port()

    def write(new: bool) -> Path:
        return _config(tmp_path, smtp=smtp_port, milter=f"127.0.0.1:{milter_port}",
                       icap=f"127.0.0.1:{icap_port}", extra="[policy]\n" + RELOAD_POLICY,
                       direction="outbound" if new else "inbound",
                       milter_extra=f'quarantine = "{"mta" if new else "store"}"',
                       icap_extra='skip_content_types = ["image/*"]' if new else "")

    def smtp_eicar(c: smtplib.SMTP) -> int:
        try:
            c.sendmail("alice@example.test", ["bob@example.test"], _mail("x", attachment=EICAR))
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code
        return 250

    async def milter_eicar(clients: list[MtaClient]) -> list[str]:
        out = []
        for c in clients:
            r = await c.message(_mail("x", attachment=EICAR))
            out.append(type(r.final).__name__ + "+" + ",".join(
                type(x).__name__ for x in r.mods))
        return out

    # A real PNG signature (the bytes must agree with the label to be skipped), followed
    # by a zip holding EICAR, which the scanner finds by its end-of-central-directory.
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("eicar.com", EICAR)
    png = b"\x89PNG\r\n\x1a\n" + zipped.getvalue()

    def icap_png(s: socket.socket) -> int:
        return _icap_exchange(s, _respmod(png, "image/png"))[0].status

    with AvgateServe(write(False)) as serve:
        assert serve.proc is not None
        ok = lambda: sum("avgate: serving" in x for x in serve.lines()) == 2  # noqa: E731
        assert wait_until(ok), serve.output()
        workers = children(serve.proc.pid)
        loop = asyncio.new_event_loop()
        smtp_conns = [smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) for _ in range(8)]
        icap_conns = [socket.create_connection(("127.0.0.1", icap_port), timeout=10)
                      for _ in range(8)]
        clients = loop.run_until_complete(_milter_clients(milter_port, 8))
        try:
            pids = {_serving_pid(workers, smtp_port, _local_port(c))
                    for c in smtp_conns}
            pids |= {_serving_pid(workers, icap_port, s.getsockname()[1]) for s in icap_conns}
            assert pids == set(workers), (pids, workers)
            assert [smtp_eicar(c) for c in smtp_conns] == [550] * 8
            assert loop.run_until_complete(milter_eicar(clients)) == ["Discard+"] * 8
            assert [icap_png(s) for s in icap_conns] == [200] * 8

            write(True)
            n = len(serve.lines())
            serve.signal(signal.SIGHUP)
            reloaded = lambda: sum("avgate: reloaded" in x  # noqa: E731
                                   for x in serve.lines()[n:]) == 2
            assert wait_until(reloaded), serve.output()
            # the same (kept-alive) connections, on both workers, now follow the new config
            assert [smtp_eicar(c) for c in smtp_conns] == [451] * 8
            assert loop.run_until_complete(milter_eicar(clients)) == (
                ["Accept+Quarantine"] * 8)
            assert [icap_png(s) for s in icap_conns] == [204] * 8
        finally:
            for c in smtp_conns:
                c.close()
            for s in icap_conns:
                s.close()
            for mc in clients:
                loop.run_until_complete(mc.close())
            loop.close()
        assert serve.stop() == 0, serve.output()
