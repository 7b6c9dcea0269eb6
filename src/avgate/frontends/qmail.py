"""``avgate qmail-queue``: a drop-in for qmail-queue (set ``QMAILQUEUE`` to it).

qmail-smtpd (and qmail-inject, via ``QMAILQUEUE``) runs qmail-queue with the message on
fd 0 and the envelope on fd 1: ``F<sender>\\0``, then ``T<recipient>\\0`` per recipient, then
a final ``\\0``. This wrapper reads both, scans the message through the Gateway, and then:

* queues it: the verdict headers of the policy's ``header_style`` are added (``qhpsi``
  gives ``X-QHPSI: clean`` / ``X-QHPSI: virus found``) and the real qmail-queue
  (``[qmail] real_queue``, default ``/var/qmail/bin/qmail-queue-real``) is exec'd with the
  tagged message on fd 0 and the envelope, unchanged, on fd 1 — its exit code is ours;
  Incoming copies of every header avgate may write (``Policy.own_header_names()``: all
  styles) are removed first, so a sender's own ``X-QHPSI: clean`` never survives;
* or refuses it as the policy's Decision says — the Decision is authoritative: a reject
  exits 31 ("mail server permanently rejected message", qmail-smtpd answers 554), a tempfail
  exits 71 ("mail server temporarily rejected message", 451). A scanner error is therefore
  never queued unless the policy keeps it (``failure_action = "keep"`` or a rule accepting
  ``status = "error"``); neither is content the policy refuses for a limit.
* The one exception is the QHPSI mode for *infected* mail: without ``[qmail] reject_virus =
  true`` (default false) infected mail the policy refuses is queued, tagged (``X-QHPSI:
  virus found``), instead of refused. ``reject_on_error`` is accepted for compatibility
  only: ``false`` no longer queues failed scans (a warning says so), the policy decides
  (:class:`QmailSettings`).
* a discard decision (e.g. ``virus_action = "quarantine"``) exits 0 without queueing.

Install it one way only (docs/recipes/indimail-qmail.md): ``QMAILQUEUE`` for qmail-smtpd (needs
the netqmail patch) with ``real_queue`` the unmoved ``/var/qmail/bin/qmail-queue``. ``real_queue``
must be an absolute path (qmail-smtpd's working directory is not yours), and a ``real_queue``
that runs ``avgate qmail-queue`` again (the wrapper itself) is refused with exit 81 instead of
scanning and re-executing itself forever (``AVGATE_QMAIL_QUEUE`` marks the exec'd process).

Exit codes are qmail-queue(8)'s: 0 queued, 11 address too long, 31 permanently rejected,
53 write error, 54 cannot read message or envelope, 71 temporarily rejected, 81 internal
bug (config error, real queue not executable), 91 envelope format error.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator

from ..context import Envelope
from ..decision import Decision, Disposition
from ..result import ScanStatus
from ..settings import Section

if TYPE_CHECKING:
    from ..config import Config
    from ..gateway import Outcome
    from ..policy import Policy
    from ..spool import Spool

EXIT_OK = 0
EXIT_ADDRESS_TOO_LONG = 11
EXIT_PERM_REJECT = 31
EXIT_WRITE_ERROR = 53
EXIT_READ_ERROR = 54
EXIT_TEMP_REJECT = 71
EXIT_INTERNAL = 81
EXIT_ENVELOPE_FORMAT = 91

MAX_ADDRESS = 1000  # qmail's own envelope addresses are far shorter; a sanity bound
#: set in the environment of the real qmail-queue we exec: seeing it on entry means that
#: real_queue leads back to this wrapper (a loop), not to qmail's qmail-queue
LOOP_ENV = "AVGATE_QMAIL_QUEUE"


def _absolute(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"real_queue must be an absolute path, got {path!r} "
                         "(qmail-smtpd's working directory is not yours)")
    return path


class QmailSettings(Section):
    """``[qmail]``: the ``avgate qmail-queue`` wrapper.

    real_queue: the real qmail-queue, exec'd with the message to queue
    reject_virus: refuse infected mail (exit 31) instead of queueing it tagged (QHPSI mode)
    reject_on_error: compatibility only; ``false`` no longer queues failed scans (a warning
    says so): the policy decides (``[policy] failure_action``)
    """

    real_queue: Annotated[str, AfterValidator(_absolute)] = "/var/qmail/bin/qmail-queue-real"
    reject_virus: bool = False
    reject_on_error: bool = True


class EnvelopeError(ValueError):
    """A malformed qmail-queue envelope; ``code`` is the exit code to use."""

    def __init__(self, message: str, code: int = EXIT_ENVELOPE_FORMAT) -> None:
        self.code = code
        super().__init__(message)


def parse_envelope(raw: bytes) -> Envelope:
    """Parse ``F<sender>\\0(T<rcpt>\\0)*\\0`` (sans-IO; raises EnvelopeError)."""
    if not raw.startswith(b"F"):
        raise EnvelopeError("envelope does not start with F")
    if not raw.endswith(b"\0\0"):
        raise EnvelopeError("envelope is not terminated by an empty field")
    fields = raw[:-2].split(b"\0")
    sender = fields[0][1:]
    rcpts = fields[1:]
    if not rcpts:
        raise EnvelopeError("envelope has no recipients")
    for r in rcpts:
        if not r.startswith(b"T") or len(r) < 2:
            raise EnvelopeError(f"bad recipient field {r[:40]!r}")
    for a in [sender, *rcpts]:
        if len(a) > MAX_ADDRESS:
            raise EnvelopeError("address too long", EXIT_ADDRESS_TOO_LONG)
    return Envelope(_dec(sender), tuple(_dec(r[1:]) for r in rcpts), listener="qmail")


def _dec(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _read_fd(fd: int, spool: Spool | None = None) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        if spool is not None:
            spool.write(chunk)
        else:
            chunks.append(chunk)


def _say(msg: str) -> None:
    print(f"avgate qmail-queue: {msg}", file=sys.stderr)


async def _decide(cfg: Config, spool: Spool, env: Envelope) -> tuple[int | None, bytes]:
    """Scan; (exit code to use now, or None to queue), message bytes to queue."""
    from ..context import Context
    from ..gateway import Gateway

    log = None
    if cfg.log.path:
        from ..observability import ScanLog

        log = ScanLog(cfg.log.path, cfg.log.level)
    gateway = Gateway.from_config(cfg, log=log)
    reject_virus = cfg.qmail.reject_virus
    if not cfg.qmail.reject_on_error:
        _say('reject_on_error = false is ignored: failed scans follow the policy '
             '(set [policy] failure_action = "keep" to queue them tagged)')
    await gateway.start()
    try:
        outcome = await gateway.process(spool, Context("qmail", envelope=env,
                                                       direction="inbound", size=spool.size))
    finally:
        await gateway.close()
    data = spool.getvalue()
    return _apply(decision_of(outcome, reject_virus), data, outcome, gateway.policy)


def decision_of(outcome: Outcome, reject_virus: bool) -> int | None:
    """The exit code the Decision asks for, or None to queue (sans-IO).

    The Decision is authoritative; the only exception is the QHPSI mode (``reject_virus``
    false): infected mail the policy refuses is queued tagged. Whatever else the policy
    refuses — a failed scan, content over a limit — is refused here too.
    """
    disposition = outcome.decision.disposition
    if disposition is Disposition.DISCARD:
        return EXIT_OK
    if disposition is Disposition.ACCEPT:
        return None
    if outcome.result.status is ScanStatus.INFECTED and not reject_virus:
        return None  # QHPSI mode: queued, tagged "virus found"
    return EXIT_PERM_REJECT if disposition is Disposition.REJECT else EXIT_TEMP_REJECT


def _apply(code: int | None, data: bytes, outcome: Outcome, policy: Policy
           ) -> tuple[int | None, bytes]:
    """(exit code, b"") or (None, the message to queue: incoming verdict headers removed,
    the decision's edits — or, in QHPSI mode, the verdict headers — applied)."""
    from ..mailedit import edit_message

    if code is not None:
        return code, b""
    decision = outcome.decision
    if decision.disposition is not Disposition.ACCEPT:  # QHPSI mode: tag, do not refuse
        decision = Decision(Disposition.ACCEPT, headers=policy.headers_for(outcome.result))
    return None, edit_message(data, decision, outcome.result, policy.own_header_names())


def _temp_fd(data: bytes) -> int:
    """An unlinked temp file holding ``data``, opened for reading at offset 0."""
    fd, path = tempfile.mkstemp(prefix="avgate-qmail-")
    try:
        os.unlink(path)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd


def main(argv: Sequence[str] | None = None) -> int:
    """Run as qmail-queue: fd 0 message, fd 1 envelope. Returns an exit code or execs."""
    args = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get(LOOP_ENV):
        _say("real_queue runs avgate qmail-queue again (a loop): point it at qmail's own "
             "qmail-queue")
        return EXIT_INTERNAL
    config_path = None
    if len(args) >= 2 and args[0] in ("--config", "-c"):
        config_path = args[1]
    from ..spool import Spool

    spool = Spool()
    try:
        try:
            _read_fd(0, spool)
            spool.finish()
            raw_env = _read_fd(1)
        except OSError as exc:
            _say(f"cannot read message or envelope: {exc.strerror}")
            return EXIT_READ_ERROR
        except Exception as exc:  # SpoolError: disk full while spooling
            _say(f"cannot spool message: {exc}")
            return EXIT_WRITE_ERROR
        try:
            env = parse_envelope(raw_env)
        except EnvelopeError as exc:
            _say(str(exc))
            return exc.code
        try:
            from ..config import load

            cfg = load(config_path)
            code, data = asyncio.run(_decide(cfg, spool, env))
        except Exception as exc:
            _say(f"internal error: {exc}")
            return EXIT_INTERNAL
    finally:
        spool.close()
    if code is not None:
        return code
    return _exec_real_queue(cfg.qmail.real_queue, data, raw_env)


def _exec_real_queue(real: str, data: bytes, raw_env: bytes) -> int:
    if not os.access(real, os.X_OK):
        _say(f"real qmail-queue {real!r} is not executable")
        return EXIT_INTERNAL
    try:
        msg_fd, env_fd = _temp_fd(data), _temp_fd(raw_env)
    except OSError as exc:
        _say(f"cannot write temp file: {exc.strerror}")
        return EXIT_WRITE_ERROR
    sys.stdout.flush()  # before fd 1 becomes the envelope: nothing buffered may land there
    os.environ[LOOP_ENV] = "1"  # inherited by real_queue: a loop back to us is refused
    os.dup2(msg_fd, 0)
    os.dup2(env_fd, 1)
    os.close(msg_fd)
    os.close(env_fd)
    try:
        os.execv(real, [real])  # noqa: S606 - qmail-queue takes no arguments
    except OSError as exc:
        _say(f"cannot exec {real}: {exc.strerror}")
        return EXIT_INTERNAL
    return EXIT_INTERNAL  # not reached


def qmail_queue_command(config: str | None) -> int:
    """Entry point for the ``avgate qmail-queue`` typer command."""
    return main(["--config", config] if config else [])


if __name__ == "__main__":
    sys.exit(main())
