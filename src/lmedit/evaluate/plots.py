"""Plots of reports (PNG, matplotlib's Agg backend; matplotlib is imported only when plotting).

>>> retention_plot(Report.load("runs/seq.json"), "runs/seq.png")
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def _figure(path: str | os.PathLike, ncols: int = 1, size: tuple[float, float] = (6.4, 4.0)):
    """Yield a row of ``ncols`` axes (matplotlib's Agg backend); the figure is saved to ``path`` and closed."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=size, dpi=120, squeeze=False)
    try:
        yield axes[0]
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)


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
    edits = [p["edits"] for p in report.retention]
    with _figure(path) as (ax,):
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
    return Path(path)


def perplexity_points(report: Report) -> list[tuple[int, float]]:
    """(edits applied, held-out perplexity) along a sequential run measured with held-out text: the unedited
    model at 0, then every retention checkpoint (empty without ``--perplexity``)."""
    pts = [(p["edits"], p["perplexity"]) for p in report.retention if p.get("perplexity") is not None]
    pre = (report.meta.get("perplexity") or {}).get("pre")
    return [(0, pre)] + pts if pts and pre is not None else pts


def retention_compare(
    reports: list[Report],
    labels: list[str],
    path: str | os.PathLike,
    keys: tuple[str, ...] = ("reliability_tf", "generalization_tf", "locality_tf"),
) -> Path:
    """The retention curves of several sequential runs in one figure: one panel per metric, one line per run,
    and a last panel of held-out perplexity when any run measured it (log scale when it spans more than 5x).

    Raises:
        ValueError: if no report has a retention curve.
    """
    if len(labels) != len(reports):
        raise ValueError(f"{len(reports)} reports but {len(labels)} labels")
    runs = [(r, name) for r, name in zip(reports, labels) if r.retention]
    if not runs:
        raise ValueError(
            "none of the reports has a retention curve (lmedit bench --protocol sequential --eval-every M)"
        )
    ppl = [(perplexity_points(r), name) for r, name in runs]
    panels = len(keys) + any(pts for pts, _ in ppl)
    with _figure(path, panels, (4.2 * panels, 3.6)) as axes:
        for ax, key in zip(axes, keys):
            for report, name in runs:
                pts = [(p["edits"], p["metrics"].get(key)) for p in report.retention]
                pts = [(x, y) for x, y in pts if y is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, label=name)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("edits applied")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        if panels > len(keys):
            ax = axes[-1]
            for pts, name in ppl:
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, label=name)
            values = [y for pts, _ in ppl for _x, y in pts]
            if max(values) > 5 * min(values):  # a collapse next to intact runs: log scale, plain numbers
                from matplotlib.ticker import LogFormatter

                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
                ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
            ax.set_title("held-out perplexity (lower is better)", fontsize=9)
            ax.set_xlabel("edits applied")
            ax.grid(alpha=0.3, which="both")
        axes[0].set_ylabel("score (cases edited so far)")
        axes[len(keys) - 1].legend(fontsize=7)  # a score panel: every run has a line there
    return Path(path)
