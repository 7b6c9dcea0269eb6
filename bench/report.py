"""Regenerate BENCHMARKS.md (and its charts) from the raw results of bench sessions.

    .venv/bin/python bench/report.py [bench/results/SESSION] [--out BENCHMARKS.md]
        [--before SESSION|none] [--carry SESSION ...] [--extra-workers SESSION ...]
        [--charts bench/figures | --no-charts]

Without a directory the newest session under bench/results/ is used. Input files (all written
by bench/run.py): ``meta.json`` (date, machine, command, groups, notes), ``loadgen.jsonl`` (one
loadgen record per run, tagged with group/system/name/transport/pair/run/serve_workers),
``engines.jsonl`` (bench/engines.py), ``memory.jsonl``, ``workers.jsonl``, ``<script>.out``.

``--before``: the session the before/after table compares with (default: the session named in
``bench/results/BASELINE``; ``none`` for no comparison). ``--carry``: a session (id or
directory; repeatable, first wins) whose sections fill in the groups the main session did not
run (a partial ``--only`` run); by default the sessions the current BENCHMARKS.md names in its
``bench-sources`` line. Every carried section says which session it came from.
``--extra-workers``: a session whose ``workers`` rows are added to the scaling section (e.g.
the 16-core matrix of bench/device/run-matrix.sh). Charts (bench/charts.py, matplotlib) go to
``--charts`` (default ``bench/figures``) and are linked from the Markdown as images.
"""

# ruff: noqa: RUF001  (multiplication signs and en dashes are meant: this writes Markdown)
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BASELINE = RESULTS / "BASELINE"
FIGURES = ROOT / "bench" / "figures"

#: every group of bench/run.py; the load groups' rows live in loadgen.jsonl
GROUPS = ("smtp", "milter", "icap", "clamd", "engines", "http_proxy", "mailproxy", "ftp",
          "decompose", "scaleout", "sigdb", "memory", "workers")
LOAD_GROUPS = ("smtp", "milter", "icap", "clamd")
SCRIPT_GROUPS = ("http_proxy", "mailproxy", "ftp", "decompose", "scaleout", "sigdb")
#: front-end names for (group, transport) of avgate's rows
FRONTENDS = OrderedDict([
    (("smtp", "tcp"), "SMTP"), (("milter", "tcp"), "milter TCP"),
    (("milter", "unix"), "milter unix socket"), (("icap", "tcp"), "ICAP"),
    (("clamd", "unix"), "clamd listener unix"), (("clamd", "tcp"), "clamd listener TCP"),
])

# (group, peer name, transport or None = any, wanted ratio avgate/peer, text)
TARGETS = [
    ("smtp", "clamsmtp", None, 3.0, "SMTP ≥ 3× ClamSMTP"),
    ("smtp", "amavis", None, 15.0, "SMTP ≥ 15× amavisd-new"),
    ("milter", "clamav-milter", "tcp", 1.2, "milter ≥ 1.2× clamav-milter (TCP)"),
    ("milter", "clamav-milter", "unix", 1.2, "milter ≥ 1.2× clamav-milter (unix socket)"),
    ("icap", "c-icap", None, 1.2, "ICAP ≥ 1.2× c-icap"),
    ("clamd", "clamd", "unix", 0.8, "clamd listener ≥ 0.8× raw clamd (unix)"),
    ("clamd", "clamd", "tcp", 0.8, "clamd listener ≥ 0.8× raw clamd (TCP)"),
]
# CPU goals (ms per message, avgate's own process) from the peer kit's measurements
CPU_GOALS = [("smtp", "clamsmtp", 1.4), ("milter", "clamav-milter", 0.7), ("icap", "c-icap", 0.4)]

med = statistics.median


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_session() -> Path | None:
    dirs = sorted(p for p in RESULTS.glob("*") if (p / "meta.json").exists())
    return dirs[-1] if dirs else None


def fmt(v: float | None, nd: int = 1) -> str:
    if v is None:
        return "-"
    if nd == 0 or abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{nd}f}"


def cpu_ms(rs: list[dict[str, Any]], name: str) -> float | None:
    v = [r["cpu_s"][name] * 1000 / r["sent"] for r in rs if name in r.get("cpu_s", {})
         and r["sent"]]
    return med(v) if v else None


