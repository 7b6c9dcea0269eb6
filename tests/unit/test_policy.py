import pytest
from pydantic import ValidationError

from avgate import config
from avgate.context import Envelope
from avgate.errors import ConfigError
from avgate.policy import Context, Disposition, Policy, PolicySettings
from avgate.result import EngineInfo, Finding, ScanResult, ScanStatus

S = ScanStatus
D = Disposition
SMTP = Context("smtp", listener="in", sender="a@example.org", recipients=("b@example.net",))


def res(status: ScanStatus, *viruses: str, reason: str = "", size: int = 100) -> ScanResult:
    return ScanResult(status, tuple(Finding(v, "embedded", "") for v in viruses), reason=reason,
                      size=size, engines=(EngineInfo("embedded", "1"),))


INFECTED = res(S.INFECTED, "Eicar-Test-Signature")


def pol(**table) -> Policy:
    return Policy.from_settings(PolicySettings.model_validate(table))


def problems(table: dict) -> dict[str, str]:
    """What ``config check`` reports for a ``[policy]`` table: key path → message."""
    with pytest.raises(ConfigError) as ei:
        config.loads(config.render_toml({"policy": table}))
    out = {}
    for line in ei.value.problems:
        where, _, msg = line.removeprefix("<config>: ").partition(": ")
        path, _, lineno = where.partition(" (line ")
        assert lineno, line  # every problem names its line
        out[path] = msg
    return out


@pytest.mark.parametrize(("status", "disp", "reply"), [
    (S.INFECTED, D.REJECT, "550 5.7.1 Virus found: Eicar-Test-Signature (RefID R1)"),
    (S.ERROR, D.TEMPFAIL, "451 4.7.1 Virus scanner unavailable, try again later (RefID R1)"),
    (S.SKIPPED, D.ACCEPT, ""),
    (S.UNKNOWN, D.ACCEPT, ""),
    (S.CLEAN, D.ACCEPT, ""),
])
def test_defaults(status, disp, reply):
    r = res(status, *(["Eicar-Test-Signature"] if status is S.INFECTED else []))
    d = Policy().decide(r, SMTP, refid="R1")
    assert d.disposition is disp and d.reply == reply
    assert d.rule == f"default:{status.value}"
    if disp is D.ACCEPT:
        word = {S.CLEAN: "Clean", S.SKIPPED: "Skipped", S.UNKNOWN: "Unknown"}[status]
        assert dict(d.headers)["X-Virus-Status"] == word
        assert dict(d.headers)["X-Virus-Scanned"].startswith("avgate ")


def test_code_and_text():
    d = Policy().decide(INFECTED, SMTP, refid="R0")
    assert d.code == 550 and d.text == "5.7.1 Virus found: Eicar-Test-Signature (RefID R0)"


@pytest.mark.parametrize(("shortcut", "disp", "quarantine"), [
    ("reject", D.REJECT, False), ("keep", D.ACCEPT, False), ("tempfail", D.TEMPFAIL, False),
    ("discard", D.DISCARD, False), ("quarantine", D.DISCARD, True),
])
def test_virus_action_shortcut(shortcut, disp, quarantine):
    d = pol(virus_action=shortcut).decide(INFECTED, SMTP)
    assert d.disposition is disp and d.quarantine is quarantine
    if shortcut == "keep":
        assert ("X-Virus-Status", "Infected (Eicar-Test-Signature)") in d.headers


@pytest.mark.parametrize(("shortcut", "disp"), [
    ("reject", D.REJECT), ("keep", D.ACCEPT), ("tempfail", D.TEMPFAIL), ("discard", D.DISCARD),
])
def test_failure_action_shortcut(shortcut, disp):
    d = pol(failure_action=shortcut).decide(res(S.ERROR, reason="clamd down"), SMTP)
    assert d.disposition is disp
    if disp is D.REJECT:
        assert d.code // 100 == 5
    if disp is D.ACCEPT:
        assert ("X-Virus-Status", "Error") in d.headers


