"""The embedded engine and a real clamd, loaded with the same generated ClamAV database.

Differential: the database (a ``.cud`` holding an entry of every supported kind, plus one
PCRE logical signature we count as unsupported) goes to a private clamd and to the embedded
engine; both scan every sample and the clean corpus. Verdicts must agree, except where we
counted the signature as unsupported; and clamd's "Loaded N signatures" must equal our loaded
plus our unsupported entries (the ignore list and the engine configuration are not
signatures, for ClamAV either).
"""

from __future__ import annotations

import hashlib
import re
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from avgate.engines.base import EngineContext
from avgate.engines.embedded import EmbeddedEngine, EmbeddedEngineSettings
from avgate.result import ScanStatus
from tests import corpus
from tests.clamd_daemon import ClamdDaemon
from tests.helpers import require_clamd, strict_dependencies
from tests.unit.engines.test_clamavdb_samples import build_container, generated_database

pytestmark = [pytest.mark.clamd, pytest.mark.timeout(120)]

FILES, SAMPLES = generated_database()
CLEAN = [s for s in corpus.corpus() if s.expected is ScanStatus.CLEAN]


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sigdb")
    (root / "test.cud").write_bytes(build_container("cud", FILES, version=3))
    return root


@pytest.fixture(scope="module")
def clamd_with_db(database: Path) -> Iterator[ClamdDaemon]:
    daemon = ClamdDaemon(require_clamd())
    for path in daemon.db_dir.iterdir():
        path.unlink()
    (daemon.db_dir / "test.cud").write_bytes((database / "test.cud").read_bytes())
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.cleanup()


