"""Where an object came from: the session :class:`Context` and its transaction :class:`Envelope`.

The split follows aiosmtpd's Session/Envelope: the :class:`Envelope` is one transaction
(sender, recipients, client address, HELO name, listener) and is what a quarantine record
keeps; the :class:`Context` adds what the policy needs about the session around it (the
front-end, the direction, SMTP AUTH, the object's size). A front-end builds one Envelope,
puts it in the Context, and passes only the Context to ``Gateway.process``::

    env = Envelope(sender, recipients, client_addr=addr, helo=helo, listener=name)
    ctx = Context("smtp", envelope=env, direction=d, authenticated=auth, size=spool.size)

The envelope's fields read through the context as well (``ctx.sender``, ``ctx.recipients``,
``ctx.listener``...), and ``Context(frontend, listener=, sender=, recipients=,
client_addr=, ...)`` still builds the envelope from those keywords.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Context", "Envelope"]


@dataclass(frozen=True, slots=True)
class Envelope:
    """One transaction: who sent it, to whom, from where, through which listener."""

    sender: str = ""
    recipients: tuple[str, ...] = ()
    client_addr: str = ""
    helo: str = ""
    listener: str = ""



@dataclass(frozen=True, slots=True, init=False)
class Context:
    """The session around one object, for policy conditions and templates."""

    frontend: str
    envelope: Envelope = field(default_factory=Envelope)
    direction: str = "inbound"
    authenticated: bool = False
    size: int = 0
    after_queue: bool = False  # an SMTP listener behind the MTA's queue: a reject would bounce

    def __init__(self, frontend: str, listener: str | None = None, direction: str = "inbound",
                 sender: str | None = None, recipients: Sequence[str] | None = None,
                 client_addr: str | None = None, authenticated: bool = False, size: int = 0,
                 *, envelope: Envelope | None = None, helo: str | None = None,
                 after_queue: bool = False) -> None:
        if envelope is None:
            envelope = Envelope(sender or "", tuple(recipients or ()), client_addr or "",
                                helo or "", listener or "")
        elif any(v is not None for v in (listener, sender, recipients, client_addr, helo)):
            raise TypeError("Context: pass either envelope= or the envelope's fields, not both")
        object.__setattr__(self, "frontend", frontend)
        object.__setattr__(self, "envelope", envelope)
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "authenticated", authenticated)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "after_queue", after_queue)

    # the envelope's fields, read through the context
    @property
    def sender(self) -> str:
        return self.envelope.sender

    @property
    def recipients(self) -> tuple[str, ...]:
        return self.envelope.recipients

    @property
    def client_addr(self) -> str:
        return self.envelope.client_addr

    @property
    def helo(self) -> str:
        return self.envelope.helo

    @property
    def listener(self) -> str:
        return self.envelope.listener
