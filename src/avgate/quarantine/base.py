"""The quarantine store interface, shared by both backends.

:class:`Store` is what every caller (gateway, CLI, HTTP API, on-demand scans, release) uses;
two implementations exist:

- :class:`~.store.QuarantineStore` (``[quarantine] backend = "file"``, the default): an SQLite
  index plus one content file per record, on one machine;
- :class:`~.postgres.PostgresStore` (``backend = "postgresql"``): records and content (in
  chunks) in PostgreSQL, shared by every gateway that uses the same ``dsn``.

Both are synchronous: the gateway calls :meth:`Store.put` in a worker thread
(``asyncio.to_thread``), the CLI and on-demand scans call it directly. Semantics every backend
keeps (one shared test suite checks both, ``tests/integration/test_postgres_quarantine.py``):

- ``put`` returns only once the record and all its content are committed (the front-end
  acknowledges the message after that, never before); a failure raises QuarantineError;
- content is streamed in chunks, never held whole in memory;
- a release is exactly-once: :meth:`Store.claim_release` is one conditional update (the
  record is not released and no live claim is held on it), so of two gateways releasing the
  same id at once one wins and the other gets :class:`AlreadyReleased`; ``force`` releases a
  released record again, but never while another release of it is in flight. A claim older
  than :data:`RELEASE_CLAIM_TTL` belongs to a release that died mid-send and may be taken over.
"""

from __future__ import annotations

import abc
import builtins
import contextlib
import hashlib
import io
import re
import secrets
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar, Protocol

from ..context import Envelope
from ..errors import NotFound, QuarantineError
from ..result import ScanResult
from ..spool import Spool
from .addresses import parse_addresses
from .maildir import MaildirDelivery, UnsafeRecipient
from .subject import NON_MAIL_FRONTENDS, clean_text, head_of, subject_of

if TYPE_CHECKING:
    from ..policy import Decision

CHUNK = 1 << 16  # bytes per read/write step
ID_RE = re.compile(r"^\d{8}T\d{6}\d{6}Z-[0-9a-f]{16}$")
REFID_RE = re.compile(r"^[A-Z2-7]{1,32}$")  # decision.new_refid: base32
#: a release claim older than this is taken to be dead (its gateway stopped mid-send)
RELEASE_CLAIM_TTL = 900.0


class AlreadyReleased(QuarantineError):
    """A second release without ``force``, or one while another release of the same record
    is in flight (``in_flight``; the CLI answers it with exit code 1, the HTTP API with 409)."""

    def __init__(self, message: str, *, in_flight: bool = False) -> None:
        super().__init__(message)
        self.in_flight = in_flight


class EnvelopeLike(Protocol):
    """Anything with an envelope's fields (front-ends may keep their own envelope type)."""

    @property
    def sender(self) -> str: ...
    @property
    def recipients(self) -> Sequence[str]: ...
    @property
    def client_addr(self) -> str: ...
    @property
    def helo(self) -> str: ...
    @property
    def listener(self) -> str: ...


def iso_utc(ts: float) -> str:
    """An epoch time as ISO 8601 UTC with a trailing Z."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_id(now: float | None = None) -> str:
    """A sortable, unguessable id: UTC time to the microsecond, then 64 random bits."""
    now = time.time() if now is None else now
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%S%f")
    return f"{stamp}Z-{secrets.token_hex(8)}"


def check_id(record_id: str) -> str:
    """``record_id`` if it has our format, else NotFound (ids become file names)."""
    if not ID_RE.match(record_id):
        raise NotFound(f"no quarantine record {record_id!r}")
    return record_id


def decision_actions(decision: Decision | None) -> tuple[str, tuple[str, ...]]:
    """(rule, actions) of a policy decision; an on-demand quarantine has no decision."""
    if decision is None:
        return "", ("quarantine",)
    return decision.rule, tuple(decision.actions)


@dataclass(frozen=True, slots=True)
class Record:
    """One quarantined object's metadata (the content is read with ``open_raw``)."""

    id: str
    created: float
    envelope: Envelope
    frontend: str
    sha256: str
    size: int
    status: str
    viruses: tuple[str, ...]
    result: dict[str, Any]
    rule: str
    actions: tuple[str, ...]
    released: float | None = None
    released_to: tuple[str, ...] = field(default=())
    source: str = ""  # on-demand records: the scanned path (PATH:N for an mbox message)
    refid: str = ""  # the message's RefID (X-Avgate-RefID, the reply text, the scan log)
    subject: str = ""  # the held message's Subject, decoded and cleaned ("" if not mail)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        return {
            "id": self.id,
            "refid": self.refid,
            "subject": self.subject,
            "created": iso_utc(self.created),
            "sender": self.envelope.sender,
            "recipients": list(self.envelope.recipients),
            "client_addr": self.envelope.client_addr,
            "helo": self.envelope.helo,
            "listener": self.envelope.listener,
            "source": self.source,
            "frontend": self.frontend,
            "sha256": self.sha256,
            "size": self.size,
            "status": self.status,
            "viruses": list(self.viruses),
            "rule": self.rule,
            "actions": list(self.actions),
            "released": iso_utc(self.released) if self.released is not None else None,
            "released_to": list(self.released_to),
            "result": self.result,
        }


