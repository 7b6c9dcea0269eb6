"""Mail addresses a release sends to or records: the one parser, shared by the CLI, the HTTP
API and the store (``released_to`` never holds a CR/LF or other junk, whoever writes it).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Iterable

from ..errors import QuarantineError


class InvalidAddress(QuarantineError):
    """An address that is not a plausible RFC 5321 mailbox (the HTTP API answers 400)."""


# -- addresses: the one parser for every address a release sends to or stores ------------
# RFC 5321 Mailbox (local-part "@" domain), with RFC 6531 UTF-8 allowed in atoms and labels.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"')
_LABEL = re.compile(r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\u0080-\U0010ffff-]{0,61}"
                    r"[A-Za-z0-9\u0080-\U0010ffff])?")
# control characters (C0, DEL, C1), format characters (bidi overrides...), surrogates and
# every kind of space or line break are never part of an address (a quoted local part may
# hold a plain space, checked by _QUOTED)
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})


def _bad(value: str, why: str) -> InvalidAddress:
    return InvalidAddress(f"invalid address {value!r}: {why}")


def parse_address(value: str) -> str:
    """A plausible mailbox ``local@domain`` (or ``postmaster``), else InvalidAddress.

    One pair of enclosing angle brackets is removed (``<a@b>`` → ``a@b``). CR, LF, NUL and
    every other control character are refused wherever they are, as is anything that is not
    a dot-string or quoted-string local part with a host name or address-literal domain.
    """
    if not isinstance(value, str):
        raise InvalidAddress(f"invalid address {value!r}: not a string")
    addr = value[1:-1] if value.startswith("<") and value.endswith(">") else value
    for ch in addr:
        if ch != " " and unicodedata.category(ch) in _FORBIDDEN_CATEGORIES:
            raise _bad(value, f"contains the control or space character U+{ord(ch):04X}")
    if not addr:
        raise _bad(value, "empty")
    if len(addr.encode("utf-8", "surrogatepass")) > 254:
        raise _bad(value, "longer than 254 bytes")
    if addr.lower() == "postmaster":
        return addr
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain:
        raise _bad(value, "expected local-part@domain")
    if len(local.encode("utf-8")) > 64:
        raise _bad(value, "local part longer than 64 bytes")
    if not (_DOT_STRING.fullmatch(local) or _QUOTED.fullmatch(local)):
        raise _bad(value, "malformed local part")
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        try:
            if literal[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            raise _bad(value, "malformed address literal") from None
        return addr
    labels = domain.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise _bad(value, "malformed domain")
    return addr


def parse_sender(value: str) -> str:
    """An envelope sender: ``""`` / ``<>`` (the null reverse-path) or a mailbox."""
    return "" if value in ("", "<>") else parse_address(value)


def parse_addresses(values: Iterable[str], limit: int | None = None) -> list[str]:
    """Every address through :func:`parse_address`; at least one (at most ``limit``)."""
    out = [parse_address(v) for v in values]
    if not out:
        raise InvalidAddress("no recipient address")
    if limit is not None and len(out) > limit:
        raise InvalidAddress(f"more than {limit} recipient addresses")
    return out
