"""Three ``avgate serve`` processes sharing one PostgreSQL quarantine and one Redis verdict
cache, as a site past one machine runs them (issue 17): a message quarantined through
gateway A is listed and released through B and refused on C; one message mailed through all
three reaches the engine once; PostgreSQL restarted mid-load tempfails what it cannot keep
and acknowledges nothing without a record.

The engine is a command engine (a shell script) that writes the marker (``tok-`` and 16 hex
digits) of every object it is asked to scan to a file: that file counts what reached "the
engine", across gateways.
"""

from __future__ import annotations

import concurrent.futures
import secrets
import shutil
import smtplib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from aiosmtpd.controller import Controller

from avgate.quarantine import RecordFilter
from avgate.quarantine.postgres import PostgresStore, migrate
from tests.helpers import require_binary, wait_until
from tests.integration.avgate_proc import AvgateServe
from tests.pg_instance import PgInstance, require_postgres
from tests.redis_instance import RedisInstance
from tests.unit.quarantine.conftest import Sink, free_port

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
TOKEN = "multi-gateway-admin-7c1e"  # noqa: S105 - a test token with every role
AUTH = {"Authorization": f"Bearer {TOKEN}"}

ENGINE = r"""#!/bin/sh
# the test's engine: note what was asked, then say EICAR like clamdscan does
grep -o 'tok-[0-9a-f]\{{16\}}' "$1" >> "{counter}" || echo no-marker >> "{counter}"
if grep -q EICAR-STANDARD-ANTIVIRUS-TEST-FILE "$1"; then
    echo "$1: Eicar-Test-Signature FOUND"
    exit 1
fi
exit 0
"""

CONFIG = """
[scan]
workers = 1
cache_backend = "redis"
redis = "{redis}"
cache_wait = 20.0
[[engines]]
type = "command"
command = ["/bin/sh", "{engine}", "{{path}}"]
timeout = 30
[policy]
virus_action = "quarantine"
[quarantine]
backend = "postgresql"
dsn = "{dsn}"
db_timeout = 1.0
pool_size = 4
next_hop = "127.0.0.1:{sink}"
[log]
path = "{root}/scan-{name}.log"
[[smtp.listeners]]
name = "in"
listen = "127.0.0.1:0"
next_hop = "discard"
[http]
listen = "127.0.0.1:0"
tokens = [{{ token = "{token}", roles = ["scan", "read", "admin"] }}]
"""


@dataclass
class Site:
    root: Path
    pg: PgInstance
    dsn: str
    redis: RedisInstance
    sink: Sink
    gateways: dict[str, AvgateServe]

    def engine_calls(self, marker: str) -> int:
        """How often the engine was asked about the object with this marker."""
        counter = self.root / "engine-calls"
        return counter.read_text().split().count(marker) if counter.exists() else 0

    def api(self, name: str) -> httpx.Client:
        return httpx.Client(base_url=f"http://{self.gateways[name].listeners['http'][0]}",
                            headers=AUTH, timeout=30)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("site")
    engine = root / "engine.sh"
    engine.write_text(ENGINE.format(counter=root / "engine-calls"))
    sink = Sink(port=free_port())
    controller = Controller(sink, hostname="127.0.0.1", port=sink.port)
    controller.start()
    pg = PgInstance(require_postgres())  # initdb; the server starts beside the gateways
    redis = RedisInstance(require_binary("redis-server", "redis-server"))
    dsn = pg.dsn()  # the cluster's own database: no CREATE DATABASE to wait for
    gateways: dict[str, AvgateServe] = {}
    for name in "ABC":
        cfg = root / f"avgate-{name}.toml"
        cfg.write_text(CONFIG.format(redis=redis.url, engine=engine, dsn=dsn, sink=sink.port,
                                     root=root, name=name, token=TOKEN))
        gateways[name] = AvgateServe(cfg, cwd=root)

    def start_database() -> None:
        pg.start()
        migrate(dsn)

    try:
        # everything starts together (the gateways open the quarantine at its first use)
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            started = [pool.submit(start_database), pool.submit(redis.start),
                       *(pool.submit(g.start, 60) for g in gateways.values())]
            for future in started:
                future.result()
        yield Site(root, pg, dsn, redis, sink, gateways)
    finally:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda g: g.stop(), gateways.values()))
        controller.stop()
        pg.close()
        redis.stop()
        shutil.rmtree(redis.dir, ignore_errors=True)


def message(body: bytes, subject: str = "hello") -> bytes:
    return (b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: " + subject.encode()
            + b"\r\nMessage-ID: <" + secrets.token_hex(8).encode() + b"@example.org>\r\n"
            b"\r\n" + body + b"\r\n")


