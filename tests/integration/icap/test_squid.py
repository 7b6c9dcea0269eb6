"""Real Squid using ``avgate serve`` as its RESPMOD and REQMOD ICAP service, fetching from a
loopback origin server: clean objects pass byte-identical, EICAR gets our block page."""

from __future__ import annotations

import httpx
import pytest

from tests.clamd_daemon import EICAR

from .conftest import CLEAN_BODY, FILES, AvgateIcap, Origin, Squid

pytestmark = pytest.mark.timeout(120)


def _client(squid: Squid) -> httpx.Client:
    return httpx.Client(proxy=squid.proxy, timeout=30, trust_env=False)


def test_clean_download_passes_byte_identical(squid: Squid, origin: Origin) -> None:
    with _client(squid) as client:
        for path in ("/clean.bin", "/small.txt"):
            r = client.get(origin.url(path))
            assert r.status_code == 200, r.text[:500]
            assert r.content == FILES[path]
    assert len(CLEAN_BODY) > 1024  # more than the preview: 100 Continue, then the rest


def test_eicar_download_blocked_with_our_page(squid: Squid, origin: Origin,
                                              avgate_icap: AvgateIcap) -> None:
    with _client(squid) as client:
        r = client.get(origin.url("/eicar.com"))
    assert r.status_code == 403, r.text[:500]
    assert "Eicar-Test-Signature" in r.text
    assert "blocked by avgate" in r.text
    assert EICAR not in r.content
    assert '"status":"infected"' in avgate_icap.output().replace(" ", "")


def test_keepalive_many_requests(squid: Squid, origin: Origin) -> None:
    """Several objects in a row over Squid's persistent ICAP connection(s)."""
    with _client(squid) as client:
        for i in range(10):
            path = "/eicar.com" if i % 3 == 0 else "/small.txt"
            r = client.get(origin.url(path) + f"?n={i}")
            assert r.status_code == (403 if path == "/eicar.com" else 200)


def test_clean_upload_passes(squid: Squid, origin: Origin) -> None:
    data = b"a perfectly normal upload\n" * 2000
    with _client(squid) as client:
        r = client.post(origin.url("/upload"), content=data,
                        headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text[:500]
    assert origin.uploads and origin.uploads[-1] == data


def test_eicar_upload_blocked_by_reqmod(squid: Squid, origin: Origin) -> None:
    before = len(origin.uploads)
    with _client(squid) as client:
        r = client.post(origin.url("/upload"), content=EICAR,
                        headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 403, r.text[:500]
    assert "Eicar-Test-Signature" in r.text
    assert len(origin.uploads) == before  # the origin never saw it
