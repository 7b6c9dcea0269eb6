"""Configuration: one TOML file, validated against a schema with messages naming key and line.

Source: ``--config FILE``, else ``$AVGATE_CONFIG``, else built-in defaults. Without a file every
front-end runs on its default loopback listener; with a file a front-end runs only if its
section is present. Each front-end and engine reads its own table; this module checks that
every key is known and of the right type, and fills in defaults.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .limits import DEFAULT_WORKER_MEMORY, Limits, parse_size

ENV_VAR = "AVGATE_CONFIG"

# -- schema ---------------------------------------------------------------------------------
# A key's checker takes the value and returns the normalised value or raises ValueError.
Checker = Callable[[Any], Any]


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {_tname(v)}")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {_tname(v)}")
    return v


def _pos_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"expected a positive integer, got {v!r}")
    return v


def _nonneg_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"expected an integer >= 0, got {v!r}")
    return v


def _seconds(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
        raise ValueError(f"expected a number of seconds > 0, got {v!r}")
    return float(v)


def _size(v: Any) -> int:
    size = parse_size(v)
    if size <= 0:
        raise ValueError("expected a size > 0")
    return size


def _ratio(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v <= 1:
        raise ValueError(f"expected a number > 1, got {v!r}")
    return float(v)


def _str_list(v: Any) -> list[str]:
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError("expected a string or a list of strings")
    return list(v)


def _one_of(*choices: str) -> Checker:
    def check(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"expected one of {', '.join(map(repr, choices))}, got {v!r}")
        return str(v)

    return check


_LISTEN_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def _listen(v: Any) -> str:
    """host:port, [v6]:port, unix:/path, inet:port@host (milter style)."""
    s = _str(v)
    if s.startswith("unix:") and len(s) > 5:
        return s
    if s.startswith(("inet:", "inet6:")):
        port, _, _host = s.split(":", 1)[1].partition("@")
        if port.isdigit() and 0 < int(port) < 65536:
            return s
    m = _LISTEN_RE.match(s)
    if m and 0 <= int(m.group(2)) < 65536:
        return s
    raise ValueError(f"expected host:port or unix:/path, got {s!r}")


def _any(v: Any) -> Any:
    return v


def _table(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ValueError(f"expected a table, got {_tname(v)}")
    return v


def _tname(v: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            list: "an array", dict: "a table"}.get(type(v), type(v).__name__)


SCAN_KEYS: dict[str, Checker] = {
    "mode": _one_of("first_infected", "all"),
    "cache": _bool,
    "cache_size": _pos_int,
    "spool_memory": _size,
    "spool_dir": _str,
    "workers": _nonneg_int,  # 0: one scan worker per core
    "worker_memory": _size,
}
LIMIT_KEYS: dict[str, Checker] = {
    "max_scan_size": _size,
    "max_file_size": _size,
    "max_recursion": _pos_int,
    "max_files": _pos_int,
    "max_ratio": _ratio,
    "scan_timeout": _seconds,
}
POLICY_KEYS: dict[str, Checker] = {
    "virus_action": _one_of("reject", "keep", "tempfail", "discard", "quarantine"),
    "failure_action": _one_of("reject", "keep", "tempfail", "discard"),
    "header_style": _one_of("default", "qhpsi", "clamav-verdict", "none"),
    "shadow": _bool,
    "rules": _any,  # validated by avgate.policy
    "headers": _any,
    "verdict_mode": _nonneg_int,
    "verdict_prefix": _str,
    "verdict_text": _str,
    "reject_reply": _str,
    "tempfail_reply": _str,
    "notice": _str,
    "subject_prefix": _str,
    "copy_to": _str_list,
    "internal_networks": _str_list,
    "structural_action": _one_of("reject", "keep", "tempfail", "discard", "quarantine"),
    "size_action": _one_of("auto", "reject", "keep", "tempfail", "discard", "quarantine"),
}
QUARANTINE_KEYS: dict[str, Checker] = {
    "path": _str,
    "next_hop": _str,
    "report_to": _str,
    "report_from": _str,
}
LOG_KEYS: dict[str, Checker] = {
    "path": _str,
    "level": _one_of("debug", "info", "warning", "error"),
}
SMTP_LISTENER_KEYS: dict[str, Checker] = {
    "name": _str,
    "listen": _listen,
    "next_hop": _str,
    "direction": _one_of("inbound", "outbound", "auto"),
    "tls_cert": _str,
    "tls_key": _str,
    "max_message_size": _size,
    "max_line_length": _pos_int,
    "max_connections": _pos_int,
    "idle_timeout": _seconds,
    "relay_timeout": _seconds,
    "hostname": _str,
    "bare_lf": _one_of("reject", "normalize"),
    "xforward": _bool,
    "xclient": _bool,
    "xforward_hosts": _str_list,  # addresses/networks; checked when the listener starts
    "xclient_hosts": _str_list,
    "max_recipients": _pos_int,
    "max_junk_commands": _pos_int,
    "max_errors": _pos_int,
}
MILTER_KEYS: dict[str, Checker] = {
    "listen": _listen,
    "timeout": _seconds,
    "spool_memory": _size,
    "quarantine": _one_of("mta", "store", "both"),
    "max_connections": _pos_int,
    "max_packet": _size,
    "packet_timeout": _seconds,
    "queue_timeout": _seconds,
    "max_headers": _pos_int,
    "max_header_size": _size,
    "max_recipients": _pos_int,
}
ICAP_KEYS: dict[str, Checker] = {
    "listen": _listen,
    "service": _str,
    "preview": _nonneg_int,
    "max_connections": _pos_int,
    "options_ttl": _pos_int,
    "max_header_size": _size,
    "max_requests_per_connection": _pos_int,
    "idle_timeout": _seconds,
    "block_page": _str,
    "skip_content_types": _str_list,
    "max_body_size": _size,
}
#: HTTP token roles: scan (POST /v1/scan when scan_requires_token), read (list and show
#: quarantine records), admin (download, release, delete quarantined objects; implies read).
HTTP_ROLES = ("scan", "read", "admin")


def http_tokens(v: Any) -> list[dict[str, Any]]:
    """``[http] tokens``: strings (scan-only tokens) or ``{ token = "...", roles = [...] }``.

    Normalised to ``[{"token": str, "roles": [role, ...]}]`` (``admin`` adds ``read``). The
    front-end reads tokens through this function too, so there is one parser. Messages name
    the entry (``tokens[1].roles``), never the secret.
    """
    items = v if isinstance(v, list) else [v]
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        where = f"tokens[{i}]"
        roles: Any = ["scan"]
        if isinstance(item, str):
            token = item
        elif isinstance(item, dict):
            unknown = sorted(set(item) - {"token", "roles"})
            if unknown:
                raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: roles, token)")
            if "token" not in item:
                raise ValueError(f"{where}: missing key 'token'")
            if not isinstance(item["token"], str):
                raise ValueError(f"{where}.token: expected a string, got {_tname(item['token'])}")
            token = item["token"]
            roles = item.get("roles", roles)
            roles = [roles] if isinstance(roles, str) else roles
            if not isinstance(roles, list) or not roles or not all(
                    isinstance(r, str) for r in roles):
                raise ValueError(f"{where}.roles: expected a non-empty array of roles "
                                 f"({', '.join(HTTP_ROLES)})")
            for role in roles:
                if role not in HTTP_ROLES:
                    raise ValueError(f"{where}.roles: unknown role {role!r} "
                                     f"(known: {', '.join(HTTP_ROLES)})")
        else:
            raise ValueError(f'{where}: expected a string or a table {{ token = "...", '
                             f"roles = [...] }}, got {_tname(item)}")
        if not token or not all("!" <= c <= "~" for c in token):
            raise ValueError(f"{where}: a token is printable ASCII without spaces, not empty")
        if token in seen:
            raise ValueError(f"{where}: the same token is listed twice")
        seen.add(token)
        if "admin" in roles:
            roles = [*roles, "read"]
        out.append({"token": token, "roles": [r for r in HTTP_ROLES if r in roles]})
    return out


HTTP_KEYS: dict[str, Checker] = {
    "listen": _listen,
    "tokens": http_tokens,
    "scan_requires_token": _bool,
    "tls_cert": _str,
    "tls_key": _str,
    "max_upload_size": _size,
    "max_parts": _pos_int,
    "idle_timeout": _seconds,
    "max_connections": _pos_int,
}
def _socket_mode(v: Any) -> str:
    """Octal permission digits as a string, like clamd's LocalSocketMode ("0660", "660")."""
    s = _str(v).strip()
    digits = s[2:] if s[:2].lower() == "0o" else s
    if not digits or len(digits) > 4 or any(c not in "01234567" for c in digits):
        raise ValueError(f'expected octal permission digits as a string like "0660", got {v!r}')
    if int(digits, 8) > 0o777:
        raise ValueError(f"expected permission bits only (at most 0777), got {v!r}")
    return s


