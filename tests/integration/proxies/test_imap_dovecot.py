"""The IMAP proxy in front of a real Dovecot, driven by Python's imaplib, curl and raw
sockets (IDLE, pipelined tags)."""

from __future__ import annotations

import base64
import email
import email.policy
import imaplib
import json
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import require_binary
from tests.integration.avgate_proc import free_port as closed_port
from tests.integration.proxies.conftest import CLEAN, EICAR, INFECTED, StartProxy
from tests.integration.proxies.dovecot import PASSWORD, USER, Dovecot

pytestmark = pytest.mark.timeout(60)
EICAR_B64 = base64.encodebytes(EICAR).replace(b"\n", b"\r\n")
INFECTED_B64 = (b"From: m@example.test\r\nTo: tester@example.test\r\nSubject: b64\r\n"
                b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b2\r\n\r\n"
                b"--b2\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b2\r\n"
                b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64"
                b"\r\n\r\n" + EICAR_B64 + b"--b2--\r\n")


def login(port: int) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=20)
    client.login(USER, PASSWORD)
    client.select("INBOX")
    return client


def fetch(client: imaplib.IMAP4, n: str, item: str) -> bytes:
    typ, data = client.fetch(n, f"({item})")
    assert typ == "OK", data
    first = data[0]
    assert isinstance(first, tuple), data
    return bytes(first[1])


def count(dovecot: Dovecot) -> int:
    client = login(dovecot.imap_port)
    try:
        _, data = client.select("INBOX")
        return int(data[0] or 0)
    finally:
        client.logout()


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_fetch_clean_identical_infected_replaced(mailbox: Dovecot,
                                                 imap_proxy: StartProxy) -> None:
    proxy = imap_proxy()
    direct = login(mailbox.imap_port)
    want = fetch(direct, "1", "BODY.PEEK[]")
    direct.logout()
    client = login(proxy.port)
    try:
        assert fetch(client, "1", "BODY.PEEK[]") == want == CLEAN
        assert fetch(client, "1", "RFC822") == CLEAN
        notice = fetch(client, "2", "BODY.PEEK[]")
        part = fetch(client, "2", "BODY.PEEK[2]")  # the attachment alone
        assert fetch(client, "2", "BODY.PEEK[HEADER]").startswith(b"From: Mallory")
    finally:
        client.logout()
    msg = email.message_from_bytes(notice, policy=email.policy.default)
    assert msg["Subject"] == "virus removed" and not msg.defects
    assert b"Eicar-Test-Signature" in notice and EICAR not in notice
    assert b"Eicar-Test-Signature" in part and EICAR not in part
    assert [e["status"] for e in events(proxy.log_path)] == ["clean", "clean", "infected",
                                                             "infected"]


def test_base64_part_is_scanned_decoded(mailbox: Dovecot, imap_proxy: StartProxy) -> None:
    mailbox.clear()
    mailbox.add_message(INFECTED_B64)
    proxy = imap_proxy()
    client = login(proxy.port)
    try:
        part = fetch(client, "1", "BODY.PEEK[2]")
    finally:
        client.logout()
    assert b"Eicar-Test-Signature" in base64.b64decode(part)


def test_append_infected_refused_clean_stored(mailbox: Dovecot,
                                              imap_proxy: StartProxy) -> None:
    proxy = imap_proxy()
    client = login(proxy.port)
    try:
        typ, data = client.append("INBOX", None, None, INFECTED)
        assert typ == "NO" and b"Virus found: Eicar-Test-Signature" in data[0]
        typ, data = client.append("INBOX", None, None, CLEAN)
        assert typ == "OK", data
    finally:
        client.logout()
    assert count(mailbox) == 3  # two in the fixture, one appended


def test_curl_fetches_through_the_proxy(mailbox: Dovecot, imap_proxy: StartProxy) -> None:
    curl = require_binary("curl", "curl")
    proxy = imap_proxy()

    def get(uid: int) -> bytes:
        return subprocess.run([curl, "-sS", "--max-time", "20",
                               f"imap://{USER}:{PASSWORD}@127.0.0.1:{proxy.port}/INBOX;UID={uid}"],
                              capture_output=True, timeout=30, check=True).stdout

    assert get(1) == CLEAN
    assert b"Subject: virus removed" in get(2)


def test_idle_and_pipelined_tags(mailbox: Dovecot, imap_proxy: StartProxy) -> None:
    proxy = imap_proxy()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as sock:
        f = sock.makefile("rb")

        def until(tag: bytes) -> list[bytes]:
            lines = []
            while not (line := f.readline()).startswith(tag + b" "):
                assert line, lines
                lines.append(line)
            return [*lines, line]

        assert f.readline().startswith(b"* OK")
        sock.sendall(f"a1 LOGIN {USER} {PASSWORD}\r\na2 SELECT INBOX\r\n"
                     "a3 FETCH 1 (BODY.PEEK[])\r\na4 NOOP\r\n".encode())
        assert until(b"a1")[-1].startswith(b"a1 OK")
        assert until(b"a2")[-1].startswith(b"a2 OK")
        fetched = until(b"a3")
        assert fetched[-1].startswith(b"a3 OK")
        assert b"".join(fetched).count(b"clean body") == 1
        assert until(b"a4")[-1].startswith(b"a4 OK")
        sock.sendall(b"a5 IDLE\r\n")
        assert f.readline().startswith(b"+")
        mailbox.add_message(CLEAN)  # Dovecot tells the idling client (read with a timeout)
        line = f.readline()
        while b"EXISTS" not in line:
            line = f.readline()
        assert line == b"* 3 EXISTS\r\n"
        sock.sendall(b"DONE\r\n")
        assert until(b"a5")[-1].startswith(b"a5 OK")
        sock.sendall(b"a6 LOGOUT\r\n")
        assert until(b"a6")[-1].startswith(b"a6 OK")


