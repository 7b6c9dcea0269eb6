"""The integration recipes in docs/recipes, each exercised with exactly its documented config.

Every recipe keeps its avgate config in a fenced ``toml`` block whose first line names the
file (``# /etc/avgate/NAME.toml``). The test reads that block from the .md file, checks that
the text as written is a valid config, then replaces only addresses and paths (listen
addresses, next hops, clamd, quarantine, log, real qmail-queue) with the test's own — each
replaced string must occur in the documented text, so doc and test cannot drift apart — and
runs the front-end the recipe uses with a real clamd behind it: EICAR and a clean message,
and the outcome the recipe's table documents.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from avgate import config as config_mod
from avgate.frontends.listen import Listener, ListenOptions
from avgate.gateway import Gateway
from avgate.protocols import icap as icap_proto
from avgate.protocols import milter as m
from avgate.quarantine import QuarantineStore
from tests.clamd_daemon import ClamdDaemon
from tests.integration.avgate_proc import avgate_command
from tests.integration.icap.test_server import exchange, respmod, responses
from tests.integration.milter.conftest import MtaClient
from tests.integration.smtp.conftest import EICAR, Sink, closed_port, make_message, send_smtplib

pytestmark = pytest.mark.timeout(120)

RECIPES = Path(__file__).resolve().parents[2] / "docs" / "recipes"
_BLOCK_RE = re.compile(r"^```toml\n(# /etc/avgate/[^\n]+\n.*?)^```", re.S | re.M)


def documented(recipe: str, file: str) -> str:
    """The fenced config block of ``recipe`` that starts with ``# /etc/avgate/<file>``."""
    blocks = _BLOCK_RE.findall((RECIPES / recipe).read_text())
    found = [b for b in blocks if b.startswith(f"# /etc/avgate/{file}\n")]
    assert len(found) == 1, f"{recipe}: expected one block for /etc/avgate/{file}"
    return str(found[0])


def localized(tmp: Path, text: str, replace: dict[str, str]) -> config_mod.Config:
    """Load the documented ``text`` as written (it must validate), then with ``replace``
    applied — every key must occur in the text — and return the localized config."""
    exact = tmp / "exact.toml"
    exact.write_text(text)
    config_mod.load(exact)  # the documented text is valid as it stands
    for old, new in replace.items():
        assert old in text, f"{old!r} is not in the documented config any more"
        text = text.replace(old, new)
    local = tmp / "local.toml"
    local.write_text(text)
    return config_mod.load(local)


@asynccontextmanager
async def running(cfg: config_mod.Config, *frontends: str
                  ) -> AsyncIterator[tuple[Gateway, list[Any]]]:
    """The recipe's front-ends, in process, on the localized config (their listeners: each
    front-end's own type, with ``port`` and ``name``)."""
    import importlib

    gateway = Gateway.from_config(cfg)
    await gateway.start()
    started: list[Listener] = []
    try:
        for name in frontends:
            module = importlib.import_module(f"avgate.frontends.{name}")
            started += await module.start(gateway, ListenOptions(drain_timeout=2,
                                                                 base_dir=cfg.base_dir))
        yield gateway, started
    finally:
        for listener in started:
            await listener.aclose()
        await gateway.close()


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = await Sink().start()
    try:
        yield s
    finally:
        await s.stop()


async def smtp(port: int, msg: bytes, rcpts: tuple[str, ...] = ("bob@example.test",)
               ) -> tuple[int, str]:
    code, text = await asyncio.to_thread(send_smtplib, port, msg, rcpts=rcpts)
    return code, text.decode() if isinstance(text, bytes) else str(text)


def records(cfg: config_mod.Config) -> int:
    with QuarantineStore(cfg.quarantine_path) as store:
        return store.count()


# -- Oracle Calendar Server ---------------------------------------------------------------
ORACLE = ("oracle-calendar.md", "oracle-calendar.toml")