def mail(site: Site, gateway: str, data: bytes) -> tuple[int, str]:
    """Send one message through ``gateway``'s SMTP listener; (code, reply text) of DATA."""
    # "avgate: smtp: listening on in 127.0.0.1:PORT -> discard ...": the line names the
    # listener first
    line = next(x for x in site.gateways[gateway].lines() if x.startswith("avgate: smtp: "))
    port = int(line.split()[5].rsplit(":", 1)[1])
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("client.test")
        client.mail("alice@example.org")
        client.rcpt("bob@example.net")
        code, text = client.data(data)
        return code, text.decode()


def test_quarantined_on_a_listed_and_released_on_b_refused_on_c(site: Site) -> None:
    code, reply = mail(site, "A", message(b"attached: " + EICAR))
    assert code == 250 and "quarantined as " in reply, reply
    qid = reply.rsplit(" ", 1)[1].rstrip(")")
    with site.api("B") as b, site.api("C") as c:
        listed = b.get("/v1/quarantine", params={"virus": "eicar-*", "frontend": "smtp"})
        record = next(r for r in listed.json()["items"] if r["id"] == qid)
        assert record["refid"] and record["listener"] == "in"
        by_refid = c.get("/v1/quarantine", params={"refid": record["refid"].lower()})
        assert [r["id"] for r in by_refid.json()["items"]] == [qid]
        assert b.get(f"/v1/quarantine/{qid}/raw").content.endswith(EICAR + b"\r\n")
        released = b.post(f"/v1/quarantine/{qid}/release")
        assert released.status_code == 200, released.text
        assert released.json()["released_to"] == ["bob@example.net"]
        refused = c.post(f"/v1/quarantine/{qid}/release")
        assert refused.status_code == 409 and "already released" in refused.text
    assert [m.recipients for m in site.sink.received if EICAR in m.data] == [
        ["bob@example.net"]]


def test_two_gateways_releasing_the_same_record_at_once(site: Site) -> None:
    code, reply = mail(site, "C", message(b"again: " + EICAR + b" " +
                                          secrets.token_hex(4).encode()))
    assert code == 250, reply
    qid = reply.rsplit(" ", 1)[1].rstrip(")")
    before = len(site.sink.received)

    def release(name: str) -> int:
        with site.api(name) as api:
            return api.post(f"/v1/quarantine/{qid}/release").status_code

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        codes = sorted(pool.map(release, ["A", "B"]))
    assert codes == [200, 409]
    assert len(site.sink.received) == before + 1


def test_one_message_through_every_gateway_reaches_the_engine_once(site: Site) -> None:
    marker = f"tok-{secrets.token_hex(8)}"
    data = message(b"the same newsletter for everyone " + marker.encode())
    first = mail(site, "A", data)  # the first gateway scans and shares the verdict
    assert first[0] == 250
    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # the rest of the mass mailing
        replies = list(pool.map(lambda g: mail(site, g, data), ["B", "C", "A", "B", "C"]))
    assert all(code == 250 and "clean" in text for code, text in replies), replies
    assert site.engine_calls(marker) == 1


def test_postgresql_restarted_mid_load_tempfails_and_loses_nothing(site: Site) -> None:
    since = time.time()
    sent: list[tuple[int, str]] = []

    def infected() -> bytes:
        return message(EICAR + b" " + secrets.token_hex(8).encode(), subject="load")

    sent += [mail(site, "B", infected()) for _ in range(3)]
    site.pg.stop()
    try:
        sent += [mail(site, g, infected()) for g in "ABC"]
    finally:
        site.pg.start()

    def store_back(name: str) -> bool:  # the pool reconnects by itself (after its back-off)
        with site.api(name) as api:
            return api.get("/v1/quarantine", params={"limit": 1}).status_code == 200

    assert wait_until(lambda: all(store_back(g) for g in "ABC"), timeout=60)
    sent += [mail(site, g, infected()) for g in "ABC"]
    accepted = [text for code, text in sent if code == 250]
    tempfailed = [text for code, text in sent if code == 451]
    assert len(accepted) + len(tempfailed) == len(sent) == 9, sent
    assert len(tempfailed) == 3 and all("Quarantine unavailable" in t for t in tempfailed)
    assert len(accepted) == 6 and all("quarantined as" in t for t in accepted)
    with PostgresStore(site.dsn) as store:
        stored = {r.id for r in store.list(RecordFilter(since=since))
                  if r.rule != "" and r.status == "infected"}
    # every acknowledged message has its record, and only those have one
    assert {t.rsplit(" ", 1)[1].rstrip(")") for t in accepted} == stored
