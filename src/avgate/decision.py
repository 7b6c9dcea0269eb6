"""The policy's answer: a :class:`Decision` — what a front-end must do with one object.

``Decision`` is to the policy what ``ScanResult`` is to the engines: the one type the layers
after it pass on (front-ends apply it in their protocol, :mod:`avgate.mailedit` edits the
message by it, the quarantine store records it). :mod:`avgate.policy` makes it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

__all__ = ["Decision", "Disposition"]


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
        done = (("quarantine", self.quarantine), ("replace", self.replace),
                ("tag", self.headers), ("prefix_subject", self.subject_prefix),
                ("copy_to", self.copy_to), ("shadow", self.shadow))
        return (self.disposition.value, *(name for name, what in done if what))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"disposition": self.disposition.value, "rule": self.rule,
                             "actions": list(self.actions)}
        if self.reply:
            d["reply"] = self.reply
        if self.would is not None:
            d["would"] = self.would.to_dict()
        return d
