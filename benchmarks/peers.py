"""lmedit vs EasyEdit vs FastEdit: key statistics, ROME and MEMIT on the same model, cases, layers and corpus.

    bash benchmarks/setup_peers.sh          # once: the peers' virtualenvs (see benchmarks/PEERS.md)
    python benchmarks/peers.py --model smollm2-135m --rome-n 10 --memit-n 100 --threads 1 --out runs/peers.json

One process group, run one after the other (never side by side, so no run slows another): lmedit in this
process, then each peer as a child process with its own virtualenv (``benchmarks/peer_easyedit.py``,
``benchmarks/peer_fastedit.py``). Everything that can be the same is the same:

- model: the dequantized folder lmedit caches (``lmedit.load_model(...).source['cache']``), float32, ``--threads`` torch threads;
- cases: the first ``--rome-n`` / ``--memit-n`` cases of ``--dataset`` written once to a JSON file all three read;
- layers: ``--rome-layer`` (default 5, EasyEdit's and FastEdit's default) and ``--memit-layers`` (4-8);
- statistics: ``--stats-tokens`` tokens of ``--stats-corpus`` (WikiText-2 test) in rows of ``--stats-seq-len``;
  lmedit computes all MEMIT layers in one pass (timed without its cache, then cached for the edits),
  EasyEdit one pass per layer (its ``layer_stats``; its npz cache is shared between its MEMIT and ROME runs);
  FastEdit has no statistics;
- value optimisation: EasyEdit's llama yaml for all: 25 steps, lr 0.5, KL 0.0625, clamp 4, weight decay 1e-3
  (lmedit's default weight decay is ROME's 0.5: the loss then rarely falls below the early-stop 0.05);
- protocol: ROME one request per edit, weights restored after each; MEMIT all cases in one batch;
- context templates: lmedit's defaults (ROME 11, MEMIT 6: ``n_templates``; ``--templates N`` gives both the plain
  prompt and the first N-1; ``--template-source sampled`` samples them from the model with top-k 5, as
  EasyEdit's MEMIT does); EasyEdit's MEMIT generates 1 + 5 and its ROME 1 + 20.

Reported per system: edit wall seconds per request (ROME median; MEMIT the batch / n), statistics seconds for the
MEMIT layers, the process's peak RSS, and teacher-forced token accuracies (lmedit's reliability_tf /
generalization_tf / locality_tf, EasyEdit's rewrite_acc / rephrase_acc / locality_acc and FastEdit's runner
computing EasyEdit's definitions: token accuracy of the target given the prompt; locality = agreement with the
pre-edit model's argmax tokens). The ratios peer / lmedit are printed and stored in ``--out``.

EasyEdit's MEMIT batch is also scored by lmedit's own evaluator (row "easyedit (lmedit's scoring)"): its runner
saves the weight changes of the batch (``--save-deltas``) and this script applies them to lmedit's copy of the
model as an ``EditPatch`` of dense deltas and scores the same cases as lmedit's MEMIT run (every paraphrase, the
in-scope locality rule), so a score gap between the two rows above it is the algorithm's, not the evaluation's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"
PEERS = Path(os.environ.get("PEERS_DIR", "/work/peers"))
RUNNERS = {
    "easyedit": (PEERS / "easyedit-venv" / "bin" / "python", HERE / "peer_easyedit.py", ("rome", "memit")),
    "fastedit": (PEERS / "fastedit-venv" / "bin" / "python", HERE / "peer_fastedit.py", ("rome",)),
}
METRIC_NAMES = {  # lmedit report key -> the peers' key
    "reliability_tf": "rewrite_acc",
    "generalization_tf": "rephrase_acc",
    "locality_tf": "locality_acc",
}


def case_record(case) -> dict:
    """The runners' request format (``EditRequest.to_dict`` plus the case's probes)."""
    rec = case.requests[0].to_dict()
    rec["rephrase"] = [p.prompt for p in case.generalization]
    rec["locality"] = [[p.prompt, p.answer] for p in case.locality]
    rec["portability"] = [[p.prompt, p.answer] for p in case.portability]
    return rec


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_lmedit(args, loaded, cases, common: dict) -> dict:
    """Statistics for the MEMIT layers (one pass, timed), ROME single edits and one MEMIT batch."""
    from lmedit.core.stats import key_stats
    from lmedit.evaluate.protocols import ScoringSettings, evaluate

    out: dict = {"peer": "lmedit"}
    layers = sorted(set(args.memit_layers) | {args.rome_layer})
    stats_kw = dict(corpus=args.stats_corpus, n_tokens=args.stats_tokens, seq_len=args.stats_seq_len)
    t0, c0 = time.perf_counter(), time.process_time()
    # one timed pass that also fills the cache the edits read
    key_stats(loaded, layers, refresh=True, progress=False, **stats_kw)
    out["stats"] = {
        "layers": layers,
        "seconds": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
        "passes": 1,
    }
    settings = ScoringSettings(families=("tf",))
    for method, n in (("rome", args.rome_n), ("memit", args.memit_n)):
        if not n:
            continue
        cfg = dict(common)
        if method == "rome":
            cfg["layer"] = args.rome_layer
        else:
            cfg.update(layers=args.memit_layers, mom2_update_weight=args.mom2_update_weight)
        protocol, k = ("single", 1) if method == "rome" else ("batch", n)
        rep = evaluate(loaded, cases[:n], method, protocol=protocol, k=k, config=cfg, settings=settings)
        secs = [e["seconds"] for e in rep.meta["edits"]]
        cpus = [e["cpu_seconds"] for e in rep.meta["edits"]]
        out[method] = {
            "n": n,
            "edit_s_per_request": sorted(secs)[len(secs) // 2] if method == "rome" else secs[0] / n,
            "edit_cpu_s_per_request": sorted(cpus)[len(cpus) // 2] if method == "rome" else cpus[0] / n,
            "value_timing": [e["info"].get("value_timing") for e in rep.meta["edits"]],
            "edit_s_total": sum(secs),
            "metrics": {k: rep.post.get(k) for k in METRIC_NAMES},
            "pre": {k: rep.pre.get(k) for k in METRIC_NAMES},
        }
    out["peak_rss_mib_process"] = peak_rss_mib()
    return out


def run_peer(
    name: str, method: str, n: int, loaded, model_dir: str, cases, cases_path: Path, args, stats_dir: Path
) -> dict:
    python, script, methods = RUNNERS[name]
    if method not in methods:
        return {"skipped": f"{name} has no {method}"}
    if not python.exists():
        return {"skipped": f"{python} missing: run bash benchmarks/setup_peers.sh"}
    layers = args.memit_layers if method == "memit" else [args.rome_layer]
    with tempfile.TemporaryDirectory() as tmp:
        res_path = Path(tmp) / "result.json"
        cmd = [str(python), str(script), "--model-dir", model_dir, "--cases", str(cases_path), "--n", str(n),
               "--method", method, "--layers", ",".join(map(str, layers)), "--threads", str(args.threads),
               "--stats-corpus", args.stats_corpus, "--stats-tokens", str(args.stats_tokens),
               "--out", str(res_path)]  # fmt: skip
        if name == "easyedit":
            cmd += ["--stats-seq-len", str(args.stats_seq_len), "--stats-dir", str(stats_dir)]
            cmd += ["--mom2-update-weight", str(args.mom2_update_weight)]
            if method == "memit":
                cmd += ["--save-deltas", str(Path(tmp) / "deltas.safetensors")]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        log = Path(args.out).with_suffix(f".{name}-{method}.log") if args.out else Path(os.devnull)
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0:
            return {"failed": f"exit {proc.returncode}; log: {log}"}
        res = json.loads(res_path.read_text())
        if res.get("deltas"):  # the peer's edit, scored by lmedit's evaluator (read before tmp goes away)
            from safetensors.torch import load_file

            res["lmedit_scored"] = score_deltas(loaded, cases[:n], load_file(res["deltas"]))
        return res


def score_deltas(loaded, cases, deltas: dict) -> dict:
    """lmedit's metrics (batch protocol, teacher-forced) of a peer's weight changes ``{param name: delta}``.

    The changes go through an ``EditPatch`` of dense deltas, so they are applied and reverted by the same
    mechanism as lmedit's own edits; the cases and the in-scope locality rule are those of lmedit's MEMIT run.
    """
    from lmedit.core.delta import DenseDelta
    from lmedit.core.patch import EditPatch
    from lmedit.evaluate import metrics as M
    from lmedit.evaluate.protocols import ScoringSettings, case_metrics, in_scope_locality, score_cases

    kept, _dropped = in_scope_locality(list(cases), len(cases), "batch")
    settings = ScoringSettings(families=("tf",))
    pre = score_cases(loaded, kept, settings)
    patch = EditPatch(
        method="external",
        config={},
        requests=[],
        deltas=[DenseDelta(name, d) for name, d in deltas.items()],
        base=EditPatch.base_of(loaded, list(deltas)),
    )
    with patch.applied(loaded.model):
        post = score_cases(loaded, kept, settings)
    agg = M.aggregate([case_metrics(c, po, pr, settings) for c, po, pr in zip(kept, post, pre)])
    return {ours: agg.get(ours) for ours in METRIC_NAMES}


def peer_summary(method: str, res: dict) -> dict:
    """The fields compared, from a runner's JSON."""
    if "timing" not in res:
        return res
    t, post = res["timing"], res["metrics"]["post"]
    per_layer = t.get("stats_per_layer") or []
    cpus = t.get("edit_cpu_s_per_request") or []
    return {
        "edit_s_per_request": t["edit_s_median"] if method == "rome" else t["batch_edit_s_per_request"],
        "edit_cpu_s_per_request": (
            (sorted(cpus)[len(cpus) // 2] if method == "rome" else cpus[0] / res["n_cases"]) if cpus else None
        ),
        "stats_s": sum(r["seconds"] for r in per_layer) if per_layer else None,
        "stats_layers": [r["layer"] for r in per_layer],
        # the runner's process figure is getrusage's ru_maxrss, which Linux carries across exec from this driver
        # (lmedit's model and statistics): the largest per-request VmHWM is the peer's own peak
        "peak_rss_mib_process": max(res["memory"]["peak_rss_mib_per_request"] or [float("nan")]),
        "metrics": {ours: post.get(theirs) for ours, theirs in METRIC_NAMES.items()},
        "pre": {ours: res["metrics"]["pre"].get(theirs) for ours, theirs in METRIC_NAMES.items()},
        "lmedit_scored": res.get("lmedit_scored"),
    }


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def print_table(result: dict, peers: list[str]) -> None:
    """The comparison table (peer / lmedit ratios are added to ``result`` in place)."""
    ours = result["lmedit"]
    rows = [("system", "method", "edit s/request", "x lmedit", "CPU s/request", "x lmedit", "stats s", "x lmedit",
             "peak RSS MiB", "rel_tf", "gen_tf", "loc_tf")]  # fmt: skip
    for method in ("rome", "memit"):
        if method not in ours:
            continue
        o = ours[method]
        o_cpu = o.get("edit_cpu_s_per_request")  # absent in results saved before it was recorded
        rows.append(("lmedit", method, _fmt(o["edit_s_per_request"]), "1", _fmt(o_cpu), "1",
                     _fmt(ours["stats"]["seconds"]), "1", _fmt(ours["peak_rss_mib_process"]),
                     *(_fmt(o["metrics"][k]) for k in METRIC_NAMES)))  # fmt: skip
        for p in peers:
            r = result.get(p, {}).get(method, {})
            if "edit_s_per_request" not in r:
                rows.append((p, method, next(iter(r.values()), "-"), "", "", "", "", "", "", "", "", ""))
                continue
            r["edit_ratio"] = r["edit_s_per_request"] / o["edit_s_per_request"]
            r_cpu = r.get("edit_cpu_s_per_request")
            if r_cpu and o_cpu:
                r["edit_cpu_ratio"] = r_cpu / o_cpu
            if r["stats_s"] and method == "memit":
                r["stats_ratio"] = r["stats_s"] / ours["stats"]["seconds"]
            rows.append((p, method, _fmt(r["edit_s_per_request"]), f"{r['edit_ratio']:.1f}x", _fmt(r_cpu),
                         f"{r['edit_cpu_ratio']:.1f}x" if "edit_cpu_ratio" in r else "", _fmt(r["stats_s"]), f"{r['stats_ratio']:.1f}x" if "stats_ratio" in r else "",
                         _fmt(r["peak_rss_mib_process"]), *(_fmt(r["metrics"][k]) for k in METRIC_NAMES)))  # fmt: skip
            # the same edit under lmedit's evaluator: these scores compare like for like with lmedit's row
            if r.get("lmedit_scored"):
                rows.append((f"{p} (lmedit's scoring)", method, "", "", "", "", "", "", "",
                             *(_fmt(r["lmedit_scored"][k]) for k in METRIC_NAMES)))  # fmt: skip
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="bundled")
    ap.add_argument("--rome-n", type=int, default=10, help="ROME single edits (0: skip)")
    ap.add_argument("--memit-n", type=int, default=100, help="MEMIT batch size (0: skip)")
    ap.add_argument("--rome-layer", type=int, default=5)
    ap.add_argument("--memit-layers", default="4,5,6,7,8")
    ap.add_argument("--mom2-update-weight", type=float, default=15000)
    ap.add_argument("--stats-corpus", default=str(SHARED / "wikitext-2" / "test.txt"))
    ap.add_argument("--stats-tokens", type=int, default=120_000)
    ap.add_argument("--stats-seq-len", type=int, default=512)
    ap.add_argument(
        "--templates",
        type=int,
        default=None,
        help="lmedit's context templates: the plain prompt and the first N-1 bundled ones (default: each "
        "method's n_templates, ROME 11, MEMIT 6; EasyEdit's MEMIT generates 1 + 5, its ROME 1 + 20)",
    )
    ap.add_argument(
        "--template-source",
        choices=("fixed", "generated", "sampled"),
        default="fixed",
        help="lmedit's templates: the bundled fixed ones, greedy or seeded top-5 sampled continuations (the "
        "latter drawn as EasyEdit's MEMIT draws its own); with --templates N, N templates of that source",
    )
    ap.add_argument("--peers", default="easyedit,fastedit", help="comma list, '' for lmedit only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="result JSON (peer logs go beside it)")
    ap.add_argument("--table", metavar="JSON", help="print the comparison table of a saved result and exit")
    args = ap.parse_args()
    if args.table:
        saved = json.loads(Path(args.table).read_text())
        print_table(saved, [p for p in RUNNERS if p in saved])
        return 0
    args.memit_layers = [int(x) for x in args.memit_layers.split(",")]
    peers = [p for p in args.peers.split(",") if p]
    for p in peers:
        if p not in RUNNERS:
            raise SystemExit(f"--peers: unknown peer {p!r}; choose from {sorted(RUNNERS)}")

    import torch

    import lmedit
    from lmedit.data.loaders import load_dataset

    torch.set_num_threads(args.threads)
    loaded = lmedit.load_model(args.model)
    model_dir = loaded.source.get("cache") or loaded.source.get("path")
    if not model_dir or not Path(model_dir).is_dir():
        raise SystemExit(
            f"--model {args.model}: the peers need a local HF folder; lmedit's source is {loaded.source}"
        )
    n_cases = max(args.rome_n, args.memit_n)
    cases = load_dataset(args.dataset, n=n_cases).cases
    common = dict(
        stats_corpus=args.stats_corpus, stats_tokens=args.stats_tokens, stats_seq_len=args.stats_seq_len,
        v_steps=25, v_lr=0.5, kl_factor=0.0625, clamp_norm_factor=4.0, v_weight_decay=1e-3,
    )  # fmt: skip
    if args.template_source != "fixed":
        common["template_source"] = args.template_source
        if args.templates is not None:
            common["n_templates"] = args.templates
    elif args.templates is not None:
        from lmedit.core.keys import DEFAULT_TEMPLATES

        if not 1 <= args.templates <= len(DEFAULT_TEMPLATES):
            raise SystemExit(f"--templates must be 1..{len(DEFAULT_TEMPLATES)}, got {args.templates}")
        common["context_templates"] = list(DEFAULT_TEMPLATES[: args.templates])
    result: dict = {"model": args.model, "model_dir": model_dir, "args": vars(args), "date": time.ctime()}
    with tempfile.TemporaryDirectory() as tmp:
        cases_path = Path(tmp) / "cases.json"
        cases_path.write_text(json.dumps([case_record(c) for c in cases]))
        print(
            f"lmedit: statistics for layers {args.memit_layers}, ROME x{args.rome_n}, MEMIT batch of {args.memit_n}"
        )
        result["lmedit"] = run_lmedit(args, loaded, cases, common)
        stats_dir = Path(tmp) / "easyedit-stats"
        for p in peers:  # MEMIT first: EasyEdit's MEMIT run computes (and times) every layer's statistics
            for method, n in (("memit", args.memit_n), ("rome", args.rome_n)):
                if n:
                    print(f"{p}: {method} x{n} ...", flush=True)
                    raw = run_peer(p, method, n, loaded, model_dir, cases, cases_path, args, stats_dir)
                    result.setdefault(p, {})[method] = peer_summary(method, raw)
                    if args.out:  # after every stage, so a late failure keeps what was measured
                        Path(args.out).write_text(json.dumps(result, indent=1))
    print_table(result, peers)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
