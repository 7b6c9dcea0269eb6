"""Differential test: avgate's embedded engine against a real clamd, same signatures, whole
generated corpus (tests/corpus.py: the base samples, part A's documents, part B's containers).

clamd is the floor (issue 20): whatever clamd flags, avgate must flag too. What avgate flags
beyond clamd (infected, or not vouched for: unknown/skipped, where clamd says clean) is
printed as one summary line per sample and a total (``pytest -s`` shows them).

The signatures are written by this test into one directory: the EICAR MD5 (.hdb) and the
body marker (.ndb). clamd loads it as its DatabaseDirectory, the embedded engine as its
``signatures`` (built-in EICAR detection and ClamAV's system database off), so both engines
see exactly the same database.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from avgate.engines.base import EngineContext, build_engine
from avgate.engines.clamd import ClamdEngine, ClamdEngineSettings
from avgate.engines.embedded import EmbeddedEngine, EmbeddedEngineSettings
from avgate.limits import Limits
from avgate.result import ScanStatus
from avgate.spool import Spool
from tests import corpus
from tests.clamd_daemon import ClamdDaemon
from tests.helpers import require_clamd

pytestmark = [pytest.mark.clamd, pytest.mark.timeout(120)]


def all_samples() -> list[corpus.Sample]:
    """Every sample of the corpus (documents and containers included)."""
    return list(corpus.corpus())


def write_database(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    md5 = hashlib.md5(corpus.EICAR, usedforsecurity=False).hexdigest()
    (directory / "test.hdb").write_text(f"{md5}:{len(corpus.EICAR)}:{corpus.EICAR_NAME}\n")
    (directory / "test.ndb").write_text(corpus.MARKER_NDB)


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("differential") / "db"
    write_database(directory)
    return directory


@pytest.fixture(scope="module")
def own_clamd(database: Path) -> Iterator[ClamdDaemon]:
    """A clamd of its own whose DatabaseDirectory is the test's database."""
    daemon = ClamdDaemon(require_clamd())
    for stale in daemon.db_dir.iterdir():
        stale.unlink()
    for signature in database.iterdir():
        (daemon.db_dir / signature.name).write_bytes(signature.read_bytes())
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.cleanup()


@pytest.fixture
async def clamd_engine(own_clamd: ClamdDaemon) -> AsyncIterator[ClamdEngine]:
    engine = ClamdEngine(ClamdEngineSettings(servers=own_clamd.unix, scan_timeout=30),
                         EngineContext())
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture(scope="module")
def embedded(database: Path) -> EmbeddedEngine:
    ctx = EngineContext(limits=Limits(), base_dir=str(database))
    engine = build_engine(EmbeddedEngineSettings(signatures=str(database), builtin=False,
                                                 clamav_db=()), ctx)
    assert isinstance(engine, EmbeddedEngine)
    engine.load()
    return engine


def _label(status: ScanStatus, virus: str | None) -> str:
    return f"{status.value} ({virus})" if virus else status.value


async def test_avgate_flags_everything_clamd_flags(clamd_engine: ClamdEngine,
                                                   embedded: EmbeddedEngine) -> None:
    samples = all_samples()
    assert len({s.name for s in samples}) == len(samples), "sample names must be unique"
    containers = {s.name for s in getattr(corpus, "container_samples", list)()}
    missed: list[str] = []
    beyond: list[str] = []
    for sample in samples:
        theirs = await clamd_engine.scan(Spool.from_bytes(sample.data))
        assert theirs.status in (ScanStatus.CLEAN, ScanStatus.INFECTED), (
            sample.name, theirs.reason)  # clamd errors would make the comparison void
        if sample.name in containers:  # keeps the corpus' notes on clamd honest
            clamd_expected = sample.clamd_expected or sample.expected
            if clamd_expected in (ScanStatus.UNKNOWN, ScanStatus.SKIPPED):
                clamd_expected = ScanStatus.CLEAN  # clamd has no such verdict
            assert theirs.status is clamd_expected, sample.name
        ours = embedded.scan_bytes(sample.data)
        their_names = {f.name.removesuffix(".UNOFFICIAL") for f in theirs.findings}
        our_names = {f.name for f in ours.findings}
        if theirs.status is ScanStatus.INFECTED and not their_names <= our_names:
            missed.append(f"{sample.name}: clamd {sorted(their_names)}, avgate "
                          f"{_label(ours.status, ours.virus)} {ours.reason}")
        elif theirs.status is ScanStatus.CLEAN and ours.status is not ScanStatus.CLEAN:
            beyond.append(f"{sample.name}: avgate {_label(ours.status, ours.virus)}"
                          + (f" - {ours.reason}" if ours.reason else ""))
    print(f"\ndifferential vs clamd: {len(samples)} samples, avgate flags {len(beyond)} "
          "beyond clamd:")
    for line in beyond:
        print(f"  beyond clamd: {line}")
    assert not missed, "clamd flags what avgate does not:\n" + "\n".join(missed)


def test_corpus_covers_every_new_container() -> None:
    # The differential comparison is only as good as the corpus it runs over.
    names = {s.name for s in all_samples()}
    for expected in ("eicar.rar", "marker-v4.rar", "eicar.cab", "eicar.iso", "eicar.cpio",
                     "eicar.lzh", "eicar.arj", "zip-local-only.zip", "eicar-package.doc",
                     "marker-macro.doc", "eicar-package.rtf", "eicar-embedded-ole.docx"):
        assert expected in names
