"""A clamd-listener connection asks the kernel who the unix-socket peer is (SO_PEERCRED)
only when a per-client limit needs it: most connections (one INSTREAM each) never do."""

from __future__ import annotations

import os
import socket
from unittest import mock

from avgate.frontends import clamd as fe
from avgate.frontends import clamd_accounting as accounting
from avgate.frontends.clamd_accounting import Conn


def test_the_peer_uid_is_asked_once_when_a_session_needs_it() -> None:
    ours, theirs = socket.socketpair()
    settings = fe.ClamdListenerSettings(max_sessions_per_client=1)
    try:
        with mock.patch.object(accounting, "peer_uid", wraps=accounting.peer_uid) as asked:
            conn = Conn(ours, True, "local", None, settings)
            assert asked.call_count == 0
            assert conn.open_session()
            assert asked.call_count == 1
            assert conn.client == f"uid:{os.geteuid()}"
            assert accounting.sessions.by_client[conn.client] == 1
            # a second connection of the same peer is held to the same per-client cap
            other = Conn(theirs, True, "local", None, settings)
            assert not other.open_session()
            assert asked.call_count == 2
            conn.release()
            assert accounting.sessions.by_client[f"uid:{os.geteuid()}"] == 0
    finally:
        ours.close()
        theirs.close()


def test_a_tcp_client_is_its_address() -> None:
    ours, theirs = socket.socketpair()
    try:
        with mock.patch.object(accounting, "peer_uid") as asked:
            conn = Conn(ours, False, "192.0.2.1:4000", "192.0.2.1", fe.ClamdListenerSettings())
            assert conn.client == "192.0.2.1"
            assert asked.call_count == 0
    finally:
        ours.close()
        theirs.close()
