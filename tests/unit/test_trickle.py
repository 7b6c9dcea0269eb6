"""The trickle gate: how much of a body may leave before the verdict, per mode."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from avgate.limits import KiB, MiB
from avgate.trickle import Gate, TrickleSettings


def settings(**kw: object) -> TrickleSettings:
    return TrickleSettings.model_validate(kw)


def test_defaults() -> None:
    s = TrickleSettings()
    assert (s.mode, s.keep_back, s.interval, s.chunk, s.limit, s.patience, s.min_size) == \
        ("keep_back", 32 * KiB, 5.0, 2 * KiB, 1 * MiB, 300.0, 0)


def test_sizes_and_numbers_from_toml_values() -> None:
    s = settings(mode="trickle", keep_back="128 KiB", interval=2, chunk=512, limit="0",
                 min_size="1 MiB", patience=30)
    assert (s.keep_back, s.interval, s.chunk, s.limit, s.min_size, s.patience) == \
        (128 * KiB, 2.0, 512, 0, MiB, 30.0)


@pytest.mark.parametrize("bad", [
    {"mode": "always"}, {"interval": 0}, {"interval": -1.0}, {"patience": 0},
    {"interval": float("inf")}, {"keep_back": 0}, {"chunk": "0"}, {"limit": -1},
    {"keep_back": "lots"}, {"min_size": True}, {"interval": "5"}, {"unknown": 1},
])
def test_bad_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        settings(**bad)


def test_keep_back_holds_the_tail() -> None:
    g = Gate(settings(keep_back=100), declared_length=None, now=0.0)
    assert g.active
    assert g.releasable(0.0) == 0
    g.received(60)
    assert g.releasable(1.0) == 0
    g.received(60)
    assert g.releasable(1.0) == 20
    g.received(1000)
    assert g.releasable(1.0) == 1020
    assert g.next_wakeup(1.0) is None  # time alone never releases anything


def test_keep_back_larger_than_the_declared_body_is_inactive() -> None:
    g = Gate(settings(keep_back=100), declared_length=100, now=0.0)
    assert not g.active
    g.received(100)
    assert g.releasable(10.0) == 0
    assert Gate(settings(keep_back=100), declared_length=101, now=0.0).active


def test_trickle_sends_chunk_per_interval_up_to_limit() -> None:
    g = Gate(settings(mode="trickle", interval=2.0, chunk=10, limit=25, keep_back=1), None,
             now=100.0)
    g.received(1000)
    assert g.releasable(100.0) == 0
    assert g.next_wakeup(100.0) == 102.0
    assert g.releasable(101.9) == 0
    assert g.releasable(102.0) == 10
    assert g.next_wakeup(102.0) == 104.0
    assert g.releasable(105.0) == 20
    assert g.releasable(106.0) == 25  # the limit
    assert g.next_wakeup(106.0) is None
    assert g.releasable(1000.0) == 25


def test_trickle_never_passes_what_arrived_nor_the_tail() -> None:
    """The last keep_back bytes wait for the verdict in trickle mode too: a small object
    (a 68-byte EICAR inside the first chunk) never leaves whole before it."""
    g = Gate(settings(mode="trickle", interval=1.0, chunk=10, limit=1000, keep_back=2), None,
             now=0.0)
    g.received(5)
    assert g.releasable(10.0) == 3
    assert g.next_wakeup(10.0) is None  # only new data can release more
    g.received(100)
    assert g.releasable(10.0) == 100
    assert g.next_wakeup(10.0) == 11.0
    assert g.releasable(11.0) == 103
    eicar = Gate(settings(mode="trickle", interval=1.0, chunk=4096), None, now=0.0)
    eicar.received(68)
    assert eicar.releasable(100.0) == 0 and eicar.next_wakeup(100.0) is None


def test_trickle_wakeup_always_makes_progress_with_awkward_intervals() -> None:
    g = Gate(settings(mode="trickle", interval=0.1, chunk=1, limit=10**6), None, now=0.3)
    g.received(10**6)
    now = 0.3
    for _ in range(200):
        before = g.releasable(now)
        wake = g.next_wakeup(now)
        assert wake is not None and wake > now
        now = wake
        assert g.releasable(now) == before + 1


def test_off_releases_nothing() -> None:
    g = Gate(settings(mode="off"), None, now=0.0)
    g.received(10 * MiB)
    assert not g.active
    assert g.releasable(1e6) == 0
    assert g.next_wakeup(0.0) is None


def test_small_declared_objects_are_not_trickled() -> None:
    s = settings(mode="trickle", interval=1.0, chunk=10, min_size=1000, keep_back=10)
    small = Gate(s, declared_length=999, now=0.0)
    small.received(999)
    assert (small.mode, small.active, small.releasable(100.0)) == ("off", False, 0)
    large = Gate(s, declared_length=1000, now=0.0)
    large.received(1000)
    assert (large.mode, large.active, large.releasable(100.0)) == ("trickle", True, 990)
    unknown = Gate(s, declared_length=None, now=0.0)  # no declared length: trickled
    unknown.received(1000)
    assert unknown.releasable(100.0) == 990
    within = Gate(settings(mode="trickle", keep_back=100), declared_length=100, now=0.0)
    assert within.mode == "off"  # all of it would be the held tail


def test_releasable_never_decreases_when_the_clock_steps_back() -> None:
    g = Gate(settings(mode="trickle", interval=1.0, chunk=10, keep_back=1), None, now=50.0)
    g.received(100)
    assert g.releasable(53.0) == 30
    assert g.releasable(10.0) == 30


def test_deadline_and_bad_counts() -> None:
    g = Gate(settings(patience=30), None, now=7.0)
    assert g.deadline == 37.0
    g.complete(100.0)  # a slow body: patience counts from its end
    assert g.deadline == 130.0
    with pytest.raises(ValueError):
        g.received(-1)
    with pytest.raises(ValueError):
        Gate(settings(), declared_length=-1, now=0.0)


def test_icap_trickle_table_in_the_config() -> None:
    from avgate import config
    from avgate.errors import ConfigError

    cfg = config.from_dict({"icap": {"trickle": {"keep_back": "16 KiB"}}})
    assert cfg.icap is not None and cfg.icap.trickle.keep_back == 16 * KiB
    with pytest.raises(ConfigError, match=r"icap\.trickle\.interval"):
        config.from_dict({"icap": {"trickle": {"interval": 0}}})
