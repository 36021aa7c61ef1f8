"""Lifelong-editing summary of sequential ``lmedit bench`` reports: final scores, cost per edit as edits grow,
and every run's retention curves in one figure.

    lmedit bench --method grace --protocol sequential --n 1000 --eval-every 100 --scoring tf,prob \\
        --dataset bundled,../shared/data/counterfact/counterfact-edit.json --out runs/grace-1000.json
    python benchmarks/lifelong.py runs/grace-1000.json runs/rome-1000/report.json --plot docs/img/lifelong.png

A report may be a ``--checkpoint`` folder's ``report.json`` of a run not finished yet: its row then says how many
edits it got to, and its scores are those of its last checkpoint (every case edited so far).

For each report: the teacher-forced reliability / generalization / locality after the last edit, then at edit
1, 100 and 1000 (where the run got there) the step's wall time (median of the 9 steps around it, so one slow
step does not decide), the bytes all patches so far store, and the process's peak resident memory. Prints a
Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from lmedit.evaluate.plots import retention_compare
from lmedit.evaluate.report import Report

AT = (1, 100, 1000)


def _step(steps: list[dict], edits: int) -> int | None:
    """Index of the step after which exactly ``edits`` edits are applied (None if the run has no such step)."""
    done = 0
    for i, s in enumerate(steps):
        done += s["cases"]
        if done >= edits:
            return i if done == edits or i == 0 else None
    return None


def _cost(steps: list[dict], edits: int) -> str:
    """``time / stored / peak RSS`` at ``edits`` edits; the time is the median of the 9 steps around it."""
    i = _step(steps, edits)
    if i is None:
        return "-"
    seconds = statistics.median(s["seconds"] for s in steps[max(0, i - 4) : i + 5])
    rss = steps[i].get("peak_rss_mb")
    return f"{seconds:.2f} s / {steps[i]['stored_bytes'] / 1e6:.2f} MB" + (f" / {rss:.0f} MB" if rss else "")


def summary(report: Report, label: str) -> str:
    post = report.post
    scores = [post.get(k) for k in ("reliability_tf", "generalization_tf", "locality_tf")]
    partial = report.meta.get("partial")  # a checkpoint's report.json of a run still going (or stopped)
    edits = f"{partial['edits_done']} of {report.meta['n']} (partial)" if partial else str(report.meta["n"])
    cells = [label, edits, *("-" if v is None else f"{v:.3f}" for v in scores)]
    cells += [_cost(report.meta["edits"], at) for at in AT]
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", help="sequential lmedit bench report JSONs")
    ap.add_argument("--labels", help="comma list of names (default: the files' stems)")
    ap.add_argument("--plot", help="write every run's retention curves into this PNG")
    args = ap.parse_args()
    reports = [Report.load(p) for p in args.reports]
    labels = args.labels.split(",") if args.labels else [Path(p).stem for p in args.reports]
    head = ["run", "edits", "reliability_tf", "generalization_tf", "locality_tf"]
    head += [f"edit {a}: time / stored / peak RSS" for a in AT]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for report, label in zip(reports, labels):
        print(summary(report, label))
    if args.plot:
        print(f"\nretention curves: {retention_compare(reports, labels, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
