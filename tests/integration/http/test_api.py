"""The HTTP API against a running ``avgate serve`` (real uvicorn, httpx client)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator

import httpx
import pytest

from avgate.frontends.http import openapi_document

from .conftest import EICAR, MAX_UPLOAD, READ_TOKEN, SCAN_TOKEN, TOKEN, HttpEnv, SmtpSink

RESULT_KEYS = {"status", "infected", "findings", "reason", "sha256", "size", "engines",
               "elapsed_ms"}


@pytest.fixture
def client(http_env: HttpEnv) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=http_env.base_url, timeout=30) as c:
        yield c


def test_raw_clean(client: httpx.Client) -> None:
    r = client.post("/v1/scan", content=b"just some text\n",
                    headers={"Content-Type": "text/plain"})
    assert r.status_code == 200
    body = r.json()
    assert RESULT_KEYS <= set(body)
    assert body["status"] == "clean" and body["infected"] is False and body["findings"] == []
    assert body["size"] == 15
    assert body["sha256"] == hashlib.sha256(b"just some text\n").hexdigest()
    assert body["engines"][0]["name"] == "embedded"


def test_raw_infected_is_200_without_enforce(client: httpx.Client) -> None:
    r = client.post("/v1/scan", content=EICAR)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "infected" and body["infected"] is True
    assert body["findings"] == [{"name": "Eicar-Test-Signature", "engine": "embedded",
                                 "part": ""}]
    assert "error" not in body


def test_enforce(client: httpx.Client) -> None:
    r = client.post("/v1/scan", params={"enforce": "true"}, content=EICAR)
    assert r.status_code == 403
    body = r.json()
    assert body["error"] == "Virus Detected in Attachment"
    assert body["status"] == "infected" and body["findings"][0]["name"] == "Eicar-Test-Signature"
    clean = client.post("/v1/scan?enforce=true", content=b"fine")
    assert clean.status_code == 200 and "error" not in clean.json()
    assert client.post("/v1/scan?enforce=maybe", content=b"x").status_code == 400


def test_multipart_one_result_per_part(client: httpx.Client) -> None:
    r = client.post("/v1/scan", files=[("first", ("eicar.com", EICAR, "application/x-dosexec")),
                                       ("second", ("notes.txt", b"hello", "text/plain"))],
                    data={"comment": "a plain field is scanned too"})
    assert r.status_code == 200
    results = r.json()
    assert isinstance(results, list) and len(results) == 3
    # httpx sends the plain field first
    assert [(x["field"], x["filename"], x["name"], x["status"], x["size"]) for x in results] == [
        ("comment", "", "comment", "clean", 28),
        ("first", "eicar.com", "eicar.com", "infected", len(EICAR)),
        ("second", "notes.txt", "notes.txt", "clean", 5)]
    enforced = client.post("/v1/scan?enforce=true",
                           files={"f": ("a.bin", EICAR), "g": ("b.bin", b"ok")})
    assert enforced.status_code == 403
    errors = [x.get("error") for x in enforced.json()]
    assert errors == ["Virus Detected in Attachment", None]


def test_multipart_errors(client: httpx.Client) -> None:
    no_file = client.post("/v1/scan", data={"only": "text"},
                          files={})  # httpx sends urlencoded without files: force multipart
    assert no_file.status_code == 200  # a urlencoded body is just an object to scan
    boundary = "XyZ"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"t\"\r\n\r\nv\r\n"
            f"--{boundary}--\r\n").encode()
    r = client.post("/v1/scan", content=body,
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 200  # a plain field is an object like any other
    assert [(x["field"], x["filename"], x["size"]) for x in r.json()] == [("t", "", 1)]
    r = client.post("/v1/scan", content=f"--{boundary}--\r\n".encode(),
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 400 and "no part" in r.json()["error"]
    truncated = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"f\"; "
                 f"filename=\"x\"\r\n\r\ndata").encode()
    r = client.post("/v1/scan", content=truncated,
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 400 and "malformed" in r.json()["error"]
    r = client.post("/v1/scan", content=b"x", headers={"Content-Type": "multipart/form-data"})
    assert r.status_code == 400


def test_upload_over_limit_is_413_and_connection_stays_usable(client: httpx.Client) -> None:
    def body() -> Iterator[bytes]:
        for _ in range(MAX_UPLOAD // 65536 + 2):
            yield b"\0" * 65536

    r = client.post("/v1/scan", content=body())  # chunked: the size is unknown up front
    assert r.status_code == 413
    assert r.json()["max_upload_size"] == MAX_UPLOAD
    r = client.post("/v1/scan", content=b"A" * (MAX_UPLOAD + 1))  # with Content-Length
    assert r.status_code == 413
    assert client.post("/v1/scan", content=b"after").json()["status"] == "clean"
    assert client.post("/v1/scan", content=b"B" * MAX_UPLOAD).status_code == 200


def test_health_version_metrics(client: httpx.Client) -> None:
    h = client.get("/healthz")
    assert h.status_code == 200
    assert h.json()["status"] == "ok"
    assert h.json()["engines"][0]["name"] == "embedded" and h.json()["engines"][0]["ok"]
    v = client.get("/v1/version").json()
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", v["version"])
    assert v["db_versions"].startswith("embedded=")
    client.post("/v1/scan", content=EICAR)
    m = client.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    found = re.search(r'^avgate_scans_total\{frontend="http",status="infected"\} (\d+)\.0$',
                      m.text, re.M)
    assert found and int(found.group(1)) >= 1
    assert re.search(r'^avgate_findings_total\{name="Eicar-Test-Signature"\}', m.text, re.M)
    assert re.search(r"^avgate_quarantine_records \d", m.text, re.M)


def test_no_cors_and_no_scan_by_path(client: httpx.Client) -> None:
    r = client.post("/v1/scan?path=/etc/passwd", content=b"body",
                    headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and r.json()["size"] == 4  # the body was scanned, not a path
    assert not any(h.lower().startswith("access-control-") for h in r.headers)
    pre = client.options("/v1/scan", headers={"Origin": "https://evil.example",
                                               "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 405
    assert not any(h.lower().startswith("access-control-") for h in pre.headers)
    assert client.get("/v1/scan").status_code == 405
    assert client.get("/v1/scan-path").status_code == 404


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/quarantine"), ("GET", "/v1/quarantine/20260101T000000000000Z-0000000000000000"),
    ("GET", "/v1/quarantine/20260101T000000000000Z-0000000000000000/raw"),
    ("POST", "/v1/quarantine/20260101T000000000000Z-0000000000000000/release"),
    ("DELETE", "/v1/quarantine/20260101T000000000000Z-0000000000000000"),
])
@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic " + TOKEN, "Bearer"])
def test_quarantine_needs_a_token(client: httpx.Client, method: str, path: str,
                                  auth: str | None) -> None:
    headers = {"Authorization": auth} if auth else {}
    r = client.request(method, path, headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert "error" in r.json()


@pytest.mark.parametrize(("method", "path", "role"), [
    ("GET", "/v1/quarantine", "read"),
    ("GET", "/v1/quarantine/20260101T000000000000Z-0000000000000000", "read"),
    ("GET", "/v1/quarantine/20260101T000000000000Z-0000000000000000/raw", "admin"),
    ("POST", "/v1/quarantine/20260101T000000000000Z-0000000000000000/release", "admin"),
    ("DELETE", "/v1/quarantine/20260101T000000000000Z-0000000000000000", "admin"),
])
def test_quarantine_roles(client: httpx.Client, method: str, path: str, role: str) -> None:
    """A scan-only token may do nothing with the quarantine; a read token only look."""
    for token, allowed in ((SCAN_TOKEN, False), (READ_TOKEN, role == "read"), (TOKEN, True)):
        r = client.request(method, path, headers={"Authorization": f"Bearer {token}"})
        if allowed:
            assert r.status_code in (200, 404), (token, r.text)
        else:
            assert r.status_code == 403, (token, r.status_code)
            assert role in r.json()["error"]
            assert 'error="insufficient_scope"' in r.headers["www-authenticate"]


def test_quarantine_flow(client: httpx.Client, http_env: HttpEnv, smtp_sink: SmtpSink) -> None:
    auth = http_env.auth
    payload = EICAR + b" \r\n"  # still EICAR (trailing whitespace allowed), own size
    scanned = client.post("/v1/scan", content=payload).json()
    qid = scanned["quarantine_id"]
    listing = client.get("/v1/quarantine", params={"virus": "eicar*", "limit": 1000},
                         headers=auth).json()
    assert qid in [x["id"] for x in listing["items"]]
    assert listing["total"] >= 1
    assert client.get("/v1/quarantine", params={"virus": "Other.*"},
                      headers=auth).json()["items"] == []
    page = client.get("/v1/quarantine", params={"limit": 1, "offset": 0}, headers=auth).json()
    assert len(page["items"]) == 1 and page["limit"] == 1
    assert page["next_offset"] == (1 if page["total"] > 1 else None)
    since_future = client.get("/v1/quarantine", params={"since": "2999-01-01T00:00:00Z"},
                              headers=auth).json()
    assert since_future["items"] == []
    record = client.get(f"/v1/quarantine/{qid}", headers={"Authorization": f"Bearer {READ_TOKEN}"})
    assert record.status_code == 200
    assert record.json()["viruses"] == ["Eicar-Test-Signature"]
    assert record.json()["frontend"] == "http" and record.json()["released"] is None
    raw = client.get(f"/v1/quarantine/{qid}/raw", headers=auth)
    assert raw.status_code == 200 and raw.content == payload
    assert raw.headers["content-type"] == "application/octet-stream"

    bad = client.post(f"/v1/quarantine/{qid}/release", headers=auth, content=b"[1]")
    assert bad.status_code == 400
    released = client.post(f"/v1/quarantine/{qid}/release", headers=auth,
                           json={"to": ["admin@example.test"]})
    assert released.status_code == 200, released.text
    assert released.json()["released_to"] == ["admin@example.test"]
    assert smtp_sink.handler.messages[-1][1] == ["admin@example.test"]
    assert smtp_sink.handler.messages[-1][2] == payload
    again = client.post(f"/v1/quarantine/{qid}/release", headers=auth,
                        json={"to": ["admin@example.test"]})
    assert again.status_code == 409
    forced = client.post(f"/v1/quarantine/{qid}/release", headers=auth,
                         json={"to": ["admin@example.test"], "force": True})
    assert forced.status_code == 200

    deleted = client.delete(f"/v1/quarantine/{qid}", headers=auth)
    assert deleted.status_code == 200 and deleted.json() == {"deleted": qid}
    assert client.get(f"/v1/quarantine/{qid}", headers=auth).status_code == 404
    assert client.get(f"/v1/quarantine/{qid}/raw", headers=auth).status_code == 404
    assert client.delete(f"/v1/quarantine/{qid}", headers=auth).status_code == 404
    assert client.get("/v1/quarantine/../../etc/passwd", headers=auth).status_code == 404


def test_scan_log_has_http_scans(client: httpx.Client, http_env: HttpEnv) -> None:
    client.post("/v1/scan", content=b"logged object")
    events = [json.loads(x) for x in (http_env.root / "scan.log").read_text().splitlines()]
    assert any(e.get("frontend") == "http" and e.get("size") == 13 for e in events)


def test_openapi_document_matches_routes(client: httpx.Client) -> None:
    served = client.get("/openapi.json").json()
    assert served == openapi_document()
    for path, methods in served["paths"].items():
        concrete = path.replace("{id}", "20260101T000000000000Z-0000000000000000")
        for method in methods:
            r = client.request(method.upper(), concrete)
            assert r.status_code not in (404, 405) or "{id}" in path, (method, path)
            assert str(r.status_code) in methods[method]["responses"], (method, path, r)


def test_quarantine_list_filters(client: httpx.Client, http_env: HttpEnv) -> None:
    """Every filter of GET /v1/quarantine, and the one time grammar for ``since``."""
    qid = client.post("/v1/scan", content=EICAR + b"\t\n").json()["quarantine_id"]

    def ids(**params: str) -> list[str]:
        r = client.get("/v1/quarantine", params={"limit": 1000, **params},
                       headers=http_env.auth)
        assert r.status_code == 200, (params, r.text)
        assert r.json()["total"] == len(r.json()["items"])
        return [x["id"] for x in r.json()["items"]]

    assert qid in ids(status="infected", frontend="http", virus="EICAR-*")
    assert qid in ids(sender="", recipient="")  # an empty text filter is no filter
    assert qid not in ids(frontend="smtp") and qid not in ids(status="clean")
    assert qid not in ids(sender="?*") and qid not in ids(recipient="*")  # none: ""/[]
    for since in ("3d", "@0", "0", "1970-01-02T00:00:00Z", "2000-01-01T00:00:00"):
        assert qid in ids(since=since), since
    for since in ("@99999999999", "99999999999", "2999-01-01T00:00:00", "2999-01-01"):
        assert qid not in ids(since=since), since
    bad = client.get("/v1/quarantine", params={"since": "yesterday-ish"},
                     headers=http_env.auth)
    assert bad.status_code == 400 and "since" in bad.json()["error"]


def test_since_grammar_naive_is_utc_for_the_api() -> None:
    from avgate.ondemand import parse_since

    now = 1_700_000_000.0
    assert parse_since("2023-11-14T22:13:20", naive_utc=True) == now
    assert parse_since("2023-11-14T23:13:20+01:00", naive_utc=True) == now
    assert parse_since("1700000000") == parse_since("@1700000000") == now
    assert parse_since("1700000000.5") == now + 0.5
    assert parse_since("2h", now=now, naive_utc=True) == now - 7200


def test_openapi_document_states_the_code_limits() -> None:
    """The document is package data: the numbers and texts it repeats match the code."""
    from avgate.frontends.http import scan
    from avgate.frontends.http.quarantine import MAX_PAGE, MAX_RELEASE_TO

    doc = openapi_document()
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", doc["info"]["version"])
    listing = doc["paths"]["/v1/quarantine"]["get"]["parameters"]
    (limit,) = [p for p in listing if p["name"] == "limit"]
    assert limit["schema"]["maximum"] == MAX_PAGE
    release = doc["paths"]["/v1/quarantine/{id}/release"]["post"]["requestBody"]
    to = release["content"]["application/json"]["schema"]["properties"]["to"]
    assert to["maxItems"] == MAX_RELEASE_TO
    error = doc["components"]["schemas"]["ScanResult"]["properties"]["error"]["description"]
    for text in (scan.INFECTED_ERROR, scan.SCAN_ERROR, scan.BLOCKED_ERROR):
        assert f'"{text}' in error, text


def test_quarantine_list_by_listener_date_range_and_subject(client: httpx.Client,
                                                           http_env: HttpEnv) -> None:
    """Issue 16: ``listener``, ``until`` and ``subject`` on GET /v1/quarantine; the record's
    ``subject``. Mail records are written into the server's own file store beside it."""
    from avgate.quarantine import Envelope, QuarantineStore
    from avgate.result import Finding, ScanResult, ScanStatus

    web = client.post("/v1/scan", content=EICAR + b"\n").json()["quarantine_id"]
    held = ScanResult(ScanStatus.INFECTED, findings=(Finding("Eicar-Test-Signature", "e", ""),))
    with QuarantineStore(http_env.root / "quarantine") as store:
        sale, other = (store.put(b"Subject: =?utf-8?q?" + subject + b"?=\r\n\r\nx\r\n",
                                 Envelope("a@example.org", ("b@example.net",),
                                          listener=listener), held, frontend="smtp")
                       for subject, listener in ((b"50%_off_=C3=A9t=C3=A9", "partners"),
                                                 (b"500_off", "smtp")))

    def ids(**params: str) -> list[str]:
        r = client.get("/v1/quarantine", params={"limit": 1000, **params},
                       headers=http_env.auth)
        assert r.status_code == 200, (params, r.text)
        assert r.json()["total"] == len(r.json()["items"])
        return [x["id"] for x in r.json()["items"]]

    assert ids(subject="50%") == [sale] and ids(subject="ÉTÉ") == [sale]
    assert ids(subject="OFF") == [sale, other] and ids(subject="_") == []
    assert ids(listener="part*") == [sale] and ids(listener="partners", subject="500") == []
    assert web in ids(listener="http") and web not in ids(subject="e")  # non-mail: no subject
    everything = ids()
    assert ids(until="@0") == [] and ids(until="2999-01-01T00:00:00") == everything
    assert ids(since="1h", until="2999-01-01") == everything
    shown = client.get(f"/v1/quarantine/{sale}", headers=http_env.auth).json()
    assert shown["subject"] == "50% off été"
    for bad_time in ("yesterday-ish", "nan", "@inf"):  # numbers, but not times, too
        bad = client.get("/v1/quarantine", params={"until": bad_time}, headers=http_env.auth)
        assert bad.status_code == 400 and "until" in bad.json()["error"], bad_time


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "@nan", "@inf", "1e999"])
def test_parse_since_refuses_numbers_that_are_not_times(text: str) -> None:
    from avgate.ondemand import parse_since

    with pytest.raises(ValueError, match="not a time"):
        parse_since(text)
