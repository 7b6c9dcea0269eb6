"""The embedded engine: YARA-X rules, ClamAV hash/body signatures and built-in EICAR, in-process.

Config (``[[engines]] type = "embedded"``, the default engine; see
:class:`EmbeddedEngineSettings`)::

    rules = ["rules/", "extra.yar"]        # YARA files, or directories of *.yar / *.yara
    signatures = ["/var/lib/avgate/sigs"]  # ClamAV .hdb/.hsb/.ndb files or directories
    builtin = true                         # built-in EICAR detection, "Eicar-Test-Signature"

Relative paths are resolved against ``EngineContext.base_dir``. Everything is loaded and
compiled once, in :meth:`EmbeddedEngine.load` (called by ``start``); reloading means building
a new engine. The engine decomposes content itself (:func:`avgate.content.decompose`) and
matches every part: hash signatures, then one YARA-X scan over the compiled rule set.

Finding names: a ClamAV signature reports its name as written in its file (no
``.UNOFFICIAL`` suffix); a YARA rule reports its ``meta: name = "..."`` when it has one (so
rules can carry dotted ClamAV-style names, which are not identifiers), else its identifier.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import io
import math
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import yara_x
from pydantic import BeforeValidator

from .. import __version__
from ..errors import EngineError, EngineTimeout, SignatureError
from ..result import Finding, LimitKind, ScanResult, ScanStatus, worst, worst_limit
from ..spool import Spool
from ..workers import BudgetExceeded, WorkerError, WorkerPool, default_size
from .base import BaseEngine, EngineContext, EngineSettings
from .signatures import NDB_NAMESPACE, SignatureSet, signature_files

EICAR_NAME = "Eicar-Test-Signature"
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
# The EICAR file may be followed by whitespace up to 128 bytes in all (the EICAR definition);
# Ctrl-Z is allowed too, as DOS editors append it.
_EICAR_MAX = 128
_EICAR_TRAILER = b" \t\r\n\x1a"

YARA_SUFFIXES = frozenset({".yar", ".yara"})

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


class EmbeddedEngineSettings(EngineSettings):
    """``[[engines]] type = "embedded"``.

    rules: YARA files, or directories of *.yar / *.yara (one path or a list)
    signatures: ClamAV .hdb/.hsb/.ndb files or directories (one path or a list)
    builtin: built-in EICAR detection ("Eicar-Test-Signature")
    Relative paths are relative to the config file's directory.
    """

    type: Literal["embedded"] = "embedded"
    name: str = "embedded"
    rules: Paths = ()
    signatures: Paths = ()
    builtin: bool = True


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
        self.builtin = settings.builtin
        self._sigs = SignatureSet()
        self._rules: yara_x.Rules | None = None
        self._body_names: list[str] = []
        self._db_version = ""
        self._loaded = False
        self._pool: WorkerPool | None = None

    @classmethod
    def from_settings(cls, settings: EmbeddedEngineSettings, ctx: EngineContext
                      ) -> EmbeddedEngine:
        return cls(settings, ctx)

    # -- loading --------------------------------------------------------------------------
    async def start(self) -> None:
        """Load and compile every rule and signature (in a thread: it is CPU-bound), then
        start the scan workers, each handed the compiled set once."""
        if not self._loaded:
            await asyncio.to_thread(self.load)
        if self._pool is None:
            pool = WorkerPool(self.ctx.workers or default_size(), initializer=_init_worker,
                              initargs=(self._worker_state(),),
                              memory_limit=self.ctx.worker_memory, name=self.name)
            await pool.start()
            self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def _worker_state(self) -> tuple[Any, ...]:
        """What a scan worker needs to match like this engine (picklable, compiled once)."""
        rules = b""
        if self._rules is not None:
            buf = io.BytesIO()
            self._rules.serialize_into(buf)
            rules = buf.getvalue()
        return (self.name, self.ctx, self.builtin, self._sigs.hashes, self._body_names,
                rules, self._db_version)

    @classmethod
    def _from_worker_state(cls, state: tuple[Any, ...]) -> EmbeddedEngine:
        name, ctx, builtin, hashes, body_names, rules, db_version = state
        engine = cls(EmbeddedEngineSettings(name=name, builtin=builtin), ctx)
        engine._sigs = SignatureSet(hashes=hashes)
        engine._body_names = body_names
        engine._rules = yara_x.Rules.deserialize_from(io.BytesIO(rules)) if rules else None
        engine._db_version = db_version
        engine._loaded = True
        return engine

    def load(self) -> None:
        """Load and compile synchronously; raises ``SignatureError`` naming file and line."""
        version = hashlib.sha256(b"builtin=%d\n" % self.builtin)
        sigs = SignatureSet()
        for root in self.signature_paths:
            if not root.exists():
                raise SignatureError(f"{root}: no such signature file or directory")
            for path in signature_files(root):
                raw = sigs.load_file(path)
                version.update(b"sig %s %d\n" % (str(path).encode(), len(raw)))
                version.update(raw)
        rule_files: list[tuple[Path, str]] = []
        for root in self.rule_paths:
            if not root.exists():
                raise SignatureError(f"{root}: no such rule file or directory")
            files = (sorted(p for p in root.rglob("*")
                            if p.is_file() and p.suffix.lower() in YARA_SUFFIXES)
                     if root.is_dir() else [root])
            for path in files:
                try:
                    source = path.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    raise SignatureError(f"{path}: cannot read: {exc}") from exc
                version.update(b"yara %s\n" % str(path).encode())
                version.update(source.encode())
                rule_files.append((path, source))
        self._rules = _build_rules(sigs, rule_files)
        self._sigs = sigs
        self._body_names = [b.name for b in sigs.bodies]
        self._db_version = version.hexdigest()[:16]
        self._loaded = True

    def db_version(self) -> str:
        """First 16 hex digits of a sha256 over every loaded file and the builtin flag."""
        return self._db_version

    def version(self) -> str:
        return f"avgate-embedded {__version__} yara-x {_YARA_X_VERSION}/{self._db_version}"

    def describe_workers(self) -> str:
        pool = self._pool
        if pool is None:
            return "scan workers not started"
        cap = f", {pool.memory_limit >> 20} MiB each" if pool.memory_limit else ""
        return f"{pool.size} scan worker(s){cap}, budget {self.timeouts.scan:g}s per object"

    async def health(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type_name, "ok": self._loaded,
                "db_version": self._db_version, "hash_signatures": len(self._sigs.hashes),
                "body_signatures": len(self._sigs.bodies), "builtin": self.builtin,
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
            result: ScanResult = await self._pool.run(_scan_task, source, budget,
                                                      budget=budget + 1.0, wait=budget)
        except BudgetExceeded as exc:
            return ScanResult(ScanStatus.SKIPPED, reason=str(exc), limit=LimitKind.STRUCTURAL)
        except TimeoutError:
            raise EngineError(f"no scan worker free within {budget:g}s") from None
        except WorkerError as exc:
            raise EngineError(str(exc)) from None
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
        names.extend(self._sigs.hashes.lookup(data))
        for scanner in slot:
            try:
                results = scanner.scan(data)
            except yara_x.TimeoutError:
                raise EngineTimeout("YARA-X scan timeout") from None
            except yara_x.ScanError as exc:
                raise EngineError(f"YARA-X scan failed: {exc}") from exc
            for rule in results.matching_rules:
                if rule.namespace == NDB_NAMESPACE:
                    names.append(self._body_names[int(rule.identifier[1:])])
                else:
                    meta = dict(rule.metadata)
                    label = meta.get("name")
                    names.append(label if isinstance(label, str) and label else rule.identifier)
        return names

    def scan_bytes(self, data: bytes, *, deadline: float | None = None) -> ScanResult:
        """Decompose ``data`` and match every part (synchronous; CPU-bound).

        Every finding in every part is collected; decomposition enforces the limits
        (max_files, max_recursion, ...) and reports what it did not scan as Problems.
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


