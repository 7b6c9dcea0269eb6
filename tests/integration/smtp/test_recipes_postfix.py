"""README's Postfix recipes, as written: the avgate config of each loads and passes ``config
check``, and the Postfix lines follow FILTER_README (the filter's transport alone sends
XFORWARD, addresses are mapped once, the ports agree with the avgate listener). Real Postfix
runs the same blocks in ``test_postfix.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from avgate import config as config_mod
from avgate.cli import app
from tests.integration.smtp.recipes import (
    AFTER_QUEUE,
    BEFORE_QUEUE,
    blocks,
    main_cf,
    master_cf,
    section,
)


@pytest.mark.parametrize(("heading", "mode"), [(AFTER_QUEUE, "after_queue"),
                                               (BEFORE_QUEUE, "before_queue")])
def test_recipe_avgate_config_passes_config_check(heading: str, mode: str,
                                                  tmp_path: Path) -> None:
    text = blocks(heading)["toml"]
    f = tmp_path / "avgate.toml"
    f.write_text(text)
    r = CliRunner().invoke(app, ["config", "check", str(f)])
    assert r.exit_code == 0, r.output
    [listener] = config_mod.loads(text).smtp_listeners
    assert listener.mode == mode
    assert (str(listener.listen), listener.next_hop) == ("127.0.0.1:10025", "127.0.0.1:10026")


def test_after_queue_recipe_is_filter_readme_style() -> None:
    main = main_cf(AFTER_QUEUE)
    services = {s.name: s for s in master_cf(AFTER_QUEUE)}
    transport, _, target = main["content_filter"].partition(":")
    assert target == "[127.0.0.1]:10025"  # the avgate listener
    # a dedicated transport: XFORWARD is sent to avgate only, never set globally
    assert services[transport].line.split()[1:3] == ["unix", "-"]
    assert services[transport].options["smtp_send_xforward_command"] == "yes"
    assert "smtp_send_xforward_command" not in main
    # aliases expanded once: not before the filter, only on reinjection
    assert main["receive_override_options"] == "no_address_mappings"
    reinject = services["127.0.0.1:10026"]  # avgate's next_hop
    assert "no_address_mappings" not in reinject.options["receive_override_options"]
    assert reinject.options["content_filter"] == ""  # no loop
    assert reinject.options["smtpd_authorized_xforward_hosts"] == "127.0.0.0/8"
    assert "smtp" not in services  # the stock smtp inet line is kept, not replaced
    text = section(AFTER_QUEUE)
    assert "the stock `smtp inet` line stays" in text


def test_before_queue_recipe_replaces_the_smtp_line_and_recipes_are_alternatives() -> None:
    services = {s.name: s for s in master_cf(BEFORE_QUEUE)}
    assert services["smtp"].options["smtpd_proxy_filter"] == "127.0.0.1:10025"
    assert services["127.0.0.1:10026"].options["smtpd_proxy_filter"] == ""
    assert "main.cf" not in blocks(BEFORE_QUEUE)
    assert "**replaces** the stock `smtp inet` line" in section(BEFORE_QUEUE)
    assert "**alternatives**" in section("SMTP filter")


def test_listeners_example_loads_with_its_modes() -> None:
    c = config_mod.loads(blocks("Listeners")["toml"])
    assert [(x.name, x.mode) for x in c.smtp_listeners] == [
        ("inbound", "before_queue"), ("submission", "before_queue"), ("verdict", "verdict")]
    assert c.smtp_listeners[2].relay_to is None
