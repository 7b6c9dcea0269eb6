# ruff: noqa: F811 - pytest fixtures imported from the SMTP tests are parameters here
"""A sender's own verdict headers never reach the recipient (issue 11, section 5).

Found before the fix: on SMTP and qmail a message arriving with ``X-Virus-Status: Clean``
(or ``X-QHPSI: clean``, ``Virus-Test: False``) kept it beside ours, so a filter or reader
that takes the first (or last) copy saw the sender's word, even on infected mail delivered
tagged. Now every incoming copy of every header avgate may write
(``Policy.own_header_names()``: all styles, custom templates) is removed before ours are
added, whatever the message's spool (memory or file) and whatever the edit (tag, subject
prefix, part replacement). Only the header block is touched: a body line looking like a
verdict header stays. Samples are generated here.
"""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

from tests.integration.smtp.conftest import (  # noqa: F401 - fixtures
    EICAR,
    Sink,
    StartAvgate,
    avgate,
    make_message,
    send_smtplib,
    sink,
)
from tests.integration.smtp.test_qmail import qmail_env, run_qq, write_config  # noqa: F401

FORGED = (b"X-Virus-Status: Clean\r\n"
          b"X-QHPSI: clean\r\n"
          b"Virus-Test: False\r\n"
          b"X-Virus-Status: Clean,\r\n\tfolded over two lines\r\n")
# obsolete syntax (RFC 5322 4.5.8), which some readers take as a header; Python's parser
# ends the header block there (so it goes last, and not in messages with attachments)
OBSOLETE = b"x-virus-scanned :  by a friend\r\n"
BODY_LINE = b"X-Virus-Status: Clean (this line is body text)\r\n"
OWN = ("x-virus-status", "x-virus-scanned", "x-qhpsi", "virus-test")


def forged_message(attachment: bytes | None = None, size: int = 0) -> bytes:
    body = BODY_LINE + b"filler line\r\n" * (size // 13)
    extra = FORGED + (OBSOLETE if attachment is None else b"")
    return make_message("forged", body=body, attachment=attachment, extra_headers=extra)


def verdict_headers(data: bytes) -> list[tuple[str, str]]:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    return [(k.lower(), " ".join(str(v).split())) for k, v in msg.items() if k.lower() in OWN]


async def deliver(gw_port: int, message: bytes) -> tuple[int, bytes]:
    import asyncio

    return await asyncio.to_thread(send_smtplib, gw_port, message)


async def test_smtp_clean_mail_carries_only_our_verdict(avgate: StartAvgate,
                                                        sink: Sink) -> None:
    gw = await avgate(listener={"next_hop": sink.address})
    code, _ = await deliver(gw.port, forged_message())
    assert code == 250
    [m] = sink.messages
    got = verdict_headers(m.data)
    assert [k for k, _ in got] == ["x-virus-scanned", "x-virus-status"], got
    assert got[1] == ("x-virus-status", "Clean")
    assert BODY_LINE in m.data  # the body is not touched
    assert b"folded over two lines" not in m.data


async def test_smtp_infected_mail_kept_tagged_says_infected_only(avgate: StartAvgate,
                                                                 sink: Sink) -> None:
    gw = await avgate(listener={"next_hop": sink.address}, policy={"virus_action": "keep"})
    code, _ = await deliver(gw.port, forged_message(attachment=EICAR))
    assert code == 250
    [m] = sink.messages
    got = dict(verdict_headers(m.data))
    assert len(verdict_headers(m.data)) == 2
    assert got["x-virus-status"].startswith("Infected (Eicar")


async def test_smtp_file_spool_and_subject_prefix(avgate: StartAvgate, sink: Sink) -> None:
    """A message over the spool's memory threshold is relayed from its file in pieces; the
    removal must work there too, and in the edit path (prefix_subject)."""
    gw = await avgate(listener={"next_hop": sink.address}, scan={"spool_memory": 4096})
    code, _ = await deliver(gw.port, forged_message(size=600_000))
    assert code == 250
    gw2 = await avgate(listener={"next_hop": sink.address},
                       policy={"virus_action": "keep",
                               "rules": [{"status": "infected",
                                          "action": ["accept", "tag", "prefix_subject"]}]})
    code, _ = await deliver(gw2.port, forged_message(attachment=EICAR))
    assert code == 250
    big, prefixed = sink.messages
    assert [k for k, _ in verdict_headers(big.data)] == ["x-virus-scanned", "x-virus-status"]
    assert big.data.count(b"filler line\r\n") == 600_000 // 13
    assert [k for k, _ in verdict_headers(prefixed.data)] == ["x-virus-scanned",
                                                              "x-virus-status"]
    assert b"Subject: ***VIRUS*** forged" in prefixed.data


async def test_smtp_custom_header_names_are_ours_too(avgate: StartAvgate, sink: Sink) -> None:
    gw = await avgate(listener={"next_hop": sink.address},
                      policy={"headers": {"X-Scan-Verdict": "{status}"}})
    code, _ = await deliver(gw.port, make_message(
        "custom", extra_headers=b"X-Scan-Verdict: clean\r\nX-Virus-Status: Clean\r\n"))
    assert code == 250
    [m] = sink.messages
    assert m.data.count(b"X-Scan-Verdict:") == 1 and b"X-Virus-Status" not in m.data


def test_qmail_forged_qhpsi_is_replaced(qmail_env: Path) -> None:
    code, err = run_qq(qmail_env, write_config(qmail_env), forged_message(attachment=EICAR))
    assert code == 0, err
    queued = (qmail_env / "out/msg").read_bytes()
    assert verdict_headers(queued) == [("x-qhpsi", "virus found")]
    assert BODY_LINE in queued


def test_qmail_clean_mail_has_only_our_verdict(qmail_env: Path) -> None:
    code, err = run_qq(qmail_env, write_config(qmail_env), forged_message())
    assert code == 0, err
    queued = (qmail_env / "out/msg").read_bytes()
    assert verdict_headers(queued) == [("x-qhpsi", "clean")]
    assert queued.startswith(b"X-QHPSI: clean\r\nX-Avgate-RefID: ")  # then our RefID
    assert queued.split(b"\r\n", 2)[2].startswith(b"From: Alice")
