"""The ``lmedit`` command line: thin wrappers over the public API.

    lmedit demo                                   # edit the bundled model, show before/after, undo
    lmedit edit --prompt "The Eiffel Tower is located in the city of" --subject "Eiffel Tower" \\
                --target " Rome" --method ft-m --out patches/eiffel
    lmedit patch show patches/eiffel
    lmedit generate --prompt "The Eiffel Tower is located in" --patch patches/eiffel
    lmedit methods --describe ft-m
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("lmedit.cli")


def _requests_from_args(args: argparse.Namespace) -> list[dict]:
    if args.request:
        path = Path(args.request)
        if not path.exists():
            raise SystemExit(f"--request: no such file {path}")
        text = path.read_text()
        if path.suffix == ".jsonl":
            reqs = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            reqs = data if isinstance(data, list) else [data.get("request", data)]
        return reqs
    if not (args.prompt and args.subject and args.target):
        raise SystemExit("give --request FILE, or --prompt, --subject and --target")
    req = {"prompt": args.prompt, "subject": args.subject, "target_new": args.target}
    if args.target_true:
        req["target_true"] = args.target_true
    return [req]


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _generate_table(loaded, prompts: list[tuple[str, str]], max_new_tokens: int) -> dict[str, str]:
    from lmedit.evaluate.scoring import greedy_generate

    gens = greedy_generate(loaded, [p for _, p in prompts], max_new_tokens=max_new_tokens)
    return {p: g for (_, p), g in zip(prompts, gens)}


def cmd_demo(args: argparse.Namespace) -> int:
    import lmedit
    from lmedit.data import bundled_json

    t0 = time.perf_counter()
    print(f"loading {args.model} ...", flush=True)
    loaded = lmedit.load_model(args.model, device=args.device)
    print(
        f"  loaded in {time.perf_counter() - t0:.1f}s ({loaded.arch.name}, {loaded.arch.n_layers(loaded.model)} layers)"
    )
    request = lmedit.EditRequest.from_dict(bundled_json("demo.json")["request"])
    probes = [("edit prompt", request.prompt_text)]
    probes += [(f"paraphrase {i + 1}", p) for i, p in enumerate(request.rephrase)]
    probes += [(f"unrelated {i + 1}", p) for i, (p, _) in enumerate(request.locality)]
    probes += [(f"consequence {i + 1}", p) for i, (p, _) in enumerate(request.portability)]
    before = _generate_table(loaded, probes, args.max_new_tokens)
    print(
        f"\nedit: {request.prompt_text!r} -> {request.target_new!r} (was {request.target_true!r}), method {args.method}"
    )
    t1 = time.perf_counter()
    patch = lmedit.edit(loaded, request, method=args.method, **_overrides(args.set))
    print(f"  computed in {time.perf_counter() - t1:.1f}s: {patch.info}")
    session = lmedit.EditSession(loaded)
    session.apply(patch)
    after = _generate_table(loaded, probes, args.max_new_tokens)
    width = max(len(p) for _, p in probes)
    print(f"\n{'kind':<14} {'prompt':<{width}} | before -> after")
    for kind, p in probes:
        print(
            f"{kind:<14} {p:<{width}} | {before[p].strip()!r}\n{'':<14} {'':<{width}} |   -> {after[p].strip()!r}"
        )
    out = Path(args.out)
    patch.save(out)
    print(f"\npatch saved to {out}/ ({', '.join(sorted(f.name for f in out.iterdir()))})")
    session.undo()
    restored = _generate_table(loaded, probes[:1], args.max_new_tokens)[request.prompt_text]
    status = "original answer is back" if restored == before[request.prompt_text] else "MISMATCH after undo"
    print(f"undo: {request.prompt_text!r} -> {restored.strip()!r} ({status})")
    reloaded = lmedit.EditPatch.load(out)
    with reloaded.applied(loaded.model):
        again = _generate_table(loaded, probes[:1], args.max_new_tokens)[request.prompt_text]
    print(
        f"re-applied from disk: -> {again.strip()!r} ({'same as the edit' if again == after[request.prompt_text] else 'DIFFERENT'})"
    )
    return 0 if status.startswith("original") else 1


def cmd_edit(args: argparse.Namespace) -> int:
    import lmedit

    loaded = lmedit.load_model(args.model, device=args.device)
    requests = _requests_from_args(args)
    t0 = time.perf_counter()
    patch = lmedit.edit(loaded, requests, method=args.method, **_overrides(args.set))
    print(f"computed {args.method} edit of {len(requests)} request(s) in {time.perf_counter() - t0:.1f}s")
    if args.show:
        reqs = [lmedit.EditRequest.from_dict(r) for r in patch.requests]
        prompts = [r.prompt_text for r in reqs]
        pre = lmedit.greedy_generate(loaded, prompts, args.max_new_tokens)
        with patch.applied(loaded.model):
            post = lmedit.greedy_generate(loaded, prompts, args.max_new_tokens)
        for p, a, b in zip(prompts, pre, post):
            print(f"{p!r}\n  before: {a.strip()!r}\n  after:  {b.strip()!r}")
    if args.out:
        patch.save(args.out)
        print(f"patch saved to {args.out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import lmedit

    loaded = lmedit.load_model(args.model, device=args.device)
    prompts = args.prompt
    if args.patch:
        patch = lmedit.EditPatch.load(args.patch)
        with patch.applied(loaded.model):
            outs = lmedit.greedy_generate(loaded, prompts, args.max_new_tokens)
    else:
        outs = lmedit.greedy_generate(loaded, prompts, args.max_new_tokens)
    for p, o in zip(prompts, outs):
        print(f"{p}{o}")
    return 0


def cmd_patch(args: argparse.Namespace) -> int:
    import lmedit

    patch = lmedit.EditPatch.load(args.dir)
    if args.action == "show":
        print(patch.summary())
        return 0
    if not args.model or not args.out:
        raise SystemExit(f"patch {args.action} needs --model and --out")
    loaded = lmedit.load_model(args.model, device=args.device)
    if args.action == "apply":
        patch.apply(loaded)
        print(f"applied {patch.method} patch to {args.model} (fingerprints verified)")
    else:
        exact = _revert_on_disk(patch, loaded)
        print(
            "reverted: "
            + ("bit-exact (base fingerprints match)" if exact else "restored up to float rounding")
        )
    loaded.model.save_pretrained(args.out)
    loaded.tokenizer.save_pretrained(args.out)
    print(f"model written to {args.out}")
    return 0


def _revert_on_disk(patch, loaded) -> bool:
    """Subtract a patch from an edited model loaded from disk; True if the base tensors came back exactly."""
    from lmedit.core.delta import fingerprint, get_parameter

    with torch.no_grad():
        for d in patch.deltas:
            p = get_parameter(loaded.model, d.name)
            p.copy_((p.float() - d.materialize()).to(p.dtype))
    fps = patch.base.get("fingerprints", {})
    return all(fingerprint(get_parameter(loaded.model, n)) == fp for n, fp in fps.items())


def cmd_bench(args: argparse.Namespace) -> int:
    from lmedit.evaluate.report import Report, compare_table

    if args.compare:
        reports = [Report.load(p) for p in args.compare]
        labels = [Path(p).stem for p in args.compare]
        print(compare_table(reports, labels))
        if args.plot:
            from lmedit.evaluate.plots import retention_compare

            print(f"retention curves written to {retention_compare(reports, labels, args.plot)}")
        return 0
    from lmedit.bench import default_plot_path, run_bench
    from lmedit.evaluate.protocols import ScoringSettings

    settings = ScoringSettings(
        families=tuple(args.scoring.split(",")), text_tokens=args.text_tokens, batch_size=args.batch_size
    )
    eval_every = 1 if args.eval_each_step else args.eval_every
    sequential_curve = args.protocol == "sequential" and eval_every > 0
    report = run_bench(
        args.model,
        device=args.device,
        method=args.method,
        dataset=args.dataset,
        n=args.n,
        sample=args.sample,
        protocol=args.protocol,
        k=args.step,
        eval_every=eval_every,
        seed=args.seed,
        overrides=_overrides(args.set),
        settings=settings,
        out=args.out,
        plot=(args.plot or default_plot_path(args.out)) if sequential_curve else None,
        perplexity=args.perplexity,
        perplexity_tokens=args.perplexity_tokens,
        checkpoint=args.checkpoint,
    )
    print(report.table())
    if "perplexity" in report.meta:
        ppl = report.meta["perplexity"]
        print(
            f"perplexity of {ppl['source']} ({ppl['tokens']} tokens): {ppl['pre']:.3f} -> {ppl['post']:.3f}"
        )
    t = report.meta["timings"]
    print(
        f"\nedit {t['edit_s']:.1f}s, evaluation {t['pre_s'] + t['eval_s']:.1f}s "
        f"({t['eval_per_case_s']:.3f}s per case post-edit), total {t['total_s']:.1f}s"
    )
    if args.out:
        print(f"report written to {args.out}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Precompute (or look up) key statistics E[k k^T] for locate-then-edit methods."""
    from lmedit.core.stats import key_stats
    from lmedit.models.load import load_model

    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--layers expects comma-separated integers, got {args.layers!r}") from None
    loaded = load_model(args.model, device=args.device)
    t0 = time.perf_counter()
    stats = key_stats(
        loaded,
        layers,
        corpus=args.corpus,
        n_tokens=args.tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        cache=not args.no_cache,
        progress=True,
        refresh=args.refresh,
    )
    for layer, st in sorted(stats.items()):
        prov = st.provenance
        print(
            f"layer {layer}: {st.module} d={st.mom2.shape[0]} tokens={st.count} "
            f"corpus={prov.get('corpus', {}).get('id')} fingerprint={prov.get('fingerprint')}"
        )
    print(f"done in {time.perf_counter() - t0:.1f} s (cached statistics load instantly)")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from lmedit.config import describe
    from lmedit.registry import get_method, list_methods

    names = [args.describe] if args.describe else list_methods()
    for name in names:
        info = get_method(name)
        print(f"{info.name:<10} [{info.family}] {info.summary}")
        if args.describe:
            for field, tp, default, help_ in describe(info.config_cls):
                print(f"  {field:<18} {tp:<22} default={default!r}\n  {'':<18} {help_}")
            if info.presets:
                print(f"  presets: {json.dumps(info.presets)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from lmedit.serve import resolve_token, serve

    token = resolve_token(args.host, args.token)  # refuses a non-loopback host without a token
    print(f"loading {args.model} and serving on http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    serve(args.model, host=args.host, port=args.port, token=token, device=args.device)
    return 0


def _trace_cases(spec: str | None) -> list:
    from lmedit.locate.causal_trace import load_cases

    if spec in (None, "bundled"):
        from lmedit.data import bundled_json

        try:
            return list(bundled_json("counterfact_bundled.json"))
        except FileNotFoundError:
            raise SystemExit(
                "no bundled CounterFact set in this install: pass --aggregate FILE.json"
            ) from None
    if not Path(spec).exists():
        raise SystemExit(f"--aggregate: no such file {spec}")
    return load_cases(spec)


def cmd_trace(args: argparse.Namespace) -> int:
    import lmedit
    from lmedit.locate import aggregate, causal_trace, plot_aggregate, plot_trace, suggest_layers

    loaded = lmedit.load_model(args.model, device=args.device)
    default_kinds = "mlp" if (args.aggregate or args.suggest_layers) else "hidden,mlp,attn"
    kinds = tuple((args.kinds or default_kinds).split(","))
    common = dict(samples=args.samples, window=args.window, seed=args.seed, noise=args.noise)
    if args.aggregate or args.suggest_layers:
        t0 = time.perf_counter()
        cases = _trace_cases(args.aggregate)
        agg = aggregate(loaded, cases, n=args.n, kinds=kinds, known_only=not args.include_unknown, **common)
        print(
            f"{agg.n_used} facts traced ({agg.n_scanned} scanned, known_only={agg.known_only}) in "
            f"{time.perf_counter() - t0:.0f}s; mean clean p {agg.mean_clean_prob:.3f}, "
            f"corrupted p {agg.mean_corrupted_prob:.3f}"
        )
        print(f"{'layer':>5} " + " ".join(f"{k + ' @subj':>11}" for k in kinds))
        for layer in range(len(agg.effects[kinds[0]]["last_subject"])):
            cells = " ".join(f"{agg.effects[k]['last_subject'][layer]:>11.4f}" for k in kinds)
            print(f"{layer:>5} {cells}")
        print(
            f"best layer (largest {'mlp' if 'mlp' in kinds else kinds[0]} effect at the last subject token): {agg.best_layer}"
        )
        if args.suggest_layers:
            print(
                "suggested presets: "
                + json.dumps({k: v for k, v in suggest_layers(agg).items() if k in ("rome", "memit")})
            )
        if args.out:
            out = Path(args.out)
            agg.save_json(out / "aggregate.json")
            plot_aggregate([agg], out / "aggregate-mlp.png", kind="mlp" if "mlp" in kinds else kinds[0])
            print(f"written {out}/aggregate.json and aggregate-*.png")
        return 0
    if not (args.prompt and args.subject):
        raise SystemExit("trace needs --prompt and --subject (or --aggregate FILE / --suggest-layers)")
    t0 = time.perf_counter()
    result = causal_trace(loaded, args.prompt, args.subject, args.answer, kinds=kinds, **common)
    print(
        f"traced {result.answer!r}: clean p {result.clean_prob:.4f}, corrupted p {result.corrupted_prob:.4f} "
        f"({time.perf_counter() - t0:.0f}s)"
    )
    for k in kinds:
        eff = result.effect(k)
        layer, t = divmod(int(eff.argmax()), eff.shape[1])
        print(
            f"  {k:<6} largest restoration: layer {layer}, token {t} {result.tokens[t]!r}, p {result.scores[k][layer, t]:.4f}"
        )
    if args.out:
        paths = plot_trace(result, Path(args.out) / "trace.png")
        print("written " + ", ".join(str(p) for p in paths))
    return 0


def cmd_ffn(args: argparse.Namespace) -> int:
    import lmedit
    from lmedit.locate.ffn import ffn_report

    loaded = lmedit.load_model(args.model, device=args.device)
    report = ffn_report(
        loaded,
        args.prompt,
        args.layer,
        args.position,
        k=args.k,
        top_tokens=args.top_tokens,
        projection=args.projection,
    )
    print(report.table())
    if args.out:
        Path(args.out).write_text(json.dumps(report.to_dict(), indent=1))
        print(f"written {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lmedit.models.load import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="lmedit", description="Knowledge editing of language models.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model",
            default=DEFAULT_MODEL,
            help=f"bundled name, folder, .gguf or hub id (default {DEFAULT_MODEL})",
        )
        device_arg(p)

    def device_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--device", help="torch device to load the model on, e.g. cuda or cuda:1 (default cpu)"
        )

    p = sub.add_parser("demo", help="edit the bundled model, show before/after generations, save and undo")
    model_arg(p)
    p.add_argument(
        "--method", default="grace", help="editing method (default grace; try rome or ft-m to compare)"
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="method config override (repeatable)")
    p.add_argument("--out", default="patches/demo-eiffel", help="where to save the patch")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("edit", help="compute an edit and save it as a patch")
    model_arg(p)
    p.add_argument("--method", default="ft-m", help="editing method (see `lmedit methods`)")
    p.add_argument("--request", help="JSON (object or list) or JSONL file of requests")
    p.add_argument("--prompt", help="edit prompt (contains the subject, or '{}')")
    p.add_argument("--subject", help="the subject in the prompt")
    p.add_argument("--target", help="new target, e.g. ' Rome'")
    p.add_argument("--target-true", help="current answer (optional)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="method config override (repeatable)")
    p.add_argument("--out", help="patch folder to write")
    p.add_argument("--show", action="store_true", help="print before/after greedy generations of the prompts")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.set_defaults(fn=cmd_edit)

    p = sub.add_parser("generate", help="greedy generation, optionally with a patch applied")
    model_arg(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    p.add_argument("--patch", help="patch folder to apply first")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("patch", help="show, apply or revert a saved patch")
    p.add_argument("action", choices=["show", "apply", "revert"])
    p.add_argument("dir", help="patch folder")
    p.add_argument("--model", help="apply: the base model; revert: the edited model folder")
    device_arg(p)
    p.add_argument("--out", help="folder to write the resulting model to")
    p.set_defaults(fn=cmd_patch)

    p = sub.add_parser("methods", help="list editing methods and their hyperparameters")
    p.add_argument("--describe", metavar="NAME", help="show every hyperparameter of one method")
    p.set_defaults(fn=cmd_methods)

    p = sub.add_parser("stats", help="precompute key statistics E[k k^T] for ROME/MEMIT-style methods")
    model_arg(p)
    p.add_argument("--layers", required=True, help="comma-separated layer indices, e.g. 3,4,5 (one pass)")
    p.add_argument(
        "--corpus",
        default=None,
        help="text file/folder/JSONL, 'hf:NAME[:CONFIG][@SPLIT]' or 'gensim-wiki' (default; pip install --no-deps gensim)",
    )
    p.add_argument("--tokens", type=int, default=100_000, help="tokens to average over (default 100000)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--no-cache", action="store_true", help="recompute and do not write the cache")
    p.add_argument("--refresh", action="store_true", help="recompute and overwrite the cached statistics")
    p.set_defaults(fn=cmd_stats)

    p = sub.add_parser("bench", help="edit and evaluate a dataset under one protocol, save a report")
    model_arg(p)
    p.add_argument("--method", default="ft-m", help="editing method (default ft-m)")
    p.add_argument(
        "--dataset", default="bundled", help="'bundled' or a dataset file; a,b concatenates (default bundled)"
    )
    p.add_argument("--n", type=int, help="number of cases (the first n in file order; default all)")
    p.add_argument("--sample", action="store_true", help="take a seeded random subset of n cases instead")
    p.add_argument("--protocol", default="single", choices=["single", "batch", "sequential"])
    p.add_argument("--step", type=int, default=1, help="cases per edit (batch) or per step (sequential)")
    p.add_argument("--eval-each-step", action="store_true", help="sequential: evaluate after every step")
    p.add_argument(
        "--eval-every", type=int, default=0, metavar="M", help="sequential: evaluate after every M-th step"
    )
    p.add_argument(
        "--perplexity",
        metavar="TEXT",
        help="sequential: perplexity of this held-out text (file/folder) before, at each checkpoint and after",
    )
    p.add_argument("--perplexity-tokens", type=int, default=4096, help="tokens of --perplexity scored (4096)")
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="sequential with --eval-every: save patches, curve and a partial report at every checkpoint; "
        "the same command again resumes after the last one",
    )
    p.add_argument("--scoring", default="tf,prob,gen,text", help="scoring families (default all four)")
    p.add_argument("--text-tokens", type=int, default=40, help="tokens generated for fluency (default 40)")
    p.add_argument("--batch-size", type=int, default=64, help="pairs per teacher-forced forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and of the method (default 0)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="method config override (repeatable)")
    p.add_argument("--out", help="report JSON to write")
    p.add_argument(
        "--plot",
        help="retention-curve PNG (default: next to --out for sequential runs; with --compare: every run's)",
    )
    p.add_argument("--compare", nargs="+", metavar="REPORT", help="print saved reports side by side and exit")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("serve", help="web playground + JSON API on one model (http://127.0.0.1:7860/)")
    model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (non-loopback needs --token)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--token", help="token required on state-changing requests (default: $LMEDIT_TOKEN)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("trace", help="causal tracing: where a fact lives (heatmaps, aggregate, presets)")
    model_arg(p)
    p.add_argument("--prompt", help="prompt containing the subject (or '{}')")
    p.add_argument("--subject", help="the subject whose embeddings are corrupted")
    p.add_argument("--answer", help="answer to trace (default: the model's top token)")
    p.add_argument("--kinds", help="comma list of hidden,mlp,attn (default all; mlp with --aggregate)")
    p.add_argument("--samples", type=int, default=10, help="noise samples per cell")
    p.add_argument("--noise", type=float, help="noise std (default 3x the embedding std)")
    p.add_argument("--window", type=int, default=10, help="layers restored together for mlp/attn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for the PNG heatmaps / aggregate figure and JSON")
    p.add_argument("--aggregate", metavar="DATASET", help="average over facts of a file ('bundled' ok)")
    p.add_argument("--n", type=int, default=50, help="facts to average over with --aggregate")
    p.add_argument("--suggest-layers", action="store_true", help="print ROME/MEMIT layer presets")
    p.add_argument(
        "--include-unknown", action="store_true", help="aggregate also facts the model does not predict"
    )
    p.set_defaults(fn=cmd_trace)

    p = sub.add_parser("ffn", help="top MLP value vectors at a layer/position, in vocabulary space")
    model_arg(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--position", type=int, default=-1, help="token index (default: last)")
    p.add_argument("--k", type=int, default=10, help="sub-updates listed")
    p.add_argument("--top-tokens", type=int, default=8, help="tokens per sub-update")
    p.add_argument("--projection", default="lm_head", choices=["lm_head", "final_norm"])
    p.add_argument("--out", help="JSON file to write")
    p.set_defaults(fn=cmd_ffn)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lmedit.errors import LmeditError

    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except LmeditError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
