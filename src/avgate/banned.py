"""Banned file types (amavis ``banned_filename_re``, rspamd/squidclamav extension rules).

``[banned]`` and its ``[[banned.rules]]`` name parts that must not pass whatever the engines
say: by file name, by declared MIME type, by the type their bytes show
(:mod:`avgate.content.typeid`). A banned part is a :class:`~avgate.result.Finding` named
``Banned.<rule>`` (engine ``banned``), so it shows wherever a virus name shows (replies,
headers, the scan log, ICAP ``X-Virus-ID``, the HTTP API); the policy gives it its own
action (``[policy] banned_action``, default reject). The engines still run: a banned part
that also carries a virus is reported with both names, and the virus decides.

Rules are tried in order for every part (the object itself, each MIME part, each archive
member, each uuencoded file; names of members that could not be opened, e.g. encrypted
ones, count too); the first that matches decides: ``allow = true`` exempts the part, else it
is banned. Within a rule every key given must match; a list matches if one item does::

    [banned]
    defaults = true                  # the built-in set below, after your rules
    frontends = ["smtp", "milter", "qmail", "icap", "http"]   # where it runs (default: all
                                     # but clamd and cli)

    [[banned.rules]]                 # exempt the vendor's installers (placed first)
    name = "vendor-installers"
    allow = true
    filename = "*.exe"
    sender = "*@vendor.example"

    [[banned.rules]]
    name = "office-macro"
    detected_type = "office-macro"

Content keys (at least one): ``filename`` (globs over the part's file name, its last path
segment: ``"*.exe"``), ``filename_regex`` (a Python regex searched in it), ``mime_type``
(globs over the declared Content-Type of a MIME part), ``detected_type`` (one or more of
:data:`avgate.content.typeid.TYPES`). Names are compared case-insensitively after NFKC
normalisation, with invisible format characters (right-to-left override, zero-width) and
Windows' trailing dots and blanks removed: ``"Invoice\\u202egpj.EXE. "`` (displayed
right-to-left as if it ended in ``.jpg``) is matched as ``invoicegpj.exe``. RFC 2231/2047
encoded names are decoded first. The script types (hta, wsf, js, vbs) are looked for only in
parts with a file name (a mail body quoting a script runs nowhere), never in the VBA source
the Office decomposer extracts (``source.vba``: that is ``office-macro``). Context keys, as in
``[[policy.rules]]``: ``frontend``, ``listener``, ``direction``,
``sender``, ``recipient`` (globs, case-insensitive); a rule with them applies only in that
context.

The built-in set (``defaults = true``) applies to the mail front-ends (smtp, milter,
qmail); on the web an executable is the normal download, so there only your own rules
apply. It is, in order: ``executable`` (detected pe, elf, macho, msi), ``shortcut`` (lnk),
``onenote``, ``script`` (detected hta, wsf, js, vbs), ``windows-script`` (names Windows runs
on a double click whose bytes prove nothing: ``*.js *.jse *.vbs *.vbe *.wsf *.wsh *.wsc
*.hta *.lnk *.scr *.pif *.cpl *.bat *.cmd``), ``double-extension`` (``invoice.pdf.exe``:
amavis' expression, an inner extension with a letter, so ``setup-1.2.exe`` passes),
``executable-mime`` (declared ``application/x-msdownload``, ``application/x-msdos-program``,
``application/x-dosexec``, ``application/hta``). Office macros are not banned by default (nor
by amavis): too many business documents carry them; ``detected_type = "office-macro"`` does.

Where it runs: the decomposition happens in a scan worker of this check's own pool (never on
the event loop), beside the engines, so it works with any engine set (clamd only too). What
a worker returns does not depend on the sender, so it is cached by the object's hash; the
context keys are applied afterwards, on the event loop, per part in O(rules). One shortcut
skips the worker: a simple mail (:mod:`avgate.content.simplemail`: at most 64 KiB of printable
ASCII, either plain text or one multipart of text and attachments, strict header fields,
simple parameters, nothing in it that a decomposer would open further) is matched on the
event loop as exactly the parts the decomposition would yield, read in a few bounded passes;
every other object goes to the workers. Parts the check
could not look at (a limit, an encrypted member's contents) make the result skipped/unknown
as the embedded engine's do: undecidable is never clean.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, BeforeValidator, model_validator

from .context import Context
from .limits import Limits
from .policy import FRONTENDS, MAIL_FRONTENDS, Direction, Frontends, Rule
from .result import (
    BANNED_ENGINE,
    Finding,
    LimitKind,
    ScanResult,
    ScanStatus,
    merge,
    worst,
    worst_limit,
)
from .settings import Section, StrTuple
from .workers import BudgetExceeded, WorkerError, WorkerPool, default_size

if TYPE_CHECKING:
    from .config import Config
    from .spool import Spool

__all__ = ["DEFAULT_RULES", "BannedCheck", "BannedRuleSettings", "BannedSettings",
           "Inspection", "Matcher", "compile_rules", "inspect_bytes", "inspect_simple_mail",
           "part_name"]

PREFIX = "Banned."
#: where the built-in set applies: the mail front-ends (policy's, in FRONTENDS' order)
MAIL = tuple(f for f in FRONTENDS if f in MAIL_FRONTENDS)
#: where the check runs by default: everywhere but clamd-protocol clients and ``avgate scan``
CHECKED = tuple(f for f in FRONTENDS if f not in ("clamd", "cli"))
_RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


# -- settings -----------------------------------------------------------------------------------
def _rule_name(name: str) -> str:
    if not _RULE_NAME.fullmatch(name):
        raise ValueError("expected 1-64 letters, digits, '_', '.', '+' or '-' (it becomes the "
                         f"finding name Banned.<name>, which clamd clients split on blanks): "
                         f"{name!r}")
    return name


def _regex(pattern: str) -> str:
    try:
        re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"not a regular expression ({exc}): {pattern!r}") from None
    return pattern


def _types(value: Any) -> Any:
    from .content.typeid import TYPES

    items = (value,) if isinstance(value, str) else tuple(value) if isinstance(
        value, list) else value
    bad = [x for x in items if x not in TYPES] if isinstance(items, tuple) else []
    if bad:
        raise ValueError(f"unknown detected_type {', '.join(map(repr, bad))} "
                         f"(known: {', '.join(TYPES)})")
    return items


def _nonempty(items: tuple[str, ...]) -> tuple[str, ...]:
    if not items:
        raise ValueError("expected at least one item")
    return items


Globs = Annotated[StrTuple, AfterValidator(_nonempty)]
DetectedTypes = Annotated[tuple[str, ...], BeforeValidator(_types), AfterValidator(_nonempty)]
_CONTENT_KEYS = ("filename", "filename_regex", "mime_type", "detected_type")
_CONTEXT_KEYS = ("frontend", "listener", "direction", "sender", "recipient")


class BannedRuleSettings(Section):
    """``[[banned.rules]]``: one rule (see the module docstring)."""

    name: Annotated[str, AfterValidator(_rule_name)]
    filename: Globs | None = None
    filename_regex: Annotated[str, AfterValidator(_regex)] | None = None
    mime_type: Globs | None = None
    detected_type: DetectedTypes | None = None
    allow: bool = False
    frontend: Frontends | None = None
    listener: StrTuple | None = None
    direction: Direction | None = None
    sender: StrTuple | None = None
    recipient: StrTuple | None = None

    @model_validator(mode="after")
    def _has_content_condition(self) -> BannedRuleSettings:
        if all(getattr(self, key) is None for key in _CONTENT_KEYS):
            raise ValueError("a banned rule needs at least one of "
                             f"{', '.join(_CONTENT_KEYS)} (else it matches every part)")
        return self


def _rule_tables(value: Any) -> Any:
    if not isinstance(value, list | tuple):
        raise ValueError("expected [[banned.rules]] tables")
    return tuple(value)


class BannedSettings(Section):
    """``[banned]``: ``enabled`` (default true), ``defaults`` (the built-in set, default
    true), ``frontends`` (where the check runs; default every front-end but ``clamd`` and
    ``cli``: clamd-protocol clients and ``avgate scan`` get ClamAV's verdicts, never bans),
    ``rules``.
    """

    enabled: bool = True
    defaults: bool = True
    frontends: Frontends = CHECKED  # type: ignore[assignment]
    rules: Annotated[tuple[BannedRuleSettings, ...], BeforeValidator(_rule_tables)] = ()


_WINDOWS_SCRIPT_NAMES = ("*.js", "*.jse", "*.vbs", "*.vbe", "*.wsf", "*.wsh", "*.wsc", "*.hta",
                         "*.lnk", "*.scr", "*.pif", "*.cpl", "*.bat", "*.cmd")
# amavis' default: an inner extension with at least one letter, then an executable one
_DOUBLE_EXTENSION = (r"\.[^./\\]*[a-z][^./\\]*\.\s*(?:exe|vbs|vbe|js|jse|wsf|wsh|hta|pif|scr"
                     r"|bat|cmd|com|cpl|dll|lnk|msi|jar|ps1)[.\s]*$")

#: the built-in set, tried after the configured rules (``[banned] defaults``)
DEFAULT_RULES: tuple[BannedRuleSettings, ...] = tuple(
    BannedRuleSettings.model_validate({**table, "frontend": list(MAIL)}) for table in (
        {"name": "executable", "detected_type": ["pe", "elf", "macho", "msi"]},
        {"name": "shortcut", "detected_type": ["lnk"]},
        {"name": "onenote", "detected_type": ["onenote"]},
        {"name": "script", "detected_type": ["hta", "wsf", "js", "vbs"]},
        {"name": "windows-script", "filename": list(_WINDOWS_SCRIPT_NAMES)},
        {"name": "double-extension", "filename_regex": _DOUBLE_EXTENSION},
        {"name": "executable-mime", "mime_type": [
            "application/x-msdownload", "application/x-msdos-program",
            "application/x-dosexec", "application/hta"]},
    ))


# -- matching (in the scan worker) -------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Matcher:
    """A rule's content conditions, compiled (picklable: it travels to the scan workers)."""

    name: str
    allow: bool
    conditional: bool  # has context conditions: decided per object, after the worker
    names: tuple[re.Pattern[str], ...] = ()  # all must match the normalised name
    mime: re.Pattern[str] | None = None
    types: frozenset[str] | None = None

    def matches(self, name: str, content_type: str, types: Callable[[], frozenset[str]]
                ) -> bool:
        if self.names and (not name or not all(p.search(name) for p in self.names)):
            return False
        if self.mime is not None and not (content_type and self.mime.match(content_type)):
            return False
        return self.types is None or bool(self.types & types())


def _globs(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(p.lower())})" for p in patterns))