def row_stats(rs: list[dict[str, Any]]) -> dict[str, Any]:
    rate = [r["msgs_per_s"] or 0 for r in rs]
    inf_tot = inf_flag = cl_tot = cl_flag = bad = 0
    sink_msgs = sink_expect = leaks = 0
    sink = False
    for r in rs:
        ok_clean = 0
        for kind, d in r["replies"].items():
            n = sum(d.values())
            if kind == "clean":
                cl_tot += n
                cl_flag += r["flagged"].get(kind, 0)
                ok_clean += d.get("2xx", 0)
            else:
                inf_tot += n
                inf_flag += r["flagged"].get(kind, 0)
            bad += d.get("err", 0) + d.get("4xx", 0)
        if r.get("sink_checked") and "sink_delta" in r:
            sink = True
            sd = r["sink_delta"]
            sink_msgs += sd.get("messages", 0)
            sink_expect += ok_clean + r.get("warmup_kinds", {}).get("clean", 0)
            leaks += sd.get("with_eicar", 0) + sd.get("with_marker", 0)
    system = rs[0]["system"]
    own = "avgate" if system == "avgate" else rs[0]["name"]
    return {
        "runs": len(rs), "sent": int(med([r["sent"] for r in rs])),
        "capped": any(r["sent"] < r.get("_n", 10**9) for r in rs),
        "rate": med(rate), "rmin": min(rate), "rmax": max(rate),
        "p50": med([r["lat_ms"]["p50"] for r in rs]), "p99": med([r["lat_ms"]["p99"] for r in rs]),
        "inf": f"{inf_flag}/{inf_tot}", "inf_ok": inf_flag == inf_tot,
        "clean_flagged": cl_flag, "clean_total": cl_tot, "bad": bad,
        "sink": (f"{sink_msgs}/{sink_expect}, {leaks} leaked" if sink else "n/a"),
        "sink_ok": (not sink) or (leaks == 0 and sink_msgs == sink_expect),
        "own_cpu": cpu_ms(rs, own) if own in rs[0].get("cpu_s", {}) else None,
        "clamd_cpu": cpu_ms(rs, "clamd"), "sink_cpu": cpu_ms(rs, "sink"),
        "loadgen_cpu": cpu_ms(rs, "loadgen"),
    }


