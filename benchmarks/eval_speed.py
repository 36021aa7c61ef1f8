"""Evaluation time per case: lmedit's batched engine vs EasyEdit's ``compute_edit_quality``, same cases, same model.

    python benchmarks/eval_speed.py --model smollm2-135m --n 50
    python benchmarks/eval_speed.py --model smollm2-135m --n 50 --peer-python /work/peers/easyedit-venv/bin/python

Both sides evaluate the un-edited model (evaluation cost only, no edit) on the same probes: edit prompt,
paraphrases, neighbourhood prompts and portability questions, teacher-forced (EasyEdit's token accuracy, its
default ``eval_metric='token_em'``). lmedit is timed twice: with the teacher-forced family only (like for like)
and with all four scoring families. EasyEdit runs in its own virtual environment in a subprocess, on the same
dequantized weights (lmedit's model cache folder); workarounds are printed with the numbers:

* EasyEdit moves every batch to ``f"cuda:{device}"``: on a CPU-only machine ``BatchEncoding.to`` is shimmed to
  keep tensors on the CPU (no effect on results or on the CPU time measured).
* ``import easyeditor`` needs the peer runner's shims (``benchmarks/peer_easyedit.py::_compat_before_import``:
  torchvision op schemas on CPU torch, helpers moved in transformers); they are reused, not copied.
* EasyEdit's ``test_prediction_acc`` assumes left padding (``slice_list(..., left=True)``): the tokenizer's
  ``padding_side`` is set to "left", as EasyEdit's editor does for decoder-only models.

Both sides run with the same torch thread count (``--threads``, default 2). Results are written as JSON
(``--out``) for BENCHMARKS.md.
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

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEFAULT_DATASET = DATA / "counterfact" / "counterfact_locality_other_attribution_distracting_neighbor.json"
DEFAULT_PEER = Path("/work/peers/easyedit-venv/bin/python")

PEER_SCRIPT = r"""
import json, sys, time, types
import torch
torch.set_num_threads(int(sys.argv[3]))
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.tokenization_utils_base import BatchEncoding
if not torch.cuda.is_available():   # workaround: EasyEdit hard-codes f"cuda:{device}"
    _to = BatchEncoding.to
    BatchEncoding.to = lambda self, device, *a, **k: _to(self, "cpu" if str(device).startswith("cuda") else device, *a, **k)
sys.path.insert(0, sys.argv[4])
from peer_easyedit import _compat_before_import   # the peer runner's import shims (torchvision, transformers)
shims = []
_compat_before_import(shims)
from easyeditor.evaluate.evaluate import compute_edit_quality
import easyeditor
folder, records_path = sys.argv[1], sys.argv[2]
records = json.load(open(records_path))
tok = AutoTokenizer.from_pretrained(folder)
tok.padding_side = "left"           # workaround: test_prediction_acc slices assuming left padding
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
hparams = types.SimpleNamespace(max_length=64, device=0)
compute_edit_quality(model, "llama", hparams, tok, records[0], 0)   # warm-up
out = []
t0, c0 = time.perf_counter(), time.process_time()
for r in records:
    t = time.perf_counter()
    res = compute_edit_quality(model, "llama", hparams, tok, r, 0)
    out.append({"seconds": time.perf_counter() - t, "rewrite_acc": [float(x) for x in res["rewrite_acc"]]})
total, cpu = time.perf_counter() - t0, time.process_time() - c0
ver = getattr(easyeditor, "__version__", None)
import importlib.metadata as md
print("PEER_RESULT " + json.dumps({"total_s": total, "cpu_s": cpu, "cases": out, "shims": shims, "easyeditor": md.version("easyeditor"),
      "transformers": md.version("transformers"), "torch": torch.__version__}))
"""


def easyedit_record(case) -> dict:
    """EasyEdit's record format for one EvalCase (the fields compute_edit_quality reads)."""
    req = case.requests[0]
    rec = {
        "prompt": req.prompt_text,
        "target_new": req.target_new.strip(),
        "ground_truth": (req.target_true or "").strip(),
        "locality": {},
        "portability": {},
    }
    if case.generalization:
        rec["rephrase_prompt"] = [p.prompt for p in case.generalization]
    if case.locality:
        rec["locality"]["neighborhood"] = {
            "prompt": [p.prompt for p in case.locality],
            "ground_truth": [p.answer.strip() for p in case.locality],
        }
    if case.portability:
        rec["portability"]["one_hop"] = {
            "prompt": [p.prompt for p in case.portability],
            "ground_truth": [p.answer.strip() for p in case.portability],
        }
    return rec


def time_lmedit(loaded, cases, families: tuple[str, ...], repeats: int = 1) -> tuple[float, float]:
    """Wall and process-CPU seconds for scoring all cases (best of ``repeats``)."""
    from lmedit.evaluate.protocols import ScoringSettings, score_cases

    settings = ScoringSettings(families=families)
    score_cases(loaded, cases[:2], settings)  # warm-up
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        score_cases(loaded, cases, settings)
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return best, best_cpu