def compile_rules(settings: BannedSettings) -> tuple[tuple[Matcher, ...], tuple[Rule, ...]]:
    """The matchers the workers run, and each rule's context conditions as a policy
    :class:`~avgate.policy.Rule` (only its context fields set), in the order they apply."""
    tables = settings.rules + (DEFAULT_RULES if settings.defaults else ())
    matchers: list[Matcher] = []
    contexts: list[Rule] = []
    for s in tables:
        names = []
        if s.filename is not None:
            names.append(_globs(s.filename))
        if s.filename_regex is not None:
            names.append(re.compile(s.filename_regex, re.IGNORECASE))
        conditional = any(getattr(s, key) is not None for key in _CONTEXT_KEYS)
        matchers.append(Matcher(
            s.name, s.allow, conditional, tuple(names),
            _globs(s.mime_type) if s.mime_type is not None else None,
            frozenset(s.detected_type) if s.detected_type is not None else None))
        contexts.append(Rule(
            name=s.name, frontend=s.frontend, listener=s.listener, direction=s.direction,
            sender=_lower(s.sender), recipient=_lower(s.recipient)))
    return tuple(matchers), tuple(contexts)


def _lower(patterns: tuple[str, ...] | None) -> tuple[str, ...] | None:
    return tuple(p.lower() for p in patterns) if patterns is not None else None


