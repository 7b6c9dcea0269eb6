"""The HTTP proxy's pure parts: targets, hop-by-hop headers, Via, ACL matching, the relay
window, the settings; and what h11 (the framing both sides use) does with hostile heads."""

from __future__ import annotations

import h11
import pytest

from avgate import config
from avgate.errors import ConfigError
from avgate.frontends.http_proxy.acl import (
    DEFAULT_ACLS,
    Request,
    Subject,
    compile_acls,
    detected_types,
    first_match,
)
from avgate.frontends.http_proxy.headers import (
    TargetError,
    check_head,
    forward_headers,
    is_loopback,
    parse_target,
    split_authority,
    via_loop,
)
from avgate.frontends.http_proxy.settings import AclSettings, HttpProxySettings, parse_parent
from avgate.result import ScanStatus
from avgate.spool import Spool
from avgate.trickle import Relay

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


# -- targets ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("target", "host", "port", "path", "url"), [
    (b"http://Example.COM/a?b=1", "example.com", 80, "/a?b=1", "http://example.com/a?b=1"),
    (b"http://example.com", "example.com", 80, "/", "http://example.com/"),
    (b"http://example.com:8080/x#frag", "example.com", 8080, "/x",
     "http://example.com:8080/x"),
    (b"http://[::1]:81/", "::1", 81, "/", "http://[::1]:81/"),
    (b"HTTP://h?q", "h", 80, "/?q", "http://h/?q"),
])
def test_absolute_targets(target: bytes, host: str, port: int, path: str, url: str) -> None:
    t = parse_target(b"GET", target)
    assert (t.host, t.port, t.path, t.url) == (host, port, path, url)


@pytest.mark.parametrize(("method", "target", "status"), [
    (b"GET", b"/index.html", 400),  # origin-form: not a proxy request
    (b"GET", b"https://example.com/", 501),  # https goes through CONNECT
    (b"GET", b"ftp://example.com/", 501),
    (b"GET", b"http://user:pw@example.com/", 400),
    (b"GET", b"http://exa mple.com/", 400),
    (b"GET", b"http://example.com:0/", 400),
    (b"GET", b"http://example.com:99999/", 400),
    (b"GET", b"http://[::1/", 400),
    (b"GET", b"http:///path", 400),
    (b"GET", "http://ex\u00e4mple.com/".encode(), 400),
    (b"CONNECT", b"example.com", 400),  # CONNECT needs a port
    (b"CONNECT", b"http://example.com:443/", 400),
])
def test_bad_targets(method: bytes, target: bytes, status: int) -> None:
    with pytest.raises(TargetError) as exc:
        parse_target(method, target)
    assert exc.value.status == status


def test_connect_target() -> None:
    t = parse_target(b"CONNECT", b"Example.com:443")
    assert (t.host, t.port, t.url) == ("example.com", 443, "Example.com:443")


def test_authority() -> None:
    assert split_authority("h:8080", 80) == ("h", 8080)
    assert split_authority("[2001:db8::1]", 80) == ("2001:db8::1", 80)
    assert parse_target(b"GET", b"http://h:80/").authority == "h"
    assert parse_target(b"GET", b"http://[::1]:8080/").authority == "[::1]:8080"


def test_check_head_limits_and_smuggling() -> None:
    ok = check_head(b"GET", b"http://h/", [(b"host", b"h")], max_request_line=100,
                    max_header_size=1000)
    assert ok.host == "h"
    with pytest.raises(TargetError) as exc:
        check_head(b"GET", b"http://h/" + b"a" * 200, [], max_request_line=100,
                   max_header_size=10_000)
    assert exc.value.status == 414
    with pytest.raises(TargetError) as exc:
        check_head(b"GET", b"http://h/", [(b"x", b"y" * 2000)], max_request_line=100,
                   max_header_size=1000)
    assert exc.value.status == 431
    with pytest.raises(TargetError) as exc:
        check_head(b"POST", b"http://h/", [(b"content-length", b"5"),
                                           (b"transfer-encoding", b"chunked")],
                   max_request_line=100, max_header_size=1000)
    assert exc.value.status == 400


