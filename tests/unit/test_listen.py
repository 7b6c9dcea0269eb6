"""The one listener layer: address grammar and binder."""

from __future__ import annotations

import os
import socket
import stat

import pytest

from avgate.frontends.listen import (
    Address,
    ListenError,
    ListenOptions,
    bind,
    parse_listen,
    parse_mode,
)


@pytest.mark.parametrize(("text", "address"), [
    ("127.0.0.1:10025", Address("tcp", host="127.0.0.1", port=10025)),
    ("localhost:1344", Address("tcp", host="localhost", port=1344)),
    ("[::1]:3310", Address("tcp", host="::1", port=3310)),
    ("unix:/run/avgate/milter.sock", Address("unix", path="/run/avgate/milter.sock")),
    ("local:/var/run/milter.sock", Address("unix", path="/var/run/milter.sock")),
    ("inet:7357@127.0.0.1", Address("tcp", host="127.0.0.1", port=7357)),
    ("inet:7357", Address("tcp", host="0.0.0.0", port=7357)),
    ("inet6:7357@[::1]", Address("tcp", host="::1", port=7357)),
    ("inet6:7357", Address("tcp", host="::", port=7357)),
])
def test_grammar(text: str, address: Address) -> None:
    assert parse_listen(text) == address


@pytest.mark.parametrize("text", ["", "127.0.0.1", "host:99999", "unix:", "inet:x@h",
                                  "http://127.0.0.1:80", "a b:1"])
def test_bad_addresses_name_the_setting(text: str) -> None:
    with pytest.raises(ValueError, match="milter listen"):
        parse_listen(text, "milter listen")


@pytest.mark.parametrize(("text", "loopback"), [
    ("127.0.0.1:1", True), ("[::1]:1", True), ("[::ffff:127.0.0.1]:1", True),
    ("unix:/x", True), ("localhost:1", True), ("0.0.0.0:1", False), ("192.0.2.1:1", False),
    ("mail.example.org:25", False)])
def test_loopback(text: str, loopback: bool) -> None:
    assert parse_listen(text).is_loopback is loopback


def test_str_round_trips() -> None:
    for text in ("127.0.0.1:25", "[::1]:25", "unix:/tmp/x.sock"):
        assert str(parse_listen(text)) == text


def test_bind_tcp_and_reuse_port() -> None:
    a = bind(parse_listen("127.0.0.1:0"), what="test")
    try:
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        port = a.getsockname()[1]
        with pytest.raises(ListenError, match=f"test: cannot listen on 127.0.0.1:{port}"):
            bind(parse_listen(f"127.0.0.1:{port}"), what="test")
    finally:
        a.close()
    opts = ListenOptions(reuse_port=True)
    b = bind(parse_listen("127.0.0.1:0"), what="test", options=opts)
    port = b.getsockname()[1]
    c = bind(parse_listen(f"127.0.0.1:{port}"), what="test", options=opts)  # shared
    b.close()
    c.close()


def test_bind_unix_mode_stale_and_live(tmp_path) -> None:
    path = tmp_path / "s.sock"
    first = bind(Address("unix", path=str(path)), what="milter", mode=0o660)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    with pytest.raises(ListenError, match="another process is listening"):
        bind(Address("unix", path=str(path)), what="milter")
    first.close()  # the file stays: stale now
    again = bind(Address("unix", path=str(path)), what="milter", mode=0o600)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again.close()


def test_bind_unix_missing_directory_names_path_and_listener(tmp_path) -> None:
    where = tmp_path / "nope" / "m.sock"
    with pytest.raises(ListenError) as info:
        bind(Address("unix", path=str(where)), what="milter")
    assert "milter" in str(info.value) and str(tmp_path / "nope") in str(info.value)


def test_bind_refuses_a_file_that_is_not_a_socket(tmp_path) -> None:
    path = tmp_path / "plain"
    path.write_text("x")
    with pytest.raises(ListenError, match="not a socket"):
        bind(Address("unix", path=str(path)), what="icap")


def test_relative_unix_path_resolves_against_base_dir(tmp_path) -> None:
    sock = bind(parse_listen("unix:rel.sock"), what="t",
                options=ListenOptions(base_dir=str(tmp_path)))
    assert (tmp_path / "rel.sock").exists()
    sock.close()


@pytest.mark.parametrize(("text", "mode"), [("0660", 0o660), ("600", 0o600)])
def test_parse_mode(text: str, mode: int) -> None:
    assert parse_mode(text) == mode


@pytest.mark.parametrize("text", ["660x", "0999", "", "12345"])
def test_parse_mode_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_mode(text)


async def test_accepted_tcp_connections_get_tcp_nodelay() -> None:
    """asyncio sets TCP_NODELAY only when the socket's proto is IPPROTO_TCP: a listener
    bound with proto 0 made every SMTP reply wait for a delayed ACK (3 ms -> 48 ms)."""
    import asyncio

    seen: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    sock = bind(parse_listen("127.0.0.1:0"), what="test")
    server = await asyncio.start_server(handler, sock=sock)
    port = sock.getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.read()
    writer.close()
    server.close()
    await server.wait_closed()
    assert seen and seen[0] != 0
