"""Quarantine: a store of objects held back by policy, and their release.

Imports run one way: ``addresses`` (the mailbox parser) ← ``base`` (the :class:`Store`
interface) ← ``store`` (the file backend, settings, :func:`open_store`) and ``postgres``
(the PostgreSQL backend, imported only when configured) ← ``release``.
"""

from __future__ import annotations

from ..context import Envelope
from .addresses import InvalidAddress, parse_address, parse_addresses, parse_sender
from .base import AlreadyReleased, Record, RecordFilter, ReleaseClaim, Store, iso_utc, new_id
from .release import build_report, release, report, send
from .store import QuarantineStore, open_store

__all__ = ["AlreadyReleased", "Envelope", "InvalidAddress", "QuarantineStore", "Record",
           "RecordFilter", "ReleaseClaim", "Store", "build_report", "iso_utc", "new_id",
           "open_store", "parse_address", "parse_addresses", "parse_sender", "release",
           "report", "send"]
