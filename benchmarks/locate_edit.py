"""Locate-then-edit figures: ROME single edits and a MEMIT batch on CounterFact, scored by ``lmedit.bench``.

    python benchmarks/locate_edit.py --model gemma3-270m --method rome --n 100
    python benchmarks/locate_edit.py --model gemma3-270m --method memit --n 100 --batch
    python benchmarks/locate_edit.py --method rome --n 20 --set stats_tokens=20000 --out reports/rome.json

Dataset: the bundled CounterFact slice when it exists, else ../shared/data/counterfact/counterfact-val.json
(MEND flat format: edit prompt, one paraphrase, one neighbourhood prompt). Scores are ROME's probability
comparisons (efficacy / paraphrase / neighbourhood), with teacher-forced and generation-based numbers beside
them, as computed by ``lmedit.evaluate``; the unedited model's neighbourhood score is printed for reference.
Statistics come from the cache (``lmedit stats``) or are computed on first use.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def default_dataset() -> str:
    from lmedit.data.loaders import bundled_path

    try:
        path = bundled_path("bundled")
        if path.exists():
            return "bundled"
    except Exception:  # noqa: BLE001 - the bundled set may not exist yet
        pass
    fallback = SHARED / "counterfact" / "counterfact-val.json"
    if not fallback.exists():
        raise SystemExit(f"no bundled dataset and no {fallback}; pass --dataset")
    return str(fallback)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--method", default="rome", help="rome | memit | alphaedit | emmet | pmet")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--batch", action="store_true", help="all n cases in one edit (protocol batch, k=n)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method config override")
    ap.add_argument("--out", help="write the report JSON here")
    ap.add_argument(
        "--threads", type=int, help="torch CPU threads (1 is much faster on an oversubscribed machine)"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    from lmedit.bench import run_bench

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    t0 = time.perf_counter()
    report = run_bench(
        args.model,
        method=args.method,
        dataset=args.dataset or default_dataset(),
        n=args.n,
        protocol="batch" if args.batch else "single",
        k=args.n if args.batch else 1,
        overrides=overrides,
        out=args.out,
        progress=True,
    )
    print(report.table())
    print(json.dumps(report.meta.get("timings", {}), indent=1))
    print(f"total wall time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
