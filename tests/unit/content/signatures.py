"""An embedded engine with only the test signatures, for the document format tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

from avgate.engines.base import EngineContext, build_engine
from avgate.engines.embedded import EmbeddedEngine, EmbeddedEngineSettings
from avgate.limits import Limits
from tests.corpus import EICAR, EICAR_NAME, MARKER_NDB

EICAR_MD5 = hashlib.md5(EICAR, usedforsecurity=False).hexdigest()


def signature_engine(directory: Path, extra_ndb: str = "",
                     limits: Limits | None = None) -> EmbeddedEngine:
    """EICAR by the md5 of its exact 68 bytes and the marker as a body signature (plus
    ``extra_ndb`` lines), no built-in EICAR check: a finding means that decomposition
    produced the payload exactly. Scans with ``scan_bytes`` (no worker pool)."""
    (directory / "test.hdb").write_text(f"{EICAR_MD5}:{len(EICAR)}:{EICAR_NAME}\n")
    (directory / "test.ndb").write_text(MARKER_NDB + extra_ndb)
    engine = build_engine(EmbeddedEngineSettings(signatures=["."], builtin=False),
                          EngineContext(limits=limits or Limits(), base_dir=str(directory)))
    assert isinstance(engine, EmbeddedEngine)
    engine.load()
    return engine