def oracle_config(tmp: Path, clamd: str, next_hop: str) -> config_mod.Config:
    return localized(tmp, documented(*ORACLE), {
        "tcp://127.0.0.1:3310": clamd, "127.0.0.1:10030": "127.0.0.1:0",
        "127.0.0.1:10031": "127.0.0.1:0", "127.0.0.1:10026": next_hop,
        "/var/lib/avgate/quarantine": str(tmp / "q")})


async def test_oracle_calendar_verdicts_and_bitbucket(tmp_path: Path, clamd_alive: ClamdDaemon,
                                                     sink: Sink) -> None:
    cfg = oracle_config(tmp_path, clamd_alive.tcp, sink.address)
    async with running(cfg, "smtp") as (_, listeners):
        ports = {x.name: x.port for x in listeners}
        verdict, mail = ports["calendar-verdict"], ports["calendar-mail"]
        assert await smtp(verdict, make_message("attachment", attachment=EICAR)) == (
            550, "5.7.1 FilterVerdictPositive")
        code, _ = await smtp(verdict, make_message("clean attachment"))
        assert code == 250
        assert sink.messages == []  # verdict only: nothing relayed
        # bitbucket: acknowledged, never delivered, kept in the quarantine
        code, _ = await smtp(mail, make_message("infected invitation", attachment=EICAR))
        assert code == 250
        assert sink.messages == []
        assert records(cfg) == 1
        code, _ = await smtp(mail, make_message("clean invitation"))
        assert code == 250
        assert len(sink.messages) == 1 and b"clean invitation" in sink.messages[0].data


async def test_oracle_calendar_keeps_on_scanner_failure(tmp_path: Path, sink: Sink) -> None:
    cfg = oracle_config(tmp_path, f"tcp://127.0.0.1:{closed_port()}", sink.address)
    async with running(cfg, "smtp") as (_, listeners):
        verdict = next(x for x in listeners if x.name == "calendar-verdict")
        code, _ = await smtp(verdict.port, make_message("attachment"))
        assert code == 250  # onlinefailureaction keep


# -- Sun Messaging Server -----------------------------------------------------------------
SUN = ("sun-messaging-server.md", "sun-messaging.toml")


def sun_config(tmp: Path, clamd: str, next_hop: str, mode: int = 2) -> config_mod.Config:
    return localized(tmp, documented(*SUN), {
        "unix:/var/run/clamav/clamd.ctl": clamd, "127.0.0.1:10025": "127.0.0.1:0",
        "127.0.0.1:10026": next_hop, "verdict_mode = 2": f"verdict_mode = {mode}"})


def header(data: bytes, name: bytes) -> str | None:
    head = data.split(b"\r\n\r\n", 1)[0]
    found = [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
             if line.lower().startswith(name.lower() + b":")]
    assert len(found) <= 1
    return found[0].decode() if found else None


# the recipe's MODE table: (infected, clean); NAME is the finding
SUN_MODES = {0: ("virus", None), 1: ("True ; NAME", None), 2: ("True ; NAME", "False"),
             3: ("virus", "False")}


@pytest.mark.parametrize("mode", sorted(SUN_MODES))
async def test_sun_messaging_virus_test_header(tmp_path: Path, clamd_alive: ClamdDaemon,
                                               sink: Sink, mode: int) -> None:
    cfg = sun_config(tmp_path, clamd_alive.unix, sink.address, mode)
    async with running(cfg, "smtp") as (_, [listener]):
        forged = b"Virus-Test: False\r\n"  # a sender's own verdict never survives
        infected = make_message("sun infected", attachment=EICAR, extra_headers=forged)
        assert (await smtp(listener.port, infected))[0] == 250
        assert (await smtp(listener.port, make_message("sun clean", extra_headers=forged))
                )[0] == 250
    want_infected, want_clean = SUN_MODES[mode]
    got_infected = header(sink.messages[0].data, b"Virus-Test")
    assert got_infected == want_infected.replace("NAME", "Eicar-Test-Signature.UNOFFICIAL")
    assert header(sink.messages[1].data, b"Virus-Test") == want_clean


