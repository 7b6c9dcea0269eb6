import pytest

from avgate import config
from avgate.errors import ConfigError


def test_defaults_enable_every_frontend():
    c = config.defaults()
    assert c.smtp_listeners[0]["listen"] == "127.0.0.1:10025"
    assert c.smtp_listeners[0]["next_hop"] == "127.0.0.1:10026"
    assert c.milter == {"listen": "127.0.0.1:7357"}
    assert c.icap == {"listen": "127.0.0.1:1344", "service": "avscan"}
    assert c.http == {"listen": "127.0.0.1:8080"}
    assert c.clamd_listener == {"listen": "127.0.0.1:3311"}
    assert c.engines[0]["type"] == "embedded"
    assert c.limits.max_scan_size == 100 * 1024 * 1024
    assert c.quarantine["path"] == "./var/quarantine"


def test_file_enables_only_named_frontends():
    c = config.loads('[[smtp.listeners]]\nlisten = "127.0.0.1:2525"\nnext_hop = "discard"\n')
    assert [x["listen"] for x in c.smtp_listeners] == ["127.0.0.1:2525"]
    assert c.smtp_listeners[0]["name"] == "smtp"
    assert c.milter is None and c.icap is None and c.http is None and c.clamd_listener is None


def test_sizes_and_limits():
    c = config.loads('[limits]\nmax_scan_size = "10 MiB"\nmax_file_size = 1000\n'
                     'max_recursion = 4\nscan_timeout = 2.5\n')
    assert c.limits.max_scan_size == 10 * 1024 * 1024
    assert c.limits.max_file_size == 1000 and c.limits.max_recursion == 4
    assert c.limits.scan_timeout == 2.5


def test_errors_name_key_and_line():
    text = '[scan]\nmode = "fastest"\n\n[limits]\nmax_files = -3\nbogus = 1\n'
    with pytest.raises(ConfigError) as ei:
        config.loads(text, source="x.toml")
    msgs = ei.value.problems
    assert any("scan.mode (line 2)" in m and "first_infected" in m for m in msgs), msgs
    assert any("limits.max_files (line 5)" in m for m in msgs), msgs
    assert any("limits.bogus (line 6)" in m and "unknown key" in m for m in msgs), msgs
    assert all(m.startswith("x.toml: ") for m in msgs)


def test_unknown_section_and_invalid_toml():
    with pytest.raises(ConfigError, match="unknown section"):
        config.loads("[smpt]\nx = 1\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        config.loads("[scan\n")


def test_engine_keys_checked_with_line():
    text = '[[engines]]\ntype = "embedded"\n\n[[engines]]\ntype = "warp"\n'
    with pytest.raises(ConfigError) as ei:
        config.loads(text)
    assert any("engines[1].type (line 5)" in m and "warp" in m for m in ei.value.problems)


def test_listener_address_checked():
    with pytest.raises(ConfigError, match=r"icap\.listen"):
        config.loads('[icap]\nlisten = "nowhere"\n')
    c = config.loads('[milter]\nlisten = "inet:7357@127.0.0.1"\n')
    assert c.milter is not None and c.milter["listen"] == "inet:7357@127.0.0.1"


def test_env_var(tmp_path, monkeypatch):
    f = tmp_path / "a.toml"
    f.write_text('[scan]\ncache = false\n')
    monkeypatch.setenv("AVGATE_CONFIG", str(f))
    assert config.load().scan.cache is False
    monkeypatch.delenv("AVGATE_CONFIG")
    assert config.load().scan.cache is True


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read"):
        config.load("/nonexistent/avgate.toml")


def test_render_roundtrip():
    c = config.defaults()
    again = config.loads(config.render_toml(c.to_dict()))
    assert again.to_dict() == c.to_dict()


def test_exposure_warnings_name_every_non_loopback_listener():
    from avgate.serve import exposure_warnings

    cfg = config.loads('[[smtp.listeners]]\nlisten = "0.0.0.0:25"\n'
                       '[milter]\nlisten = "unix:/run/avgate/milter.sock"\n'
                       '[icap]\nlisten = "[::1]:1344"\n'
                       '[clamd_listener]\nlisten = "192.0.2.1:3310"\n')
    lines = exposure_warnings(cfg)
    assert len(lines) == 2
    assert "smtp listens on 0.0.0.0:25" in lines[0]
    assert "clamd_listener listens on 192.0.2.1:3310" in lines[1]
    assert exposure_warnings(config.defaults()) == []