def _scan_task(source: bytes | str, budget: float) -> ScanResult:
    """Decompose and match one object (runs in a scan worker)."""
    engine = _WORKER_ENGINE
    if engine is None:
        raise EngineError("scan worker not initialised")
    if isinstance(source, str):
        with open(source, "rb") as f:
            data = f.read()
    else:
        data = source
    try:
        return engine.scan_bytes(data, deadline=time.monotonic() + budget)
    except EngineTimeout:
        return ScanResult(ScanStatus.SKIPPED, limit=LimitKind.STRUCTURAL,
                          reason=f"scan time budget exceeded ({budget:g}s)")
    except EngineError as exc:
        return ScanResult.error(f"{engine.name}: {exc}")


def _build_rules(sigs: SignatureSet, rule_files: list[tuple[Path, str]]) -> yara_x.Rules | None:
    """Compile the translated body signatures and the YARA rule files into one rule set."""
    if not sigs.bodies and not rule_files:
        return None
    # One source for all body signatures: compiling 2,000 rules in one call is ~10x faster
    # than one add_source per rule. Only when it fails do we look for the culprit.
    ndb_source = "\n".join(b.yara_rule(f"r{i}") for i, b in enumerate(sigs.bodies))
    compiler = yara_x.Compiler()
    try:
        if sigs.bodies:
            compiler.new_namespace(NDB_NAMESPACE)
            try:
                compiler.add_source(ndb_source, origin="ClamAV body signatures")
            except yara_x.CompileError as exc:
                _raise_first_bad_body(sigs)
                # Every rule compiles alone but not together (should not happen): say so.
                raise SignatureError(f"ClamAV body signatures: {exc}") from None
        for index, (path, source) in enumerate(rule_files):
            # One namespace per file: rule names need only be unique within their file.
            compiler.new_namespace(f"rules{index}")
            try:
                compiler.add_source(source, origin=str(path))
            except yara_x.CompileError as exc:
                raise SignatureError(f"{path}: {exc}") from None
        return compiler.build()
    finally:
        # yara_x.Compiler must be freed in this thread (see _new_scanner), not by whoever
        # ends up holding a traceback that references this frame.
        del compiler


def _raise_first_bad_body(sigs: SignatureSet) -> None:
    """Raise SignatureError naming the first body signature YARA-X does not accept."""
    for body in sigs.bodies:
        try:
            yara_x.compile(body.yara_rule("r0"))
        except yara_x.CompileError as exc:
            raise SignatureError(f"{body.where()}: YARA-X rejects the translation: "
                                 f"{str(exc).splitlines()[0]}") from None