def test_starttls_both_ways(mailbox: Dovecot, imap_proxy: StartProxy,
                            certificate: tuple[Path, Path]) -> None:
    proxy = imap_proxy(tls_cert=str(certificate[0]), tls_key=str(certificate[1]))
    client = imaplib.IMAP4("127.0.0.1", proxy.port, timeout=20)
    assert "STARTTLS" in client.capabilities
    assert not any(c.startswith("COMPRESS") for c in client.capabilities)
    client.starttls(ssl.create_default_context(cafile=str(certificate[0])))
    client.login(USER, PASSWORD)
    client.select("INBOX")
    assert fetch(client, "1", "BODY.PEEK[]") == CLEAN
    client.logout()
    logins = [line for line in mailbox.log().splitlines() if "imap-login: Info: Login:" in line]
    assert logins and "TLS" in logins[-1], logins


def test_scanner_error(mailbox: Dovecot, imap_proxy: StartProxy) -> None:
    proxy = imap_proxy(engines=[{"type": "clamd",
                                 "servers": [f"tcp://127.0.0.1:{closed_port()}"],
                                 "connect_timeout": 0.5, "scan_timeout": 2}])
    client = login(proxy.port)
    typ, data = client.append("INBOX", None, None, CLEAN)
    assert typ == "NO" and b"[UNAVAILABLE]" in data[0]
    with pytest.raises(imaplib.IMAP4.abort, match="UNAVAILABLE"):
        client.fetch("1", "(BODY.PEEK[])")
    assert count(mailbox) == 2


def test_implicit_tls_both_ways(mailbox: Dovecot, imap_proxy: StartProxy,
                                certificate: tuple[Path, Path]) -> None:
    """IMAPS towards the client and towards Dovecot's imaps port."""
    proxy = imap_proxy(tls="implicit", tls_cert=str(certificate[0]),
                       tls_key=str(certificate[1]), server_tls="implicit",
                       server=f"127.0.0.1:{mailbox.imaps_port}")
    context = ssl.create_default_context(cafile=str(certificate[0]))
    client = imaplib.IMAP4_SSL("127.0.0.1", proxy.port, ssl_context=context, timeout=20)
    try:
        assert "STARTTLS" not in client.capabilities
        client.login(USER, PASSWORD)
        client.select("INBOX")
        assert fetch(client, "1", "BODY.PEEK[]") == CLEAN
    finally:
        client.logout()


def test_partial_fetch_is_unknown_for_the_policy(mailbox: Dovecot,
                                                 imap_proxy: StartProxy) -> None:
    """Only a part passed: clean is not claimed. The default policy passes it (logged as
    unknown); a rule can refuse what was not fully scanned."""
    proxy = imap_proxy()
    client = login(proxy.port)
    try:
        assert fetch(client, "1", "BODY.PEEK[1]") == CLEAN.partition(b"\r\n\r\n")[2]
    finally:
        client.logout()
    [event] = events(proxy.log_path)
    assert event["status"] == "unknown" and "partial fetch BODY[1]" in event["reason"]
    strict = imap_proxy(policy={"rules": [{"frontend": "imap_proxy", "status": "unknown",
                                           "action": "reject"}]})
    client = login(strict.port)
    try:
        part = fetch(client, "1", "BODY.PEEK[1]")
        assert fetch(client, "1", "BODY.PEEK[]") == CLEAN  # the whole message still passes
    finally:
        client.logout()
    assert part.startswith(b"This part could not be scanned (partial fetch BODY[1]")


def test_curl_upload_of_eicar_refused(mailbox: Dovecot, imap_proxy: StartProxy,
                                      tmp_path: Path) -> None:
    curl = require_binary("curl", "curl")
    proxy = imap_proxy()
    url = f"imap://{USER}:{PASSWORD}@127.0.0.1:{proxy.port}/INBOX"
    (tmp_path / "bad.eml").write_bytes(INFECTED)
    (tmp_path / "good.eml").write_bytes(CLEAN)
    bad = subprocess.run([curl, "-sS", "--max-time", "20", "-T", str(tmp_path / "bad.eml"), url],
                         capture_output=True, timeout=30, check=False)
    assert bad.returncode == 25, bad.stderr  # "Upload failed": our NO to the APPEND
    assert [(e["status"], e["imap"]) for e in events(proxy.log_path)] == [("infected", "NO")]
    good = subprocess.run([curl, "-sS", "--max-time", "20", "-T", str(tmp_path / "good.eml"),
                           url], capture_output=True, timeout=30, check=False)
    assert good.returncode == 0, good.stderr
    assert count(mailbox) == 3


def test_large_message_streams_identically(mailbox: Dovecot, imap_proxy: StartProxy) -> None:
    mailbox.clear()
    big = CLEAN + b"".join(b"%07d ..... line of text\r\n" % i for i in range(200_000))
    mailbox.add_message(big)  # about 6 MiB: spooled to a file (1 MiB kept in memory)
    proxy = imap_proxy()
    client = login(proxy.port)
    try:
        assert fetch(client, "1", "BODY.PEEK[]") == big
    finally:
        client.logout()


def test_quarantined_download_is_replaced_and_kept(mailbox: Dovecot,
                                                   imap_proxy: StartProxy) -> None:
    proxy = imap_proxy(policy={"virus_action": "quarantine"})
    client = login(proxy.port)
    try:
        assert b"Subject: virus removed" in fetch(client, "2", "BODY.PEEK[]")
    finally:
        client.logout()
    [event] = events(proxy.log_path)
    assert event["actions"] == ["replace", "quarantine"] and event["ids"]["quarantine"]
