"""Hostile requests against the HTTP proxy (a real ``avgate serve``, a real origin): request
smuggling forms (CL+TE, conflicting and repeated Content-Length, obs-fold), over-long lines
and heads, slowloris, a crowd of idle connections, forwarding loops and a Host that
disagrees with the URL. Each is refused with a clear status or made harmless, and nothing
ambiguous reaches the origin."""

from __future__ import annotations

import socket
import time

from tests.helpers import wait_until
from tests.integration.http_proxy.conftest import (  # noqa: F401 - the fixtures below
    FaultOrigin,
    Nginx,
    Proxy,
    fault_origin_fixture,
    nginx_fixture,
    proxy_fixture,
)


def exchange(proxy: Proxy, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` on a fresh connection; everything the proxy answers until it closes."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_cl_te_refused_and_not_forwarded(proxy: Proxy, fault_origin: FaultOrigin) -> None:
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b"0\r\n\r\n" + smuggled
    answer = exchange(proxy, (
        f"POST {fault_origin.url('/clte')} HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n\r\n").encode() + body)
    assert status_of(answer) == 400
    assert b"smuggling" in answer
    assert answer.count(b"HTTP/1.1 ") == 1  # one answer; the connection is closed
    assert fault_origin.requests_to("/clte") == []
    assert fault_origin.requests_to("/smuggled") == []


def test_conflicting_content_lengths_refused(proxy: Proxy, fault_origin: FaultOrigin) -> None:
    answer = exchange(proxy, (
        f"POST {fault_origin.url('/dupcl')} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        "Content-Length: 6\r\n\r\nhello!").encode())
    assert status_of(answer) == 400
    assert fault_origin.requests_to("/dupcl") == []


def test_repeated_equal_content_length_forwarded_once(proxy: Proxy,
                                                      fault_origin: FaultOrigin) -> None:
    answer = exchange(proxy, (
        f"POST {fault_origin.url('/samecl')} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        "Content-Length: 5\r\nConnection: close\r\n\r\nhello").encode())
    assert status_of(answer) == 200
    [seen] = fault_origin.requests_to("/samecl")
    assert [v for k, v in seen.headers if k.lower() == "content-length"] == ["5"]
    assert seen.body == b"hello"


def test_obs_fold_is_unfolded_before_forwarding(proxy: Proxy,
                                                fault_origin: FaultOrigin) -> None:
    answer = exchange(proxy, (
        f"GET {fault_origin.url('/fold')} HTTP/1.1\r\nHost: x\r\nX-Folded: one\r\n two\r\n"
        "Connection: close\r\n\r\n").encode())
    assert status_of(answer) == 200
    [seen] = fault_origin.requests_to("/fold")
    assert ("X-Folded", "one two") in seen.headers


def test_over_long_request_line_and_head(proxy: Proxy, fault_origin: FaultOrigin) -> None:
    long_target = fault_origin.url("/long?" + "a" * 5000)  # max_request_line = 4 KiB
    answer = exchange(proxy, f"GET {long_target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status_of(answer) == 414
    big = "".join(f"X-Filler-{i}: {'b' * 1000}\r\n" for i in range(20))  # 20 KB > 16 KiB
    answer = exchange(proxy, (f"GET {fault_origin.url('/bighead')} HTTP/1.1\r\nHost: x\r\n"
                              f"{big}\r\n").encode())
    assert status_of(answer) == 431
    assert fault_origin.requests_to("/long") == fault_origin.requests_to("/bighead") == []


def test_slowloris_is_cut_after_header_timeout(proxy: Proxy) -> None:
    """One header byte every 0.2 s: the whole head must arrive within header_timeout
    (1.5 s here), however steadily bytes trickle in."""
    started = time.monotonic()
    answer = b""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(b"GET http://127.0.0.1:9/ HTTP/1.1\r\nX-Slow: ")
        s.settimeout(0.2)
        try:
            while time.monotonic() - started < 8:
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    s.sendall(b"a")
                    continue
                if not chunk:
                    break
                answer += chunk
        except (BrokenPipeError, ConnectionResetError):
            pass
    elapsed = time.monotonic() - started
    assert status_of(answer) == 408
    assert 1.4 < elapsed < 5


def test_idle_crowd_is_bounded_and_released(proxy: Proxy, nginx: Nginx) -> None:
    """300 idle connections against max_connections = 256: the extra ones get 503 at once;
    the idle ones are closed after idle_timeout (4 s), and the proxy serves again."""
    socks = [socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
             for _ in range(300)]
    try:
        refused = 0
        for s in socks[256:]:
            data = s.recv(65536)
            refused += data.startswith(b"HTTP/1.1 503")
        assert refused == 44

        closed: set[int] = set()

        def all_closed() -> bool:
            for i, s in enumerate(socks[:256]):
                if i in closed:
                    continue
                s.setblocking(False)
                try:
                    if s.recv(1) == b"":
                        closed.add(i)
                except BlockingIOError:
                    pass
                except ConnectionError:
                    closed.add(i)
            return len(closed) == 256

        assert wait_until(all_closed, timeout=15)
    finally:
        for s in socks:
            s.close()
    answer = exchange(proxy, (f"GET {nginx.url('small.txt')} HTTP/1.1\r\nHost: x\r\n"
                              "Connection: close\r\n\r\n").encode())
    assert status_of(answer) == 200


def test_forwarding_loops_are_refused(proxy: Proxy) -> None:
    for host in ("127.0.0.1", "localhost"):
        answer = exchange(proxy, (f"GET http://{host}:{proxy.port}/ HTTP/1.1\r\nHost: x\r\n"
                                  "\r\n").encode())
        assert status_of(answer) == 508
    # a request that already went through this proxy (its Via pseudonym)
    answer = exchange(proxy, b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\n"
                             b"Via: 1.1 elsewhere, 1.1 avgate-test\r\n\r\n")
    assert status_of(answer) == 508


def test_host_header_mismatch_uses_the_url(proxy: Proxy, nginx: Nginx) -> None:
    answer = exchange(proxy, (f"GET {nginx.url('echo')} HTTP/1.1\r\nHost: evil.example\r\n"
                              "Connection: close\r\n\r\n").encode())
    assert status_of(answer) == 200
    assert answer.endswith(b"host=127.0.0.1\n")
