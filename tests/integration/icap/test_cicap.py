"""Real c-icap on both sides: our ICAP engine against c-icap's virus_scan (→ test clamd), and
Debian's ``c-icap-client`` as a real client against ``avgate serve``'s ICAP listener."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from avgate.engines.base import EngineContext
from avgate.engines.icap import IcapEngine
from avgate.result import ScanStatus
from avgate.spool import Spool
from tests.clamd_daemon import EICAR
from tests.helpers import require_binary

from .conftest import AvgateIcap, CIcap

pytestmark = pytest.mark.timeout(120)


def _engine(url: str, **settings: object) -> IcapEngine:
    return IcapEngine.from_settings(IcapEngine.Settings(name="cicap", url=url, **settings),
                                    EngineContext())


# -- our engine → c-icap ---------------------------------------------------------------------
async def test_engine_detects_eicar_through_cicap(cicap: CIcap) -> None:
    engine = _engine(cicap.url("avscan"))
    await engine.start()
    try:
        result = await engine.scan(Spool.from_bytes(EICAR))
        assert result.status is ScanStatus.INFECTED, result
        assert "Eicar" in result.virus
        assert result.findings[0].engine == "cicap"
        assert engine.db_version()  # c-icap's ISTag
    finally:
        await engine.close()


@pytest.mark.parametrize("size", [10, 5000, 300_000])
async def test_engine_clean_through_cicap(cicap: CIcap, size: int) -> None:
    engine = _engine(cicap.url("avscan"))
    data = (b"just some harmless text line\n" * (size // 29 + 1))[:size]
    result = await engine.scan(Spool.from_bytes(data))
    assert result.status is ScanStatus.CLEAN, result
    await engine.close()


async def test_engine_eicar_after_preview(cicap: CIcap) -> None:
    """EICAR beyond the preview: the rest goes out after 100 Continue."""
    engine = _engine(cicap.url("virus_scan"), preview=16)
    result = await engine.scan(Spool.from_bytes(EICAR))
    assert result.status is ScanStatus.INFECTED, result
    await engine.close()


async def test_engine_health_via_options(cicap: CIcap) -> None:
    engine = _engine(cicap.url("avscan"))
    report = await engine.health()  # one report per server (the engine takes several)
    assert report["ok"] is True and report["servers"][0]["istag"]
    bad = _engine(cicap.url("no_such_service"))
    report = await bad.health()
    assert report["ok"] is False and "404" in report["servers"][0]["error"]


# -- c-icap-client → avgate ------------------------------------------------------------------
def _client(srv: AvgateIcap, tmp_path: Path, *args: str) -> tuple[str, bytes]:
    binary = require_binary("c-icap-client", "c-icap")
    out = tmp_path / "out.bin"
    proc = subprocess.run(
        [binary, "-i", "127.0.0.1", "-p", str(srv.port), "-s", "avscan", "-v",
         "-o", str(out), *args],
        capture_output=True, timeout=30, check=False)
    text = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 0, text
    return text, out.read_bytes() if out.exists() else b""


def test_cicap_client_options(avgate_icap: AvgateIcap, tmp_path: Path) -> None:
    text, _ = _client(avgate_icap, tmp_path)
    assert "ICAP/1.0 200 OK" in text
    assert "Methods: RESPMOD, REQMOD" in text
    assert "ISTag:" in text and "Preview: 1024" in text and "Allow: 204" in text


def test_cicap_client_eicar_blocked(avgate_icap: AvgateIcap, tmp_path: Path) -> None:
    f = tmp_path / "eicar.com"
    f.write_bytes(EICAR)
    text, body = _client(avgate_icap, tmp_path, "-f", str(f), "-resp", "http://example.test/e")
    assert "X-Infection-Found: Type=0; Resolution=2; Threat=Eicar-Test-Signature;" in text
    assert "X-Virus-ID: Eicar-Test-Signature" in text
    assert b"Eicar-Test-Signature" in body and b"http://example.test/e" in body
    assert "HTTP/1.1 403 Forbidden" in text or b"403" in body


def test_cicap_client_clean_204(avgate_icap: AvgateIcap, tmp_path: Path) -> None:
    f = tmp_path / "clean.txt"
    f.write_bytes(b"nothing to see here\n" * 500)  # 10 KB: preview, 100 Continue, rest
    text, _ = _client(avgate_icap, tmp_path, "-f", str(f), "-resp", "http://example.test/c")
    assert "ICAP/1.0 204" in text, text
    assert "X-Infection-Found" not in text


def test_cicap_client_clean_echo_without_204(avgate_icap: AvgateIcap, tmp_path: Path) -> None:
    f = tmp_path / "clean.bin"
    data = bytes(range(256)) * 400
    f.write_bytes(data)
    text, body = _client(avgate_icap, tmp_path, "-f", str(f), "-resp", "http://example.test/c",
                         "-no204", "-noreshdr")
    assert "ICAP/1.0 200" in text, text
    assert body.endswith(data)


def test_cicap_client_reqmod_upload_blocked(avgate_icap: AvgateIcap, tmp_path: Path) -> None:
    f = tmp_path / "upload.bin"
    f.write_bytes(EICAR)
    text, body = _client(avgate_icap, tmp_path, "-f", str(f), "-req", "http://example.test/up",
                         "-method", "POST")
    assert "X-Virus-ID: Eicar-Test-Signature" in text, text
    assert b"Eicar-Test-Signature" in body
