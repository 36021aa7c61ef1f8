"""Run EasyEdit (PyPI ``easyeditor``) ROME / MEMIT offline on CPU and time it, for lmedit's benchmarks.

Run with the EasyEdit virtualenv made by ``benchmarks/setup_peers.sh`` (never with lmedit's venv; this script
does not import lmedit)::

    /work/peers/easyedit-venv/bin/python benchmarks/peer_easyedit.py \\
        --model-dir ~/.cache/lmedit/models/SmolLM2-135M-Instruct.Q4_1-<hash> --cases cases.json \\
        --method rome --layers 5 --stats-corpus ../shared/data/wikitext-2/test.txt --stats-tokens 120000 \\
        --out easyedit.json

The workarounds that make EasyEdit run offline on a CPU-only torch are applied here at run time (nothing in
site-packages is edited) and listed in the output JSON under ``workarounds``; see benchmarks/PEERS.md.
The helpers at the top (device redirection, cases, peak RSS, corpus rows) are shared with peer_fastedit.py.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# ----------------------------------------------------------------------------------------------------------------
# shared helpers (also imported by peer_fastedit.py)
# ----------------------------------------------------------------------------------------------------------------


def _is_cuda(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return isinstance(dev, str) and dev.startswith("cuda")


class CpuRedirect(TorchFunctionMode):
    """Torch function mode that sends every ``cuda`` device argument to ``cpu`` (and optionally one dtype to
    another), so peer code that hard-codes ``f"cuda:{device}"`` or ``.cuda()`` runs unchanged on CPU torch."""

    def __init__(self, dtype_map: dict[torch.dtype, torch.dtype] | None = None) -> None:
        super().__init__()
        self.dtype_map = dtype_map or {}
        self.redirected = 0

    def _fix(self, v: Any) -> Any:
        if _is_cuda(v):
            self.redirected += 1
            return torch.device("cpu")
        if isinstance(v, torch.dtype) and v in self.dtype_map:
            return self.dtype_map[v]
        return v

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            self.redirected += 1
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = self._fix(kwargs["device"])
        if func is torch.Tensor.to:
            args = tuple(self._fix(a) for a in args)
            if "dtype" in kwargs:
                kwargs["dtype"] = self._fix(kwargs["dtype"])
        return func(*args, **kwargs)


class PeakRSS:
    """Peak resident memory of this process between ``reset()`` and ``peak_mib()`` (Linux ``VmHWM``)."""

    def reset(self) -> None:
        """Reset the kernel's high-water mark to the current RSS (``echo 5 > /proc/self/clear_refs``)."""
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    @staticmethod
    def _status(field: str) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
        except OSError:
            return None
        return None

    def peak_mib(self) -> float:
        """Peak RSS in MiB since the last reset (falls back to the lifetime peak)."""
        hwm = self._status("VmHWM")
        return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def current_mib(self) -> float:
        """Current RSS in MiB."""
        return self._status("VmRSS") or 0.0

    @staticmethod
    def lifetime_mib() -> float:
        """Peak RSS of the whole process in MiB."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_cases(path: str, n: int | None) -> list[dict]:
    """Read a JSON list of requests {prompt, subject, target_new, target_true, rephrase, locality, portability}.

    ``prompt`` holds ``{}`` for the subject or the subject verbatim; ``locality``/``portability`` are lists of
    [prompt, answer] pairs or {prompt, answer|ground_truth} objects; ``rephrase`` a list of strings (or one)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        data = data.get("cases") or data.get("requests") or [data]
    if not isinstance(data, list) or not data:
        raise SystemExit(f"--cases {path}: expected a non-empty JSON list of requests")
    out = []
    for i, d in enumerate(data[:n] if n else data):
        for f in ("prompt", "subject", "target_new"):
            if not isinstance(d.get(f), str) or not d[f].strip():
                raise SystemExit(f"--cases {path}: record {i} field {f!r} must be a non-empty string")
        prompt = d["prompt"]
        text = prompt.replace("{}", d["subject"]) if "{}" in prompt else prompt
        if d["subject"] not in text:
            raise SystemExit(f"--cases {path}: record {i}: subject {d['subject']!r} not in prompt {prompt!r}")
        reph = d.get("rephrase") or []
        reph = [reph] if isinstance(reph, str) else list(reph)

        def pairs(v: Any) -> list[tuple[str, str]]:
            res = []
            for item in v or []:
                if isinstance(item, dict):
                    item = (item.get("prompt"), item.get("answer", item.get("ground_truth")))
                res.append((str(item[0]), str(item[1])))
            return res

        out.append(
            {
                "prompt_text": text,
                "subject": d["subject"],
                "target_new": d["target_new"],
                "target_true": d.get("target_true"),
                "rephrase": reph,
                "locality": pairs(d.get("locality")),
                "portability": pairs(d.get("portability")),
            }
        )
    return out


