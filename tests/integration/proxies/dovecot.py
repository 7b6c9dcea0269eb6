"""A private Dovecot (POP3 + IMAP) on loopback, started by the tests from a temp directory.

Minimal working configuration, found by trial (Dovecot 2.3): a passwd-file passdb/userdb
with one test user and a plain password, Maildir under the temp directory, ``ssl = no``
unless a certificate is given, listeners on free loopback ports, and the directories Dovecot
writes (``base_dir``, ``state_dir``, the log) inside the temp directory. Run as root, the
login processes run as ``dovenull`` and the internal ones as ``dovecot`` (the Debian package
creates both) and the mail belongs to ``nobody``; run as another user, every process runs
as that user (``default_internal_user``/``default_login_user``), which Dovecot supports
for exactly this. The temp directory is made world-readable (0755) so the unprivileged login
processes can reach the sockets under ``base_dir``.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.clamd_daemon import free_port
from tests.helpers import require_binary, strict_dependencies, wait_until

USER, PASSWORD = "tester", "secret"


def require_file(path: str, package: str) -> None:
    """Skip (or fail where packages must be there) without ``path``."""
    if not os.path.exists(path):
        if strict_dependencies():
            pytest.fail(f"{path} is missing; CI must install it (apt-get install {package})")
        pytest.skip(f"{path} missing (apt-get install {package})")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Dovecot:
    """``Dovecot().start()``: POP3 on :attr:`pop3_port` (and IMAP on :attr:`imap_port` with
    ``protocols=("pop3", "imap")``);
    :meth:`add_message` drops a message into the test user's INBOX (Maildir ``new/``)."""

    def __init__(self, *, cert: Path | None = None, key: Path | None = None,
                 protocols: tuple[str, ...] = ("pop3",)) -> None:
        self.binary = require_binary("dovecot", "dovecot-core")
        for protocol in protocols:  # dovecot-pop3d, dovecot-imapd
            require_file(f"/usr/lib/dovecot/{protocol}", f"dovecot-{protocol}d")
        self.protocols = protocols
        self.root = Path(tempfile.mkdtemp(prefix="avgate-dovecot-"))
        os.chmod(self.root, 0o755)  # noqa: S103 - Dovecot's login processes must reach it
        self.pop3_port = free_port()
        self.imap_port = free_port()
        #: POP3S and IMAPS (implicit TLS) when a certificate is given; 0 = none
        self.pop3s_port = free_port() if cert else 0
        self.imaps_port = free_port() if cert else 0
        self.maildir = self.root / "mail" / USER / "Maildir"
        self.cert, self.key = cert, key
        self._seq = 0
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            self.uid, self.gid = nobody.pw_uid, nobody.pw_gid
            self.internal, self.login = "dovecot", "dovenull"
        else:
            self.uid, self.gid = os.getuid(), os.getgid()
            self.internal = self.login = getpass.getuser()

    @property
    def conf(self) -> Path:
        return self.root / "dovecot.conf"

    def _write_config(self) -> None:
        for sub in ("cur", "new", "tmp"):
            (self.maildir / sub).mkdir(parents=True, exist_ok=True)
        home = self.root / "mail" / USER
        (self.root / "passwd").write_text(
            f"{USER}:{{PLAIN}}{PASSWORD}:{self.uid}:{self.gid}::{home}::\n")
        imap = ("service imap-login {\n  inet_listener imap {\n"
                f"    port = {self.imap_port}\n  }}\n"
                f"  inet_listener imaps {{\n    port = {self.imaps_port}\n  }}\n}}\n"
                if "imap" in self.protocols else "")
        ssl = "ssl = no"
        if self.cert and self.key:
            ssl = f"ssl = yes\nssl_cert = <{self.cert}\nssl_key = <{self.key}"
        self.conf.write_text(f"""
base_dir = {self.root}/run
state_dir = {self.root}/state
log_path = {self.root}/dovecot.log
protocols = {" ".join(self.protocols)}
listen = 127.0.0.1
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = {self.internal}
default_login_user = {self.login}
first_valid_uid = 1
mail_location = maildir:~/Maildir
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {self.root}/passwd
}}
userdb {{
  driver = passwd-file
  args = {self.root}/passwd
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    port = {self.pop3s_port}
  }}
}}
{imap}service anvil {{
  chroot =
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0666
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
""")
        self._chown(self.root / "mail")

    def _chown(self, path: Path) -> None:
        if os.geteuid() != 0:
            return
        for dirpath, _dirs, files in os.walk(path):
            os.chown(dirpath, self.uid, self.gid)
            for name in files:
                os.chown(os.path.join(dirpath, name), self.uid, self.gid)

    def start(self) -> Dovecot:
        self._write_config()
        # the daemon keeps its stdio: never a pipe (run() would wait for it to close)
        with open(self.root / "start.err", "wb") as err:
            started = subprocess.run([self.binary, "-c", str(self.conf)], check=False,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=err, timeout=30)
        if started.returncode != 0:
            raise RuntimeError("dovecot did not start:\n"
                               + (self.root / "start.err").read_text(errors="replace"))
        ports = [port for name, port in (("pop3", self.pop3_port), ("imap", self.imap_port))
                 if name in self.protocols]
        if not wait_until(lambda: all(_listening(port) for port in ports), timeout=20):
            self.stop()
            raise RuntimeError("dovecot did not start:\n" + self.log())
        return self

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "dovecot.log").read_text(errors="replace")
        return ""

    def add_message(self, data: bytes) -> str:
        """Deliver ``data`` (CRLF or LF lines; Dovecot serves them with CRLF) to the INBOX;
        returns the Maildir file name."""
        self._seq += 1
        name = f"{int(time.time())}.M{self._seq}P{os.getpid()}.avgate-test"
        tmp = self.maildir / "tmp" / name
        tmp.write_bytes(data)
        if os.geteuid() == 0:
            os.chown(tmp, self.uid, self.gid)
        os.rename(tmp, self.maildir / "new" / name)
        return name

    def clear(self) -> None:
        """Empty the INBOX (Maildir files and Dovecot's index of them)."""
        for sub in ("cur", "new", "tmp"):
            for f in (self.maildir / sub).iterdir():
                f.unlink()
        for f in self.maildir.glob("dovecot*"):
            if f.is_file():
                f.unlink()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            subprocess.run([self.binary, "-c", str(self.conf), "stop"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
                           check=False)
        wait_until(lambda: not _listening(self.pop3_port), timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
