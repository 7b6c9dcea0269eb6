"""clamd wire format of avgate's listener, byte for byte, with a raw socket client."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import struct
import time

import pytest

from .conftest import EICAR, MAX_SCAN, STREAM_MAX, ClamdListenerEnv


def talk(env: ClamdListenerEnv, data: bytes, *, unix: bool = False,
         timeout: float = 10.0) -> bytes:
    """Send ``data``, half-close, read until the server closes."""
    if unix:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(env.unix_path))
    else:
        s = socket.create_connection(("127.0.0.1", env.tcp_port))
    s.settimeout(timeout)
    with s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close early (size limit); its reply is still readable
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
    return out


def instream(data: bytes, prefix: bytes = b"z", chunk: int = 4096) -> bytes:
    term = b"\0" if prefix == b"z" else b"\n"
    body = b"".join(struct.pack(">I", len(data[i:i + chunk])) + data[i:i + chunk]
                    for i in range(0, len(data), chunk))
    return prefix + b"INSTREAM" + term + body + b"\0\0\0\0"


@pytest.mark.parametrize(("request_bytes", "reply"), [
    (b"zPING\0", b"PONG\0"),
    (b"nPING\n", b"PONG\n"),
    (b"PING\n", b"PONG\n"),
    (b"PING\r\n", b"PONG\n"),
    (instream(EICAR), b"stream: Eicar-Test-Signature FOUND\0"),
    (instream(EICAR, b"n"), b"stream: Eicar-Test-Signature FOUND\n"),
    (instream(b"hello world\n" * 1000), b"stream: OK\0"),
    (b"zINSTREAM\0\0\0\0\0", b"stream: OK\0"),
    (b"zFOO\0", b"UNKNOWN COMMAND\0"),
    (b"nSCAN\n", b"UNKNOWN COMMAND\n"),
    (b"zRELOAD\0", b"RELOAD is only allowed on the unix socket (or with allow_reload = true) "
                  b"ERROR\0"),
    (b"zFILDES\0", b"FILDES: only on the unix socket ERROR\0"),
])
def test_reply_bytes(clamd_listener: ClamdListenerEnv, request_bytes: bytes,
                     reply: bytes) -> None:
    assert talk(clamd_listener, request_bytes) == reply


def test_version_format(clamd_listener: ClamdListenerEnv) -> None:
    reply = talk(clamd_listener, b"zVERSION\0")
    assert re.fullmatch(rb"avgate \d+\.\d+\.\d+\S*/\d+/[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d "
                        rb"\d\d:\d\d:\d\d \d{4}\0", reply), reply
    commands = talk(clamd_listener, b"nVERSIONCOMMANDS\n")
    assert commands.startswith(reply[:-1] + b"| COMMANDS: ") and b" INSTREAM" in commands


def test_instream_over_stream_max_length(clamd_listener: ClamdListenerEnv) -> None:
    # the limit is checked on the chunk header, before the data is read
    reply = talk(clamd_listener, b"zINSTREAM\0" + struct.pack(">I", STREAM_MAX + 1) + b"x" * 10)
    assert reply == b"INSTREAM size limit exceeded. ERROR\0"
    reply = talk(clamd_listener, instream(b"y" * (STREAM_MAX + 1), chunk=65536))
    assert reply == b"INSTREAM size limit exceeded. ERROR\0"
    assert talk(clamd_listener, instream(b"y" * STREAM_MAX, chunk=65536)) == b"stream: OK\0"


def test_idsession_numbers_replies_and_keeps_the_connection(
        clamd_listener: ClamdListenerEnv) -> None:
    reply = talk(clamd_listener, b"zIDSESSION\0zPING\0" + instream(EICAR) + b"zVERSION\0"
                 + instream(b"clean") + b"zEND\0")
    parts = reply.split(b"\0")
    assert parts[0] == b"1: PONG"
    assert parts[1] == b"2: stream: Eicar-Test-Signature FOUND"
    assert parts[2].startswith(b"3: avgate ")
    assert parts[3] == b"4: stream: OK"
    assert parts[4:] == [b""]


def test_one_command_per_connection_outside_a_session(
        clamd_listener: ClamdListenerEnv) -> None:
    # like clamd: the second command is not answered, the connection closes after the first
    assert talk(clamd_listener, b"zPING\0zPING\0") == b"PONG\0"


def test_stats_layout(clamd_listener: ClamdListenerEnv) -> None:
    reply = talk(clamd_listener, b"nSTATS\n")
    assert reply.startswith(b"POOLS: 1\n\nSTATE: VALID PRIMARY\nTHREADS: live ")
    assert reply.endswith(b"\nEND\n")


def test_shutdown_is_refused_and_server_keeps_running(
        clamd_listener: ClamdListenerEnv) -> None:
    reply = talk(clamd_listener, b"zSHUTDOWN\0")
    assert reply.endswith(b" ERROR\0")
    assert talk(clamd_listener, b"zPING\0") == b"PONG\0"


@pytest.mark.parametrize("command", ["SCAN", "CONTSCAN", "MULTISCAN", "ALLMATCHSCAN"])
def test_path_commands(clamd_listener: ClamdListenerEnv, command: str) -> None:
    env = clamd_listener
    eicar = env.allowed / "sub" / "eicar.com"
    assert talk(env, f"z{command} {eicar}\0".encode()) == (
        f"{eicar}: Eicar-Test-Signature FOUND\0".encode())
    clean = env.allowed / "clean.txt"
    assert talk(env, f"z{command} {clean}\0".encode()) == f"{clean}: OK\0".encode()
    assert talk(env, f"z{command} {env.allowed}/sub\0".encode()) == (
        f"{eicar}: Eicar-Test-Signature FOUND\0".encode())
    for denied in (f"{env.outside}/secret-eicar.com", f"{env.allowed}/../outside",
                   f"{env.allowed}/link-out", f"{env.allowed}/dirlink-out/secret-eicar.com",
                   "relative/path", "/etc/passwd", "/"):
        assert talk(env, f"z{command} {denied}\0".encode()) == (
            f"{denied}: Access denied. ERROR\0".encode()), denied
    missing = env.allowed / "missing"
    assert talk(env, f"z{command} {missing}\0".encode()).endswith(b" ERROR\0")


def test_fildes_on_unix_socket(clamd_listener: ClamdListenerEnv) -> None:
    env = clamd_listener
    for path, expected in ((env.outside / "secret-eicar.com", b"Eicar-Test-Signature FOUND"),
                           (env.allowed / "clean.txt", b"OK")):
        with open(path, "rb") as f, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(env.unix_path))
            s.sendall(b"zFILDES\0")
            socket.send_fds(s, [b"\0"], [f.fileno()])
            reply = s.recv(4096)
        assert re.fullmatch(rb"fd\[\d+\]: " + re.escape(expected) + rb"\0", reply), reply


def test_fildes_in_a_session_with_fd_and_command_in_one_message(
        clamd_listener: ClamdListenerEnv) -> None:
    env = clamd_listener
    with open(env.allowed / "sub" / "eicar.com", "rb") as f, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(env.unix_path))
        s.sendall(b"zIDSESSION\0")
        socket.send_fds(s, [b"zFILDES\0\0"], [f.fileno()])
        s.sendall(b"zPING\0zEND\0")
        out = b""
        while chunk := s.recv(4096):
            out += chunk
    assert re.fullmatch(rb"1: fd\[\d+\]: Eicar-Test-Signature FOUND\x002: PONG\0", out), out


def test_reload_on_the_unix_socket(clamd_listener: ClamdListenerEnv) -> None:
    assert talk(clamd_listener, b"zRELOAD\0", unix=True) == b"RELOADING\0"
    assert talk(clamd_listener, b"zPING\0", unix=True) == b"PONG\0"


def test_unix_socket_mode_defaults_to_0660(clamd_listener: ClamdListenerEnv) -> None:
    # like clamd's LocalSocketMode 660: no longer world-connectable (it was 0666)
    assert stat.S_IMODE(os.stat(clamd_listener.unix_path).st_mode) == 0o660


def test_fildes_reads_from_offset_zero_and_leaves_the_offset_alone(
        clamd_listener: ClamdListenerEnv) -> None:
    # the client has read the file to the end: clamd (pread) still scans all of it
    env = clamd_listener
    with open(env.allowed / "sub" / "eicar.com", "rb") as f, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        f.read()
        offset = f.tell()
        s.settimeout(10)
        s.connect(str(env.unix_path))
        socket.send_fds(s, [b"zFILDES\0\0"], [f.fileno()])
        reply = s.recv(4096)
        assert f.tell() == os.lseek(f.fileno(), 0, os.SEEK_CUR) == offset
    assert re.fullmatch(rb"fd\[\d+\]: Eicar-Test-Signature FOUND\0", reply), reply


def test_fildes_without_descriptor(clamd_listener: ClamdListenerEnv) -> None:
    reply = talk(clamd_listener, b"zFILDES\0", unix=True)
    assert reply == b"FILDES: didn't receive file descriptor. ERROR\0"


def test_scans_are_in_the_scan_log(clamd_listener: ClamdListenerEnv) -> None:
    talk(clamd_listener, instream(EICAR + b"\n"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        events = [json.loads(line) for line in clamd_listener.log_path.read_text().splitlines()]
        hits = [e for e in events if e.get("event") == "scan" and e["frontend"] == "clamd"
                and e["status"] == "infected" and e["size"] == len(EICAR) + 1]
        if hits:
            assert hits[0]["findings"][0]["name"] == "Eicar-Test-Signature"
            return
        time.sleep(0.1)
    pytest.fail("no scan-log line for the INSTREAM scan")


def test_idle_connection_is_closed(clamd_listener: ClamdListenerEnv) -> None:
    with socket.create_connection(("127.0.0.1", clamd_listener.tcp_port)) as s:
        s.settimeout(15)
        started = time.monotonic()
        assert s.recv(10) == b""  # idle_timeout = 5 in the fixture
        assert 4 < time.monotonic() - started < 12


def test_skipped_is_ok_like_clamd_but_logged_as_skipped(clamd_listener: ClamdListenerEnv) -> None:
    # clamd answers OK for an object over its scan limits (AlertExceedsMax is off by
    # default); the scan log keeps the real status
    size = MAX_SCAN + 1000
    assert talk(clamd_listener, instream(b"z" * size, chunk=65536)) == b"stream: OK\0"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        events = [json.loads(line) for line in clamd_listener.log_path.read_text().splitlines()]
        if any(e.get("size") == size and e.get("status") == "skipped" for e in events):
            return
        time.sleep(0.1)
    pytest.fail("the over-limit object is not logged as skipped")
