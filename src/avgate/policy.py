"""Policy: ordered rules turn a ScanResult into a Decision. Engines detect, policy decides.

A front-end builds a :class:`Context` (where the object came from), calls
:meth:`Policy.decide` and applies the returned :class:`Decision` in its own protocol.

Rules (``[[policy.rules]]``) are tried in order; the first whose conditions all match fires.
No rule matching → the defaults::

    infected        → virus_action   (default reject "550 5.7.1 Virus found: {virus}")
    error           → failure_action (default tempfail "451 4.7.1 Virus scanner unavailable,
                                      try again later")
    a structural limit (max_files, max_recursion, max_ratio, part/entry/header counts,
    the scan worker's time or memory budget) → structural_action (default reject
                      "552 5.3.4 Message content not scannable: {reason}")
    a size limit    → size_action (default "auto": reject "552 5.3.4 Message too large to
                      scan: {reason}" on the mail front-ends (smtp, milter, qmail), accept +
                      tag on the others: a 150 MiB download through ICAP still passes)
    other skipped/unknown (encrypted archive, corrupt container) → accept + tag
    clean           → accept + tag

Anyone can shape content to hit a structural limit, so hitting one is never a free pass;
rules can still decide otherwise, matching ``limit = "structural" | "size" | "none"`` and
``reason`` (a glob over the reason text).

Actions and how they combine: exactly one *disposition* — ``accept``, ``reject``,
``tempfail``, ``discard`` — plus any of the *modifiers* ``quarantine``, ``replace``, ``tag``,
``prefix_subject``, ``copy_to``. A rule listing only modifiers is an ``accept``, except a
rule whose only disposition-like action is ``quarantine``: that holds the message
(``discard`` + ``quarantine``: acknowledged, kept in the quarantine, not delivered).
``replace``/``prefix_subject``/``tag``/``copy_to`` make no sense with ``reject``/``tempfail``
and are refused by the validator.

Header styles (``header_style``): ``default`` (``X-Virus-Scanned`` + ``X-Virus-Status``),
``qhpsi`` (``X-QHPSI: clean | virus found``; skipped/unknown/error, which QHPSI has no word
for, are ``not scanned``/``unknown``/``error`` — never ``clean``), ``clamav-verdict`` (the
Sun/Oracle messaging-server ClamAV plugin: field ``verdict_prefix`` (default ``Virus-Test``),
``verdict_mode`` 0: fixed ``verdict_text`` when infected, nothing when clean; 1: result
(``True ; NAME``) when infected, nothing when clean; 2: always the result (``True ; NAME`` or
``False``); 3: fixed verdict when infected, else the result (``False``)), ``none``.
``headers = { Name = "template" }`` replaces the style's headers. Templates may use
``{virus}``, ``{viruses}``, ``{status}``, ``{status_word}``, ``{reason}``, ``{version}``,
``{engine}``.
"""

from __future__ import annotations

import enum
import fnmatch
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import __version__
from .limits import parse_size
from .result import ScanResult, ScanStatus

DEFAULT_REJECT_REPLY = "550 5.7.1 Virus found: {virus}"
DEFAULT_TEMPFAIL_REPLY = "451 4.7.1 Virus scanner unavailable, try again later"
DEFAULT_FAILURE_REJECT_REPLY = "554 5.7.0 Virus scanner unavailable, message refused"
DEFAULT_VIRUS_TEMPFAIL_REPLY = "451 4.7.1 Message held: virus found ({virus})"
DEFAULT_NOTICE = ("This part of the message contained a virus ({virus}) and was removed "
                  "by avgate.\nThe original file name was: {filename}\n")
DEFAULT_SUBJECT_PREFIX = "***VIRUS*** "
DEFAULT_STRUCTURAL_REPLY = "552 5.3.4 Message content not scannable: {reason}"
DEFAULT_SIZE_REPLY = "552 5.3.4 Message too large to scan: {reason}"
DEFAULT_VERDICT_PREFIX = "Virus-Test"
DEFAULT_VERDICT_TEXT = "virus"

