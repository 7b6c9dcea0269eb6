"""schemathesis (its CLI) against the served /openapi.json: generated requests for every
operation, every check (status codes, content types, schemas, auth, Allow headers...).

Bounded: ``AVGATE_SCHEMATHESIS_EXAMPLES`` examples per operation (default 10), and a time
budget. (schemathesis' own pytest plugin does not load under pytest 9, hence the CLI.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TOKEN, HttpEnv

EXAMPLES = int(os.environ.get("AVGATE_SCHEMATHESIS_EXAMPLES", "10"))


def _schemathesis() -> str:
    local = Path(sys.executable).with_name("schemathesis")
    found = str(local) if local.exists() else shutil.which("schemathesis")
    if found is None:
        pytest.skip("schemathesis is not installed (pip install 'schemathesis>=4.3,<5')")
    return found


def test_api_conforms_to_its_openapi_document(http_env: HttpEnv, tmp_path: Path) -> None:
    r = subprocess.run(
        [_schemathesis(), "run", f"{http_env.base_url}/openapi.json",
         "--checks", "all", "--max-examples", str(EXAMPLES), "--workers", "1",
         "--seed", "1", "-H", f"Authorization: Bearer {TOKEN}"],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
        env={**os.environ, "NO_COLOR": "1"})
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "Tested: 9" in r.stdout  # every operation of the document was exercised
