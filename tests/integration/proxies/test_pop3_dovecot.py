"""The POP3 proxy in front of a real Dovecot, driven by Python's poplib and curl.

Every expectation is checked against what Dovecot itself serves (a direct poplib session),
so "byte-identical" means identical to the real server's answer, not to a fixture.
"""

from __future__ import annotations

import base64
import email
import email.policy
import imaplib
import json
import logging
import poplib
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import require_binary, wait_until
from tests.integration.avgate_proc import AvgateServe
from tests.integration.avgate_proc import free_port as closed_port
from tests.integration.proxies.conftest import CLEAN, INFECTED, StartPop3
from tests.integration.proxies.dovecot import PASSWORD, USER, Dovecot

pytestmark = pytest.mark.timeout(60)


def login(port: int) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", port, timeout=20)
    client.user(USER)
    client.pass_(PASSWORD)
    return client


def direct(dovecot: Dovecot, *commands: tuple[Any, ...]) -> list[Any]:
    client = login(dovecot.pop3_port)
    try:
        return [getattr(client, name)(*args) for name, *args in commands]
    finally:
        client.quit()


def message(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\r\n" for line in lines)


def scan_events(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_clean_identical_infected_replaced_by_a_notice(mailbox: Dovecot,
                                                       pop3_proxy: StartPop3) -> None:
    proxy = pop3_proxy()
    [(_, want_clean, _)] = direct(mailbox, ("retr", 1))
    client = login(proxy.port)
    try:
        assert client.stat() == direct(mailbox, ("stat",))[0]
        _, lines, _ = client.retr(1)
        assert lines == want_clean and message(lines) == CLEAN
        status, lines, _ = client.retr(2)
        assert status.startswith(b"+OK") and b"replaced by avgate" in status
    finally:
        client.quit()
    notice = email.message_from_bytes(message(lines), policy=email.policy.default)
    assert notice["Subject"] == "virus removed"
    assert notice["From"] == "postmaster@localhost"
    assert notice["To"] == "tester@example.test"
    assert notice["Date"] == "Tue, 01 Dec 2026 11:00:00 +0000"
    text, headers = [part for part in notice.walk() if not part.is_multipart()]
    body = text.get_content()
    assert "Eicar-Test-Signature" in body and "Subject: invoice" in body
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "From: Mallory <mallory@example.test>" in headers.get_content()
    assert EICAR_TEXT not in message(lines)
    # the message stays on the server: nothing was deleted
    assert direct(mailbox, ("stat",))[0][0] == 2
    events = scan_events(proxy.log_path)
    assert [e["status"] for e in events] == ["clean", "infected"]
    assert events[1]["frontend"] == "pop3_proxy" and events[1]["pop3"] == "notice"


EICAR_TEXT = INFECTED[INFECTED.index(b"X5O!"):INFECTED.index(b"H+H*") + 4]


def test_curl_downloads_through_the_proxy(mailbox: Dovecot, pop3_proxy: StartPop3) -> None:
    curl = require_binary("curl", "curl")
    proxy = pop3_proxy()

    def fetch(n: int) -> bytes:
        done = subprocess.run([curl, "-sS", "--max-time", "20",
                               f"pop3://{USER}:{PASSWORD}@127.0.0.1:{proxy.port}/{n}"],
                              capture_output=True, timeout=30, check=True)
        return done.stdout

    assert fetch(1) == CLEAN
    notice = fetch(2)
    assert b"Subject: virus removed" in notice and EICAR_TEXT not in notice


def test_scanner_error_is_a_temporary_err_and_the_session_goes_on(
        mailbox: Dovecot, pop3_proxy: StartPop3) -> None:
    proxy = pop3_proxy(engines=[{"type": "clamd", "servers": [f"tcp://127.0.0.1:{closed_port()}"],
                                 "connect_timeout": 0.5, "scan_timeout": 2}])
    client = login(proxy.port)
    try:
        with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\] Virus scanner "
                                                     r"unavailable"):
            client.retr(1)
        assert client.stat()[0] == 2  # same session, still in step with the server
        client.dele(1)
    finally:
        client.rset()
        client.quit()
    assert direct(mailbox, ("stat",))[0][0] == 2


def test_infected_error_mode_and_top(mailbox: Dovecot, pop3_proxy: StartPop3) -> None:
    proxy = pop3_proxy(infected="error")
    [(_, head, _), (_, whole, _)] = direct(mailbox, ("top", 1, 0), ("top", 1, 100))
    client = login(proxy.port)
    try:
        with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/PERM\] Virus found: "
                                                     r"Eicar-Test-Signature"):
            client.retr(2)
        assert client.top(1, 0)[1] == head  # headers only: passed unscanned
        assert client.top(1, 100)[1] == whole
        with pytest.raises(poplib.error_proto, match="Virus found"):
            client.top(2, 20)
        assert client.top(2, 0)[1][0].startswith(b"From: Mallory")
    finally:
        client.quit()
    assert [e["status"] for e in scan_events(proxy.log_path)] == ["infected", "clean",
                                                                  "infected"]


def test_tag_only_when_a_rule_says_so(mailbox: Dovecot, pop3_proxy: StartPop3) -> None:
    proxy = pop3_proxy(policy={"rules": [{"frontend": "pop3_proxy", "status": "clean",
                                          "action": ["accept", "tag"]}]})
    client = login(proxy.port)
    try:
        data = message(client.retr(1)[1])
    finally:
        client.quit()
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"\r\nX-Virus-Status: Clean\r\n" in head + b"\r\n"
    assert body == CLEAN.partition(b"\r\n\r\n")[2]


