"""Regenerate BENCHMARKS.md from the raw results of one bench session.

    .venv/bin/python bench/report.py [bench/results/SESSION] [--out BENCHMARKS.md]

Without a directory the newest session under bench/results/ is used. Input files (all written
by bench/run.py): ``meta.json`` (date, machine, command, notes), ``loadgen.jsonl`` (one loadgen
record per run, tagged with group/system/name/transport/pair/run), ``engines.jsonl``
(bench/engines.py), ``memory.jsonl``, ``workers.jsonl``.
"""

# ruff: noqa: RUF001  (multiplication signs and en dashes are meant: this writes Markdown)
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

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


def section_throughput(recs: list[dict[str, Any]], out: list[str]) -> None:
    groups: OrderedDict[tuple, list] = OrderedDict()
    order = {"smtp": 0, "milter": 1, "icap": 2, "clamd": 3, "workers": 4}
    for r in sorted(recs, key=lambda r: (order.get(r["group"], 9), r["transport"],
                                          r["system"] != "peer", r["label"])):
        groups.setdefault((r["group"], r["label"], r["concurrency"]), []).append(r)
    keys = sorted(groups, key=lambda k: (order.get(k[0], 9), k[2]))
    cur = None
    for key in keys:
        group, label, c = key
        if group != cur:
            cur = group
            out += ["", f"### {group}", "",
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
    seen: OrderedDict[tuple, None] = OrderedDict()
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


def section_engines(e: dict[str, Any] | None, out: list[str]) -> None:
    out += ["", "## Engines: embedded vs clamd (bench/engines.py)", ""]
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


def section_memory(m: dict[str, Any] | None, out: list[str]) -> None:
    out += ["", "## Memory of `avgate serve`", ""]
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


def section_workers(w: dict[str, Any] | None, recs: list[dict[str, Any]], out: list[str]) -> None:
    out += ["", "## Scaling with `[serve] workers = N`", ""]
    if not w:
        out.append("Not run in this session.")
        return
    if not w.get("available"):
        out.append("**Not available**: `avgate serve` with `[serve] workers = 2` "
                   f"does not run several processes. {w.get('reason', '')}".strip())
        return
    out.append(f"`workers = 2` ran {w.get('processes')} processes; see the `workers` rows in "
               "the throughput tables (compare with the workers = 1 rows of smtp/icap).")


def render(d: Path) -> str:
    meta = json.loads((d / "meta.json").read_text())
    recs = load_jsonl(d / "loadgen.jsonl")
    for r in recs:
        r["_n"] = meta.get("n", 10**9)
    engines = (load_jsonl(d / "engines.jsonl") or [None])[-1]
    memory = (load_jsonl(d / "memory.jsonl") or [None])[-1]
    workers = (load_jsonl(d / "workers.jsonl") or [None])[-1]
    m = meta.get("machine", {})
    out = ["# Benchmarks", "",
           f"<!-- generated by bench/report.py from bench/results/{d.name}; do not edit by hand:"
           " run `make bench` (or `.venv/bin/python bench/report.py`) -->", "",
           f"- **Date**: {meta.get('date')} (session `{d.name}`, {meta.get('duration_s', '?')} s)",
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
    rows = ratios(recs)
    section_ratios(rows, engines, out)
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
        section_throughput(recs, out)
    else:
        out += ["", "No load runs in this session."]
    section_engines(engines, out)
    for name, title in (("http_proxy", "HTTP proxy vs Squid + c-icap (bench/http_proxy.py)"),
                        ("mailproxy", "POP3 and IMAP proxies vs Dovecot (bench/mailproxy.py)"),
                        ("ftp", "FTP proxy vs direct (bench/ftp.py)"),
                        ("decompose", "Decomposition per format (bench/decompose.py)"),
                        ("scaleout", "Scale-out: Dask store scans, quarantine writes "
                                     "(bench/scaleout.py)"),
                        ("sigdb", "ClamAV-sized signature database (bench/sigdb.py)")):
        script_out = d / f"{name}.out"
        text = script_out.read_text().strip() if script_out.exists() else ""
        if text:
            # Markdown tables as they are (without the script's progress lines); anything
            # else (JSON lines) as printed
            lines = text.splitlines()
            shown = ([line for line in lines if not line.lstrip().startswith("[")]
                     if any(line.startswith("|") for line in lines)
                     else ["```", text, "```"])
            out += ["", f"## {title}", "", "Printed by the script, as it ran:", "", *shown]
    section_memory(memory, out)
    section_workers(workers, recs, out)
    analysis = Path(__file__).with_name("ANALYSIS.md")
    if analysis.exists():  # hand-written: what limits the missed targets (kept across runs)
        out += ["", analysis.read_text().strip()]
    cfg = meta.get("avgate_config")
    if cfg:
        out += ["", "## avgate configuration used", "", "```toml", cfg.strip(), "```"]
    out += ["", "## How to reproduce", "",
            "```sh",
            "make bench                                  # full: 3 runs, N=2000, 45 s cap, "
            "C=1 and 16 (about 40 min)",
            ".venv/bin/python bench/run.py --quick       # smoke run: 1 run, N=300, 15 s cap",
            ".venv/bin/python bench/run.py --only smtp,icap --runs 5 -n 1000",
            ".venv/bin/python bench/report.py [bench/results/SESSION]   # regenerate this file",
            "```", "",
            "Peers are installed with apt-get if missing (the peer kit's package list) and started "
            "with the peer kit's scripts (`../shared/peers`), with their runtime state under "
            "`bench/run/peers` (git-ignored). Raw results: `bench/results/<session>/`.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("session", nargs="?", help="bench/results/SESSION (default: newest)")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    a = ap.parse_args(argv)
    d = Path(a.session) if a.session else latest_session()
    if d is None or not (d / "meta.json").exists():
        print("report: no bench session found under bench/results", file=sys.stderr)
        return 1
    Path(a.out).write_text(render(d))
    print(f"report: wrote {a.out} from {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
