"""The avgate exception tree.

Third-party exceptions are translated once, at the boundary where they occur
(``raise ... from exc``); code above that boundary only sees these::

    AvgateError
    ├── ConfigError                 bad config file or value (names the key and line)
    ├── ListenError                 (avgate.frontends.listen; also an OSError) a listener
    │                               could not be opened: names listener, address and why
    ├── EngineError                 an engine could not give a verdict → ScanStatus.ERROR
    │   ├── EngineUnavailable       connection refused / all servers down
    │   ├── EngineTimeout           connect or scan timeout
    │   └── EngineProtocolError     garbage or unexpected reply
    ├── SignatureError              a signature file or rule that cannot be loaded/translated
    ├── ProtocolError               a peer broke a protocol we serve (milter, ICAP, clamd)
    │   ├── ClamdProtocolError      (avgate.protocols.clamd) ``reply_hint``: the clamd reply
    │   └── IcapProtocolError       (avgate.protocols.icap) ``status``: the ICAP status code
    │                               every one carries ``reply_hint``: what the front-end sends
    ├── SpoolError                  spooling content failed (disk full, ...) → tempfail
    └── QuarantineError             quarantine store failure (write, lookup, release)
        ├── NotFound                no such quarantine record
        ├── AlreadyReleased         (avgate.quarantine.release) second release without force
        └── InvalidAddress          (avgate.quarantine.release) not an RFC 5321 mailbox

Subclasses defined beside the code that raises them are named with their module. Private
exceptions that never leave their module (parser control flow in ``avgate.content``, the
scan workers' ``WorkerError``/``BudgetExceeded``, which the embedded engine turns into a
result) are not part of the tree.

Rules: an engine never raises to the scan service for a failed scan — it returns a
``ScanResult`` with status ``error`` — but may raise ``EngineError`` internally; the engine
base turns it into a result. Decomposition does not raise for what it cannot scan: it reports
a ``Problem`` (``skipped``/``unknown``, with the limit that was hit), which becomes part of the
result; an unexpected exception from a parser becomes an ``EngineError`` (never clean).
"""

from __future__ import annotations


class AvgateError(Exception):
    """Base of every avgate error."""


class ConfigError(AvgateError):
    """Invalid configuration. ``problems`` lists every reason, one line each."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class EngineError(AvgateError):
    """An engine could not produce a verdict."""


class EngineUnavailable(EngineError):
    """The engine (every server of it) could not be reached."""


class EngineTimeout(EngineError):
    """The engine did not answer in time."""


class EngineProtocolError(EngineError):
    """The engine answered something we cannot understand."""


class SignatureError(AvgateError):
    """A signature or rule could not be loaded (names the file, line and signature)."""


class ProtocolError(AvgateError):
    """A client broke a protocol we serve; ``reply_hint`` says what to answer."""

    def __init__(self, message: str, reply_hint: str | int | None = None) -> None:
        self.reply_hint = reply_hint
        super().__init__(message)


class SpoolError(AvgateError):
    """Content could not be spooled (disk full, I/O error)."""


class QuarantineError(AvgateError):
    """The quarantine store failed."""


class NotFound(QuarantineError):
    """No quarantine record with that id."""
