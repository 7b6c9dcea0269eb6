"""BENCHMARKS.md's charts: SVG files drawn with matplotlib from the report's own figures.

    .venv/bin/python bench/charts.py [bench/results/SESSION] [--before SESSION|none]
                                     [--carry SESSION ...] [--out bench/figures]

(bench/report.py calls :func:`write_all` itself; this command line only redraws the charts.)

Files (one set per report, overwritten):
  ``throughput-<group>.svg``  per front-end (smtp, milter, icap, clamd): msg/s and p99 latency
                              against concurrency, avgate's rows beside the peers'
  ``cpu.svg``                 avgate's CPU ms per message per front-end next to the peer's
                              (and avgate's before, when a baseline session is given)
  ``workers.svg``             msg/s against ``[serve] workers`` per front-end and C

The numbers come from bench/report.py's helpers (``row_stats``, ``ratios``,
``frontend_stats``, ``workers_rows``), so a chart shows what the tables say; every point and
bar carries its value as text. The output is deterministic: Agg backend, text kept as SVG
text (``svg.fonttype = none``: no font is embedded or downloaded), a fixed ``svg.hashsalt``
for element ids and no date in the metadata, so regenerating from the same results gives the
same files (diff-friendly).
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, cast

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # (after the backend is chosen)

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report as R

STYLE: dict[str, Any] = {
    "svg.hashsalt": "avgate-bench",  # stable element ids
    "svg.fonttype": "none",  # text stays text: no glyphs embedded, nothing downloaded
    "font.family": "DejaVu Sans",  # ships with matplotlib
    "font.size": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
METADATA = {"Date": None, "Creator": "bench/charts.py"}
TITLES = {"smtp": "SMTP", "milter": "milter", "icap": "ICAP", "clamd": "clamd protocol"}


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="svg", metadata=METADATA, bbox_inches="tight")
    plt.close(fig)
    return path


def _series(recs: list[dict[str, Any]], group: str) -> OrderedDict[str, dict[int, Any]]:
    """label -> C -> row_stats, avgate's labels first (bold in the tables)."""
    keyed: dict[tuple[str, int], list[dict[str, Any]]] = {}
    system: dict[str, str] = {}
    for r in recs:
        if r["group"] != group:
            continue
        keyed.setdefault((r["label"], r["concurrency"]), []).append(r)
        system[r["label"]] = r["system"]
    out: OrderedDict[str, dict[int, Any]] = OrderedDict()
    for label in sorted(system, key=lambda lb: (system[lb] != "avgate", lb)):
        out[label] = {c: R.row_stats(v) for (lb, c), v in sorted(keyed.items()) if lb == label}
    return out


def throughput_chart(data: R.Data, group: str, folder: Path) -> Path | None:
    """msg/s and p99 against C for every system of ``group``."""
    series = _series(data.recs, group)
    if not series:
        return None
    with plt.rc_context(cast(Any, STYLE)):
        fig, (ax_r, ax_p) = plt.subplots(1, 2, figsize=(10, 3.6))
        concs = sorted({c for s in series.values() for c in s})
        for label, points in series.items():
            xs = sorted(points)
            avgate = label.startswith("avgate") or "avgate" in label.split(",")[0]
            kw = {"marker": "o", "linewidth": 2.2 if avgate else 1.2,
                  "linestyle": "-" if avgate else "--", "label": label}
            for ax, key, nd in ((ax_r, "rate", 0), (ax_p, "p99", 1)):
                ys = [points[c][key] for c in xs]
                ax.plot(xs, ys, **kw)
                for x, y in zip(xs, ys, strict=True):
                    ax.annotate(R.fmt(y, nd), (x, y), textcoords="offset points",
                                xytext=(4, 3), fontsize=7)
        for ax, ylabel in ((ax_r, "msg/s (median of runs)"), (ax_p, "p99 latency, ms")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(concs, [str(c) for c in concs])
            ax.minorticks_off()
            ax.set_xlabel("concurrency C")
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0)
        ax_r.set_title(f"{TITLES.get(group, group)}: msg/s vs concurrency")
        ax_p.set_title(f"{TITLES.get(group, group)}: p99 vs concurrency")
        ax_p.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
        fig.suptitle(f"session {data.sources.get(group, data.id)}", fontsize=7, x=0.01,
                     ha="left")
        return _save(fig, folder / f"throughput-{group}.svg")


def cpu_bars(data: R.Data, before: R.Data | None) -> list[dict[str, Any]]:
    """Per front-end at its highest C: avgate after/before and the peer's CPU ms per message
    (ClamSMTP, clamav-milter, c-icap, raw clamd: report.PRIMARY_PEER)."""
    after = R.frontend_stats(data.recs)
    prev = R.frontend_stats(before.recs) if before else {}
    peers = R.ratios(data.recs)
    bars = []
    for (g, tr), name in R.FRONTENDS.items():
        concs = [k[2] for k in after if k[:2] == (g, tr)]
        if not concs:
            continue
        c = max(concs)
        pc = sorted((p["peer_cpu"], p["peer"]) for p in peers
                    if (p["group"], p["transport"], p["c"]) == (g, tr, c)
                    and p["peer_cpu"] is not None and p["peer"] == R.PRIMARY_PEER[g])
        b = prev.get((g, tr, c))
        bars.append({"frontend": f"{name} (C={c})", "after": after[(g, tr, c)]["own_cpu"],
                     "before": b["own_cpu"] if b else None,
                     "peer": pc[0][0] if pc else None, "peer_name": pc[0][1] if pc else ""})
    return bars


