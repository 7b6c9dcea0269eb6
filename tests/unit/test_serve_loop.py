"""``[serve] loop``: uvloop by default (a dependency), asyncio's own loop when asked for."""

from __future__ import annotations

import asyncio
import sys

import pytest

from avgate import config, serve
from avgate.errors import AvgateError, ConfigError


def test_default_is_uvloop_and_asyncio_can_be_chosen() -> None:
    import uvloop

    cfg = config.loads("")
    assert cfg.serve.loop == "uvloop" and serve._loop_factory(cfg) is uvloop.new_event_loop
    assert serve._loop_factory(config.loads('[serve]\nloop = "asyncio"\n')) is None


def test_unknown_loop_is_refused() -> None:
    with pytest.raises(ConfigError, match="loop"):
        config.loads('[serve]\nloop = "tokio"\n')


def test_uvloop_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    cfg = config.loads('[serve]\nloop = "uvloop"\n')
    with pytest.raises(AvgateError, match=r'a dependency of avgate.*loop = "asyncio"'):
        serve._loop_factory(cfg)


def test_scan_workers_run_under_uvloop() -> None:
    import uvloop

    from avgate.workers import WorkerPool

    factory = serve._loop_factory(config.loads('[serve]\nloop = "uvloop"\n'))
    assert factory is not None

    async def one() -> object:
        pool = WorkerPool(1, name="uvloop-test")
        try:
            return await pool.run(len, b"twelve bytes", budget=30)
        finally:
            await pool.close()

    with asyncio.Runner(loop_factory=factory) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)
        assert runner.run(one()) == 12
