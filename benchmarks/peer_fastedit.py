"""Run FastEdit (PyPI ``pyfastedit``) ROME offline on CPU and time it, for lmedit's benchmarks.

Run with the FastEdit virtualenv made by ``benchmarks/setup_peers.sh`` (this script does not import lmedit)::

    /work/peers/fastedit-venv/bin/python benchmarks/peer_fastedit.py \\
        --model-dir ~/.cache/lmedit/models/SmolLM2-135M-Instruct.Q4_1-<hash> --cases cases.json \\
        --method rome --layers 5 --out fastedit.json

FastEdit has ROME only (no MEMIT) and no covariance statistics (its ``get_inv_cov`` raises
NotImplementedError; every preset has ``mom2_adjustment=False``), and no evaluation code: the metrics here are
computed by this runner with EasyEdit's teacher-forced protocol (token accuracy of the target given the prompt;
locality = agreement of post- and pre-edit argmax tokens on the locality answers). FastEdit hard-codes CUDA and
float16; the runner loads the model in float32 and redirects ``cuda``/``float16`` to ``cpu``/float32 at run time
(see benchmarks/PEERS.md). ``--stats-corpus``/``--stats-tokens`` are accepted for a uniform CLI and ignored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_easyedit import (  # noqa: E402  (shared helpers; imports neither lmedit nor easyeditor)
    CpuRedirect,
    PeakRSS,
    common_args,
    load_cases,
    median,
    module_templates,
    parse_layers,
    run_outcome,
    run_timing,
    versions,
)


@torch.no_grad()
def _answer_argmax(model, tok, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Argmax tokens at the positions that predict ``answer`` after ``prompt``, and the answer's tokens."""
    p_ids = tok(prompt)["input_ids"]
    full = tok(prompt + answer)["input_ids"]
    n = len(p_ids)
    if full[:n] != p_ids:  # tokenization merged across the boundary: fall back to separate encoding
        full = p_ids + tok(answer, add_special_tokens=False)["input_ids"]
    target = full[n:]
    ids = torch.tensor([full])  # [1, T]
    logits = model(input_ids=ids).logits[0]  # [T, V]
    pred = logits[n - 1 : len(full) - 1].argmax(-1).tolist()  # [len(target)]
    return pred, target


def _acc(model, tok, prompt: str, answer: str) -> float:
    pred, target = _answer_argmax(model, tok, prompt, answer)
    return sum(int(a == b) for a, b in zip(pred, target)) / max(1, len(target))


