"""Lifelong-editing summary of sequential ``lmedit bench`` reports: final scores, cost per edit as edits grow,
and every run's retention curves in one figure.

    lmedit bench --method grace --protocol sequential --n 1000 --eval-every 100 --scoring tf,prob \\
        --dataset bundled,../shared/data/counterfact/counterfact-edit.json --out runs/grace-1000.json
    python benchmarks/lifelong.py runs/grace-1000.json runs/wise-200.json --plot docs/img/lifelong-retention.png

For each report: the teacher-forced reliability / generalization / locality after the last edit, then at edit
1, 100 and 1000 (where the run got there) the edit's wall time (median of the 9 edits around it, so one slow
edit does not decide), the bytes all patches so far store, and the process's peak resident memory. Prints a
Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from lmedit.evaluate.plots import retention_compare
from lmedit.evaluate.report import Report

AT = (1, 100, 1000)


def _around(steps: list[dict], edits: int, key: str) -> float | None:
    """Median of ``key`` over the steps within 4 of the one that brought the run to ``edits`` edits."""
    done, index = 0, None
    for i, s in enumerate(steps):
        done += s["cases"]
        if done >= edits:
            index = i
            break
    if index is None or done != edits and edits != 1:
        return None
    window = [s[key] for s in steps[max(0, index - 4) : index + 5] if s.get(key) is not None]
    return statistics.median(window) if window else None


def summary(report: Report, label: str) -> str:
    steps = report.meta["edits"]
    n = report.meta["n"]
    post = report.post
    cells = [
        label,
        str(n),
        *(
            f"{post[k]:.3f}" if post.get(k) is not None else "-"
            for k in ("reliability_tf", "generalization_tf")
        ),
        f"{post['locality_tf']:.3f}" if post.get("locality_tf") is not None else "-",
    ]
    for at in AT:
        t = _around(steps, at, "seconds")
        stored = _stored(steps, at)
        rss = _around(steps, at, "peak_rss_mb")
        cells.append(
            "-" if t is None else f"{t:.2f} s / {stored / 1e6:.2f} MB / {rss:.0f} MB" if rss else f"{t:.2f} s"
        )
    return "| " + " | ".join(cells) + " |"


def _stored(steps: list[dict], edits: int) -> float:
    done = 0
    for s in steps:
        done += s["cases"]
        if done >= edits:
            return s["stored_bytes"]
    return float("nan")


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
