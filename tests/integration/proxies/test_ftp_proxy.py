"""The FTP proxy (``[ftp_proxy]``) between real clients (Python ftplib, curl) and a real FTP
server (pyftpdlib on loopback): clean files byte-identical both ways, an infected download
refused with 550 and left incomplete, an infected upload never reaching the server, active
mode to the client's own address only (no FTP bounce)."""

from __future__ import annotations

import ftplib
import hashlib
import io
import os
import shutil
import subprocess
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.corpus import EICAR
from tests.helpers import require_binary
from tests.integration.avgate_proc import AvgateServe

pyftpdlib = pytest.importorskip("pyftpdlib", reason="pyftpdlib (test extra) missing")
from pyftpdlib.authorizers import DummyAuthorizer  # noqa: E402
from pyftpdlib.handlers import FTPHandler  # noqa: E402
from pyftpdlib.servers import ThreadedFTPServer  # noqa: E402

USER, PASSWORD = "alice", "ftp-pass-7d1"  # the test server's account
CLEAN = os.urandom(3 * 1024 * 1024 + 17)


def _big_infected() -> bytes:
    """A 1 MiB zip with EICAR inside: larger than the keep-back, infected."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("padding.bin", os.urandom(1024 * 1024))
        z.writestr("eicar.com", EICAR)
    return buf.getvalue()


BIG_INFECTED = _big_infected()


@dataclass
class Env:
    home: Path
    port: int  # the proxy
    serve: AvgateServe


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("ftp")
    home = root / "home"
    home.mkdir()
    (home / "clean.bin").write_bytes(CLEAN)
    (home / "eicar.com").write_bytes(EICAR)
    (home / "big-infected.bin").write_bytes(BIG_INFECTED)
    auth = DummyAuthorizer()
    auth.add_user(USER, PASSWORD, str(home), perm="elradfmwMT")
    handler = type("Handler", (FTPHandler,), {"authorizer": auth})
    server = ThreadedFTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"timeout": 0.2},
                              daemon=True)
    thread.start()
    ftp_port = server.socket.getsockname()[1]
    cfg = root / "avgate.toml"
    cfg.write_text(f"""
[scan]
cache = false
[log]
path = "{root / 'scan.log'}"
[quarantine]
path = "{root / 'quarantine'}"
[ftp_proxy]
listen = "127.0.0.1:0"
server = "127.0.0.1:{ftp_port}"
data_timeout = 20
""")
    serve = AvgateServe(cfg).start()
    try:
        port = int(serve.listeners["ftp_proxy"][0].rsplit(":", 1)[1])
        yield Env(home, port, serve)
    finally:
        serve.stop()
        server.close_all()


def client(env: Env, *, passive: bool = True) -> ftplib.FTP:
    ftp = ftplib.FTP()  # noqa: S321 - plain FTP is what the proxy speaks
    ftp.connect("127.0.0.1", env.port, timeout=30)
    ftp.login(USER, PASSWORD)
    ftp.set_pasv(passive)
    return ftp


def fetch(ftp: ftplib.FTP, name: str) -> bytes:
    out = io.BytesIO()
    ftp.retrbinary(f"RETR {name}", out.write)
    return out.getvalue()


@pytest.mark.parametrize("passive", [True, False], ids=["passive", "active"])
def test_clean_download_is_byte_identical(env: Env, passive: bool) -> None:
    with client(env, passive=passive) as ftp:
        data = fetch(ftp, "clean.bin")
        assert hashlib.sha256(data).digest() == hashlib.sha256(CLEAN).digest()
        assert "clean.bin" in ftp.nlst()


def test_infected_download_is_refused_and_incomplete(env: Env) -> None:
    with client(env) as ftp:
        with pytest.raises(ftplib.error_perm, match=r"^550 .*Eicar-Test-Signature"):
            fetch(ftp, "eicar.com")
        got = io.BytesIO()
        with pytest.raises(ftplib.error_perm, match=r"^550 "):
            ftp.retrbinary("RETR big-infected.bin", got.write)
        assert 0 < len(got.getvalue()) < len(BIG_INFECTED)  # keep-back: never complete
        assert fetch(ftp, "clean.bin") == CLEAN  # the session goes on


def test_uploads_are_scanned_before_the_server_sees_them(env: Env) -> None:
    with client(env) as ftp:
        with pytest.raises(ftplib.error_perm, match=r"^550 Upload refused: Eicar"):
            ftp.storbinary("STOR up-eicar.com", io.BytesIO(EICAR))
        assert not (env.home / "up-eicar.com").exists()
        ftp.storbinary("STOR up-clean.bin", io.BytesIO(CLEAN))
        assert (env.home / "up-clean.bin").read_bytes() == CLEAN


def test_bounce_and_unsupported_commands(env: Env) -> None:
    with client(env) as ftp:
        with pytest.raises(ftplib.error_perm, match=r"^500 Illegal PORT"):
            ftp.sendcmd("PORT 192,0,2,1,4,1")  # a third host: the FTP bounce attack
        with pytest.raises(ftplib.error_perm, match=r"^500 Illegal PORT"):
            ftp.sendcmd("EPRT |1|127.0.0.1|21|")  # a privileged port
        with pytest.raises(ftplib.error_perm, match=r"^501 "):
            ftp.sendcmd("PORT 127,0,0,1,300,1")
        with pytest.raises(ftplib.error_perm, match=r"^502 "):
            ftp.sendcmd("REST 100")
        with pytest.raises(ftplib.error_temp, match=r"^425 "):
            ftp.sendcmd("RETR clean.bin")  # no data connection arranged
        assert ftp.sendcmd("NOOP").startswith("200")


def test_over_long_command_line_closes_the_session(env: Env) -> None:
    ftp = client(env)
    ftp.sock.sendall(b"NOOP " + b"x" * 10_000 + b"\r\n")
    assert ftp.getline().startswith("500 ")
    ftp.close()


def test_curl_downloads_through_the_proxy(env: Env, tmp_path: Path) -> None:
    curl = require_binary("curl", "curl")
    base = f"ftp://{USER}:{PASSWORD}@127.0.0.1:{env.port}"
    out = tmp_path / "clean.bin"
    p = subprocess.run([curl, "-sS", "-o", str(out), f"{base}/clean.bin"], capture_output=True,
                       timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == CLEAN
    bad = tmp_path / "bad.bin"
    p = subprocess.run([curl, "-sS", "-o", str(bad), f"{base}/big-infected.bin"],
                       capture_output=True, timeout=60, check=False)
    assert p.returncode != 0
    assert not bad.exists() or bad.stat().st_size < len(BIG_INFECTED)
    shutil.rmtree(tmp_path, ignore_errors=True)