def _group(v: Any) -> str | int:
    """A group name or a numeric gid (resolved when the socket is created)."""
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    if isinstance(v, str) and v.strip():
        return v.strip()
    raise ValueError(f"expected a group name or a gid, got {v!r}")


CLAMD_LISTENER_KEYS: dict[str, Checker] = {
    "listen": _listen,
    "unix_socket": _str,
    "unix_socket_mode": _socket_mode,
    "unix_socket_group": _group,
    "allowed_paths": _str_list,
    "stream_max_length": _size,
    "max_connections": _pos_int,
    "idle_timeout": _seconds,
    "max_fds": _pos_int,
    "max_fds_per_connection": _pos_int,
    "max_sessions": _pos_int,
    "max_sessions_per_client": _pos_int,
    "allow_reload": _bool,
}
QMAIL_KEYS: dict[str, Checker] = {
    "real_queue": _str,
    "reject_virus": _bool,
    "reject_on_error": _bool,
}
SERVE_KEYS: dict[str, Checker] = {
    "workers": _pos_int,
    "drain_timeout": _seconds,
}

#: Sections that are single tables: name → key schema.
SECTIONS: dict[str, dict[str, Checker]] = {
    "scan": SCAN_KEYS,
    "limits": LIMIT_KEYS,
    "policy": POLICY_KEYS,
    "quarantine": QUARANTINE_KEYS,
    "log": LOG_KEYS,
    "milter": MILTER_KEYS,
    "icap": ICAP_KEYS,
    "http": HTTP_KEYS,
    "clamd_listener": CLAMD_LISTENER_KEYS,
    "qmail": QMAIL_KEYS,
    "serve": SERVE_KEYS,
}
FRONTEND_SECTIONS = ("smtp", "milter", "icap", "http", "clamd_listener")

