"""Content decomposition: an object → itself, its MIME parts, archive members, decoded payloads.

:func:`decompose` yields the object itself first, then every nested part depth-first, each as
a :class:`Part` the engines scan, or a :class:`Problem` saying what could not be scanned (a
limit, encryption, a corrupt container). Containers are yielded as well as their members,
because hash signatures may match a zip file as a whole.

Nothing is written to disk, and every size is bounded by :class:`~avgate.limits.Limits`
before memory is spent on it. ``decompose`` never raises for hostile input.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

from ..limits import Limits, MiB
from ..result import LimitKind, ScanStatus
from .filetype import Kind, detect

__all__ = ["Budget", "Part", "Problem", "decompose", "join_path", "sanitize_name"]


@dataclass(frozen=True, slots=True)
class Part:
    """Bytes to scan: the object itself (depth 0) or something found inside it."""

    path: str  # e.g. "message/2/archive.zip/evil.exe"
    data: bytes
    depth: int
    content_type: str = ""  # a MIME part's declared type ("application/pdf"); "" elsewhere


@dataclass(frozen=True, slots=True)
class Problem:
    """Something not scanned (``skipped``: a limit) or undecidable (``unknown``)."""

    path: str
    status: ScanStatus  # SKIPPED or UNKNOWN
    reason: str
    limit: LimitKind | None = None  # set when a limit (not e.g. encryption) is the reason


# Members that decompress to no more than this are never refused for their ratio: a few
# hundred KB of zeros or a repetitive log legitimately compress better than 1:250, and
# something this small cannot be a bomb. Total size stays bounded by max_scan_size.
RATIO_FLOOR = 1 * MiB

REASON_RECURSION = "recursion limit"
REASON_FILE_SIZE = "file size limit"
REASON_SCAN_SIZE = "scan size limit"
REASON_FILES = "file count limit"
REASON_RATIO = "compression ratio limit (possible archive bomb)"


class Budget:
    """What is left of the limits while one object is decomposed (shared by the decomposers)."""

    __slots__ = ("files", "limits", "scanned", "stopped")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.files = 0  # parts yielded below the root
        self.scanned = 0  # bytes yielded, root included
        self.stopped = False  # a global limit was hit: yield nothing more

    def cap(self, compressed: int | None = None) -> int:
        """The most bytes one member may decompress to before some limit refuses it."""
        lim = self.limits
        cap = min(lim.max_file_size, lim.max_scan_size - self.scanned)
        if compressed is not None:
            cap = min(cap, max(int(lim.max_ratio * compressed), RATIO_FLOOR))
        return max(cap, 0)

    def over_ratio(self, size: int, compressed: int | None) -> bool:
        """True when ``size`` bytes from ``compressed`` bytes break ``max_ratio``."""
        return (compressed is not None and size > RATIO_FLOOR
                and size > self.limits.max_ratio * compressed)

    def refuse(self, path: str, size: int, compressed: int | None = None) -> Problem | None:
        """The Problem for a member of ``size`` bytes (declared or actual), or None if it fits.

        A scan-size refusal also stops the whole decomposition.
        """
        lim = self.limits
        if self.over_ratio(size, compressed):
            return Problem(path, ScanStatus.SKIPPED, REASON_RATIO, LimitKind.STRUCTURAL)
        if size > lim.max_file_size:
            return Problem(path, ScanStatus.SKIPPED, REASON_FILE_SIZE, LimitKind.SIZE)
        if self.scanned + size > lim.max_scan_size:
            self.stopped = True
            return Problem(path, ScanStatus.SKIPPED, REASON_SCAN_SIZE, LimitKind.SIZE)
        return None


_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f]+")
_MAX_NAME = 255


def sanitize_name(name: str, fallback: str = "unnamed") -> str:
    """Make an untrusted file/member name safe to show inside a part path.

    Control characters go, backslashes count as separators, and empty, ``.`` and ``..``
    segments are dropped, so ``../../evil.com`` → ``evil.com`` and ``/abs/x`` → ``abs/x``.
    The result is a label only: members are never written under this name.
    """
    name = _UNSAFE_CHARS.sub("", name).replace("\\", "/")
    segments = [s for s in name.split("/") if s not in ("", ".", "..")]
    clean = "/".join(segments)[:_MAX_NAME]
    return clean or fallback


def join_path(parent: str, child: str) -> str:
    """``parent/child``, without a leading slash when the root has no name."""
    return f"{parent}/{child}" if parent else child


Children = Generator[Part | Problem, None, None]  # closed early when a limit stops us
_Decomposer = Callable[[Part, Budget], Children]


def _decomposers() -> dict[Kind, _Decomposer]:
    # Imported here: the decomposer modules use Part/Problem/Budget from this module.
    from . import archives, html, libarchive, mime, office, pdf, sevenzip, tnef

    return {
        **libarchive.decomposers(),  # RAR, CAB, ISO 9660, cpio, LHA; ARJ/UDF: no reader
        Kind.OLE: office.ole_parts,
        Kind.RTF: office.rtf_parts,
        Kind.ZIP: archives.zip_members,
        Kind.TAR: archives.tar_members,
        Kind.GZIP: archives.gzip_members,
        Kind.BZIP2: archives.bzip2_members,
        Kind.XZ: archives.xz_members,
        Kind.SEVENZIP: sevenzip.sevenzip_members,
        Kind.MAIL: mime.mail_parts,
        Kind.TNEF: tnef.tnef_parts,
        Kind.PDF: pdf.pdf_parts,
        Kind.HTML: html.html_parts,
        Kind.OTHER: mime.uuencoded_parts,
    }


_DECOMPOSERS: dict[Kind, _Decomposer] | None = None
#: read a simple mail's parts in a few passes (:mod:`.simplemail`, the same parts, held to
#: the decomposers by hypothesis); False decomposes every object the long way
SIMPLE_MAIL = True
SIMPLE_MAIL_MAX = 64 * 1024  # the largest object it reads (simplemail.MAX_SIZE)


def decompose(data: bytes, limits: Limits, name: str = "") -> Iterator[Part | Problem]:
    """Yield ``data`` as a Part (path ``name``), then every nested part depth-first.

    Limits: a part over ``max_file_size`` is skipped; over ``max_files`` parts or
    ``max_scan_size`` bytes in all, decomposition stops with a ``skipped`` Problem; parts
    nested deeper than ``max_recursion`` are ``unknown``. Never raises for bad content.
    """
    global _DECOMPOSERS
    if _DECOMPOSERS is None:
        _DECOMPOSERS = _decomposers()
    if SIMPLE_MAIL and len(data) <= SIMPLE_MAIL_MAX:
        from .simplemail import simple_mail_parts  # it imports Part from here

        simple = simple_mail_parts(bytes(data), limits, name)
        if simple is not None:
            yield from simple
            return
    budget = Budget(limits)
    root = Part(name, bytes(data), 0)
    problem = budget.refuse(name, len(root.data))
    if problem is not None:
        yield problem
        return
    budget.scanned = len(root.data)
    yield root
    # An explicit stack instead of recursion: nesting depth is bounded by max_recursion,
    # but a configured limit in the thousands must not hit Python's recursion limit.
    stack: list[tuple[str, Children]] = []
    try:
        _push(stack, root, budget, _DECOMPOSERS)  # the root is at depth 0: never refused
        while stack and not budget.stopped:
            path, children = stack[-1]
            try:
                item = next(children)
            except StopIteration:
                stack.pop()
                continue
            except Exception as exc:
                stack.pop()
                yield Problem(path, ScanStatus.UNKNOWN, f"cannot decompose: {_describe(exc)}")
                continue
            if isinstance(item, Problem):
                yield item
                continue
            checked = _admit(item, budget)
            yield checked
            if isinstance(checked, Part):
                refused = _push(stack, checked, budget, _DECOMPOSERS)
                if refused is not None:
                    yield refused
    finally:
        for _, children in reversed(stack):
            children.close()  # releases py7zr/tarfile state held by suspended decomposers


def _admit(part: Part, budget: Budget) -> Part | Problem:
    """Apply the per-part limits to a part a decomposer found; count it if it is kept."""
    lim = budget.limits
    if part.depth > lim.max_recursion:
        return Problem(part.path, ScanStatus.UNKNOWN, REASON_RECURSION,
                       LimitKind.STRUCTURAL)
    if budget.files >= lim.max_files:
        budget.stopped = True
        return Problem(part.path, ScanStatus.SKIPPED, REASON_FILES, LimitKind.STRUCTURAL)
    problem = budget.refuse(part.path, len(part.data))
    if problem is not None:
        return problem
    budget.files += 1
    budget.scanned += len(part.data)
    return part


def _push(stack: list[tuple[str, Children]], part: Part, budget: Budget,
          decomposers: dict[Kind, _Decomposer]) -> Problem | None:
    """Start decomposing ``part``; a container at the depth limit is refused unopened."""
    kind = detect(part.data)
    if kind is not Kind.OTHER and part.depth >= budget.limits.max_recursion:
        # Its members would all be too deep: say so once instead of extracting them.
        return Problem(part.path, ScanStatus.UNKNOWN, REASON_RECURSION,
                       LimitKind.STRUCTURAL)
    stack.append((part.path, decomposers[kind](part, budget)))
    return None


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