def clamd_scan(daemon: ClamdDaemon, data: bytes) -> str | None:
    """zINSTREAM → the signature name (without ``.UNOFFICIAL``), or None for OK."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as s:
        s.sendall(b"zINSTREAM\0" + struct.pack("!I", len(data)) + data + struct.pack("!I", 0))
        reply = b""
        while not reply.endswith(b"\0"):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    text = reply.rstrip(b"\0").decode()
    if text.endswith(" FOUND"):
        return text.split(": ", 1)[1][:-len(" FOUND")].removesuffix(".UNOFFICIAL")
    assert text.endswith(": OK"), text
    return None


@pytest.fixture(scope="module")
def engine(database: Path) -> EmbeddedEngine:
    eng = EmbeddedEngine(EmbeddedEngineSettings(clamav_db=(str(database),), builtin=False,
                                                reload_interval=0),
                         EngineContext(workers=1))
    eng.load()
    return eng


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.label)
def test_same_verdict_as_clamd(clamd_with_db: ClamdDaemon, engine: EmbeddedEngine,
                               sample: object) -> None:
    ours = engine.match_part(sample.data)  # type: ignore[attr-defined]
    theirs = clamd_scan(clamd_with_db, sample.data)  # type: ignore[attr-defined]
    assert theirs == sample.clamd_name, "clamd"  # type: ignore[attr-defined]
    assert ours == ([sample.name] if sample.name else [])  # type: ignore[attr-defined]


def test_clean_corpus_clean_for_both(clamd_with_db: ClamdDaemon,
                                     engine: EmbeddedEngine) -> None:
    for sample in CLEAN:
        assert clamd_scan(clamd_with_db, sample.data) is None, sample.name
        assert engine.match_part(sample.data) == [], sample.name


def test_signature_count_matches_clamd(clamd_with_db: ClamdDaemon,
                                       engine: EmbeddedEngine) -> None:
    log = Path(clamd_with_db.log_path).read_text()
    loaded = int(re.findall(r"Loaded (\d+) signatures", log)[-1])
    stats = engine._db.stats
    assert loaded == stats.total_loaded() + stats.total_unsupported()
    assert stats.total_unsupported() == 1


def test_pe_signatures_inside_archives_and_mail(engine: EmbeddedEngine) -> None:
    """A section-hash and an EP signature hit inside a zip and a MIME attachment too."""
    by_label = {s.label: s for s in SAMPLES}
    for label in ("pe section", "Test.Body.ep", "Test.Ldb.pe"):
        sample = by_label[label]
        zipped = corpus.make_zip([("x.exe", sample.data)])
        mail = corpus.mail(attachments=[("x.exe", sample.data)])
        for data in (zipped, mail):
            result = engine.scan_bytes(data)
            assert result.status is ScanStatus.INFECTED, label
            assert result.virus == sample.name



# -- ClamAV's own sample files (Debian clamav-testfiles) --------------------------------------

TESTFILES = Path("/usr/share/clamav-testfiles")
#: wrappings of clam.exe the engine must open (the formats decomposition has long supported)
MUST_DETECT = ("clam.exe", "clam.zip", "clam.7z", "clam.tar.gz", "clam.exe.bz2",
               "clam.bz2.zip", "clam.exe.mbox.base64", "clam.mail")


def _clam_exe_signatures() -> tuple[str, str]:
    """An .hdb line for clam.exe and an .mdb line for its one section, with ClamAV's bounds:
    its header says offset 1, size 512; ClamAV rounds the offset down and the size up to
    FileAlignment (512), so the section hashed is bytes 0..512."""
    exe = (TESTFILES / "clam.exe").read_bytes()
    pe = struct.unpack_from("<I", exe, 0x3C)[0]
    optional = struct.unpack_from("<H", exe, pe + 20)[0]
    falign = struct.unpack_from("<I", exe, pe + 24 + 36)[0]
    size, offset = struct.unpack_from("<II", exe, pe + 24 + optional + 16)
    raw, rsz = offset // falign * falign, -(-size // falign) * falign
    assert (offset, size, raw, rsz) == (1, 512, 0, 512)
    md5 = hashlib.md5
    return (f"{md5(exe).hexdigest()}:{len(exe)}:Test.ClamExe.Hash\n",
            f"{rsz}:{md5(exe[raw:raw + rsz]).hexdigest()}:Test.ClamExe.Section\n")


@pytest.fixture(scope="module")
def testfiles_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ClamdDaemon,
                                                                             EmbeddedEngine]]:
    if not (TESTFILES / "clam.exe").exists():
        if strict_dependencies():
            pytest.fail("clamav-testfiles is not installed; CI must install it")
        pytest.skip("clamav-testfiles not installed (apt-get install clamav-testfiles)")
    hdb, mdb = _clam_exe_signatures()
    root = tmp_path_factory.mktemp("testfiles-db")
    (root / "clam.hdb").write_text(hdb)
    (root / "clam.mdb").write_text(mdb)
    daemon = ClamdDaemon(require_clamd())
    for path in daemon.db_dir.iterdir():
        path.unlink()
    for name in ("clam.hdb", "clam.mdb"):
        (daemon.db_dir / name).write_text((root / name).read_text())
    engine = EmbeddedEngine(EmbeddedEngineSettings(clamav_db=(str(root),), builtin=False,
                                                   reload_interval=0),
                            EngineContext(workers=1))
    engine.load()
    try:
        daemon.start()
        yield daemon, engine
    finally:
        daemon.cleanup()


@pytest.mark.parametrize("name", sorted(p.name for p in TESTFILES.iterdir())
                         if TESTFILES.is_dir() else ["clam.exe"])
def test_clamav_testfiles(testfiles_db: tuple[ClamdDaemon, EmbeddedEngine], name: str) -> None:
    """clamd finds clam.exe (by file hash or section hash) in every one of its sample files.
    We find it in every wrapping we decompose, with the same names; where we do not open the
    wrapping (packers, installers, ARJ, CHM, ...) the verdict is clean or unknown — never a
    different name, never an error."""
    daemon, engine = testfiles_db
    data = (TESTFILES / name).read_bytes()
    theirs = clamd_scan(daemon, data)
    assert theirs in ("Test.ClamExe.Hash", "Test.ClamExe.Section")
    result = engine.scan_bytes(data)
    names = {f.name for f in result.findings}
    assert names <= {"Test.ClamExe.Hash", "Test.ClamExe.Section"}
    assert result.status is not ScanStatus.ERROR, result.reason
    if name in MUST_DETECT:
        assert names == {"Test.ClamExe.Hash", "Test.ClamExe.Section"}, result.reason