DEFAULT_SMTP_LISTENER = {"name": "smtp", "listen": "127.0.0.1:10025",
                         "next_hop": "127.0.0.1:10026", "direction": "inbound"}
DEFAULT_FRONTENDS: dict[str, dict[str, Any]] = {
    "milter": {"listen": "127.0.0.1:7357"},
    "icap": {"listen": "127.0.0.1:1344", "service": "avscan"},
    "http": {"listen": "127.0.0.1:8080"},
    "clamd_listener": {"listen": "127.0.0.1:3311"},
}


@dataclass(frozen=True)
class ScanSettings:
    mode: str = "first_infected"
    cache: bool = True
    cache_size: int = 10_000
    spool_memory: int = 1 << 20
    spool_dir: str | None = None
    workers: int = 0  # scan worker processes; 0: one per core
    worker_memory: int = DEFAULT_WORKER_MEMORY  # address-space cap of each scan worker


@dataclass(frozen=True)
class Config:
    """The effective configuration. Front-end sections are ``None`` when disabled."""

    scan: ScanSettings = field(default_factory=ScanSettings)
    limits: Limits = field(default_factory=Limits)
    engines: tuple[dict[str, Any], ...] = ({"type": "embedded", "name": "embedded"},)
    policy: dict[str, Any] = field(default_factory=dict)
    quarantine: dict[str, Any] = field(default_factory=lambda: {"path": "./var/quarantine"})
    log: dict[str, Any] = field(default_factory=lambda: {"level": "info"})
    smtp_listeners: tuple[dict[str, Any], ...] = ()
    milter: dict[str, Any] | None = None
    icap: dict[str, Any] | None = None
    http: dict[str, Any] | None = None
    clamd_listener: dict[str, Any] | None = None
    qmail: dict[str, Any] = field(default_factory=dict)
    serve: dict[str, Any] = field(default_factory=dict)
    source: str | None = None  # path of the file, None for built-in defaults
    base_dir: str = "."

    @property
    def quarantine_path(self) -> str:
        return str(Path(self.base_dir, self.quarantine.get("path", "./var/quarantine")))

    def to_dict(self) -> dict[str, Any]:
        """The effective config as plain data (for ``config show``)."""
        d: dict[str, Any] = {
            "scan": {k: v for k, v in vars(self.scan).items() if v is not None},
            "limits": {f: getattr(self.limits, f) for f in LIMIT_KEYS},
            "engines": [dict(e) for e in self.engines],
            "policy": dict(self.policy),
            "quarantine": dict(self.quarantine),
            "log": dict(self.log),
        }
        if self.smtp_listeners:
            d["smtp"] = {"listeners": [dict(x) for x in self.smtp_listeners]}
        for name in ("milter", "icap", "http", "clamd_listener"):
            v = getattr(self, name)
            if v is not None:
                d[name] = dict(v)
        if self.qmail:
            d["qmail"] = dict(self.qmail)
        if self.serve:
            d["serve"] = dict(self.serve)
        return d