@dataclass(frozen=True, slots=True)
class RecordFilter:
    """Which records :meth:`Store.list` returns (None: any; all given must match).

    Globs are fnmatch patterns (``*``, ``?``, ``[...]``, ``[!...]``), compared
    case-insensitively, whole value. ``subject`` is plain text found anywhere in the stored
    subject, case-insensitively (``%``, ``_`` and ``\\`` in it are just characters).
    """

    virus: str | None = None  # glob on any finding name
    sender: str | None = None  # glob on the envelope sender
    recipient: str | None = None  # glob on any envelope recipient
    status: str | None = None  # exact scan status (infected, skipped...)
    frontend: str | None = None  # exact front-end name (smtp, http...)
    since: float | None = None  # created at or after this epoch time
    refid: str | None = None  # exact RefID (case-insensitive: RefIDs are upper-case base32)
    listener: str | None = None  # glob on the listener's name (smtp, smtp1, milter-in...)
    until: float | None = None  # created before this epoch time (with since: a date range)
    subject: str | None = None  # text in the subject (substring, case-insensitive)


def like_pattern(text: str) -> str:
    """A SQL LIKE pattern (``ESCAPE '\\'``) matching values that contain ``text``, lower-cased:
    its ``%``, ``_`` and ``\\`` are escaped, so they match only themselves. A NUL (SQLite's
    LIKE would end the pattern there, matching everything; PostgreSQL text cannot hold one)
    becomes ``\\x01``: no stored subject holds either (:func:`.subject.clean_text`)."""
    escaped = (text.lower().replace("\\", "\\\\").replace("%", "\\%")
               .replace("_", "\\_").replace("\x00", "\x01"))
    return f"%{escaped}%"


@dataclass(frozen=True, slots=True)
class ReleaseClaim:
    """A release in flight: the record as it was when claimed, and the claim's token."""

    record: Record
    token: str


def content_chunks(content: Spool | bytes | Iterable[bytes]) -> Iterator[bytes]:
    """The content in pieces of at most :data:`CHUNK` bytes (a Spool on disk is read in
    chunks, never as one bytes object)."""
    if isinstance(content, Spool):
        yield from content.chunks(CHUNK)
    elif isinstance(content, bytes | bytearray | memoryview):
        view = memoryview(content)
        for i in range(0, len(view), CHUNK):
            yield bytes(view[i:i + CHUNK])
    else:
        yield from content