# A decoded alternative of a MIME part ("~cte2", "~b64") carries the part's name before it.
_ALTERNATIVE = re.compile(r"~(?:cte\d+|b64)$")
_UNNAMED = re.compile(r"\d+|preamble|epilogue")


def part_name(path: str) -> str:
    """The normalised file name of the part at ``path`` ("" when it has none).

    The last path segment (a MIME part's file name, an archive member's base name), NFKC,
    without format characters (bidi overrides, zero-width), trailing dots and blanks (which
    Windows drops), lower-cased. A MIME part without a file name ends in its number: no name.
    """
    segment = _ALTERNATIVE.sub("", path.rpartition("/")[2])
    if not segment or _UNNAMED.fullmatch(segment):
        return ""
    name = unicodedata.normalize("NFKC", segment)
    name = "".join(c for c in name if unicodedata.category(c) != "Cf")
    return name.rstrip(". \t").lower()


@dataclass(frozen=True, slots=True)
class Inspection:
    """What a worker found in one object, before the context is known.

    ``hits``: (part path, indices of the rules that matched, in order, up to the first
    without context conditions), only for parts where one of them bans; ``problem``: a
    skipped/unknown/error result when not every part could be looked at, else None.
    """

    hits: tuple[tuple[str, tuple[int, ...]], ...] = ()
    problem: ScanResult | None = None