# -- headers ---------------------------------------------------------------------------------
def test_hop_by_hop_removed_and_via_added() -> None:
    headers = [(b"Host", b"wrong.example"), (b"Connection", b"keep-alive, X-Secret"),
               (b"Keep-Alive", b"timeout=5"), (b"Proxy-Authorization", b"Basic eA=="),
               (b"Proxy-Connection", b"keep-alive"), (b"TE", b"trailers"),
               (b"Trailer", b"X"), (b"Transfer-Encoding", b"chunked"), (b"Upgrade", b"h2c"),
               (b"X-Secret", b"1"), (b"Via", b"1.0 other"), (b"Accept", b"*/*")]
    out = forward_headers(headers, via="me", version=b"1.1", host="right.example:8080")
    names = [n.lower() for n, _ in out]
    assert names == [b"host", b"accept", b"via"]
    assert dict(out)[b"Host"] == b"right.example:8080"  # the URI's authority, not Host
    assert dict(out)[b"Via"] == b"1.0 other, 1.1 me"


def test_forward_keeps_repeated_fields_in_order() -> None:
    headers = [(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"Content-Length", b"3")]
    out = forward_headers(headers, via="me", version=b"1.0")
    assert out[:3] == headers
    assert out[3] == (b"Via", b"1.0 me")
    dropped = forward_headers(headers, via="me", version=b"1.1",
                              drop=frozenset({b"content-length"}))
    assert (b"Content-Length", b"3") not in dropped


def test_via_loop() -> None:
    assert via_loop([(b"Via", b"1.1 other, 1.1 Me")], "me")
    assert via_loop([(b"via", b"1.1 a"), (b"via", b"HTTP/1.1 me (avgate)")], "me")
    assert not via_loop([(b"Via", b"1.1 mine, 1.1 other")], "me")
    assert not via_loop([], "me")


# -- what h11 does with hostile heads (the framing both sides rely on) ----------------------
def _parse(data: bytes, **kw: int) -> list[object]:
    conn = h11.Connection(h11.SERVER, **kw)
    conn.receive_data(data)
    events: list[object] = []
    while True:
        ev = conn.next_event()
        events.append(ev)
        if ev is h11.NEED_DATA or isinstance(ev, h11.EndOfMessage):
            return events


def test_h11_conflicting_content_length_refused() -> None:
    with pytest.raises(h11.RemoteProtocolError) as exc:
        _parse(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
               b"Content-Length: 6\r\n\r\nhello")
    assert exc.value.error_status_hint == 400


def test_h11_identical_content_lengths_merged() -> None:
    req, data, _ = _parse(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                          b"Content-Length: 5\r\n\r\nhello")
    assert isinstance(req, h11.Request) and isinstance(data, h11.Data)
    assert [v for n, v in req.headers if n == b"content-length"] == [b"5"]


