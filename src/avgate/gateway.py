"""The protocol-neutral pipeline every front-end calls: scan → policy → quarantine → log.

A front-end spools what it received, builds a :class:`~avgate.context.Context` (the session,
with the transaction's :class:`~avgate.context.Envelope` inside), and calls
:meth:`Gateway.process`. It gets back an :class:`Outcome` (the ScanResult, the Decision and
the quarantine id) and applies the decision in its own protocol. The side effects that must
happen before the client is answered (the quarantine write) happen here: if they fail, the
decision becomes a tempfail, so nothing is acknowledged that was not kept.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import Config
from .context import Context, Envelope  # re-exported: front-ends import them from here
from .observability import record_scan, scan_event
from .policy import Decision, Disposition, Policy
from .result import ScanResult
from .scan import ScanService
from .spool import Spool

if TYPE_CHECKING:
    from .observability import ScanLog
    from .quarantine import QuarantineStore

__all__ = ["Context", "Envelope", "Gateway", "Outcome"]

QUARANTINE_FAILED_REPLY = "451 4.3.0 Quarantine unavailable, try again later"


@dataclass(frozen=True, slots=True)
class Outcome:
    result: ScanResult
    decision: Decision
    quarantine_id: str | None = None


@dataclass
class Gateway:
    """Shared by every front-end of one ``serve`` process (or one CLI command)."""

    config: Config
    scanner: ScanService
    policy: Policy
    log: ScanLog | None = None
    _store: QuarantineStore | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, config: Config, *, log: ScanLog | None = None) -> Gateway:
        return cls(config, ScanService.from_config(config), Policy.from_settings(config.policy),
                   log=log)

    async def start(self) -> None:
        await self.scanner.start()

    async def close(self) -> None:
        await self.scanner.close()

    @property
    def store(self) -> QuarantineStore:
        if self._store is None:
            from .quarantine import QuarantineStore

            self._store = QuarantineStore(self.config.quarantine_path)
        return self._store

    def new_spool(self) -> Spool:
        return self.scanner.new_spool()

    async def process(self, spool: Spool, ctx: Context, ids: dict[str, str] | None = None,
                      store_quarantine: bool = True) -> Outcome:
        """Scan, decide, quarantine when the decision says so, log; never raises for a
        scan failure (that is a result with status error, decided by policy).

        ``store_quarantine=False``: the front-end quarantines by its own means (the milter's
        "mta" mode puts the message on the MTA's hold queue), so our store is not written.
        The quarantine record keeps ``ctx.envelope`` (the one transaction every front-end
        fills)."""
        started = time.perf_counter()
        result = await self.scanner.scan(spool)
        decision = self.policy.decide(result, ctx)
        qid: str | None = None
        if decision.quarantine and store_quarantine:
            try:
                # fsync-heavy: keep it off the event loop
                qid = await asyncio.to_thread(self.store.put, spool, ctx.envelope, result,
                                              decision,
                                              frontend=ctx.frontend, listener=ctx.listener)
            except Exception as exc:  # any store failure: tempfail, never accept-and-lose
                decision = Decision(Disposition.TEMPFAIL, QUARANTINE_FAILED_REPLY,
                                    rule=f"{decision.rule}+quarantine-failed")
                self._log_event({"event": "error", "frontend": ctx.frontend,
                                 "error": f"quarantine write failed: {exc}"})
        self._record(ctx, result, decision, qid, ids, time.perf_counter() - started)
        return Outcome(result, decision, qid)

    def _record(self, ctx: Context, result: ScanResult, decision: Decision, qid: str | None,
                ids: dict[str, str] | None, elapsed: float) -> None:
        record_scan(ctx.frontend, result)
        extra: dict[str, Any] = {"reply": decision.reply} if decision.reply else {}
        if decision.would is not None:
            extra["would"] = decision.would.to_dict()
        event = scan_event(result, frontend=ctx.frontend, listener=ctx.listener,
                           ids={**(ids or {}), **({"quarantine": qid} if qid else {})},
                           rule=decision.rule, actions=decision.actions, **extra)
        event["elapsed_ms"] = round(elapsed * 1000, 3)
        self._log_event(event)

    def _log_event(self, event: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.log(event)
