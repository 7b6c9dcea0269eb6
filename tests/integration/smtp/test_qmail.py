"""``avgate qmail-queue`` driven exactly as qmail-smtpd drives qmail-queue: the message on a
pipe at fd 0, the envelope on a pipe at fd 1, the exit code read back; the real qmail-queue
is a recording stand-in script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from avgate.frontends.qmail import EnvelopeError, decision_of, parse_envelope
from avgate.gateway import Outcome
from avgate.policy import Decision, Disposition
from avgate.result import ScanResult, ScanStatus
from tests.integration.smtp.conftest import EICAR, closed_port, make_message

ENVELOPE = b"Falice@example.test\0Tbob@example.test\0Tcarol@example.test\0\0"


@pytest.fixture
def qmail_env(tmp_path: Path) -> Path:
    real = tmp_path / "qmail-queue-real"
    real.write_text('#!/bin/sh\ncat > "$QQ_OUT/msg"\ncat <&1 > "$QQ_OUT/env"\n'
                    'exit "${QQ_RC:-0}"\n')
    real.chmod(0o755)
    (tmp_path / "out").mkdir()
    return tmp_path


def write_config(d: Path, qmail: str = "", extra: str = "") -> Path:
    cfg = d / "avgate.toml"
    cfg.write_text(f'[quarantine]\npath = "{d}/q"\n[policy]\nheader_style = "qhpsi"\n'
                   f'{extra}\n[qmail]\nreal_queue = "{d}/qmail-queue-real"\n{qmail}\n')
    return cfg


def run_qq(d: Path, cfg: Path, message: bytes, envelope: bytes = ENVELOPE,
           rc: int = 0) -> tuple[int, str]:
    msg_r, msg_w = os.pipe()
    env_r, env_w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "avgate.frontends.qmail", "--config", str(cfg)],
        stdin=msg_r, stdout=env_r, stderr=subprocess.PIPE,
        env={**os.environ, "QQ_OUT": str(d / "out"), "QQ_RC": str(rc)})
    os.close(msg_r)
    os.close(env_r)
    with os.fdopen(msg_w, "wb") as f:  # qmail-smtpd writes the message, then the envelope
        f.write(message)
    with os.fdopen(env_w, "wb") as f:
        f.write(envelope)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err.decode()


def test_clean_message_tagged_and_queued(qmail_env: Path) -> None:
    msg = make_message("qq clean")
    code, err = run_qq(qmail_env, write_config(qmail_env), msg)
    assert code == 0, err
    verdict, refid, rest = (qmail_env / "out/msg").read_bytes().split(b"\r\n", 2)
    assert (verdict, refid[:16], len(refid), rest) == (
        b"X-QHPSI: clean", b"X-Avgate-RefID: ", 32, msg)  # the RefID header follows the verdict
    assert (qmail_env / "out/env").read_bytes() == ENVELOPE


def test_real_queue_exit_code_is_passed_on(qmail_env: Path) -> None:
    code, _ = run_qq(qmail_env, write_config(qmail_env), make_message(), rc=53)
    assert code == 53


def test_infected_tagged_without_reject_virus(qmail_env: Path) -> None:
    code, err = run_qq(qmail_env, write_config(qmail_env), make_message(attachment=EICAR))
    assert code == 0, err
    assert (qmail_env / "out/msg").read_bytes().startswith(b"X-QHPSI: virus found\r\n")


def test_infected_rejected_31_with_reject_virus(qmail_env: Path) -> None:
    code, _ = run_qq(qmail_env, write_config(qmail_env, "reject_virus = true"),
                     make_message(attachment=EICAR))
    assert code == 31
    assert not (qmail_env / "out/msg").exists()


def test_scanner_failure_71_with_reject_virus(qmail_env: Path) -> None:
    engine = (f'[[engines]]\ntype = "clamd"\nservers = ["tcp://127.0.0.1:{closed_port()}"]\n'
              'connect_timeout = 0.5\n')
    cfg = qmail_env / "avgate.toml"
    cfg.write_text(write_config(qmail_env, "reject_virus = true").read_text() + engine)
    code, _ = run_qq(qmail_env, cfg, make_message())
    assert code == 71
    assert not (qmail_env / "out/msg").exists()


@pytest.mark.parametrize(("envelope", "code"), [
    (b"Tbob@x\0\0", 91), (b"Fa@x\0\0", 91), (b"Fa@x\0Tb@x\0", 91),
    (b"Fa@x\0T" + b"b" * 2000 + b"\0\0", 11),
])
def test_bad_envelope(qmail_env: Path, envelope: bytes, code: int) -> None:
    got, _ = run_qq(qmail_env, write_config(qmail_env), make_message(), envelope)
    assert got == code
    assert not (qmail_env / "out/msg").exists()


def test_missing_real_queue_is_a_temporary_internal_error(qmail_env: Path) -> None:
    (qmail_env / "qmail-queue-real").unlink()
    code, err = run_qq(qmail_env, write_config(qmail_env), make_message())
    assert code == 81 and "not executable" in err


def test_parse_envelope_table() -> None:
    e = parse_envelope(b"F\0Tx@y\0\0")
    assert e.sender == "" and e.recipients == ("x@y",)
    with pytest.raises(EnvelopeError):
        parse_envelope(b"")


@pytest.mark.parametrize(("disposition", "status", "reject_virus", "code"), [
    (Disposition.ACCEPT, ScanStatus.CLEAN, False, None),
    (Disposition.ACCEPT, ScanStatus.ERROR, True, None),  # the policy keeps it
    (Disposition.DISCARD, ScanStatus.INFECTED, True, 0),
    (Disposition.REJECT, ScanStatus.INFECTED, True, 31),
    (Disposition.REJECT, ScanStatus.INFECTED, False, None),  # QHPSI mode: queued tagged
    (Disposition.TEMPFAIL, ScanStatus.INFECTED, False, None),
    (Disposition.REJECT, ScanStatus.ERROR, False, 31),  # never queued against the policy
    (Disposition.TEMPFAIL, ScanStatus.ERROR, False, 71),
    (Disposition.REJECT, ScanStatus.SKIPPED, False, 31),  # over a limit: refused too
    (Disposition.TEMPFAIL, ScanStatus.UNKNOWN, False, 71),
])
def test_the_decision_sets_the_exit_code(disposition: Disposition, status: ScanStatus,
                                         reject_virus: bool, code: int | None) -> None:
    outcome = Outcome(ScanResult(status), Decision(disposition, "550 5.7.1 x"), None)
    assert decision_of(outcome, reject_virus) == code


def test_real_queue_looping_back_to_avgate_is_refused(qmail_env: Path) -> None:
    """A real_queue that runs the wrapper again (the wrapper installed as qmail-queue and
    real_queue pointing at it) exits 81 at once instead of re-scanning forever."""
    cfg = write_config(qmail_env)
    loop = qmail_env / "qmail-queue-real"
    loop.write_text(f"#!/bin/sh\nexec {sys.executable} -m avgate.frontends.qmail "
                    f"--config {cfg}\n")
    code, err = run_qq(qmail_env, cfg, make_message("loop"))
    assert code == 81 and "loop" in err
    assert not (qmail_env / "out/msg").exists()


def test_relative_real_queue_refused_by_config(tmp_path: Path) -> None:
    from avgate import config as config_mod
    from avgate.errors import ConfigError

    with pytest.raises(ConfigError, match="absolute"):
        config_mod.from_dict({"qmail": {"real_queue": "bin/qmail-queue"}})
