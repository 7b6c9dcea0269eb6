"""``[quarantine] backend`` and ``[scan] cache_backend``: what the config accepts and what
it opens (the backends themselves: tests/integration/test_postgres_quarantine.py and
test_redis_cache.py, against real servers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from avgate import config as config_mod
from avgate.errors import ConfigError, QuarantineError
from avgate.quarantine import QuarantineStore, open_store


def test_postgresql_needs_a_dsn() -> None:
    with pytest.raises(ConfigError, match="dsn"):
        config_mod.from_dict({"quarantine": {"backend": "postgresql"}})
    with pytest.raises(ConfigError, match="backend"):
        config_mod.from_dict({"quarantine": {"backend": "mysql"}})
    with pytest.raises(ConfigError, match="db_timeout"):
        config_mod.from_dict({"quarantine": {"db_timeout": 0}})


def test_the_default_backend_is_the_file_store(tmp_path: Path) -> None:
    cfg = config_mod.from_dict({"quarantine": {"path": str(tmp_path / "q")}})
    assert cfg.quarantine.backend == "file"
    store = open_store(cfg)
    try:
        assert isinstance(store, QuarantineStore) and store.backend == "file"
    finally:
        store.close()


def test_a_postgresql_store_that_cannot_be_reached_is_a_quarantine_error() -> None:
    pytest.importorskip("psycopg")
    cfg = config_mod.from_dict({"quarantine": {
        "backend": "postgresql", "dsn": "postgresql://nobody@127.0.0.1:1/none",
        "db_timeout": 1.0}})
    with pytest.raises(QuarantineError, match="cannot open the quarantine database"):
        open_store(cfg)


def test_cache_backend_keys() -> None:
    scan = config_mod.from_dict({"scan": {"cache_backend": "redis",
                                          "redis": "rediss://h:6380/1"}}).scan
    assert (scan.cache_backend, scan.redis, scan.cache_ttl) == ("redis", "rediss://h:6380/1",
                                                                86400)
    with pytest.raises(ConfigError, match="cache_ttl"):
        config_mod.from_dict({"scan": {"cache_ttl": 0}})