def test_h11_cl_te_takes_chunked_so_the_proxy_refuses_it() -> None:
    req = _parse(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")[0]
    assert isinstance(req, h11.Request)  # h11 accepts it ...
    with pytest.raises(TargetError) as exc:  # ... the proxy does not
        check_head(req.method, req.target, list(req.headers.raw_items()),
                   max_request_line=8192, max_header_size=65536)
    assert exc.value.status == 400


def test_h11_unfolds_obs_fold() -> None:
    req = _parse(b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n")[0]
    assert isinstance(req, h11.Request)
    assert dict(req.headers)[b"x-a"] == b"b c"  # re-serialised on one line upstream


def test_h11_incomplete_head_bounded() -> None:
    with pytest.raises(h11.RemoteProtocolError) as exc:
        _parse(b"GET http://a/ HTTP/1.1\r\nX: " + b"a" * 5000, max_incomplete_event_size=4096)
    assert exc.value.error_status_hint == 431


@pytest.mark.parametrize("te", [b"gzip, chunked", b"xchunked", b"identity"])
def test_h11_refuses_other_transfer_codings(te: bytes) -> None:
    with pytest.raises(h11.RemoteProtocolError):
        _parse(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + te
               + b"\r\n\r\n")


# -- ACLs ------------------------------------------------------------------------------------
def _req(method: str = "GET", host: str = "example.com", port: int = 80,
         client: str = "127.0.0.1", url: str = "") -> Request:
    return Request(client, method, host, port, url or f"http://{host}/file")


def test_default_acls() -> None:
    acls = compile_acls(())
    assert acls == DEFAULT_ACLS
    assert first_match(acls, _req("CONNECT", port=443), Subject()).action == "pass"  # type: ignore[union-attr]
    assert first_match(acls, _req("CONNECT", port=8443), Subject()).action == "deny"  # type: ignore[union-attr]
    assert first_match(acls, _req(), None).action == "scan"  # type: ignore[union-attr]


def test_first_match_wins_by_client_host_url_method() -> None:
    acls = compile_acls([
        AclSettings(name="lan-updates", clients=("10.0.0.0/8",), hosts=("*.debian.org",),
                    action="pass"),
        AclSettings(name="no-put", methods=("put", "DELETE"), action="deny"),
        AclSettings(name="exe", urls=("*.exe",), action="deny"),
    ])
    assert first_match(acls, _req(client="10.1.2.3", host="deb.debian.org"), None).name \
        == "lan-updates"  # type: ignore[union-attr]
    assert first_match(acls, _req(client="192.0.2.1", host="deb.debian.org"), None).name \
        == "default:scan"  # type: ignore[union-attr]
    assert first_match(acls, _req("PUT"), None).name == "no-put"  # type: ignore[union-attr]
    assert first_match(acls, _req(url="http://h/setup.exe"), None).name == "exe"  # type: ignore[union-attr]
    assert first_match(acls, _req(client="::ffff:10.0.0.1", host="a.debian.org"),
                       None).name == "lan-updates"  # type: ignore[union-attr]


def test_object_conditions_wait_for_the_bytes() -> None:
    acls = compile_acls([
        AclSettings(name="zip-deny", content_types=("application/zip",), action="deny"),
        AclSettings(name="big-pass", size="10 MiB-", action="pass"),
        AclSettings(name="claims-image", declared_types=("image/*",), action="scan",
                    accept=("clean", "skipped")),
    ])
    # the first ACL needs the body's bytes: undecided at request time
    assert first_match(acls, _req(), None) is None
    zipped = Subject("image/png", b"PK\x03\x04" + b"\0" * 30, 100)
    assert first_match(acls, _req(), zipped).name == "zip-deny"  # type: ignore[union-attr]
    big = Subject("text/plain", b"hello", 20 << 20)
    assert first_match(acls, _req(), big).name == "big-pass"  # type: ignore[union-attr]
    unknown_size = Subject("text/plain", b"hello", None)
    assert first_match(acls, _req(), unknown_size).name == "default:scan"  # type: ignore[union-attr]
    png = Subject("image/png", b"\x89PNG\r\n\x1a\n", 10)
    acl = first_match(acls, _req(), png)
    assert acl is not None and acl.name == "claims-image"
    assert acl.accepts(ScanStatus.SKIPPED) is True
    assert acl.accepts(ScanStatus.UNKNOWN) is False
    assert DEFAULT_ACLS[-1].accepts(ScanStatus.CLEAN) is None  # the policy decides


def test_detected_types_come_from_the_bytes() -> None:
    assert "image/png" in detected_types(b"\x89PNG\r\n\x1a\n....")
    assert detected_types(b"PK\x03\x04rest") == ("application/zip",)
    assert detected_types(b"\x1f\x8b\x08\x00") == ("application/gzip",)
    assert detected_types(EICAR) == ("application/octet-stream",)
    # EICAR labelled image/png is not an image to an ACL
    acls = compile_acls([AclSettings(content_types=("image/*",), action="pass")])
    assert first_match(acls, _req(), Subject("image/png", EICAR, 68)).action == "scan"  # type: ignore[union-attr]


# -- relay window ----------------------------------------------------------------------------
def test_relay_keep_back_window() -> None:
    """Keep-back: what is held in memory is the tail not yet released, never the body."""
    data = bytes(range(256)) * 40
    with Spool(memory_limit=1024) as spool:  # on disk: the rest is read back from there
        relay = Relay(spool, None)
        out = b""
        for i in range(0, len(data), 100):
            relay.add(data[i:i + 100])
            out += relay.take(relay.received - 300)
            assert relay.received - relay.sent <= 300
            assert relay.buffered_until - relay.sent <= 300  # the in-memory window
        assert out == data[:len(data) - 300]
        spool.finish()
        assert out + b"".join(relay.rest(64)) == data


def test_relay_take_and_rest_reassemble() -> None:
    data = bytes(range(256)) * 20
    for window in (None, 0, 1000, 10_000):
        with Spool(memory_limit=2048) as spool:
            relay = Relay(spool, window)
            out = b""
            for i in range(0, len(data), 333):
                relay.add(data[i:i + 333])
                out += relay.take(relay.received - 500)
            if window is not None:
                assert relay.sent <= window
            spool.finish()
            out += b"".join(relay.rest(100))
            assert out == data
            assert relay.sent == len(data)


# -- settings --------------------------------------------------------------------------------
def test_settings_from_toml() -> None:
    c = config.loads("""
[http_proxy]
listen = "127.0.0.1:3129"
parent = "http://squid.example:3128"
via = "gw1"
[http_proxy.trickle]
mode = "trickle"
interval = 2.0
[[http_proxy.acl]]
name = "updates"
hosts = ["*.Debian.org"]
methods = "get"
ports = 80
action = "pass"
[[http_proxy.acl]]
clients = ["192.0.2.0/24"]
accept = ["clean", "skipped"]
""")
    s = c.http_proxy
    assert isinstance(s, HttpProxySettings)
    assert s.parent == "http://squid.example:3128"
    assert s.trickle.mode == "trickle" and s.trickle.interval == 2.0
    assert s.acl[0].hosts == ("*.debian.org",) and s.acl[0].methods == ("GET",)
    assert s.acl[0].ports == (80,)
    assert s.acl[1].accept == ("clean", "skipped")


def test_default_runs_without_config_file() -> None:
    c = config.defaults()
    assert isinstance(c.http_proxy, HttpProxySettings)
    assert str(c.http_proxy.listen) == "127.0.0.1:3128"


@pytest.mark.parametrize(("toml", "needle"), [
    ('parent = "squid:3128"', "parent"),
    ('parent = "https://squid:3128"', "parent"),
    ('via = "a b"', "via"),
    ('[[http_proxy.acl]]\naction = "block"', "action"),
    ('[[http_proxy.acl]]\nclients = ["not-a-net"]', "clients"),
    ('[[http_proxy.acl]]\nports = [0]', "ports"),
    ('[[http_proxy.acl]]\naccept = ["fine"]', "accept"),
    ('[[http_proxy.acl]]\nmethods = ["GE T"]', "methods"),
    ("max_connections = 0", "max_connections"),
])
def test_bad_settings_name_the_key(toml: str, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config.loads("[http_proxy]\n" + toml)
    assert needle in str(exc.value)


def test_parse_parent() -> None:
    assert parse_parent("http://proxy") == ("proxy", 3128)
    assert parse_parent("http://10.0.0.1:8080/") == ("10.0.0.1", 8080)
    with pytest.raises(ValueError):
        parse_parent("http://u:p@proxy:8080")


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("LOCALHOST", True), ("app.localhost", True), ("0.0.0.0", True),
    ("::ffff:127.0.0.1", True), ("192.0.2.1", False), ("example.com", False),
    ("localhost.example.com", False), ("", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    """Remote clients may not reach these through the proxy (the gateway's own services)."""
    assert is_loopback(host) is loopback


# -- the upstream pool -----------------------------------------------------------------------
class _FakeUpstream:
    """What Pool uses of an Upstream: key, reusable, next_cycle(), abort()."""

    def __init__(self, key: tuple[str, int], reusable: bool = True) -> None:
        self.key = key
        self.reusable = reusable
        self.aborted = False

    def next_cycle(self) -> bool:
        return self.reusable and not self.aborted

    def abort(self) -> None:
        self.aborted = True


def test_pool_reuses_by_host_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    from avgate.frontends.http_proxy import upstream

    clock = [1000.0]
    monkeypatch.setattr(upstream.time, "monotonic", lambda: clock[0])
    pool = upstream.Pool(per_key=2, total=3, idle=30)
    a, b, c = (_FakeUpstream(("a", 80)) for _ in range(3))
    for up in (a, b, c):
        pool.put(up)  # type: ignore[arg-type]
    assert a.aborted and len(pool) == 2  # per_key: the oldest goes
    assert pool.get("a", 80) is c and pool.get("a", 80) is b and pool.get("a", 80) is None
    assert pool.get("a", 81) is None
    broken = _FakeUpstream(("x", 80), reusable=False)
    pool.put(broken)  # type: ignore[arg-type]
    assert broken.aborted and len(pool) == 0
    others = [_FakeUpstream((f"h{i}", 80)) for i in range(4)]
    for up in others:
        clock[0] += 1
        pool.put(up)  # type: ignore[arg-type]
    assert others[0].aborted and len(pool) == 3  # total: the oldest anywhere goes
    clock[0] += 31
    late = _FakeUpstream(("late", 80))
    pool.put(late)  # type: ignore[arg-type]  # the sweep closes the idle ones
    assert all(up.aborted for up in others) and len(pool) == 1
    clock[0] += 31
    assert pool.get("late", 80) is None and late.aborted  # expired while idle
    pool.close()