def test_auth_plain_stls_and_no_secrets_in_logs(mailbox: Dovecot, pop3_proxy: StartPop3,
                                                certificate: tuple[Path, Path],
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = pop3_proxy(tls_cert=str(certificate[0]), tls_key=str(certificate[1]),
                       require_tls=True)
    client = poplib.POP3("127.0.0.1", proxy.port, timeout=20)
    assert "STLS" in client.capa()
    with pytest.raises(poplib.error_proto, match="STLS"):
        client.user(USER)  # require_tls: no credentials in clear
    context = ssl.create_default_context(cafile=str(certificate[0]))
    client.stls(context)
    assert "STLS" not in client.capa()  # not twice
    token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    assert client._shortcmd("AUTH PLAIN").startswith(b"+")  # type: ignore[attr-defined]
    assert client._shortcmd(token).startswith(b"+OK")  # type: ignore[attr-defined]
    assert message(client.retr(1)[1]) == CLEAN
    client.quit()
    # Dovecot saw TLS from the proxy too (server_tls = "auto": STLS when offered)
    assert wait_until(lambda: f"user=<{USER}>, method=PLAIN" in mailbox.log())
    login_lines = [line for line in mailbox.log().splitlines()
                   if "pop3-login: Info: Login:" in line]
    assert login_lines and "TLS" in login_lines[-1], login_lines
    for text in (caplog.text, proxy.log_path.read_text()):
        assert PASSWORD not in text and token not in text


def test_pipelined_and_unknown_commands(mailbox: Dovecot, pop3_proxy: StartPop3) -> None:
    proxy = pop3_proxy()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as sock:
        f = sock.makefile("rb")
        assert f.readline().startswith(b"+OK")
        sock.sendall(f"USER {USER}\r\nPASS {PASSWORD}\r\nXFOO\r\nSTAT\r\nLIST 1\r\n"
                     "RETR 1\r\nQUIT\r\n".encode())
        replies = f.read()
    assert replies.startswith(b"+OK")
    lines = replies.split(b"\r\n")
    assert lines[2] == b"-ERR Command not supported: XFOO"
    assert lines[3].startswith(b"+OK 2 ") and lines[4].startswith(b"+OK 1 ")
    assert CLEAN.replace(b"\r\n.", b"\r\n..") + b".\r\n" in replies
    assert lines[-2].startswith(b"+OK")  # QUIT answered, then the proxy hung up


def test_large_message_streams_identically(mailbox: Dovecot, pop3_proxy: StartPop3) -> None:
    mailbox.clear()
    big = CLEAN + b"".join(b"%07d ..... line of text\r\n" % i for i in range(200_000))
    mailbox.add_message(big)  # about 6 MiB: spooled to a file (the
    # module's scan service keeps 1 MiB in memory)
    proxy = pop3_proxy()
    client = login(proxy.port)
    try:
        assert message(client.retr(1)[1]) == big
    finally:
        client.quit()


def test_avgate_serve_runs_both_mail_proxies(mailbox: Dovecot, tmp_path: Path) -> None:
    cfg = tmp_path / "avgate.toml"
    cfg.write_text(f"""
[quarantine]
path = "{tmp_path / 'q'}"
[pop3_proxy]
listen = "127.0.0.1:0"
server = "127.0.0.1:{mailbox.pop3_port}"
server_tls = "off"
[imap_proxy]
listen = "127.0.0.1:0"
server = "127.0.0.1:{mailbox.imap_port}"
server_tls = "off"
""")
    with AvgateServe(cfg) as serve:
        client = login(serve.port("pop3_proxy"))
        try:
            assert message(client.retr(1)[1]) == CLEAN
            assert b"Subject: virus removed" in message(client.retr(2)[1])
        finally:
            client.quit()
        imap = imaplib.IMAP4("127.0.0.1", serve.port("imap_proxy"), timeout=20)
        try:
            imap.login(USER, PASSWORD)
            imap.select("INBOX")
            typ, data = imap.fetch("2", "(BODY.PEEK[])")
            assert typ == "OK" and b"Subject: virus removed" in data[0][1]  # type: ignore[index]
        finally:
            imap.logout()


def test_implicit_tls_both_ways(mailbox: Dovecot, pop3_proxy: StartPop3,
                                certificate: tuple[Path, Path]) -> None:
    """POP3S: TLS from the first byte towards the client and towards Dovecot's pop3s port."""
    proxy = pop3_proxy(tls="implicit", tls_cert=str(certificate[0]),
                       tls_key=str(certificate[1]), server_tls="implicit",
                       server=f"127.0.0.1:{mailbox.pop3s_port}")
    context = ssl.create_default_context(cafile=str(certificate[0]))
    client = poplib.POP3_SSL("127.0.0.1", proxy.port, context=context, timeout=20)
    try:
        assert "STLS" not in client.capa()  # on TLS already
        client.user(USER)
        client.pass_(PASSWORD)
        assert message(client.retr(1)[1]) == CLEAN
    finally:
        client.quit()
    logins = [line for line in mailbox.log().splitlines() if "pop3-login: Info: Login:" in line]
    assert logins and "TLS" in logins[-1], logins
