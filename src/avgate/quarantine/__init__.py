"""Quarantine: a store of objects held back by policy, and their release.

Imports run one way: ``addresses`` (the mailbox parser) ← ``store`` ← ``release``.
"""

from __future__ import annotations

from ..context import Envelope
from .addresses import InvalidAddress, parse_address, parse_addresses, parse_sender
from .release import AlreadyReleased, build_report, release, report, send
from .store import QuarantineStore, Record, RecordFilter, iso_utc, new_id

__all__ = ["AlreadyReleased", "Envelope", "InvalidAddress", "QuarantineStore", "Record",
           "RecordFilter", "build_report", "iso_utc", "new_id", "parse_address",
           "parse_addresses", "parse_sender", "release", "report", "send"]
