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
    assert out.decision.reply == "550 5.7.1 Virus found: Eicar-Test-Signature"
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