def cpu_chart(data: R.Data, before: R.Data | None, folder: Path) -> Path | None:
    bars = cpu_bars(data, before)
    if not bars:
        return None
    kinds = [("before", f"avgate before ({before.id})" if before else "", "#bbbbbb"),
             ("after", "avgate", "#1f77b4"), ("peer", "peer (its own process)", "#ff7f0e")]
    kinds = [k for k in kinds if any(b[k[0]] is not None for b in bars)]
    with plt.rc_context(cast(Any, STYLE)):
        fig, ax = plt.subplots(figsize=(8, 0.55 * len(bars) * len(kinds) + 1))
        h = 0.8 / len(kinds)
        for i, (key, label, color) in enumerate(kinds):
            ys = [j + (i - (len(kinds) - 1) / 2) * h for j in range(len(bars))]
            vals = [b[key] if b[key] is not None else 0.0 for b in bars]
            ax.barh(ys, vals, height=h, color=color, label=label)
            for y, b in zip(ys, bars, strict=True):
                if b[key] is not None:
                    text = R.fmt(b[key], 2) + (f" {b['peer_name']}" if key == "peer" else "")
                    ax.annotate(text, (b[key], y), textcoords="offset points",
                                xytext=(3, -3), fontsize=7)
        ax.set_yticks(range(len(bars)), [b["frontend"] for b in bars])
        ax.invert_yaxis()
        ax.set_xlabel("CPU ms per message (own process tree, median of runs)")
        ax.set_title("CPU per message: avgate vs the peer")
        ax.legend(loc="lower right", fontsize=7)
        return _save(fig, folder / "cpu.svg")


def workers_chart(data: R.Data, extra: list[R.Data], folder: Path) -> Path | None:
    recs = [r for d in [data, *extra] for r in d.recs if r["group"] == "workers"]
    rows = R.workers_rows(recs)
    if not rows:
        return None
    cores = {sid: m.get("machine", {}).get("cores", "?")
             for d in [data, *extra] for sid, m in d.metas.items()}
    lines: OrderedDict[tuple[str, str, int], list[dict[str, Any]]] = OrderedDict()
    for row in rows:
        lines.setdefault((row["session"], row["mode"], row["c"]), []).append(row)
    with plt.rc_context(cast(Any, STYLE)):
        fig, ax = plt.subplots(figsize=(7, 3.8))
        ws = sorted({row["workers"] for row in rows})
        for (sid, mode, c), pts in lines.items():
            pts = sorted(pts, key=lambda p: p["workers"])
            xs, ys = [p["workers"] for p in pts], [p["rate"] for p in pts]
            ax.plot(xs, ys, marker="o", label=f"{mode.upper()} C={c}, {cores.get(sid)} cores")
            for x, y, p in zip(xs, ys, pts, strict=True):
                bad = not R.correct(p) or p["bad"]  # wrong verdicts, leaks, 4xx/errors
                ax.annotate(R.fmt(y, 0) + (" ✗" if bad else ""), (x, y),
                            textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ws, [str(w) for w in ws])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_xlabel("[serve] workers")
        ax.set_ylabel("msg/s")
        ax.set_title("msg/s vs [serve] workers (✗: wrong verdicts or errors in that run)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
        return _save(fig, folder / "workers.svg")


def write_all(data: R.Data, before: R.Data | None, extra: list[R.Data],
              folder: Path) -> list[tuple[str, Path]]:
    """Every chart there is data for; (title, path). Stale charts of ours are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    out: list[tuple[str, Path]] = []
    for group in R.LOAD_GROUPS:
        p = throughput_chart(data, group, folder)
        if p:
            out.append((f"{TITLES[group]}: msg/s and p99 vs concurrency, avgate and peers", p))
    p = cpu_chart(data, before, folder)
    if p:
        out.append(("CPU ms per message per front-end, avgate vs peer", p))
    p = workers_chart(data, extra, folder)
    if p:
        out.append(("msg/s vs [serve] workers", p))
    made = {q for _, q in out}
    for old in [*folder.glob("throughput-*.svg"), folder / "cpu.svg", folder / "workers.svg"]:
        if old.exists() and old not in made:
            old.unlink()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("session", nargs="?", help="bench/results/SESSION (default: newest)")
    ap.add_argument("--before", default=None, help="default: bench/results/BASELINE; 'none'")
    ap.add_argument("--carry", action="append", default=[], metavar="SESSION")
    ap.add_argument("--extra-workers", action="append", default=[], metavar="SESSION")
    ap.add_argument("--out", default=str(R.FIGURES), help="folder (default bench/figures)")
    a = ap.parse_args(argv)
    d = R.session_dir(a.session) if a.session else R.latest_session()
    if d is None:
        print("charts: no bench session found under bench/results", file=sys.stderr)
        return 1
    data = R.carry(R.load(d), [R.load(R.session_dir(s)) for s in a.carry])
    before_id = a.before or R.baseline()
    before = None if before_id in (None, "none") else R.load(R.session_dir(before_id))
    extra = [R.load(R.session_dir(s)) for s in a.extra_workers]
    for title, path in write_all(data, before, extra, Path(a.out)):
        print(f"charts: {path}  ({title})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