class Hashing:
    """Wraps a chunk iterator, counting and hashing what passes (size, sha256 of a put)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = chunks
        self._hash = hashlib.sha256()
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self._hash.update(chunk)
            self.size += len(chunk)
            yield chunk

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


class Store(abc.ABC):
    """The quarantine store interface (see the module doc). Thread-safe; one per process."""

    backend: ClassVar[str]
    maildir: MaildirDelivery | None = None  # deliver_to_maildir: copies beside each record

    # -- lifecycle ------------------------------------------------------------------------
    @abc.abstractmethod
    def close(self) -> None:
        """Release the store's connections and files."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing --------------------------------------------------------------------------
    def put(self, content: Spool | bytes, envelope: EnvelopeLike, result: ScanResult,
            decision: Decision | None = None, frontend: str = "", listener: str = "",
            *, rule: str | None = None, actions: Sequence[str] | None = None,
            source: str = "", refid: str | None = None, subject: str | None = None) -> str:
        """Store ``content`` byte-for-byte with its metadata; return the new id once it is
        committed.

        ``rule``/``actions`` override what is derived from ``decision`` (e.g. on-demand scans
        have no decision); ``source``: where an on-demand scan found the object; ``refid``:
        the message's RefID (default: the decision's); ``subject``: the record's subject
        (default: read from the content's first header block, see :mod:`.subject`; none for
        a front-end that carries no mail). Raises QuarantineError (disk full, database
        down...: front-ends tempfail).
        """
        d_rule, d_actions = decision_actions(decision)
        if refid is None:
            refid = decision.refid if decision is not None else ""
        if subject is None:
            subject = ("" if frontend in NON_MAIL_FRONTENDS
                       else subject_of(head_of(content)))
        else:
            subject = clean_text(subject)
        record = Record(
            id=new_id(), created=time.time(),
            envelope=Envelope(envelope.sender, tuple(envelope.recipients),
                              envelope.client_addr, envelope.helo,
                              listener or envelope.listener),
            frontend=frontend, sha256="", size=0, status=result.status.value,
            viruses=tuple(result.virus_names), result=result.to_dict(),
            rule=d_rule if rule is None else rule,
            actions=d_actions if actions is None else tuple(actions),
            source=source, refid=refid, subject=subject)
        self._insert(record, content_chunks(content))
        self._update_metrics()
        if self.maildir is not None:
            self.deliver_to_maildirs(record.id, record.envelope.recipients)
        return record.id

    def adopt(self, record: Record, chunks: Iterable[bytes]) -> bool:
        """Store a record made elsewhere (``avgate quarantine copy``) with its id, times and
        release state; False (nothing written) when a record with that id exists here.
        The content's size and sha256 must match the record's (QuarantineError)."""
        check_id(record.id)
        if self.exists(record.id):
            return False
        self._insert(record, chunks, expect=(record.size, record.sha256))
        return True

    @abc.abstractmethod
    def _insert(self, record: Record, chunks: Iterable[bytes],
                expect: tuple[int, str] | None = None) -> None:
        """Write content then metadata, committed together; size and sha256 are computed
        from ``chunks`` (and must equal ``expect`` when given). Raises QuarantineError."""

    # -- reading --------------------------------------------------------------------------
    @abc.abstractmethod
    def get(self, record_id: str) -> Record:
        """The record's metadata; NotFound if there is none."""

    def exists(self, record_id: str) -> bool:
        try:
            self.get(record_id)
        except NotFound:
            return False
        return True

    @abc.abstractmethod
    def open_raw(self, record_id: str) -> BinaryIO:
        """The content exactly as received, opened for reading (the caller closes it)."""

    def read_raw(self, record_id: str) -> bytes:
        """The whole content as bytes (for release and report, which send it in one piece)."""
        with self.open_raw(record_id) as f:
            return f.read()

    def iter_raw(self, record_id: str) -> Iterator[bytes]:
        """The content in chunks."""
        with self.open_raw(record_id) as f:
            while chunk := f.read(CHUNK):
                yield chunk

    @abc.abstractmethod
    def list(self, where: RecordFilter | None = None, limit: int | None = None,
             offset: int = 0) -> builtins.list[Record]:
        """Records matching ``where``, oldest first; at most ``limit`` after ``offset``.
        The filter runs in the database: a page costs the rows it returns."""

    @abc.abstractmethod
    def count(self, where: RecordFilter | None = None) -> int:
        """How many records match ``where`` (the total behind a page of :meth:`list`)."""

    @abc.abstractmethod
    def stats(self) -> tuple[int, int]:
        """(records, bytes) in the store."""

    def ids(self) -> Iterator[str]:
        """Every record id, oldest first, fetched a page at a time (after the last id seen,
        so a million records cost no OFFSET scans, and records added meanwhile come too)."""
        last = ""
        while page := self._ids_after(last, 500):
            yield from page
            last = page[-1]

    @abc.abstractmethod
    def _ids_after(self, last: str, limit: int) -> builtins.list[str]:
        """Up to ``limit`` ids greater than ``last``, in order."""

    # -- releasing ------------------------------------------------------------------------
    def claim_release(self, record_id: str, force: bool = False) -> ReleaseClaim:
        """Take the right to release ``record_id`` now (see the module doc): NotFound,
        AlreadyReleased when it was released (and not ``force``) or is being released."""
        check_id(record_id)
        token = secrets.token_hex(16)
        now = time.time()
        if self._claim(record_id, token, now, now - RELEASE_CLAIM_TTL, force):
            return ReleaseClaim(self.get(record_id), token)
        record = self.get(record_id)  # NotFound when there is no such record
        if record.released is not None and not force:
            raise AlreadyReleased(
                f"{record_id} was already released at {iso_utc(record.released)} "
                f"(use --force to release it again)")
        raise AlreadyReleased(f"{record_id} is being released right now (by another "
                              "request or gateway); try again later", in_flight=True)

    @abc.abstractmethod
    def _claim(self, record_id: str, token: str, now: float, stale_before: float,
               force: bool) -> bool:
        """One atomic conditional update: set the claim when the record exists, is not
        released (unless ``force``) and has no claim newer than ``stale_before``."""

    def finish_release(self, claim: ReleaseClaim, recipients: Sequence[str],
                       when: float | None = None) -> None:
        """The claimed release was sent: record it and drop the claim."""
        recipients = parse_addresses(recipients)
        self._finish(claim.record.id, claim.token, recipients,
                     time.time() if when is None else when)

    @abc.abstractmethod
    def _finish(self, record_id: str, token: str | None, recipients: Sequence[str],
                when: float) -> None:
        """Set released/released_to and clear the claim (``token`` None: any claim)."""

    @abc.abstractmethod
    def abort_release(self, claim: ReleaseClaim) -> None:
        """The claimed release failed: drop the claim (the record stays unreleased)."""

    def mark_released(self, record_id: str, recipients: Sequence[str],
                      when: float | None = None) -> None:
        """Record that the object was released to ``recipients`` (without a claim).

        Each address goes through :func:`~.addresses.parse_addresses` first (InvalidAddress):
        ``released_to`` never holds a CR/LF or other junk, whoever calls this.
        """
        recipients = parse_addresses(recipients)
        self.get(record_id)
        self._finish(record_id, None, recipients, time.time() if when is None else when)

    # -- removing -------------------------------------------------------------------------
    @abc.abstractmethod
    def delete(self, record_id: str) -> None:
        """Remove a record and its content; NotFound if there is none."""

    def purge(self, older_than_days: float, now: float | None = None) -> builtins.list[str]:
        """Delete every record created more than ``older_than_days`` ago; return their ids."""
        cutoff = (time.time() if now is None else now) - older_than_days * 86400
        ids = self._ids_before(cutoff)
        for rid in ids:
            with contextlib.suppress(NotFound):  # deleted meanwhile (another gateway)
                self.delete(rid)
        return ids

    @abc.abstractmethod
    def _ids_before(self, cutoff: float) -> builtins.list[str]:
        """Ids of the records created before ``cutoff``, oldest first."""

    # -- side effects ---------------------------------------------------------------------
    def deliver_to_maildirs(self, record_id: str, recipients: Sequence[str]
                            ) -> builtins.list[Path]:
        """Copy a record into each recipient's ``deliver_to_maildir`` folder; the copies.

        A copy is a convenience beside the record, never instead of it: a recipient without
        a mailbox here is skipped, and one that cannot get its copy (an address unfit for a
        path, a write error, a symlinked folder) costs only that copy, said on stderr.
        """
        delivered: builtins.list[Path] = []
        if self.maildir is None:
            return delivered
        check_id(record_id)
        seen: set[Path] = set()
        for rcpt in recipients:
            try:
                folder = self.maildir.folder_for(rcpt)
                if folder in seen:
                    continue
                seen.add(folder)
                copy = self.maildir.deliver_to(folder, lambda: self.open_raw(record_id),
                                               record_id)
            except (OSError, UnsafeRecipient, QuarantineError) as exc:
                print(f"avgate: quarantine {record_id}: cannot deliver to the Maildir of "
                      f"{rcpt!r}: {exc}", file=sys.stderr)
                continue
            if copy is not None:
                delivered.append(copy)
        return delivered

    def _update_metrics(self) -> None:
        from ..observability import set_quarantine_size

        set_quarantine_size(*self.stats())


class ChunkReader(io.RawIOBase):
    """A read-only stream over numbered chunks fetched one at a time (``fetch(n)`` returns
    chunk ``n``, or None past the end): a record's content without holding it all."""

    def __init__(self, fetch: Any, size: int) -> None:
        super().__init__()
        self._fetch = fetch
        self._size = size
        self._seq = 0
        self._buf = memoryview(b"")  # what is left of the current chunk
        self._pos = 0
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        while not self._buf and not self._eof:
            chunk = self._fetch(self._seq)
            if chunk is None:
                self._eof = True
                if self._pos != self._size:
                    raise QuarantineError(
                        f"quarantine content ended after {self._pos} of {self._size} bytes "
                        "(deleted while being read?)")
                break
            self._seq += 1
            self._buf = memoryview(chunk)
        n = min(len(view), len(self._buf))
        view[:n] = self._buf[:n]
        self._buf = self._buf[n:]  # a view: no copy of the rest
        self._pos += n
        return n


def with_size(record: Record, size: int, sha256: str) -> Record:
    """``record`` with its content's size and digest filled in."""
    return replace(record, size=size, sha256=sha256)