def test_first_match_wins_and_conditions():
    p = pol(rules=[
        {"name": "outbound-pass", "direction": "outbound", "action": "accept"},
        {"name": "test-virus", "status": "infected", "virus": "Eicar-*",
         "action": ["accept", "quarantine", "tag"]},
        {"name": "all-infected", "status": ["infected"], "action": "reject",
         "reply": "550 5.7.1 FilterVerdictPositive"},
    ])
    assert p.decide(INFECTED, Context("smtp", direction="outbound")).rule == "outbound-pass"
    d = p.decide(INFECTED, SMTP)
    assert d.rule == "test-virus" and d.disposition is D.ACCEPT and d.quarantine
    assert dict(d.headers)["X-Virus-Status"] == "Infected (Eicar-Test-Signature)"
    d = p.decide(res(S.INFECTED, "Win.Trojan.X"), SMTP)
    assert d.rule == "all-infected" and d.reply == "550 5.7.1 FilterVerdictPositive"
    assert p.decide(res(S.CLEAN), SMTP).rule == "default:clean"


@pytest.mark.parametrize(("cond", "ctx", "matches"), [
    ({"frontend": "icap"}, SMTP, False),
    ({"frontend": ["smtp", "milter"]}, SMTP, True),
    ({"listener": "in"}, SMTP, True),
    ({"listener": "submission"}, SMTP, False),
    ({"sender": "*@EXAMPLE.org"}, SMTP, True),
    ({"sender": "*@other.org"}, SMTP, False),
    ({"recipient": "b@*"}, SMTP, True),
    ({"recipient": "c@*"}, SMTP, False),
    ({"size": "0-99"}, SMTP, False),
    ({"size": "100-"}, SMTP, True),
    ({"size": [50, 150]}, SMTP, True),
    ({"status": ["clean", "skipped"]}, SMTP, False),
])
def test_conditions(cond, ctx, matches):
    p = pol(rules=[{"name": "r", "action": "discard", **cond}])
    assert (p.decide(INFECTED, ctx).rule == "r") is matches


def test_discard_quarantine_and_quarantine_only():
    d = pol(rules=[{"action": ["discard", "quarantine"]}]).decide(INFECTED, SMTP)
    assert d.disposition is D.DISCARD and d.quarantine and d.rule == "rule1"
    d = pol(rules=[{"action": "quarantine"}]).decide(INFECTED, SMTP)
    assert d.disposition is D.DISCARD and d.quarantine


def test_replace_prefix_copy():
    p = pol(copy_to="admin@example.org", rules=[
        {"status": "infected", "action": ["replace", "prefix_subject", "copy_to", "tag"],
         "subject_prefix": "[{virus}] "}])
    d = p.decide(INFECTED, SMTP)
    assert d.disposition is D.ACCEPT and d.replace and "{virus}" in d.notice  # per part
    assert d.subject_prefix == "[Eicar-Test-Signature] "
    assert d.copy_to == ("admin@example.org",)
    assert d.actions == ("accept", "replace", "tag", "prefix_subject", "copy_to")


def test_shadow_accepts_but_records():
    d = pol(shadow=True).decide(INFECTED, SMTP)
    assert d.disposition is D.ACCEPT and d.shadow
    assert d.would is not None and d.would.disposition is D.REJECT
    d = pol(rules=[{"status": "infected", "action": "reject", "shadow": True}]).decide(
        INFECTED, SMTP)
    assert d.shadow and d.would.disposition is D.REJECT
    assert pol(rules=[{"status": "clean", "action": "reject", "shadow": True}]).decide(
        INFECTED, SMTP).disposition is D.REJECT


