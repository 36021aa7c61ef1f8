"""Plots of reports (PNG, matplotlib's Agg backend; matplotlib is imported only when plotting).

>>> retention_plot(Report.load("runs/seq.json"), "runs/seq.png")
"""

from __future__ import annotations

import os
from pathlib import Path

from lmedit.evaluate.report import Report

#: Metrics drawn on retention curves when present.
RETENTION_KEYS = (
    "reliability_tf",
    "generalization_tf",
    "locality_tf",
    "efficacy_score",
    "neighborhood_score",
)


def retention_plot(report: Report, path: str | os.PathLike, keys: tuple[str, ...] = RETENTION_KEYS) -> Path:
    """Metrics of every case edited so far against the number of edits (sequential runs with eval each step).

    Raises:
        ValueError: if the report has no retention curve (run ``protocol="sequential"`` with eval each step).
    """
    if not report.retention:
        raise ValueError(
            "the report has no retention curve; run the sequential protocol evaluating after each step "
            "(lmedit bench --protocol sequential --eval-every M)"
        )
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    edits = [p["edits"] for p in report.retention]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    try:
        for key in keys:
            ys = [p["metrics"].get(key) for p in report.retention]
            if all(y is None for y in ys):
                continue
            ax.plot(edits, [float("nan") if y is None else y for y in ys], marker="o", ms=3, label=key)
        ax.set_xlabel("edits applied")
        ax.set_ylabel("score (cases edited so far)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(report.title(), fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