def corpus_rows(tok, corpus: str, n_tokens: int, seq_len: int) -> list[str]:
    """Cut the first ``n_tokens`` tokens of a text file into rows of ``seq_len`` tokens, returned as text."""
    text = Path(corpus).read_text(encoding="utf-8")
    # tokenize in slices of lines so huge files are not encoded at once; stop once enough tokens are collected
    ids: list[int] = []
    lines = text.splitlines(keepends=True)
    step = 2000
    for i in range(0, len(lines), step):
        ids.extend(tok("".join(lines[i : i + step]), add_special_tokens=False)["input_ids"])
        if len(ids) >= n_tokens:
            break
    ids = ids[:n_tokens]
    if len(ids) < n_tokens:
        print(f"warning: corpus {corpus} has only {len(ids)} tokens (< {n_tokens})", file=sys.stderr)
    return [tok.decode(ids[i : i + seq_len]) for i in range(0, len(ids), seq_len)]


def versions(*names: str) -> dict[str, str | None]:
    """Installed versions of the named distributions, plus python."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def median(xs: list[float]) -> float | None:
    """Median or None for an empty list."""
    return statistics.median(xs) if xs else None


def module_templates(model) -> dict[str, str]:
    """EasyEdit/FastEdit module-name templates for the decoder-only architectures we benchmark."""
    mt = model.config.model_type
    # tied embeddings (SmolLM2): lm_head.weight is not a named parameter; the embedding matrix is the same tensor
    head = "lm_head" if "lm_head.weight" in dict(model.named_parameters()) else "model.embed_tokens"
    if mt in ("llama", "gemma3_text", "gemma3", "gemma2", "gemma", "mistral", "qwen2", "qwen3"):
        return {
            "rewrite_module_tmp": "model.layers.{}.mlp.down_proj",
            "layer_module_tmp": "model.layers.{}",
            "mlp_module_tmp": "model.layers.{}.mlp",
            "attn_module_tmp": "model.layers.{}.self_attn",
            "ln_f_module": "model.norm",
            "lm_head_module": head,
        }
    raise SystemExit(f"model_type {mt!r} is not mapped to module templates; add it to module_templates()")


def common_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by both peer runners."""
    p.add_argument(
        "--model-dir", required=True, help="local Hugging Face folder (lmedit's dequantized cache)"
    )
    p.add_argument("--cases", required=True, help="JSON list of requests")
    p.add_argument("--n", type=int, default=None, help="use only the first N cases")
    p.add_argument("--method", default="rome", choices=["rome", "memit"])
    p.add_argument("--layers", default=None, help="comma-separated layers (default: rome 5, memit 4,5,6,7,8)")
    p.add_argument("--out", required=True, help="result JSON path")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")


def parse_layers(s: str | None, method: str) -> list[int]:
    """Layers from the CLI, or EasyEdit's llama defaults (ROME [5], MEMIT [4..8])."""
    if s:
        return [int(x) for x in s.split(",") if x.strip()]
    return [5] if method == "rome" else [4, 5, 6, 7, 8]


def strip_space(s: str) -> str:
    """EasyEdit's convention: targets/answers without the leading space (it adds ``' '`` itself)."""
    return s[1:] if s.startswith(" ") else s


# ----------------------------------------------------------------------------------------------------------------
# EasyEdit
# ----------------------------------------------------------------------------------------------------------------