# -- locating keys in the source text (tomllib gives no positions) --------------------------
_HEADER_RE = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")
_KEY_RE = re.compile(r"^\s*([A-Za-z0-9_\-\"']+(?:\s*\.\s*[A-Za-z0-9_\-\"']+)*)\s*=")


class _Locator:
    """Maps a key path like ``engines[1].servers`` to its line number in the TOML text."""

    def __init__(self, text: str) -> None:
        self.lines: dict[str, int] = {}
        counts: dict[str, int] = {}
        table = ""
        for lineno, line in enumerate(text.splitlines(), 1):
            m = _HEADER_RE.match(line)
            if m:
                name = m.group(2).replace('"', "").replace("'", "").replace(" ", "")
                if m.group(1) == "[[":
                    idx = counts.get(name, 0)
                    counts[name] = idx + 1
                    # nested arrays of tables: index the last component
                    table = f"{self._indexed_parent(name, counts)}[{idx}]"
                else:
                    table = self._indexed_parent(name, counts)
                self.lines.setdefault(table, lineno)
                continue
            k = _KEY_RE.match(line)
            if k:
                key = k.group(1).replace('"', "").replace("'", "").replace(" ", "")
                path = f"{table}.{key}" if table else key
                self.lines.setdefault(path, lineno)

    @staticmethod
    def _indexed_parent(name: str, counts: dict[str, int]) -> str:
        # "policy.rules" under the n-th [[policy]]? Not used; but "smtp.listeners" stays as is.
        parts = name.split(".")
        out: list[str] = []
        for i, p in enumerate(parts):
            out.append(p)
            prefix = ".".join(parts[: i + 1])
            if i < len(parts) - 1 and prefix in counts:
                out[-1] = f"{p}[{counts[prefix] - 1}]"
        return ".".join(out)

    def where(self, path: str) -> str:
        probe = path
        while probe:
            if probe in self.lines:
                return f" (line {self.lines[probe]})"
            probe = probe.rpartition(".")[0]
        return ""


