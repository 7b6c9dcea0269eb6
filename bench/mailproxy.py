"""POP3 and IMAP proxy benchmark: messages per second through avgate vs directly from
Dovecot, and avgate's CPU milliseconds per message (the serve process and its scan workers).

    .venv/bin/python bench/mailproxy.py [-n 300] [--size-kib 20] [--runs 3] [--out FILE]

A private Dovecot (the test suite's fixture, tests/integration/proxies/dovecot.py) serves a
Maildir of ``-n`` generated messages (every tenth with an attachment); ``avgate serve`` runs
``[pop3_proxy]`` and ``[imap_proxy]`` in front of it. Each run downloads every message once
in one session, directly and through the proxy: poplib RETR, imaplib FETCH BODY.PEEK[] (the
verdict cache is off, so every message is scanned every time). One JSON line per run goes
to stdout (and ``--out``), then a Markdown table.
Everything listens on 127.0.0.1; Dovecot and avgate are stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import imaplib
import json
import poplib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common as C  # noqa: E402
from tests.integration.avgate_proc import AvgateServe  # noqa: E402
from tests.integration.proxies.dovecot import PASSWORD, USER, Dovecot  # noqa: E402


def message(i: int, size: int) -> bytes:
    head = (f"From: sender{i}@example.test\r\nTo: {USER}@example.test\r\n"
            f"Subject: bench message {i}\r\nMessage-ID: <bench{i}@example.test>\r\n").encode()
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n"
    body = line * max(1, size // len(line))
    if i % 10:
        return head + b"\r\n" + body
    return (head + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
            b"--B\r\nContent-Type: text/plain\r\n\r\n" + body + b"--B\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=data.bin\r\n\r\n"
            + b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=\r\n" * 50 + b"--B--\r\n")




def download_all(port: int) -> tuple[int, int, float]:
    """(messages, bytes, seconds) for one session that RETRs every message."""
    client = poplib.POP3("127.0.0.1", port, timeout=120)
    client.user(USER)
    client.pass_(PASSWORD)
    count = client.stat()[0]
    started = time.perf_counter()
    size = 0
    for n in range(1, count + 1):
        size += sum(len(line) + 2 for line in client.retr(n)[1])
    elapsed = time.perf_counter() - started
    client.quit()
    return count, size, elapsed


def fetch_all(port: int) -> tuple[int, int, float]:
    """(messages, bytes, seconds) for one IMAP session that fetches every message."""
    client = imaplib.IMAP4("127.0.0.1", port, timeout=120)
    client.login(USER, PASSWORD)
    count = int(client.select("INBOX", readonly=True)[1][0] or 0)
    started = time.perf_counter()
    size = 0
    for n in range(1, count + 1):
        typ, data = client.fetch(str(n), "(BODY.PEEK[])")
        part = data[0]
        assert typ == "OK" and isinstance(part, tuple)
        size += len(part[1])
    elapsed = time.perf_counter() - started
    client.logout()
    return count, size, elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=300, help="messages in the mailbox")
    ap.add_argument("--size-kib", type=int, default=20, help="size of each message")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, help="append the JSON lines here too")
    args = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    dovecot = Dovecot(protocols=("pop3", "imap")).start()
    try:
        for i in range(args.n):
            dovecot.add_message(message(i, args.size_kib * 1024))
        with tempfile.TemporaryDirectory(prefix="avgate-bench-pop3-") as tmp:
            cfg = Path(tmp, "avgate.toml")
            cfg.write_text(f"""
[scan]
cache = false
[quarantine]
path = "{tmp}/q"
[pop3_proxy]
listen = "127.0.0.1:0"
server = "127.0.0.1:{dovecot.pop3_port}"
server_tls = "off"
[imap_proxy]
listen = "127.0.0.1:0"
server = "127.0.0.1:{dovecot.imap_port}"
server_tls = "off"
""")
            with AvgateServe(cfg) as serve:
                assert serve.proc is not None
                pid = serve.proc.pid
                for group, fn, direct_port, port in (
                        ("pop3", download_all, dovecot.pop3_port, serve.port("pop3_proxy")),
                        ("imap", fetch_all, dovecot.imap_port, serve.port("imap_proxy"))):
                    fn(port)  # warm-up: worker start, page cache
                    for run in range(1, args.runs + 1):
                        count, size, direct_s = fn(direct_port)
                        cpu0 = C.tree_cpu(pid)
                        _, _, proxy_s = fn(port)
                        cpu = C.tree_cpu(pid) - cpu0
                        row = {"group": group, "run": run, "messages": count, "bytes": size,
                               "direct_msg_s": round(count / direct_s, 1),
                               "avgate_msg_s": round(count / proxy_s, 1),
                               "avgate_cpu_ms_per_msg": round(cpu * 1000 / count, 2)}
                        rows.append(row)
                        line = json.dumps(row)
                        print(line, flush=True)
                        if args.out:
                            with args.out.open("a") as f:
                                f.write(line + "\n")
    finally:
        dovecot.stop()
    print("\n| proxy | messages | direct msg/s | through avgate msg/s | avgate CPU ms/msg |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['group'].upper()} (run {row['run']}) | {row['messages']} | "
              f"{row['direct_msg_s']} | {row['avgate_msg_s']} | "
              f"{row['avgate_cpu_ms_per_msg']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
