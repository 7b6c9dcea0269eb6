"""POP3 proxy pieces without sockets: settings, when a message is tagged, the notice."""

from __future__ import annotations

import email
import email.policy

import pytest

from avgate import config
from avgate.decision import Decision, Disposition
from avgate.errors import ConfigError
from avgate.frontends import pop3 as fe
from avgate.result import Finding, ScanResult, ScanStatus

TAGS = (("X-Virus-Status", "Clean"),)


def test_settings_need_a_server_and_check_it() -> None:
    cfg = config.from_dict({"pop3_proxy": {"server": "mail.example.test:110"}})
    assert cfg.pop3_proxy is not None
    assert cfg.pop3_proxy.server_address == ("mail.example.test", 110)
    assert str(cfg.pop3_proxy.listen) == "127.0.0.1:10110"
    for bad, words in (({}, "server"), ({"server": "nohost"}, "host:port"),
                       ({"server": "a:1", "tls_cert": "c.pem"}, "go together"),
                       ({"server": "a:1", "require_tls": True}, "require_tls"),
                       ({"server": "a:1", "tls": "implicit"}, "implicit"),
                       ({"server": "a:1", "server_tls": "maybe"}, "server_tls"),
                       ({"server": "a:1", "infected": "drop"}, "infected")):
        with pytest.raises(ConfigError, match=words):
            config.from_dict({"pop3_proxy": bad})


@pytest.mark.parametrize(("rule", "status", "tagged"), [
    ("default:clean", ScanStatus.CLEAN, False),  # the built-in default: byte-identical
    ("rule1", ScanStatus.CLEAN, True),  # a rule asked for it
    ("default:unknown", ScanStatus.UNKNOWN, True),  # never passed as if clean
    ("default:size-limit", ScanStatus.SKIPPED, True),
])
def test_when_an_accepted_message_is_tagged(rule: str, status: ScanStatus,
                                            tagged: bool) -> None:
    decision = Decision(Disposition.ACCEPT, headers=TAGS, rule=rule)
    assert fe.tags_to_add(decision, ScanResult(status)) == (TAGS if tagged else ())


def test_notice_is_a_valid_message_naming_the_virus() -> None:
    headers = (b"From: Mallory <m@example.test>\r\nTo: Bob <bob@example.test>\r\n"
               b"Subject: =?utf-8?q?R=C3=A9sum=C3=A9?=\r\nDate: Tue, 1 Dec 2026 11:00:00 +0000"
               b"\r\nX-Odd: \xff\xfe\r\n\r\n")
    result = ScanResult(ScanStatus.INFECTED, findings=(Finding("Eicar-Test-Signature",
                                                                "embedded", "2/eicar.com"),))
    decision = Decision(Disposition.REJECT, "550 5.7.1 Virus found", refid="AAAABBBBCCCCDDDD",
                        refid_header="X-Avgate-RefID")
    data = fe.build_notice(headers, result, decision, sender="postmaster@example.test",
                           proxy="POP3 proxy")
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert not msg.defects
    assert msg["Subject"] == "virus removed"
    assert msg["From"] == "postmaster@example.test" and msg["To"] == "Bob <bob@example.test>"
    assert msg["Date"] == "Tue, 01 Dec 2026 11:00:00 +0000"
    assert msg["X-Avgate-RefID"] == "AAAABBBBCCCCDDDD"
    text, original = [p for p in msg.walk() if not p.is_multipart()]
    assert "Eicar-Test-Signature" in text.get_content()
    assert "Résumé" in text.get_content() and "AAAABBBBCCCCDDDD" in text.get_content()
    assert "From: Mallory <m@example.test>" in original.get_content()


def test_notice_without_usable_headers() -> None:
    data = fe.build_notice(b"\x00garbage without a colon\r\n", ScanResult(
        ScanStatus.INFECTED, findings=(Finding("X", "e", ""),)), Decision(
        Disposition.DISCARD), sender="postmaster@localhost", proxy="POP3 proxy")
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg["Subject"] == "virus removed" and msg["Date"] and msg["To"] is None


def test_reply_text_drops_the_smtp_codes() -> None:
    assert fe.reply_text(Decision(Disposition.TEMPFAIL, "451 4.7.1 Scanner down (RefID X)")) \
        == "Scanner down (RefID X)"
    assert fe.reply_text(Decision(Disposition.REJECT, "550 Virus found")) == "Virus found"


def test_config_show_output_loads_back() -> None:
    cfg = config.from_dict({"pop3_proxy": {"server": "127.0.0.1:110", "tls_cert": "c.pem",
                                           "tls_key": "k.pem", "tls": "implicit"},
                            "imap_proxy": {"server": "127.0.0.1:143"}})
    again = config.loads(config.render_toml(cfg.to_dict()))
    for name in ("pop3_proxy", "imap_proxy"):
        assert again.to_dict()[name] == cfg.to_dict()[name]
