"""``avgate serve`` as a service: start-up, SIGHUP reload (good and bad), RELOAD over the
clamd protocol, SIGTERM drain with scans in flight, the drain deadline."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import wait_until
from tests.integration.avgate_proc import (
    AvgateServe,
    children,
    free_port,
    in_server,
    server_ends,
)

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
NEW_THREAT = b"this object becomes a threat once the new signature is loaded\n"
NEW_NAME = "Avgate.Test.NewSignature"


def config_text(root: Path, *, signatures: bool = True, drain: float = 30) -> str:
    sig_line = f'signatures = ["{root / "sigs"}"]' if signatures else ""
    return f"""
[scan]
cache = false
[[engines]]
type = "embedded"
{sig_line}
[log]
path = "{root / 'scan.log'}"
[quarantine]
path = "{root / 'quarantine'}"
[serve]
drain_timeout = {drain}
[clamd_listener]
listen = "127.0.0.1:0"
idle_timeout = 20
allow_reload = true   # RELOAD over TCP (refused by default: only the unix socket may)
[http]
listen = "127.0.0.1:0"
"""


def instream(data: bytes) -> bytes:
    return b"zINSTREAM\0" + struct.pack(">I", len(data)) + data + b"\0\0\0\0"


def clamd(port: int, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(4096):
            out += chunk
    return out


def log_events(root: Path) -> list[dict[str, object]]:
    path = root / "scan.log"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[AvgateServe, Path]]:
    (tmp_path / "sigs").mkdir()
    (tmp_path / "sigs" / "base.hdb").write_text(
        f"{hashlib.md5(b'old threat', usedforsecurity=False).hexdigest()}:10:Avgate.Test.Old\n")
    config = tmp_path / "avgate.toml"
    config.write_text(config_text(tmp_path))
    serve = AvgateServe(config).start()
    try:
        yield serve, tmp_path
    finally:
        serve.stop()


def test_startup_prints_every_listener(served: tuple[AvgateServe, Path]) -> None:
    serve, _ = served
    assert set(serve.listeners) == {"http", "clamd_listener"}
    assert any(line.startswith("avgate: engines ready: embedded") for line in serve.lines())
    assert clamd(serve.port("clamd_listener"), b"zPING\0") == b"PONG\0"


def test_sighup_with_new_signature_file(served: tuple[AvgateServe, Path]) -> None:
    serve, root = served
    port = serve.port("clamd_listener")
    assert clamd(port, instream(NEW_THREAT)) == b"stream: OK\0"
    version_before = clamd(port, b"zVERSION\0")
    # a session opened before the reload must survive it
    session = socket.create_connection(("127.0.0.1", port), timeout=10)
    session.sendall(b"zIDSESSION\0zPING\0")
    assert session.recv(100) == b"1: PONG\0"

    digest = hashlib.md5(NEW_THREAT, usedforsecurity=False).hexdigest()
    (root / "sigs" / "new.hdb").write_text(f"{digest}:{len(NEW_THREAT)}:{NEW_NAME}\n")
    n = len(serve.lines())
    serve.signal(signal.SIGHUP)
    assert serve.wait_for_line("avgate: reloaded", after=n), serve.output()

    assert clamd(port, instream(NEW_THREAT)) == f"stream: {NEW_NAME} FOUND\0".encode()
    assert clamd(port, instream(EICAR)) == b"stream: Eicar-Test-Signature FOUND\0"
    assert clamd(port, b"zVERSION\0") != version_before  # the db number follows the DB
    with httpx.Client(base_url=f"http://{serve.listeners['http'][0]}") as c:
        r = c.post("/v1/scan", content=NEW_THREAT)
        assert r.json()["findings"][0]["name"] == NEW_NAME
    session.sendall(instream(NEW_THREAT) + b"zEND\0")
    assert session.recv(200) == f"2: stream: {NEW_NAME} FOUND\0".encode()
    session.close()
    assert any(e.get("event") == "reload" and e.get("ok") for e in log_events(root))


@pytest.mark.parametrize("breakage", ["toml", "key", "signature"])
def test_sighup_with_broken_config_keeps_the_old_one(served: tuple[AvgateServe, Path],
                                                     breakage: str) -> None:
    serve, root = served
    port = serve.port("clamd_listener")
    config = serve.config_path
    good = config.read_text()
    if breakage == "toml":
        config.write_text(good + "\n[scan\nthis is not toml\n")
        reason = "invalid TOML"
    elif breakage == "key":
        config.write_text(good.replace("cache = false", "cache = false\nno_such_key = 1"))
        reason = "no_such_key"
    else:
        (root / "sigs" / "broken.ndb").write_text("Bad.Sig:0:*:zz-not-hex\n")
        reason = "broken.ndb"
    n = len(serve.err_lines())
    serve.signal(signal.SIGHUP)
    assert serve.wait_for_line("reload refused", stderr=True, after=n), serve.output()
    refused = [x for x in serve.err_lines()[n:] if "reload refused" in x]
    assert reason in refused[0], refused
    assert wait_until(lambda: any(e.get("event") == "reload" and e.get("ok") is False
                                and reason in str(e.get("error")) for e in log_events(root)))
    # the running configuration still works, including the old signatures
    assert clamd(port, b"zPING\0") == b"PONG\0"
    assert clamd(port, instream(EICAR)) == b"stream: Eicar-Test-Signature FOUND\0"
    assert clamd(port, instream(b"old threat")) == b"stream: Avgate.Test.Old FOUND\0"
    assert serve.proc is not None and serve.proc.poll() is None


def test_reload_command_over_clamd_protocol(served: tuple[AvgateServe, Path]) -> None:
    serve, root = served
    digest = hashlib.md5(NEW_THREAT, usedforsecurity=False).hexdigest()
    (root / "sigs" / "new.hdb").write_text(f"{digest}:{len(NEW_THREAT)}:{NEW_NAME}\n")
    n = len(serve.lines())
    assert clamd(serve.port("clamd_listener"), b"zRELOAD\0") == b"RELOADING\0"
    assert serve.wait_for_line("avgate: reloaded", after=n)
    assert clamd(serve.port("clamd_listener"), instream(NEW_THREAT)) == (
        f"stream: {NEW_NAME} FOUND\0".encode())


def test_sigterm_drains_scans_in_flight(served: tuple[AvgateServe, Path]) -> None:
    serve, _ = served
    port = serve.port("clamd_listener")
    http_url = f"http://{serve.listeners['http'][0]}"
    # a clamd client in the middle of its INSTREAM upload
    slow = socket.create_connection(("127.0.0.1", port), timeout=20)
    slow.sendall(b"zINSTREAM\0" + struct.pack(">I", len(EICAR)) + EICAR[:20])
    # an HTTP upload in progress
    http_result: dict[str, object] = {}
    sent_first_part, release = threading.Event(), threading.Event()

    def body() -> Iterator[bytes]:
        yield EICAR[:30]
        sent_first_part.set()  # httpx asks for the next part once this one is on the wire
        release.wait(20)
        yield EICAR[30:]

    def upload() -> None:
        with httpx.Client(timeout=30) as c:
            r = c.post(f"{http_url}/v1/scan", content=body())
            http_result.update(code=r.status_code, body=r.json())

    uploader = threading.Thread(target=upload)
    uploader.start()
    assert sent_first_part.wait(10)
    # both requests are in the server now: accepted, and every byte sent so far read
    http_port, slow_port = serve.port("http"), slow.getsockname()[1]
    assert wait_until(lambda: in_server(port, slow_port)
                      and any(in_server(http_port, p) for p in server_ends(http_port))), (
        server_ends(port), server_ends(http_port))
    serve.signal(signal.SIGTERM)
    assert serve.wait_for_line("avgate: stopping")
    # no new connections...
    assert wait_until(lambda: _refused(port), timeout=5)
    # ...but the scans in flight complete
    slow.sendall(EICAR[20:] + b"\0\0\0\0")
    assert slow.recv(100) == b"stream: Eicar-Test-Signature FOUND\0"
    slow.close()
    release.set()
    uploader.join(30)
    assert http_result.get("code") == 200
    assert http_result["body"]["status"] == "infected"  # type: ignore[index]
    assert serve.proc is not None
    assert serve.proc.wait(20) == 0
    assert "avgate: stopped" in serve.lines()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_drain_deadline(tmp_path: Path) -> None:
    (tmp_path / "sigs").mkdir()
    config = tmp_path / "avgate.toml"
    config.write_text(config_text(tmp_path, drain=1.5))
    with AvgateServe(config) as serve:
        port = serve.port("clamd_listener")
        stuck = socket.create_connection(("127.0.0.1", port))
        stuck.sendall(b"zINSTREAM\0\0\0\0\x10abc")  # never completed
        assert wait_until(lambda: in_server(port, stuck.getsockname()[1]))
        started = time.monotonic()
        serve.signal(signal.SIGTERM)
        assert serve.proc is not None
        assert serve.proc.wait(15) == 0
        assert 1.0 < time.monotonic() - started < 8
        assert serve.wait_for_line("drain ended with", stderr=True, timeout=1)
        stuck.close()


def test_workers_share_the_listeners(tmp_path: Path) -> None:
    (tmp_path / "sigs").mkdir()
    clamd_port, http_port = free_port(), free_port()
    text = config_text(tmp_path).replace("[serve]\n", "[serve]\nworkers = 2\n")
    text = text.replace('[clamd_listener]\nlisten = "127.0.0.1:0"',
                        f'[clamd_listener]\nlisten = "127.0.0.1:{clamd_port}"\n'
                        f'unix_socket = "{tmp_path / "clamd.sock"}"')
    text = text.replace('[http]\nlisten = "127.0.0.1:0"',
                        f'[http]\nlisten = "127.0.0.1:{http_port}"')
    config = tmp_path / "avgate.toml"
    config.write_text(text)
    with AvgateServe(config) as serve:
        assert serve.proc is not None
        assert wait_until(lambda: sum("avgate: serving" in x for x in serve.lines()) == 2), (
            serve.output())
        assert len(children(serve.proc.pid)) == 2
        assert any("2 workers" in x for x in serve.lines())
        # the kernel spreads connections over both workers; each counts its own scans
        for i in range(40):
            r = httpx.post(f"http://127.0.0.1:{http_port}/v1/scan", content=b"n%d" % i)
            assert r.json()["status"] == "clean"
        counts = set()
        for _ in range(30):
            text = httpx.get(f"http://127.0.0.1:{http_port}/metrics").text
            line = [x for x in text.splitlines()
                    if x.startswith('avgate_scans_total{frontend="http",status="clean"}')]
            counts.add(int(float(line[0].split()[-1])) if line else 0)
        # a worker that answered counted fewer than all 40: the other one did the rest
        assert max(counts) < 40 and (len(counts) == 1 or sum(counts) == 40), counts
        assert clamd(clamd_port, instream(EICAR)) == b"stream: Eicar-Test-Signature FOUND\0"
        with socket.socket(socket.AF_UNIX) as u:  # the unix socket: worker 0 only
            u.connect(str(tmp_path / "clamd.sock"))
            u.sendall(b"zPING\0")
            assert u.recv(10) == b"PONG\0"
        # SIGHUP to the supervisor reloads every worker; so does RELOAD sent to one worker
        digest = hashlib.md5(NEW_THREAT, usedforsecurity=False).hexdigest()
        (tmp_path / "sigs" / "new.hdb").write_text(f"{digest}:{len(NEW_THREAT)}:{NEW_NAME}\n")
        serve.signal(signal.SIGHUP)
        assert wait_until(lambda: sum("avgate: reloaded" in x for x in serve.lines()) == 2), (
            serve.output())
        for _ in range(10):
            assert clamd(clamd_port, instream(NEW_THREAT)) == f"stream: {NEW_NAME} FOUND\0".encode()
        assert clamd(clamd_port, b"zRELOAD\0") == b"RELOADING\0"
        assert wait_until(lambda: sum("avgate: reloaded" in x for x in serve.lines()) == 4), (
            serve.output())
        assert serve.stop() == 0
        assert sum(x == "avgate: stopped" for x in serve.lines()) == 2


def test_worker_start_failure_stops_everything(tmp_path: Path) -> None:
    (tmp_path / "sigs").mkdir()
    with socket.socket() as busy:  # the port is taken (without SO_REUSEPORT)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        text = config_text(tmp_path).replace("[serve]\n", "[serve]\nworkers = 2\n")
        text = text.replace('[clamd_listener]\nlisten = "127.0.0.1:0"',
                            f'[clamd_listener]\nlisten = "127.0.0.1:{port}"')
        config = tmp_path / "avgate.toml"
        config.write_text(text)
        serve = AvgateServe(config)
        with pytest.raises(RuntimeError):
            serve.start(timeout=15)
        assert serve.proc is not None and serve.proc.wait(15) == 1
        assert serve.wait_for_line("failed while starting", stderr=True, timeout=2)


def test_gateway_ref_forwards_every_process_argument() -> None:
    """GatewayRef.process must take whatever Gateway.process takes (a front-end under serve
    gets the ref, in tests often the Gateway itself: a missing argument fails only in serve)."""
    import inspect

    from avgate.gateway import Gateway
    from avgate.serve import GatewayRef

    assert (list(inspect.signature(GatewayRef.process).parameters)
            == list(inspect.signature(Gateway.process).parameters))


def test_builtin_defaults_skip_a_default_port_already_taken(tmp_path: Path) -> None:
    """Without a config file every front-end runs on its default port; one whose port is
    taken (Squid on 3128) is skipped with a warning, the others run. (With a config file a
    listener that cannot be opened stops the start: test_listen / recipes.)"""
    defaults = (10025, 7357, 1344, 8080, 3311)
    for port in defaults:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                pytest.skip(f"default port {port} is in use on this machine")
    squid = socket.socket()
    try:
        squid.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            squid.bind(("127.0.0.1", 3128))
            squid.listen(1)
        except OSError:
            pass  # something already holds 3128: the same situation
        env = {k: v for k, v in os.environ.items() if k != "AVGATE_CONFIG"}
        proc = subprocess.Popen([str(Path(sys.executable).with_name("avgate")), "serve"],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            out: list[str] = []
            reader = threading.Thread(target=lambda: out.extend(proc.stdout or []),
                                      daemon=True)
            reader.start()
            assert wait_until(lambda: any("serving" in line for line in out)
                              or proc.poll() is not None, 60)
            assert proc.poll() is None, "".join(out)
            assert any(line.startswith("avgate: clamd_listener: listening") for line in out)
            assert not any(line.startswith("avgate: http_proxy: listening") for line in out)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        assert "WARNING: http_proxy listen: cannot listen on 127.0.0.1:3128" in err
        assert "http_proxy not started" in err
    finally:
        squid.close()