def test_header_styles():
    assert pol(header_style="qhpsi").headers_for(INFECTED) == (("X-QHPSI", "virus found"),)
    assert pol(header_style="qhpsi").headers_for(res(S.CLEAN)) == (("X-QHPSI", "clean"),)
    assert pol(header_style="qhpsi").headers_for(res(S.ERROR)) == (("X-QHPSI", "error"),)
    cv = {"header_style": "clamav-verdict"}
    assert pol(**cv).headers_for(INFECTED) == (("Virus-Test", "True ; Eicar-Test-Signature"),)
    assert pol(**cv).headers_for(res(S.CLEAN)) == (("Virus-Test", "False"),)
    assert pol(**cv, verdict_mode=0).headers_for(INFECTED) == (("Virus-Test", "virus"),)
    assert pol(**cv, verdict_mode=0).headers_for(res(S.CLEAN)) == ()
    assert pol(**cv, verdict_mode=1).headers_for(INFECTED) == (
        ("Virus-Test", "True ; Eicar-Test-Signature"),)
    assert pol(**cv, verdict_mode=1).headers_for(res(S.CLEAN)) == ()
    assert pol(**cv, verdict_mode=3, verdict_text="yes").headers_for(INFECTED) == (
        ("Virus-Test", "yes"),)
    assert pol(**cv, verdict_mode=3).headers_for(res(S.CLEAN)) == (("Virus-Test", "False"),)
    assert pol(**cv, verdict_prefix="X-AV").headers_for(res(S.CLEAN)) == (("X-AV", "False"),)
    custom = pol(headers={"X-Scan": "{status} {virus}"})
    assert custom.headers_for(INFECTED) == (("X-Scan", "infected Eicar-Test-Signature"),)


def test_virus_name_cannot_inject_header_lines():
    r = res(S.INFECTED, "Evil\r\nBcc: victim@example.org")
    for _name, value in pol(virus_action="keep").decide(r, SMTP).headers:
        assert "\r" not in value and "\n" not in value
    assert "\n" not in Policy().decide(r, SMTP).reply


def test_direction():
    p = pol(internal_networks=["10.0.0.0/8", "2001:db8::/32"])
    assert p.direction_for("outbound") == "outbound"
    assert p.direction_for("auto", "10.1.2.3") == "outbound"
    assert p.direction_for("auto", "192.0.2.1") == "inbound"
    assert p.direction_for("auto", "[2001:db8::1]") == "outbound"
    assert p.direction_for("auto", "192.0.2.1", authenticated=True) == "outbound"
    assert p.direction_for("auto", "garbage") == "inbound"


@pytest.mark.parametrize(("table", "fragment"), [
    ({"rules": [{"action": "explode"}]}, "unknown action"),
    ({"rules": [{"action": ["reject", "accept"]}]}, "more than one"),
    ({"rules": [{"action": ["reject", "tag"]}]}, "cannot be combined"),
    ({"rules": [{"action": "reject", "reply": "451 4.7.1 no"}]}, "must be 5xx"),
    ({"rules": [{"action": "tempfail", "reply": "550 x"}]}, "must be 4xx"),
    ({"rules": [{"action": "reject", "reply": "hello"}]}, "not an SMTP reply"),
    ({"rules": [{"status": "dirty", "action": "accept"}]}, "dirty"),
    ({"rules": [{"frontend": "ftp", "action": "accept"}]}, "ftp"),
    ({"rules": [{"size": "big", "action": "accept"}]}, "min-max"),
    ({"rules": [{"colour": "red", "action": "accept"}]}, "unknown key"),
    ({"rules": [{"status": "clean"}]}, "needs an action"),
    ({"verdict_mode": 7}, "0, 1, 2 or 3"),
    ({"internal_networks": ["10.0.0.300/8"]}, "not a network"),
])
def test_validation(table, fragment):
    found = problems(table)
    assert any(fragment in msg for msg in found.values()), found
    with pytest.raises(ValidationError):
        PolicySettings.model_validate(table)


def test_config_file_reports_policy_problems_with_line():
    text = '[policy]\nvirus_action = "reject"\n\n[[policy.rules]]\nstatus = "infected"\n' \
           'action = "launch"\n'
    with pytest.raises(ConfigError) as ei:
        config.loads(text)
    assert any("policy.rules[0].action (line 6)" in m for m in ei.value.problems), ei.value


