"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

Corrupt the subject's token embeddings with Gaussian noise, then restore the clean value of one hidden state at
a time and measure how much of the clean answer probability comes back. States whose restoration recovers the
answer carry the fact.

    >>> loaded = lmedit.load_model("gemma3-270m")
    >>> result = causal_trace(loaded, "The Eiffel Tower is located in the city of", "Eiffel Tower")
    >>> result.scores["mlp"].shape                       # [layers, tokens], restored P(answer)
    >>> plot_trace(result, "out/eiffel.png")              # eiffel-hidden.png, eiffel-mlp.png, ... + JSON
    >>> agg = aggregate(loaded, cases, n=30)              # mean MLP effect per layer at the last subject token
    >>> agg.best_layer

Kinds of state:

* ``hidden``: the output of decoder layer ``l`` (the residual stream after the layer).
* ``mlp``: the output of the layer's ``mlp_out`` projection, restored over a window of ``window`` layers
  centred on ``l`` (as in the ROME paper).
* ``attn``: the output of the layer's ``attn_out`` projection, same window.

Restorations are batched: every row of a forward batch is one (cell, noise sample) pair, so a full trace is a
handful of forward passes, not one per cell. The clean states are recorded once and pasted into the corrupted
rows by ``edit_output`` hooks (``core.hooks.TraceDict``); the forward stops at the final norm and only the last
position is projected through the LM head.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmedit.core.hooks import TraceDict
from lmedit.errors import RequestError
from lmedit.models import tokens
from lmedit.models.arch import final_logits, get_submodule

log = logging.getLogger(__name__)

KINDS = ("hidden", "mlp", "attn")
_COMPONENT = {"hidden": "layer", "mlp": "mlp_out", "attn": "attn_out"}


@dataclass
class TraceResult:
    """The outcome of one causal trace.

    Attributes:
        scores: kind -> array [layers, tokens] of the answer probability with that state restored (mean over
            noise samples; NaN for positions that were not traced).
        clean_prob / corrupted_prob: P(answer) without corruption / corrupted with nothing restored (mean).
        tokens: the prompt's tokens as text (special prefix tokens included).
        subject_range: [start, end) token indices of the subject.
        answer, answer_id: the first answer token whose probability is traced.
    """

    prompt: str
    subject: str
    answer: str
    answer_id: int
    tokens: list[str]
    subject_range: tuple[int, int]
    clean_prob: float
    corrupted_prob: float
    scores: dict[str, np.ndarray]
    window: int
    samples: int
    noise: float
    seed: int
    model: str = "custom"

    @property
    def n_layers(self) -> int:
        return next(iter(self.scores.values())).shape[0]

    def effect(self, kind: str) -> np.ndarray:
        """Indirect effect [layers, tokens]: restored probability minus the corrupted probability."""
        return self.scores[kind] - self.corrupted_prob

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "answer": self.answer,
            "answer_id": self.answer_id,
            "tokens": self.tokens,
            "subject_range": list(self.subject_range),
            "clean_prob": self.clean_prob,
            "corrupted_prob": self.corrupted_prob,
            "scores": {
                k: [[None if math.isnan(x) else x for x in row] for row in v.tolist()]
                for k, v in self.scores.items()
            },
            "window": self.window,
            "samples": self.samples,
            "noise": self.noise,
            "seed": self.seed,
            "model": self.model,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TraceResult:
        scores = {
            k: np.array([[np.nan if x is None else x for x in row] for row in v], dtype=np.float64)
            for k, v in d["scores"].items()
        }
        return cls(**{**d, "scores": scores, "subject_range": tuple(d["subject_range"])})

    def save_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def subject_token_range(tok, prompt: str, subject: str) -> tuple[str, tuple[int, int]]:
    """The prompt text (``{}`` filled) and the [start, end) token range of ``subject`` in its encoding."""
    if "{}" in prompt:
        start = prompt.index("{}")
        text = prompt.replace("{}", subject, 1)
    elif subject in prompt:
        start = prompt.index(subject)
        text = prompt
    else:
        raise RequestError("subject", f"{subject!r} does not occur in the prompt {prompt!r}")
    end = start + len(subject)
    _, offsets = tokens.encode_prompt(tok, text)
    inside = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    if not inside:
        raise RequestError("subject", f"no token of {prompt!r} covers the subject {subject!r}")
    return text, (inside[0], inside[-1] + 1)