def _compat_before_import(workarounds: list[dict]) -> None:
    """Shims needed before ``import easyeditor`` succeeds with torch 2.13 CPU + transformers 5.5.4."""
    # 1. torchvision 0.28 (PyPI, CUDA-linked) cannot load its _C on CPU torch; its _meta_registrations then fails
    #    on register_fake("torchvision::nms"/"qnms"). EasyEdit imports torchvision (BLIP-2/multimodal code only),
    #    so define those two op schemas: torchvision's pure-Python parts then import; its C++ ops stay unusable.
    try:
        import torchvision  # noqa: F401

        workarounds.append(
            {"id": "torchvision-imports-as-is", "detail": "torchvision imported without a shim"}
        )
    except Exception:  # noqa: BLE001 - any failure here is the known CUDA-linked _C problem
        for m in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[m]
        for op in ("nms", "qnms"):
            try:
                torch.library.define(
                    f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
                )
            except RuntimeError:
                pass
        import torchvision  # noqa: F401

        workarounds.append(
            {
                "id": "torchvision-op-schemas",
                "detail": "PyPI torchvision 0.28.0 is CUDA-linked (its _C.so needs libc10_cuda.so) so it fails "
                "to import on CPU torch; defined the schemas torchvision::nms/qnms before importing it so its "
                "pure-Python modules load (EasyEdit imports it only for BLIP-2/multimodal code).",
            }
        )
    # 2. transformers 5 moved these helpers out of modeling_utils; EasyEdit's BLIP-2 Q-Former imports them there.
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    moved = []
    for name in ("apply_chunking_to_forward", "prune_linear_layer", "find_pruneable_heads_and_indices"):
        if not hasattr(mu, name):
            if hasattr(pu, name):
                setattr(mu, name, getattr(pu, name))
            else:

                def _gone(*a, _n=name, **k):
                    raise NotImplementedError(
                        f"transformers.{_n} no longer exists (stub for EasyEdit import)"
                    )

                setattr(mu, name, _gone)
            moved.append(name)
    if moved:
        workarounds.append(
            {
                "id": "transformers-moved-helpers",
                "detail": "aliased transformers.modeling_utils."
                + ", ".join(moved)
                + " (moved to pytorch_utils or removed in transformers 5; imported by EasyEdit's BLIP-2 "
                "Q-Former at import time, never called for ROME/MEMIT)",
            }
        )


def _tuple_layer_outputs(workarounds: list[dict]) -> None:
    """MEMIT's ``compute_z`` indexes decoder-layer outputs as tuples (``cur_out[0][i, idx]``,
    ``tr[layer].output[0]``), as transformers 4 returned them; transformers 5 decoder layers return the hidden
    state tensor. Give compute_z (only) a TraceDict that shows it 1-tuples."""
    import types

    from easyeditor.models.memit import compute_z
    from easyeditor.util import nethook

    class TupleTraceDict(nethook.TraceDict):
        def __init__(self, *args, edit_output=None, **kwargs):
            if edit_output is not None:
                fn = edit_output

                def edit_output(output, layer):  # nethook passes these by name
                    return fn((output,), layer)[0] if torch.is_tensor(output) else fn(output, layer)

            super().__init__(*args, edit_output=edit_output, **kwargs)

        def __getitem__(self, key):
            trace = super().__getitem__(key)
            if torch.is_tensor(getattr(trace, "output", None)):
                trace.output = (trace.output,)
            return trace

    shim = types.ModuleType("easyeditor_nethook_tuple_outputs")
    shim.__dict__.update(vars(nethook))
    shim.TraceDict = TupleTraceDict
    compute_z.nethook = shim
    workarounds.append(
        {
            "id": "tuple-layer-outputs",
            "detail": "MEMIT compute_z indexes decoder-layer outputs as transformers-4 tuples; transformers 5 "
            "returns tensors (IndexError). compute_z's TraceDict wraps them in 1-tuples (edit and retained output).",
        }
    )


def _install_local_corpus(rows: list[str], workarounds: list[dict]) -> None:
    """Make EasyEdit's layer_stats read our rows instead of ``datasets.load_dataset('wikipedia', ...)``."""
    ls = importlib.import_module("easyeditor.models.rome.layer_stats")

    def local_load_dataset(name, *args, **kwargs):
        return {"train": [{"text": r} for r in rows]}

    ls.load_dataset = local_load_dataset
    workarounds.append(
        {
            "id": "local-stats-corpus",
            "detail": "replaced easyeditor.models.rome.layer_stats.load_dataset (which downloads Wikipedia "
            "20200501.en) by a function returning our local corpus rows; everything else in layer_stats "
            "(TokenizedDataset, tally, batch sizes, float precision, npz cache) is EasyEdit's own.",
        }
    )


