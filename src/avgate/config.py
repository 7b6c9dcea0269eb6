"""Configuration: one TOML file → one frozen :class:`Config` of typed sections.

Source: ``--config FILE``, else ``$AVGATE_CONFIG``, else built-in defaults. Without a file
every front-end runs on its default loopback listener; with a file a front-end runs only if
its section is present.

Each section is a :class:`avgate.settings.Section` declared beside the code it configures
(:data:`SECTIONS` says where); this module reads the TOML, builds every section (importing
a section's module only when the section is used) and turns every validation problem into a
``file: key (line N): message`` line. Consumers get typed settings, never dicts.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from .errors import ConfigError

if TYPE_CHECKING:
    from .banned import BannedSettings
    from .engines.base import EngineSettings
    from .engines.clamavdb import UpdateSettings
    from .frontends.clamd import ClamdListenerSettings
    from .frontends.ftp import FtpProxySettings
    from .frontends.http import HttpSettings
    from .frontends.http_proxy import HttpProxySettings
    from .frontends.icap import IcapSettings
    from .frontends.imap import ImapProxySettings
    from .frontends.milter import MilterSettings
    from .frontends.pop3 import Pop3ProxySettings
    from .frontends.qmail import QmailSettings
    from .frontends.smtp import SmtpListenerSettings
    from .limits import Limits
    from .notify import NotifySettings
    from .observability import LogSettings
    from .policy import PolicySettings
    from .quarantine.store import QuarantineSettings
    from .scan import ScanSettings
    from .serve import ServeSettings

ENV_VAR = "AVGATE_CONFIG"

#: section name → the settings class, beside the code it configures
SECTIONS: dict[str, str] = {
    "scan": "avgate.scan:ScanSettings",
    "limits": "avgate.limits:Limits",
    "policy": "avgate.policy:PolicySettings",
    "banned": "avgate.banned:BannedSettings",
    "notify": "avgate.notify:NotifySettings",
    "update": "avgate.engines.clamavdb:UpdateSettings",
    "quarantine": "avgate.quarantine.store:QuarantineSettings",
    "log": "avgate.observability:LogSettings",
    "serve": "avgate.serve:ServeSettings",
    "qmail": "avgate.frontends.qmail:QmailSettings",
    "milter": "avgate.frontends.milter:MilterSettings",
    "icap": "avgate.frontends.icap:IcapSettings",
    "http": "avgate.frontends.http:HttpSettings",
    "clamd_listener": "avgate.frontends.clamd:ClamdListenerSettings",
    "http_proxy": "avgate.frontends.http_proxy:HttpProxySettings",
    "pop3_proxy": "avgate.frontends.pop3:Pop3ProxySettings",
    "imap_proxy": "avgate.frontends.imap:ImapProxySettings",
    "ftp_proxy": "avgate.frontends.ftp:FtpProxySettings",
}
SMTP_LISTENER = "avgate.frontends.smtp:SmtpListenerSettings"
#: front-ends configured by one table each; ``None`` in :class:`Config` when disabled
SINGLE_FRONTENDS = ("milter", "icap", "http", "clamd_listener", "http_proxy", "pop3_proxy",
                    "imap_proxy", "ftp_proxy")
#: the front-ends that run without a config file (the mail proxies need an upstream server;
#: the HTTP proxy's upstream is the web)
DEFAULT_FRONTENDS = ("milter", "icap", "http", "clamd_listener", "http_proxy")


def section_class(name: str) -> type[BaseModel]:
    """The settings class of section ``name`` (imported on first use)."""
    target = SMTP_LISTENER if name == "smtp.listeners" else SECTIONS[name]
    module, _, cls = target.partition(":")
    found: type[BaseModel] = getattr(importlib.import_module(module), cls)
    return found


def _default(name: str) -> Callable[[], Any]:
    return lambda: section_class(name)()


@dataclass(frozen=True)
class Config:
    """The effective configuration. Front-end sections are ``None`` when disabled."""

    scan: ScanSettings = field(default_factory=_default("scan"))
    limits: Limits = field(default_factory=_default("limits"))
    engines: tuple[EngineSettings, ...] = field(default_factory=lambda: (_engine_default(),))
    policy: PolicySettings = field(default_factory=_default("policy"))
    banned: BannedSettings = field(default_factory=_default("banned"))
    notify: NotifySettings = field(default_factory=_default("notify"))
    update: UpdateSettings = field(default_factory=_default("update"))
    quarantine: QuarantineSettings = field(default_factory=_default("quarantine"))
    log: LogSettings = field(default_factory=_default("log"))
    serve: ServeSettings = field(default_factory=_default("serve"))
    qmail: QmailSettings = field(default_factory=_default("qmail"))
    smtp_listeners: tuple[SmtpListenerSettings, ...] = ()
    milter: MilterSettings | None = None
    icap: IcapSettings | None = None
    http: HttpSettings | None = None
    clamd_listener: ClamdListenerSettings | None = None
    http_proxy: HttpProxySettings | None = None
    pop3_proxy: Pop3ProxySettings | None = None
    imap_proxy: ImapProxySettings | None = None
    ftp_proxy: FtpProxySettings | None = None
    source: str | None = None  # path of the file, None for built-in defaults
    base_dir: str = "."

    @property
    def quarantine_path(self) -> str:
        return str(Path(self.base_dir, self.quarantine.path))

    def to_dict(self) -> dict[str, Any]:
        """The effective config as plain data, defaults included (for ``config show``)."""
        def dump(model: BaseModel) -> dict[str, Any]:
            data: dict[str, Any] = model.model_dump(mode="json", exclude_none=True)
            return data

        d: dict[str, Any] = {name: dump(getattr(self, name)) for name in
                             ("scan", "limits")}
        d["engines"] = [dump(e) for e in self.engines]
        d.update({name: dump(getattr(self, name))
                  for name in ("policy", "banned", "notify", "update", "quarantine", "log",
                               "serve", "qmail")})
        if self.smtp_listeners:
            d["smtp"] = {"listeners": [dump(x) for x in self.smtp_listeners]}
        for name in SINGLE_FRONTENDS:
            value = getattr(self, name)
            if value is not None:
                d[name] = dump(value)
        return d


def _engine_default() -> EngineSettings:
    from .engines.base import engine_class

    settings: EngineSettings = engine_class("embedded").Settings(type="embedded",
                                                                 name="embedded")
    return settings


# -- locating keys in the source text (tomllib gives no positions) --------------------------
_HEADER_RE = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")
_KEY_RE = re.compile(r"^\s*([A-Za-z0-9_\-\"']+(?:\s*\.\s*[A-Za-z0-9_\-\"']+)*)\s*=")


class _Locator:
    """Maps a key path like ``engines[1].servers`` to its line number in the TOML text.

    Only ``config check`` messages use it: the line where a key (or its table) is written.
    """

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
            shorter = re.sub(r"(\[\d+\]|\.[^.\[]*)$", "", probe)
            if shorter == probe:
                break
            probe = shorter
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
    frontends: dict[str, Any] = {name: section_class(name)() for name in DEFAULT_FRONTENDS}
    smtp: Any = section_class("smtp.listeners")()
    return Config(smtp_listeners=(smtp,), **frontends)


def loads(text: str, source: str | None = None) -> Config:
    """Parse and validate TOML text."""
    label = source or "<config>"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: invalid TOML: {exc}") from exc
    base_dir = str(Path(source).resolve().parent) if source else "."
    return from_dict(data, source=source, base_dir=base_dir, locator=_Locator(text))


def _loc(path: str, loc: tuple[int | str, ...]) -> str:
    out = path
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part and not part.startswith(("function-", "tagged-union")):
            out += f".{part}" if out else part
    return out


def _message(error: Mapping[str, Any], model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        known = _fields_at(model, loc[:-1])
        return f"unknown key (known: {', '.join(sorted(known))})" if known else "unknown key"
    if kind == "missing":
        return "missing: this key is required"
    msg = str(error.get("msg", "invalid value"))
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    if kind not in ("value_error", "assertion_error") and "input" in error:
        value = error["input"]
        if not isinstance(value, dict | list):
            msg += f", got {value!r}"
    return msg


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the (nested) model at ``loc`` inside ``model``, if it is one."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        info = getattr(current, "model_fields", {}).get(part)
        if info is None:
            return []
        current = _model_of(info.annotation)
    return list(getattr(current, "model_fields", {}))


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def from_dict(data: Mapping[str, Any], *, source: str | None = None, base_dir: str = ".",
              locator: _Locator | None = None) -> Config:
    """Validate a parsed config mapping; every problem is reported, not just the first."""
    loc = locator or _Locator("")
    label = source or "<config>"
    problems: list[str] = []

    def problem(path: str, msg: str) -> None:
        problems.append(f"{label}: {path}{loc.where(path)}: {msg}")

    def build(path: str, model: type[BaseModel], table: Any) -> Any:
        if not isinstance(table, dict):
            problem(path, f"expected a table, got {_tname(table)}")
            return None
        try:
            return model.model_validate(table)
        except ValidationError as exc:
            for error in exc.errors():
                where = tuple(error.get("loc", ()))
                problem(_loc(path, where), _message(error, model, where))
            return None

    known = set(SECTIONS) | {"engines", "smtp"}
    for key in data:
        if key not in known:
            problem(key, f"unknown section (known: {', '.join(sorted(known))})")

    sections: dict[str, Any] = {}
    for name in SECTIONS:
        if name in data:
            built = build(name, section_class(name), data[name])
            if built is not None:
                sections[name] = built

    engines = tuple(e for e in _engines(data, build, problem) if e is not None)
    names = [e.name for e in engines]
    for n in sorted({n for n in names if names.count(n) > 1}):
        problem("engines", f"engine name {n!r} used more than once (set distinct `name`s)")

    smtp_listeners: list[Any] = []
    if "smtp" in data:
        smtp = data["smtp"]
        if not isinstance(smtp, dict) or set(smtp) - {"listeners"}:
            problem("smtp", "expected only [[smtp.listeners]] tables")
        elif not isinstance(smtp.get("listeners", []), list):
            problem("smtp.listeners", "expected [[smtp.listeners]] tables")
        else:
            model = section_class("smtp.listeners")
            for i, table in enumerate(smtp.get("listeners", [])):
                if isinstance(table, dict):
                    table = {"name": f"smtp{i}" if i else "smtp", **table}
                built = build(f"smtp.listeners[{i}]", model, table)
                if built is not None:
                    smtp_listeners.append(built)
            lnames = [x.name for x in smtp_listeners]
            for n in sorted({n for n in lnames if lnames.count(n) > 1}):
                problem("smtp.listeners", f"listener name {n!r} used more than once")

    if problems:
        raise ConfigError(problems)
    return Config(engines=engines or (_engine_default(),), smtp_listeners=tuple(smtp_listeners),
                  source=source, base_dir=base_dir, **sections)


def _engines(data: Mapping[str, Any], build: Callable[[str, type[BaseModel], Any], Any],
             problem: Callable[[str, str], None]) -> list[Any]:
    from .engines.base import engine_class, registry

    raw = data.get("engines", [{"type": "embedded"}])
    if not isinstance(raw, list) or not raw:
        problem("engines", "expected one or more [[engines]] tables")
        return []
    out = []
    for i, table in enumerate(raw):
        path = f"engines[{i}]"
        if not isinstance(table, dict):
            problem(path, f"expected a table, got {_tname(table)}")
            continue
        etype = table.get("type", "embedded")
        if etype not in registry:
            problem(f"{path}.type", f"unknown engine type {etype!r} "
                                    f"(known: {', '.join(sorted(registry))})")
            continue
        try:
            cls = engine_class(etype)
        except ImportError as exc:
            problem(f"{path}.type", f"engine {etype!r} is not available: {exc}")
            continue
        name = etype if i == 0 else f"{etype}{i}"
        out.append(build(path, cls.Settings, {"type": etype, "name": name, **table}))
    return out


def _tname(v: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            list: "an array", dict: "a table"}.get(type(v), type(v).__name__)


def render_toml(data: Mapping[str, Any]) -> str:
    """Render the effective config as TOML (enough for the shapes we produce)."""
    lines: list[str] = []

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            # JSON's string escapes are valid TOML; TOML also wants DEL escaped
            return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
        if isinstance(v, list | tuple):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{key(k)} = {scalar(x)}" for k, x in v.items()) + " }"
        return scalar(str(v))

    def key(k: str) -> str:
        return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else scalar(k)

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
