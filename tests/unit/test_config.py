"""The config module: TOML → one frozen Config of typed sections; ``config check`` messages
name the key and its line (the contract); ``config show`` renders what ``loads`` reads back."""

from __future__ import annotations

import tomllib

import pytest
from pydantic import BaseModel, ValidationError

from avgate import config
from avgate.errors import ConfigError
from avgate.frontends.listen import Address


def problems(text: str) -> list[str]:
    """The ``config check`` lines for ``text`` (which must be invalid)."""
    with pytest.raises(ConfigError) as ei:
        config.loads(text, source="x.toml")
    assert all(m.startswith("x.toml: ") for m in ei.value.problems), ei.value.problems
    return list(ei.value.problems)


def one(msgs: list[str], where: str, *words: str) -> str:
    """The message about ``where`` (e.g. ``"limits.max_files (line 5)"``) holding ``words``."""
    found = [m for m in msgs if f": {where}: " in m and all(w in m for w in words)]
    assert len(found) == 1, (where, words, msgs)
    return found[0]


# -- defaults and typed sections --------------------------------------------------------------
def test_defaults_enable_every_frontend():
    c = config.defaults()
    assert [str(x.listen) for x in c.smtp_listeners] == ["127.0.0.1:10025"]
    assert c.smtp_listeners[0].next_hop == "127.0.0.1:10026"
    assert c.smtp_listeners[0].name == "smtp"
    assert c.milter is not None and str(c.milter.listen) == "127.0.0.1:7357"
    assert c.icap is not None and str(c.icap.listen) == "127.0.0.1:1344"
    assert c.icap.service == "avscan"
    assert c.http is not None and str(c.http.listen) == "127.0.0.1:8080"
    assert c.clamd_listener is not None and str(c.clamd_listener.listen) == "127.0.0.1:3311"
    assert [(e.type, e.name) for e in c.engines] == [("embedded", "embedded")]
    assert c.limits.max_scan_size == 100 * 1024 * 1024
    assert c.quarantine.path == "./var/quarantine"
    assert c.scan.mode == "first_infected" and c.scan.cache is True
    assert c.source is None


def test_sections_are_frozen():
    c = config.defaults()
    with pytest.raises(ValidationError):
        c.scan.cache = False  # type: ignore[misc]
    assert c.scan.cache is True


def test_file_enables_only_named_frontends():
    c = config.loads('[[smtp.listeners]]\nlisten = "127.0.0.1:2525"\nnext_hop = "discard"\n')
    assert [str(x.listen) for x in c.smtp_listeners] == ["127.0.0.1:2525"]
    assert c.smtp_listeners[0].name == "smtp" and c.smtp_listeners[0].next_hop == "discard"
    assert c.milter is None and c.icap is None and c.http is None and c.clamd_listener is None


def test_smtp_listeners_are_named_in_order():
    c = config.loads('[[smtp.listeners]]\nlisten = "127.0.0.1:2525"\n'
                     '[[smtp.listeners]]\nlisten = "127.0.0.1:2526"\n'
                     '[[smtp.listeners]]\nname = "out"\nlisten = "127.0.0.1:2527"\n')
    assert [x.name for x in c.smtp_listeners] == ["smtp", "smtp1", "out"]


def test_sizes_and_limits():
    c = config.loads('[limits]\nmax_scan_size = "10 MiB"\nmax_file_size = 1000\n'
                     'max_recursion = 4\nscan_timeout = 2.5\n')
    assert c.limits.max_scan_size == 10 * 1024 * 1024
    assert c.limits.max_file_size == 1000 and c.limits.max_recursion == 4
    assert c.limits.scan_timeout == 2.5


def test_listener_address_checked():
    with pytest.raises(ConfigError, match=r"icap\.listen"):
        config.loads('[icap]\nlisten = "nowhere"\n')
    c = config.loads('[milter]\nlisten = "inet:7357@127.0.0.1"\n')
    assert c.milter is not None and c.milter.listen == Address("tcp", "127.0.0.1", 7357)
    c = config.loads('[milter]\nlisten = "local:/run/avgate/milter.sock"\n')
    assert c.milter is not None and c.milter.listen == Address("unix",
                                                                path="/run/avgate/milter.sock")


# -- config check: every problem, with key and line ---------------------------------------------
def test_errors_name_key_and_line():
    msgs = problems('[scan]\nmode = "fastest"\n\n[limits]\nmax_files = -3\nbogus = 1\n')
    one(msgs, "scan.mode (line 2)", "first_infected")
    one(msgs, "limits.max_files (line 5)")
    one(msgs, "limits.bogus (line 6)", "unknown key")
    assert len(msgs) == 3, msgs