def _timed_layer_stats(records: list[dict]) -> None:
    """Wrap layer_stats where ROME and MEMIT call it, recording wall time and token count per layer."""
    # importlib: the package attribute easyeditor.models is shadowed by easyeditor.trainer.models
    mm = importlib.import_module("easyeditor.models.memit.memit_main")
    cu = importlib.import_module("easyeditor.models.rome.compute_u")

    orig = cu.layer_stats

    def timed(model, tok, layer_name, *args, **kwargs):
        t0 = time.perf_counter()
        stat = orig(model, tok, layer_name, *args, **kwargs)
        n = int(getattr(getattr(stat, "mom2", None), "count", 0) or 0)
        records.append({"layer": layer_name, "seconds": time.perf_counter() - t0, "tokens": n})
        return stat

    cu.layer_stats = timed
    mm.layer_stats = timed


def _timed_eval(records: list[float]) -> None:
    """Wrap the editor's compute_edit_quality to time each evaluation call (pre and post, per case)."""
    ed = importlib.import_module("easyeditor.editors.editor")

    orig = ed.compute_edit_quality

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = orig(*args, **kwargs)
        records.append(time.perf_counter() - t0)
        return out

    ed.compute_edit_quality = timed


def _mean(x: Any) -> float | None:
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        flat = [float(v) for v in x]
        return sum(flat) / len(flat) if flat else None
    return float(x)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(p)
    p.add_argument("--stats-corpus", default=None, help="text file for the covariance statistics")
    p.add_argument("--stats-tokens", type=int, default=100_000, help="tokens of the corpus to use")
    p.add_argument("--stats-seq-len", type=int, default=512, help="tokens per corpus row")
    p.add_argument("--stats-dir", default=None, help="EasyEdit stats cache dir (default: fresh temp dir)")
    p.add_argument(
        "--mom2-adjustment",
        default="on",
        choices=["on", "off"],
        help="ROME: use C^-1 (paper; default) or EasyEdit's llama yaml value (off). MEMIT always uses C.",
    )
    p.add_argument("--steps", type=int, default=25, help="v_num_grad_steps (EasyEdit llama yaml: 25)")
    p.add_argument("--lr", type=float, default=0.5, help="v_lr (EasyEdit llama yaml: 5e-1)")
    p.add_argument("--mom2-update-weight", type=float, default=15000, help="MEMIT (EasyEdit llama yaml)")
    p.add_argument(
        "--save-deltas",
        default=None,
        help="MEMIT: write the batch's weight changes (edited - original rewrite weights) to this safetensors "
        "file, so that lmedit can score EasyEdit's edit with its own evaluator",
    )
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    if args.save_deltas and args.method != "memit":
        raise SystemExit(
            "--save-deltas is for MEMIT (one batch); ROME restores the weights after every request"
        )
    for a in ("cases", "out", "stats_corpus", "stats_dir", "model_dir", "save_deltas"):
        if getattr(args, a):
            setattr(args, a, str(Path(getattr(args, a)).expanduser().resolve()))
    if args.threads:
        torch.set_num_threads(args.threads)
    workarounds: list[dict] = []
    rss = PeakRSS()
    cases = load_cases(args.cases, args.n)
    layers = parse_layers(args.layers, args.method)
    needs_stats = args.method == "memit" or args.mom2_adjustment == "on"
    if needs_stats and not args.stats_corpus:
        raise SystemExit("--stats-corpus is required (EasyEdit would download Wikipedia otherwise)")

    # EasyEdit's BaseEditor writes logs/run.log under the working directory: run from a scratch folder
    os.chdir(tempfile.mkdtemp(prefix="easyedit-run-"))
    workarounds.append(
        {"id": "scratch-cwd", "detail": "run from a temp dir (EasyEdit writes logs/run.log into cwd)"}
    )

    t0 = time.perf_counter()
    _compat_before_import(workarounds)
    import easyeditor  # noqa: F401
    from easyeditor import BaseEditor, MEMITHyperParams, ROMEHyperParams
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import_s = time.perf_counter() - t0

    redirect = CpuRedirect()
    redirect.__enter__()
    workarounds.append(
        {
            "id": "cpu-device-redirect",
            "detail": "EasyEdit hard-codes f'cuda:{hparams.device}' (model.to, tensors, inputs, stats); a "
            "TorchFunctionMode active for the whole run maps every cuda device argument to cpu.",
        }
    )

    t0 = time.perf_counter()
    model_dir = str(Path(args.model_dir).expanduser())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token_id = tok.eos_token_id
        workarounds.append({"id": "pad-eos", "detail": "pad_token := eos (as EasyEdit does for llama/gpt)"})
    load_s = time.perf_counter() - t0
    n_layers = model.config.num_hidden_layers

    stats_records: list[dict] = []
    eval_records: list[float] = []
    rows: list[str] = []
    if needs_stats:
        rows = corpus_rows(tok, args.stats_corpus, args.stats_tokens, args.stats_seq_len)
        _install_local_corpus(rows, workarounds)
    _timed_layer_stats(stats_records)
    _timed_eval(eval_records)
    stats_dir = args.stats_dir or tempfile.mkdtemp(prefix="easyedit-stats-")

    common = dict(
        layers=layers,
        fact_token="subject_last",
        v_num_grad_steps=args.steps,
        v_lr=args.lr,
        v_loss_layer=n_layers - 1,
        v_weight_decay=1e-3,
        clamp_norm_factor=4,
        kl_factor=0.0625,
        mom2_dataset="wikipedia",
        mom2_n_samples=max(1, len(rows)),
        mom2_dtype="float32",
        device=0,
        model_name=model_dir,
        stats_dir=stats_dir,
        **module_templates(model),
    )
    if common["lm_head_module"] != "lm_head":
        workarounds.append(
            {
                "id": "tied-lm-head",
                "detail": "tied embeddings: lm_head.weight is no named parameter, and MEMIT's compute_z reads it by "
                "name (LookupError); lm_head_module := model.embed_tokens, the same tensor",
            }
        )
    if args.method == "memit":
        _tuple_layer_outputs(workarounds)
    if args.method == "rome":
        hp = ROMEHyperParams(
            alg_name="ROME",
            mom2_adjustment=args.mom2_adjustment == "on",
            context_template_length_params=[[5, 10], [10, 10]],
            **common,
        )
    else:
        hp = MEMITHyperParams(
            alg_name="MEMIT",
            layer_selection="all",
            mom2_adjustment=True,
            mom2_update_weight=args.mom2_update_weight,
            batch_size=len(cases),
            **common,
        )

    # EasyEdit's own loader picks classes by substrings of the model name (no branch for SmolLM2/Gemma 3), so we
    # pass the loaded (model, tokenizer) pair, which BaseEditor supports, then give it the folder path as name
    # (its evaluation code calls model_name.lower()).
    hp.model_name = (model, tok)
    editor = BaseEditor(hp)
    editor.model_name = model_dir
    hp.model_name = model_dir
    algo_cpu: list[float] = []
    orig_algo = editor.apply_algo

    rewrite = [hp.rewrite_module_tmp.format(layer) + ".weight" for layer in layers]
    saved_deltas: list[str] = []

    def cpu_timed_algo(*a, **k):
        params = dict(model.named_parameters())
        before = {n: params[n].detach().clone() for n in rewrite} if args.save_deltas else {}
        c0 = time.process_time()
        out = orig_algo(*a, **k)
        algo_cpu.append(time.process_time() - c0)
        # the algorithm edits the model in place (copy=False); keep_original_weight restores it later
        if before:
            from safetensors.torch import save_file

            save_file({n: (params[n].detach() - w).contiguous() for n, w in before.items()}, args.save_deltas)
            saved_deltas.append(args.save_deltas)
        return out

    editor.apply_algo = cpu_timed_algo
    workarounds.append(
        {
            "id": "model-object",
            "detail": "model/tokenizer loaded with AutoModelForCausalLM/AutoTokenizer (float32) and passed to "
            "BaseEditor as hparams.model_name=(model, tok); then editor.model_name = folder path.",
        }
    )

    # ---- covariance statistics (timed separately, before any edit) ----
    stats_s = stats_cpu = 0.0
    if needs_stats:
        t0, c0 = time.perf_counter(), time.process_time()
        # ROME inverts the covariance, MEMIT keeps it: the same call signature either way
        stats_fn = (
            importlib.import_module("easyeditor.models.rome.compute_u").get_inv_cov
            if args.method == "rome"
            else importlib.import_module("easyeditor.models.memit.memit_main").get_cov
        )
        for layer in layers:
            stats_fn(
                model,
                tok,
                hp.rewrite_module_tmp.format(layer),
                hp.mom2_dataset,
                hp.mom2_n_samples,
                hp.mom2_dtype,
                hparams=hp,
            )
        stats_s, stats_cpu = time.perf_counter() - t0, time.process_time() - c0

    prompts = [c["prompt_text"] for c in cases]
    targets = [strip_space(c["target_new"]) for c in cases]
    truths = [strip_space(c["target_true"]) if c.get("target_true") else "<|endoftext|>" for c in cases]
    subjects = [c["subject"] for c in cases]
    rephrase = [c["rephrase"][0] if c["rephrase"] else c["prompt_text"] for c in cases]
    locality = None
    if all(c["locality"] for c in cases):
        locality = {
            "neighborhood": {
                "prompt": [[q for q, _ in c["locality"]] for c in cases],
                "ground_truth": [[strip_space(a) for _, a in c["locality"]] for c in cases],
            }
        }
    portability = None
    if all(c["portability"] for c in cases):
        portability = {
            "portability": {
                "prompt": [[q for q, _ in c["portability"]] for c in cases],
                "ground_truth": [[strip_space(a) for _, a in c["portability"]] for c in cases],
            }
        }

    per_case: list[dict] = []
    edit_times: list[float] = []
    if args.method == "rome":
        # one request per editor.edit call: EasyEdit edits, evaluates, restores the weights (single-edit protocol)
        for i in range(len(cases)):
            rss.reset()
            n_stats_before, n_eval_before = len(stats_records), len(eval_records)
            t0 = time.perf_counter()
            metrics, _, _ = editor.edit(
                prompts=[prompts[i]],
                target_new=[targets[i]],
                ground_truth=[truths[i]],
                rephrase_prompts=[rephrase[i]],
                subject=[subjects[i]],
                locality_inputs=None
                if locality is None
                else {
                    "neighborhood": {
                        "prompt": [locality["neighborhood"]["prompt"][i]],
                        "ground_truth": [locality["neighborhood"]["ground_truth"][i]],
                    }
                },
                portability_inputs=None
                if portability is None
                else {
                    "portability": {
                        "prompt": [portability["portability"]["prompt"][i]],
                        "ground_truth": [portability["portability"]["ground_truth"][i]],
                    }
                },
                keep_original_weight=True,
                verbose=False,
            )
            call_s = time.perf_counter() - t0
            m = metrics[0]
            late_stats = sum(r["seconds"] for r in stats_records[n_stats_before:])
            evals = eval_records[n_eval_before:]
            edit_s = float(m["time"]) - late_stats
            edit_times.append(edit_s)
            rec = _case_record(i, m, edit_s, late_stats, evals, call_s, rss.peak_mib())
            rec["edit_cpu_s"] = algo_cpu[-1]
            per_case.append(rec)
    else:
        rss.reset()
        n_eval_before = len(eval_records)
        t0 = time.perf_counter()
        metrics, _, _ = editor.batch_edit(
            prompts=prompts,
            target_new=targets,
            ground_truth=truths,
            rephrase_prompts=rephrase,
            subject=subjects,
            keep_original_weight=True,
            verbose=False,
        )
        call_s = time.perf_counter() - t0
        peak = rss.peak_mib()
        evals = eval_records[n_eval_before:]
        batch_s = float(metrics[0]["time"])
        edit_times.append(batch_s)
        for i, m in enumerate(metrics):
            rec = _case_record(i, m, batch_s, 0.0, evals[i :: len(metrics)], call_s, peak)
            rec["edit_cpu_s"] = algo_cpu[-1]
            per_case.append(rec)

    evals_per_case = [c["eval_s"] for c in per_case]
    result = {
        "peer": "easyeditor",
        "method": args.method,
        "model_dir": model_dir,
        "n_cases": len(cases),
        "layers": layers,
        "protocol": "single edit, weights restored after each case"
        if args.method == "rome"
        else f"one batch of {len(cases)} edits",
        "hparams": {k: v for k, v in vars(hp).items() if k != "model_name"} | {"model_name": model_dir},
        "timing": {
            "import_s": import_s,
            "load_s": load_s,
            "stats_s": stats_s,
            "stats_per_layer": stats_records,
            "stats_corpus": args.stats_corpus,
            "stats_rows": len(rows),
            "stats_seq_len": args.stats_seq_len,
            "edit_s_per_request": edit_times if args.method == "rome" else None,
            "edit_s_median": median(edit_times) if args.method == "rome" else None,
            "batch_edit_s": edit_times[0] if args.method == "memit" else None,
            "batch_edit_s_per_request": edit_times[0] / len(cases) if args.method == "memit" else None,
            "eval_s_per_case": evals_per_case,
            "eval_s_per_case_median": median(evals_per_case),
            "edit_cpu_s_per_request": [c["edit_cpu_s"] for c in per_case],
            "stats_cpu_s": stats_cpu,
            **run_timing(t_start, load_before),
        },
        **run_outcome(per_case, workarounds, redirect),
        "deltas": saved_deltas[-1] if saved_deltas else None,
        "versions": versions("easyeditor", "torch", "transformers", "torchvision", "numpy"),
        "notes": [
            "edit_s = EasyEdit's own per-request 'time' (apply_algo wall time) minus any statistics computed "
            "inside it; the first ROME request also generates EasyEdit's context templates (cached after).",
            "metrics are EasyEdit's token-level teacher-forced accuracies (rewrite_acc, rephrase_acc, "
            "locality = agreement of post- and pre-edit argmax tokens); rephrase uses the first paraphrase only "
            "(EasyEdit's single-edit API takes one rephrase prompt per request).",
            "eval_s = wall time of EasyEdit's compute_edit_quality calls for the case (pre + post).",
            "*_cpu_s = process CPU time (all threads) of the same span: less sensitive to a shared, loaded "
            "machine than wall time; compare loadavg_before/after with the core count.",
        ],
    }
    redirect.__exit__(None, None, None)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    t = result["timing"]
    print(
        f"easyeditor {args.method}: {len(cases)} cases, stats {stats_s:.1f}s, "
        f"edit median {t['edit_s_median'] or t['batch_edit_s']:.2f}s, eval median "
        f"{t['eval_s_per_case_median']:.3f}s/case, metrics {json.dumps(result['metrics'])} -> {args.out}"
    )
    return 0