FRONTENDS = ("smtp", "milter", "icap", "http", "clamd", "qmail", "cli")
MAIL_FRONTENDS = frozenset({"smtp", "milter", "qmail"})
LIMIT_ACTIONS = ("reject", "keep", "tempfail", "discard", "quarantine")
LIMITS = ("structural", "size", "none")
_REASON_MAX = 200  # characters of the reason in replies and headers
DISPOSITIONS = ("accept", "reject", "tempfail", "discard")
MODIFIERS = ("quarantine", "replace", "tag", "prefix_subject", "copy_to")
SHORTCUTS_VIRUS = ("reject", "keep", "tempfail", "discard", "quarantine")
SHORTCUTS_FAILURE = ("reject", "keep", "tempfail", "discard")
RULE_KEYS = frozenset({
    "name", "status", "virus", "frontend", "listener", "direction", "sender", "recipient",
    "size", "action", "reply", "headers", "subject_prefix", "copy_to", "notice", "shadow",
    "limit", "reason",
})
_REPLY_RE = re.compile(r"^([245])\d\d(?:[ -].*)?$", re.DOTALL)


class Disposition(enum.StrEnum):
    ACCEPT = "accept"  # deliver / pass (with modifiers)
    REJECT = "reject"  # permanent refusal (5xx)
    TEMPFAIL = "tempfail"  # temporary refusal (4xx): the sender retries
    DISCARD = "discard"  # acknowledge and drop


@dataclass(frozen=True, slots=True)
class Context:
    """Where the object came from, for rule conditions and templates."""

    frontend: str
    listener: str = ""
    direction: str = "inbound"
    sender: str = ""
    recipients: tuple[str, ...] = ()
    client_addr: str = ""
    authenticated: bool = False
    size: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    """What a front-end must do with the object. Front-ends apply it in their protocol."""

    disposition: Disposition
    reply: str = ""  # "550 5.7.1 text" for reject/tempfail; "" otherwise
    headers: tuple[tuple[str, str], ...] = ()
    quarantine: bool = False
    replace: bool = False
    notice: str = ""
    subject_prefix: str = ""
    copy_to: tuple[str, ...] = ()
    rule: str = ""
    shadow: bool = False
    would: Decision | None = None  # in shadow mode: what would have happened

    @property
    def code(self) -> int:
        """The reply code (250 for accept/discard without a reply)."""
        return int(self.reply[:3]) if self.reply[:3].isdigit() else 250

    @property
    def text(self) -> str:
        """The reply text after the code (with the enhanced status code, if any)."""
        return self.reply[4:] if len(self.reply) > 4 else ""

    @property
    def delivers(self) -> bool:
        return self.disposition is Disposition.ACCEPT

    @property
    def actions(self) -> tuple[str, ...]:
        """Names of what this decision does, for the scan log."""
        acts = [self.disposition.value]
        if self.quarantine:
            acts.append("quarantine")
        if self.replace:
            acts.append("replace")
        if self.headers:
            acts.append("tag")
        if self.subject_prefix:
            acts.append("prefix_subject")
        if self.copy_to:
            acts.append("copy_to")
        if self.shadow:
            acts.append("shadow")
        return tuple(acts)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"disposition": self.disposition.value, "rule": self.rule,
                             "actions": list(self.actions)}
        if self.reply:
            d["reply"] = self.reply
        if self.would is not None:
            d["would"] = self.would.to_dict()
        return d


