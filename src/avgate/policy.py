"""Policy: ordered rules turn a ScanResult into a Decision. Engines detect, policy decides.

A front-end builds a :class:`~avgate.context.Context` (the session, with the transaction's
:class:`~avgate.context.Envelope`), calls :meth:`Policy.decide` and applies the returned
:class:`~avgate.decision.Decision` in its own protocol. ``[policy]`` is :class:`PolicySettings`,
each ``[[policy.rules]]`` a :class:`RuleSettings`: every check is in their types, so ``config
check`` names key and line, and :meth:`Policy.from_settings` only builds the matchers.

Rules (``[[policy.rules]]``) are tried in order; the first whose conditions all match fires.
No rule matching → the defaults::

    infected        → virus_action   (default reject "550 5.7.1 Virus found: {virus}")
    banned only     → banned_action  (default reject "554 5.7.1 Banned content: {virus}"):
                      every finding is a banned file type (``Banned.<rule>``, avgate.banned);
                      with a virus besides, virus_action decides
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
``reason`` (a glob over the reason text). ``banned = true`` matches a result whose findings
are all banned file types, ``banned = false`` any other.

Actions and how they combine: exactly one *disposition* — ``accept``, ``reject``,
``tempfail``, ``discard`` — plus any of the *modifiers* ``quarantine``, ``replace``, ``tag``,
``prefix_subject``, ``copy_to``, ``remove_recipients`` (milter only). A rule listing only
modifiers is an ``accept``, except a
rule whose only disposition-like action is ``quarantine``: that holds the message
(``discard`` + ``quarantine``: acknowledged, kept in the quarantine, not delivered).
``replace``/``prefix_subject``/``tag``/``copy_to``/``remove_recipients`` make no sense with
``reject``/``tempfail`` and are refused by the validator. ``replace`` is decided only where
there is something to replace (infected parts, or the parts of a skipped/unknown result
that were not scanned), ``remove_recipients`` only for the recipients that match — so the
decision's actions, which the scan log records, never claim what cannot be done.

Header styles (``header_style``): ``default`` (``X-Virus-Scanned`` + ``X-Virus-Status``),
``qhpsi`` (``X-QHPSI: clean | virus found``; skipped/unknown/error, which QHPSI has no word
for, are ``not scanned``/``unknown``/``error`` — never ``clean``), ``clamav-verdict`` (the
Sun/Oracle messaging-server ClamAV plugin: field ``verdict_prefix`` (default ``Virus-Test``),
``verdict_mode`` 0: fixed ``verdict_text`` when infected, nothing when clean; 1: result
(``True ; NAME``) when infected, nothing when clean; 2: always the result (``True ; NAME`` or
``False``); 3: fixed verdict when infected, else the result (``False``)), ``none``.
``headers = { Name = "template" }`` replaces the style's headers. Templates (headers, replies,
``subject_prefix``) may use ``{virus}``, ``{viruses}``, ``{status}``, ``{status_word}``,
``{reason}``, ``{version}``, ``{engine}``, ``{refid}`` (the message's RefID, see
``refid_header``); unknown names stay as written, and a template that
cannot render (a stray brace, ``{0}``) is refused when the config is loaded.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PlainSerializer,
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import __version__
from .context import Context, Envelope
from .decision import Decision, Disposition, new_refid
from .limits import parse_size
from .result import ScanResult, ScanStatus
from .settings import Section, StrTuple

# Replies for the cases no setting names (the configurable ones are PolicySettings' defaults)
# (every default reply names the message's RefID, so a user can quote it to the admin)
DEFAULT_FAILURE_REJECT_REPLY = (
    "554 5.7.0 Virus scanner unavailable, message refused (RefID {refid})")
DEFAULT_VIRUS_TEMPFAIL_REPLY = "451 4.7.1 Message held: virus found ({virus}) (RefID {refid})"
DEFAULT_STRUCTURAL_REPLY = "552 5.3.4 Message content not scannable: {reason} (RefID {refid})"
DEFAULT_SIZE_REPLY = "552 5.3.4 Message too large to scan: {reason} (RefID {refid})"
DEFAULT_BANNED_TEMPFAIL_REPLY = (
    "451 4.7.1 Message held: banned content ({virus}) (RefID {refid})")
#: the RefID header's default name (``[policy] refid_header``)
DEFAULT_REFID_HEADER = "X-Avgate-RefID"
#: the clamav-verdict style's field name: the default of ``verdict_prefix``, and always one
#: of the names avgate removes from incoming messages (see ``Policy.own_header_names``)
DEFAULT_VERDICT_PREFIX = "Virus-Test"

MAIL_FRONTENDS = frozenset({"smtp", "milter", "qmail"})
_REASON_MAX = 200  # characters of the reason in replies and headers
_REPLY_RE = re.compile(r"^([245])\d\d(?:[ -].*)?$", re.DOTALL)
_HEADER_NAME_RE = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")  # RFC 5322 field-name

Frontend = Literal["smtp", "milter", "icap", "http", "clamd", "qmail", "cli", "http_proxy",
                   "pop3_proxy", "imap_proxy", "ftp_proxy"]
Status = Literal["clean", "infected", "skipped", "unknown", "error"]
LimitName = Literal["structural", "size", "none"]
Direction = Literal["inbound", "outbound"]
DispositionName = Literal["accept", "reject", "tempfail", "discard"]
Modifier = Literal["quarantine", "replace", "tag", "prefix_subject", "copy_to",
                   "remove_recipients"]
#: statuses whose content ``replace`` can replace (infected parts, or the parts not scanned)
REPLACEABLE = frozenset({ScanStatus.INFECTED, ScanStatus.SKIPPED, ScanStatus.UNKNOWN})
#: front-ends that can remove a recipient (``remove_recipients``)
RECIPIENT_FRONTENDS = ("milter",)
Shortcut = Literal["reject", "keep", "tempfail", "discard", "quarantine"]
DISPOSITIONS: tuple[str, ...] = get_args(DispositionName)
MODIFIERS: tuple[str, ...] = get_args(Modifier)
FRONTENDS: tuple[str, ...] = get_args(Frontend)


@dataclass(frozen=True)
class Rule:
    """One ``[[policy.rules]]`` ready to match (built from a validated :class:`RuleSettings`)."""

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
    banned: bool | None = None  # every finding a banned file type (True) or not (False)
    disposition: Disposition = Disposition.ACCEPT
    modifiers: frozenset[str] = frozenset()
    reply: str = ""
    headers: tuple[tuple[str, str], ...] | None = None
    subject_prefix: str = ""
    copy_to: tuple[str, ...] = ()
    notice: str | None = None  # None: the policy's (notice or unscanned_notice)
    shadow: bool = False
    remove_recipients: tuple[str, ...] = ()  # globs, lower-case

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
        if self.banned is not None and result.banned_only != self.banned:
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


_UNSAFE = re.compile(r"[\r\n\0]+")


def _clean_value(s: str) -> str:
    """Header/reply-safe: no CR/LF/NUL (a virus name must never inject a header line)."""
    if "\r" in s or "\n" in s or "\0" in s:
        return _UNSAFE.sub(" ", s)
    return s  # (most values: no regex run)


_SCANNED_BY = f"avgate {__version__}"  # the X-Virus-Scanned value
_STATUS_WORD = {
    ScanStatus.CLEAN: "Clean",
    ScanStatus.SKIPPED: "Skipped",
    ScanStatus.UNKNOWN: "Unknown",
    ScanStatus.ERROR: "Error",
}


def _viruses(result: ScanResult) -> str:
    """``{viruses}``: the finding names, header-safe."""
    return _clean_value(", ".join(result.virus_names))


def _status_word(result: ScanResult) -> str:
    """``{status_word}``: "Infected (names)", or the status as a word."""
    if result.infected:
        return _clean_value(f"Infected ({', '.join(result.virus_names)})")
    return _STATUS_WORD[result.status]


# -- settings: [policy] and [[policy.rules]] ----------------------------------------------------
# Every check of a policy key lives here, in the types below, so ``config check`` reports it
# with the key and its line; building the Policy from validated settings checks nothing again.
def _tuple(value: Any) -> Any:
    """One string or a TOML array → a tuple (anything else is left for the type to refuse)."""
    if isinstance(value, str):
        return (value,)
    return tuple(value) if isinstance(value, list) else value


def _choices(what: str, choices: tuple[str, ...]) -> BeforeValidator:
    """One string or a list of strings, each one of ``choices``."""
    def check(value: Any) -> Any:
        items = _tuple(value)
        bad = [x for x in items if x not in choices] if isinstance(items, tuple) else []
        if bad:
            raise ValueError(f"unknown {what} {', '.join(map(repr, bad))} "
                             f"(expected {', '.join(choices)})")
        return items
    return BeforeValidator(check)


_NO_MAX = 1 << 62


def _size_range(value: Any) -> Any:
    """"min-max" ("0-10 MiB", "1M-"), [min, max], or {min=, max=}."""
    def size(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int | float | str):
            raise ValueError(f"not a size: {v!r}")
        return parse_size(v)

    if isinstance(value, str):
        lo, sep, hi = value.partition("-")
        if not sep:
            raise ValueError('expected "min-max", e.g. "0-10 MiB" or "1 MiB-"')
        bounds = (size(lo) if lo.strip() else 0, size(hi) if hi.strip() else _NO_MAX)
    elif isinstance(value, list | tuple) and len(value) == 2:
        bounds = (size(value[0]), size(value[1]))
    elif isinstance(value, dict) and set(value) <= {"min", "max"}:
        bounds = (size(value.get("min", 0)), size(value.get("max", _NO_MAX)))
    else:
        raise ValueError('expected "min-max", [min, max] or { min = .., max = .. }')
    if bounds[0] > bounds[1]:
        raise ValueError(f"min {bounds[0]} is larger than max {bounds[1]}")
    return bounds


def _disposition(actions: Iterable[str]) -> tuple[Disposition, frozenset[str]]:
    """The disposition and the modifiers of a (validated) action list."""
    dispositions = [a for a in actions if a in DISPOSITIONS]
    modifiers = frozenset(a for a in actions if a in MODIFIERS)
    if dispositions:
        return Disposition(dispositions[0]), modifiers
    if modifiers == {"quarantine"}:  # hold it: acknowledged, kept, not delivered
        return Disposition.DISCARD, modifiers
    return Disposition.ACCEPT, modifiers


def _actions(value: Any) -> Any:
    if value is None:
        raise ValueError("missing: every rule needs an action")
    actions = _tuple(value)
    if not isinstance(actions, tuple) or not all(isinstance(a, str) for a in actions):
        raise ValueError("expected an action or a list of actions")
    unknown = [a for a in actions if a not in DISPOSITIONS and a not in MODIFIERS]
    if unknown:
        raise ValueError(f"unknown action(s) {', '.join(unknown)} "
                         f"(known: {', '.join(DISPOSITIONS + MODIFIERS)})")
    several = [a for a in actions if a in DISPOSITIONS]
    if len(several) > 1:
        raise ValueError(f"more than one of accept/reject/tempfail/discard: {', '.join(several)}")
    disposition, modifiers = _disposition(actions)
    if disposition in (Disposition.REJECT, Disposition.TEMPFAIL):
        bad = modifiers & {"replace", "tag", "prefix_subject", "copy_to", "remove_recipients"}
        if bad:
            raise ValueError(f"{disposition.value} cannot be combined with "
                             f"{', '.join(sorted(bad))}")
    if disposition is Disposition.DISCARD and modifiers - {"quarantine", "copy_to"}:
        raise ValueError("discard combines only with quarantine and copy_to")
    return actions


def _template(value: str) -> str:
    """A reply, header or subject template must render: ``{name}`` fields (unknown names
    stay as written); a stray brace or a positional field would fail every decision."""
    try:
        value.format_map(_Vars())
    except (ValueError, IndexError, KeyError, AttributeError, TypeError) as exc:
        raise ValueError(f"not a valid template ({exc}): {value!r}") from None
    return value


def _smtp_reply(reply: str, disposition: Disposition | None) -> str:
    m = _REPLY_RE.match(reply)
    if not m or "\r" in reply or "\n" in reply:
        raise ValueError(f"not an SMTP reply (3-digit code, space, text): {reply!r}")
    if disposition is Disposition.REJECT and m.group(1) != "5":
        raise ValueError(f"a reject reply must be 5xx: {reply!r}")
    if disposition is Disposition.TEMPFAIL and m.group(1) != "4":
        raise ValueError(f"a tempfail reply must be 4xx: {reply!r}")
    return _template(reply)


def _header_name(name: str) -> str:
    if not _HEADER_NAME_RE.match(name):
        raise ValueError("empty: a header field needs a name (RFC 5322 \"Name: value\")"
                         if not name else f"not a header name: {name!r}")
    return name


def _headers(value: Any) -> Any:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError('expected a table of header name = "template"')
    return tuple((_header_name(name), _template(t)) for name, t in value.items())


def _networks(value: Any) -> Any:
    items = _tuple(value)
    for net in items if isinstance(items, tuple) else ():
        try:
            ipaddress.ip_network(net, strict=False)
        except (TypeError, ValueError):
            raise ValueError(f"not a network: {net!r}") from None
    return items


Template = Annotated[str, AfterValidator(_template)]
HeaderName = Annotated[str, AfterValidator(_header_name)]
#: header name = "template", kept in order; shown as a table
HeaderTemplates = Annotated[tuple[tuple[str, str], ...], BeforeValidator(_headers),
                            PlainSerializer(dict, return_type=dict[str, str])]
Statuses = Annotated[tuple[Status, ...], _choices("status", get_args(Status))]
Frontends = Annotated[tuple[Frontend, ...], _choices("frontend", FRONTENDS)]
LimitNames = Annotated[tuple[LimitName, ...], _choices("limit", get_args(LimitName))]
#: (min, max) bytes; shown as "min-max" ("min-" without a maximum)
SizeRange = Annotated[tuple[int, int], BeforeValidator(_size_range), PlainSerializer(
    lambda b: f"{b[0]}-{b[1] if b[1] < _NO_MAX else ''}", return_type=str)]
Actions = Annotated[tuple[DispositionName | Modifier, ...], BeforeValidator(_actions)]
Networks = Annotated[tuple[str, ...], BeforeValidator(_networks)]


class RuleSettings(Section):
    """``[[policy.rules]]``: one rule; the first whose conditions all match fires.

    Conditions (absent: any) — ``status``, ``virus`` (globs over finding names), ``frontend``,
    ``listener``, ``direction`` (inbound | outbound), ``sender`` / ``recipient`` (globs,
    case-insensitive), ``size`` ("min-max", [min, max] or {min, max}), ``limit`` (structural |
    size | none), ``reason`` (globs over the reason, case-insensitive), ``banned`` (true: every
    finding is a banned file type; false: not so); each list condition
    takes one value or a list.
    What it does — ``action`` (required: at most one of accept/reject/tempfail/discard, plus
    quarantine, replace, tag, prefix_subject, copy_to, remove_recipients), ``reply`` (reject:
    5xx, tempfail: 4xx;
    default: the policy's), ``headers`` (name = "template": what ``tag`` adds instead of the
    style's headers), ``subject_prefix`` and ``notice`` (default: the policy's), ``copy_to``,
    ``shadow`` (log what it would do, accept), ``name`` (default ``ruleN``).
    ``remove_recipients`` (globs, case-insensitive; with the action of the same name and
    ``frontend = "milter"``, the only front-end that can do it): the envelope recipients that
    match are removed (milter DELRCPT) and the message goes on to the others; a rule that
    would remove every recipient discards the message instead.
    """

    name: str | None = None
    status: Statuses | None = None
    virus: StrTuple | None = None
    frontend: Frontends | None = None
    listener: StrTuple | None = None
    direction: Direction | None = None
    sender: StrTuple | None = None
    recipient: StrTuple | None = None
    size: SizeRange | None = None
    limit: LimitNames | None = None
    reason: StrTuple | None = None
    banned: bool | None = None
    action: Actions = Field(default=None, validate_default=True)  # required, with its message
    reply: str | None = None  # checked against the action below
    headers: HeaderTemplates | None = None
    subject_prefix: Template | None = None
    notice: str | None = None
    copy_to: StrTuple = ()
    shadow: bool = False
    remove_recipients: StrTuple | None = None

    @model_validator(mode="after")
    def _remove_recipients_complete(self) -> RuleSettings:
        acting = "remove_recipients" in (self.action or ())
        if acting and not self.remove_recipients:
            raise ValueError('action remove_recipients needs remove_recipients = ["glob", ...] '
                             "(the recipients to remove)")
        if self.remove_recipients is not None and not acting:
            raise ValueError("remove_recipients is set but the action does not list "
                             "remove_recipients")
        if acting and self.frontend != RECIPIENT_FRONTENDS:
            raise ValueError('remove_recipients needs frontend = "milter" (only the milter '
                             "can remove a recipient)")
        return self

    @field_validator("reply")
    @classmethod
    def _reply_fits_action(cls, reply: str | None, info: ValidationInfo) -> str | None:
        actions = info.data.get("action")  # absent when the action itself was refused
        if reply is None:
            return None
        return _smtp_reply(reply, _disposition(actions)[0] if actions is not None else None)


def _rule_tables(value: Any) -> Any:
    if not isinstance(value, list | tuple):
        raise ValueError("expected [[policy.rules]] tables")
    return tuple(value)


class PolicySettings(Section):
    """``[policy]``: what happens when no rule fires, the verdict headers, and the rules.

    ``virus_action`` (reject | keep | tempfail | discard | quarantine), ``failure_action``
    (reject | keep | tempfail | discard), ``structural_action`` (as virus_action),
    ``size_action`` (auto | as virus_action), ``banned_action`` (reject | tempfail | discard |
    quarantine: only banned file types found, see avgate.banned; no ``keep``, since a kept
    banned result would also pass what the engines refused) and ``banned_reply`` (5xx);
    ``reject_reply`` (infected, 5xx) and
    ``tempfail_reply`` (scanner failure, 4xx); ``header_style`` (default | qhpsi |
    clamav-verdict | none), ``headers`` (name = "template", replaces the style),
    ``verdict_mode`` (0-3), ``verdict_prefix``, ``verdict_text`` (clamav-verdict);
    ``shadow`` (decide and log, but accept); ``notice`` (what ``replace`` puts in place of an
    infected part; ``{virus}``, ``{filename}``, ``{refid}``), ``unscanned_notice`` (in place of
    a part that was not scanned, when ``replace`` fires on a skipped/unknown result;
    ``{reason}``, ``{filename}``, ``{refid}``), ``subject_prefix``, ``copy_to`` (defaults of
    the rules' modifiers); ``refid_header`` (the header carrying each message's RefID,
    default ``X-Avgate-RefID``; "" = none: the RefID is still logged and in the replies);
    ``internal_networks`` (listener direction "auto": clients in these
    networks are outbound); ``rules`` (``[[policy.rules]]``, see :class:`RuleSettings`).
    """

    virus_action: Shortcut = "reject"
    failure_action: Literal["reject", "keep", "tempfail", "discard"] = "tempfail"
    structural_action: Shortcut = "reject"
    banned_action: Literal["reject", "tempfail", "discard", "quarantine"] = "reject"
    banned_reply: Annotated[str, AfterValidator(
        lambda r: _smtp_reply(r, Disposition.REJECT))] = (
        "554 5.7.1 Banned content: {virus} (RefID {refid})")
    size_action: Literal["auto", "reject", "keep", "tempfail", "discard", "quarantine"] = "auto"
    reject_reply: Annotated[str, AfterValidator(
        lambda r: _smtp_reply(r, Disposition.REJECT))] = (
        "550 5.7.1 Virus found: {virus} (RefID {refid})")
    tempfail_reply: Annotated[str, AfterValidator(
        lambda r: _smtp_reply(r, Disposition.TEMPFAIL))] = (
        "451 4.7.1 Virus scanner unavailable, try again later (RefID {refid})")
    header_style: Literal["default", "qhpsi", "clamav-verdict", "none"] = "default"
    headers: HeaderTemplates | None = None
    verdict_mode: Literal[0, 1, 2, 3] = 2
    verdict_prefix: HeaderName = DEFAULT_VERDICT_PREFIX
    verdict_text: str = "virus"
    shadow: bool = False
    notice: str = ("This part of the message contained a virus ({virus}) and was removed "
                   "by avgate.\nThe original file name was: {filename}\n")
    unscanned_notice: str = ("This part of the message could not be scanned ({reason}) and "
                             "was removed by avgate.\nThe original file name was: {filename}\n"
                             "Reference: {refid}\n")
    refid_header: Annotated[str, AfterValidator(
        lambda n: _header_name(n) if n else n)] = DEFAULT_REFID_HEADER
    subject_prefix: Template = "***VIRUS*** "
    copy_to: StrTuple = ()
    internal_networks: Networks = ()
    rules: Annotated[tuple[RuleSettings, ...], BeforeValidator(_rule_tables)] = ()


def _lower(patterns: tuple[str, ...] | None) -> tuple[str, ...] | None:
    return tuple(p.lower() for p in patterns) if patterns is not None else None


def _rule(s: RuleSettings, i: int, policy: PolicySettings) -> Rule:
    """The matcher of a validated rule (patterns lower-cased, the policy's defaults filled)."""
    disposition, modifiers = _disposition(s.action)
    return Rule(
        name=s.name or f"rule{i + 1}",
        statuses=frozenset(ScanStatus(x) for x in s.status) if s.status is not None else None,
        virus=s.virus, frontend=s.frontend, listener=s.listener, direction=s.direction,
        sender=_lower(s.sender), recipient=_lower(s.recipient), size=s.size,
        limit=frozenset(s.limit) if s.limit is not None else None, reason=_lower(s.reason),
        banned=s.banned,
        disposition=disposition, modifiers=modifiers, reply=s.reply or "", headers=s.headers,
        subject_prefix=policy.subject_prefix if s.subject_prefix is None else s.subject_prefix,
        copy_to=s.copy_to, notice=s.notice, shadow=s.shadow,
        remove_recipients=_lower(s.remove_recipients) or ())


class Policy:
    """Ordered rules plus defaults, built from validated :class:`PolicySettings`."""

    def __init__(self, settings: PolicySettings | None = None) -> None:
        self.settings = s = settings if settings is not None else PolicySettings()
        self.rules = tuple(_rule(r, i, s) for i, r in enumerate(s.rules))
        self.header_templates = s.headers or None
        self.internal_networks = tuple(ipaddress.ip_network(n, strict=False)
                                       for n in s.internal_networks)

    @classmethod
    def from_settings(cls, settings: PolicySettings) -> Policy:
        """The policy of a validated ``[policy]`` section (``config.policy``)."""
        return cls(settings)

    # -- deciding -------------------------------------------------------------------------
    def decide(self, result: ScanResult, ctx: Context, refid: str | None = None) -> Decision:
        """The decision for ``result`` seen through ``ctx`` (first matching rule wins).

        ``refid``: the message's RefID (the Gateway makes one per object; a new one when
        None). It is in ``{refid}`` of every template, in ``Decision.refid`` and, when the
        message is delivered and ``refid_header`` is set, among the headers to add."""
        refid = new_refid() if refid is None else refid
        decision: Decision | None = None
        shadow = self.settings.shadow
        for rule in self.rules:
            if rule.matches(result, ctx):
                decision = self._apply_rule(rule, result, ctx, refid)
                shadow = shadow or rule.shadow
                break
        if decision is None:
            decision = self._default(result, ctx, refid)
        if ctx.after_queue and decision.disposition is Disposition.REJECT:  # never bounce
            decision = Decision(Disposition.DISCARD, quarantine=True,  # (frontends/smtp.py)
                                rule=f"{decision.rule}+after_queue")
        decision = self._with_refid(decision, refid)
        if shadow:
            return self._with_refid(Decision(
                Disposition.ACCEPT, headers=self.headers_for(result, refid=refid),
                rule=decision.rule, shadow=True, would=decision), refid)
        return decision

    def _with_refid(self, d: Decision, refid: str) -> Decision:
        name = self.settings.refid_header
        headers = d.headers
        if name and refid and d.disposition is Disposition.ACCEPT:
            headers = (*headers, (name, refid))  # after the verdict headers
        return d.with_refid(refid, name, headers)

    def direction_for(self, listener_direction: str, client_addr: str = "",
                      authenticated: bool = False) -> str:
        """inbound/outbound from the listener; "auto" decides by SMTP AUTH or client network."""
        if listener_direction in ("inbound", "outbound"):
            return listener_direction
        if authenticated:
            return "outbound"
        if not self.internal_networks:  # nothing is internal: no address to parse
            return "inbound"
        try:
            addr = ipaddress.ip_address(client_addr.strip("[]"))
        except ValueError:
            return "inbound"
        if any(addr in net for net in self.internal_networks):
            return "outbound"
        return "inbound"

    def _vars(self, result: ScanResult, ctx: Context | None = None,
              refid: str = "") -> _Vars:
        names = result.virus_names
        return _Vars(
            virus=_clean_value(names[0] if names else ""),
            viruses=_viruses(result),
            status=result.status.value,
            status_word=_status_word(result),
            reason=_clean_value(_shorten(result.reason)),
            version=__version__,
            engine=_clean_value(", ".join(e.name for e in result.engines)),
            sender=_clean_value(ctx.sender) if ctx else "",
            frontend=ctx.frontend if ctx else "",
            refid=_clean_value(refid),
        )

    def variables(self, result: ScanResult, ctx: Context | None = None,
                  refid: str = "") -> dict[str, str]:
        """The template variables for ``result`` (a copy the caller may extend); unknown
        ``{names}`` stay as written when used with ``format_map``."""
        return self._vars(result, ctx, refid)

    def render(self, template: str, result: ScanResult, ctx: Context | None = None,
               refid: str = "") -> str:
        return _clean_value(template.format_map(self._vars(result, ctx, refid)))

    def headers_for(self, result: ScanResult, refid: str = "") -> tuple[tuple[str, str], ...]:
        """Verdict headers in the configured style."""
        if self.header_templates is not None:
            return tuple((n, self.render(t, result, refid=refid))
                         for n, t in self.header_templates)
        return self._style_headers(result, self.settings.header_style)

    def own_header_names(self) -> frozenset[str]:
        """Lower-cased names of every header avgate may write, whatever the result.

        Front-ends remove incoming copies of these before adding their own, so a sender's
        forged ``X-Virus-Status: Clean`` never reaches the recipient beside (or instead of)
        the real verdict. Every style's names are included, not only the configured one:
        a verdict in any style must come from this gateway. Computed once per Policy (a
        Policy is built per config), not per message.
        """
        cached: frozenset[str] | None = getattr(self, "_own_header_names", None)
        if cached is not None:
            return cached
        names = {"x-virus-scanned", "x-virus-status", "x-qhpsi",
                 self.settings.verdict_prefix.lower(), DEFAULT_VERDICT_PREFIX.lower(),
                 self.settings.refid_header.lower(), DEFAULT_REFID_HEADER.lower()}
        if self.header_templates is not None:
            names.update(n.lower() for n, _ in self.header_templates)
        for rule in self.rules:
            if rule.headers is not None:
                names.update(n.lower() for n, _ in rule.headers)
        names.discard("")
        self._own_header_names = frozenset(names)
        return self._own_header_names

    def _style_headers(self, result: ScanResult, style: str) -> tuple[tuple[str, str], ...]:
        # only the variables a style uses (not all of _vars: this runs for every message)
        if style == "none":
            return ()
        if style == "qhpsi":
            word = {ScanStatus.CLEAN: "clean", ScanStatus.INFECTED: "virus found",
                    ScanStatus.SKIPPED: "not scanned", ScanStatus.UNKNOWN: "unknown",
                    ScanStatus.ERROR: "error"}[result.status]
            return (("X-QHPSI", word),)
        if style == "clamav-verdict":
            infected = result.infected
            res = f"True ; {_viruses(result)}" if infected else "False"
            mode, text = self.settings.verdict_mode, self.settings.verdict_text
            if mode == 0:
                value = text if infected else None
            elif mode == 1:
                value = res if infected else None
            elif mode == 2:
                value = res
            else:
                value = text if infected else res
            return ((self.settings.verdict_prefix, value),) if value is not None else ()
        return (("X-Virus-Scanned", _SCANNED_BY), ("X-Virus-Status", _status_word(result)))

    def _apply_rule(self, rule: Rule, result: ScanResult, ctx: Context,
                    refid: str = "") -> Decision:
        mods = rule.modifiers
        reply = ""
        if rule.disposition is Disposition.REJECT:
            reply = self.render(rule.reply or (
                self.settings.banned_reply if result.banned_only
                else self.settings.reject_reply if result.infected
                else DEFAULT_FAILURE_REJECT_REPLY), result, ctx, refid)
        elif rule.disposition is Disposition.TEMPFAIL:
            reply = self.render(rule.reply or (
                DEFAULT_BANNED_TEMPFAIL_REPLY if result.banned_only
                else DEFAULT_VIRUS_TEMPFAIL_REPLY if result.infected
                else self.settings.tempfail_reply), result, ctx, refid)
        headers: tuple[tuple[str, str], ...] = ()
        if "tag" in mods:
            headers = (tuple((n, self.render(t, result, ctx, refid)) for n, t in rule.headers)
                       if rule.headers is not None else self.headers_for(result, refid))
        # replace only what there is to replace: infected parts, or parts not scanned
        replace = "replace" in mods and result.status in REPLACEABLE
        notice = rule.notice
        if notice is None:
            notice = self.settings.notice if result.infected else self.settings.unscanned_notice
        removed: tuple[str, ...] = ()
        disposition = rule.disposition
        if "remove_recipients" in mods:
            removed = tuple(r for r in ctx.recipients
                            if _glob(r.lower(), rule.remove_recipients))
            copy_to = rule.copy_to or self.settings.copy_to
            if removed and len(removed) == len(ctx.recipients) and not (
                    "copy_to" in mods and copy_to):
                # nobody left to deliver to: that is a discard (quarantine still applies)
                return Decision(Disposition.DISCARD, quarantine="quarantine" in mods,
                                rule=rule.name)
        return Decision(
            disposition=disposition,
            reply=reply,
            headers=headers,
            quarantine="quarantine" in mods,
            replace=replace,
            notice=notice if replace else "",
            subject_prefix=self.render(rule.subject_prefix, result, ctx, refid)
            if "prefix_subject" in mods else "",
            copy_to=(rule.copy_to or self.settings.copy_to) if "copy_to" in mods else (),
            rule=rule.name,
            remove_recipients=removed,
        )

    def _default(self, result: ScanResult, ctx: Context, refid: str = "") -> Decision:
        """No rule fired: the shortcut actions of the settings."""
        s, status = self.settings, result.status
        if status is ScanStatus.CLEAN and result.limit is None:  # the common case first
            return Decision(Disposition.ACCEPT, headers=self.headers_for(result, refid),
                            rule="default:clean")
        if result.banned_only:  # banned file types and no virus
            return self._shortcut(s.banned_action, "default:banned", result, ctx,
                                  s.banned_reply, DEFAULT_BANNED_TEMPFAIL_REPLY, refid)
        if status is ScanStatus.INFECTED:
            return self._shortcut(s.virus_action, "default:infected", result, ctx,
                                  s.reject_reply, DEFAULT_VIRUS_TEMPFAIL_REPLY, refid)
        if status is ScanStatus.ERROR:
            return self._shortcut(s.failure_action, "default:error", result, ctx,
                                  DEFAULT_FAILURE_REJECT_REPLY, s.tempfail_reply, refid)
        if result.limit is not None:  # skipped/unknown because a limit was hit
            kind = result.limit.value
            structural = kind == "structural"  # never passes by default
            action: str = s.structural_action if structural else s.size_action
            if action == "auto":  # size: refused in mail, passed with a tag elsewhere
                action = "reject" if ctx.frontend in MAIL_FRONTENDS else "keep"
            reply = DEFAULT_STRUCTURAL_REPLY if structural else DEFAULT_SIZE_REPLY
            return self._shortcut(action, f"default:{kind}-limit", result, ctx, reply,
                                  s.tempfail_reply, refid)
        return Decision(Disposition.ACCEPT, headers=self.headers_for(result, refid),
                        rule=f"default:{status.value}")

    def _shortcut(self, action: str, rule: str, result: ScanResult, ctx: Context,
                  reject_reply: str, tempfail_reply: str, refid: str = "") -> Decision:
        """reject | tempfail | discard | quarantine | keep (the verdict headers: built only
        here, not for the other actions) as a Decision."""
        if action == "reject":
            return Decision(Disposition.REJECT, self.render(reject_reply, result, ctx, refid),
                            rule=rule)
        if action == "tempfail":
            return Decision(Disposition.TEMPFAIL,
                            self.render(tempfail_reply, result, ctx, refid), rule=rule)
        if action == "discard":
            return Decision(Disposition.DISCARD, rule=rule)
        if action == "quarantine":
            return Decision(Disposition.DISCARD, quarantine=True, rule=rule)
        return Decision(Disposition.ACCEPT, headers=self.headers_for(result, refid),
                        rule=rule)  # keep


__all__ = ["Context", "Decision", "Disposition", "Envelope", "Policy", "PolicySettings", "Rule",
           "RuleSettings"]
