"""bench/report.py and bench/charts.py on the committed bench sessions (issue 19's report).

Renders BENCHMARKS.md and the SVG charts from bench/results/20261201-161516 (with
20261201-133356 as the "before") into a temporary folder and checks that the tables and the
charts carry the numbers of the raw records; a partial session carries the other groups over
from an earlier one and says so; the charts are byte-identical when drawn twice.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
AFTER, BEFORE = "20261201-161516", "20261201-133356"

sys.path.insert(0, str(ROOT / "bench"))

import charts  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402

pytestmark = pytest.mark.skipif(not (RESULTS / AFTER / "meta.json").exists(),
                                reason="committed bench session missing")


def row(md: str, start: str) -> list[str]:
    """The cells of the first Markdown table row starting with ``start``."""
    for line in md.splitlines():
        if line.startswith(start):
            return [c.strip() for c in line.strip().strip("|").split("|")]
    raise AssertionError(f"no row starting with {start!r}")


def own_cpu_ms(session: str, group: str, pair: str, c: int) -> float:
    """avgate's CPU ms/msg straight from loadgen.jsonl (one run per point in these sessions)."""
    recs = [json.loads(line) for line in (RESULTS / session / "loadgen.jsonl").open()]
    (r,) = [r for r in recs if r["group"] == group and r["system"] == "avgate"
            and r["pair"] == pair and r["concurrency"] == c and r["transport"] == "tcp"]
    return float(r["cpu_s"]["avgate"] * 1000 / r["sent"])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
    assert report.main([str(RESULTS / AFTER), "--before", BEFORE, "--out", str(out),
                        "--charts", str(out.parent / "figures")]) == 0
    return out, out.read_text()


def test_before_after_table_has_the_raw_numbers(rendered: tuple[Path, str]) -> None:
    _, md = rendered
    smtp = row(md, "| SMTP | 16 |")
    before, after = own_cpu_ms(BEFORE, "smtp", "clamsmtp", 16), own_cpu_ms(
        AFTER, "smtp", "clamsmtp", 16)
    # the figures: 4.17 -> 5.45 ms when the banned check was added
    assert (smtp[2], smtp[3]) == (f"{before:.2f}", f"**{after:.2f}**") == ("4.17", "**5.45**")
    assert smtp[4] == f"+{(after - before) / before * 100:.0f} %"
    assert smtp[-2] == "1.45"  # ClamSMTP's own CPU beside it
    assert smtp[-1] == "yes"
    icap = row(md, "| ICAP | 16 |")
    assert (icap[2], icap[3], icap[4]) == ("1.62", "**1.54**", "\u22125 %")  # (a minus sign)
    assert (icap[5], icap[6]) == ("380", "**408**")  # msg/s
    assert (icap[8], icap[9]) == ("87.1", "**70.2**")  # p99 ms
    assert "Before/after baseline**: session `20261201-133356`" in md


def test_workers_section_shows_the_broken_runs(rendered: tuple[Path, str]) -> None:
    _, md = rendered
    smtp = row(md, "| 2 cores (`20261201-161516`) | SMTP | 16 | 2 |")
    assert smtp[5] == "253" and smtp[10] == "0/200 ✗" and smtp[12] == "1000 ✗"
    assert smtp[9] == f"{1.47 * 253.49 / 10:.0f} %"  # loadgen: 1.47 ms/msg at 253 msg/s
    assert "16 cores: not measured." in md
    # the workers runs are in their own section, not in the throughput tables
    assert "### workers" not in md


def test_charts_are_linked_and_carry_the_numbers(rendered: tuple[Path, str]) -> None:
    out, md = rendered
    figs = out.parent / "figures"
    names = sorted(p.name for p in figs.glob("*.svg"))
    assert names == ["cpu.svg", "throughput-clamd.svg", "throughput-icap.svg",
                     "throughput-milter.svg", "throughput-smtp.svg", "workers.svg"]
    for name in names:
        assert f"](figures/{name})" in md
    cpu = (figs / "cpu.svg").read_text()
    texts = re.findall(r">([^<>]+)</text>", cpu)
    assert {"5.45", "4.17", "1.45 clamsmtp", "4.09", "1.81", "0.40 c-icap"} <= set(texts)
    smtp = re.findall(r">([^<>]+)</text>", (figs / "throughput-smtp.svg").read_text())
    assert {"144", "164", "28", "755", "194"} <= set(smtp)  # msg/s and p99 at C=16
    assert "253 ✗" in (figs / "workers.svg").read_text()
    assert "<dc:date>" not in cpu  # no date: regenerating is diff-friendly


