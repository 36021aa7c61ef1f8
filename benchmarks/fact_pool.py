"""Write a WISE factual pool (``irrelevant_facts``) that shares nothing with the cases a benchmark evaluates.

CounterFact repeats prompts across records (a neighbourhood prompt of one case is often the edit or neighbourhood
prompt of another), so "the records after the evaluated ones" still holds some evaluated probes. This keeps the
records from ``--start`` on and drops every record one of whose prompts is an evaluated probe (edit prompt,
paraphrase, neighbourhood or portability prompt of the first ``--eval-n`` records) or names an evaluated subject.

    python benchmarks/fact_pool.py ../shared/data/counterfact/counterfact-edit.json --eval-n 1000 --start 5000 \\
        --out runs/cf-pool.json
    lmedit bench --method wise --n 1000 ... --set irrelevant_facts=runs/cf-pool.json

A benchmark that evaluates other cases before these (the lifelong set ``bundled,counterfact-edit.json``) names
them with ``--also``: their probes and subjects are kept out of the pool as well.

    python benchmarks/fact_pool.py ../shared/data/counterfact/counterfact-edit.json --also bundled --eval-n 631 \\
        --start 5000 --out runs/cf-pool-lifelong.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmedit.data.loaders import load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", help="a dataset file (the evaluated cases come first)")
    ap.add_argument("--eval-n", type=int, required=True, help="the benchmark evaluates the first N cases")
    ap.add_argument("--start", type=int, required=True, help="first record of the pool (>= --eval-n)")
    ap.add_argument("--out", required=True, help="JSON list of the kept records, in the input's format")
    ap.add_argument(
        "--also", help="another evaluated dataset (name or file; a,b for several), all of its cases"
    )
    args = ap.parse_args()
    if args.start < args.eval_n:
        raise SystemExit(f"--start ({args.start}) must be >= --eval-n ({args.eval_n})")
    records = json.loads(Path(args.dataset).read_text(encoding="utf-8"))
    cases = load_dataset(args.dataset).cases
    if len(cases) != len(records):
        raise SystemExit(f"{args.dataset}: {len(records) - len(cases)} records were skipped on loading")

    def prompts(case) -> set[str]:
        return {p.prompt.rstrip() for kind in case.probes().values() for p in kind}

    others = load_dataset(args.also).cases if args.also else []
    evaluated_cases = list(cases[: args.eval_n]) + list(others)
    evaluated = set().union(*(prompts(c) for c in evaluated_cases))
    subjects = [r.subject.lower() for c in evaluated_cases for r in c.requests]
    kept = []
    for rec, case in zip(records[args.start :], cases[args.start :], strict=True):
        ps = prompts(case)
        if ps & evaluated or any(s in p.lower() for p in ps for s in subjects):
            continue
        kept.append(rec)
    Path(args.out).write_text(json.dumps(kept), encoding="utf-8")
    print(f"{len(kept)} of {len(records) - args.start} records kept -> {args.out}")


if __name__ == "__main__":
    main()
