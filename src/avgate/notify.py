"""Notices about held and refused mail: to an admin, to the recipients, to the sender.

amavisd-new's ``$virus_admin``, ``warnvirusrecip`` and ``warnvirussender``, with the lesson
amavis learnt: a notice to the sender of virus mail goes to a forged address (backscatter),
so sender notices are off by default and, when on, only go to senders this gateway can
vouch for — outbound mail or an authenticated session — never to whoever the envelope names.

``[notify]`` (see :class:`NotifySettings`) chooses who is told and with what text. After the
gateway has decided (and quarantined), :meth:`Notifier.plan` works out the notices, a pure
function of the outcome and the session; :meth:`Notifier.send` sends them in the background
through the same SMTP client as releases and reports, to ``next_hop`` (the MTA's re-injection
port). A notice that cannot be sent is logged (``"event": "notify"``, ``"ok": false``) and
never changes the verdict or delays the answer to the client. Each address gets at most
``rate_limit`` notices per ``rate_period`` seconds (a mass mailing of a virus to one user,
or to an admin, must not become a flood of notices).

``avgate notify digest`` sends each recipient one message listing what was held for them
since a time, with the admin address to ask for a release (releases stay an admin's act).

Templates are ``str.format`` texts; the variables are the policy's (``{virus}``,
``{viruses}``, ``{status}``, ``{reason}``, ``{sender}``, ``{refid}``, ...) plus
``{recipients}``, ``{parts}``, ``{quarantine_id}``, ``{listener}`` and ``{release_link}``
(``console_url`` followed by the quarantine id; empty when either is missing). An unknown
``{name}`` is left as written.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from .policy import Disposition, Policy
from .result import ScanResult
from .settings import Section, StrTuple

if TYPE_CHECKING:
    from .context import Context
    from .decision import Decision
    from .observability import ScanLog
    from .quarantine.base import Record

NoticeKind = Literal["admin", "recipient", "sender"]

DEFAULT_ADMIN_SUBJECT = "[avgate] {status}: {viruses} from <{sender}> (RefID {refid})"
DEFAULT_ADMIN_BODY = """\
avgate held or refused a message.

Status:      {status} {viruses}
Reason:      {reason}
Sender:      <{sender}>
Recipients:  {recipients}
Parts:       {parts}
Listener:    {listener}
RefID:       {refid}
Quarantine:  {quarantine_id}
{release_link}
"""
DEFAULT_RECIPIENT_SUBJECT = "A message to you was held: {viruses} (RefID {refid})"
DEFAULT_RECIPIENT_BODY = """\
A message from <{sender}> to you was not delivered because it contains {viruses}.

It was kept by the mail gateway (RefID {refid}). If you expected this message, ask
your mail administrator to check it, quoting the RefID.
"""
DEFAULT_SENDER_SUBJECT = "Your message was not delivered: {viruses} (RefID {refid})"
DEFAULT_SENDER_BODY = """\
Your message to {recipients} was not delivered because it contains {viruses}.