def test_unknown_key_names_the_known_keys():
    msgs = problems('[milter]\nlisten = "127.0.0.1:7357"\nmax_header = 3\n')
    msg = one(msgs, "milter.max_header (line 3)", "unknown key")
    known = msg.split("(known: ", 1)[1].rstrip(")").split(", ")
    from avgate.frontends.milter import MilterSettings

    assert sorted(known) == sorted(MilterSettings.model_fields), known
    assert "max_headers" in known  # what the writer meant is among them


def test_unknown_keys_in_arrays_of_tables_name_their_table_keys():
    msgs = problems('[[engines]]\ntype = "clamd"\nserver = "tcp://127.0.0.1:3310"\n'
                    '[[smtp.listeners]]\nmax_recipient = 5\n'
                    '[[policy.rules]]\nstatuss = "clean"\naction = "accept"\n')
    one(msgs, "engines[0].server (line 3)", "unknown key", "servers")
    one(msgs, "smtp.listeners[0].max_recipient (line 5)", "unknown key", "max_recipients")
    one(msgs, "policy.rules[0].statuss (line 7)", "unknown key", "status", "action")
    assert len(msgs) == 3, msgs


def test_bad_value_in_smtp_listeners_names_index_and_line():
    msgs = problems('[[smtp.listeners]]\nlisten = "127.0.0.1:2525"\n\n'
                    '[[smtp.listeners]]\nname = "out"\nlisten = "127.0.0.1:2526"\n'
                    'max_connections = -1\n')
    one(msgs, "smtp.listeners[1].max_connections (line 7)", "greater than 0")
    assert len(msgs) == 1, msgs


def test_bad_value_in_engines_names_index_and_line():
    msgs = problems('[[engines]]\ntype = "embedded"\n\n[[engines]]\ntype = "clamd"\n'
                    'servers = ["tcp://127.0.0.1:3310"]\nconnect_timeout = 0\n')
    one(msgs, "engines[1].connect_timeout (line 7)", "greater than 0")
    assert len(msgs) == 1, msgs


def test_engine_type_checked_with_line():
    msgs = problems('[[engines]]\ntype = "embedded"\n\n[[engines]]\ntype = "warp"\n')
    one(msgs, "engines[1].type (line 5)", "warp", "embedded", "clamd")


def test_bad_value_in_policy_rules_names_index_and_line():
    msgs = problems('[policy]\nvirus_action = "reject"\n\n'
                    '[[policy.rules]]\nstatus = "clean"\naction = "accept"\n\n'
                    '[[policy.rules]]\nstatus = "infected"\naction = "explode"\n\n'
                    '[[policy.rules]]\nstatus = "error"\naction = "reject"\n'
                    'reply = "451 4.7.1 later"\n')
    one(msgs, "policy.rules[1].action (line 10)", "explode")
    # a cross-field check (the reply must fit the action) points at its line too
    one(msgs, "policy.rules[2].reply (line 15)", "5xx")
    assert len(msgs) == 2, msgs