async def test_sun_messaging_452_when_clamd_is_down(tmp_path: Path, sink: Sink) -> None:
    cfg = sun_config(tmp_path, f"unix:{tmp_path}/no-clamd.sock", sink.address)
    async with running(cfg, "smtp") as (_, [listener]):
        code, text = await smtp(listener.port, make_message("sun"))
    assert (code, text) == (452, "4.4.5 Virus scanner unavailable, try again later")
    assert sink.messages == []


# -- Scalix (milter) ----------------------------------------------------------------------
async def test_scalix_milter_by_direction(tmp_path: Path, clamd_alive: ClamdDaemon) -> None:
    sock = tmp_path / "milter.sock"
    cfg = localized(tmp_path, documented("scalix.md", "scalix.toml"), {
        "unix:/var/run/clamav/clamd.ctl": clamd_alive.unix,
        "unix:/var/run/avgate/milter.sock": f"unix:{sock}",
        "/var/opt/scalix/avgate/quarantine": str(tmp_path / "q")})
    assert cfg.quarantine.report_address("false-positive") != \
        cfg.quarantine.report_address("false-negative")
    async with running(cfg, "milter"):
        mta = await MtaClient.connect(str(sock))
        try:
            await mta.connect_event(addr="192.0.2.10")
            # submission port: SMTP AUTH → outbound → refused with the recipe's reply
            out = await mta.message(make_message("outbound", attachment=EICAR), auth="bob")
            assert isinstance(out.final, m.ReplyCode), out.final
            assert out.final.reply.startswith("550 5.7.1 Your message contains a virus (")
            # port 25, no AUTH → inbound → held, never bounced: on Sendmail's hold queue
            # (SMFIR_QUARANTINE, then accept) and in avgate's quarantine
            inbound = await mta.message(make_message("inbound", attachment=EICAR))
            assert isinstance(inbound.final, m.Accept), inbound.final
            [hold] = inbound.of(m.Quarantine)
            assert "Eicar" in hold.reason
            assert re.search(r"\(RefID [A-Z0-9]+\)$", out.final.reply), out.final.reply
            clean = await mta.message(make_message("clean"))
            assert isinstance(clean.final, (m.Accept, m.Continue)), clean.final
            assert re.fullmatch(r"[A-Z0-9]+", clean.added_headers["X-Avgate-RefID"])
        finally:
            await mta.close()
    assert records(cfg) == 1


# -- Kernun-style proxy -------------------------------------------------------------------
async def test_kernun_icap_and_smtp(tmp_path: Path, clamd_alive: ClamdDaemon,
                                   sink: Sink) -> None:
    cfg = localized(tmp_path, documented("kernun.md", "kernun.toml"), {
        "tcp://127.0.0.1:3310": clamd_alive.tcp, "127.0.0.1:1344": "127.0.0.1:0",
        "127.0.0.1:10025": "127.0.0.1:0", "127.0.0.1:10026": sink.address})
    async with running(cfg, "icap", "smtp") as (_, listeners):
        icap, smtp_listener = listeners
        # web: infected → 403 block page with the ICAP infection headers; clean → 204
        evs, _ = await exchange(icap, respmod(EICAR) + icap_proto.encode_body(EICAR))
        [res] = responses(evs)
        assert res.status == 200 and res.res_hdr.startswith(b"HTTP/1.1 403")
        assert res.headers.get("X-Infection-Found").startswith("Type=0; Resolution=2;")
        assert res.headers.get("X-Virus-ID").startswith("Eicar")
        clean = b"just a harmless download"
        evs, _ = await exchange(icap, respmod(clean) + icap_proto.encode_body(clean))
        assert [r.status for r in responses(evs)] == [204]
        # mail: REPLACE + PREFIX + COPY-TO
        code, _ = await smtp(smtp_listener.port,
                             make_message("report", attachment=EICAR, name="eicar.com"))
        assert code == 250
    [msg] = sink.messages
    assert "virus-admin@example.org" in msg.recipients and "bob@example.test" in msg.recipients
    assert header(msg.data, b"Subject") == "[VIRUS REMOVED] report"
    assert EICAR not in msg.data and b"WDVPIVAlQEFQWzRcUFpYNTQo" not in msg.data
    assert b"contained a virus" in msg.data


