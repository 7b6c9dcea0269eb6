"""Notices (``[notify]``): who is told what, never backscatter, rate limits, templates."""

from __future__ import annotations

import pytest

from avgate.context import Context, Envelope
from avgate.decision import Decision
from avgate.notify import Notifier, NotifySettings, RateLimit
from avgate.policy import Disposition, Policy
from avgate.quarantine.base import Record
from avgate.result import Finding, ScanResult, ScanStatus

INFECTED = ScanResult(ScanStatus.INFECTED, (Finding("Eicar-Test-Signature", "embedded",
                                                    "message/2/eicar.com"),))
ENV = Envelope(sender="alice@example.test", recipients=("bob@example.test",
                                                        "carol@example.test"),
               listener="smtp")


def notifier(**kw: object) -> Notifier:
    return Notifier(NotifySettings.model_validate(kw), Policy())


def ctx(**kw: object) -> Context:
    return Context("smtp", envelope=ENV, **kw)  # type: ignore[arg-type]


REJECT = Decision(Disposition.REJECT, "550 5.7.1 Virus found", refid="R3F1D")
TAGGED = Decision(Disposition.ACCEPT, "", refid="R3F1D")


def test_nothing_by_default() -> None:
    assert not NotifySettings().enabled
    assert notifier().plan(INFECTED, REJECT, ctx(), "q1") == []


def test_admin_notice_carries_the_facts() -> None:
    n = notifier(admin=["virusalert@example.org"], console_url="https://gw.example/console/")
    (notice,) = n.plan(INFECTED, REJECT, ctx(), "20261201-abc")
    assert (notice.kind, notice.to) == ("admin", "virusalert@example.org")
    assert notice.subject == ("[avgate] infected: Eicar-Test-Signature from "
                              "<alice@example.test> (RefID R3F1D)")
    for text in ("bob@example.test, carol@example.test", "message/2/eicar.com",
                 "20261201-abc", "https://gw.example/console/20261201-abc"):
        assert text in notice.body


def test_recipients_only_when_the_message_was_held() -> None:
    n = notifier(recipient=True)
    assert [x.to for x in n.plan(INFECTED, REJECT, ctx(), None)] == [
        "bob@example.test", "carol@example.test"]
    assert [x.to for x in n.plan(INFECTED, TAGGED, ctx(), "q1")] == [
        "bob@example.test", "carol@example.test"]  # accepted but quarantined: held
    assert n.plan(INFECTED, TAGGED, ctx(), None) == []  # delivered (tagged): nothing held


def test_sender_notices_never_go_to_an_unverified_sender() -> None:
    """Virus mail forges its sender: a notice to it is backscatter carrying the news to an
    innocent third party. Only outbound mail or an authenticated session is trusted."""
    n = notifier(sender=True)
    assert n.plan(INFECTED, REJECT, ctx(), "q1") == []
    assert [x.to for x in n.plan(INFECTED, REJECT, ctx(authenticated=True), "q1")] == [
        "alice@example.test"]
    assert [x.to for x in n.plan(INFECTED, REJECT, ctx(direction="outbound"), "q1")] == [
        "alice@example.test"]


def test_statuses_choose_what_is_noticed() -> None:
    unknown = ScanResult(ScanStatus.UNKNOWN, reason="encrypted zip")
    assert notifier(admin=["a@example.org"]).plan(unknown, REJECT, ctx(), "q") == []
    (notice,) = notifier(admin=["a@example.org"], statuses=["infected", "unknown"]).plan(
        unknown, REJECT, ctx(), "q")
    assert "encrypted zip" in notice.body


def test_templates_unknown_names_and_header_safety() -> None:
    n = notifier(admin=["a@example.org"], admin_subject="{virus} {nosuch}\r\nBcc: x@evil",
                 admin_body="{refid} {parts}")
    (notice,) = n.plan(INFECTED, REJECT, ctx(), None)
    assert notice.subject == "Eicar-Test-Signature {nosuch} Bcc: x@evil"  # one line
    assert notice.body == "R3F1D message/2/eicar.com"
    msg = n.message(notice)
    assert b"\r\nBcc:" not in msg and b"\nBcc:" not in msg
    assert b"Auto-Submitted: auto-generated" in msg


def test_forged_sender_with_line_breaks_cannot_inject() -> None:
    env = Envelope(sender="a@example.test\r\nBcc: victim@example.org", recipients=("b@x.test",))
    (notice,) = notifier(admin=["a@example.org"]).plan(
        INFECTED, REJECT, Context("smtp", envelope=env), "q")
    assert "\n" not in notice.subject and b"\nBcc:" not in notifier().message(notice)


def test_rate_limit_is_a_sliding_window_per_key() -> None:
    limit = RateLimit(2, 60, max_keys=2)
    assert [limit.allow("a", t) for t in (0, 1, 2)] == [True, True, False]
    assert limit.allow("a", 60.5)  # the first one left the window
    assert limit.allow("b", 3) and limit.allow("c", 3)  # "a" forgotten (max_keys)
    assert limit.allow("a", 61)


def _record(rid: str, created: float, rcpts: tuple[str, ...], released: float | None = None
            ) -> Record:
    return Record(id=rid, created=created, envelope=Envelope("eve@example.test", rcpts),
                  frontend="smtp", sha256="", size=1, status="infected",
                  viruses=("Eicar-Test-Signature",), result={}, rule="default", actions=(),
                  released=released, refid=f"REF{rid}")


def test_digest_lists_held_mail_per_recipient() -> None:
    n = notifier(admin=["postmaster@example.org"])
    records = [_record("1", 100, ("Bob@example.test", "carol@example.test")),
               _record("2", 200, ("bob@example.test",)),
               _record("3", 300, ("bob@example.test",), released=301),  # released: not held
               _record("4", 10, ("bob@example.test",))]  # before --hours
    notices = {x.to: x for x in n.digest(records, since=50)}
    assert sorted(notices) == ["bob@example.test", "carol@example.test"]
    bob = notices["bob@example.test"].body
    assert bob.index("id 2") < bob.index("id 1") and "id 3" not in bob and "id 4" not in bob
    assert "postmaster@example.org" in bob and "REF2" in bob
    assert notices["bob@example.test"].subject == "Messages held for you: 2"


@pytest.mark.parametrize("bad", [{"rate_limit": 0}, {"rate_period": -1}, {"nosuch": 1},
                                 {"recipient": "yes"}])
def test_settings_are_checked(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"."):
        NotifySettings.model_validate(bad)
    assert NotifySettings.model_validate({"admin": "x@example.org"}).admin == ("x@example.org",)