@dataclass(frozen=True)
class Rule:
    name: str
    statuses: frozenset[ScanStatus] | None = None
    virus: tuple[str, ...] | None = None
    frontend: tuple[str, ...] | None = None
    listener: tuple[str, ...] | None = None
    direction: str | None = None
    sender: tuple[str, ...] | None = None
    recipient: tuple[str, ...] | None = None
    size: tuple[int, int] | None = None
    limit: frozenset[str] | None = None  # "structural", "size", "none"
    reason: tuple[str, ...] | None = None  # globs over the reason, case-insensitive
    disposition: Disposition = Disposition.ACCEPT
    modifiers: frozenset[str] = frozenset()
    reply: str = ""
    headers: tuple[tuple[str, str], ...] | None = None
    subject_prefix: str = DEFAULT_SUBJECT_PREFIX
    copy_to: tuple[str, ...] = ()
    notice: str = DEFAULT_NOTICE
    shadow: bool = False

    def matches(self, result: ScanResult, ctx: Context) -> bool:
        if self.statuses is not None and result.status not in self.statuses:
            return False
        if self.virus is not None and not any(
                _glob(name, self.virus) for name in result.virus_names):
            return False
        if self.frontend is not None and ctx.frontend not in self.frontend:
            return False
        if self.listener is not None and ctx.listener not in self.listener:
            return False
        if self.direction is not None and ctx.direction != self.direction:
            return False
        if self.sender is not None and not _glob(ctx.sender.lower(), self.sender):
            return False
        if self.recipient is not None and not any(
                _glob(r.lower(), self.recipient) for r in ctx.recipients):
            return False
        if self.size is not None:
            size = ctx.size or result.size
            if not self.size[0] <= size <= self.size[1]:
                return False
        if self.limit is not None and (
                result.limit.value if result.limit else "none") not in self.limit:
            return False
        if self.reason is not None and not _glob(result.reason.lower(), self.reason):
            return False
        return True


