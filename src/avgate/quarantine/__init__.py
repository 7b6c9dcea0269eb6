"""Quarantine: a store of objects held back by policy, and their release."""

from __future__ import annotations

from .release import (
    DEFAULT_NEXT_HOP,
    AlreadyReleased,
    InvalidAddress,
    build_report,
    parse_address,
    release,
    report,
    send,
)
from .store import Envelope, QuarantineStore, Record, iso_utc, new_id

__all__ = ["DEFAULT_NEXT_HOP", "AlreadyReleased", "Envelope", "InvalidAddress",
           "QuarantineStore", "Record", "build_report", "iso_utc", "new_id", "parse_address",
           "release", "report", "send"]
