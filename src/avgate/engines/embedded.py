"""The embedded engine: YARA-X rules, ClamAV hash/body signatures and built-in EICAR, in-process.

Config (``[[engines]] type = "embedded"``, the default engine; see
:class:`EmbeddedEngineSettings`)::

    rules = ["rules/", "extra.yar"]        # YARA files, or directories of *.yar / *.yara
    signatures = ["/var/lib/avgate/sigs"]  # ClamAV .hdb/.hsb/.ndb files or directories
    builtin = true                         # built-in EICAR detection, "Eicar-Test-Signature"
    clamav_db = "/var/lib/clamav"          # ClamAV's database (main.cvd, daily.cld, ...);
                                           # default: this path when it holds a database
    pua = false                            # ClamAV's PUA signatures (*.hdu, *.ndu, ...)
    reload_interval = 600                  # seconds between checks for changed files; 0: off

Relative paths are resolved against ``EngineContext.base_dir``. Everything is loaded and
compiled in :meth:`EmbeddedEngine.load` (called by ``start``; ClamAV's database through
:mod:`.clamavdb`, strictly verified). ``signatures`` files are strict (a bad line fails the
load); entries of ClamAV's database we cannot use are counted (:meth:`EmbeddedEngine.stats`).

Reload: every ``reload_interval`` seconds the engine compares (path, mtime, size) of every file
it loaded (like clamd's SelfCheck); on a change it loads everything anew in a thread, starts a
new worker pool with the new state and only then swaps it in (scans already running finish on
the old workers). A load that fails (an update half written, a signature that does not
verify) is refused and logged (``signature_reload`` event, ``ok: false``): the old database
keeps serving, and the same files are not tried again until they change.

The engine decomposes content itself (:func:`avgate.content.decompose`) and matches every
part: file hashes, one YARA-X scan over the compiled rule set (body and logical signatures,
YARA rules), PE section hashes over the sections YARA-X's ``pe`` module found, and last the
allow list (``.fp``/``.sfp``: a part whose hash is listed has no findings).

Finding names: a ClamAV signature reports its name as written in its file (no
``.UNOFFICIAL`` suffix); a YARA rule reports its ``meta: name = "..."`` when it has one (so
rules can carry dotted ClamAV-style names, which are not identifiers), else its identifier.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import io
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yara_x
from pydantic import BeforeValidator, Field

from .. import __version__, observability
from ..errors import EngineError, EngineTimeout, SignatureError
from ..result import Finding, LimitKind, ScanResult, ScanStatus, worst, worst_limit
from ..spool import Spool
from ..workers import BudgetExceeded, WorkerError, WorkerPool, default_size
from .base import BaseEngine, EngineContext, EngineSettings
from .clamavdb import CONTAINER_SUFFIXES, Database, database_files, load_database
from .signatures import NDB_NAMESPACE, HashSignatures, SignatureSet, signature_files

if TYPE_CHECKING:
    from ..banned import Inspection, Matcher

#: banned-type inspections made in this engine's pass, kept until the check takes them
_INSPECTIONS_KEPT = 1024

EICAR_NAME = "Eicar-Test-Signature"
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
# The EICAR file may be followed by whitespace up to 128 bytes in all (the EICAR definition);
# Ctrl-Z is allowed too, as DOS editors append it.
_EICAR_MAX = 128
_EICAR_TRAILER = b" \t\r\n\x1a"

YARA_SUFFIXES = frozenset({".yar", ".yara"})
DEFAULT_CLAMAV_DB = "/var/lib/clamav"
_PE_NAMESPACE = "pe_sections"

try:
    _YARA_X_VERSION = importlib.metadata.version("yara-x")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - odd installs only
    _YARA_X_VERSION = "?"


def is_eicar(data: bytes) -> bool:
    """True for the EICAR test file: the 68-byte string at offset 0, then only whitespace."""
    return (data.startswith(EICAR) and len(data) <= _EICAR_MAX
            and not data[len(EICAR):].strip(_EICAR_TRAILER))


def _paths(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]  # a single path is a common shorthand
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"expected a list of paths, got {value!r}")
    return tuple(value)


Paths = Annotated[tuple[str, ...], BeforeValidator(_paths)]
#: like Paths; "" (or []) says "none" where the default would find something
OptionalPaths = Annotated[tuple[str, ...], BeforeValidator(
    lambda v: () if v in ("", []) else _paths(v))]


class EmbeddedEngineSettings(EngineSettings):
    """``[[engines]] type = "embedded"``.

    rules: YARA files, or directories of *.yar / *.yara (one path or a list)
    signatures: ClamAV .hdb/.hsb/.ndb files or directories (one path or a list)
    builtin: built-in EICAR detection ("Eicar-Test-Signature")
    clamav_db: ClamAV's database directory (freshclam's main.cvd, daily.cld, ...) or
      container files; default /var/lib/clamav when it holds a database; "" for none
    pua: load ClamAV's PUA signatures (*.hdu, *.ndu, ...; clamd's DetectPUA)
    reload_interval: seconds between checks for changed database and rule files (like
      clamd's SelfCheck); 0: never
    Relative paths are relative to the config file's directory.
    """

    type: Literal["embedded"] = "embedded"
    name: str = "embedded"
    rules: Paths = ()
    signatures: Paths = ()
    builtin: bool = True
    clamav_db: OptionalPaths | None = None
    pua: bool = False
    reload_interval: Annotated[float, Field(ge=0)] = 600.0


def default_clamav_db() -> tuple[str, ...]:
    """``/var/lib/clamav`` when it holds a ClamAV database, else nothing."""
    root = Path(DEFAULT_CLAMAV_DB)
    try:
        if any(p.suffix.lower() in CONTAINER_SUFFIXES for p in root.iterdir()):
            return (str(root),)
    except OSError:
        pass
    return ()


@dataclass(slots=True)
class _State:
    """Everything one load produced; swapped in as a whole (reload) and shipped to workers."""

    db: Database
    rules: yara_x.Rules | None
    rule_names: list[str]
    db_version: str
    files: tuple[tuple[str, int, int], ...]


class EmbeddedEngine(BaseEngine):
    """In-process scanning with YARA-X and ClamAV hash/body signatures."""

    type_name = "embedded"
    Settings = EmbeddedEngineSettings
    # the scan timeout is the scan worker's budget, enforced by killing the worker
    own_timeout = True

    def __init__(self, settings: EmbeddedEngineSettings, ctx: EngineContext) -> None:
        super().__init__(settings.name, ctx)
        base = Path(ctx.base_dir)
        self.rule_paths = [base / p for p in settings.rules]
        self.signature_paths = [base / p for p in settings.signatures]
        clamav_db = default_clamav_db() if settings.clamav_db is None else settings.clamav_db
        self.clamav_paths = [base / p for p in clamav_db if p]
        self.pua = settings.pua
        self.reload_interval = settings.reload_interval
        self.builtin = settings.builtin
        self._db = Database()
        self._rules: yara_x.Rules | None = None
        self._rule_names: list[str] = []
        self._db_version = ""
        self._files: tuple[tuple[str, int, int], ...] = ()
        self._loaded = False
        self._pool: WorkerPool | None = None
        self._watch: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        #: (files snapshot, error) of the last refused reload: logged once, retried on change
        self.last_reload_error: tuple[tuple[tuple[str, int, int], ...], str] | None = None
        self.reloads = 0
        #: the banned-type rules matched in this engine's own pass (``share_banned``)
        self._banned: tuple[Matcher, ...] | None = None
        self._inspections: OrderedDict[str, Inspection] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: EmbeddedEngineSettings, ctx: EngineContext
                      ) -> EmbeddedEngine:
        return cls(settings, ctx)

    # -- loading --------------------------------------------------------------------------
    async def start(self) -> None:
        """Load and compile every rule and signature (in a thread: it is CPU-bound), then
        start the scan workers, each handed the compiled set once, and the reload watch."""
        if not self._loaded:
            await asyncio.to_thread(self.load)
        if self._pool is None:
            self._pool = await self._start_pool()
        if self._watch is None and self.reload_interval > 0:
            self._watch = asyncio.create_task(self._watch_files(), name=f"{self.name}-reload")

    async def _start_pool(self) -> WorkerPool:
        pool = WorkerPool(self.ctx.workers or default_size(), initializer=_init_worker,
                          initargs=(self._worker_state(),),
                          memory_limit=self.ctx.worker_memory, name=self.name)
        await pool.start()
        return pool

    async def close(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
        if self._closing:  # pools replaced by a reload, still finishing their tasks
            await asyncio.gather(*self._closing, return_exceptions=True)

    def share_banned(self, matchers: tuple[Matcher, ...]) -> None:
        """Match the banned-type rules in this engine's pass too (before :meth:`start`):
        an object is decomposed once for both; :meth:`take_inspection` hands the result to
        :class:`avgate.banned.BannedCheck`."""
        self._banned = matchers

    def take_inspection(self, sha256: str) -> Inspection | None:
        """The banned-type inspection of the object ``sha256`` this engine scanned last
        (once: it is forgotten when taken); None when it did not scan it whole."""
        return self._inspections.pop(sha256, None)

    def _worker_state(self) -> tuple[Any, ...]:
        """What a scan worker needs to match like this engine (picklable, compiled once)."""
        rules = b""
        if self._rules is not None:
            buf = io.BytesIO()
            self._rules.serialize_into(buf)
            rules = buf.getvalue()
        db = self._db
        return (self.name, self.ctx, self.builtin, db.hashes, db.sections, db.allow,
                self._rule_names, rules, self._db_version, self._banned)

    @classmethod
    def _from_worker_state(cls, state: tuple[Any, ...]) -> EmbeddedEngine:
        (name, ctx, builtin, hashes, sections, allow, rule_names, rules, db_version,
         banned) = state
        engine = cls(EmbeddedEngineSettings(name=name, builtin=builtin, clamav_db=()), ctx)
        engine._db.hashes, engine._db.sections, engine._db.allow = hashes, sections, allow
        engine._rule_names = rule_names
        engine._rules = yara_x.Rules.deserialize_from(io.BytesIO(rules)) if rules else None
        engine._db_version = db_version
        engine._banned = banned
        engine._loaded = True
        return engine

    def load(self) -> None:
        """Load and compile synchronously; raises ``SignatureError`` naming file and line."""
        self._apply(self._load_state())

    def _apply(self, state: _State) -> None:
        self._db, self._rules, self._rule_names = state.db, state.rules, state.rule_names
        self._db_version, self._files = state.db_version, state.files
        self._loaded = True

    def _snapshot(self) -> tuple[tuple[str, int, int], ...]:
        """(path, mtime_ns, size) of every file a load reads: what the reload watch polls."""
        paths: list[Path] = []
        for root in self.clamav_paths:
            if root.exists():
                paths.extend(database_files(root))
        for root in self.signature_paths:
            if root.exists():
                paths.extend(signature_files(root))
        for root in self.rule_paths:
            if root.exists():
                paths.extend(_rule_files(root))
        out = []
        for path in paths:
            try:
                st = path.stat()
            except OSError:
                continue
            out.append((str(path), st.st_mtime_ns, st.st_size))
        return tuple(out)

    def _load_state(self) -> _State:
        """Read, verify and compile everything into a new state (touches nothing of self)."""
        files = self._snapshot()
        version = hashlib.sha256(b"builtin=%d pua=%d\n" % (self.builtin, self.pua))
        db = load_database(self.clamav_paths, pua=self.pua) if self.clamav_paths else Database()
        for line in db.fingerprint:
            version.update(line.encode() + b"\n")
        strict_bodies = len(db.bodies)
        sigs = SignatureSet(hashes=db.hashes)
        for root in self.signature_paths:
            if not root.exists():
                raise SignatureError(f"{root}: no such signature file or directory")
            for path in signature_files(root):
                raw = sigs.load_file(path)
                version.update(b"sig %s %d\n" % (str(path).encode(), len(raw)))
                version.update(raw)
        db.bodies.extend(sigs.bodies)
        db.freeze()
        rule_files: list[tuple[Path, str]] = []
        for root in self.rule_paths:
            if not root.exists():
                raise SignatureError(f"{root}: no such rule file or directory")
            for path in _rule_files(root):
                try:
                    source = path.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    raise SignatureError(f"{path}: cannot read: {exc}") from exc
                version.update(b"yara %s\n" % str(path).encode())
                version.update(source.encode())
                rule_files.append((path, source))
        rules, names = _build_rules(db, strict_bodies, rule_files)
        return _State(db, rules, names, version.hexdigest()[:16], files)

    # -- reload ---------------------------------------------------------------------------
    async def _watch_files(self) -> None:
        """Poll the files every ``reload_interval`` s; reload when they changed."""
        while True:
            await asyncio.sleep(self.reload_interval)
            snapshot = await asyncio.to_thread(self._snapshot)
            if snapshot != self._files and (self.last_reload_error is None
                                            or self.last_reload_error[0] != snapshot):
                await self.reload()

    async def reload(self) -> bool:
        """Load the current files off the event loop and swap them in atomically: the old
        signatures (and workers) serve until the new ones are loaded and their workers
        started; a load that fails is refused and logged, the old state keeps serving."""
        async with self._reload_lock:
            snapshot = await asyncio.to_thread(self._snapshot)
            try:
                state = await asyncio.to_thread(self._load_state)
            except Exception as exc:  # any failure: refuse the update, keep serving
                detail = str(exc) if isinstance(exc, SignatureError | OSError) else (
                    f"{type(exc).__name__}: {exc}")
                self.last_reload_error = (snapshot, detail)
                _log({"event": "signature_reload", "engine": self.name, "ok": False,
                      "error": detail, "db_version": self._db_version})
                return False
            old = (self._db, self._rules, self._rule_names, self._db_version, self._files)
            self._apply(state)
            if self._pool is not None:
                try:
                    pool = await self._start_pool()
                except Exception as exc:  # keep serving with the old set
                    self._db, self._rules, self._rule_names, self._db_version, self._files = old
                    self.last_reload_error = (snapshot, f"workers did not start: {exc}")
                    _log({"event": "signature_reload", "engine": self.name, "ok": False,
                          "error": self.last_reload_error[1]})
                    return False
                old_pool, self._pool = self._pool, pool
                # tasks already running on the old workers finish there
                closing = asyncio.create_task(old_pool.close())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
            self.last_reload_error = None
            self.reloads += 1
            _log({"event": "signature_reload", "engine": self.name, "ok": True,
                  "db_version": self._db_version, "versions": self._db.versions(),
                  "loaded": self._db.stats.total_loaded(),
                  "unsupported": self._db.stats.total_unsupported()})
            return True

    def db_version(self) -> str:
        """First 16 hex digits of a sha256 over every loaded file and the builtin flag."""
        return self._db_version

    def version(self) -> str:
        versions = self._db.versions()
        return (f"avgate-embedded {__version__} yara-x {_YARA_X_VERSION}/{self._db_version}"
                + (f" clamav {versions}" if versions else ""))

    def stats(self) -> list[str]:
        """Loaded/unsupported/skipped counts per database file (``version --engines``)."""
        lines = [f"hash signatures {len(self._db.hashes)}, section hashes "
                 f"{len(self._db.sections)}, allow-list hashes {len(self._db.allow)}, "
                 f"body {len(self._db.bodies)}, logical {len(self._db.logical)}, "
                 f"ignored names {len(self._db.ignored)}"]
        return lines + self._db.stats.lines()

    def describe_workers(self) -> str:
        pool = self._pool
        if pool is None:
            return "scan workers not started"
        cap = f", {pool.memory_limit >> 20} MiB each" if pool.memory_limit else ""
        return f"{pool.size} scan worker(s){cap}, budget {self.timeouts.scan:g}s per object"

    async def health(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type_name, "ok": self._loaded,
                "db_version": self._db_version, "hash_signatures": len(self._db.hashes),
                "section_hashes": len(self._db.sections),
                "body_signatures": len(self._db.bodies),
                "logical_signatures": len(self._db.logical), "builtin": self.builtin,
                "clamav": self._db.versions(), "reloads": self.reloads,
                "workers": vars_of(self._pool.stats()) if self._pool is not None else None}

    # -- scanning -------------------------------------------------------------------------
    async def _scan(self, spool: Spool, deadline: float) -> ScanResult:
        limits = self.ctx.limits
        if spool.size > limits.max_scan_size:
            return ScanResult(ScanStatus.SKIPPED, limit=LimitKind.SIZE, reason=(
                f"size limit: {spool.size} bytes > max_scan_size {limits.max_scan_size}"))
        if not self._loaded:
            raise EngineError("engine not started (signatures not loaded)")
        if self._pool is None:
            await self.start()  # loaded by hand (tests, tools): the workers start now
        assert self._pool is not None
        budget = self.timeouts.scan
        # Memory spools travel as bytes; a spool on disk is avgate's own private file (a
        # snapshot taken while hashing), which the worker reads by path: what was hashed is
        # what is scanned, without pushing megabytes through the socket.
        source: bytes | str = spool.getvalue() if spool.in_memory else spool.path()
        try:
            result, inspection = await self._pool.run(_scan_task, source, budget,
                                                      budget=budget + 1.0, wait=budget)
        except BudgetExceeded as exc:
            return ScanResult(ScanStatus.SKIPPED, reason=str(exc), limit=LimitKind.STRUCTURAL)
        except TimeoutError:
            raise EngineError(f"no scan worker free within {budget:g}s") from None
        except WorkerError as exc:
            raise EngineError(str(exc)) from None
        if inspection is not None:
            self._inspections[spool.sha256] = inspection
            while len(self._inspections) > _INSPECTIONS_KEPT:
                self._inspections.popitem(last=False)
        assert isinstance(result, ScanResult)
        return result

    def _new_scanner(self) -> list[yara_x.Scanner]:
        """A fresh YARA-X scanner in a one-item list (empty without rules).

        yara_x.Scanner is "unsendable": it must be freed by the thread that made it, so a
        scanner lives for one object, in one thread, and callers empty the list in a
        ``finally`` (a traceback keeping a frame alive would otherwise free it elsewhere).
        Making one costs about as much as ``Rules.scan`` does internally.
        """
        if self._rules is None:
            return []
        scanner = yara_x.Scanner(self._rules)
        # The asyncio timeout cannot stop a worker thread; this stops YARA-X itself.
        scanner.set_timeout(max(1, math.ceil(self.timeouts.scan)))
        return [scanner]

    def match_part(self, data: bytes) -> list[str]:
        """Names of every signature and rule matching one part (no decomposition)."""
        slot = self._new_scanner()
        try:
            return self._match(data, slot)
        finally:
            slot.clear()

    def _match(self, data: bytes, slot: list[yara_x.Scanner]) -> list[str]:
        names = []
        if self.builtin and is_eicar(data):
            names.append(EICAR_NAME)
        db = self._db
        names.extend(db.hashes.lookup(data))
        for scanner in slot:
            try:
                results = scanner.scan(data)
            except yara_x.TimeoutError:
                raise EngineTimeout("YARA-X scan timeout") from None
            except yara_x.ScanError as exc:
                raise EngineError(f"YARA-X scan failed: {exc}") from exc
            for rule in results.matching_rules:
                if rule.namespace == NDB_NAMESPACE:
                    names.append(self._rule_names[int(rule.identifier[1:])])
                elif rule.namespace == _PE_NAMESPACE:
                    continue
                else:
                    meta = dict(rule.metadata)
                    label = meta.get("name")
                    names.append(label if isinstance(label, str) and label else rule.identifier)
            if len(db.sections) and data[:2] == b"MZ":
                names.extend(_section_matches(data, results.module_outputs.get("pe"),
                                              db.sections))
        if names and len(db.allow) and db.allow.lookup(data):
            return []  # allow-listed (.fp/.sfp): this part has no findings
        # one finding per name and part: the builtin EICAR and an .hdb entry of the same name
        # (the usual test set) would otherwise report it twice
        return list(dict.fromkeys(names)) if len(names) > 1 else names

    def scan_bytes(self, data: bytes, *, deadline: float | None = None,
                   inspector: Any = None) -> ScanResult:
        """Decompose ``data`` and match every part (synchronous; CPU-bound).

        Every finding in every part is collected; decomposition enforces the limits
        (max_files, max_recursion, ...) and reports what it did not scan as Problems.
        ``inspector`` (an :class:`avgate.banned.Inspector`) sees every part and problem too.
        """
        # Imported here: content decomposition is a sibling package that imports heavier
        # parsers; loading the engine (e.g. ``avgate config check``) should not need them.
        from ..content import Part, Problem, decompose

        limits = self.ctx.limits
        findings: list[Finding] = []
        problems: list[tuple[str, ScanStatus, str]] = []
        limit_kinds: list[LimitKind | None] = []
        slot = self._new_scanner()
        try:
            for item in decompose(data, limits, name=""):
                if deadline is not None and time.monotonic() > deadline:
                    raise EngineTimeout(f"scan timeout after {self.timeouts.scan:g}s")
                if inspector is not None:
                    inspector.feed(item)
                if isinstance(item, Problem):
                    problems.append((item.path, item.status, item.reason))
                    limit_kinds.append(item.limit)
                    continue
                assert isinstance(item, Part)
                findings.extend(Finding(name, self.name, item.path)
                                for name in self._match(item.data, slot))
        except EngineError:
            raise
        except Exception as exc:
            # A parser bug must not pass for clean (nor crash the front-end): report an error.
            raise EngineError(f"decomposition failed: {type(exc).__name__}: {exc}") from exc
        finally:
            slot.clear()
        details = tuple((path, f"{status.value}: {reason}") for path, status, reason in problems)
        if findings:
            return ScanResult(ScanStatus.INFECTED, findings=tuple(findings), details=details)
        if problems:
            status = worst(s for _, s, _ in problems)
            reason = "; ".join(dict.fromkeys(
                f"{path}: {why}" if path else why for path, s, why in problems if s is status))
            return ScanResult(status, reason=reason, details=details,
                              limit=worst_limit(limit_kinds))
        return ScanResult(ScanStatus.CLEAN, details=details)


def vars_of(stats: Any) -> dict[str, int]:
    return {name: getattr(stats, name) for name in stats.__slots__}


# -- in the scan worker -------------------------------------------------------------------
_WORKER_ENGINE: EmbeddedEngine | None = None


def _init_worker(state: tuple[Any, ...]) -> None:
    """Scan worker initializer: rebuild the engine from the parent's compiled set."""
    global _WORKER_ENGINE
    _WORKER_ENGINE = EmbeddedEngine._from_worker_state(state)


def _scan_task(source: bytes | str, budget: float) -> tuple[ScanResult, Inspection | None]:
    """Decompose and match one object (runs in a scan worker); with banned-type rules
    shared (``share_banned``), their inspection of the same pass too (None when the pass
    did not finish: the check then looks for itself)."""
    engine = _WORKER_ENGINE
    if engine is None:
        raise EngineError("scan worker not initialised")
    if isinstance(source, str):
        with open(source, "rb") as f:
            data = f.read()
    else:
        data = source
    inspector = None
    if engine._banned is not None:
        from ..banned import Inspector

        inspector = Inspector(engine._banned)
    try:
        result = engine.scan_bytes(data, deadline=time.monotonic() + budget,
                                   inspector=inspector)
    except EngineTimeout:
        return ScanResult(ScanStatus.SKIPPED, limit=LimitKind.STRUCTURAL,
                          reason=f"scan time budget exceeded ({budget:g}s)"), None
    except EngineError as exc:
        return ScanResult.error(f"{engine.name}: {exc}"), None
    return result, inspector.result() if inspector is not None else None


def _section_matches(data: bytes, pe: Any, sections: HashSignatures) -> list[str]:
    """Names of the PE section hash signatures (``.mdb``) matching a section of ``data``.

    Sections as YARA-X's pe module found them, with ClamAV's bounds (libclamav/pe.c
    cli_peheader): offset rounded down and size up to FileAlignment (0x200 when a section's
    offset is 0x200- but not FileAlignment-aligned), clipped to the end of the file; a
    section starting beyond it has none."""
    names: list[str] = []
    if not isinstance(pe, dict):
        return names
    table = [(int(s.get("raw_data_offset", 0)), int(s.get("raw_data_size", 0)))
             for s in pe.get("sections") or () if isinstance(s, dict)]
    falign = int(pe.get("file_alignment") or 0)
    if falign != 0x200 and any(falign and size and offset % falign and not offset % 0x200
                               for offset, size in table):
        falign = 0x200
    view, fsize = memoryview(data), len(data)
    for offset, size in table:
        raw = offset // falign * falign if falign else offset
        rsz = -(-size // falign) * falign if falign else size
        if not rsz or raw >= fsize or offset >= fsize:
            continue
        rsz = min(rsz, fsize - raw)
        names.extend(sections.lookup(view[raw:raw + rsz]))
    return names


def _rule_files(root: Path) -> list[Path]:
    if root.is_dir():
        return sorted(p for p in root.rglob("*")
                      if p.is_file() and p.suffix.lower() in YARA_SUFFIXES)
    return [root]


def _compilable(sources: list[str], header: str) -> set[int]:
    """Indices of the rules that compile: all at once; on failure, halves, recursively
    (so a few bad rules in 100,000 cost a few dozen compilations, not 100,000)."""
    def check(indices: list[int]) -> set[int]:
        compiler = yara_x.Compiler()
        try:
            compiler.add_source(header + "\n".join(sources[i] for i in indices))
            return set(indices)
        except yara_x.CompileError:
            if len(indices) == 1:
                return set()
        finally:
            del compiler
        middle = len(indices) // 2
        return check(indices[:middle]) | check(indices[middle:])

    return check(list(range(len(sources)))) if sources else set()


def _build_rules(db: Database, strict_from: int, rule_files: list[tuple[Path, str]]
                 ) -> tuple[yara_x.Rules | None, list[str]]:
    """Compile the translated body and logical signatures and the YARA rule files.

    Body signatures from index ``strict_from`` on come from ``signatures`` files: one
    YARA-X refuses fails the load, naming it. One from ClamAV's database is counted as
    unsupported ("yara-x") and left out, like every other entry we cannot use.
    """
    names = [b.name for b in db.bodies] + [lg.name for lg in db.logical]
    sources = ([b.yara_rule(f"r{i}") for i, b in enumerate(db.bodies)]
               + [lg.yara_rule(f"r{len(db.bodies) + j}") for j, lg in enumerate(db.logical)])
    if not sources and not rule_files and not len(db.sections):
        return None, names
    header = 'import "pe"\nimport "elf"\n'
    # One source for all signatures: compiling 2,000 rules in one call is ~10x faster than
    # one add_source per rule. Only when it fails do we look for the culprits.
    compiler = yara_x.Compiler()
    try:
        good = set(range(len(sources)))
        if sources:
            compiler.new_namespace(NDB_NAMESPACE)
            try:
                compiler.add_source(header + "\n".join(sources), origin="ClamAV signatures")
            except yara_x.CompileError:
                good = _compilable(sources, header)
                _count_rejected(db, strict_from, sources, header, good)
                # the failed source may have left rules behind: start over without the culprits
                compiler = yara_x.Compiler()
                compiler.new_namespace(NDB_NAMESPACE)
                if good:
                    compiler.add_source(header + "\n".join(sources[i] for i in sorted(good)),
                                        origin="ClamAV signatures")
        if len(db.sections):
            # Section hashes need the pe module's output for every PE part.
            compiler.new_namespace(_PE_NAMESPACE)
            compiler.add_source('import "pe"\nrule pe_sections { condition: pe.is_pe and false }')
        for index, (path, source) in enumerate(rule_files):
            # One namespace per file: rule names need only be unique within their file.
            compiler.new_namespace(f"rules{index}")
            try:
                compiler.add_source(source, origin=str(path))
            except yara_x.CompileError as exc:
                raise SignatureError(f"{path}: {exc}") from None
        return compiler.build(), names
    finally:
        # yara_x.Compiler must be freed in this thread (see _new_scanner), not by whoever
        # ends up holding a traceback that references this frame.
        del compiler


def _count_rejected(db: Database, strict_from: int, sources: list[str], header: str,
                    good: set[int]) -> None:
    """Raise for a rejected ``signatures`` rule; count rejected database entries."""
    for index in sorted(set(range(len(sources))) - good):
        if index >= len(db.bodies):
            where = db.logical[index - len(db.bodies)].where
        else:
            where = db.bodies[index].where()
            if index >= strict_from:
                try:
                    yara_x.compile(header + sources[index])
                    detail = "only together with the others"
                except yara_x.CompileError as exc:
                    detail = str(exc).splitlines()[0]
                raise SignatureError(f"{where}: YARA-X rejects the translation: {detail}")
        label = where.split(":")[0]
        db.stats.unsupported[(label, "yara-x")] += 1
        db.stats.loaded[label] -= 1


def _log(event: dict[str, Any]) -> None:
    log = observability.current_log()
    if log is not None:
        log.log(event, "info" if event.get("ok") else "error")
    else:
        logging.getLogger("avgate.engines.embedded").log(
            logging.INFO if event.get("ok") else logging.ERROR, "%s", event)