# -- limits: structural never passes by default; size depends on the front-end ------------
def limited(status: ScanStatus, kind: str, reason: str) -> ScanResult:
    from avgate.result import LimitKind

    return res(status, reason=reason).with_(limit=LimitKind(kind))


@pytest.mark.parametrize("frontend", ["smtp", "milter", "qmail", "icap", "http", "clamd", "cli"])
def test_structural_limit_is_refused_everywhere(frontend):
    r = limited(S.SKIPPED, "structural", "a.zip: file count limit")
    d = Policy().decide(r, Context(frontend), refid="R2")
    assert d.disposition is D.REJECT
    assert d.reply == ("552 5.3.4 Message content not scannable: a.zip: file count limit"
                       " (RefID R2)")
    assert d.rule == "default:structural-limit"


@pytest.mark.parametrize(("frontend", "disp"), [
    ("smtp", D.REJECT), ("milter", D.REJECT), ("qmail", D.REJECT),
    ("icap", D.ACCEPT), ("http", D.ACCEPT), ("clamd", D.ACCEPT), ("cli", D.ACCEPT)])
def test_size_limit_auto(frontend, disp):
    d = Policy().decide(limited(S.SKIPPED, "size", "size limit"), Context(frontend))
    assert d.disposition is disp
    if disp is D.ACCEPT:
        assert dict(d.headers)["X-Virus-Status"] == "Skipped"
    else:
        assert d.reply.startswith("552 5.3.4 Message too large to scan")


def test_limit_actions_configurable():
    p = pol(structural_action="quarantine", size_action="keep")
    d = p.decide(limited(S.UNKNOWN, "structural", "recursion limit"), SMTP)
    assert d.disposition is D.DISCARD and d.quarantine
    assert p.decide(limited(S.SKIPPED, "size", "x"), SMTP).disposition is D.ACCEPT


def test_unknown_without_a_limit_still_passes():
    d = Policy().decide(res(S.UNKNOWN, reason="encrypted"), SMTP)
    assert d.disposition is D.ACCEPT and d.rule == "default:unknown"


def test_rule_matches_limit_and_reason():
    p = pol(rules=[
        {"name": "deep-ok", "limit": "structural", "reason": "*RECURSION*",
         "action": ["accept", "tag"]},
        {"name": "no-limit", "limit": "none", "status": "unknown", "action": "reject"},
    ])
    assert p.decide(limited(S.UNKNOWN, "structural", "x: recursion limit"), SMTP).rule == "deep-ok"
    d = p.decide(limited(S.SKIPPED, "structural", "file count limit"), SMTP)
    assert d.rule == "default:structural-limit"
    assert p.decide(res(S.UNKNOWN, reason="encrypted"), SMTP).rule == "no-limit"


def test_long_reason_is_shortened_in_replies():
    d = Policy().decide(limited(S.SKIPPED, "structural", "n" * 1000), SMTP, refid="R3")
    assert len(d.reply) < 300 and d.reply.endswith("... (RefID R3)")


def test_limit_keys_validated():
    found = problems({"structural_action": "accept", "size_action": "nope",
                      "rules": [{"limit": "huge", "action": "reject"}]})
    assert set(found) == {"policy.structural_action", "policy.size_action",
                          "policy.rules[0].limit"}


def test_own_header_names_cover_every_style():
    p = pol(verdict_prefix="X-Scan-Verdict", headers={"X-Custom-AV": "{status}"})
    names = p.own_header_names()
    assert {"x-virus-status", "x-virus-scanned", "x-qhpsi", "virus-test",
            "x-scan-verdict", "x-custom-av"} <= names


