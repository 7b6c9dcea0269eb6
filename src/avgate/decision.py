"""The policy's answer: a :class:`Decision` — what a front-end must do with one object.

``Decision`` is to the policy what ``ScanResult`` is to the engines: the one type the layers
after it pass on (front-ends apply it in their protocol, :mod:`avgate.mailedit` edits the
message by it, the quarantine store records it). :mod:`avgate.policy` makes it.
"""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["Decision", "Disposition", "new_refid"]

_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"  # RFC 4648 base32


#: every 10-bit value as its two base32 characters (RFC 4648 alphabet)
_B32_PAIRS = tuple(a + b for a in _B32 for b in _B32)


def new_refid() -> str:
    """A short unique id for one scanned object (Scalix's RefID): 16 characters of base32
    (A-Z, 2-7) over 48 bits of milliseconds and 32 random bits, so ids sort by time and two
    objects in the same millisecond collide with probability 2**-32.

    ``base64.b32encode`` of those 10 bytes (80 bits: 16 characters, no padding), spelled
    out: 8 table look-ups instead of its general loop (a quarter of the cost; it runs for
    every object)."""
    n = (time.time_ns() // 1_000_000 & (1 << 48) - 1) << 32 \
        | int.from_bytes(os.urandom(4), "big")  # what secrets.token_bytes(4) reads
    pairs = _B32_PAIRS
    return (pairs[n >> 70] + pairs[n >> 60 & 1023] + pairs[n >> 50 & 1023]
            + pairs[n >> 40 & 1023] + pairs[n >> 30 & 1023] + pairs[n >> 20 & 1023]
            + pairs[n >> 10 & 1023] + pairs[n & 1023])


class Disposition(enum.StrEnum):
    ACCEPT = "accept"  # deliver / pass (with modifiers)
    REJECT = "reject"  # permanent refusal (5xx)
    TEMPFAIL = "tempfail"  # temporary refusal (4xx): the sender retries
    DISCARD = "discard"  # acknowledge and drop


#: each disposition's value as a plain str (``.value`` is a property: slow per object)
_VALUES = {d: d.value for d in Disposition}


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
    #: the message's RefID (``[policy] refid_header``): in the scan log, the replies and,
    #: as ``refid_header``, among ``headers`` (that header alone is not a ``tag``)
    refid: str = ""
    refid_header: str = ""
    #: recipients to drop (``remove_recipients``: the envelope's addresses that matched)
    remove_recipients: tuple[str, ...] = ()

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
        done = [_VALUES[self.disposition]]
        if self.quarantine:
            done.append("quarantine")
        if self.replace:
            done.append("replace")
        refid_header = self.refid_header
        if any(n != refid_header for n, _ in self.headers):
            done.append("tag")
        if self.subject_prefix:
            done.append("prefix_subject")
        if self.copy_to:
            done.append("copy_to")
        if self.remove_recipients:
            done.append("remove_recipients")
        if self.shadow:
            done.append("shadow")
        return tuple(done)

    def with_refid(self, refid: str, refid_header: str,
                   headers: tuple[tuple[str, str], ...]) -> Decision:
        """A copy with ``refid``, ``refid_header`` and ``headers`` replaced (what
        ``dataclasses.replace`` does, without its per-call introspection)."""
        return Decision(self.disposition, self.reply, headers, self.quarantine, self.replace,
                        self.notice, self.subject_prefix, self.copy_to, self.rule,
                        self.shadow, self.would, refid, refid_header,
                        self.remove_recipients)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"disposition": self.disposition.value, "rule": self.rule,
                             "actions": list(self.actions)}
        if self.reply:
            d["reply"] = self.reply
        if self.refid:
            d["refid"] = self.refid
        if self.would is not None:
            d["would"] = self.would.to_dict()
        return d