@torch.no_grad()
def embedding_noise_std(loaded, chunk: int = 32768) -> float:
    """Standard deviation of the embedding module's outputs over the whole vocabulary (scaling included).

    The ROME paper takes the std over subject-token embeddings; the whole vocabulary is a model-only
    statistic that needs no dataset, and the embedding module's output includes any scaling
    (e.g. Gemma's sqrt(d_model)).
    """
    model = loaded.model
    embed = get_submodule(model, loaded.arch.embed)
    vocab = embed.weight.shape[0] if hasattr(embed, "weight") else len(loaded.tokenizer)
    device = loaded.device
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, vocab, chunk):
        ids = torch.arange(start, min(start + chunk, vocab), device=device)
        e = embed(ids).double()  # [chunk, d_model]
        total += float(e.sum())
        total_sq += float((e * e).sum())
        count += e.numel()
    mean = total / count
    return math.sqrt(max(total_sq / count - mean * mean, 0.0))


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, new: torch.Tensor) -> Any:
    return (new, *output[1:]) if isinstance(output, tuple) else new


def _window(layer: int, n_layers: int, window: int) -> range:
    """Layers [l - w//2, l + ceil(w/2)) clipped to the model (ROME's centred window)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def _answer_prob(loaded, hidden_last: torch.Tensor, answer_id: int) -> torch.Tensor:
    """P(answer) from final-norm outputs at the last position [rows, d_model] -> [rows]."""
    logits = final_logits(loaded.model, loaded.arch, hidden_last).float()  # [rows, vocab]
    return torch.softmax(logits, dim=-1)[:, answer_id]


def causal_trace(
    loaded,
    prompt: str,
    subject: str,
    answer: str | None = None,
    kinds: Sequence[str] = KINDS,
    samples: int = 10,
    noise: float | None = None,
    window: int = 10,
    seed: int = 0,
    positions: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 128,
) -> TraceResult:
    """Trace where ``prompt``'s answer is computed (see module docstring).

    Args:
        loaded: a LoadedModel.
        prompt: the prompt, containing ``subject`` or a ``{}`` placeholder for it.
        subject: the span whose token embeddings are corrupted.
        answer: the answer whose first token's probability is traced; default: the clean model's top token.
        kinds: any of ``"hidden"``, ``"mlp"``, ``"attn"``.
        samples: noise samples per cell (the score is their mean).
        noise: std of the Gaussian noise; default 3x ``embedding_noise_std`` (the ROME paper's 3 sigma).
        window: layers restored together for ``mlp``/``attn`` (``hidden`` always restores one layer).
        seed: seed of the noise (results are reproducible given it).
        positions: token indices to restore (default: all); other columns are NaN.
        layers: layers to trace (default: all); other rows are NaN.
        batch_size: rows (cell x sample) per forward pass.

    Returns:
        TraceResult with ``scores[kind]`` [layers, tokens].
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds: unknown {unknown}; choose from {KINDS}")
    if samples < 1 or window < 1 or batch_size < 1:
        raise ValueError("samples, window and batch_size must be >= 1")
    model, tok = loaded
    arch = loaded.arch
    device = loaded.device
    n_layers = arch.n_layers(model)
    text, (s0, s1) = subject_token_range(tok, prompt, subject)
    ids_list, _ = tokens.encode_prompt(tok, text)
    n_tok = len(ids_list)
    ids = torch.tensor([ids_list], device=device)  # [1, pos]
    positions = list(range(n_tok)) if positions is None else [p % n_tok for p in positions]
    layers = list(range(n_layers)) if layers is None else list(layers)
    if any(not 0 <= la < n_layers for la in layers):
        raise ValueError(f"layers: must lie in 0..{n_layers - 1}, got {layers}")
    if noise is None:
        noise = 3.0 * embedding_noise_std(loaded)
    names = {k: [arch.module_name(_COMPONENT[k], i) for i in range(n_layers)] for k in kinds}
    all_names = [n for k in kinds for n in names[k]]

    with torch.no_grad():
        clean, answer_id, clean_prob = _clean_run(loaded, ids, all_names, answer, text)
        # the noise: one [subject tokens, d_model] sample per noise index, from a seeded CPU generator
        gen = torch.Generator().manual_seed(seed)
        d_model = clean[all_names[0]].shape[-1]
        eps = torch.randn((samples, s1 - s0, d_model), generator=gen) * noise
        # rows: (sample, restorations); the first `samples` rows restore nothing (the corrupted baseline)
        rows: list[tuple[int, tuple[tuple[str, int], ...]]] = [(s, ()) for s in range(samples)]
        cells: list[tuple[str, int, int]] = []
        for k in kinds:
            for layer in layers:
                span = range(layer, layer + 1) if k == "hidden" else _window(layer, n_layers, window)
                for t in positions:
                    cells.append((k, layer, t))
                    restore = tuple((names[k][j], t) for j in span)
                    rows.extend((s, restore) for s in range(samples))
        probs = torch.empty(len(rows))
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            probs[start : start + len(chunk)] = _corrupted_batch(
                loaded, ids, chunk, clean, eps, (s0, s1), all_names, answer_id
            )
    corrupted_prob = float(probs[:samples].mean())
    per_cell = probs[samples:].view(len(cells), samples).mean(1)
    scores = {k: np.full((n_layers, n_tok), np.nan) for k in kinds}
    for (k, layer, t), p in zip(cells, per_cell.tolist()):
        scores[k][layer, t] = p
    return TraceResult(
        prompt=text,
        subject=subject,
        answer=tok.decode([answer_id]),
        answer_id=answer_id,
        tokens=[tok.decode([i]) for i in ids_list],
        subject_range=(s0, s1),
        clean_prob=clean_prob,
        corrupted_prob=corrupted_prob,
        scores=scores,
        window=window,
        samples=samples,
        noise=float(noise),
        seed=seed,
        model=getattr(loaded, "name", "custom"),
    )


def answer_token(tok, prompt: str, answer: str) -> int:
    """Id of the first token of ``answer`` after ``prompt`` (the package's tokenization policy)."""
    enc = tokens.encode_pair(tok, prompt, answer)
    if enc.target_len == 0:
        raise RequestError("answer", f"{answer!r} tokenizes to nothing")
    return enc.ids[enc.prompt_len]


def _clean_run(
    loaded, ids: torch.Tensor, names: list[str], answer: str | None, text: str
) -> tuple[dict[str, torch.Tensor], int, float]:
    """Clean states {module: [pos, d]} of ``names``, the answer's first token id and its clean probability."""
    model, tok = loaded
    arch = loaded.arch
    with TraceDict(model, [*names, arch.ln_f], retain_output=True, detach=True, stop=True) as td:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    clean = {n: _first(td[n].output)[0] for n in names}
    hidden_last = td[arch.ln_f].output[:, -1]  # [1, d_model]
    if answer is None:
        logits = final_logits(model, arch, hidden_last).float()
        answer_id = int(logits[0].argmax())
    else:
        answer_id = answer_token(tok, text, answer)
    clean_prob = float(_answer_prob(loaded, hidden_last, answer_id)[0])
    return clean, answer_id, clean_prob


def _corrupted_batch(
    loaded,
    ids: torch.Tensor,
    rows: list[tuple[int, tuple[tuple[str, int], ...]]],
    clean: dict[str, torch.Tensor],
    eps: torch.Tensor,
    subject: tuple[int, int],
    names: list[str],
    answer_id: int,
) -> torch.Tensor:
    """P(answer) for each row: subject embeddings + noise sample, the row's clean states pasted back."""
    model = loaded.model
    arch = loaded.arch
    device = ids.device
    s0, s1 = subject
    n = len(rows)
    sample_idx = torch.tensor([s for s, _ in rows])
    row_noise = eps[sample_idx].to(device)  # [rows, subject tokens, d_model]
    plan: dict[str, tuple[list[int], list[int]]] = {}
    for r, (_, restore) in enumerate(rows):
        for name, t in restore:
            rr, tt = plan.setdefault(name, ([], []))
            rr.append(r)
            tt.append(t)
    plan_t = {
        name: (torch.tensor(rr, device=device), torch.tensor(tt, device=device))
        for name, (rr, tt) in plan.items()
    }
    final: dict[str, torch.Tensor] = {}

    def edit(output: Any, name: str) -> Any:
        if name == arch.embed:
            h = output.clone()  # [rows, pos, d_model]
            h[:, s0:s1] = (h[:, s0:s1].float() + row_noise).to(h.dtype)
            return h
        if name == arch.ln_f:
            final["h"] = _first(output)[:, -1]
            return output
        if name in plan_t:
            rr, tt = plan_t[name]
            h = _first(output).clone()
            h[rr, tt] = clean[name][tt].to(h.dtype)
            return _replace_first(output, h)
        return output

    batch_ids = ids.expand(n, -1)
    with TraceDict(model, [arch.embed, *names, arch.ln_f], retain_output=False, edit_output=edit, stop=True):
        model(input_ids=batch_ids, attention_mask=torch.ones_like(batch_ids), use_cache=False)
    return _answer_prob(loaded, final["h"], answer_id).cpu()


# ---------------------------------------------------------------------------------------------- many facts
def case_fields(case: Any) -> tuple[str, str, str | None]:
    """(prompt, subject, true answer) of an EditRequest, a ROME CounterFact record or a flat record."""
    if hasattr(case, "prompt_text"):
        return case.prompt_text, case.subject, case.target_true
    if not isinstance(case, dict):
        raise TypeError(f"a case must be an EditRequest or a dict, got {type(case).__name__}")
    if "requested_rewrite" in case:
        rw = case["requested_rewrite"]
        true = rw.get("target_true")
        return rw["prompt"], rw["subject"], true["str"] if isinstance(true, dict) else true
    answer = case.get("target_true", case.get("ground_truth"))
    if isinstance(answer, list):
        answer = answer[0] if answer else None
    return case["prompt"], case["subject"], answer


def load_cases(path: str | os.PathLike) -> list[dict]:
    """Records of a JSON list / JSONL file (ROME CounterFact, flat CounterFact/zsRE or lmedit requests)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict):
        data = data.get("cases", data.get("requests", [data]))
    return list(data)


@dataclass
class AggregateResult:
    """Mean indirect effects over many facts, at the last subject token and the prompt's last token.

    Attributes:
        effects: kind -> {"last_subject": [layers], "last_token": [layers]} mean (restored - corrupted) P(answer).
        stderr: same keys, standard error of the mean.
        best_layer: the layer with the largest ``mlp`` effect at the last subject token.
    """

    model: str
    kinds: list[str]
    effects: dict[str, dict[str, list[float]]]
    stderr: dict[str, dict[str, list[float]]]
    n_used: int
    n_scanned: int
    window: int
    samples: int
    noise: float
    known_only: bool
    mean_clean_prob: float
    mean_corrupted_prob: float
    cases: list[dict] = field(default_factory=list)

    @property
    def best_layer(self) -> int:
        kind = "mlp" if "mlp" in self.effects else self.kinds[0]
        return int(np.argmax(self.effects[kind]["last_subject"]))

    def to_dict(self) -> dict:
        return {**self.__dict__, "best_layer": self.best_layer}

    def save_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def aggregate(
    loaded,
    cases: Iterable[Any],
    n: int = 30,
    kinds: Sequence[str] = ("mlp",),
    samples: int = 10,
    window: int = 10,
    noise: float | None = None,
    seed: int = 0,
    known_only: bool = True,
    max_scan: int | None = None,
    batch_size: int = 128,
    last_token: bool = False,
) -> AggregateResult:
    """Average the indirect effects of ``n`` facts (restoring at the last subject token and the last token).

    Args:
        cases: EditRequests or records (see ``case_fields``); the true answer is traced.
        n: facts to average over.
        known_only: keep only facts whose true answer's first token is the clean model's top prediction
            (as the ROME paper does with its "known facts"); cases are scanned in order until ``n`` are found.
        max_scan: stop scanning after this many cases (default: all).
        last_token: also restore at the prompt's last token (doubles the cost; ``effects[k]["last_token"]``).

    Returns:
        AggregateResult; ``best_layer`` is the argmax of the MLP effect at the last subject token.
    """
    tok = loaded.tokenizer
    if noise is None:
        noise = 3.0 * embedding_noise_std(loaded)
    n_layers = loaded.arch.n_layers(loaded.model)
    per_kind: dict[str, dict[str, list[np.ndarray]]] = {
        k: {"last_subject": [], "last_token": []} for k in kinds
    }
    records: list[dict] = []
    scanned = 0
    for case in cases:
        if len(records) >= n or (max_scan is not None and scanned >= max_scan):
            break
        scanned += 1
        prompt, subject, answer = case_fields(case)
        if not answer:
            continue
        try:
            text, (s0, s1) = subject_token_range(tok, prompt, subject)
        except RequestError as e:
            log.info("skipping case %d: %s", scanned - 1, e)
            continue
        if known_only:
            ids_list, _ = tokens.encode_prompt(tok, text)
            ids = torch.tensor([ids_list], device=loaded.device)
            with torch.no_grad():
                _, top_id, _ = _clean_run(loaded, ids, [], None, text)
            if answer_token(tok, text, answer) != top_id:
                continue
        result = causal_trace(
            loaded,
            text,
            subject,
            answer,
            kinds=kinds,
            samples=samples,
            noise=noise,
            window=window,
            seed=seed + scanned,
            positions=[s1 - 1, -1] if last_token else [s1 - 1],
            batch_size=batch_size,
        )
        last = len(result.tokens) - 1
        for k in kinds:
            eff = result.effect(k)
            per_kind[k]["last_subject"].append(eff[:, s1 - 1])
            if last_token:
                per_kind[k]["last_token"].append(eff[:, last])
        records.append(
            {
                "prompt": text,
                "subject": subject,
                "answer": answer,
                "clean_prob": result.clean_prob,
                "corrupted_prob": result.corrupted_prob,
            }
        )
        log.info("traced %d/%d: %r", len(records), n, text)
    if not records:
        raise ValueError(
            f"no usable case among {scanned} scanned (known_only={known_only}); pass more cases or known_only=False"
        )
    if len(records) < n:
        log.warning("only %d of the requested %d facts were usable (%d scanned)", len(records), n, scanned)
    effects: dict[str, dict[str, list[float]]] = {}
    stderr: dict[str, dict[str, list[float]]] = {}
    for k in kinds:
        effects[k], stderr[k] = {}, {}
        for where, arrs in per_kind[k].items():
            if not arrs:
                continue
            stack = np.stack(arrs)  # [facts, layers]
            effects[k][where] = stack.mean(0).tolist()
            stderr[k][where] = (
                stack.std(0, ddof=1) / math.sqrt(len(arrs)) if len(arrs) > 1 else np.zeros(n_layers)
            ).tolist()
    return AggregateResult(
        model=getattr(loaded, "name", "custom"),
        kinds=list(kinds),
        effects=effects,
        stderr=stderr,
        n_used=len(records),
        n_scanned=scanned,
        window=window,
        samples=samples,
        noise=float(noise),
        known_only=known_only,
        mean_clean_prob=float(np.mean([r["clean_prob"] for r in records])),
        mean_corrupted_prob=float(np.mean([r["corrupted_prob"] for r in records])),
        cases=records,
    )


def suggest_layers(agg: AggregateResult, memit_span: int = 5, fraction: float = 0.5) -> dict:
    """ROME/MEMIT layer presets from an aggregate trace.

    ROME: the layer with the largest MLP effect at the last subject token. MEMIT: the contiguous run of
    layers ending at that peak whose effect is at least ``fraction`` of the peak, at most ``memit_span`` long
    (MEMIT spreads its update over the critical MLP layers up to the peak).
    """
    kind = "mlp" if "mlp" in agg.effects else agg.kinds[0]
    curve = agg.effects[kind]["last_subject"]
    best = agg.best_layer
    memit = [best]
    while len(memit) < memit_span and memit[0] > 0 and curve[memit[0] - 1] >= fraction * curve[best]:
        memit.insert(0, memit[0] - 1)
    return {
        "model": agg.model,
        "rome": {"layers": [best]},
        "memit": {"layers": memit},
        "evidence": {
            "kind": kind,
            "n_facts": agg.n_used,
            "window": agg.window,
            "peak_effect": curve[best],
            "curve": curve,
        },
    }


# ------------------------------------------------------------------------------------------------ figures
_CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
_TITLES = {
    "hidden": "single restored layer (hidden state)",
    "mlp": "restored MLP output",
    "attn": "restored attention output",
}


def plot_trace(result: TraceResult, path: str | os.PathLike, kind: str | None = None) -> list[Path]:
    """Heatmap PNG(s) of a trace (tokens x layers, subject tokens starred) plus ``<stem>.json``.

    With ``kind`` given (or a single-kind result) ``path`` is the PNG; otherwise one ``<stem>-<kind>.png``
    per kind is written next to it. Returns the written paths (PNGs first, the JSON last).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kinds = [kind] if kind is not None else list(result.scores)
    out: list[Path] = []
    s0, s1 = result.subject_range
    labels = [repr(t)[1:-1] + ("*" if s0 <= i < s1 else "") for i, t in enumerate(result.tokens)]
    for k in kinds:
        target = path if len(kinds) == 1 else path.with_name(f"{path.stem}-{k}{path.suffix or '.png'}")
        scores = result.scores[k].T  # [tokens, layers]
        fig = Figure(figsize=(0.35 * scores.shape[1] + 3.2, 0.32 * scores.shape[0] + 1.6))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        im = ax.pcolormesh(
            np.ma.masked_invalid(scores), cmap=_CMAPS.get(k, "viridis"), vmin=result.corrupted_prob
        )
        ax.invert_yaxis()
        ax.set_yticks(np.arange(scores.shape[0]) + 0.5)
        ax.set_yticklabels(labels, fontsize=8)
        for lab, i in zip(ax.get_yticklabels(), range(scores.shape[0])):
            if s0 <= i < s1:
                lab.set_fontweight("bold")
        step = max(1, scores.shape[1] // 10)
        ax.set_xticks(np.arange(0, scores.shape[1], step) + 0.5)
        ax.set_xticklabels([str(i) for i in range(0, scores.shape[1], step)], fontsize=8)
        window = "" if k == "hidden" else f", window {result.window}"
        ax.set_xlabel(f"layer ({_TITLES.get(k, k)}{window})", fontsize=8)
        ax.set_title(
            f"{result.model}: p({result.answer!r}) clean {result.clean_prob:.3f}, corrupted {result.corrupted_prob:.3f}",
            fontsize=8,
        )
        cb = fig.colorbar(im, ax=ax)
        cb.ax.set_title(f"p({result.answer.strip()})", fontsize=7)
        fig.tight_layout()
        fig.savefig(target, dpi=120)
        out.append(target)
    out.append(result.save_json(path.with_suffix(".json")))
    return out


def plot_aggregate(results: Sequence[AggregateResult], path: str | os.PathLike, kind: str = "mlp") -> Path:
    """Curve PNG of the mean ``kind`` effect per layer at the last subject token, one line per result."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6.4, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for agg in results:
        mean = np.array(agg.effects[kind]["last_subject"])
        err = np.array(agg.stderr[kind]["last_subject"])
        x = np.arange(len(mean)) / max(len(mean) - 1, 1)
        ax.plot(
            x, mean, marker="o", ms=3, label=f"{agg.model} (best layer {int(np.argmax(mean))} of {len(mean)})"
        )
        ax.fill_between(x, mean - err, mean + err, alpha=0.2)
    ax.set_xlabel("relative layer depth (layer / (n_layers - 1))")
    ax.set_ylabel(f"mean indirect effect, {kind}")
    ax.set_title(
        f"{kind} restoration at the last subject token ("
        + ", ".join(f"{a.model}: {a.n_used} facts" for a in results)
        + f"; window {results[0].window})",
        fontsize=8,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