# -- loading --------------------------------------------------------------------------------
def resolve_path(cli_path: str | os.PathLike[str] | None) -> str | None:
    """The config file to use: --config, else $AVGATE_CONFIG, else None (built-in defaults)."""
    if cli_path:
        return os.fspath(cli_path)
    env = os.environ.get(ENV_VAR)
    return env or None


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate the config (see :func:`resolve_path`); raise ConfigError."""
    resolved = resolve_path(path)
    if resolved is None:
        return defaults()
    try:
        text = Path(resolved).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{resolved}: cannot read config file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{resolved}: config file is not UTF-8: {exc}") from exc
    return loads(text, source=resolved)


def defaults() -> Config:
    """Built-in defaults: embedded engine, every front-end on its default loopback listener."""
    fe = {k: dict(v) for k, v in DEFAULT_FRONTENDS.items()}
    return Config(smtp_listeners=(dict(DEFAULT_SMTP_LISTENER),), milter=fe["milter"],
                  icap=fe["icap"], http=fe["http"], clamd_listener=fe["clamd_listener"])


def loads(text: str, source: str | None = None) -> Config:
    """Parse and validate TOML text."""
    label = source or "<config>"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: invalid TOML: {exc}") from exc
    base_dir = str(Path(source).resolve().parent) if source else "."
    return from_dict(data, source=source, base_dir=base_dir, locator=_Locator(text))


def from_dict(data: Mapping[str, Any], *, source: str | None = None, base_dir: str = ".",
              locator: _Locator | None = None) -> Config:
    """Validate a parsed config mapping; every problem is reported, not just the first."""
    loc = locator or _Locator("")
    label = source or "<config>"
    problems: list[str] = []

    def problem(path: str, msg: str) -> None:
        problems.append(f"{label}: {path}{loc.where(path)}: {msg}")

    def check_table(section: str, table: Any, schema: dict[str, Checker]) -> dict[str, Any]:
        try:
            table = _table(table)
        except ValueError as exc:
            problem(section, str(exc))
            return {}
        out: dict[str, Any] = {}
        for key, value in table.items():
            checker = schema.get(key)
            if checker is None:
                problem(f"{section}.{key}",
                        f"unknown key (known: {', '.join(sorted(schema))})")
                continue
            try:
                out[key] = checker(value)
            except ValueError as exc:
                problem(f"{section}.{key}", str(exc))
        return out

    known = set(SECTIONS) | {"engines", "smtp"}
    for key in data:
        if key not in known:
            problem(key, f"unknown section (known: {', '.join(sorted(known))})")

    sections = {name: check_table(name, data[name], schema)
                for name, schema in SECTIONS.items() if name in data}

    scan = ScanSettings(**sections.get("scan", {}))
    limits = Limits()
    if "limits" in sections:
        try:
            limits = Limits(**sections["limits"])
        except ValueError as exc:
            problem("limits", str(exc))

    engines: list[dict[str, Any]] = []
    raw_engines = data.get("engines", [{"type": "embedded"}])
    if not isinstance(raw_engines, list) or not raw_engines:
        problem("engines", "expected one or more [[engines]] tables")
        raw_engines = []
    for i, table in enumerate(raw_engines):
        path = f"engines[{i}]"
        if not isinstance(table, dict):
            problem(path, "expected a table")
            continue
        engines.append(_check_engine(table, path, problem))
    names = [e.get("name") for e in engines]
    for n in {n for n in names if names.count(n) > 1}:
        problem("engines", f"engine name {n!r} used more than once (set distinct `name`s)")

    smtp_listeners: list[dict[str, Any]] = []
    if "smtp" in data:
        smtp = data["smtp"]
        if not isinstance(smtp, dict) or set(smtp) - {"listeners"}:
            problem("smtp", "expected only [[smtp.listeners]] tables")
        else:
            listeners = smtp.get("listeners", [])
            if not isinstance(listeners, list):
                problem("smtp.listeners", "expected [[smtp.listeners]] tables")
                listeners = []
            for i, table in enumerate(listeners):
                entry = check_table(f"smtp.listeners[{i}]", table, SMTP_LISTENER_KEYS)
                entry = {**DEFAULT_SMTP_LISTENER, **{"name": f"smtp{i}" if i else "smtp"},
                         **entry}
                smtp_listeners.append(entry)
            lnames = [x["name"] for x in smtp_listeners]
            for n in {n for n in lnames if lnames.count(n) > 1}:
                problem("smtp.listeners", f"listener name {n!r} used more than once")

    frontends = {name: ({**DEFAULT_FRONTENDS[name], **sections[name]}
                        if name in sections else None)
                 for name in DEFAULT_FRONTENDS}

    if "policy" in sections:
        _check_policy(sections["policy"], problem)

    if problems:
        raise ConfigError(problems)
    return Config(
        scan=scan,
        limits=limits,
        engines=tuple(engines),
        policy=sections.get("policy", {}),
        quarantine={"path": "./var/quarantine", **sections.get("quarantine", {})},
        log={"level": "info", **sections.get("log", {})},
        smtp_listeners=tuple(smtp_listeners),
        qmail=sections.get("qmail", {}),
        serve=sections.get("serve", {}),
        source=source,
        base_dir=base_dir,
        milter=frontends["milter"],
        icap=frontends["icap"],
        http=frontends["http"],
        clamd_listener=frontends["clamd_listener"],
    )


def _check_engine(table: dict[str, Any], path: str,
                  problem: Callable[[str, str], None]) -> dict[str, Any]:
    """Check an engine table against its class's config keys (the class validates values)."""
    from .engines.base import registry  # engines import config-free modules only

    etype = table.get("type", "embedded")
    entry = dict(table)
    entry.setdefault("type", etype)
    if etype not in registry:
        problem(f"{path}.type", f"unknown engine type {etype!r} "
                                f"(known: {', '.join(sorted(registry))})")
        return entry
    entry.setdefault("name", etype if path == "engines[0]" else f"{etype}{path[8:-1]}")
    if not isinstance(entry.get("name"), str):
        problem(f"{path}.name", "expected a string")
    try:
        from .engines.base import engine_class

        cls = engine_class(etype)
    except ImportError as exc:
        problem(f"{path}.type", f"engine {etype!r} is not available: {exc}")
        return entry
    except ConfigError as exc:
        problem(f"{path}.type", str(exc))
        return entry
    for key in sorted(set(table) - {"type", "name"} - cls.config_keys):
        problem(f"{path}.{key}",
                f"unknown key for a {etype} engine "
                f"(known: {', '.join(sorted(cls.config_keys | {'type', 'name'}))})")
    # deeper checks (values) happen in from_config; run it without starting anything
    from .engines.base import EngineContext

    try:
        cls.from_config({k: v for k, v in entry.items() if k in cls.config_keys or
                         k in ("type", "name")}, EngineContext())
    except ConfigError as exc:
        for p in exc.problems:
            problem(path, p)
    return entry


