"""``lmedit bench``: load a model and a dataset, run one protocol, write and print the Report.

    >>> report = run_bench("gemma3-270m", method="ft-m", dataset="bundled", n=100)
    >>> print(report.table())

The command line (``lmedit bench --help``) is a thin wrapper over ``run_bench``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from lmedit.data.loaders import load_dataset
from lmedit.evaluate.protocols import ScoringSettings, evaluate
from lmedit.evaluate.report import Report

log = logging.getLogger(__name__)


def run_bench(
    model: Any = None,
    method: str = "ft-m",
    dataset: str = "bundled",
    n: int | None = None,
    sample: bool = False,
    protocol: str = "single",
    k: int = 1,
    eval_every: int = 0,
    seed: int = 0,
    overrides: dict | None = None,
    settings: ScoringSettings | None = None,
    out: str | None = None,
    plot: str | None = None,
    progress: bool = True,
    perplexity: str | None = None,
    perplexity_tokens: int = 4096,
    checkpoint: str | None = None,
    device: str | None = None,
) -> Report:
    """Benchmark ``method`` on ``dataset`` under ``protocol``.

    Args:
        model: spec for ``load_model`` (default: the bundled default model) or a LoadedModel.
        method: registered method name.
        dataset: "bundled" or a path (any format ``load_dataset`` reads); several joined by commas are
            concatenated.
        n: number of cases (first n in file order, or a seeded random subset with ``sample``).
        protocol, k, eval_every: see ``lmedit.evaluate.protocols.evaluate``.
        seed: seeds the subset and the method (``config.seed``, unless ``overrides`` sets it).
        overrides: method config overrides (strings are coerced, as for ``--set``).
        out: write the report JSON here; ``plot``: write the retention PNG here (sequential runs).
        perplexity: sequential runs: a held-out text (file, folder or corpus name) whose perplexity over its first
            ``perplexity_tokens`` tokens is measured before, at every checkpoint and after the run.
        checkpoint: sequential runs with ``eval_every``: a folder that makes the run resumable - every retention
            checkpoint saves the patches, the curve and a partial report there, and the same command started
            again continues after the last one (``lmedit.evaluate.checkpoint``).
        device: torch device to load ``model`` on (default CPU; ignored for a LoadedModel).
    """
    import lmedit
    from lmedit.core.patch import versions
    from lmedit.models.load import DEFAULT_MODEL

    t0 = time.perf_counter()
    loaded = lmedit.load_model(model if model is not None else DEFAULT_MODEL, device=device)
    load_s = time.perf_counter() - t0
    ds = load_dataset(dataset, n=n, sample=sample, seed=seed)
    config = dict(overrides or {})
    config.setdefault("seed", seed)
    log.info("bench: %s on %s, %d cases of %s, protocol %s", method, loaded.name, len(ds), ds.name, protocol)
    held_out = None
    if perplexity:
        from lmedit.evaluate.perplexity import HeldOut

        held_out = HeldOut.from_corpus(loaded, perplexity, n_tokens=perplexity_tokens)
    run_meta = {
        "dataset": ds.describe(),
        "seed": seed,
        "model": {
            "name": loaded.name,
            "arch": loaded.arch.name,
            "model_type": getattr(loaded.model.config, "model_type", None),
            "source": loaded.source,
            "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
            "device": str(loaded.device),
        },
        "versions": versions(),
    }
    report = evaluate(
        loaded,
        ds,
        method=method,
        protocol=protocol,
        k=k,
        eval_every=eval_every,
        config=config,
        settings=settings,
        progress=progress,
        held_out=held_out,
        checkpoint=checkpoint,
        run_meta=run_meta,
    )
    report.meta["timings"]["load_model_s"] = load_s
    report.meta = _ordered(report.meta)
    if out:
        report.save(out)
        log.info("report written to %s", out)
    if plot:
        from lmedit.evaluate.plots import retention_plot

        retention_plot(report, plot)
    return report


_META_ORDER = (
    "protocol",
    "scoring",
    "dataset",
    "n",
    "seed",
    "model",
    "method",
    "config",
    "config_overrides",
    "versions",
    "timings",
    "edits",
)


def _ordered(meta: dict) -> dict:
    return {k: meta[k] for k in _META_ORDER if k in meta} | {
        k: v for k, v in meta.items() if k not in _META_ORDER
    }


def default_plot_path(out: str | None) -> str | None:
    """``runs/x.json`` -> ``runs/x.retention.png``."""
    return str(Path(out).with_suffix(".retention.png")) if out else None
