"""Typed settings: the base every config section derives from, and the value types they share.

Each section is a frozen pydantic model declared beside the code it configures (an engine's
``Settings`` in its engine module, a front-end's in its front-end module), with its defaults
stated there once. :mod:`avgate.config` reads the TOML file, builds every section and turns
pydantic's errors into ``file: key (line N): message`` lines.

Why pydantic v2: it validates nested models, unions discriminated by ``type`` and custom
value types (sizes like ``"25 MiB"``, listen addresses) with errors that carry the key path,
which is what ``config check`` reports; and the models are frozen, typed objects that mypy
checks where they are used. msgspec is faster, but config is read once per start or reload
and its errors are less precise.

Models are strict (TOML already gives typed values: ``max_files = "10"`` is an error, not a
silent conversion), except where a type says otherwise (sizes accept ``"25 MiB"``).
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, PlainSerializer

from .frontends.listen import Address, parse_listen, parse_mode


class Section(BaseModel):
    """A config table: frozen, strict, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True,
                              arbitrary_types_allowed=True)


def _size(value: Any) -> int:
    from .limits import parse_size  # limits.py builds on this module

    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a size (bytes, or e.g. \"25 MiB\"), got {value!r}")
    return parse_size(value)


def _positive(value: int) -> int:
    if value <= 0:
        raise ValueError("expected a size > 0")
    return value


def _listen(value: Any) -> Address:
    if isinstance(value, Address):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected an address string, got {value!r}")
    return parse_listen(value, "address")


def _mode(value: Any) -> int:
    # Only the octal string: a TOML integer 660 would be decimal 660 = 0o1224, nonsense.
    return parse_mode(value)


def _group(value: Any) -> str | int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ValueError(f"expected a group name or a gid, got {value!r}")


def _str_tuple(value: Any) -> Any:
    return (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list) \
        else value


#: a byte size: an integer, or a string such as "25 MiB", "10M", "512KB"
Size = Annotated[int, BeforeValidator(_size), AfterValidator(_positive)]
#: a listen address (see avgate.frontends.listen); shown as its text
Listen = Annotated[Address, BeforeValidator(_listen), PlainSerializer(str, return_type=str)]
#: a unix permission mode given as an octal string ("0660")
Mode = Annotated[int, BeforeValidator(_mode), PlainSerializer(lambda v: f"{v:04o}",
                                                               return_type=str)]
#: one string or a list of strings, kept as a tuple
StrTuple = Annotated[tuple[str, ...], BeforeValidator(_str_tuple)]
#: a unix group name or a numeric gid (resolved when the socket is created)
Group = Annotated[str | int, BeforeValidator(_group)]


# Secrets: the value is used as given; only what ``config show`` prints (``model_dump``) hides it.
def redact_secret(value: str) -> str:
    """``***`` and a short fingerprint (tells two secrets apart, reveals neither)."""
    if not value:
        return value
    return "***" + hashlib.sha256(value.encode()).hexdigest()[:8]


_URL_PASSWORD = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://[^/@:]*:)[^/@]*@")
_PARAM_PASSWORD = re.compile(r"(?i)([?&]password=)[^&]*")


def redact_url(url: str) -> str:
    """A URL as it may be shown: a password in its user info or a ``password=`` parameter
    replaced by ``***``."""
    return _PARAM_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", url))


#: a secret string (tokens, keys): ``config show`` prints ``***`` and a fingerprint
Secret = Annotated[str, PlainSerializer(redact_secret, return_type=str)]
#: a URL that may carry a password (DSN, Redis): ``config show`` prints it without
SecretUrl = Annotated[str, PlainSerializer(redact_url, return_type=str)]