def _check_policy(policy: dict[str, Any], problem: Callable[[str, str], None]) -> None:
    """Policy rules are validated by avgate.policy when it is available."""
    try:
        from . import policy as policy_mod
    except ImportError:
        return
    validate = getattr(policy_mod, "validate", None)
    if validate is None:
        return
    for path, msg in validate(policy):
        problem(path, msg)


def render_toml(data: Mapping[str, Any]) -> str:
    """Render the effective config as TOML (enough for the shapes we produce)."""
    lines: list[str] = []

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list | tuple):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {scalar(x)}" for k, x in v.items()) + " }"
        return scalar(str(v))

    def table(name: str, t: Mapping[str, Any], array: bool = False) -> None:
        simple = {k: v for k, v in t.items()
                  if not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))}
        nested = {k: v for k, v in t.items() if k not in simple}
        lines.append(f"[[{name}]]" if array else f"[{name}]")
        lines.extend(f"{k} = {scalar(v)}" for k, v in simple.items())
        lines.append("")
        for k, arr in nested.items():
            for item in arr:
                table(f"{name}.{k}", item, array=True)

    for name, value in data.items():
        if isinstance(value, list):
            for item in value:
                table(name, item, array=True)
        elif isinstance(value, dict):
            if name == "smtp":
                for item in value.get("listeners", []):
                    table("smtp.listeners", item, array=True)
            else:
                table(name, value)
    return "\n".join(lines)