class Inspector:
    """Matches the parts of one object as a decomposition yields them. The embedded engine
    feeds it from its own pass (:meth:`EmbeddedEngine.scan_bytes`), so an object is
    decomposed once for the engine and this check; :func:`inspect_bytes` feeds it alone."""

    def __init__(self, matchers: tuple[Matcher, ...]) -> None:
        from .content import Problem
        from .content.typeid import identify

        self.matchers = matchers
        self.hits: dict[str, tuple[int, ...]] = {}
        self.problems: list[Any] = []
        self._problem_type = Problem  # imported once per object, not once per part
        self._identify = identify

    def feed(self, item: Any) -> None:
        """One :class:`~avgate.content.Part` or :class:`~avgate.content.Problem`."""
        identify = self._identify
        name = part_name(item.path)
        if isinstance(item, self._problem_type):
            self.problems.append(item)
            content_type, body = "", None  # not opened: only its name is known
        else:
            content_type, body = item.content_type, item.data
        if item.path in self.hits:
            return
        found: list[frozenset[str]] = []

        def types() -> frozenset[str]:
            if not found:  # identified once per part, and only if a rule asks
                found.append(identify(body, scripts=_may_be_script(name))
                             if body is not None else frozenset())
            return found[0]

        chain: list[int] = []
        for index, matcher in enumerate(self.matchers):
            if matcher.matches(name, content_type, types):
                chain.append(index)
                if not matcher.conditional:
                    break
        if any(not self.matchers[i].allow for i in chain):
            self.hits[item.path] = tuple(chain)

    def result(self) -> Inspection:
        return Inspection(tuple(self.hits.items()), _problem_result(self.problems))


def inspect_bytes(data: bytes, matchers: tuple[Matcher, ...], limits: Limits,
                  deadline: float | None = None) -> Inspection:
    """Decompose ``data`` and match every part (synchronous, CPU-bound: a scan worker's job)."""
    from .content import decompose

    inspector = Inspector(matchers)
    for item in decompose(data, limits, name=""):
        if deadline is not None and time.monotonic() > deadline:
            return Inspection(tuple(inspector.hits.items()), _over_budget(limits))
        inspector.feed(item)
    return inspector.result()


# -- the shortcut on the event loop: a simple mail --------------------------------------------
def inspect_simple_mail(data: bytes, matchers: tuple[Matcher, ...], limits: Limits
                        ) -> Inspection | None:
    """:func:`inspect_bytes`'s answer for a simple mail (a plain-text message, or one
    multipart of text and attachments nothing further is decomposed in), found without the
    decomposition: its parts read by :func:`~avgate.content.simplemail.simple_mail_parts`
    in a few bounded passes; None for any other object."""
    from .content.simplemail import simple_mail_parts

    parts = simple_mail_parts(data, limits)
    if parts is None:
        return None
    inspector = Inspector(matchers)
    for part in parts:
        inspector.feed(part)
    return inspector.result()


def _may_be_script(name: str) -> bool:
    """Whether a part's bytes are worth the script heuristics: it has a file name (a mail
    body quoting a script runs nowhere), and is not the VBA source that the Office
    decomposer extracts from a document (``source.vba``: macros are ``office-macro``)."""
    return bool(name) and not name.endswith(".vba")


def _problem_result(problems: list[Any]) -> ScanResult | None:
    """The problems as the embedded engine words them (so merged reasons read once)."""
    if not problems:
        return None
    status = worst(p.status for p in problems)
    reason = "; ".join(dict.fromkeys(f"{p.path}: {p.reason}" if p.path else p.reason
                                     for p in problems if p.status is status))
    return ScanResult(status, reason=reason, limit=worst_limit(p.limit for p in problems))