def test_charts_are_deterministic(tmp_path: Path) -> None:
    data, before = report.load(RESULTS / AFTER), report.load(RESULTS / BEFORE)
    a = charts.cpu_chart(data, before, tmp_path / "a")
    b = charts.cpu_chart(report.load(RESULTS / AFTER), before, tmp_path / "b")
    assert a is not None and b is not None
    assert a.read_bytes() == b.read_bytes()


def test_a_partial_session_carries_the_other_groups(tmp_path: Path) -> None:
    # a session that ran only icap: its own records, with the rate doubled to tell them apart
    part = tmp_path / "results" / "20261202-090000"
    part.mkdir(parents=True)
    meta = json.loads((RESULTS / AFTER / "meta.json").read_text())
    meta.update(session=part.name, date="2026-12-02 09:00:00 UTC", groups=["icap"],
                command="bench/run.py --only icap")
    (part / "meta.json").write_text(json.dumps(meta))
    with (part / "loadgen.jsonl").open("w") as f:
        for line in (RESULTS / AFTER / "loadgen.jsonl").open():
            r = json.loads(line)
            if r["group"] == "icap":
                r["msgs_per_s"] *= 2
                f.write(json.dumps(r) + "\n")
    first = tmp_path / "first.md"
    assert report.main([str(part), "--carry", str(RESULTS / AFTER), "--before", "none",
                        "--out", str(first), "--no-charts"]) == 0
    md = first.read_text()
    assert "### smtp (carried from session `20261201-161516`" in md
    assert "### icap\n" in md  # the session's own group: no note
    assert "**Carried over** from session `20261201-161516`" in md
    assert row(md, "| **avgate ICAP (avscan)** | 16 |")[4].startswith("816 ")  # 2 x 408
    assert "## Engines: embedded vs clamd (bench/engines.py) (carried from" in md
    assert "No baseline session" in md
    # against the session the other groups were carried from: those are not "after" figures
    assert report.main([str(part), "--carry", AFTER, "--before", AFTER, "--out",
                        str(tmp_path / "ba.md"), "--no-charts"]) == 0
    ba = (tmp_path / "ba.md").read_text()
    assert row(ba, "| SMTP | 16 |")[3] == "not re-run (carried from the baseline)"
    assert row(ba, "| ICAP | 16 |")[5:7] == ["408", "**816**"]  # ICAP's own: 2 x 408
    # regenerating the same file without --carry keeps the sessions it names
    assert report.sources_of(first) == [part.name, AFTER]
    again = report.main([str(part), "--before", "none", "--out", str(first), "--no-charts"])
    assert again == 0 and "### smtp (carried from session" in first.read_text()
    # a session the old file names that is gone now: skipped (the report still comes out);
    # named on the command line: an error
    first.write_text("<!-- bench-sources: icap=x smtp=20991231-000000 -->\n")
    assert report.main([str(part), "--before", "none", "--out", str(first), "--no-charts"]) == 0
    assert "### smtp" not in first.read_text()
    with pytest.raises(SystemExit):
        report.main([str(part), "--carry", "20991231-000000", "--out", str(first),
                     "--no-charts"])


def test_old_workers_labels_and_new_records() -> None:
    assert report.serve_workers({"label": "avgate-w2 smtp"}) == 2
    assert report.serve_workers({"label": "avgate SMTP, workers = 16"}) == 16
    assert report.serve_workers({"label": "x", "serve_workers": 4}) == 4
    assert report.serve_workers({"label": "avgate SMTP -> sink"}) == 1


def test_run_flags_for_the_workers_matrix() -> None:
    a = run.parse_args(["--only", "workers", "--workers", "1,2,4,8,16",
                        "--workers-concurrency", "64", "--carry", AFTER])
    assert a.only == ["workers"] and a.workers == [1, 2, 4, 8, 16]
    assert a.workers_concurrency == [64] and a.carry == [AFTER]
    assert run.parse_args([]).workers == [1, 2]
    for bad in (["--workers", "0"], ["--workers", "two"], ["--only", "nope"]):
        with pytest.raises(SystemExit):
            run.parse_args(bad)