# -- settings: what config show prints, what config check refuses ---------------------------
def test_config_show_prints_the_effective_policy():
    shown = config.defaults().to_dict()["policy"]
    assert shown["virus_action"] == "reject" and shown["failure_action"] == "tempfail"
    assert shown["structural_action"] == "reject" and shown["size_action"] == "auto"
    assert shown["reject_reply"] == "550 5.7.1 Virus found: {virus} (RefID {refid})"
    assert shown["header_style"] == "default" and shown["rules"] == []
    cfg = config.loads('[[policy.rules]]\nname = "r"\nstatus = "infected"\nsize = "1 MiB-"\n'
                       'action = ["accept", "tag"]\nheaders = { X-A = "{virus}" }\n')
    shown = cfg.to_dict()["policy"]
    assert shown["rules"] == [{"name": "r", "status": ["infected"], "size": "1048576-",
                               "action": ["accept", "tag"], "headers": {"X-A": "{virus}"},
                               "copy_to": [], "shadow": False}]
    assert PolicySettings.model_validate(shown) == cfg.policy  # what it shows is valid as is


@pytest.mark.parametrize(("table", "loc", "fragment"), [
    ({"reject_reply": "550 5.7.1 {virus"}, ("reject_reply",), "not a valid template"),
    ({"subject_prefix": "[{0}] "}, ("subject_prefix",), "not a valid template"),
    ({"headers": {"X Bad": "x"}}, ("headers",), "not a header name"),
    ({"headers": {"X-A": 1}}, ("headers",), "header name = \"template\""),
    ({"verdict_prefix": "Virus-Test:"}, ("verdict_prefix",), "not a header name"),
    ({"rules": [{"action": ["accept", "tag"], "headers": {"X-A": "{virus:d}"}}]},
     ("rules", 0, "headers"), "not a valid template"),
    ({"rules": [{"action": "reject", "reply": "550 5.7.1 {}"}]}, ("rules", 0, "reply"),
     "not a valid template"),
    ({"rules": [{"action": "accept", "size": "10-1"}]}, ("rules", 0, "size"), "larger than max"),
    ({"rules": [{"action": "accept", "size": [1, [2]]}]}, ("rules", 0, "size"), "not a size"),
    ({"internal_networks": "10.0.0.0/33"}, ("internal_networks",), "not a network"),
])
def test_templates_and_values_checked_when_loaded(table, loc, fragment):
    """A template that cannot render would fail every decision: refused at load time."""
    with pytest.raises(ValidationError) as ei:
        PolicySettings.model_validate(table)
    errors = ei.value.errors()
    assert [e["loc"] for e in errors] == [loc] and fragment in errors[0]["msg"], errors


def test_rule_defaults_come_from_the_policy():
    p = pol(subject_prefix="[AV] ", notice="removed", rules=[
        {"status": "infected", "action": ["replace", "prefix_subject"]}])
    d = p.decide(INFECTED, SMTP)
    assert d.subject_prefix == "[AV] " and d.notice == "removed" and d.rule == "rule1"


# -- Context: the session, with the transaction's Envelope inside ---------------------------
def test_context_holds_one_envelope():
    env = Envelope("a@example.org", ("b@example.net",), "192.0.2.1", "helo.test", "in")
    ctx = Context("smtp", envelope=env, direction="outbound", authenticated=True, size=5)
    assert (ctx.sender, ctx.recipients, ctx.client_addr, ctx.helo, ctx.listener) == (
        "a@example.org", ("b@example.net",), "192.0.2.1", "helo.test", "in")
    legacy = Context("smtp", listener="in", direction="outbound", sender="a@example.org",
                     recipients=["b@example.net"], client_addr="192.0.2.1", helo="helo.test",
                     authenticated=True, size=5)
    assert legacy == ctx and legacy.envelope == env
    assert Context("http").envelope == Envelope()
    with pytest.raises(TypeError):
        Context("smtp", envelope=env, sender="other@example.org")


def test_one_envelope_type_everywhere():
    from avgate.gateway import Envelope as GatewayEnvelope
    from avgate.quarantine import Envelope as QuarantineEnvelope
    from avgate.quarantine.store import Envelope as StoreEnvelope

    assert GatewayEnvelope is QuarantineEnvelope is StoreEnvelope is Envelope


