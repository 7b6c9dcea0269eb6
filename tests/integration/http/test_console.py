"""The web console (``[http] console = true``) over a real ``avgate serve``: sign-in with the
API's tokens, roles, CSRF, session fixation and forgery, security headers, escaped content,
the actions and their audit lines. (The Chromium run is in test_console_browser.py.)"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx

from tests.corpus import EICAR
from tests.helpers import wait_until
from tests.integration.http.conftest import READ_TOKEN, SCAN_TOKEN, TOKEN, HttpEnv, SmtpSink


def csrf(page: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', page)
    assert m, page
    return m.group(1)


def signed_in(env: HttpEnv, token: str) -> httpx.Client:
    client = httpx.Client(base_url=env.base_url, timeout=20)
    form = client.get("/console/signin")
    r = client.post("/console/signin", data={"token": token, "csrf": csrf(form.text)})
    assert r.status_code == 303 and r.headers["location"] == "/console/quarantine", r.text
    return client


def record_ids(client: httpx.Client) -> list[str]:
    page = client.get("/console/quarantine").text
    return re.findall(r'href="/console/quarantine/([0-9A-Za-z-]+)" class="record"', page)


def test_off_by_default(make_http: object) -> None:
    env = make_http()  # type: ignore[operator]
    assert httpx.get(f"{env.base_url}/console/signin", timeout=10).status_code == 404
    assert httpx.get(f"{env.base_url}/console/quarantine", timeout=10).status_code == 404


def test_sign_in_roles_and_headers(console: tuple[HttpEnv, int]) -> None:
    env, _ = console
    anon = httpx.Client(base_url=env.base_url, timeout=20)
    r = anon.get("/console/quarantine")
    assert r.status_code == 303 and r.headers["location"] == "/console/signin"
    form = anon.get("/console/signin")
    headers = form.headers
    assert "script-src" not in headers["content-security-policy"]  # no script at all
    assert "default-src 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY" and headers["referrer-policy"] == "no-referrer"
    # a scan-only token may not use the console; a wrong token neither
    for token in (SCAN_TOKEN, "nope"):
        page = anon.get("/console/signin").text  # each form has its own nonce
        r = anon.post("/console/signin", data={"token": token, "csrf": csrf(page)})
        assert r.status_code == 401 and "avgate_console" not in r.cookies
    # the sign-in form itself is CSRF-protected (no login CSRF)
    fresh = httpx.Client(base_url=env.base_url, timeout=20)
    r = fresh.post("/console/signin", data={"token": TOKEN, "csrf": "x"})
    assert r.status_code == 403
    reader = signed_in(env, READ_TOKEN)
    cookie = reader.cookies["avgate_console"]
    assert cookie.startswith("v1.") and TOKEN not in cookie and READ_TOKEN not in cookie
    set_cookie = [v for k, v in reader.get("/console/signin").headers.multi_items()
                  if k == "set-cookie"]
    assert all("avgate_console=" not in c for c in set_cookie)
    listing = reader.get("/console/quarantine")
    assert listing.status_code == 200 and 'id="total">2<' in listing.text
    assert "Eicar-Test-Signature" in listing.text and "eve@example.test" in listing.text


def test_session_cookie_attributes_fixation_and_forgery(console: tuple[HttpEnv, int]) -> None:
    env, _ = console
    client = httpx.Client(base_url=env.base_url, timeout=20)
    planted = "v1.eyJmIjoiYWJjIn0.AAAA"
    client.cookies.set("avgate_console", planted, path="/console")
    assert client.get("/console/quarantine").status_code == 303  # forged: not a session
    form = client.get("/console/signin")
    r = client.post("/console/signin", data={"token": READ_TOKEN, "csrf": csrf(form.text)})
    (cookie,) = [v for k, v in r.headers.multi_items()
                 if k == "set-cookie" and v.startswith("avgate_console=")]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    value = cookie.split(";")[0].split("=", 1)[1]
    assert value != planted
    # the payload cannot be changed (e.g. to another token's fingerprint) without the key
    version, payload, mac = value.split(".")
    tampered = f"{version}.{payload[:-2]}AA.{mac}"
    other = httpx.Client(base_url=env.base_url, timeout=20)
    other.cookies.set("avgate_console", tampered, path="/console")
    assert other.get("/console/quarantine").status_code == 303


def test_read_role_sees_but_cannot_act(console: tuple[HttpEnv, int],
                                       smtp_sink: SmtpSink) -> None:
    env, _ = console
    reader = signed_in(env, READ_TOKEN)
    rid = record_ids(reader)[0]
    page = reader.get(f"/console/quarantine/{rid}")
    assert page.status_code == 200 and 'id="release"' not in page.text
    token = csrf(page.text)
    for action in ("release", "delete", "report"):
        assert reader.post(f"/console/quarantine/{rid}/{action}",
                           data={"csrf": token}).status_code == 403
    assert reader.get(f"/console/quarantine/{rid}/raw").status_code == 403
    assert len(record_ids(reader)) == 2 and not smtp_sink.handler.messages


def test_message_view_escapes_everything(console: tuple[HttpEnv, int]) -> None:
    env, _ = console
    admin = signed_in(env, TOKEN)
    rid = record_ids(admin)[0]
    page = admin.get(f"/console/quarantine/{rid}").text
    assert "<script>" not in page and "&lt;script&gt;alert(" in page
    assert "<img" not in page  # shown as text: nothing remote is loaded
    assert "eicar.com" in page and "Eicar-Test-Signature" in page
    assert 'id="release"' in page  # admin sees the actions
    raw = admin.get(f"/console/quarantine/{rid}/raw")
    assert raw.headers["content-type"] == "application/octet-stream"
    assert raw.headers["content-disposition"].startswith("attachment;")
    assert EICAR in raw.content


def test_actions_need_csrf_and_are_audited(console: tuple[HttpEnv, int],
                                           smtp_sink: SmtpSink) -> None:
    env, _ = console
    admin = signed_in(env, TOKEN)
    rid = record_ids(admin)[-1]
    confirm = admin.get(f"/console/quarantine/{rid}/release")
    assert confirm.status_code == 200 and 'id="confirm"' in confirm.text
    # no token, or another session's token: refused, nothing sent
    assert admin.post(f"/console/quarantine/{rid}/release", data={}).status_code == 403
    other = signed_in(env, TOKEN)
    foreign = csrf(other.get("/console/quarantine").text)
    assert admin.post(f"/console/quarantine/{rid}/release",
                      data={"csrf": foreign}).status_code == 403
    assert not smtp_sink.handler.messages
    done = admin.post(f"/console/quarantine/{rid}/release", data={"csrf": csrf(confirm.text)})
    assert done.status_code == 200 and "was released to bob@example.test" in done.text
    assert wait_until(lambda: len(smtp_sink.handler.messages) == 1, 10)
    assert smtp_sink.handler.messages[0][1] == ["bob@example.test"]
    again = admin.post(f"/console/quarantine/{rid}/release", data={"csrf": csrf(confirm.text)})
    assert again.status_code == 409 and len(smtp_sink.handler.messages) == 1
    log = (env.root / "scan.log").read_text().splitlines()
    audits = [json.loads(x) for x in log if '"event":"audit"' in x]
    release = [a for a in audits if a["action"] == "console-release"]
    assert release and release[0]["user"] == "alice-admin" and release[0]["id"] == rid
    assert any(a["action"] == "console-signin" for a in audits)


def test_dashboard_and_status(console: tuple[HttpEnv, int]) -> None:
    env, _ = console
    reader = signed_in(env, READ_TOKEN)
    page = reader.get("/console/dashboard").text
    assert page.count("<svg") == 2 and "Eicar-Test-Signature" in page
    assert "embedded" in page
    status = reader.get("/console/status").text
    assert "smtp smtp" in status and "verdict" in status


def test_signout_and_idle_expiry(console: tuple[HttpEnv, int], tmp_path: Path) -> None:
    env, _ = console
    reader = signed_in(env, READ_TOKEN)
    token = csrf(reader.get("/console/quarantine").text)
    r = reader.post("/console/signout", data={"csrf": token})
    assert r.status_code == 303 and r.headers["location"] == "/console/signin"
    assert reader.get("/console/quarantine").status_code == 303
    # an idle cookie is refused (checked with the session module's clock)
    from avgate.frontends.http.console.session import Sessions
    from avgate.frontends.http.settings import HttpSettings

    settings = HttpSettings.model_validate({"tokens": [{"token": READ_TOKEN,
                                                        "roles": ["read"]}],
                                            "console_idle_timeout": 600})
    sessions = Sessions(settings)
    opened = sessions.sign_in(READ_TOKEN, now=1000.0)
    assert opened is not None
    session, cookie = opened
    assert sessions.check(cookie, now=1599.0) is not None
    assert sessions.check(cookie, now=1601.0) is None
    assert sessions.touched(session, now=1030.0) is None  # moved at most once a minute
    refreshed = sessions.touched(session, now=1200.0)
    assert refreshed is not None and sessions.check(refreshed, now=1700.0) is not None
    # a token removed from the config ends its sessions
    assert Sessions(HttpSettings.model_validate({"tokens": [
        {"token": "someone-else", "roles": ["read"]}], "console_secret": "s"})).check(
            cookie, now=time.time()) is None


# -- issue 16: listener, date range and subject filters; the subject column -------------------
def test_list_filters_by_subject_listener_and_date_range(console: tuple[HttpEnv, int]) -> None:
    env, _ = console
    reader = signed_in(env, READ_TOKEN)

    def listed(**params: str) -> tuple[str, list[str]]:
        r = reader.get("/console/quarantine", params=params)
        assert r.status_code == 200, r.text
        return r.text, re.findall(r'href="/console/quarantine/([0-9A-Za-z-]+)" class="record"',
                                  r.text)

    page, both = listed()
    assert len(both) == 2
    # the subject column, escaped (no raw & in the page), newest first
    assert '<td class="subject">second held: 50% &amp; more</td>' in page
    assert '<td class="subject">first held</td>' in page
    newer, older = both
    page, only = listed(subject="50%")  # a LIKE wildcard typed by a user is a character
    assert only == [newer] and 'id="total">1<' in page
    assert 'name="subject" value="50%"' in page  # the form keeps what was asked
    assert listed(subject="HELD")[1] == both and listed(subject="_")[1] == []
    assert listed(listener="partners")[1] == [newer]
    assert listed(listener="SMTP")[1] == [older]  # a glob, any case, whole name
    assert listed(listener="p*", subject="first")[1] == []
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert listed(until=today)[1] == both  # a day given as "To" includes that day
    assert listed(since="1h", until="2000-01-01")[1] == []
    assert listed(since=today, until="1h")[1] == []  # "To" an age: held before 1 h ago
    for bad_time in ("yesterday-ish", "nan"):
        page, kept = listed(until=bad_time)
        assert "“To” must be" in page and kept == both


def test_page_links_keep_the_filter_url_encoded(console: tuple[HttpEnv, int]) -> None:
    """Over one page of matches: the links to the next page carry every filter, encoded
    (a subject with & and %), and lead to the rest of the same filtered list."""
    from avgate.frontends.http.console import PAGE
    from avgate.quarantine import Envelope, QuarantineStore
    from avgate.result import Finding, ScanResult, ScanStatus

    env, _ = console
    held = ScanResult(ScanStatus.INFECTED, findings=(Finding("Eicar-Test-Signature", "e", ""),))
    with QuarantineStore(env.root / "quarantine") as store:
        for i in range(PAGE + 1):
            store.put(b"Subject: bulk %d a&b=c 10%%+1\r\n\r\nx\r\n" % i,
                      Envelope(listener="bulk"), held, frontend="smtp")
    reader = signed_in(env, READ_TOKEN)
    first = reader.get("/console/quarantine", params={"subject": "a&b=c 10%+1",
                                                      "listener": "bulk"})
    assert 'id="total">51<' in first.text and "Page 1 of 2" in first.text
    nxt = re.search(r'<a href="\?([^"]+)" rel="next">', first.text)
    assert nxt is not None
    link = nxt.group(1).replace("&amp;", "&")
    assert "subject=a%26b%3Dc+10%25%2B1" in link or "subject=a%26b%3Dc%2010%25%2B1" in link
    second = reader.get(f"/console/quarantine?{link}")
    assert "Page 2 of 2" in second.text and 'id="total">51<' in second.text
    assert re.findall(r'class="subject">([^<]*)<', second.text) == ["bulk 0 a&amp;b=c 10%+1"]
