"""The dashboard's numbers, read from the tail of the scan log, and its charts as SVG.

Only the last ``TAIL`` bytes of ``[log] path`` are read (in a thread): on a busy gateway that
covers the last hours rather than 14 days, and the page says what it covers. Without a log
file there are no numbers (the page says so). The SVG is built here from numbers only, each
label escaped; no script, no remote font.
"""

from __future__ import annotations

import html
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

TAIL = 16 * 1024 * 1024
SERIES = ("scans", "infected", "skipped/unknown", "errors")


@dataclass
class Dashboard:
    source: str  # what was read, for the page
    hours: list[tuple[str, dict[str, int]]] = field(default_factory=list)  # last 24 h
    days: list[tuple[str, dict[str, int]]] = field(default_factory=list)  # last 14 days
    top: list[tuple[str, int]] = field(default_factory=list)
    mean_ms: float | None = None
    first: str = ""  # the oldest line read
    hours_svg: str = ""
    days_svg: str = ""


def _bucket(status: str) -> str | None:
    return {"infected": "infected", "skipped": "skipped/unknown", "unknown": "skipped/unknown",
            "error": "errors"}.get(status)


def dashboard_data(path: str | None, now: float) -> Dashboard:
    if not path or not os.path.isfile(path):
        return Dashboard(source="no scan log file ([log] path) — no numbers to show")
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - TAIL))
        data = f.read(TAIL)
    if size > TAIL:
        data = data[data.find(b"\n") + 1:]  # from the first whole line
    now_dt = datetime.fromtimestamp(now, UTC)
    hour_keys = [(now_dt.timestamp() - h * 3600) for h in range(23, -1, -1)]
    hours = {datetime.fromtimestamp(t, UTC).strftime("%d %H:00"): Counter[str]()
             for t in hour_keys}
    day_keys = [(now_dt.timestamp() - d * 86400) for d in range(13, -1, -1)]
    days = {datetime.fromtimestamp(t, UTC).strftime("%m-%d"): Counter[str]() for t in day_keys}
    top: Counter[str] = Counter()
    elapsed: list[float] = []
    first = ""
    for line in data.splitlines():
        if b'"event":"scan"' not in line:
            continue
        try:
            e = json.loads(line)
            when = datetime.fromisoformat(str(e["time"]).replace("Z", "+00:00"))
        except (ValueError, KeyError, TypeError):
            continue
        first = first or when.strftime("%Y-%m-%d %H:%M UTC")
        status = str(e.get("status", ""))
        for table, key in ((hours, when.strftime("%d %H:00")), (days, when.strftime("%m-%d"))):
            counts = table.get(key)
            if counts is not None:
                counts["scans"] += 1
                bucket = _bucket(status)
                if bucket:
                    counts[bucket] += 1
        for finding in e.get("findings") or ():
            if isinstance(finding, dict) and finding.get("name"):
                top[str(finding["name"])] += 1
        if isinstance(e.get("elapsed_ms"), int | float):
            elapsed.append(float(e["elapsed_ms"]))
    d = Dashboard(source=f"the last {min(size, TAIL) // 1024} KiB of {path}",
                  hours=[(k, dict(v)) for k, v in hours.items()],
                  days=[(k, dict(v)) for k, v in days.items()],
                  top=top.most_common(10),
                  mean_ms=round(sum(elapsed) / len(elapsed), 1) if elapsed else None,
                  first=first)
    d.hours_svg = bar_chart(d.hours, "per hour (UTC)")
    d.days_svg = bar_chart(d.days, "per day (UTC)")
    return d


_COLOURS = {"scans": "#8aa4c8", "infected": "#c0392b", "skipped/unknown": "#d68910",
            "errors": "#6c3483"}


def bar_chart(buckets: list[tuple[str, dict[str, int]]], title: str) -> str:
    """Grouped bars, one group per bucket, one bar per series; labels every few groups."""
    width, height, left, bottom, top_pad = 720, 220, 40, 40, 24
    n = max(1, len(buckets))
    group = (width - left - 10) / n
    bar = max(1.0, group / (len(SERIES) + 1))
    peak = max([v.get(s, 0) for _, v in buckets for s in SERIES] + [1])
    scale = (height - bottom - top_pad) / peak
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
           f'role="img" aria-label="{html.escape(title)}">',
           f'<text x="{left}" y="16" font-size="13">{html.escape(title)} — peak {peak}</text>']
    base = height - bottom
    out.append(f'<line x1="{left}" y1="{base}" x2="{width - 10}" y2="{base}" stroke="#555"/>')
    every = max(1, n // 8)
    for i, (label, values) in enumerate(buckets):
        x0 = left + i * group
        for j, series in enumerate(SERIES):
            h = values.get(series, 0) * scale
            out.append(f'<rect x="{x0 + j * bar:.1f}" y="{base - h:.1f}" width="{bar:.1f}" '
                       f'height="{h:.1f}" fill="{_COLOURS[series]}">'
                       f'<title>{html.escape(label)} {series}: {values.get(series, 0)}'
                       f'</title></rect>')
        if i % every == 0:
            out.append(f'<text x="{x0:.1f}" y="{base + 14}" font-size="10">'
                       f'{html.escape(label)}</text>')
    for j, series in enumerate(SERIES):
        out.append(f'<rect x="{left + j * 150}" y="{height - 14}" width="10" height="10" '
                   f'fill="{_COLOURS[series]}"/><text x="{left + j * 150 + 14}" '
                   f'y="{height - 5}" font-size="11">{series}</text>')
    out.append("</svg>")
    return "".join(out)
