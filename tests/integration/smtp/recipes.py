"""The Postfix recipes of README.md, read from the README itself (tests use exactly what a
user copies): the fenced blocks of one section by their info string (``toml`` — avgate's
config, ``main.cf``, ``master.cf``) and master.cf entries split into services."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parents[3] / "README.md"
AFTER_QUEUE = "Postfix after-queue"
BEFORE_QUEUE = "Postfix before-queue"


def section(heading: str) -> str:
    """The text of the README section whose heading starts with ``heading``."""
    out: list[str] = []
    inside = fenced = False
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif line.startswith("#") and not fenced:
            inside = line.lstrip("#").strip().startswith(heading)
            continue
        if inside:
            out.append(line)
    assert out, f"README has no section {heading!r}"
    return "\n".join(out) + "\n"


def blocks(heading: str) -> dict[str, str]:
    """The fenced blocks of a section, by info string (one block per kind)."""
    found: dict[str, str] = {}
    kind: str | None = None
    body: list[str] = []
    for line in section(heading).splitlines():
        if line.startswith("```"):
            if kind is None:
                kind, body = line[3:].strip(), []
            else:
                assert kind not in found, f"{heading}: two {kind} blocks"
                found[kind] = "\n".join(body) + "\n"
                kind = None
        elif kind is not None:
            body.append(line)
    return found


def avgate_config(heading: str) -> dict[str, Any]:
    return tomllib.loads(blocks(heading)["toml"])


def main_cf(heading: str) -> dict[str, str]:
    lines = [x for x in blocks(heading).get("main.cf", "").splitlines() if x.strip()]
    return {k.strip(): v.strip() for k, _, v in (x.partition("=") for x in lines)}


@dataclass
class Service:
    """One master.cf entry: its service line, its ``-o name=value`` options, its text."""

    line: str
    options: dict[str, str]
    text: str

    @property
    def name(self) -> str:
        return self.line.split()[0]


def master_cf(heading: str) -> list[Service]:
    services: list[Service] = []
    for line in blocks(heading)["master.cf"].splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            services.append(Service(line, {}, line + "\n"))
            continue
        words = line.split()
        assert words[0] == "-o" and len(words) == 2, line
        name, _, value = words[1].partition("=")
        services[-1].options[name] = value
        services[-1].text += line + "\n"
    return services
