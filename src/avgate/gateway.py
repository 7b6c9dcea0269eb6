"""The protocol-neutral pipeline every front-end calls: scan → policy → quarantine → log.

A front-end spools what it received, builds a :class:`~avgate.context.Context` (the session,
with the transaction's :class:`~avgate.context.Envelope` inside), and calls
:meth:`Gateway.process`. It gets back an :class:`Outcome` (the ScanResult, the Decision and
the quarantine id) and applies the decision in its own protocol. The side effects that must
happen before the client is answered (the quarantine write) happen here: if they fail, the
decision becomes a tempfail, so nothing is acknowledged that was not kept.

Every object gets a RefID (:func:`~avgate.decision.new_refid`): the policy puts it in the
replies and the RefID header, the scan log line carries it (``"refid"``), so an admin finds
a user's message from the header or the reply text.

The scan log line records what was done, in the front-end's own terms. A front-end that
applies the decision itself (the milter: headers, body, recipients; ICAP: 204 or a block
page) calls ``process(..., defer_log=True)`` and then :meth:`Gateway.log_outcome` with the
actions it carried out and its protocol's outcome. Otherwise the line is written at once,
with the decision's actions and, on the mail front-ends (smtp, qmail, milter), the SMTP reply;
other front-ends get no ``reply`` (an SMTP text in an ICAP or clamd line says nothing true).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import Config
from .context import Context, Envelope  # re-exported: front-ends import them from here
from .decision import new_refid
from .observability import record_scan, scan_event
from .policy import MAIL_FRONTENDS, Decision, Disposition, Policy
from .result import ScanResult
from .scan import ScanService
from .spool import Spool

if TYPE_CHECKING:
    from .notify import Notifier
    from .observability import ScanLog
    from .quarantine import Store

__all__ = ["Context", "Envelope", "Gateway", "Outcome"]

_STORE_LOCK = threading.Lock()
QUARANTINE_FAILED_REPLY = "451 4.3.0 Quarantine unavailable, try again later (RefID {refid})"


@dataclass(frozen=True, slots=True)
class Outcome:
    result: ScanResult
    decision: Decision
    quarantine_id: str | None = None
    #: the scan-log line not written yet (``process(defer_log=True)``): see ``log_outcome``
    event: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def refid(self) -> str:
        return self.decision.refid


@dataclass
class Gateway:
    """Shared by every front-end of one ``serve`` process (or one CLI command)."""

    config: Config
    scanner: ScanService
    policy: Policy
    log: ScanLog | None = None
    _store: Store | None = field(default=None, repr=False)
    _notifier: Notifier | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, config: Config, *, log: ScanLog | None = None) -> Gateway:
        return cls(config, ScanService.from_config(config), Policy.from_settings(config.policy),
                   log=log)

    async def start(self) -> None:
        await self.scanner.start()

    async def close(self) -> None:
        if self._notifier is not None:
            await self._notifier.aclose()
        await self.scanner.close()

    @property
    def store(self) -> Store:
        if self._store is None:
            from .quarantine import open_store

            with _STORE_LOCK:  # opened from worker threads too (process): one store
                if self._store is None:
                    # [quarantine] backend: file or postgresql (a network connect)
                    self._store = open_store(self.config)
        return self._store

    @property
    def notifier(self) -> Notifier:
        if self._notifier is None:
            from .notify import Notifier

            self._notifier = Notifier(self.config.notify, self.policy, self.log)
        return self._notifier

    def new_spool(self) -> Spool:
        return self.scanner.new_spool()

    async def process(self, spool: Spool, ctx: Context, ids: dict[str, str] | None = None,
                      store_quarantine: bool = True, defer_log: bool = False) -> Outcome:
        """Scan, decide, quarantine when the decision says so, log; never raises for a
        scan failure (that is a result with status error, decided by policy).

        ``store_quarantine=False``: the front-end quarantines by its own means (the milter's
        "mta" mode puts the message on the MTA's hold queue), so our store is not written.
        The quarantine record keeps ``ctx.envelope`` (the one transaction every front-end
        fills).

        ``defer_log=True``: the scan-log line is returned in ``Outcome.event`` instead of
        written; the front-end writes it with :meth:`log_outcome` once it has applied the
        decision (metrics are recorded here either way)."""
        started = time.perf_counter()
        refid = new_refid()
        result = await self.scanner.scan(spool, ctx)  # ctx: banned types depend on it
        decision = self.policy.decide(result, ctx, refid=refid)
        qid: str | None = None
        if decision.quarantine and store_quarantine:
            try:
                # fsync-heavy or a database round trip (opening the store too): keep it off
                # the event loop
                qid = await asyncio.to_thread(lambda: self.store.put(
                    spool, ctx.envelope, result, decision, frontend=ctx.frontend,
                    listener=ctx.listener))
            except Exception as exc:  # any store failure: tempfail, never accept-and-lose
                decision = Decision(Disposition.TEMPFAIL,
                                    QUARANTINE_FAILED_REPLY.format(refid=refid),
                                    rule=f"{decision.rule}+quarantine-failed", refid=refid)
                self._log_event({"event": "error", "frontend": ctx.frontend, "refid": refid,
                                 "error": f"quarantine write failed: {exc}"})
        event = self._event(ctx, result, decision, qid, ids, time.perf_counter() - started)
        if self.config.notify.enabled:
            self.notifier.notify(result, decision, ctx, qid)  # in the background
        if defer_log:
            return Outcome(result, decision, qid, event=event)
        self._log_event(event)
        return Outcome(result, decision, qid)

    def log_outcome(self, outcome: Outcome, *, actions: tuple[str, ...] | list[str] | None
                    = None, **protocol: Any) -> None:
        """Write the deferred scan-log line of ``outcome`` (``process(defer_log=True)``)
        with the ``actions`` the front-end carried out (default: the decision's) and its
        protocol's outcome (e.g. ``reply=`` for SMTP, ``icap_status=`` for ICAP). Does
        nothing for an outcome whose line was already written."""
        if not outcome.event:  # not deferred, or written already
            return
        event = outcome.event.copy()
        outcome.event.clear()
        if actions is not None:
            event["actions"] = list(actions)
        for k, v in protocol.items():
            if v is not None:
                event[k] = v
        self._log_event(event)

    def _event(self, ctx: Context, result: ScanResult, decision: Decision, qid: str | None,
               ids: dict[str, str] | None, elapsed: float) -> dict[str, Any]:
        frontend = ctx.frontend
        record_scan(frontend, result)
        if qid:
            ids = {**ids, "quarantine": qid} if ids else {"quarantine": qid}
        event = scan_event(result, frontend=frontend, listener=ctx.listener, ids=ids,
                           rule=decision.rule, actions=decision.actions, refid=decision.refid)
        if decision.reply and frontend in MAIL_FRONTENDS:
            event["reply"] = decision.reply
        if decision.would is not None:
            event["would"] = decision.would.to_dict()
        event["elapsed_ms"] = round(elapsed * 1000, 3)
        return event

    def _log_event(self, event: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.log(event)
