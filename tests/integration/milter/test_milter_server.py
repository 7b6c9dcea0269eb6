"""The milter front-end over a real socket, driven by our codec as the MTA: every decision."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import stat
import struct
from pathlib import Path
from typing import Any

import pytest

from avgate import config as config_mod
from avgate.frontends.listen import ListenOptions
from avgate.frontends.milter import MilterListener, start
from avgate.gateway import Gateway
from avgate.protocols import milter as m
from avgate.quarantine import QuarantineStore
from tests.helpers import async_wait_until

from .conftest import (
    EICAR,
    POSTFIX_ACTIONS,
    MilterFactory,
    MtaClient,
    make_message,
    split_message,
)

pytestmark = pytest.mark.timeout(60)


async def one(port: int | str, msg: bytes, **kw: object) -> object:
    client = await MtaClient.connect(port)
    try:
        await client.connect_event()
        return await client.message(msg, **kw)  # type: ignore[arg-type]
    finally:
        await client.close()


async def test_negotiation_asks_only_for_what_it_needs(milter: MilterFactory) -> None:
    srv = await milter()
    client = await MtaClient.connect(srv.port)
    neg = client.negotiated
    assert neg is not None and neg.version == 6
    for flag in (m.SMFIF_ADDHDRS, m.SMFIF_CHGHDRS, m.SMFIF_CHGBODY, m.SMFIF_ADDRCPT,
                 m.SMFIF_DELRCPT, m.SMFIF_QUARANTINE):
        assert neg.actions & flag
    assert not neg.actions & m.SMFIF_CHGFROM
    for flag in (m.SMFIP_NR_CONN, m.SMFIP_NR_HELO, m.SMFIP_NR_MAIL, m.SMFIP_NR_RCPT,
                 m.SMFIP_NR_HDR, m.SMFIP_NR_BODY, m.SMFIP_NODATA, m.SMFIP_NOEOH,
                 m.SMFIP_NOUNKNOWN):
        assert neg.protocol & flag
    assert not neg.protocol & (m.SMFIP_NOHDRS | m.SMFIP_NOBODY | m.SMFIP_NOMAIL)
    assert dict(neg.macros)[m.SMFIM_EOM] == "i"
    await client.close()


async def test_clean_mail_accepted_with_verdict_headers(milter: MilterFactory) -> None:
    srv = await milter()
    res = await one(srv.port, make_message("clean one"))
    assert isinstance(res.final, m.Accept)  # type: ignore[attr-defined]
    hdrs = res.added_headers  # type: ignore[attr-defined]
    assert hdrs["X-Virus-Status"] == "Clean"
    assert hdrs["X-Virus-Scanned"].startswith("avgate")
    # header values carry their leading space when HDR_LEADSPC was negotiated
    assert all(h.value.startswith(" ") for h in res.of(m.AddHeader))  # type: ignore[attr-defined]


async def test_existing_verdict_header_is_changed_not_duplicated(milter: MilterFactory) -> None:
    srv = await milter()
    spoofed = make_message("spoof", extra_headers=b"X-Virus-Status: Clean\r\n"
                           b"x-virus-status: Clean too\r\n")
    res = await one(srv.port, spoofed, )
    changes = res.of(m.ChangeHeader)  # type: ignore[attr-defined]
    assert [(c.index, c.name, c.value.strip()) for c in changes] == [
        (2, "X-Virus-Status", ""), (1, "X-Virus-Status", "Clean")]
    assert "X-Virus-Status" not in res.added_headers  # type: ignore[attr-defined]


async def test_forged_headers_of_other_styles_are_deleted(milter: MilterFactory) -> None:
    """Incoming copies of every header avgate may write are removed, not only of those this
    decision writes (as the SMTP and qmail front-ends do): a forged qmail-style X-QHPSI or a
    Sun-style verdict must not reach the recipient beside the real verdict."""
    srv = await milter()
    forged = make_message("forged", extra_headers=b"X-QHPSI: clean\r\nVirus-Test: clean\r\n"
                          b"virus-test: clean again\r\nX-Other: kept\r\n")
    res = await one(srv.port, forged)
    assert isinstance(res.final, m.Accept)  # type: ignore[attr-defined]
    deleted = sorted((c.name.lower(), c.index) for c in res.of(m.ChangeHeader)  # type: ignore[attr-defined]
                     if not c.value.strip())
    assert deleted == [("virus-test", 1), ("virus-test", 2), ("x-qhpsi", 1)]
    assert res.added_headers["X-Virus-Status"] == "Clean"  # type: ignore[attr-defined]


async def test_eicar_rejected_with_policy_text(milter: MilterFactory) -> None:
    srv = await milter()
    res = await one(srv.port, make_message("virus", attachment=EICAR, name="eicar.com"))
    final = res.final  # type: ignore[attr-defined]
    assert isinstance(final, m.ReplyCode)
    assert final.reply.startswith("550 5.7.1 Virus found: Eicar-Test-Signature (RefID ")
    assert res.mods == []  # type: ignore[attr-defined]


async def test_reply_with_percent_is_escaped_on_the_wire(milter: MilterFactory) -> None:
    srv = await milter(policy={"reject_reply": "550 5.7.1 100% virus: {virus}"})
    client = await MtaClient.connect(srv.port)
    await client.connect_event()
    res = await client.message(make_message("pct", attachment=EICAR))
    assert res.final == m.ReplyCode("550 5.7.1 100% virus: Eicar-Test-Signature")
    await client.close()


async def test_scanner_down_tempfails(milter: MilterFactory) -> None:
    srv = await milter(engines=[{"type": "clamd", "name": "clamd",
                                 "servers": ["tcp://127.0.0.1:9"], "connect_timeout": 1}])
    res = await one(srv.port, make_message("scanner down"))
    final = res.final  # type: ignore[attr-defined]
    assert isinstance(final, m.ReplyCode)
    assert final.reply.startswith("451 4.7.1 ")


async def test_discard(milter: MilterFactory) -> None:
    srv = await milter(policy={"virus_action": "discard"})
    res = await one(srv.port, make_message("discard", attachment=EICAR))
    assert isinstance(res.final, m.Discard)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("mode", "in_mta", "in_store"), [
    ("mta", True, False), ("store", False, True), ("both", True, True)])
async def test_quarantine_modes(milter: MilterFactory, tmp_path: Path, mode: str,
                                in_mta: bool, in_store: bool) -> None:
    srv = await milter(milter={"quarantine": mode}, policy={"virus_action": "quarantine"})
    res = await one(srv.port, make_message(f"q {mode}", attachment=EICAR))
    if in_mta:
        assert isinstance(res.final, m.Accept)  # type: ignore[attr-defined]
        (q,) = res.of(m.Quarantine)  # type: ignore[attr-defined]
        assert "Eicar-Test-Signature" in q.reason
    else:
        assert isinstance(res.final, m.Discard)  # type: ignore[attr-defined]
        assert not res.of(m.Quarantine)  # type: ignore[attr-defined]
    records = QuarantineStore(tmp_path / "quarantine").list()
    assert len(records) == (1 if in_store else 0)
    if in_store:
        rec = records[0]
        assert rec.envelope.sender == "alice@example.test"
        assert rec.envelope.recipients == ("bob@example.test",)
        assert rec.envelope.client_addr == "192.0.2.10"
        assert rec.frontend == "milter"
        if in_mta:
            assert rec.id in q.reason


async def test_replace_infected_part(milter: MilterFactory) -> None:
    srv = await milter(policy={"rules": [
        {"name": "strip", "status": "infected", "action": ["replace", "tag"]}]})
    msg = make_message("replace me", attachment=EICAR, name="eicar.com")
    res = await one(srv.port, msg)
    assert isinstance(res.final, m.Accept)  # type: ignore[attr-defined]
    body = res.new_body  # type: ignore[attr-defined]
    assert body and EICAR not in body
    assert b"eicar.com" in body and b"Eicar-Test-Signature" in body
    assert b"Hello there." in body  # the clean part stays
    assert all(len(x.chunk) <= 65535 for x in res.of(m.ReplaceBody))  # type: ignore
    assert "Infected" in res.added_headers["X-Virus-Status"]  # type: ignore[attr-defined]
    # the rewritten message scans clean
    full = msg.partition(b"\r\n\r\n")[0] + b"\r\n\r\n" + body
    srv2 = await milter()
    res2 = await one(srv2.port, full)
    assert res2.added_headers["X-Virus-Status"] == "Clean"  # type: ignore[attr-defined]


async def test_subject_prefix_and_copy_to(milter: MilterFactory) -> None:
    srv = await milter(policy={"rules": [
        {"name": "keep", "status": "infected",
         "action": ["accept", "prefix_subject", "copy_to", "tag"],
         "copy_to": ["virus-admin@example.test"]}]})
    res = await one(srv.port, make_message("look at this", attachment=EICAR))
    assert isinstance(res.final, m.Accept)  # type: ignore[attr-defined]
    (subj,) = [c for c in res.of(m.ChangeHeader) if c.name == "Subject"]  # type: ignore
    assert subj.index == 1 and subj.value == " ***VIRUS*** look at this"
    assert res.of(m.AddRecipient) == [  # type: ignore[attr-defined]
        m.AddRecipient("<virus-admin@example.test>")]


async def test_direction_outbound_when_authenticated(milter: MilterFactory) -> None:
    srv = await milter(policy={"rules": [
        {"name": "out", "direction": "outbound", "action": ["accept", "tag"],
         "headers": {"X-Direction": "outbound"}},
        {"name": "in", "direction": "inbound", "action": ["accept", "tag"],
         "headers": {"X-Direction": "inbound"}}]})
    client = await MtaClient.connect(srv.port)
    await client.connect_event()
    res = await client.message(make_message("from a user"), auth="alice")
    assert res.added_headers["X-Direction"] == "outbound"
    res = await client.message(make_message("from outside"))
    assert res.added_headers["X-Direction"] == "inbound"
    await client.close()


async def test_several_messages_and_abort_on_one_connection(milter: MilterFactory,
                                                            tmp_path: Path) -> None:
    srv = await milter()
    client = await MtaClient.connect(srv.port)
    await client.connect_event()
    r1 = await client.message(make_message("first", attachment=EICAR))
    assert isinstance(r1.final, m.ReplyCode)
    # a message aborted half way: its headers must not leak into the next one
    await client.step(m.Mail(("<x@example.test>",)))
    await client.step(m.Header(b"Subject", b" aborted"))
    await client.step(m.Body(EICAR))
    await client.send(m.Abort())
    r2 = await client.message(make_message("second"))
    assert isinstance(r2.final, m.Accept)
    assert r2.added_headers["X-Virus-Status"] == "Clean"
    r3 = await client.message(make_message("third", attachment=EICAR))
    assert isinstance(r3.final, m.ReplyCode)
    await client.close()


async def test_queue_id_is_logged(milter: MilterFactory, tmp_path: Path) -> None:
    srv = await milter()
    events: list[dict[str, object]] = []

    class Log:
        debug_enabled = False  # what front-ends test before a debug line
        def log(self, event: dict[str, object], level: str = "info") -> None:
            events.append(event)

    srv.gateway.log = Log()  # type: ignore[assignment]
    await one(srv.port, make_message("logged"), queue_id="3Q1D")
    scans = [e for e in events if e["event"] == "scan"]
    assert scans and scans[0]["ids"]["queue_id"] == "3Q1D"  # type: ignore[index]


async def test_large_message_spools_to_disk(milter: MilterFactory) -> None:
    srv = await milter(milter={"spool_memory": 4096})
    body = (b"x" * 76 + b"\r\n") * 20000 + b"\r\n"  # ~1.5 MiB, many body chunks
    msg = make_message("big", body=body, attachment=EICAR)
    res = await one(srv.port, msg)
    assert isinstance(res.final, m.ReplyCode)  # EICAR after 1.5 MiB is still found


async def test_unix_socket_listener(milter: MilterFactory, tmp_path: Path) -> None:
    path = tmp_path / "milter.sock"
    srv = await milter(milter={"listen": f"unix:{path}"})
    assert srv.describe() == f"unix:{path}"
    # 0660 by default, never world-writable: give the MTA's user the socket's group
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    res = await one(str(path), make_message("unix"))
    assert isinstance(res.final, m.Accept)  # type: ignore[attr-defined]
    await srv.aclose()
    assert not path.exists()


async def test_unix_socket_mode_group_and_sendmail_spelling(milter: MilterFactory,
                                                           tmp_path: Path) -> None:
    path = tmp_path / "sendmail.sock"
    srv = await milter(milter={"listen": f"local:{path}", "unix_socket_mode": "0600",
                               "unix_socket_group": os.getgid()})
    assert srv.describe() == f"unix:{path}"
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_gid == os.getgid()
    res = await one(str(path), make_message("local"))
    assert isinstance(res.final, m.Accept)  # type: ignore[attr-defined]


async def test_libmilter_inet_spelling(milter: MilterFactory) -> None:
    srv = await milter(milter={"listen": "inet:0@127.0.0.1"})
    assert srv.describe() == f"inet:127.0.0.1:{srv.port}" and srv.port
    res = await one(srv.port, make_message("inet spelling"))
    assert isinstance(res.final, m.Accept)  # type: ignore[attr-defined]


async def test_unix_socket_left_to_the_worker_that_owns_it(tmp_path: Path) -> None:
    """A serve worker that does not open the unix sockets starts no milter listener."""
    cfg = config_mod.from_dict({"milter": {"listen": f"unix:{tmp_path / 'm.sock'}"}})
    gateway = Gateway.from_config(cfg)
    assert await start(gateway, ListenOptions(unix_sockets=False)) == []
    assert not (tmp_path / "m.sock").exists()


async def test_settings_follow_a_reload_from_the_next_message(milter: MilterFactory) -> None:
    """``gateway.config.milter`` is read per message: a reload applies on a connection
    opened before it (serve swaps the Gateway, and with it the config)."""
    srv = await milter()
    client = await MtaClient.connect(srv.port)
    await client.connect_event()
    two = ("a@example.test", "b@example.test")
    res = await client.message(make_message("before"), recipients=two)
    assert isinstance(res.final, m.Accept)
    cfg = srv.gateway.config
    assert cfg.milter is not None
    srv.gateway.config = dataclasses.replace(
        cfg, milter=cfg.milter.model_copy(update={"max_recipients": 1}))
    res = await client.message(make_message("after"), recipients=two)
    assert isinstance(res.final, m.ReplyCode)
    assert res.final.reply.startswith("552 5.5.3")
    await client.close()


async def test_old_mta_without_no_reply_flags(milter: MilterFactory) -> None:
    """A v2-style MTA offering no NR_* flags gets a CONTINUE for every event."""
    srv = await milter()
    client = await MtaClient.connect(srv.port, actions=0x3F, protocol=0x7F)
    assert client.negotiated is not None
    assert client.negotiated.protocol & m.SMFIP_NOEOH
    assert not client.negotiated.protocol & m.SMFIP_NR_HDR
    await client.connect_event()
    res = await client.message(make_message("old mta"))
    assert isinstance(res.final, m.Accept)
    assert res.added_headers["X-Virus-Status"] == "Clean"
    await client.close()


@pytest.mark.parametrize("garbage", [
    struct.pack(">I", 0),
    struct.pack(">I", 0x7FFFFFFF),
    struct.pack(">I", 2) + b"Z\0",
    struct.pack(">I", 4) + b"Lab\0",
    struct.pack(">I", 3) + b"L\0\0",
])
async def test_malformed_packet_closes_connection_server_survives(
        milter: MilterFactory, garbage: bytes) -> None:
    srv = await milter()
    client = await MtaClient.connect(srv.port)
    client.writer.write(garbage)
    await client.writer.drain()
    assert await client.receive() is None  # closed by the server, nothing sent
    await client.close()
    res = await one(srv.port, make_message("after garbage"))
    assert isinstance(res.final, m.Accept)  # type: ignore[attr-defined]


async def test_garbage_before_optneg_closes(milter: MilterFactory) -> None:
    srv = await milter()
    r, w = await asyncio.open_connection("127.0.0.1", srv.port)
    w.write(m.encode(m.Helo("too early")))
    assert await asyncio.wait_for(r.read(100), 5) == b""
    w.close()


async def test_idle_connection_times_out(milter: MilterFactory) -> None:
    srv = await milter(milter={"timeout": 0.5})
    client = await MtaClient.connect(srv.port)
    await client.connect_event()
    assert await client.receive(wait=5) is None  # closed by the server after 0.5 s
    await client.close()


async def test_max_connections_queues_extra_connections(milter: MilterFactory) -> None:
    srv = await milter(milter={"max_connections": 1})
    first = await MtaClient.connect(srv.port)
    r, w = await asyncio.open_connection("127.0.0.1", srv.port)
    w.write(m.encode(m.OptNeg(6, 0x1FF, 0x1FFFFF)))
    with pytest.raises(asyncio.TimeoutError):  # waits for a slot
        await asyncio.wait_for(r.read(100), 0.5)
    await first.close()
    data = await asyncio.wait_for(r.read(100), 5)  # admitted once the first one left
    assert data[4:5] == b"O"
    w.close()


class _StrippingMta(MtaClient):
    """Negotiates HDR_LEADSPC but strips the space anyway, as some MTAs and test clients do."""

    @property
    def leadspc(self) -> bool:
        return False


async def test_clamd_finds_attachment_when_mta_strips_header_space(
        milter: MilterFactory, clamd: Any) -> None:
    # "Content-Type:multipart/mixed" (no space) hides the MIME structure from clamd, which
    # then never decodes the base64 attachment: the rebuilt header block must have the space.
    srv = await milter(engines=[{"type": "clamd", "name": "clamd", "servers": [clamd.tcp]}])
    client = await _StrippingMta.connect(srv.port)
    assert client.negotiated is not None
    assert client.negotiated.protocol & m.SMFIP_HDR_LEADSPC
    await client.connect_event()
    res = await client.message(make_message("stripped", attachment=EICAR, name="eicar.com"))
    await client.close()
    assert isinstance(res.final, m.ReplyCode), res.final
    assert res.final.reply.startswith("550 5.7.1 Virus found: Eicar-Test-Signature")


# -- what the scan log records is what the milter did; audit lines; RefID; recipients -------
class Collect:
    """A scan log that keeps (level, event) in memory."""

    def __init__(self, debug_enabled: bool = True) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []
        #: what front-ends test before they build a debug line
        self.debug_enabled = debug_enabled

    def log(self, event: dict[str, Any], level: str = "info") -> None:
        self.lines.append((level, event))

    def debug(self, event: dict[str, Any]) -> None:
        self.lines.append(("debug", event))

    def scans(self) -> list[dict[str, Any]]:
        return [e for _, e in self.lines if e["event"] == "scan"]

    def audit(self, action: str) -> list[tuple[str, dict[str, Any]]]:
        return [(lv, e) for lv, e in self.lines
                if e["event"] == "audit" and e["action"] == action]


async def test_replace_on_unknown_replaces_the_unscanned_part(milter: MilterFactory) -> None:
    from tests.corpus import encrypted_zip

    srv = await milter(policy={"rules": [
        {"name": "unscanned", "status": "unknown", "action": ["accept", "replace", "tag"]}]})
    srv.gateway.log = log = Collect()  # type: ignore[assignment]
    archive = encrypted_zip("inner.exe", b"not scannable " * 20)
    msg = make_message("encrypted", attachment=archive, name="secret.zip")
    res = await one(srv.port, msg)
    assert isinstance(res.final, m.Accept)  # type: ignore[attr-defined]
    body = res.new_body  # type: ignore[attr-defined]
    assert body and b"could not be scanned" in body and b"secret.zip" in body
    assert base64.b64encode(archive)[:40] not in body
    assert b"Hello there." in body
    (scan,) = log.scans()
    assert scan["status"] == "unknown" and scan["actions"] == ["accept", "replace", "tag"]
    assert scan["refid"].encode() in body  # the notice names the RefID
    (lv, ev), = log.audit("body-replaced")
    assert lv == "info" and ev["refid"] == scan["refid"]


async def test_log_records_reject_when_the_mta_forbids_body_changes(
        milter: MilterFactory) -> None:
    srv = await milter(policy={"rules": [
        {"name": "strip", "status": "infected", "action": ["accept", "replace", "tag"]}]})
    srv.gateway.log = log = Collect()  # type: ignore[assignment]
    client = await MtaClient.connect(srv.port, actions=POSTFIX_ACTIONS & ~m.SMFIF_CHGBODY)
    await client.connect_event()
    res = await client.message(make_message("no body change", attachment=EICAR))
    await client.close()
    assert isinstance(res.final, m.ReplyCode) and res.final.reply.startswith("550 5.7.1 ")
    (scan,) = log.scans()
    assert scan["actions"] == ["reject"] and scan["reply"].startswith("550 5.7.1 Virus found")


async def test_refid_header_is_the_logged_refid(milter: MilterFactory) -> None:
    srv = await milter()
    srv.gateway.log = log = Collect()  # type: ignore[assignment]
    client = await MtaClient.connect(srv.port)
    await client.connect_event()
    r1 = await client.message(make_message("one"))
    r2 = await client.message(make_message("two", attachment=EICAR))
    await client.close()
    first, second = log.scans()
    assert r1.added_headers["X-Avgate-RefID"] == first["refid"]
    assert second["refid"] != first["refid"] and second["refid"] in r2.final.reply
    assert first["actions"] == ["accept", "tag"]
    (lv, ev), = [x for x in log.audit("header-added") if x[1]["header"] == "X-Avgate-RefID"]
    assert lv == "debug" and ev["value"] == first["refid"]


REMOVE_OUTSIDE = {"rules": [
    {"name": "keep-inside", "frontend": "milter", "status": "infected",
     "action": ["accept", "remove_recipients", "copy_to", "tag"],
     "remove_recipients": ["*@outside.test"], "copy_to": ["av@example.test"]}]}


async def test_remove_recipients_with_audit_lines(milter: MilterFactory) -> None:
    srv = await milter(policy=REMOVE_OUTSIDE)
    srv.gateway.log = log = Collect()  # type: ignore[assignment]
    client = await MtaClient.connect(srv.port)
    await client.connect_event()
    res = await client.message(make_message("to some", attachment=EICAR),
                               recipients=("bob@example.test", "eve@outside.test"))
    await client.close()
    assert isinstance(res.final, m.Accept)
    assert res.of(m.DeleteRecipient) == [m.DeleteRecipient("<eve@outside.test>")]
    assert res.of(m.AddRecipient) == [m.AddRecipient("<av@example.test>")]
    (scan,) = log.scans()
    assert scan["actions"] == ["accept", "tag", "copy_to", "remove_recipients"]
    (lv, removed), = log.audit("recipient-removed")
    (lv2, added), = log.audit("recipient-added")
    assert (lv, removed["recipient"], lv2, added["recipient"]) == (
        "info", "<eve@outside.test>", "info", "<av@example.test>")
    assert removed["refid"] == scan["refid"] and removed["ids"]["queue_id"] == "4ABCDEF"
    assert [lv for lv, _ in log.audit("milter-start")] == ["debug"]
    for _ in range(100):  # the end line comes when the server sees the connection close
        if log.audit("milter-end"):
            break
        await asyncio.sleep(0.02)
    (lv, end), = log.audit("milter-end")
    assert lv == "debug" and end["messages"] == 1


async def test_debug_audit_lines_not_built_when_debug_is_off(milter: MilterFactory) -> None:
    """Connection and header audit lines (debug) are not even handed to a log whose debug
    level is off (they would be dropped there: building them on every connection costs CPU);
    the info lines still are."""
    srv = await milter(policy=REMOVE_OUTSIDE)
    srv.gateway.log = log = Collect(debug_enabled=False)  # type: ignore[assignment]
    client = await MtaClient.connect(srv.port)
    await client.connect_event()
    res = await client.message(make_message("quiet", attachment=EICAR),
                               recipients=("bob@example.test", "eve@outside.test"))
    await client.close()
    assert res.of(m.DeleteRecipient) == [m.DeleteRecipient("<eve@outside.test>")]
    assert len(log.scans()) == 1
    assert await async_wait_until(lambda: not srv.sessions)  # the connection is over
    audit = sorted(e["action"] for lv, e in log.lines if e["event"] == "audit")
    assert audit == ["recipient-added", "recipient-removed"]
    assert all(lv != "debug" for lv, _ in log.lines)


async def test_remove_recipients_without_delrcpt_tempfails(milter: MilterFactory) -> None:
    srv = await milter(policy=REMOVE_OUTSIDE)
    srv.gateway.log = log = Collect()  # type: ignore[assignment]
    client = await MtaClient.connect(srv.port, actions=POSTFIX_ACTIONS & ~m.SMFIF_DELRCPT)
    await client.connect_event()
    res = await client.message(make_message("cannot remove", attachment=EICAR),
                               recipients=("bob@example.test", "eve@outside.test"))
    await client.close()
    assert isinstance(res.final, m.ReplyCode) and res.final.reply.startswith("451 4.3.5 ")
    assert not res.mods
    (scan,) = log.scans()
    assert scan["actions"] == ["tempfail"] and scan["reply"].startswith("451 4.3.5 ")
    assert not log.audit("recipient-removed")


async def test_audit_levels_follow_the_log_level(milter: MilterFactory, tmp_path: Path) -> None:
    """At ``[log] level = "info"`` the recipient lines are written, header and connection
    lines (debug) are not."""
    import json

    from avgate.observability import ScanLog

    srv = await milter(policy=REMOVE_OUTSIDE)
    path = tmp_path / "scan.log"
    srv.gateway.log = glog = ScanLog(str(path), level="info")
    client = await MtaClient.connect(srv.port)
    await client.connect_event()
    await client.message(make_message("levels", attachment=EICAR),
                         recipients=("bob@example.test", "eve@outside.test"))
    await client.close()
    await asyncio.sleep(0.2)
    glog.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    audit = sorted(e["action"] for e in lines if e["event"] == "audit")
    assert audit == ["recipient-added", "recipient-removed"]
    assert all(e["level"] == "info" for e in lines if e["event"] == "audit")
    assert [e["event"] for e in lines].count("scan") == 1


def _gate_scans(srv: MilterListener) -> tuple[asyncio.Event, asyncio.Event]:
    """(entered, release): the gateway's ``process`` waits for ``release`` after setting
    ``entered``, so a test can act while a message is being scanned."""
    entered, release = asyncio.Event(), asyncio.Event()
    process = srv.gateway.process

    async def gated(*args: Any, **kw: Any) -> Any:
        entered.set()
        await release.wait()
        return await process(*args, **kw)

    srv.gateway.process = gated  # type: ignore[method-assign]
    return entered, release


async def _gated_client(milter: MilterFactory
                        ) -> tuple[MtaClient, asyncio.Event, asyncio.Event]:
    """A connected MTA client of a milter whose scans are gated (:func:`_gate_scans`)."""
    srv = await milter()
    entered, release = _gate_scans(srv)
    client = await MtaClient.connect(srv.port)
    await client.connect_event()
    return client, entered, release


async def test_bytes_sent_while_scanning_wait_for_the_answer(milter: MilterFactory) -> None:
    """Reading pauses (lazily, on the first bytes that come while a message is scanned):
    what the MTA sends meanwhile is handled after the answer, in order."""
    client, entered, release = await _gated_client(milter)
    first = asyncio.create_task(client.message(make_message("first", attachment=EICAR)))
    await asyncio.wait_for(entered.wait(), 10)
    await client.send(m.Abort())  # arrives while busy: held until the answer went out
    await client.send(m.Macro(b"M", (("i", "HELD1"),)))
    release.set()
    r1 = await asyncio.wait_for(first, 10)
    assert isinstance(r1.final, m.ReplyCode)
    r2 = await client.message(make_message("second"))
    assert isinstance(r2.final, m.Accept)
    assert r2.added_headers["X-Virus-Status"] == "Clean"
    await client.close()


async def test_mta_shutting_its_side_while_scanning_still_gets_the_answer(
        milter: MilterFactory) -> None:
    """A half-close from the MTA during the scan: the answer is sent, then the connection
    closes (as before the scan started: nothing is read while busy)."""
    client, entered, release = await _gated_client(milter)
    first = asyncio.create_task(client.message(make_message("virus", attachment=EICAR)))
    await asyncio.wait_for(entered.wait(), 10)
    client.writer.write_eof()
    release.set()
    r1 = await asyncio.wait_for(first, 10)
    assert isinstance(r1.final, m.ReplyCode)
    assert r1.final.reply.startswith("550 5.7.1 Virus found")
    assert await client.receive() is None  # then the filter closed the connection
    client.writer.close()


async def test_next_message_and_half_close_while_scanning_get_both_answers(
        milter: MilterFactory) -> None:
    """Two messages pipelined in one write, then the MTA shuts its side while the first is
    scanned: both are answered, in order, and only then does the connection close."""
    client, entered, release = await _gated_client(milter)
    wire = b""
    for qid, msg in (("FIRST", make_message("virus", attachment=EICAR)),
                     ("SECOND", make_message("second, clean"))):
        headers, body = split_message(msg, client.leadspc)
        for packet in (m.Macro(b"M", (("i", qid),)), m.Mail(("<a@example.test>",)),
                       m.Rcpt(("<b@example.test>",)), *headers, m.EndOfHeaders(),
                       m.Body(body), m.EndOfMessage()):
            wire += m.encode(packet)
    client.writer.write(wire)  # the second message waits in the filter while the first scans
    await asyncio.wait_for(entered.wait(), 10)
    client.writer.write_eof()
    release.set()
    answers = []
    while (packet := await client.receive()) is not None:
        answers.append(packet)
    finals = [p for p in answers if isinstance(p, m.ReplyCode | m.Accept)]
    assert len(finals) == 2, answers
    assert isinstance(finals[0], m.ReplyCode) and finals[0].reply.startswith("550 5.7.1 Virus")
    assert isinstance(finals[1], m.Accept)  # the second message, then the close
    client.writer.close()
