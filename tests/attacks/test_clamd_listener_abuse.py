"""Resource abuse of the clamd-protocol listener by a client that may connect to it.

Before the fix: one unix-socket connection held 4,000 descriptors (FILDES with no cap; NUL
keep-alives reset the idle timer), five connections exhausted the process (HTTP and SMTP then
failed with EMFILE) and every failure logged a traceback; the unix socket was 0666; RELOAD
was accepted from any TCP client (100 in 0.3 s, each flushing the verdict cache); a session
whose client never read its replies held its connection forever; IDSESSION had no per-client
limit.
"""

from __future__ import annotations

import contextlib
import grp
import os
import select
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from avgate import config
from avgate.errors import ConfigError
from avgate.frontends import clamd_accounting as accounting
from avgate.observability import RateLimitedLog
from tests.integration.clamd_listener.inprocess import InProcessClamd, ReloadCounter, open_fds

MakeServer = Callable[..., InProcessClamd]


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[MakeServer]:
    servers: list[InProcessClamd] = []

    def make(listener: dict[str, Any] | None = None, **kw: Any) -> InProcessClamd:
        root = tmp_path / f"s{len(servers)}"
        root.mkdir()
        srv = InProcessClamd(root, listener, **kw)
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.close()


@pytest.fixture
def log_lines(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    lines: list[str] = []
    monkeypatch.setattr(accounting, "log", RateLimitedLog(1.0, write=lines.append))
    return lines


def session(srv: InProcessClamd, unix: bool = True) -> socket.socket:
    s = srv.connect(unix=unix)
    s.sendall(b"zIDSESSION\0")
    return s


def sync(s: socket.socket, n: int) -> None:
    """A PING through the session: everything sent before it has been received."""
    s.sendall(b"zPING\0")
    want = f"{n}: PONG\0".encode()
    got = b""
    while not got.endswith(b"\0"):
        chunk = s.recv(4096)
        assert chunk, got
        got += chunk
    assert got == want, got


def closed_by_server(s: socket.socket, within: float) -> bool:
    """Whether the server closes ``s`` within ``within`` seconds (reading what it sends)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        ready, _, _ = select.select([s], [], [], 0.05)
        if ready:
            try:
                if s.recv(65536) == b"":
                    return True
            except ConnectionResetError:
                return True
    return False


def hoard(s: socket.socket, fd: int, n: int) -> None:
    """Pass ``fd`` ``n`` times, each with clamdscan's dummy NUL and no FILDES command."""
    for _ in range(n):
        socket.send_fds(s, [b"\0"], [fd])


# -- descriptors -------------------------------------------------------------------------


def test_one_connection_cannot_hoard_descriptors(make_server: MakeServer,
                                                 log_lines: list[str]) -> None:
    srv = make_server()
    before = open_fds()
    with open(os.devnull, "rb") as f, session(srv) as s:
        hoard(s, f.fileno(), 300)
        sync(s, 1)
        # minus /dev/null, both ends of the connection (the server runs in this process)
        held = open_fds() - before - 3
        assert held <= 4, held  # max_fds_per_connection's default (it was 300 here)
        assert accounting.fds.held == held
        s.sendall(b"zEND\0")
        assert closed_by_server(s, 5)
    deadline = time.monotonic() + 5
    while open_fds() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert open_fds() <= before and accounting.fds.held == 0
    # 300 descriptors over the cap: a line or two, not 300 (and never a traceback)
    assert 1 <= len(log_lines) <= 3, log_lines
    assert all("Traceback" not in line for line in log_lines)


def test_descriptors_are_capped_per_process(make_server: MakeServer, log_lines: list[str]) -> None:
    srv = make_server({"max_fds": 10})
    before = open_fds()
    with open(os.devnull, "rb") as f, contextlib.ExitStack() as stack:
        conns = [stack.enter_context(session(srv)) for _ in range(6)]
        for s in conns:
            hoard(s, f.fileno(), 50)
            sync(s, 1)
        assert accounting.fds.held == 10
        assert open_fds() - before - 1 - 2 * len(conns) <= 10
        # the process still answers, and a FILDES that finds no budget gets a clear error
        assert srv.talk(b"zPING\0") == b"PONG\0"
        with open(srv.root / "x", "wb") as w:
            w.write(b"clean")
        with open(srv.root / "x", "rb") as r, srv.connect(unix=True) as c:
            socket.send_fds(c, [b"zFILDES\0\0"], [r.fileno()])
            assert c.recv(4096) == b"FILDES: file descriptor refused: too many held. ERROR\0"
    # the hoarders are gone: FILDES works again
    deadline = time.monotonic() + 5
    while accounting.fds.held and time.monotonic() < deadline:
        time.sleep(0.02)
    with open(srv.root / "x", "rb") as r, srv.connect(unix=True) as c:
        socket.send_fds(c, [b"zFILDES\0\0"], [r.fileno()])
        assert c.recv(4096).endswith(b": OK\0")


@pytest.mark.parametrize("keepalive", ["descriptor", "nul-byte"])
def test_keepalives_do_not_extend_the_idle_timeout(make_server: MakeServer, keepalive: str) -> None:
    # a descriptor with its dummy NUL, or a lone NUL, every 0.2 s: neither is a command
    srv = make_server({"idle_timeout": 1})
    started = time.monotonic()
    with open(os.devnull, "rb") as f, session(srv, unix=True) as s:
        s.setblocking(False)
        closed = False
        while time.monotonic() - started < 4 and not closed:
            try:
                if keepalive == "descriptor":
                    socket.send_fds(s, [b"\0"], [f.fileno()])
                else:
                    s.send(b"\0")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            s.setblocking(True)
            closed = closed_by_server(s, 0.2)
            s.setblocking(False)
    elapsed = time.monotonic() - started
    assert closed and elapsed < 2.5, elapsed


def test_unclaimed_descriptors_expire_while_real_commands_keep_a_session(
        make_server: MakeServer) -> None:
    srv = make_server({"idle_timeout": 1})
    with open(os.devnull, "rb") as f, session(srv) as s:
        hoard(s, f.fileno(), 4)
        sync(s, 1)
        assert accounting.fds.held == 4
        for n in range(2, 5):  # PING keeps the session open but claims no descriptor
            time.sleep(0.5)
            sync(s, n)
        assert accounting.fds.held == 0


def test_a_client_that_does_not_read_its_replies_is_dropped(make_server: MakeServer) -> None:
    srv = make_server({"idle_timeout": 1})
    with session(srv, unix=True) as s:
        s.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 5
        while sent < 2 << 20 and time.monotonic() < deadline:  # PINGs until buffers are full
            try:
                sent += s.send(b"zPING\0" * 4096)
            except BlockingIOError:
                time.sleep(0.1)
                if srv.connections() == 0:
                    break
            except (BrokenPipeError, ConnectionResetError):
                break
        deadline = time.monotonic() + 4
        while srv.connections() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.connections() == 0


# -- socket mode -------------------------------------------------------------------------


def test_unix_socket_mode_default_and_configured(make_server: MakeServer) -> None:
    srv = make_server()
    assert stat.S_IMODE(os.stat(srv.unix_path).st_mode) == 0o660
    srv = make_server({"unix_socket_mode": "0600"})
    assert stat.S_IMODE(os.stat(srv.unix_path).st_mode) == 0o600


def test_unix_socket_group(make_server: MakeServer) -> None:
    others = [g for g in grp.getgrall() if g.gr_gid != os.getgid()]
    if os.geteuid() != 0 or not others:
        pytest.skip("needs root (or membership of a second group) to chown the socket")
    srv = make_server({"unix_socket_group": others[0].gr_name})
    st = os.stat(srv.unix_path)
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (others[0].gr_gid, 0o660)
    with pytest.raises(OSError, match="unknown group"):
        make_server({"unix_socket_group": "no-such-group-avgate"})


@pytest.mark.parametrize("value", [660, "0999", "rw-rw----", "01777", ""])
def test_unix_socket_mode_is_validated(value: object) -> None:
    with pytest.raises(ConfigError, match="unix_socket_mode"):
        config.from_dict({"clamd_listener": {"unix_socket_mode": value}})


# -- RELOAD ------------------------------------------------------------------------------


def test_reload_is_refused_over_tcp_and_coalesced(make_server: MakeServer) -> None:
    srv = make_server(reload_counter=True)
    counter = srv.ref
    assert isinstance(counter, ReloadCounter)
    reply = srv.talk(b"zRELOAD\0")
    assert reply.endswith(b" ERROR\0") and b"unix socket" in reply, reply
    assert counter.reloads == 0
    started = time.monotonic()
    replies = [srv.talk(b"zRELOAD\0", unix=True) for _ in range(100)]
    assert set(replies) == {b"RELOADING\0"}
    burst = time.monotonic() - started
    time.sleep(2.5)
    # one reload for the burst, plus at most one per second for requests made meanwhile
    assert 1 <= counter.reloads <= 2 + int(burst), (counter.reloads, burst)


def test_reload_over_tcp_when_allowed(make_server: MakeServer) -> None:
    srv = make_server({"allow_reload": True}, reload_counter=True)
    assert srv.talk(b"zRELOAD\0") == b"RELOADING\0"
    time.sleep(0.5)
    assert isinstance(srv.ref, ReloadCounter) and srv.ref.reloads == 1


# -- IDSESSION ---------------------------------------------------------------------------


def test_sessions_are_limited_per_client_and_per_process(make_server: MakeServer) -> None:
    srv = make_server({"max_sessions_per_client": 2, "max_sessions": 3})
    with contextlib.ExitStack() as stack:
        tcp = [stack.enter_context(session(srv, unix=False)) for _ in range(2)]
        for s in tcp:
            sync(s, 1)
        refused = session(srv, unix=False)  # a third one from 127.0.0.1
        assert refused.recv(4096) == (b"Too many sessions from this client or in all "
                                      b"(max_sessions_per_client, max_sessions) ERROR\0")
        assert closed_by_server(refused, 2)
        refused.close()
        local = stack.enter_context(session(srv, unix=True))  # another client: uid
        sync(local, 1)
        over = session(srv, unix=True)  # the process-wide limit (3) is reached
        assert over.recv(4096).endswith(b" ERROR\0")
        over.close()
        tcp[0].sendall(b"zEND\0")
        assert closed_by_server(tcp[0], 2)
        time.sleep(0.1)
        again = stack.enter_context(session(srv, unix=False))
        sync(again, 1)
        # one-shot commands are not sessions and are never refused for that
        assert srv.talk(b"zPING\0") == b"PONG\0"


# -- rate-limited logging ----------------------------------------------------------------


def test_rate_limited_log_counts_what_it_suppresses() -> None:
    now = [100.0]
    lines: list[str] = []
    log = RateLimitedLog(1.0, write=lines.append, clock=lambda: now[0], max_keys=2)
    assert log.log("emfile", "accept failed")
    for _ in range(999):
        assert not log.log("emfile", "accept failed")
    assert log.log("other", "something else")
    assert log.suppressed("emfile") == 999
    now[0] += 1.0
    assert log.log("emfile", "accept failed")
    assert lines == ["accept failed", "something else",
                     "accept failed (suppressed 999 similar in the last 1.0 s)"]
    log.log("third", "x")  # max_keys = 2: the least recently used key is forgotten
    assert log.suppressed("other") == 0 and len(log._keys) == 2