def section_throughput(recs: list[dict[str, Any]], out: list[str],
                       data: Data | None = None) -> None:
    groups: OrderedDict[tuple[str, str, int], list[dict[str, Any]]] = OrderedDict()
    order = {"smtp": 0, "milter": 1, "icap": 2, "clamd": 3}
    recs = [r for r in recs if r["group"] != "workers"]  # (their own section)
    for r in sorted(recs, key=lambda r: (order.get(r["group"], 9), r["transport"],
                                          r["system"] != "peer", r["label"])):
        groups.setdefault((r["group"], r["label"], r["concurrency"]), []).append(r)
    keys = sorted(groups, key=lambda k: (order.get(k[0], 9), k[2]))
    cur = None
    for key in keys:
        group, label, c = key
        if group != cur:
            cur = group
            out += ["", f"### {group}" + (carried_from(data, group) if data else ""), "",
                    "| system | C | runs | msgs/run | msg/s median (min–max) | p50 ms | p99 ms "
                    "| infected flagged | clean flagged | 4xx/err | sink delivered/expected "
                    "| own CPU ms/msg | clamd CPU ms/msg | loadgen CPU ms/msg |",
                    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        s = row_stats(groups[key])
        if groups[key][0]["system"] == "reference":  # no scanner: nothing is expected flagged
            s.update(inf="n/a (no scanner)", inf_ok=True, sink_ok=True)
        name = f"**{label}**" if groups[key][0]["system"] == "avgate" else label
        out.append(
            f"| {name} | {c} | {s['runs']} | {s['sent']} | {fmt(s['rate'])} "
            f"({fmt(s['rmin'])}–{fmt(s['rmax'])}) | {fmt(s['p50'])} | {fmt(s['p99'])} "
            f"| {s['inf']}{'' if s['inf_ok'] else ' ✗'} | {s['clean_flagged']}"
            f"{'' if not s['clean_flagged'] else ' ✗'} | {s['bad']} | {s['sink']}"
            f"{'' if s['sink_ok'] else ' ✗'} | {fmt(s['own_cpu'], 2)} | {fmt(s['clamd_cpu'], 2)} "
            f"| {fmt(s['loadgen_cpu'], 2)} |")


def ratios(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """avgate/peer per (group, peer, transport, C), avgate runs paired with that peer."""
    out = []
    seen: OrderedDict[tuple[str, str, str, int], None] = OrderedDict()
    for r in recs:
        if r["system"] == "peer":
            seen[(r["group"], r["name"], r["transport"], r["concurrency"])] = None
    for group, peer, transport, c in seen:
        pr = [r for r in recs if r["system"] == "peer" and r["group"] == group
              and r["name"] == peer and r["transport"] == transport and r["concurrency"] == c]
        ar = [r for r in recs if r["system"] == "avgate" and r["group"] == group
              and r["pair"] == peer and r["transport"] == transport and r["concurrency"] == c]
        row: dict[str, Any] = {"group": group, "peer": peer, "transport": transport, "c": c,
                               "peer_label": pr[0]["label"], "peer_rate": med(
                                   [r["msgs_per_s"] or 0 for r in pr]),
                               "peer_cpu": cpu_ms(pr, peer), "avgate_rate": None,
                               "ratio": None, "avgate_cpu": None}
        if ar:
            row["avgate_rate"] = med([r["msgs_per_s"] or 0 for r in ar])
            row["avgate_cpu"] = cpu_ms(ar, "avgate")
            row["avgate_p50"] = med([r["lat_ms"]["p50"] for r in ar])
            row["peer_p50"] = med([r["lat_ms"]["p50"] for r in pr])
            if row["peer_rate"]:
                row["ratio"] = row["avgate_rate"] / row["peer_rate"]
        out.append(row)
    return out


def section_ratios(rows: list[dict[str, Any]], engines: dict[str, Any] | None,
                   out: list[str]) -> None:
    out += ["", "## Ratios and targets", "",
            "avgate msg/s ÷ peer msg/s, medians of the runs taken alternately with that peer.",
            "",
            "| comparison | transport | C | avgate msg/s | peer msg/s | ratio | target | met? "
            "| avgate CPU ms/msg | peer CPU ms/msg |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for t_group, t_peer, t_tr, want, text in TARGETS:
        hit = [r for r in rows if r["group"] == t_group and r["peer"] == t_peer
               and (t_tr is None or r["transport"] == t_tr)]
        if not hit:
            out.append(f"| {text} | {t_tr or '-'} | - | - | - | - | ≥ {want:g}× | not measured "
                       "| - | - |")
            continue
        for r in hit:
            if r["ratio"] is None:
                verdict = "not measured (avgate front-end not available)"
            else:
                verdict = "**met**" if r["ratio"] >= want else "**missed**"
            out.append(f"| {text} | {r['transport']} | {r['c']} | {fmt(r['avgate_rate'])} "
                       f"| {fmt(r['peer_rate'])} | {fmt(r['ratio'], 2) if r['ratio'] else '-'}"
                       f"{'×' if r['ratio'] else ''} | ≥ {want:g}× | {verdict} "
                       f"| {fmt(r['avgate_cpu'], 2)} | {fmt(r['peer_cpu'], 2)} |")
    if engines:
        for c in (1, 16):
            ratio = engines.get(f"ratio_c{c}")
            if ratio is None:
                out.append(f"| embedded ≥ 5× clamd | in-process | {c} | - | - | - | ≥ 5× "
                           "| not measured | - | - |")
                continue
            e, k = engines[f"embedded_c{c}"], engines[f"clamd_c{c}"]
            out.append(f"| embedded ≥ 5× clamd (files/s) | in-process | {c} | {fmt(e['files_s'])} "
                       f"| {fmt(k['files_s'])} | {fmt(ratio, 2)}× | ≥ 5× "
                       f"| {'**met**' if ratio >= 5 else '**missed**'} "
                       f"| {fmt(e.get('avgate_cpu_ms_per_file'), 2)} "
                       f"| {fmt(k.get('avgate_cpu_ms_per_file'), 2)} (avgate side) |")
    else:
        out.append("| embedded ≥ 5× clamd | in-process | - | - | - | - | ≥ 5× | not measured "
                   "| - | - |")
    out += ["", "CPU per message (avgate's own process tree; goal: less than the peer's figure "
            "from the peer kit's 2-core measurement):", "",
            "| front-end | C | avgate CPU ms/msg | goal (peer kit) | met? | peer CPU ms/msg "
            "this session |", "|---|---|---|---|---|---|"]
    for g, peer, goal in CPU_GOALS:
        hit = [r for r in rows if r["group"] == g and r["peer"] == peer]
        if not hit:
            out.append(f"| {g} (vs {peer}) | - | - | < {goal} | not measured | - |")
        for r in hit:
            a = r["avgate_cpu"]
            verdict = "not measured" if a is None else ("**met**" if a < goal else "**missed**")
            out.append(f"| {g} {r['transport']} (vs {peer}) | {r['c']} | {fmt(a, 2)} | < {goal} "
                       f"| {verdict} | {fmt(r['peer_cpu'], 2)} |")


def section_engines(e: dict[str, Any] | None, out: list[str], src: str = "") -> None:
    out += ["", "## Engines: embedded vs clamd (bench/engines.py)" + src, ""]
    if not e:
        out.append("Not run in this session.")
        return
    cmd = str(e.get("command", "")).replace(str(ROOT) + "/", "")
    out += [f"Command: `{cmd}` — {e.get('hdb')} `.hdb` + {e.get('ndb')} `.ndb` "
            f"generated signatures (plus EICAR and the marker), {e.get('files')} unique ~20 KB "
            "objects, verdict cache off. clamd here is a private one started by engines.py "
            f"(loaded in {e.get('clamd_load_s', '-')} s; embedded loaded in "
            f"{e.get('embedded_load_s', '-')} s).", "",
            "| engine | C | files/s | MB/s | avgate CPU ms/file | statuses |",
            "|---|---|---|---|---|---|"]
    for eng in ("embedded", "clamd"):
        for c in (1, 16):
            r = e.get(f"{eng}_c{c}")
            if not r:
                continue
            st = ", ".join(f"{k} {v}" for k, v in r.get("statuses", {}).items() if v)
            out.append(f"| {eng} | {c} | {fmt(r['files_s'])} | {fmt(r['mb_s'], 2)} "
                       f"| {fmt(r.get('avgate_cpu_ms_per_file'), 3)} | {st} |")
    if "decompose_us_per_20k_mime" in e:
        out += ["", f"Decomposing one ~20 KB MIME message: {e['decompose_us_per_20k_mime']} µs."]


def kib(v: Any) -> str:
    return "-" if v in (None, 0) else f"{v / 1024:.1f} MiB"


def section_memory(m: dict[str, Any] | None, out: list[str], src: str = "") -> None:
    out += ["", "## Memory of `avgate serve`" + src, ""]
    if not m:
        out.append("Not measured in this session.")
        return
    out += [f"A fresh `avgate serve` (front-ends: {', '.join(m.get('frontends', []))}; clamd "
            "engine), VmRSS/VmHWM from /proc/PID/status; during transfers VmRSS is sampled every "
            f"20 ms. Large transfer size: {m['big_bytes'] >> 20} MiB.", "",
            "| state | VmRSS | VmHWM | notes |", "|---|---|---|---|"]
    idle = m.get("idle", {})
    out.append(f"| idle after start | {kib(idle.get('VmRSS'))} | {kib(idle.get('VmHWM'))} "
               f"| threads: {idle.get('Threads', '-')} |")
    s = m.get("smtp_1000_idle")
    if s:
        ac = s.get("after_close", {})
        out.append(f"| {s['opened']} idle SMTP connections open | {kib(s.get('VmRSS'))} "
                   f"| {kib(s.get('VmHWM'))} | {s['greeted_220']} got the 220 greeting, "
                   f"{s['not_greeted']} not; opened in {s['open_s']} s; after closing them: "
                   f"{kib(ac.get('VmRSS'))} |")
    for fe in ("icap", "smtp", "http"):
        b = m.get(f"big_{fe}")
        if b is None:
            continue
        if b.get("available") is False:
            out.append(f"| {m['big_bytes'] >> 20} MiB {fe.upper()} transfer | - | - "
                       "| front-end not available |")
        elif "error" in b:
            out.append(f"| {m['big_bytes'] >> 20} MiB {fe.upper()} transfer | - | - "
                       f"| failed: {b['error']} |")
        else:
            out.append(f"| {m['big_bytes'] >> 20} MiB {fe.upper()} transfer (peak) "
                       f"| {kib(b['rss_peak_kib'])} | {kib(b['hwm_after_kib'])} "
                       f"| {b['seconds']} s; before: {kib(b['rss_before_kib'])}; reply: "
                       f"`{str(b['reply'])[:120]}` |")


# ----------------------------------------------------------------------------- sessions
@dataclass
class Data:
    """What one report is made of: one session's results, or several merged (``sources``)."""

    dir: Path
    meta: dict[str, Any]
    recs: list[dict[str, Any]] = field(default_factory=list)
    engines: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    workers: list[dict[str, Any]] = field(default_factory=list)
    scripts: dict[str, str] = field(default_factory=dict)
    #: group -> session id it comes from
    sources: dict[str, str] = field(default_factory=dict)
    #: session id -> its meta.json
    metas: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.dir.name


def session_dir(name: str) -> Path:
    """A session id (under bench/results) or a directory."""
    p = Path(name)
    if not (p / "meta.json").exists():
        p = RESULTS / name
    if not (p / "meta.json").exists():
        raise SystemExit(f"report: no bench session {name!r} (no meta.json in {p})")
    return p


def load(d: Path) -> Data:
    meta = json.loads((d / "meta.json").read_text())
    recs = load_jsonl(d / "loadgen.jsonl")
    for r in recs:
        r["_n"] = meta.get("n", 10**9)
        r["_session"] = d.name
    engines, memory = load_jsonl(d / "engines.jsonl"), load_jsonl(d / "memory.jsonl")
    data = Data(d, meta, recs, engines[-1] if engines else None, memory[-1] if memory else None,
                load_jsonl(d / "workers.jsonl"))
    for name in SCRIPT_GROUPS:
        f = d / f"{name}.out"
        if f.exists() and f.read_text().strip():
            data.scripts[name] = f.read_text().strip()
    groups = meta.get("groups") or [g for g in GROUPS if has_group(data, g)]
    data.sources = {g: d.name for g in groups if g in GROUPS}
    data.metas = {d.name: meta}
    return data


def has_group(data: Data, g: str) -> bool:
    if g in LOAD_GROUPS or g == "workers":
        return any(r["group"] == g for r in data.recs) or (g == "workers" and bool(data.workers))
    if g == "engines":
        return data.engines is not None
    if g == "memory":
        return data.memory is not None
    return g in data.scripts


def carry(main: Data, others: list[Data]) -> Data:
    """Fill the groups ``main`` did not run from the first of ``others`` that ran them."""
    for g in GROUPS:
        if g in main.sources:
            continue
        src = next((o for o in others if g in o.sources and has_group(o, g)), None)
        if src is None:
            continue
        main.sources[g] = src.id
        main.metas[src.id] = src.meta
        if g in LOAD_GROUPS or g == "workers":
            main.recs += [r for r in src.recs if r["group"] == g]
        if g == "workers":
            main.workers += src.workers
        elif g == "engines":
            main.engines = src.engines
        elif g == "memory":
            main.memory = src.memory
        elif g in SCRIPT_GROUPS:
            main.scripts[g] = src.scripts[g]
    return main


SOURCES_RE = re.compile(r"<!-- bench-sources: (.*?) -->")
MADE_FROM_RE = re.compile(r"generated by bench/report\.py from bench/results/([\w.-]+)")


def sources_of(md: Path) -> list[str]:
    """The sessions an existing BENCHMARKS.md was made from (main session first)."""
    try:
        text = md.read_text()
    except OSError:
        return []
    m = SOURCES_RE.search(text)
    if m:
        out: list[str] = []
        for item in m.group(1).split():
            sid = item.partition("=")[2]
            if sid and sid not in out:
                out.append(sid)
        return out
    m2 = MADE_FROM_RE.search(text)
    return [m2.group(1)] if m2 else []


def baseline() -> str | None:
    """The session named in bench/results/BASELINE (first non-comment line), if any."""
    try:
        lines = BASELINE.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            return line
    return None


def try_load(name: str, required: bool) -> Data | None:
    """load(session_dir(name)); a missing session is an error only when ``required``."""
    try:
        return load(session_dir(name))
    except SystemExit as exc:
        if required:
            raise
        print(f"{exc} (skipped)", file=sys.stderr)
        return None


def carried_from(data: Data, g: str) -> str:
    """'' for the main session's groups, else ' (carried from session `X`, DATE)'."""
    sid = data.sources.get(g)
    if sid is None or sid == data.id:
        return ""
    return f" (carried from session `{sid}`, {data.metas[sid].get('date', '?')})"


# ----------------------------------------------------------------------------- before/after
#: the peer whose alternating runs a front-end's before/after and CPU figures are taken from
#: (the issue's goals name these; SMTP's runs beside amavisd-new are left out)
PRIMARY_PEER = {"smtp": "clamsmtp", "milter": "clamav-milter", "icap": "c-icap",
                "clamd": "clamd"}


def frontend_stats(recs: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """avgate's rows of the load groups: (group, transport, C) -> row_stats of its runs taken
    beside the group's primary peer (PRIMARY_PEER; all its runs when there are none)."""
    keyed: OrderedDict[tuple[str, str, int], list[dict[str, Any]]] = OrderedDict()
    for r in recs:
        if r["system"] == "avgate" and r["group"] in LOAD_GROUPS:
            keyed.setdefault((r["group"], r["transport"], r["concurrency"]), []).append(r)
    out = {}
    for k, v in keyed.items():
        primary = [r for r in v if r.get("pair") == PRIMARY_PEER[k[0]]]
        out[k] = row_stats(primary or v)
    return out


def change(before: float | None, after: float | None) -> str:
    if before is None or after is None or not before:
        return "-"
    pct = (after - before) / before * 100
    return f"{'+' if pct >= 0 else '−'}{abs(pct):.0f} %"


def correct(s: dict[str, Any]) -> bool:
    return bool(s["inf_ok"] and not s["clean_flagged"] and s["sink_ok"])


def section_before_after(after: Data, before: Data | None, out: list[str]) -> None:
    out += ["", "## Before / after", ""]
    if before is None:
        out.append("No baseline session (bench/results/BASELINE, `--before`): nothing to "
                   "compare with.")
        return
    b, a = frontend_stats(before.recs), frontend_stats(after.recs)
    peers = ratios(after.recs)
    if before.id == after.id:
        out += [f"(The baseline is this report's own session, `{before.id}`: no change.)", ""]
    out += [f"Before: session `{before.id}` ({before.meta.get('date', '?')}, "
            f"`{before.meta.get('command', '?')}`); after: this report's sessions. avgate's own "
            "process tree, medians of the runs; *change* is after vs before (for CPU and p99 "
            "lower is better). *correct*: infected all flagged, no clean flagged, nothing "
            "leaked to the sink, in the after runs. avgate's runs taken beside ClamSMTP, "
            "clamav-milter, c-icap and raw clamd (the goals' peers).", "",
            "| front-end | C | CPU ms/msg before | after | change | msg/s before | after | change "
            "| p99 ms before | after | change | peer CPU ms/msg (after) | correct |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (g, tr), name in FRONTENDS.items():
        concs = sorted({k[2] for k in (*a, *b) if k[:2] == (g, tr)})
        for c in concs:
            sb, sa = b.get((g, tr, c)), a.get((g, tr, c))
            pc = [p["peer_cpu"] for p in peers if p["group"] == g and p["transport"] == tr
                  and p["c"] == c and p["peer_cpu"] is not None
                  and p["peer"] == PRIMARY_PEER[g]]

            def v(s: dict[str, Any] | None, k: str) -> float | None:
                return s[k] if s else None
            src = after.sources.get(g, after.id)
            if src != after.id:  # carried over: say so; from the baseline itself: no change
                if src == before.id:
                    out.append(f"| {name} | {c} | {fmt(v(sb, 'own_cpu'), 2)} | not re-run "
                               f"(carried from the baseline) | - | {fmt(v(sb, 'rate'))} | - "
                               f"| - | {fmt(v(sb, 'p99'))} | - | - | - | - |")
                    continue
                name = f"{name} (from `{src}`)"
            out.append(
                f"| {name} | {c} | {fmt(v(sb, 'own_cpu'), 2)} | **{fmt(v(sa, 'own_cpu'), 2)}** "
                f"| {change(v(sb, 'own_cpu'), v(sa, 'own_cpu'))} | {fmt(v(sb, 'rate'))} "
                f"| **{fmt(v(sa, 'rate'))}** | {change(v(sb, 'rate'), v(sa, 'rate'))} "
                f"| {fmt(v(sb, 'p99'))} | **{fmt(v(sa, 'p99'))}** "
                f"| {change(v(sb, 'p99'), v(sa, 'p99'))} "
                f"| {fmt(min(pc), 2) if pc else '-'} "
                f"| {'-' if sa is None else ('yes' if correct(sa) else '**no** ✗')} |")


# ----------------------------------------------------------------------------- workers
WORKERS_LABEL_RE = re.compile(r"(?:-w|workers = )(\d+)")


def serve_workers(r: dict[str, Any]) -> int:
    """The `[serve] workers` count a run was taken with (older sessions: from the label)."""
    if "serve_workers" in r:
        return int(r["serve_workers"])
    m = WORKERS_LABEL_RE.search(r.get("label", ""))
    return int(m.group(1)) if m else 1


def workers_rows(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The workers group's avgate rows: one per (session, front-end, C, workers), with
    row_stats and the msg/s ratio to workers = 1 of the same session, front-end and C."""
    keyed: OrderedDict[tuple[str, str, int, int], list[dict[str, Any]]] = OrderedDict()
    for r in sorted((r for r in recs if r["group"] == "workers" and r["system"] == "avgate"),
                    key=lambda r: (r.get("_session", ""), r["mode"], r["concurrency"],
                                   serve_workers(r))):
        keyed.setdefault((r.get("_session", ""), r["mode"], r["concurrency"], serve_workers(r)),
                         []).append(r)
    rows = [{"session": k[0], "mode": k[1], "c": k[2], "workers": k[3], **row_stats(v)}
            for k, v in keyed.items()]
    for row in rows:
        one = [x for x in rows if (x["session"], x["mode"], x["c"], x["workers"])
               == (row["session"], row["mode"], row["c"], 1)]
        row["speedup"] = (row["rate"] / one[0]["rate"]
                          if one and one[0]["rate"] and row["rate"] else None)
    return rows


def loadgen_core(row: dict[str, Any]) -> str:
    """The load generator's CPU while it ran, in % of one core."""
    if row.get("loadgen_cpu") is None or not row.get("rate"):
        return "-"
    return f"{row['loadgen_cpu'] * row['rate'] / 10:.0f} %"


def section_workers(data: Data, extra: list[Data], out: list[str]) -> None:
    out += ["", "## Scaling with `[serve] workers = N`" + carried_from(data, "workers"), ""]
    sessions = [data, *extra]
    recs = [r for d in sessions for r in d.recs if r["group"] == "workers"]
    wrecs = [w for d in sessions for w in d.workers]
    if not recs and not wrecs:
        out.append("Not run in this session.")
        return
    for w in wrecs:
        if not w.get("available"):
            out.append(f"- `workers = {w.get('workers')}`: **not available** "
                       f"({w.get('reason', 'serve refused it')})")
    out += ["N serve processes share the SMTP and ICAP ports (SO_REUSEPORT), each with its "
            "own scan workers (`[scan] workers = 0`: the cores divided by N); the same clamd "
            "and sink as above. *× w=1*: msg/s over workers = 1 at the same C. CPU: the whole "
            "process tree (supervisor, serve workers, scan workers) ÷ messages. *loadgen core*: "
            "the load generator's CPU as a share of one core (one Python process: near 100 % "
            "it, not avgate, is the ceiling).", "",
            "| machine | front-end | C | workers | processes | msg/s | × w=1 | p99 ms "
            "| avgate CPU ms/msg | loadgen core | infected flagged | clean flagged | 4xx/err "
            "| sink delivered/expected |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    procs = {(w.get("session"), w.get("workers")): w.get("processes") for w in wrecs}
    metas = {sid: m for d in sessions for sid, m in d.metas.items()}
    for row in workers_rows(recs):
        m = metas.get(row["session"], {}).get("machine", {})
        out.append(
            f"| {m.get('cores', '?')} cores (`{row['session']}`) | {row['mode'].upper()} "
            f"| {row['c']} | {row['workers']} | {procs.get((row['session'], row['workers']), '-')} "
            f"| {fmt(row['rate'])} | {fmt(row['speedup'], 2) + '×' if row['speedup'] else '-'} "
            f"| {fmt(row['p99'])} | {fmt(row['own_cpu'], 2)} | {loadgen_core(row)} "
            f"| {row['inf']}{'' if row['inf_ok'] else ' ✗'} | {row['clean_flagged']}"
            f"{' ✗' if row['clean_flagged'] else ''} | {row['bad']}{' ✗' if row['bad'] else ''} "
            f"| {row['sink']}{'' if row['sink_ok'] else ' ✗'} |")
    big = [sid for sid, m in metas.items()
           if (m.get("machine", {}).get("cores") or 0) >= 16
           and any(r.get("_session") == sid for r in recs)]
    if not big:
        out += ["", "**16 cores: not measured.** No many-core (device) machine was lent to the "
                "sessions this report was made from, so only the figures of this "
                f"{data.meta.get('machine', {}).get('cores', '?')}-core machine are given. "
                "`bench/device/run-matrix.sh` runs `workers = 1, 2, 4, 8, 16` at C=64 on a "
                "16-core machine (bench/README.md); its session is added with "
                "`bench/report.py --extra-workers SESSION`."]


# ----------------------------------------------------------------------------- render
def header(data: Data, before: Data | None) -> list[str]:
    meta = data.meta
    m = meta.get("machine", {})
    sources = " ".join(f"{g}={sid}" for g, sid in data.sources.items())
    out = ["# Benchmarks", "",
           f"<!-- generated by bench/report.py from bench/results/{data.id}; do not edit by hand:"
           " run `make bench` (or `.venv/bin/python bench/report.py`) -->",
           f"<!-- bench-sources: {sources} -->", "",
           f"- **Date**: {meta.get('date')} (session `{data.id}`, {meta.get('duration_s', '?')} s)",
           f"- **Command**: `{meta.get('command')}`"
           + (" — **quick smoke run** (1 run, small N: indicative only)"
              if meta.get("quick") else ""),
           f"- **Machine**: {m.get('cores')} cores ({m.get('cpu_model', '?')}), "
           f"{m.get('mem_gib')} GiB memory, Linux {m.get('kernel')}, Python {m.get('python')}; "
           f"load average at start {m.get('loadavg_at_start')}, at end {m.get('loadavg_at_end')}",
           f"- **Load**: `loadgen.py {meta.get('loadgen_flags')}` at C = {meta.get('concurrency')},"
           f" {meta.get('runs')} run(s) each; peer and avgate runs alternate",
           f"- **clamd**: the peer kit's clamd (EICAR `.hdb` + marker `.ndb` only), reached over "
           f"the **{meta.get('clamd_transport')}** transport by avgate and by every peer that "
           "can be configured (clamsmtp, amavisd-new, clamav-milter, c-icap)",
           ]
    carried = OrderedDict((sid, [g for g, s in data.sources.items() if s == sid])
                          for sid in data.sources.values() if sid != data.id)
    for sid, gs in carried.items():
        cm = data.metas[sid]
        out.append(f"- **Carried over** from session `{sid}` ({cm.get('date', '?')}, "
                   f"`{cm.get('command', '?')}`): {', '.join(gs)} (this session did not run "
                   "them)")
    if before is not None:
        out.append(f"- **Before/after baseline**: session `{before.id}` "
                   f"({before.meta.get('date', '?')})")
    v = meta.get("versions", {})
    if v:
        out.append("- **Versions**: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    lst = meta.get("avgate_listening")
    if lst is not None:
        out.append("- **avgate front-ends opened**: " + (", ".join(
            f"{k} ({'; '.join(x)})" for k, x in lst.items()) or "none"))
        if meta.get("avgate_unavailable"):
            out.append("- **avgate front-ends not available in this build**: "
                       + ", ".join(meta["avgate_unavailable"]))
    out += ["", "**Noise warning**: on this machine the load generator, the sink, the peer (or "
            "avgate) and clamd share the same cores, and other work may run at the same time "
            "(for the session above: other engineers' test suites on the same 2 cores). "
            "Treat the numbers as indicative; compare ratios of runs taken side by side, not "
            "absolute rates across sessions."]
    if meta.get("notes"):
        out += ["", "Notes from the run:", ""] + [f"- {n}" for n in meta["notes"]]
    return out


def render(data: Data, before: Data | None = None, extra_workers: list[Data] | None = None,
           charts: list[tuple[str, str]] | None = None) -> str:
    """BENCHMARKS.md for ``data``; ``charts``: (title, path relative to the Markdown file)."""
    extra_workers = extra_workers or []
    recs = data.recs
    out = header(data, before)
    rows = ratios(recs)
    section_ratios(rows, data.engines, out)
    section_before_after(data, before, out)
    if charts:
        out += ["", "## Charts", "",
                "Drawn by bench/charts.py (matplotlib) from the same records as the tables."]
        for title, path in charts:
            out += ["", f"![{title}]({path})"]
    out += ["", "## Throughput, latency, correctness, CPU", "",
            "msg/s = messages completed ÷ wall time of the run; p50/p99 = per-message latency "
            "(SMTP: connect → final DATA reply; milter: connect → end-of-message verdict; ICAP: "
            "request → complete response; clamd: connect → reply). *infected flagged*: EICAR "
            "and marker messages whose reply shows a detection; *clean flagged*: clean "
            "messages wrongly flagged; *sink delivered/expected*: messages that reached the "
            "SMTP sink (warm-up included) vs clean messages accepted, and how many delivered "
            "messages still contained EICAR or the marker. CPU: CPU time of that process tree "
            "during the run ÷ messages (`--watch name=PID`). ✗ marks a correctness failure."]
    if recs:
        section_throughput(recs, out, data)
    else:
        out += ["", "No load runs in this session."]
    section_engines(data.engines, out, carried_from(data, "engines"))
    for name, title in (("http_proxy", "HTTP proxy vs Squid + c-icap (bench/http_proxy.py)"),
                        ("mailproxy", "POP3 and IMAP proxies vs Dovecot (bench/mailproxy.py)"),
                        ("ftp", "FTP proxy vs direct (bench/ftp.py)"),
                        ("decompose", "Decomposition per format (bench/decompose.py)"),
                        ("scaleout", "Scale-out: Dask store scans, quarantine writes "
                                     "(bench/scaleout.py)"),
                        ("sigdb", "ClamAV-sized signature database (bench/sigdb.py)")):
        text = data.scripts.get(name, "")
        if text:
            # Markdown tables as they are (without the script's progress lines); anything
            # else (JSON lines) as printed
            lines = text.splitlines()
            shown = ([line for line in lines if not line.lstrip().startswith("[")]
                     if any(line.startswith("|") for line in lines)
                     else ["```", text, "```"])
            out += ["", f"## {title}{carried_from(data, name)}", "",
                    "Printed by the script, as it ran:", "", *shown]
    section_memory(data.memory, out, carried_from(data, "memory"))
    section_workers(data, extra_workers, out)
    analysis = Path(__file__).with_name("ANALYSIS.md")
    if analysis.exists():  # hand-written: what limits the missed targets (kept across runs)
        out += ["", analysis.read_text().strip()]
    cfg = data.meta.get("avgate_config")
    if cfg:
        out += ["", "## avgate configuration used", "", "```toml", cfg.strip(), "```"]
    out += ["", "## How to reproduce", "",
            "```sh",
            "make bench                                  # full: 3 runs, N=2000, 45 s cap, "
            "C=1 and 16 (about 40 min)",
            ".venv/bin/python bench/run.py --quick       # smoke run: 1 run, N=300, 15 s cap",
            ".venv/bin/python bench/run.py --only smtp,icap --runs 5 -n 1000   # other groups "
            "carried over",
            ".venv/bin/python bench/report.py [bench/results/SESSION] [--before SESSION] "
            "[--carry SESSION]   # regenerate this file and bench/figures/",
            "bench/device/run-matrix.sh                  # on a 16-core machine: workers "
            "1,2,4,8,16 at C=64",
            "```", "",
            "Peers are installed with apt-get if missing (the peer kit's package list) and started "
            "with the peer kit's scripts (`../shared/peers`), with their runtime state under "
            "`bench/run/peers` (git-ignored). Raw results: `bench/results/<session>/`.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("session", nargs="?", help="bench/results/SESSION (default: newest)")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--before", default=None,
                    help="session to compare with (default: bench/results/BASELINE; 'none')")
    ap.add_argument("--carry", action="append", default=None, metavar="SESSION",
                    help="fill the groups the session did not run from SESSION (repeatable; "
                         "default: the sessions the current --out file names)")
    ap.add_argument("--extra-workers", action="append", default=[], metavar="SESSION",
                    help="add SESSION's workers rows (e.g. the 16-core device matrix)")
    ap.add_argument("--charts", default=str(FIGURES), help="folder for the SVG charts")
    ap.add_argument("--no-charts", action="store_true", help="no charts")
    a = ap.parse_args(argv)
    d = session_dir(a.session) if a.session else latest_session()
    if d is None:
        print("report: no bench session found under bench/results", file=sys.stderr)
        return 1
    out = Path(a.out)
    data = load(d)
    carry_ids = a.carry if a.carry is not None else [s for s in sources_of(out) if s != d.name]
    # named on the command line: must exist; found in the old file or BASELINE: a warning
    carry(data, [x for s in carry_ids if (x := try_load(s, a.carry is not None))])
    before_id = a.before or baseline()
    before = (None if before_id in (None, "none")
              else try_load(before_id, a.before is not None))
    extra = [load(session_dir(s)) for s in a.extra_workers]
    charts: list[tuple[str, str]] = []
    if not a.no_charts:
        import charts as charts_mod

        folder = Path(a.charts)
        for title, path in charts_mod.write_all(data, before, extra, folder):
            charts.append((title, os.path.relpath(path, out.resolve().parent)))
    out.write_text(render(data, before, extra, charts))
    print(f"report: wrote {out} from {d}"
          + (f" (carried: {', '.join(sorted(set(data.sources.values()) - {d.name}))})"
             if set(data.sources.values()) - {d.name} else "")
          + (f"; {len(charts)} charts in {a.charts}" if charts else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
