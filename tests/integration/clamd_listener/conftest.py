"""A running ``avgate serve`` with the clamd-protocol listener (TCP + unix socket)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.avgate_proc import AvgateServe

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
STREAM_MAX = 1024 * 1024
MAX_SCAN = 512 * 1024  # below STREAM_MAX: bigger streams are received but not scanned


@dataclass
class ClamdListenerEnv:
    serve: AvgateServe
    root: Path
    allowed: Path
    outside: Path
    tcp_port: int
    unix_path: Path
    log_path: Path

    def clamd_conf(self, *, unix: bool = False) -> Path:
        """A clamd.conf for clamdscan that points at avgate's listener."""
        path = self.root / ("clamd-unix.conf" if unix else "clamd-tcp.conf")
        text = (f"LocalSocket {self.unix_path}\n" if unix else
                f"TCPSocket {self.tcp_port}\nTCPAddr 127.0.0.1\n")
        path.write_text(text)
        return path


@pytest.fixture(scope="module")
def clamd_listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClamdListenerEnv]:
    root = tmp_path_factory.mktemp("clamd-listener")
    allowed = root / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "eicar.com").write_bytes(EICAR)
    (allowed / "clean.txt").write_bytes(b"nothing to see here\n")
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret-eicar.com").write_bytes(EICAR)
    (allowed / "link-out").symlink_to(outside / "secret-eicar.com")
    (allowed / "dirlink-out").symlink_to(outside)
    unix_path = root / "clamd.sock"
    log_path = root / "scan.log"
    config = root / "avgate.toml"
    config.write_text(f"""
[scan]
cache = false
[limits]
max_scan_size = {MAX_SCAN}
[log]
path = "{log_path}"
[quarantine]
path = "{root / 'quarantine'}"
[clamd_listener]
listen = "127.0.0.1:0"
unix_socket = "{unix_path}"
allowed_paths = ["{allowed}"]
stream_max_length = {STREAM_MAX}
idle_timeout = 5
""")
    serve = AvgateServe(config).start()
    try:
        yield ClamdListenerEnv(serve, root, allowed, outside, serve.port("clamd_listener"),
                               unix_path, log_path)
    finally:
        serve.stop()