def _glob(value: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


def _shorten(text: str) -> str:
    return text if len(text) <= _REASON_MAX else text[:_REASON_MAX - 3] + "..."


class _Vars(dict[str, str]):
    """format_map mapping that leaves unknown {names} as they are."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def _clean_value(s: str) -> str:
    """Header/reply-safe: no CR/LF/NUL (a virus name must never inject a header line)."""
    return re.sub(r"[\r\n\0]+", " ", s)


_STATUS_WORD = {
    ScanStatus.CLEAN: "Clean",
    ScanStatus.SKIPPED: "Skipped",
    ScanStatus.UNKNOWN: "Unknown",
    ScanStatus.ERROR: "Error",
}


class Policy:
    """Ordered rules plus defaults; see the module docstring."""

    def __init__(self, rules: Sequence[Rule] = (), *, virus_action: str = "reject",
                 failure_action: str = "tempfail", header_style: str = "default",
                 headers: Mapping[str, str] | None = None, shadow: bool = False,
                 verdict_mode: int = 2, verdict_prefix: str = DEFAULT_VERDICT_PREFIX,
                 verdict_text: str = DEFAULT_VERDICT_TEXT,
                 reject_reply: str = DEFAULT_REJECT_REPLY,
                 tempfail_reply: str = DEFAULT_TEMPFAIL_REPLY,
                 notice: str = DEFAULT_NOTICE,
                 subject_prefix: str = DEFAULT_SUBJECT_PREFIX,
                 copy_to: Sequence[str] = (),
                 internal_networks: Sequence[str] = (),
                 structural_action: str = "reject",
                 size_action: str = "auto") -> None:
        self.rules = list(rules)
        self.virus_action = virus_action
        self.failure_action = failure_action
        self.header_style = header_style
        self.header_templates = tuple(headers.items()) if headers else None
        self.shadow = shadow
        self.verdict_mode = verdict_mode
        self.verdict_prefix = verdict_prefix
        self.verdict_text = verdict_text
        self.reject_reply = reject_reply
        self.tempfail_reply = tempfail_reply
        self.notice = notice
        self.subject_prefix = subject_prefix
        self.copy_to = tuple(copy_to)
        self.structural_action = structural_action
        self.size_action = size_action
        self.internal_networks = tuple(ipaddress.ip_network(n, strict=False)
                                       for n in internal_networks)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_config(cls, table: Mapping[str, Any]) -> Policy:
        """Build from the ``[policy]`` table (already validated by :func:`validate`)."""
        problems = validate(table)
        if problems:
            from .errors import ConfigError

            raise ConfigError([f"{p}: {m}" for p, m in problems])
        kw = {k: table[k] for k in ("virus_action", "failure_action", "header_style", "headers",
                                    "shadow", "verdict_mode", "verdict_prefix", "verdict_text",
                                    "reject_reply", "tempfail_reply", "notice",
                                    "subject_prefix", "internal_networks",
                                    "structural_action", "size_action") if k in table}
        if "copy_to" in table:
            kw["copy_to"] = _strs(table["copy_to"])
        rules = [_rule(r, i, table) for i, r in enumerate(table.get("rules", []))]
        return cls(rules, **kw)

    # -- deciding -------------------------------------------------------------------------
    def decide(self, result: ScanResult, ctx: Context) -> Decision:
        """The decision for ``result`` seen through ``ctx`` (first matching rule wins)."""
        decision: Decision | None = None
        shadow = self.shadow
        for rule in self.rules:
            if rule.matches(result, ctx):
                decision = self._apply_rule(rule, result, ctx)
                shadow = shadow or rule.shadow
                break
        if decision is None:
            decision = self._default(result, ctx)
        if shadow:
            return Decision(Disposition.ACCEPT, headers=self.headers_for(result),
                            rule=decision.rule, shadow=True, would=decision)
        return decision

    def direction_for(self, listener_direction: str, client_addr: str = "",
                      authenticated: bool = False) -> str:
        """inbound/outbound from the listener; "auto" decides by SMTP AUTH or client network."""
        if listener_direction in ("inbound", "outbound"):
            return listener_direction
        if authenticated:
            return "outbound"
        try:
            addr = ipaddress.ip_address(client_addr.strip("[]"))
        except ValueError:
            return "inbound"
        if any(addr in net for net in self.internal_networks):
            return "outbound"
        return "inbound"

    def _vars(self, result: ScanResult, ctx: Context | None = None) -> _Vars:
        names = result.virus_names
        status_word = (f"Infected ({', '.join(names)})" if result.infected
                       else _STATUS_WORD[result.status])
        return _Vars(
            virus=_clean_value(names[0] if names else ""),
            viruses=_clean_value(", ".join(names)),
            status=result.status.value,
            status_word=_clean_value(status_word),
            reason=_clean_value(_shorten(result.reason)),
            version=__version__,
            engine=_clean_value(", ".join(e.name for e in result.engines)),
            sender=_clean_value(ctx.sender) if ctx else "",
            frontend=ctx.frontend if ctx else "",
        )

    def render(self, template: str, result: ScanResult, ctx: Context | None = None) -> str:
        return _clean_value(template.format_map(self._vars(result, ctx)))

    def headers_for(self, result: ScanResult) -> tuple[tuple[str, str], ...]:
        """Verdict headers in the configured style."""
        if self.header_templates is not None:
            return tuple((n, self.render(t, result)) for n, t in self.header_templates)
        return self._style_headers(result, self.header_style)

    def own_header_names(self) -> frozenset[str]:
        """Lower-cased names of every header avgate may write, whatever the result.

        Front-ends remove incoming copies of these before adding their own, so a sender's
        forged ``X-Virus-Status: Clean`` never reaches the recipient beside (or instead of)
        the real verdict. Every style's names are included, not only the configured one:
        a verdict in any style must come from this gateway.
        """
        names = {"x-virus-scanned", "x-virus-status", "x-qhpsi",
                 self.verdict_prefix.lower(), DEFAULT_VERDICT_PREFIX.lower()}
        if self.header_templates is not None:
            names.update(n.lower() for n, _ in self.header_templates)
        for rule in self.rules:
            if rule.headers is not None:
                names.update(n.lower() for n, _ in rule.headers)
        names.discard("")
        return frozenset(names)

    def _style_headers(self, result: ScanResult, style: str) -> tuple[tuple[str, str], ...]:
        v = self._vars(result)
        if style == "none":
            return ()
        if style == "qhpsi":
            word = {ScanStatus.CLEAN: "clean", ScanStatus.INFECTED: "virus found",
                    ScanStatus.SKIPPED: "not scanned", ScanStatus.UNKNOWN: "unknown",
                    ScanStatus.ERROR: "error"}[result.status]
            return (("X-QHPSI", word),)
        if style == "clamav-verdict":
            infected = result.infected
            res = f"True ; {v['viruses']}" if infected else "False"
            mode = self.verdict_mode
            if mode == 0:
                value = self.verdict_text if infected else None
            elif mode == 1:
                value = res if infected else None
            elif mode == 2:
                value = res
            else:
                value = self.verdict_text if infected else res
            return ((self.verdict_prefix, value),) if value is not None else ()
        return (("X-Virus-Scanned", f"avgate {__version__}"),
                ("X-Virus-Status", v["status_word"]))

    def _apply_rule(self, rule: Rule, result: ScanResult, ctx: Context) -> Decision:
        mods = rule.modifiers
        reply = ""
        if rule.disposition is Disposition.REJECT:
            reply = self.render(rule.reply or (self.reject_reply if result.infected
                                               else DEFAULT_FAILURE_REJECT_REPLY), result, ctx)
        elif rule.disposition is Disposition.TEMPFAIL:
            reply = self.render(rule.reply or (self.tempfail_reply if not result.infected
                                               else DEFAULT_VIRUS_TEMPFAIL_REPLY), result, ctx)
        headers: tuple[tuple[str, str], ...] = ()
        if "tag" in mods:
            headers = (tuple((n, self.render(t, result, ctx)) for n, t in rule.headers)
                       if rule.headers is not None else self.headers_for(result))
        return Decision(
            disposition=rule.disposition,
            reply=reply,
            headers=headers,
            quarantine="quarantine" in mods,
            replace="replace" in mods,
            notice=rule.notice if "replace" in mods else "",
            subject_prefix=self.render(rule.subject_prefix, result, ctx)
            if "prefix_subject" in mods else "",
            copy_to=(rule.copy_to or self.copy_to) if "copy_to" in mods else (),
            rule=rule.name,
        )

    def _default(self, result: ScanResult, ctx: Context) -> Decision:
        status = result.status
        tag = self.headers_for(result)
        if status is ScanStatus.INFECTED:
            action = self.virus_action
            rule = "default:infected"
            if action == "reject":
                return Decision(Disposition.REJECT, self.render(self.reject_reply, result, ctx),
                                rule=rule)
            if action == "tempfail":
                return Decision(Disposition.TEMPFAIL,
                                self.render(DEFAULT_VIRUS_TEMPFAIL_REPLY, result, ctx), rule=rule)
            if action == "discard":
                return Decision(Disposition.DISCARD, rule=rule)
            if action == "quarantine":
                return Decision(Disposition.DISCARD, quarantine=True, rule=rule)
            return Decision(Disposition.ACCEPT, headers=tag, rule=rule)  # keep
        if status is ScanStatus.ERROR:
            action = self.failure_action
            rule = "default:error"
            if action == "tempfail":
                return Decision(Disposition.TEMPFAIL,
                                self.render(self.tempfail_reply, result, ctx), rule=rule)
            if action == "reject":
                return Decision(Disposition.REJECT,
                                self.render(DEFAULT_FAILURE_REJECT_REPLY, result, ctx), rule=rule)
            if action == "discard":
                return Decision(Disposition.DISCARD, rule=rule)
            return Decision(Disposition.ACCEPT, headers=tag, rule=rule)  # keep
        if result.limit is not None:
            return self._limit_default(result, ctx, tag)
        return Decision(Disposition.ACCEPT, headers=tag, rule=f"default:{status.value}")

    def _limit_default(self, result: ScanResult, ctx: Context,
                       tag: tuple[tuple[str, str], ...]) -> Decision:
        """Skipped/unknown because a limit was hit: structural never passes by default."""
        assert result.limit is not None
        kind = result.limit.value
        rule = f"default:{kind}-limit"
        if kind == "structural":
            action, reply = self.structural_action, DEFAULT_STRUCTURAL_REPLY
        else:
            action, reply = self.size_action, DEFAULT_SIZE_REPLY
            if action == "auto":
                action = "reject" if ctx.frontend in MAIL_FRONTENDS else "keep"
        if action == "reject":
            return Decision(Disposition.REJECT, self.render(reply, result, ctx), rule=rule)
        if action == "tempfail":
            return Decision(Disposition.TEMPFAIL, self.render(self.tempfail_reply, result, ctx),
                            rule=rule)
        if action == "discard":
            return Decision(Disposition.DISCARD, rule=rule)
        if action == "quarantine":
            return Decision(Disposition.DISCARD, quarantine=True, rule=rule)
        return Decision(Disposition.ACCEPT, headers=tag, rule=rule)  # keep


# -- config validation ------------------------------------------------------------------------
def _strs(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return tuple(v)
    raise ValueError("expected a string or a list of strings")


def _size_range(v: Any) -> tuple[int, int]:
    """"min-max" ("0-10 MiB", "1M-"), [min, max], or {min=, max=}."""
    hi_default = 1 << 62
    if isinstance(v, str):
        lo, sep, hi = v.partition("-")
        if not sep:
            raise ValueError('expected "min-max", e.g. "0-10 MiB" or "1 MiB-"')
        return (parse_size(lo) if lo.strip() else 0, parse_size(hi) if hi.strip() else hi_default)
    if isinstance(v, list) and len(v) == 2:
        return (parse_size(v[0]), parse_size(v[1]))
    if isinstance(v, dict) and set(v) <= {"min", "max"}:
        return (parse_size(v.get("min", 0)), parse_size(v.get("max", hi_default)))
    raise ValueError('expected "min-max", [min, max] or { min = .., max = .. }')


def _parse_actions(v: Any) -> tuple[Disposition, frozenset[str]]:
    acts = _strs(v)
    unknown = [a for a in acts if a not in DISPOSITIONS and a not in MODIFIERS]
    if unknown:
        raise ValueError(f"unknown action(s) {', '.join(unknown)} "
                         f"(known: {', '.join(DISPOSITIONS + MODIFIERS)})")
    disp = [a for a in acts if a in DISPOSITIONS]
    if len(disp) > 1:
        raise ValueError(f"more than one of accept/reject/tempfail/discard: {', '.join(disp)}")
    mods = frozenset(a for a in acts if a in MODIFIERS)
    if disp:
        d = Disposition(disp[0])
    elif mods == {"quarantine"}:
        d = Disposition.DISCARD
    else:
        d = Disposition.ACCEPT
    if d in (Disposition.REJECT, Disposition.TEMPFAIL):
        bad = mods & {"replace", "tag", "prefix_subject", "copy_to"}
        if bad:
            raise ValueError(f"{d.value} cannot be combined with {', '.join(sorted(bad))}")
    if d is Disposition.DISCARD and mods - {"quarantine", "copy_to"}:
        raise ValueError("discard combines only with quarantine and copy_to")
    return d, mods


def _check_reply(reply: Any, disposition: Disposition | None) -> None:
    if not isinstance(reply, str):
        raise ValueError("expected a string like \"550 5.7.1 text\"")
    m = _REPLY_RE.match(reply)
    if not m or "\r" in reply or "\n" in reply:
        raise ValueError(f"not an SMTP reply (3-digit code, space, text): {reply!r}")
    if disposition is Disposition.REJECT and m.group(1) != "5":
        raise ValueError(f"a reject reply must be 5xx: {reply!r}")
    if disposition is Disposition.TEMPFAIL and m.group(1) != "4":
        raise ValueError(f"a tempfail reply must be 4xx: {reply!r}")


def _rule(t: Mapping[str, Any], i: int, policy: Mapping[str, Any]) -> Rule:
    disp, mods = _parse_actions(t["action"])
    statuses = None
    if "status" in t:
        statuses = frozenset(ScanStatus(s) for s in _strs(t["status"]))
    headers = None
    if isinstance(t.get("headers"), dict):
        headers = tuple((str(k), str(v)) for k, v in t["headers"].items())
    return Rule(
        name=t.get("name", f"rule{i + 1}"),
        statuses=statuses,
        virus=_strs(t["virus"]) if "virus" in t else None,
        frontend=_strs(t["frontend"]) if "frontend" in t else None,
        listener=_strs(t["listener"]) if "listener" in t else None,
        direction=t.get("direction"),
        sender=tuple(s.lower() for s in _strs(t["sender"])) if "sender" in t else None,
        recipient=tuple(s.lower() for s in _strs(t["recipient"])) if "recipient" in t else None,
        size=_size_range(t["size"]) if "size" in t else None,
        limit=frozenset(_strs(t["limit"])) if "limit" in t else None,
        reason=tuple(s.lower() for s in _strs(t["reason"])) if "reason" in t else None,
        disposition=disp,
        modifiers=mods,
        reply=t.get("reply", ""),
        headers=headers,
        subject_prefix=t.get("subject_prefix", policy.get("subject_prefix",
                                                          DEFAULT_SUBJECT_PREFIX)),
        copy_to=_strs(t["copy_to"]) if "copy_to" in t else (),
        notice=t.get("notice", policy.get("notice", DEFAULT_NOTICE)),
        shadow=bool(t.get("shadow", False)),
    )


def validate(table: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Check the ``[policy]`` table; returns (key path, message) pairs, empty when valid."""
    problems: list[tuple[str, str]] = []

    def bad(path: str, msg: str) -> None:
        problems.append((path, msg))

    for key in ("reject_reply", "tempfail_reply"):
        if key in table:
            try:
                _check_reply(table[key], Disposition.REJECT if key == "reject_reply"
                             else Disposition.TEMPFAIL)
            except ValueError as exc:
                bad(f"policy.{key}", str(exc))
    if "headers" in table and not (isinstance(table["headers"], dict) and all(
            isinstance(v, str) for v in table["headers"].values())):
        bad("policy.headers", "expected a table of header name = \"template\"")
    for key, choices in (("structural_action", LIMIT_ACTIONS),
                         ("size_action", ("auto", *LIMIT_ACTIONS))):
        if key in table:
            try:
                _one(table[key], choices)
            except ValueError as exc:
                bad(f"policy.{key}", str(exc))
    if "verdict_mode" in table and table["verdict_mode"] not in (0, 1, 2, 3):
        bad("policy.verdict_mode", "expected 0, 1, 2 or 3")
    for net in table.get("internal_networks", []) or []:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            bad("policy.internal_networks", f"not a network: {net!r}")
    rules = table.get("rules", [])
    if not isinstance(rules, list):
        bad("policy.rules", "expected [[policy.rules]] tables")
        return problems
    for i, t in enumerate(rules):
        p = f"policy.rules[{i}]"
        if not isinstance(t, dict):
            bad(p, "expected a table")
            continue
        for k in sorted(set(t) - RULE_KEYS):
            bad(f"{p}.{k}", f"unknown key (known: {', '.join(sorted(RULE_KEYS))})")
        if "action" not in t:
            bad(f"{p}.action", "missing: every rule needs an action")
            continue
        disp: Disposition | None = None
        try:
            disp, _ = _parse_actions(t["action"])
        except ValueError as exc:
            bad(f"{p}.action", str(exc))
        checks: list[tuple[str, Any]] = [
            ("status", lambda v: [ScanStatus(s) for s in _strs(v)]),
            ("virus", _strs), ("listener", _strs), ("sender", _strs), ("recipient", _strs),
            ("reason", _strs), ("limit", lambda v: [_one(x, LIMITS) for x in _strs(v)]),
            ("copy_to", _strs), ("size", _size_range),
            ("frontend", lambda v: [_one(x, FRONTENDS) for x in _strs(v)]),
            ("direction", lambda v: _one(v, ("inbound", "outbound"))),
            ("name", lambda v: _one_type(v, str)), ("notice", lambda v: _one_type(v, str)),
            ("subject_prefix", lambda v: _one_type(v, str)),
            ("shadow", lambda v: _one_type(v, bool)),
            ("headers", lambda v: _one_type(v, dict)),
        ]
        for key, check in checks:
            if key in t:
                try:
                    check(t[key])
                except ValueError as exc:
                    bad(f"{p}.{key}", str(exc))
        if "reply" in t:
            try:
                _check_reply(t["reply"], disp)
            except ValueError as exc:
                bad(f"{p}.reply", str(exc))
    return problems


def _one(v: Any, choices: Sequence[str]) -> str:
    if v not in choices:
        raise ValueError(f"expected one of {', '.join(choices)}, got {v!r}")
    return str(v)


def _one_type(v: Any, t: type) -> Any:
    if not isinstance(v, t):
        raise ValueError(f"expected a {t.__name__}")
    return v


__all__ = ["Context", "Decision", "Disposition", "Policy", "Rule", "validate"]
