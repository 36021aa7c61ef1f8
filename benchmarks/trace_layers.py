"""Figures and tables for docs/locate.md: causal-tracing heatmaps, aggregated MLP effects, KN erase/edit.

    python benchmarks/trace_layers.py eiffel --model gemma3-270m --samples 3
    python benchmarks/trace_layers.py aggregate --model gemma3-270m --n 30 --samples 3 --window 5
    python benchmarks/trace_layers.py plot --inputs docs/img/trace-aggregate-gemma3-270m.json ...
    python benchmarks/trace_layers.py kn --model gemma3-270m --n 50 --steps 10

Cases: the bundled CounterFact set when it exists, else ../shared/data/counterfact (ROME format).
Set OMP_NUM_THREADS=1 on a shared CPU box: oversubscribed torch threads were 10x slower here.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
_CF = ROOT.parent / "shared" / "data" / "counterfact"
SHARED = [
    _CF / "counterfact_subject_replace.json",
    _CF / "counterfact_locality_other_attribution_distracting_neighbor.json",
]
BUNDLED = ROOT / "src" / "lmedit" / "data" / "bundled" / "counterfact_bundled.json"
EIFFEL = ("The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris")


def _cases(path: str | None) -> tuple[list, str]:
    """Records of the comma-separated files ``path`` (default: bundled, else the shared ROME-format files)."""
    from lmedit.locate.causal_trace import load_cases

    paths = [Path(p) for p in path.split(",")] if path else ([BUNDLED] if BUNDLED.exists() else SHARED)
    return [c for p in paths for c in load_cases(p)], ",".join(str(p) for p in paths)


def cmd_eiffel(args: argparse.Namespace) -> None:
    import lmedit
    from lmedit.locate import causal_trace, plot_trace

    loaded = lmedit.load_model(args.model)
    t0 = time.perf_counter()
    result = causal_trace(
        loaded, *EIFFEL, samples=args.samples, window=args.window, seed=args.seed, batch_size=args.batch_size
    )
    paths = plot_trace(result, IMG / f"trace-eiffel-{args.model}.png")
    print(
        f"{args.model}: clean {result.clean_prob:.4f} corrupted {result.corrupted_prob:.4f} ({time.perf_counter() - t0:.0f}s)"
    )
    print("written", *paths)


def cmd_aggregate(args: argparse.Namespace) -> None:
    import lmedit
    from lmedit.locate import aggregate, suggest_layers

    loaded = lmedit.load_model(args.model)
    cases, source = _cases(args.cases)
    t0 = time.perf_counter()
    agg = aggregate(
        loaded,
        cases,
        n=args.n,
        kinds=("mlp",),
        samples=args.samples,
        window=args.window,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    out = IMG / f"trace-aggregate-{args.model}.json"
    data = agg.to_dict() | {
        "source": source,
        "seconds": time.perf_counter() - t0,
        "suggest": suggest_layers(agg),
    }
    out.write_text(json.dumps(data, indent=1))
    curve = agg.effects["mlp"]["last_subject"]
    print(f"{args.model}: {agg.n_used} facts ({agg.n_scanned} scanned), best layer {agg.best_layer}")
    print(" ".join(f"{i}:{c:.3f}" for i, c in enumerate(curve)))
    print("written", out)


def cmd_plot(args: argparse.Namespace) -> None:
    from lmedit.locate.causal_trace import AggregateResult, plot_aggregate

    results = []
    for p in args.inputs:
        d = json.loads(Path(p).read_text())
        fields = AggregateResult.__dataclass_fields__
        results.append(AggregateResult(**{k: v for k, v in d.items() if k in fields}))
    print("written", plot_aggregate(results, IMG / "trace-aggregate-mlp.png"))


def _p(loaded, prompts: list[str], targets: list[str]) -> list[float]:
    from lmedit.evaluate.scoring import score_pairs

    return [math.exp(sum(s.logprobs)) for s in score_pairs(loaded, prompts, targets)]


def _overrides(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings -> config overrides (VALUE parsed as JSON when it parses)."""
    out = {}
    for item in pairs:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_kn(args: argparse.Namespace) -> None:
    import lmedit
    from lmedit.locate.causal_trace import case_fields
    from lmedit.registry import list_methods

    loaded = lmedit.load_model(args.model)
    cases, source = _cases(args.cases)
    rows = []
    t0 = time.perf_counter()
    for case in cases:
        if len(rows) >= args.n:
            break
        rw = case["requested_rewrite"]
        prompt, subject, true = case_fields(case)
        req = lmedit.EditRequest(
            rw["prompt"],
            subject,
            rw["target_new"]["str"],
            true,
            rephrase=case["paraphrase_prompts"][: args.rephrases],
        )
        text = req.prompt_text
        neigh = case["neighborhood_prompts"][: args.neighbours]
        pre_true = _p(loaded, [text], [req.target_true])[0]
        if pre_true < args.min_p_true:
            continue
        pre_new = _p(loaded, [text], [req.target_new])[0]
        pre_neigh = _p(loaded, neigh, [req.target_true] * len(neigh))
        pre_neigh_new = _p(loaded, neigh, [req.target_new] * len(neigh))
        row = {
            "prompt": text,
            "true": req.target_true,
            "new": req.target_new,
            "pre_true": pre_true,
            "pre_new": pre_new,
        }
        for mode in args.modes:
            methods = ["kn"] if mode != "rome" else ["rome"]
            if methods[0] not in list_methods():
                continue
            cfg = {"mode": mode, "steps": args.steps, **_overrides(args.set)} if mode != "rome" else {}
            t1 = time.perf_counter()
            patch = lmedit.edit(loaded, req, method=methods[0], **cfg)
            with patch.applied(loaded.model):
                post_true = _p(loaded, [text], [req.target_true])[0]
                post_new = _p(loaded, [text], [req.target_new])[0]
                post_neigh = _p(loaded, neigh, [req.target_true] * len(neigh))
                post_neigh_new = _p(loaded, neigh, [req.target_new] * len(neigh))
            row[mode] = {
                "post_true": post_true,
                "post_new": post_new,
                "neigh_abs_change": sum(abs(a - b) for a, b in zip(pre_neigh, post_neigh))
                / max(len(neigh), 1),
                # ROME's neighbourhood score: share of neighbours where P(true) > P(new), before and after
                "neigh_score_pre": sum(a > b for a, b in zip(pre_neigh, pre_neigh_new)) / max(len(neigh), 1),
                "neigh_score_post": sum(a > b for a, b in zip(post_neigh, post_neigh_new))
                / max(len(neigh), 1),
                "neurons": patch.info.get("requests", [{}])[0].get("neurons"),
                "seconds": time.perf_counter() - t1,
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {
        "model": args.model,
        "source": source,
        "n": len(rows),
        "steps": args.steps,
        "rephrases": args.rephrases,
        "min_p_true": args.min_p_true,
        "seconds": time.perf_counter() - t0,
    }
    for mode in args.modes:
        got = [r[mode] | {"pre_true": r["pre_true"], "pre_new": r["pre_new"]} for r in rows if mode in r]
        if not got:
            continue
        summary[mode] = {
            "n": len(got),
            "frac_true_drops": sum(g["post_true"] < g["pre_true"] for g in got) / len(got),
            "mean_pre_true": sum(g["pre_true"] for g in got) / len(got),
            "mean_post_true": sum(g["post_true"] for g in got) / len(got),
            "efficacy_new_gt_true": sum(g["post_new"] > g["post_true"] for g in got) / len(got),
            "mean_post_new": sum(g["post_new"] for g in got) / len(got),
            "mean_neigh_abs_change": sum(g["neigh_abs_change"] for g in got) / len(got),
            "frac_neigh_within_0.1": sum(g["neigh_abs_change"] <= 0.1 for g in got) / len(got),
            "neighborhood_score_pre": sum(g["neigh_score_pre"] for g in got) / len(got),
            "neighborhood_score_post": sum(g["neigh_score_post"] for g in got) / len(got),
        }
    out = Path(args.out) if args.out else IMG / f"trace-kn-{args.model}.json"
    out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(json.dumps(summary, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["eiffel", "aggregate", "plot", "kn"])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--cases", help="dataset file (default: bundled, else shared ROME-format CounterFact)")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--inputs", nargs="*", default=[])
    ap.add_argument("--steps", type=int, default=20, help="KN integrated-gradient steps")
    ap.add_argument(
        "--modes", nargs="*", default=["erase", "edit"], help="KN modes (and 'rome' if registered)"
    )
    ap.add_argument("--rephrases", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="KN config override KEY=VALUE (JSON value)")
    ap.add_argument("--out", help="kn: results JSON (default docs/img/trace-kn-MODEL.json)")
    ap.add_argument("--neighbours", type=int, default=5)
    ap.add_argument("--min-p-true", type=float, default=0.0, help="KN: skip facts with P(true) below this")
    args = ap.parse_args()
    IMG.mkdir(parents=True, exist_ok=True)
    {"eiffel": cmd_eiffel, "aggregate": cmd_aggregate, "plot": cmd_plot, "kn": cmd_kn}[args.part](args)


if __name__ == "__main__":
    main()