def run_peer(python: Path, folder: str, records: list[dict], threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        rec_path = Path(tmp) / "records.json"
        rec_path.write_text(json.dumps(records))
        script = Path(tmp) / "peer_eval.py"
        script.write_text(PEER_SCRIPT)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
        proc = subprocess.run(
            [str(python), str(script), folder, str(rec_path), str(threads), str(ROOT / "benchmarks")],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp,
        )
    for line in proc.stdout.splitlines():
        if line.startswith("PEER_RESULT "):
            return json.loads(line[len("PEER_RESULT ") :])
    raise RuntimeError(f"EasyEdit run failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default=str(DEFAULT_DATASET))
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer-python", default=str(DEFAULT_PEER))
    ap.add_argument("--no-peer", action="store_true", help="time lmedit only")
    ap.add_argument("--tf-only", action="store_true", help="skip timing lmedit's four scoring families")
    ap.add_argument("--out", help="write the results JSON here")
    args = ap.parse_args()

    import lmedit
    from lmedit.data.loaders import load_dataset
    from lmedit.evaluate.protocols import ScoringSettings, score_cases

    torch.set_num_threads(args.threads)
    loaded = lmedit.load_model(args.model)
    ds = load_dataset(args.dataset, n=args.n)
    cases = ds.cases
    n_probes = sum(len(v) for c in cases for v in c.probes().values())
    print(f"{len(cases)} cases ({n_probes} probes) of {ds.name} on {loaded.name}, {args.threads} threads")

    n = len(cases)
    load_before = os.getloadavg()[0]
    tf_s, tf_cpu = time_lmedit(loaded, cases, ("tf",))
    all_s, all_cpu = (
        (float("nan"), float("nan"))
        if args.tf_only
        else time_lmedit(loaded, cases, ("tf", "prob", "gen", "text"))
    )
    result = {
        "model": loaded.name,
        "dataset": ds.describe(),
        "threads": args.threads,
        "loadavg_before": load_before,
        "lmedit": {
            "tf_per_case_s": tf_s / n,
            "tf_cpu_per_case_s": tf_cpu / n,
            "all_families_per_case_s": all_s / n,
            "all_families_cpu_per_case_s": all_cpu / n,
        },
        "versions": {"torch": torch.__version__},
    }
    print(f"lmedit  teacher-forced     {tf_s / n:8.4f} s/case wall, {tf_cpu / n:8.4f} s/case CPU")
    print(f"lmedit  all four families  {all_s / n:8.4f} s/case wall, {all_cpu / n:8.4f} s/case CPU")

    peer = Path(args.peer_python)
    if args.no_peer or not peer.exists():
        print(f"EasyEdit: not run ({'--no-peer' if args.no_peer else f'no interpreter at {peer}'})")
    else:
        folder = loaded.source.get("cache") or loaded.source.get("path")
        records = [easyedit_record(c) for c in cases]
        pr = run_peer(peer, folder, records, args.threads)
        per_case, per_case_cpu = pr["total_s"] / n, pr["cpu_s"] / n
        # cross-check: token accuracy of the edit prompt on the same model, both tools
        ours = score_cases(loaded, cases, ScoringSettings(families=("tf",)))
        mine = [s.answer["reliability"][0].accuracy for s in ours]
        theirs = [c["rewrite_acc"][0] for c in pr["cases"]]
        agree = sum(abs(a - b) < 1e-6 for a, b in zip(mine, theirs)) / n
        result["easyedit"] = {
            "per_case_s": per_case,
            "cpu_per_case_s": per_case_cpu,
            "versions": {k: pr[k] for k in ("easyeditor", "transformers", "torch")},
            "workarounds": ["BatchEncoding.to('cuda:N') kept on CPU", "tokenizer padding_side='left'"]
            + [w.get("id", str(w)) for w in pr.get("shims", [])],
            "rewrite_acc_agreement": agree,
        }
        result["speedup_tf"] = per_case / (tf_s / n)
        result["speedup_tf_cpu"] = per_case_cpu / (tf_cpu / n)
        result["speedup_all_families"] = per_case / (all_s / n)
        result["loadavg_after"] = os.getloadavg()[0]
        print(
            f"EasyEdit compute_edit_quality {per_case:8.4f} s/case wall, {per_case_cpu:8.4f} s/case CPU "
            f"(easyeditor {pr['easyeditor']})"
        )
        print(
            f"speed-up (like for like, teacher-forced): {result['speedup_tf']:.1f}x wall, "
            f"{result['speedup_tf_cpu']:.1f}x CPU"
        )
        print(f"load average {load_before:.1f} before, {result['loadavg_after']:.1f} after")
        print(
            f"speed-up (lmedit all families vs EasyEdit token accuracy): {result['speedup_all_families']:.1f}x"
        )
        print(f"edit-prompt token accuracy identical on {agree:.0%} of cases")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
