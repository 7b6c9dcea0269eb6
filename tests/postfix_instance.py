"""Run a PRIVATE Postfix instance on loopback for tests (SMTP filter, milter, ...).

Everything lives under one temp directory: ``config/`` (main.cf, master.cf), ``queue/``,
``data/``, and the mail log ``maillog``. The instance listens only on 127.0.0.1 ports
chosen at run time and relays everything it accepts to ``relayhost`` (a test sink), never
to the Internet (no DNS). It is started with ``postfix -c DIR start`` and always stopped
with ``postfix -c DIR stop`` (plus a kill of its master as a last resort).

Usage::

    pf = PostfixInstance(tmp_path, relayhost="127.0.0.1:10030",
                         main_cf={"smtpd_milters": "inet:127.0.0.1:7357"},
                         smtpd_options={"content_filter": "smtp:[127.0.0.1]:10025"},
                         master_cf_extra="127.0.0.1:{reinject_port} inet n - n - - smtpd\\n"
                                         "  -o content_filter=\\n")
    pf.start(); pf.send(b"...", to=["bob@example.test"]); pf.wait_empty(); pf.stop()

Tests call :func:`require_postfix` first (or :func:`available` for their own skip policy).

``master_cf_extra`` may use ``{smtp_port}`` and ``{reinject_port}`` placeholders (both
chosen at run time; ``reinject_port`` is a plain smtpd without any filter — the usual
after-queue reinjection listener). Postfix refuses a non-default config directory unless
the default main.cf lists it in ``alternate_config_directories``; as root the helper adds
this instance's directory there (and removes it on stop), which is what ``postmulti`` does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"
POSTQUEUE = shutil.which("postqueue") or "/usr/sbin/postqueue"
DEFAULT_MAIN_CF = Path("/etc/postfix/main.cf")

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:{smtp_port} inet n - n - - smtpd
{smtpd_options}
127.0.0.1:{reinject_port} inet n - n - - smtpd
  -o content_filter=
  -o smtpd_proxy_filter=
  -o smtpd_milters=
  -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def available() -> str | None:
    """None when a private Postfix can run here, else the reason it cannot."""
    if not os.path.exists(POSTFIX):
        return "postfix not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (its daemons drop to user postfix)"
    return None


def require_postfix() -> None:
    """Skip when a private Postfix cannot run here, but fail as root without Postfix
    installed (CI runs as root and must install it: apt-get install postfix)."""
    reason = available()
    if reason is None:
        return
    if os.geteuid() == 0:
        pytest.fail(reason)
    pytest.skip(reason)


class PostfixInstance:
    """A private Postfix on loopback; see the module docstring."""

    def __init__(self, base: Path, *, relayhost: str, main_cf: Mapping[str, str] | None = None,
                 smtpd_options: Mapping[str, str] | None = None, master_cf_extra: str = "",
                 smtp_port: int | None = None, reinject_port: int | None = None) -> None:
        # Postfix daemons run as user postfix and must traverse every parent directory,
        # which pytest's private tmp dirs do not allow: use our own 0755 dir under /tmp,
        # removed by stop(). ``base`` only names it (for reading logs after a failure).
        self.base = Path(tempfile.mkdtemp(prefix=f"avgate-pf-{Path(base).name[:20]}-"))
        os.chmod(self.base, 0o755)  # noqa: S103 - postfix must traverse it
        self.config_dir = self.base / "config"
        self.queue_dir = self.base / "queue"
        self.data_dir = self.base / "data"
        self.maillog = self.base / "maillog"
        self.relayhost = relayhost
        self.smtp_port = smtp_port or free_port()
        self.reinject_port = reinject_port or free_port()
        self.main_cf = dict(main_cf or {})
        self.smtpd_options = dict(smtpd_options or {})
        self.master_cf_extra = master_cf_extra
        self.running = False
        self._registered = False

    # -- configuration ----------------------------------------------------------------------
    def _main_cf(self) -> dict[str, str]:
        host, _, port = self.relayhost.rpartition(":")
        return {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "postfix.test",
            "mydomain": "postfix.test",
            "myorigin": "postfix.test",
            "mydestination": "",
            "local_recipient_maps": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relayhost": f"[{host}]:{port}",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_authorized_xforward_hosts": "127.0.0.0/8",
            "maillog_file": str(self.maillog),
            # postlogd writes maillog_file only under one of these prefixes
            "maillog_file_prefixes": str(self.base),
            "biff": "no",
            "alias_maps": "",
            "alias_database": "",
            "smtputf8_enable": "no",
            "master_service_disable": "",
            "queue_run_delay": "2s",
            "minimal_backoff_time": "2s",
            "maximal_backoff_time": "4s",
            "smtp_connect_timeout": "5s",
            **self.main_cf,
        }

    def write_config(self) -> None:
        for d in (self.config_dir, self.queue_dir, self.data_dir):
            d.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data_dir, "postfix", "postfix")
        main = "".join(f"{k} = {v}\n" for k, v in self._main_cf().items())
        (self.config_dir / "main.cf").write_text(main)
        opts = "".join(f"  -o {k}={v}\n" for k, v in self.smtpd_options.items()).rstrip("\n")
        master = MASTER_CF.format(smtp_port=self.smtp_port, reinject_port=self.reinject_port,
                                  smtpd_options=opts)
        master = "\n".join(line for line in master.splitlines() if line.strip()) + "\n"
        extra = self.master_cf_extra.format(smtp_port=self.smtp_port,
                                            reinject_port=self.reinject_port)
        (self.config_dir / "master.cf").write_text(master + extra)
        self.maillog.touch()

    def _register(self) -> None:
        """List our config dir in the default main.cf (Postfix requires it for -c)."""
        current = subprocess.run([POSTCONF, "-h", "alternate_config_directories"],
                                 capture_output=True, text=True, check=False).stdout.strip()
        dirs = [d for d in current.replace(",", " ").split() if d]
        if str(self.config_dir) not in dirs:
            dirs.append(str(self.config_dir))
            subprocess.run([POSTCONF, "-e", f"alternate_config_directories = {' '.join(dirs)}"],
                           check=True, capture_output=True)
        self._registered = True

    def _unregister(self) -> None:
        if not self._registered:
            return
        current = subprocess.run([POSTCONF, "-h", "alternate_config_directories"],
                                 capture_output=True, text=True, check=False).stdout.strip()
        dirs = [d for d in current.replace(",", " ").split()
                if d and d != str(self.config_dir) and os.path.isdir(d)]
        subprocess.run([POSTCONF, "-e", f"alternate_config_directories = {' '.join(dirs)}"],
                       check=False, capture_output=True)
        self._registered = False

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([POSTFIX, "-c", str(self.config_dir), *args], capture_output=True,
                              text=True, timeout=timeout, check=False)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, timeout: float = 30) -> PostfixInstance:
        reason = available()
        if reason:
            raise RuntimeError(reason)
        self.write_config()
        self._register()
        r = self._postfix("check")
        if r.returncode != 0:
            self._unregister()
            raise RuntimeError(f"postfix check failed: {r.stderr}{r.stdout}\n{self.log()}")
        r = self._postfix("start")
        if r.returncode != 0:
            self._unregister()
            raise RuntimeError(f"postfix start failed: {r.stderr}{r.stdout}\n{self.log()}")
        self.running = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"postfix did not listen on {self.smtp_port}\n{self.log()}")

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        if self.running:
            pid = self.master_pid()
            self._postfix("stop", timeout=30)
            deadline = time.monotonic() + 10
            while pid and time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                if pid:
                    with _suppress():
                        os.kill(pid, signal.SIGKILL)
            self.running = False
        self._unregister()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- use ----------------------------------------------------------------------------------
    def send(self, message: bytes, *, sender: str = "alice@example.test",
             to: Sequence[str] = ("bob@example.test",), port: int | None = None
             ) -> tuple[int, bytes]:
        """Submit over SMTP; (DATA reply code, text). Refusals are returned, not raised."""
        with smtplib.SMTP("127.0.0.1", port or self.smtp_port, timeout=60) as s:
            s.ehlo("client.test")
            code, text = s.mail(sender)
            if code != 250:
                return code, text
            for r in to:
                code, text = s.rcpt(r)
                if code >= 400:
                    return code, text
            try:
                return s.data(message)
            except smtplib.SMTPDataError as exc:
                return exc.smtp_code, exc.smtp_error

    def postqueue_json(self) -> list[dict[str, Any]]:
        """The queue content (``postqueue -j``), one dict per queued message."""
        r = subprocess.run([POSTQUEUE, "-c", str(self.config_dir), "-j"], capture_output=True,
                           text=True, timeout=30, check=False)
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]

    def flush(self) -> None:
        subprocess.run([POSTQUEUE, "-c", str(self.config_dir), "-f"], capture_output=True,
                       timeout=30, check=False)

    def wait_empty(self, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.postqueue_json():
                return True
            time.sleep(0.2)
        return False

    def log(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.maillog.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def postfix_factory(base: Path) -> Iterator[Any]:
    """Generator for a pytest fixture: yields a ``make(**kw) -> PostfixInstance`` function
    and stops every instance it started. Skips (non-root / not installed) via the caller."""
    started: list[PostfixInstance] = []
    count = iter(range(1000))

    def make(**kw: Any) -> PostfixInstance:
        pf = PostfixInstance(base / f"pf{next(count)}", **kw)
        started.append(pf)
        return pf.start()

    try:
        yield make
    finally:
        for pf in started:
            pf.stop()
