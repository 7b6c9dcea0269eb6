# ruff: noqa: F811 - pytest fixtures imported from the SMTP tests are parameters here
"""qmail-queue wrapper: a scanner error is never queued unless the policy says keep
(issue 11, section 5).

Found before the fix: with ``[qmail] reject_on_error = true``, ``reject_virus = false`` and
``[policy] failure_action = "reject"`` a message the scanner could not check was queued,
exit 0, tagged ``X-QHPSI: error`` — and so it was with the defaults (``reject_on_error``
followed ``reject_virus``, false). The exit code was derived from the flags, not from the
Decision. Now the Decision is authoritative: reject → 31, tempfail → 71, discard → 0 and
nothing queued, accept → queued. The only exception is the documented QHPSI mode:
``reject_virus = false`` queues *infected* mail tagged instead of refusing it.
The unreachable scanner is a clamd engine pointed at a closed port.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.smtp.conftest import EICAR, closed_port, make_message
from tests.integration.smtp.test_qmail import qmail_env, run_qq, write_config  # noqa: F401

pytestmark = pytest.mark.timeout(120)


def broken_scanner() -> str:
    return (f'[[engines]]\ntype = "clamd"\nservers = ["tcp://127.0.0.1:{closed_port()}"]\n'
            'connect_timeout = 0.5\n')


def config(d: Path, qmail: str, policy: str = "") -> Path:
    cfg = write_config(d, qmail, policy)
    cfg.write_text(cfg.read_text() + broken_scanner())
    return cfg


@pytest.mark.parametrize(("qmail", "policy", "want"), [
    # the reproduction
    ("reject_on_error = true\nreject_virus = false", 'failure_action = "reject"', 31),
    ("reject_on_error = true\nreject_virus = false", "", 71),
    # the defaults (reject_virus = false, reject_on_error following it) no longer fail open
    ("", "", 71),
    ("", 'failure_action = "reject"', 31),
    # reject_on_error = false cannot queue what the policy refuses
    ("reject_on_error = false", "", 71),
    ("reject_on_error = false\nreject_virus = true", 'failure_action = "reject"', 31),
])
def test_scanner_error_is_never_queued_against_the_policy(qmail_env: Path, qmail: str,
                                                          policy: str, want: int) -> None:
    code, err = run_qq(qmail_env, config(qmail_env, qmail, policy), make_message("err"))
    assert code == want, err
    assert not (qmail_env / "out/msg").exists()


def test_policy_keep_queues_tagged_error(qmail_env: Path) -> None:
    code, err = run_qq(qmail_env, config(qmail_env, "reject_virus = true",
                                         'failure_action = "keep"'), make_message("keep"))
    assert code == 0, err
    assert (qmail_env / "out/msg").read_bytes().startswith(b"X-QHPSI: error\r\n")


def test_policy_discard_is_not_queued(qmail_env: Path) -> None:
    code, err = run_qq(qmail_env, config(qmail_env, "", 'failure_action = "discard"'),
                       make_message("discard"))
    assert code == 0, err
    assert not (qmail_env / "out/msg").exists()


def test_qhpsi_mode_still_queues_infected_mail_tagged(qmail_env: Path) -> None:
    """reject_virus = false (the default) is about infected mail only."""
    code, err = run_qq(qmail_env, write_config(qmail_env), make_message(attachment=EICAR))
    assert code == 0, err
    assert (qmail_env / "out/msg").read_bytes().startswith(b"X-QHPSI: virus found\r\n")