def _case_record(
    i: int, m: dict, edit_s: float, late_stats: float, evals: list[float], call_s: float, peak: float
) -> dict:
    pre, post = m.get("pre", {}), m.get("post", {})
    loc = post.get("locality", {}) or {}
    loc_acc = [v for k, v in loc.items() if k.endswith("_acc")]
    port_pre = [v for k, v in (pre.get("portability") or {}).items() if k.endswith("_acc")]
    port_post = [v for k, v in (post.get("portability") or {}).items() if k.endswith("_acc")]
    return {
        "case": i,
        "edit_s": edit_s,
        "stats_inside_edit_s": late_stats,
        "eval_s": sum(evals),
        "eval_calls_s": evals,
        "call_s": call_s,
        "peak_rss_mib": peak,
        "pre": {
            "rewrite_acc": _mean(pre.get("rewrite_acc")),
            "rephrase_acc": _mean(pre.get("rephrase_acc")),
            "portability_acc": _mean(sum(port_pre, [])) if port_pre else None,
        },
        "post": {
            "rewrite_acc": _mean(post.get("rewrite_acc")),
            "rephrase_acc": _mean(post.get("rephrase_acc")),
            "locality_acc": _mean(sum(loc_acc, [])) if loc_acc else None,
            "portability_acc": _mean(sum(port_post, [])) if port_post else None,
        },
    }


