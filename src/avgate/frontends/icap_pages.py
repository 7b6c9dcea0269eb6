"""The HTML pages the ICAP server answers with (inside an HTTP 403 or 503)."""

from __future__ import annotations

import html
from pathlib import Path

from ..errors import ConfigError

DEFAULT_BLOCK_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Blocked: virus found</title></head>
<body><h1>Access denied: virus found</h1>
<p>The object <code>{url}</code> contains the virus <strong>{virus}</strong>
and was blocked by avgate.</p></body></html>
"""
UNAVAILABLE_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Virus scanner unavailable</title></head>
<body><h1>Virus scanner unavailable</h1>
<p>The object <code>{url}</code> could not be scanned ({reason}).
Please try again later.</p></body></html>
"""
REFUSED_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Blocked</title></head>
<body><h1>Access denied</h1>
<p>The object <code>{url}</code> was blocked by avgate ({reason}).</p></body></html>
"""



def render(template: str, **values: str) -> bytes:
    """``template`` with ``{key}`` replaced by each HTML-escaped value."""
    # str.replace, not str.format: a page's CSS braces must not be taken for fields
    out = template
    for key, value in values.items():
        out = out.replace("{" + key + "}", html.escape(value))
    return out.encode("utf-8")


def read_block_page(path: str | None, base_dir: str) -> str:
    """``[icap] block_page``: the template file (relative to the config file's directory),
    or :data:`DEFAULT_BLOCK_PAGE`; ``ConfigError`` when it cannot be read."""
    if not path:
        return DEFAULT_BLOCK_PAGE
    where = Path(base_dir, path)
    try:
        return where.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"icap: block_page: cannot read {where}: {exc.strerror}") from exc
