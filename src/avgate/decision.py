"""The policy's answer: a :class:`Decision` — what a front-end must do with one object.

``Decision`` is to the policy what ``ScanResult`` is to the engines: the one type the layers
after it pass on (front-ends apply it in their protocol, :mod:`avgate.mailedit` edits the
message by it, the quarantine store records it). :mod:`avgate.policy` makes it.
"""

from __future__ import annotations

import base64
import enum
import secrets
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["Decision", "Disposition", "new_refid"]


def new_refid() -> str:
    """A short unique id for one scanned object (Scalix's RefID): 16 characters of base32
    (A-Z, 2-7) over 48 bits of milliseconds and 32 random bits, so ids sort by time and two
    objects in the same millisecond collide with probability 2**-32."""
    raw = (time.time_ns() // 1_000_000 & (1 << 48) - 1).to_bytes(6, "big") \
        + secrets.token_bytes(4)
    return base64.b32encode(raw).decode("ascii")


class Disposition(enum.StrEnum):
    ACCEPT = "accept"  # deliver / pass (with modifiers)
    REJECT = "reject"  # permanent refusal (5xx)
    TEMPFAIL = "tempfail"  # temporary refusal (4xx): the sender retries
    DISCARD = "discard"  # acknowledge and drop


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
        tagged = any(n != self.refid_header for n, _ in self.headers)
        done = (("quarantine", self.quarantine), ("replace", self.replace),
                ("tag", tagged), ("prefix_subject", self.subject_prefix),
                ("copy_to", self.copy_to), ("remove_recipients", self.remove_recipients),
                ("shadow", self.shadow))
        return (self.disposition.value, *(name for name, what in done if what))

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
