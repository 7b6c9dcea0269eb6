"""A quarantined message as the console shows it: headers, the MIME tree, text parts.

Everything here is text for an escaped template: nothing is rendered as HTML and no part is
fetched from anywhere. The parse is bounded (the caller passes at most ``VIEW_MAX`` bytes;
``MAX_PARTS`` parts, ``TEXT_MAX`` characters of each text part) and runs in a thread.
"""

from __future__ import annotations

import email
import email.policy
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

MAX_PARTS = 200
MAX_HEADERS = 200
TEXT_MAX = 64 * 1024


@dataclass
class PartView:
    path: str  # "1", "1.2", ... (the MIME tree position)
    depth: int
    content_type: str
    filename: str
    size: int
    findings: list[str] = field(default_factory=list)
    text: str | None = None  # a text part's decoded text (truncated), shown escaped
    truncated: bool = False


@dataclass
class MessageView:
    headers: list[tuple[str, str]]
    parts: list[PartView]
    findings: list[dict[str, str]]
    more_parts: bool = False
    problem: str = ""


def _safe(text: str) -> str:
    return "".join(c if c.isprintable() or c in "\n\t" else "\ufffd" for c in text)


def message_view(raw: bytes, result: dict[str, Any]) -> MessageView:
    findings = [f for f in result.get("findings", []) if isinstance(f, dict)]
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    except Exception as exc:  # a hostile message must not break the page
        return MessageView([], [], findings, problem=f"cannot parse: {type(exc).__name__}")
    headers = [(_safe(str(k)), _safe(str(v))) for k, v in list(msg.items())[:MAX_HEADERS]]
    parts: list[PartView] = []
    more = _walk(msg, "1", 0, parts, findings)
    return MessageView(headers, parts, findings, more_parts=more)


def _walk(part: Message, path: str, depth: int, out: list[PartView],
          findings: list[dict[str, str]]) -> bool:
    """Append ``part`` and its children depth-first; True when MAX_PARTS cut the tree."""
    if len(out) >= MAX_PARTS:
        return True
    try:
        filename = _safe(part.get_filename() or "")
    except Exception:
        filename = "(unreadable name)"
    ctype = _safe(part.get_content_type())
    view = PartView(path, depth, ctype, filename, 0)
    out.append(view)
    if part.is_multipart():
        payload = part.get_payload()
        children = payload if isinstance(payload, list) else []
        for i, child in enumerate(children, 1):
            if isinstance(child, Message) and _walk(child, f"{path}.{i}", depth + 1, out,
                                                    findings):
                return True
        return False
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    data = data if isinstance(data, bytes) else b""
    view.size = len(data)
    view.findings = sorted({f.get("name", "") for f in findings
                            if filename and f.get("part", "").endswith(filename)})
    if ctype.startswith("text/"):
        charset = part.get_content_charset() or "utf-8"
        try:
            text = data.decode(charset, "replace")
        except LookupError:
            text = data.decode("utf-8", "replace")
        view.text = _safe(text[:TEXT_MAX])
        view.truncated = len(text) > TEXT_MAX
    return False