Please check your computer for malware. The message was kept by the mail gateway
(RefID {refid}).
"""
DEFAULT_DIGEST_SUBJECT = "Messages held for you: {count}"


class NotifySettings(Section):
    """``[notify]``: who is told about held or refused mail, and how.

    admin: addresses for admin notices (none: no admin notices); recipient: tell each
    recipient that a message to them was held; sender: tell the sender — only for outbound
    mail or an authenticated session (never backscatter); statuses: which scan statuses
    cause notices; from_address: the notices' sender (the envelope sender is empty, ``<>``,
    as for any automatic notice); next_hop: where notices are sent (the MTA's re-injection
    port); rate_limit / rate_period: at most that many notices per address per period;
    console_url: base of ``{release_link}``; *_subject / *_body: the templates.
    """

    admin: StrTuple = ()
    recipient: bool = False
    sender: bool = False
    statuses: StrTuple = ("infected",)
    from_address: str = "avgate@localhost"
    next_hop: str = "127.0.0.1:10026"
    rate_limit: int = Field(20, gt=0)
    rate_period: float = Field(3600.0, gt=0)
    timeout: float = Field(30.0, gt=0)
    console_url: str = ""
    admin_subject: str = DEFAULT_ADMIN_SUBJECT
    admin_body: str = DEFAULT_ADMIN_BODY
    recipient_subject: str = DEFAULT_RECIPIENT_SUBJECT
    recipient_body: str = DEFAULT_RECIPIENT_BODY
    sender_subject: str = DEFAULT_SENDER_SUBJECT
    sender_body: str = DEFAULT_SENDER_BODY
    digest_subject: str = DEFAULT_DIGEST_SUBJECT

    @property
    def enabled(self) -> bool:
        return bool(self.admin) or self.recipient or self.sender


@dataclass(frozen=True, slots=True)
class Notice:
    """One notice to send: to whom, and the message."""

    kind: NoticeKind
    to: str
    subject: str
    body: str


class RateLimit:
    """At most ``limit`` events per key in any ``period`` seconds (a sliding window), for at
    most ``max_keys`` keys (the least recently used are forgotten first)."""

    def __init__(self, limit: int, period: float, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.period = period
        self.max_keys = max_keys
        self._seen: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict())

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        times = self._seen.pop(key, None)
        if times is None:
            times = collections.deque()
        while times and times[0] <= now - self.period:
            times.popleft()
        allowed = len(times) < self.limit
        if allowed:
            times.append(now)
        self._seen[key] = times
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        return allowed


def _one_line(text: str) -> str:
    return " ".join(text.split())


class Notifier:
    """Plans and sends the notices of one gateway (see the module docstring)."""

    def __init__(self, settings: NotifySettings, policy: Policy,
                 log: ScanLog | None = None) -> None:
        self.settings = settings
        self.policy = policy
        self.log = log
        self.limit = RateLimit(settings.rate_limit, settings.rate_period)
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- what to send ------------------------------------------------------------------------
    def plan(self, result: ScanResult, decision: Decision, ctx: Context,
             quarantine_id: str | None = None) -> list[Notice]:
        """The notices for one outcome (rate limits not applied yet)."""
        s = self.settings
        if not s.enabled or result.status.value not in s.statuses:
            return []
        env = ctx.envelope
        held = bool(quarantine_id) or decision.disposition in (
            Disposition.REJECT, Disposition.DISCARD)
        variables = self.variables(result, decision, ctx, quarantine_id)
        notices = [self._notice("admin", a, s.admin_subject, s.admin_body, variables)
                   for a in s.admin]
        if s.recipient and held:
            notices += [self._notice("recipient", r, s.recipient_subject, s.recipient_body,
                                     variables) for r in dict.fromkeys(env.recipients)]
        if s.sender and held and env.sender and (ctx.authenticated
                                                 or ctx.direction == "outbound"):
            notices.append(self._notice("sender", env.sender, s.sender_subject,
                                        s.sender_body, variables))
        return notices

    def variables(self, result: ScanResult, decision: Decision, ctx: Context,
                  quarantine_id: str | None) -> dict[str, str]:
        v = self.policy.variables(result, ctx, decision.refid)
        link = ""
        if self.settings.console_url and quarantine_id:
            link = self.settings.console_url.rstrip("/") + "/" + quarantine_id
        parts = sorted({f.part for f in result.findings if f.part})
        v.update(recipients=_one_line(", ".join(ctx.envelope.recipients)),
                 parts=_one_line(", ".join(parts)) or "(the message itself)",
                 quarantine_id=quarantine_id or "-", listener=ctx.listener or "",
                 release_link=link)
        return v

    @staticmethod
    def _notice(kind: NoticeKind, to: str, subject: str, body: str,
                variables: dict[str, str]) -> Notice:
        return Notice(kind, to, _one_line(subject.format_map(variables)),
                      body.format_map(variables))

    # -- sending -----------------------------------------------------------------------------
    def message(self, notice: Notice, *, reply_to: str = "") -> bytes:
        msg = EmailMessage()
        msg["From"] = self.settings.from_address
        msg["To"] = notice.to
        msg["Subject"] = notice.subject
        msg["Date"] = formatdate(localtime=True)
        msg["Message-ID"] = make_msgid(domain="avgate.invalid")
        msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to this
        if reply_to:
            msg["Reply-To"] = reply_to
        msg.set_content(notice.body)
        return msg.as_bytes()

    def notify(self, result: ScanResult, decision: Decision, ctx: Context,
               quarantine_id: str | None = None) -> None:
        """Plan and send in the background: the caller's answer never waits for a notice."""
        notices = self.plan(result, decision, ctx, quarantine_id)
        if not notices:
            return
        task = asyncio.get_running_loop().create_task(self.send(notices, decision.refid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def send(self, notices: Iterable[Notice], refid: str = "") -> list[bool]:
        """Send each notice (rate limits applied); one log line each; never raises."""
        from .quarantine.release import send

        sent = []
        for notice in notices:
            line: dict[str, Any] = {"event": "notify", "kind": notice.kind, "to": notice.to,
                                    "refid": refid}
            if not self.limit.allow(notice.to.lower()):
                self._log({**line, "ok": False, "skipped": "rate limit"}, "warning")
                sent.append(False)
                continue
            try:
                await asyncio.wait_for(send(self.settings.next_hop, "", [notice.to],
                                            self.message(notice)), self.settings.timeout)
            except Exception as exc:  # a notice never fails the message it is about
                self._log({**line, "ok": False, "error": str(exc) or type(exc).__name__},
                          "warning")
                sent.append(False)
                continue
            self._log({**line, "ok": True}, "info")
            sent.append(True)
        return sent

    def _log(self, event: dict[str, Any], level: str) -> None:
        if self.log is not None:
            self.log.log({"level": level, **event}, level=level)

    async def aclose(self) -> None:
        """Let notices in flight finish (bounded by their timeout)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- digest ------------------------------------------------------------------------------
    def digest(self, records: Sequence[Record], since: float) -> list[Notice]:
        """One notice per recipient listing what was held for them (newest first)."""
        per: dict[str, list[Record]] = {}
        for record in records:
            if record.created < since or record.released:
                continue
            for rcpt in dict.fromkeys(r.lower() for r in record.envelope.recipients):
                per.setdefault(rcpt, []).append(record)
        ask = ", ".join(self.settings.admin) or "your mail administrator"
        notices = []
        for rcpt, held in sorted(per.items()):
            held.sort(key=lambda r: r.created, reverse=True)
            lines = [f"{len(held)} message(s) to you were held by the mail gateway since "
                     f"{formatdate(since, localtime=True)}:", ""]
            for r in held:
                lines.append(f"  {formatdate(r.created, localtime=True)}  from "
                             f"<{_one_line(r.envelope.sender)}>  "
                             f"{_one_line(', '.join(r.viruses) or r.status)}  "
                             f"id {r.id}  RefID {r.refid or '-'}")
            lines += ["", f"To have one released, write to {ask} quoting its id."]
            subject = _one_line(self.settings.digest_subject.format_map(
                {"count": str(len(held)), "recipient": rcpt}))
            notices.append(Notice("recipient", rcpt, subject, "\n".join(lines) + "\n"))
        return notices