# -- IndiMail / qmail ---------------------------------------------------------------------
ENVELOPE = b"Falice@example.test\0Tbob@example.test\0\0"


def qmail_config(tmp: Path, clamd: ClamdDaemon, file: str, extra: dict[str, str] | None = None
                 ) -> Path:
    real = tmp / "qmail-queue"
    real.write_text('#!/bin/sh\ncat > "$QQ_OUT/msg"\ncat <&1 > "$QQ_OUT/env"\n')
    real.chmod(0o755)
    (tmp / "out").mkdir(exist_ok=True)
    text = documented("indimail-qmail.md", file)
    replace = {"/etc/clamav/clamd.conf": clamd.config_path,
               "/var/qmail/bin/qmail-queue": str(real),
               "/var/spool/avgate/quarantine": str(tmp / "q"), **(extra or {})}
    if "/var/log/avgate/qmail.jsonl" in text:
        replace["/var/log/avgate/qmail.jsonl"] = str(tmp / "scan.jsonl")
    localized(tmp, text, replace)
    return tmp / "local.toml"


def qmail_queue(tmp: Path, cfg: Path, message: bytes) -> int:
    """``avgate qmail-queue`` as qmail-smtpd runs it: message on fd 0, envelope on fd 1."""
    msg_r, msg_w = os.pipe()
    env_r, env_w = os.pipe()
    # what the recipe's wrapper runs: the avgate console script
    proc = subprocess.Popen([*avgate_command(), "qmail-queue", "--config", str(cfg)],
                            stdin=msg_r, stdout=env_r, stderr=subprocess.PIPE,
                            env={**os.environ, "QQ_OUT": str(tmp / "out")})
    os.close(msg_r)
    os.close(env_r)
    with os.fdopen(msg_w, "wb") as f:
        f.write(message)
    with os.fdopen(env_w, "wb") as f:
        f.write(ENVELOPE)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 31, 71), err.decode()
    return proc.returncode


def test_qmail_rejectvirus_and_qhpsi(tmp_path: Path, clamd_alive: ClamdDaemon) -> None:
    cfg = qmail_config(tmp_path, clamd_alive, "qmail.toml")
    assert qmail_queue(tmp_path, cfg, make_message("qq", attachment=EICAR)) == 31
    assert not (tmp_path / "out/msg").exists()
    clean = make_message("qq clean")
    assert qmail_queue(tmp_path, cfg, clean) == 0
    queued = (tmp_path / "out/msg").read_bytes()
    added = queued[:-len(clean)]
    assert queued.endswith(clean) and b"X-QHPSI: clean\r\n" in added.splitlines(keepends=True)
    assert (tmp_path / "out/env").read_bytes() == ENVELOPE
    events = [json.loads(x) for x in (tmp_path / "scan.jsonl").read_text().splitlines()]
    assert [e["status"] for e in events if e.get("event") == "scan"] == ["infected", "clean"]


def test_qmail_quarantine_folder(tmp_path: Path, clamd_alive: ClamdDaemon) -> None:
    vmail = tmp_path / "vmail"
    (vmail / "example.test/bob/Maildir").mkdir(parents=True)
    cfg = qmail_config(tmp_path, clamd_alive, "qmail-quarantine.toml",
                       {"/var/vmail": str(vmail)})
    infected = make_message("qq held", attachment=EICAR)
    assert qmail_queue(tmp_path, cfg, infected) == 0
    assert not (tmp_path / "out/msg").exists()  # held, not queued
    [held] = list((vmail / "example.test/bob/Maildir/.Quarantine/new").iterdir())
    assert held.read_bytes().endswith(infected)
    assert held.stat().st_mode & 0o777 == 0o640
    assert qmail_queue(tmp_path, cfg, make_message("qq clean")) == 0
    assert (tmp_path / "out/msg").exists()