def _over_budget(limits: Limits) -> ScanResult:
    return ScanResult(ScanStatus.SKIPPED, limit=LimitKind.STRUCTURAL,
                      reason=f"scan time budget exceeded ({limits.scan_timeout:g}s)")


_WORKER: tuple[tuple[Matcher, ...], Limits] | None = None


def _init_worker(matchers: tuple[Matcher, ...], limits: Limits) -> None:
    global _WORKER
    _WORKER = (matchers, limits)


def _inspect_task(source: bytes | str, budget: float) -> Inspection:
    """Runs in a scan worker: the object (bytes, or avgate's own spool file) → Inspection."""
    if _WORKER is None:
        raise RuntimeError("banned-type worker not initialised")
    matchers, limits = _WORKER
    if isinstance(source, str):
        with open(source, "rb") as f:
            data = f.read()
    else:
        data = source
    return inspect_bytes(data, matchers, limits, time.monotonic() + budget)


# -- the check, beside the engines (event loop side) -------------------------------------------
_NO_RESULT = ScanResult(ScanStatus.CLEAN)  # context rules look at the context only


class BannedCheck:
    """Runs the banned-type check for :class:`~avgate.scan.ScanService` (one per service)."""

    def __init__(self, settings: BannedSettings, limits: Limits, *, workers: int = 0,
                 worker_memory: int | None = None, cache_size: int = 0) -> None:
        self.settings = settings
        self.limits = limits
        self.matchers, self.contexts = compile_rules(settings)
        # where some rule can ban at all: with the built-in set alone, the mail front-ends
        # only; elsewhere (ICAP, HTTP) the check would decompose every object for nothing
        banning: set[str] = set()
        for matcher, context in zip(self.matchers, self.contexts, strict=True):
            if not matcher.allow:
                banning.update(settings.frontends if context.frontend is None
                               else context.frontend)
        self.frontends = frozenset(settings.frontends) & banning
        self._workers = workers or default_size()
        self._worker_memory = worker_memory
        self._pool: WorkerPool | None = None
        self._cache: OrderedDict[str, Inspection] = OrderedDict()
        self._cache_size = cache_size
        self.shortcuts = 0  # objects decided by inspect_simple_mail, without a worker
        #: an engine that matches these rules in its own pass (the embedded engine, see
        #: :meth:`share_with`): its inspection is used, the object is not decomposed twice
        self.partner: Callable[[str], Inspection | None] | None = None

    def share_with(self, engines: Sequence[Any]) -> None:
        """Let the first embedded engine with the same limits match the rules in its own
        decomposition (before the engines start). Objects it does not scan whole (a verdict
        from the cache, an engine before it that decided, a timeout) are still inspected
        here, in this check's own workers."""
        for engine in engines:
            share = getattr(engine, "share_banned", None)
            if share is not None and engine.ctx.limits == self.limits:
                share(self.matchers)
                self.partner = engine.take_inspection
                return

    @classmethod
    def from_config(cls, config: Config, workers: int = 0) -> BannedCheck | None:
        """The check of ``config`` (None when ``[banned] enabled = false`` or no rules)."""
        s = config.banned
        if not s.enabled or not (s.rules or s.defaults):
            return None
        return cls(s, config.limits, workers=workers, worker_memory=config.scan.worker_memory,
                   cache_size=config.scan.cache_size if config.scan.cache else 0)

    def applies(self, ctx: Context) -> bool:
        return ctx.frontend in self.frontends

    async def start(self) -> None:
        """Start the check's scan workers (else the first object waits for them); with a
        partner engine they start when first needed."""
        if self.partner is None:
            await self._workers_started()

    async def _workers_started(self) -> WorkerPool:
        if self._pool is None:
            pool = WorkerPool(self._workers, initializer=_init_worker,
                              initargs=(self.matchers, self.limits),
                              memory_limit=self._worker_memory, name="banned")
            await pool.start()
            self._pool = pool
        return self._pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def scan(self, engines: Callable[[Spool], Awaitable[ScanResult]], spool: Spool,
                   ctx: Context) -> ScanResult:
        """``engines(spool)`` and this check side by side, merged for ``ctx``."""
        start = time.perf_counter()
        spool.finish()
        if spool.size > self.limits.max_scan_size:
            return await engines(spool)  # skipped for its size: nothing is looked at
        if self.partner is not None:
            result = await engines(spool)
            shared = self.partner(spool.sha256)
            if shared is not None:
                self._remember(spool.sha256, shared)
            else:
                shared = await self.inspect(spool)
            return self.apply(result, shared, ctx, time.perf_counter() - start)
        shortcut = self._shortcut(spool)
        if shortcut is not None:  # decided here: no worker, no task
            result = await engines(spool)
            return self.apply(result, shortcut, ctx, time.perf_counter() - start)
        task = asyncio.ensure_future(self.inspect(spool, shortcut=False))
        try:
            result = await engines(spool)
        except BaseException:
            task.cancel()
            raise
        return self.apply(result, await task, ctx, time.perf_counter() - start)

    async def inspect(self, spool: Spool, *, shortcut: bool = True) -> Inspection:
        """The worker's inspection of ``spool`` (cached by its hash); never raises for the
        object's sake: a budget overrun is a structural skip, a failure an error.
        ``shortcut=False``: the caller tried :meth:`_shortcut` already."""
        cached = self._cache.get(spool.sha256)
        if cached is not None:
            self._cache.move_to_end(spool.sha256)
            return cached
        found_here = self._shortcut(spool) if shortcut else None
        if found_here is not None:
            return found_here
        budget = self.limits.scan_timeout
        source: bytes | str = spool.getvalue() if spool.in_memory else spool.path()
        try:
            pool = await self._workers_started()
            found: Inspection = await pool.run(_inspect_task, source, budget,
                                               budget=budget + 1.0, wait=budget)
        except BudgetExceeded as exc:
            return Inspection(problem=ScanResult(ScanStatus.SKIPPED, reason=str(exc),
                                                 limit=LimitKind.STRUCTURAL))
        except TimeoutError:
            return Inspection(problem=ScanResult.error(
                f"banned-type check: no scan worker free within {budget:g}s"))
        except WorkerError as exc:
            return Inspection(problem=ScanResult.error(f"banned-type check failed: {exc}"))
        self._remember(spool.sha256, found)
        return found

    def _shortcut(self, spool: Spool) -> Inspection | None:
        """The inspection of a simple mail, found on the event loop without decomposing
        (:func:`inspect_simple_mail`: bounded, at most
        :data:`~avgate.content.simplemail.MAX_SIZE` bytes); None for anything else, which
        goes to the workers."""
        from .content.simplemail import MAX_SIZE

        if not spool.in_memory or spool.size > MAX_SIZE:
            return None
        found = inspect_simple_mail(spool.getvalue(), self.matchers, self.limits)
        if found is not None:
            self.shortcuts += 1
        return found

    def _remember(self, sha256: str, inspection: Inspection) -> None:
        if self._cache_size:
            self._cache[sha256] = inspection
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def findings(self, inspection: Inspection, ctx: Context) -> tuple[Finding, ...]:
        """The ``Banned.<rule>`` findings of ``inspection`` in ``ctx``: per part, the first
        rule of its chain whose context conditions hold decides."""
        if not inspection.hits:
            return ()
        holds = [not m.conditional or self.contexts[i].matches(_NO_RESULT, ctx)
                 for i, m in enumerate(self.matchers)]
        found: list[Finding] = []
        for path, chain in inspection.hits:
            for index in chain:
                if holds[index]:
                    matcher = self.matchers[index]
                    if not matcher.allow:
                        found.append(Finding(PREFIX + matcher.name, BANNED_ENGINE, path))
                    break
        return tuple(found)

    def apply(self, result: ScanResult, inspection: Inspection, ctx: Context,
              elapsed: float | None = None) -> ScanResult:
        """The engines' ``result`` with this check's findings (or problems) merged in."""
        findings = self.findings(inspection, ctx)
        extra = (ScanResult(ScanStatus.INFECTED, findings=findings) if findings
                 else inspection.problem)
        if extra is None:
            return result
        merged = merge([result, extra], sha256=result.sha256, size=result.size)
        return merged.with_(cached=result.cached, elapsed=max(
            result.elapsed, elapsed if elapsed is not None else 0.0))

