"""Release and reports over SMTP to a real aiosmtpd sink on loopback."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest

from avgate.errors import NotFound, QuarantineError
from avgate.quarantine import (
    AlreadyReleased,
    Envelope,
    InvalidAddress,
    QuarantineStore,
    parse_address,
    parse_addresses,
    parse_sender,
    release,
    report,
)
from avgate.quarantine.release import parse_hostport
from avgate.result import Finding, ScanResult, ScanStatus

from .conftest import Sink, free_port

MSG = (b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: hello\r\n\r\n"
       b"body line\r\n.leading dot\r\n8bit \xe9\xff\r\n")
ENV = Envelope("alice@example.org", ("bob@example.net", "carol@example.net"), "192.0.2.1",
               "helo.example", "smtp")
RESULT = ScanResult(ScanStatus.INFECTED, findings=(Finding("Eicar-Test-Signature", "e", "1"),))


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = QuarantineStore(tmp_path / "q")
    yield s
    s.close()


async def test_release_with_original_envelope(store: QuarantineStore, smtp_sink: Sink) -> None:
    rid = store.put(MSG, ENV, RESULT)
    rec = await release(store, rid, smtp_sink.next_hop)
    assert len(smtp_sink.received) == 1
    got = smtp_sink.received[0]
    assert got.sender == "alice@example.org"
    assert got.recipients == ["bob@example.net", "carol@example.net"]
    assert got.data == MSG
    assert rec.released is not None
    assert rec.released_to == ("bob@example.net", "carol@example.net")


async def test_second_release_refused_unless_forced(store: QuarantineStore,
                                                    smtp_sink: Sink) -> None:
    rid = store.put(MSG, ENV, RESULT)
    await release(store, rid, smtp_sink.next_hop)
    with pytest.raises(AlreadyReleased):
        await release(store, rid, smtp_sink.next_hop)
    assert len(smtp_sink.received) == 1
    await release(store, rid, smtp_sink.next_hop, to=["admin@example.org"], force=True)
    assert len(smtp_sink.received) == 2
    assert smtp_sink.received[1].recipients == ["admin@example.org"]
    assert smtp_sink.received[1].data == MSG
    assert store.get(rid).released_to == ("admin@example.org",)


async def test_release_unreachable_hop_is_error_and_not_marked(store: QuarantineStore) -> None:
    rid = store.put(MSG, ENV, RESULT)
    with pytest.raises(QuarantineError):
        await release(store, rid, f"127.0.0.1:{free_port()}")
    assert store.get(rid).released is None


async def test_release_unknown_id(store: QuarantineStore, smtp_sink: Sink) -> None:
    with pytest.raises(NotFound):
        await release(store, "20240101T000000000000Z-0123456789abcdef", smtp_sink.next_hop)


async def test_report_attaches_original_verbatim(store: QuarantineStore,
                                                 smtp_sink: Sink) -> None:
    raw = b"Subject: fp\n\nline one\nno final newline"
    rid = store.put(raw, ENV, RESULT)
    await report(store, rid, "false-positive", smtp_sink.next_hop, "avgate@example.org",
                 "lab@example.com")
    got = smtp_sink.received[0]
    assert got.sender == "avgate@example.org"
    assert got.recipients == ["lab@example.com"]
    msg = email.message_from_bytes(got.data, policy=email.policy.default)
    assert "false positive" in str(msg["Subject"])
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/rfc822"]
    assert parts[1].get_content_disposition() == "attachment"
    assert rid in parts[0].get_content()
    # the attachment carries the original (SMTP turned its LFs into CRLFs)
    assert raw.replace(b"\n", b"\r\n") in got.data
    inner = parts[1].get_content()
    assert inner["Subject"] == "fp"


def test_parse_hostport() -> None:
    assert parse_hostport("127.0.0.1:10026") == ("127.0.0.1", 10026)
    assert parse_hostport("[::1]:25") == ("::1", 25)
    assert parse_hostport("mx.example") == ("mx.example", 25)
    with pytest.raises(QuarantineError):
        parse_hostport("host:port")


# -- addresses: one parser for `to`, the stored envelope and released_to (issue 11, §5) --
@pytest.mark.parametrize("good", [
    "bob@example.net", "<bob@example.net>", "first.last+tag@sub.example.co.uk",
    "o'brien@example.ie", '"john doe"@example.org', '"a@b"@example.org', "root@localhost",
    "user@[192.0.2.1]", "user@[IPv6:2001:db8::1]", "Postmaster", "jörg@bücher.example",
    "x@xn--bcher-kva.example",
])
def test_parse_address_accepts_mailboxes(good: str) -> None:
    assert parse_address(good) == good.removeprefix("<").removesuffix(">")


@pytest.mark.parametrize("bad", [
    "victim@example.org\r\nRCPT TO:<attacker@evil.example>", "a@b\n", "a\x00@b.example",
    "a@b.example\x1b[2J", "a\x7f@b.example", "a\x85@b.example", "a\u2028@b.example",
    "a\u202e@b.example", "", "<>", "nobody", "@example.org", "bob@", "bob@@example.org",
    "bob@exa mple.org", "bob smith@example.org", "bob@-example.org", "bob@example..org",
    ".bob@example.org", "bob.@example.org", "bob@[300.1.1.1]", "bob@[IPv6:zz]",
    "Bob <bob@example.org>", "a@b.example, c@d.example", "x" * 65 + "@example.org",
    "bob@" + "a." * 130 + "example", '"unterminated@example.org',
])
def test_parse_address_refuses_junk(bad: str) -> None:
    with pytest.raises(InvalidAddress) as info:
        parse_address(bad)
    assert "\r" not in str(info.value) and "\n" not in str(info.value)  # repr'd in messages


def test_parse_sender_and_lists() -> None:
    assert parse_sender("") == "" and parse_sender("<>") == ""
    assert parse_sender("<alice@example.org>") == "alice@example.org"
    with pytest.raises(InvalidAddress):
        parse_sender("alice@example.org\r\nDATA")
    with pytest.raises(InvalidAddress):
        parse_addresses([])
    with pytest.raises(InvalidAddress):
        parse_addresses(["a@b.example"] * 3, limit=2)


async def test_release_refuses_a_crlf_to_and_stores_nothing(store: QuarantineStore,
                                                            smtp_sink: Sink) -> None:
    rid = store.put(MSG, ENV, RESULT)
    with pytest.raises(InvalidAddress):
        await release(store, rid, smtp_sink.next_hop,
                      to=["admin@example.org\r\nRCPT TO:<attacker@evil.example>"])
    assert smtp_sink.received == []
    rec = store.get(rid)
    assert rec.released is None and rec.released_to == ()


async def test_release_refuses_junk_in_the_stored_envelope(store: QuarantineStore,
                                                           smtp_sink: Sink) -> None:
    bad_rcpt = store.put(MSG, Envelope("alice@example.org", ("bob@example.net\r\nX",)), RESULT)
    bad_sender = store.put(MSG, Envelope("a\x1b@example.org", ("bob@example.net",)), RESULT)
    for rid in (bad_rcpt, bad_sender):
        with pytest.raises(InvalidAddress):
            await release(store, rid, smtp_sink.next_hop)
    assert smtp_sink.received == []
    # an explicit, valid `to` still releases a record whose stored recipient is junk
    rec = await release(store, bad_rcpt, smtp_sink.next_hop, to=["<admin@example.org>"])
    assert rec.released_to == ("admin@example.org",)
    assert smtp_sink.received[0].recipients == ["admin@example.org"]


def test_mark_released_never_stores_junk(store: QuarantineStore) -> None:
    rid = store.put(MSG, ENV, RESULT)
    with pytest.raises(InvalidAddress):
        store.mark_released(rid, ["a@b.example\r\nRCPT TO:<c@d.example>"])
    assert store.get(rid).released is None
    store.mark_released(rid, ["<a@b.example>"])
    assert store.get(rid).released_to == ("a@b.example",)