def _evaluate(model, tok, case: dict, ref_loc: list[list[int]] | None) -> tuple[dict, list[list[int]]]:
    """Teacher-forced metrics of one case (EasyEdit's protocol); returns metrics and locality argmaxes."""
    tgt = case["target_new"] if case["target_new"].startswith(" ") else " " + case["target_new"]
    out = {"rewrite_acc": _acc(model, tok, case["prompt_text"], tgt)}
    if case["rephrase"]:
        vals = [_acc(model, tok, r, tgt) for r in case["rephrase"]]
        out["rephrase_acc"] = sum(vals) / len(vals)
    if case["portability"]:
        vals = [_acc(model, tok, q, a) for q, a in case["portability"]]
        out["portability_acc"] = sum(vals) / len(vals)
    loc = [_answer_argmax(model, tok, q, a)[0] for q, a in case["locality"]]
    if ref_loc is not None and loc:
        agree = [sum(int(x == y) for x, y in zip(a, b)) / max(1, len(b)) for a, b in zip(loc, ref_loc)]
        out["locality_acc"] = sum(agree) / len(agree)
    return out, loc


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(p)
    p.add_argument("--stats-corpus", default=None, help="ignored: FastEdit has no covariance statistics")
    p.add_argument("--stats-tokens", type=int, default=None, help="ignored")
    p.add_argument("--steps", type=int, default=20, help="v_num_grad_steps (FastEdit preset: 20)")
    p.add_argument("--lr", type=float, default=0.1, help="v_lr (FastEdit preset: 1e-1)")
    args = p.parse_args(argv)
    if args.method != "rome":
        raise SystemExit("FastEdit implements ROME only (no MEMIT): --method rome")

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    for a in ("cases", "out", "model_dir"):
        setattr(args, a, str(Path(getattr(args, a)).expanduser().resolve()))
    if args.threads:
        torch.set_num_threads(args.threads)
    os.chdir(tempfile.mkdtemp(prefix="fastedit-run-"))
    workarounds: list[dict] = []
    rss = PeakRSS()
    cases = load_cases(args.cases, args.n)
    layers = parse_layers(args.layers, "rome")

    t0 = time.perf_counter()
    from fastedit import ROMEHyperParams, apply_rome_to_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    # as FastEdit's own loader (utils/mtloader.py): left padding, pad id 0 when the tokenizer has none
    tok = AutoTokenizer.from_pretrained(args.model_dir, padding_side="left")
    if tok.pad_token_id is None:
        tok.pad_token_id = 0
    load_s = time.perf_counter() - t0
    workarounds.append(
        {
            "id": "float32-cpu-model",
            "detail": "FastEdit's loader does from_pretrained(torch_dtype=float16).cuda(); we load the same "
            "folder in float32 on CPU with its tokenizer settings (padding_side='left', pad id 0 if none).",
        }
    )
    dtype = next(model.parameters()).dtype
    redirect = CpuRedirect(dtype_map={torch.float16: dtype})
    redirect.__enter__()
    workarounds.append(
        {
            "id": "cpu-device-redirect",
            "detail": "FastEdit hard-codes device='cuda' (compute_v's delta) and casts the right vector to "
            "float16 (rome_main); a TorchFunctionMode maps cuda -> cpu and Tensor.to(float16) -> the model's "
            "dtype (float32) for the whole run.",
        }
    )

    hp = ROMEHyperParams.from_name("llama-7b")
    hp.layers = layers
    hp.v_loss_layer = model.config.num_hidden_layers - 1
    hp.v_num_grad_steps = args.steps
    hp.v_lr = args.lr
    for k, v in module_templates(model).items():
        setattr(hp, k, v)

    per_case: list[dict] = []
    edit_times: list[float] = []
    for i, c in enumerate(cases):
        text, subj = c["prompt_text"], c["subject"]
        template = text.replace(subj, "{}", 1)
        target = c["target_new"] if c["target_new"].startswith(" ") else " " + c["target_new"]
        request = {"prompt": template, "subject": subj, "target": target}

        t0 = time.perf_counter()
        pre, ref_loc = _evaluate(model, tok, c, None)
        eval_pre = time.perf_counter() - t0

        names = [f"{hp.rewrite_module_tmp.format(layer)}.weight" for layer in layers]
        params = dict(model.named_parameters())
        saved = {n: params[n].detach().clone() for n in names}
        rss.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        apply_rome_to_model(
            model, tok, [request], hp, batch_first=True, copy=False, return_diff_weights=False
        )
        edit_s, edit_cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = rss.peak_mib()
        edit_times.append(edit_s)

        t0 = time.perf_counter()
        post, _ = _evaluate(model, tok, c, ref_loc)
        eval_post = time.perf_counter() - t0
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)
        per_case.append(
            {
                "case": i,
                "edit_s": edit_s,
                "edit_cpu_s": edit_cpu,
                "eval_s": eval_pre + eval_post,
                "peak_rss_mib": peak,
                "pre": pre,
                "post": post,
            }
        )
        print(f"case {i}: edit {edit_s:.2f}s pre {pre} post {post}", flush=True)

    redirect.__exit__(None, None, None)
    evals = [c["eval_s"] for c in per_case]
    result = {
        "peer": "pyfastedit",
        "method": "rome",
        "model_dir": args.model_dir,
        "n_cases": len(cases),
        "layers": layers,
        "protocol": "single edit, weights restored after each case",
        "hparams": dict(vars(hp)),
        "timing": {
            "import_s": import_s,
            "load_s": load_s,
            "stats_s": 0.0,
            "stats_per_layer": [],
            "edit_s_per_request": edit_times,
            "edit_s_median": median(edit_times),
            "edit_cpu_s_per_request": [c["edit_cpu_s"] for c in per_case],
            "eval_s_per_case": evals,
            "eval_s_per_case_median": median(evals),
            "eval_is_runner_code": True,
            **run_timing(t_start, load_before),
        },
        **run_outcome(per_case, workarounds, redirect),
        "versions": versions("pyfastedit", "torch", "transformers", "numpy"),
        "notes": [
            "FastEdit ROME has no covariance statistics (mom2_adjustment=False in every preset; its get_inv_cov "
            "raises NotImplementedError) and no MEMIT.",
            "metrics are computed by this runner (FastEdit has no evaluation), with EasyEdit's teacher-forced "
            "token accuracy; rephrase_acc averages all paraphrases.",
        ],
    }
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(
        f"pyfastedit rome: {len(cases)} cases, edit median {median(edit_times):.2f}s, "
        f"metrics {json.dumps(result['metrics'])} -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
