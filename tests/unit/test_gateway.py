"""Gateway.process: scan → policy → quarantine → log, with the real embedded engine."""

import json

import pytest

from avgate import config
from avgate.gateway import Envelope, Gateway
from avgate.observability import ScanLog
from avgate.policy import Context, Disposition
from avgate.spool import Spool
from tests.corpus import EICAR


def gw(tmp_path, policy: str = "") -> Gateway:
    cfg = config.loads(f'[quarantine]\npath = "{tmp_path}/q"\n[log]\npath = "{tmp_path}/log"\n'
                       + policy)
    return Gateway.from_config(cfg, log=ScanLog(str(tmp_path / "log")))


CTX = Context("smtp", listener="in", sender="a@example.org", recipients=("b@example.net",))


async def test_infected_rejected_and_logged(tmp_path):
    g = gw(tmp_path)
    out = await g.process(Spool.from_bytes(EICAR), CTX, ids={"queue_id": "Q1"})
    assert out.decision.disposition is Disposition.REJECT
    assert out.decision.reply == (
        f"550 5.7.1 Virus found: Eicar-Test-Signature (RefID {out.refid})")
    assert out.quarantine_id is None
    event = json.loads((tmp_path / "log").read_text().splitlines()[-1])
    assert event["status"] == "infected" and event["ids"] == {"queue_id": "Q1"}
    assert event["rule"] == "default:infected" and event["actions"] == ["reject"]
    assert event["findings"][0]["name"] == "Eicar-Test-Signature"


async def test_quarantine_writes_store_with_envelope(tmp_path):
    g = gw(tmp_path, '[policy]\nvirus_action = "quarantine"\n')
    env = Envelope("a@example.org", ("b@example.net",), "192.0.2.1", "helo.test", "in")
    out = await g.process(Spool.from_bytes(EICAR + b"\n"), Context("smtp", envelope=env))
    assert out.decision.disposition is Disposition.DISCARD and out.quarantine_id
    rec = g.store.get(out.quarantine_id)
    assert rec.envelope == env and rec.viruses == ("Eicar-Test-Signature",)
    with g.store.open_raw(out.quarantine_id) as f:
        assert f.read() == EICAR + b"\n"


async def test_quarantine_failure_becomes_tempfail(tmp_path, monkeypatch):
    g = gw(tmp_path, '[policy]\nvirus_action = "quarantine"\n')

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(g.store), "put", broken)
    out = await g.process(Spool.from_bytes(EICAR), CTX)
    assert out.decision.disposition is Disposition.TEMPFAIL
    assert out.decision.code == 451 and out.quarantine_id is None
    assert "quarantine write failed" in (tmp_path / "log").read_text()


@pytest.mark.parametrize("data", [b"hello\n", b""])
async def test_clean_accepted_with_headers(tmp_path, data):
    out = await gw(tmp_path).process(Spool.from_bytes(data), CTX)
    assert out.decision.disposition is Disposition.ACCEPT
    assert ("X-Virus-Status", "Clean") in out.decision.headers


async def test_quarantine_keeps_the_context_envelope(tmp_path):
    """The Context carries the transaction: no second envelope to fill by hand."""
    g = gw(tmp_path, '[policy]\nvirus_action = "quarantine"\n')
    env = Envelope("a@example.org", ("b@example.net",), "192.0.2.1", "helo.test", "in")
    out = await g.process(Spool.from_bytes(EICAR), Context("smtp", envelope=env))
    assert out.quarantine_id and g.store.get(out.quarantine_id).envelope == env


async def test_refid_in_log_reply_and_header(tmp_path):
    g = gw(tmp_path)
    out = await g.process(Spool.from_bytes(EICAR), CTX)
    clean = await g.process(Spool.from_bytes(b"hello\n"), CTX)
    infected_line, clean_line = (json.loads(x) for x in
                                 (tmp_path / "log").read_text().splitlines()[-2:])
    assert out.refid and out.refid != clean.refid
    assert infected_line["refid"] == out.refid and out.refid in out.decision.reply
    assert clean_line["refid"] == clean.refid
    assert ("X-Avgate-RefID", clean.refid) in clean.decision.headers
    assert clean_line["actions"] == ["accept", "tag"]


async def test_quarantine_failure_reply_names_the_refid(tmp_path, monkeypatch):
    g = gw(tmp_path, '[policy]\nvirus_action = "quarantine"\n')
    monkeypatch.setattr(type(g.store), "put", lambda *a, **k: (_ for _ in ()).throw(OSError()))
    out = await g.process(Spool.from_bytes(EICAR), CTX)
    assert out.decision.reply.endswith(f"(RefID {out.refid})")


@pytest.mark.parametrize("frontend", ["clamd", "http", "icap", "cli"])
async def test_no_smtp_reply_in_other_protocols_log_lines(tmp_path, frontend):
    await gw(tmp_path).process(Spool.from_bytes(EICAR), Context(frontend))
    event = json.loads((tmp_path / "log").read_text().splitlines()[-1])
    assert event["actions"] == ["reject"] and "reply" not in event


async def test_deferred_line_records_what_the_frontend_did(tmp_path):
    g = gw(tmp_path, '[[policy.rules]]\nstatus = "infected"\naction = ["accept", "replace"]\n')
    out = await g.process(Spool.from_bytes(EICAR), CTX, defer_log=True)
    assert not (tmp_path / "log").exists() or not (tmp_path / "log").read_text()
    g.log_outcome(out, actions=("reject",), reply="550 5.7.1 cannot replace")
    g.log_outcome(out, actions=("accept",))  # written once only
    (line,) = (tmp_path / "log").read_text().splitlines()
    event = json.loads(line)
    assert event["actions"] == ["reject"] and event["reply"] == "550 5.7.1 cannot replace"


async def test_icap_log_line_has_icap_outcome(tmp_path):
    """ICAP lines say what ICAP did: status, the HTTP status of the page, block page or not."""
    from avgate.protocols import icap as proto
    from tests.integration.icap.test_server import OPTIONS_CLOSE, exchange, make_server, respmod

    events: list[dict] = []

    class Log:
        debug_enabled = False  # what front-ends test before a debug line
        def log(self, event, level="info"):
            events.append(event)

    g, srv = await make_server()
    g.log = Log()  # type: ignore[assignment]
    try:
        for body, allow_204 in ((EICAR, True), (b"harmless", True), (b"harmless", False)):
            await exchange(srv, respmod(body, allow_204=allow_204) + proto.encode_body(body)
                           + OPTIONS_CLOSE)
    finally:
        await srv.aclose()
        await g.close()
    infected, clean204, clean200 = (e for e in events if e["event"] == "scan")
    assert "reply" not in infected and infected["actions"] == ["reject"]
    assert (infected["icap_status"], infected["http_status"], infected["block_page"]) == (
        200, 403, True)
    assert infected["refid"]
    assert clean204["icap_status"] == 204 and "http_status" not in clean204
    assert clean204["actions"] == ["accept"] and clean204["block_page"] is False
    assert clean200["icap_status"] == 200 and clean200["answered"] is True
