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
    loaded = lmedit.load_model(args.model)
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

    loaded = lmedit.load_model(args.model)
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

    loaded = lmedit.load_model(args.model)
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
    loaded = lmedit.load_model(args.model)
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

    p = sub.add_parser("demo", help="edit the bundled model, show before/after generations, save and undo")
    model_arg(p)
    p.add_argument("--method", default="ft-m", help="editing method (default ft-m)")
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
    p.add_argument("--out", help="folder to write the resulting model to")
    p.set_defaults(fn=cmd_patch)

    p = sub.add_parser("methods", help="list editing methods and their hyperparameters")
    p.add_argument("--describe", metavar="NAME", help="show every hyperparameter of one method")
    p.set_defaults(fn=cmd_methods)
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