def test_unknown_section_and_invalid_toml():
    with pytest.raises(ConfigError, match="unknown section"):
        config.loads("[smpt]\nx = 1\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        config.loads("[scan\n")


def test_strict_types_are_not_converted():
    msgs = problems('[limits]\nmax_files = "10"\n[scan]\ncache = "yes"\n')
    one(msgs, "limits.max_files (line 2)")
    one(msgs, "scan.cache (line 4)")


# -- sources ---------------------------------------------------------------------------------
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


# -- config show ------------------------------------------------------------------------------
def _with_defaults(model: type[BaseModel]) -> set[str]:
    """The keys of a section that have a value by default (None cannot be written in TOML)."""
    return {name for name, info in model.model_fields.items()
            if not info.is_required() and info.get_default(call_default_factory=True) is not None}


def test_render_roundtrip_with_every_default():
    c = config.defaults()
    text = config.render_toml(c.to_dict())
    again = config.loads(text)
    assert again.to_dict() == c.to_dict()
    assert again == config.Config(**{**vars(c), "source": None, "base_dir": "."})
    shown = tomllib.loads(text)
    for name in config.SECTIONS:
        if name in config.SINGLE_FRONTENDS and name not in config.DEFAULT_FRONTENDS:
            assert name not in shown  # the proxies need a server: off without a config file
            continue
        missing = _with_defaults(config.section_class(name)) - set(shown[name])
        assert not missing, (name, missing)
    [listener] = shown["smtp"]["listeners"]
    assert not _with_defaults(config.section_class("smtp.listeners")) - set(listener)
    [engine] = shown["engines"]
    assert not _with_defaults(type(c.engines[0])) - set(engine)


def test_render_roundtrip_of_a_full_config():
    text = '''
[scan]
mode = "all"
spool_dir = "/var/spool/avgate"
[limits]
max_file_size = "5 MiB"
[[engines]]
type = "embedded"
[[engines]]
type = "clamd"
servers = ["tcp://127.0.0.1:3310", "unix:/run/clamav/clamd.ctl"]
strategy = "round_robin"
[policy]
header_style = "qhpsi"
notice = "Removed: {virus}\\nFile: {filename}\\n"
[[policy.rules]]
name = "outbound-virus"
direction = "outbound"
status = "infected"
action = ["tempfail"]
reply = "451 4.7.1 held"
[[policy.rules]]
virus = ["*.Test.*"]
action = ["accept", "tag"]
headers = { X-Test = "{virus}" }
[log]
path = "scan.log"
[[smtp.listeners]]
listen = "127.0.0.1:2525"
next_hop = "discard"
[[smtp.listeners]]
name = "out"
listen = "[::1]:2526"
[milter]
listen = "unix:/run/avgate/milter.sock"
'''
    c = config.loads(text)
    again = config.loads(config.render_toml(c.to_dict()))
    assert again.to_dict() == c.to_dict()
    assert [r.name for r in again.policy.rules] == ["outbound-virus", None]
    assert again.policy.notice == "Removed: {virus}\nFile: {filename}\n"
    assert [str(x.listen) for x in again.smtp_listeners] == ["127.0.0.1:2525", "[::1]:2526"]
    assert again.icap is None and again.http is None


def test_config_show_output_loads_back(monkeypatch):
    from typer.testing import CliRunner

    from avgate.cli import app

    monkeypatch.delenv("AVGATE_CONFIG", raising=False)
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 0, result.output
    assert config.loads(result.output).to_dict() == config.defaults().to_dict()


# -- serve's start-up warnings -----------------------------------------------------------------
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


def test_smtp_listener_without_mode_is_warned_about():
    """Behind content_filter a before_queue reject bounces the virus to a forged sender: a
    config file's SMTP listener must say where it sits, or start-up and `config check` warn."""
    from avgate.serve import mode_warnings

    unset = config.loads('[[smtp.listeners]]\nlisten = "127.0.0.1:10025"\n', "/x/avgate.toml")
    (line,) = mode_warnings(unset)
    assert "'smtp'" in line and 'mode = "after_queue"' in line
    assert unset.smtp_listeners[0].mode == "before_queue"  # the contract's default stays
    for mode in ("before_queue", "after_queue", "verdict"):
        explicit = config.loads(f'[[smtp.listeners]]\nmode = "{mode}"\n', "/x/avgate.toml")
        assert mode_warnings(explicit) == []
    verdict = config.loads('[[smtp.listeners]]\nnext_hop = "discard"\n', "/x/avgate.toml")
    assert mode_warnings(verdict) == []
    assert mode_warnings(config.defaults()) == []  # no file: nothing the admin wrote


def test_config_show_never_prints_secrets():
    """HTTP tokens, the console key and passwords in the quarantine DSN and the Redis URL are
    shown as *** (tokens with a fingerprint that tells two apart); the values in use are the
    real ones, and the shown config still loads."""
    c = config.loads('''
[http]
tokens = [{ token = "adm1nSecret", roles = ["admin"] }, "scanSecret"]
console_secret = "k3y-material"
[quarantine]
backend = "postgresql"
dsn = "postgresql://avgate:pw123@db:5432/avgate?password=zz9&sslmode=require"
[scan]
cache_backend = "redis"
redis = "rediss://:s3cret@cache:6380/0"
''')
    text = config.render_toml(c.to_dict())
    for secret in ("adm1nSecret", "scanSecret", "k3y-material", "pw123", "zz9", "s3cret"):
        assert secret not in text
    assert 'dsn = "postgresql://avgate:***@db:5432/avgate?password=***&sslmode=require"' in text
    assert 'redis = "rediss://:***@cache:6380/0"' in text
    assert c.http is not None and c.http.tokens[0].token == "adm1nSecret"  # noqa: S105
    assert c.quarantine.dsn.startswith("postgresql://avgate:pw123@")
    shown = config.loads(text)
    assert shown.http is not None and len({t.token for t in shown.http.tokens}) == 2