def run_timing(t_start: float, load_before: tuple[float, float, float]) -> dict:
    """Timing entries every runner reports: wall time since ``t_start``, threads, load before and after."""
    return {
        "total_s": time.perf_counter() - t_start,
        "threads": torch.get_num_threads(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def run_outcome(per_case: list[dict], workarounds: list[dict], redirect: CpuRedirect) -> dict:
    """Result fields every runner reports: peak memory, aggregated metrics, cases, workarounds, redirects."""
    return {
        "memory": {
            "peak_rss_mib_per_request": [c["peak_rss_mib"] for c in per_case],
            "peak_rss_mib_process": PeakRSS.lifetime_mib(),
        },
        "metrics": _aggregate(per_case),
        "cases": per_case,
        "workarounds": workarounds,
        "device_redirects": redirect.redirected,
    }


def _aggregate(per_case: list[dict]) -> dict:
    out: dict[str, dict] = {"pre": {}, "post": {}}
    for phase in ("pre", "post"):
        keys = {k for c in per_case for k in c[phase]}
        for k in sorted(keys):
            vals = [c[phase][k] for c in per_case if c[phase].get(k) is not None]
            out[phase][k] = sum(vals) / len(vals) if vals and not any(math.isnan(v) for v in vals) else None
    return out


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