# -- RefID (Scalix): one id per message, in the header, the replies and the templates --------
def test_refid_header_replies_and_templates():
    p = pol(rules=[{"name": "t", "status": "clean", "action": ["accept", "tag"],
                    "headers": {"X-Ref": "ref={refid}"}}])
    d = p.decide(res(S.CLEAN), SMTP, refid="AAAA2222BBBB3333")
    assert d.refid == "AAAA2222BBBB3333"
    assert d.headers[-1] == ("X-Avgate-RefID", "AAAA2222BBBB3333")
    assert ("X-Ref", "ref=AAAA2222BBBB3333") in d.headers
    assert d.actions == ("accept", "tag") and d.to_dict()["refid"] == "AAAA2222BBBB3333"
    rejected = Policy().decide(INFECTED, SMTP, refid="R9")
    assert rejected.reply.endswith("(RefID R9)") and not rejected.headers
    assert "x-avgate-refid" in Policy().own_header_names()  # forged copies are removed


def test_refid_header_configurable_and_unique_without_one():
    p = pol(refid_header="X-Scalix-RefID")
    d = p.decide(res(S.CLEAN), SMTP)
    assert dict(d.headers)["X-Scalix-RefID"] == d.refid
    assert {"x-scalix-refid", "x-avgate-refid"} <= p.own_header_names()
    none = pol(refid_header="").decide(res(S.CLEAN), SMTP)
    assert none.refid and all(n != "" for n, _ in none.headers)
    assert len({Policy().decide(res(S.CLEAN), SMTP).refid for _ in range(2000)}) == 2000
    assert len(d.refid) == 16 and d.refid.isalnum() and d.refid.isupper()
    assert "policy.refid_header" in problems({"refid_header": "Bad Name"})


# -- replace: only what can be replaced, with the right notice ------------------------------
def test_replace_needs_something_to_replace_and_picks_the_notice():
    p = pol(rules=[{"status": ["clean", "unknown", "infected"],
                    "action": ["accept", "replace"]}])
    assert not p.decide(res(S.CLEAN), SMTP).replace
    unknown = p.decide(res(S.UNKNOWN, reason="encrypted"), SMTP)
    assert unknown.replace and "could not be scanned ({reason})" in unknown.notice
    infected = p.decide(INFECTED, SMTP)
    assert infected.replace and "contained a virus ({virus})" in infected.notice


# -- remove_recipients (Scalix: the milter deletes recipients) ------------------------------
MILTER = Context("milter", sender="a@example.org",
                 recipients=("bob@example.net", "Eve@Outside.test", "carl@outside.test"))


def test_remove_recipients_matches_envelope_recipients():
    p = pol(rules=[{"name": "strip", "frontend": "milter", "status": "infected",
                    "action": ["accept", "remove_recipients", "tag"],
                    "remove_recipients": ["*@outside.test"]}])
    d = p.decide(INFECTED, MILTER)
    assert d.disposition is D.ACCEPT
    assert d.remove_recipients == ("Eve@Outside.test", "carl@outside.test")
    assert "remove_recipients" in d.actions
    # nothing matching: nothing to remove, not claimed in the log
    only_bob = Context("milter", recipients=("bob@example.net",))
    d = p.decide(INFECTED, only_bob)
    assert d.remove_recipients == () and "remove_recipients" not in d.actions
    # removing every recipient leaves nobody to deliver to: a discard
    d = p.decide(INFECTED, Context("milter", recipients=("x@outside.test",)))
    assert d.disposition is D.DISCARD and d.rule == "strip"


def test_remove_recipients_validated():
    found = problems({"rules": [
        {"frontend": "milter", "action": ["accept", "remove_recipients"]},
        {"frontend": "milter", "action": "accept", "remove_recipients": ["*@x"]},
        {"action": ["accept", "remove_recipients"], "remove_recipients": ["*@x"]},
        {"frontend": "milter", "action": ["reject", "remove_recipients"],
         "remove_recipients": ["*@x"]},
    ]})
    assert "needs remove_recipients" in found["policy.rules[0]"]
    assert "does not list remove_recipients" in found["policy.rules[1]"]
    assert 'frontend = "milter"' in found["policy.rules[2]"]
    assert "reject cannot be combined with remove_recipients" in found["policy.rules[3].action"]
