"""WISE (Wang et al. 2024, "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing"): a side memory.

The main memory is one MLP output projection ``W_v`` (by default at 2/3 of the depth), left untouched. The edits
go into a *side memory* ``W_v'``, a copy of ``W_v`` held by a ``WiseSideMemory`` wrapper
(``lmedit.core.adapters``) as the difference ``delta = W_v' - W_v``. At inference a router picks, per sequence,
which memory answers: with ``A(x)`` the projection's input at a token, the side memory's activation is
``act(x) = ||A(x) (W_v' - W_v)||_2``; a position uses the side memory when the largest activation over the
sequence so far (for the position that predicts the answer: over the whole prompt) exceeds a threshold
``epsilon``, else the main memory, bit for bit.

Editing (one patch, requests in order):

* **Knowledge sharding.** The requests are cut into shards of ``edits_per_shard``. Each shard starts from the
  current side memory and may change only a random subset of ``mask_ratio`` of its rows (rows = the
  projection's input features, the MLP's neurons): the paper's random gradient mask, realised by training only
  those rows. The mask is drawn from ``seed`` and the shard's position in the edit stream, so the shards of a
  lifelong chain use different subspaces.
* **Loss** (per step): the teacher-forced NLL of the targets with the side memory applied, plus the routing
  loss ``ReLU(act(x_i) - alpha) + ReLU(beta - act(x_e)) + ReLU(gamma - (act(x_e) - act(x_i)))``, averaged over
  edit prompts ``x_e`` and irrelevant inputs ``x_i`` (``act`` of a prompt = its maximum over tokens, as the
  router sees it). The margins are in units of the mean norm of the base projection's output on the irrelevant
  prompts (``act_margin``), so one default serves models of any width. Optionally (``cov_weight`` > 0, our
  addition) a penalty on the mean squared activation over the corpus of the rows the shard adds,
  ``E||A(x)[index] rows||^2`` from the key statistics ``E[x x^T]`` of the projection's inputs (``cov_tokens``
  tokens of ``irrelevant_corpus``), in units of the same scale squared: it reaches all ordinary text, not only
  the sampled passages. Only the shard's own rows are penalised: penalising the whole side memory made later
  shards cancel earlier edits (8-edit Gemma chain: reliability_tf 0.08 after 25 edits). Early stopping looks at
  the NLL and the routing margins, not at this penalty.
* **Irrelevant inputs**: fixed generic sentences, passages of ordinary text sampled per shard from a corpus (the
  paper's pool of irrelevant data; ``irrelevant_corpus``, by default the offline Wikipedia fragment also used for
  key statistics), and (our addition) *contrast prompts*, the edit's own template filled with other subjects,
  without which the template alone opens the side memory for neighbouring subjects. Each shard draws
  ``irrelevant_samples`` windows of ``irrelevant_tokens`` tokens from a pool of the corpus's first
  ``irrelevant_pool`` windows, seeded by its position in the edit stream, so a lifelong chain trains against
  ever more text; the pool's last ``HELDOUT_WINDOWS`` windows are never trained on and serve as a held-out
  check of the routing (``info["heldout_routed_to_side"]``). Optionally (``irrelevant_facts``) short factual
  prompts about other subjects, sampled per shard from a dataset's prompts (the paper's irrelevant data from the
  task's own distribution), with their own held-out check (``info["heldout_facts_routed_to_side"]``), and
  (``fact_contrast``) each edit's template filled with subjects of that pool (real-entity contrast prompts,
  checked on held-out subjects: ``info["heldout_neighbours_routed_to_side"]``). With only fixed sentences a
  100-edit Gemma chain kept the side memory silent on them (largest activation 1.4 vs epsilon 7.1) but routed
  most other text to it (locality 0.20, WikiText-2 perplexity 85.7 -> 323).
* **Merging.** With several shards, their changes (task vectors relative to the starting side memory) are merged
  by TIES (trim each to its largest ``merge_density`` fraction by magnitude, elect each entry's sign by the sum,
  average the entries that agree with it), or averaged (``merge="linear"``).
* **Threshold.** ``epsilon = act_ratio * min over the chain's edit prompts of act(prompt)``, each activation
  recorded when its own patch was made (with that patch's final side memory), as the paper (and EasyEdit) keep
  a running minimum: O(1) per patch (the patch keeps the minimum, not the chain's prompts). A later patch may
  lower an earlier edit's activation below epsilon (that edit then loses its routing). An earlier version
  recomputed every chain edit's activation with the final memory (every edit routed by construction, but
  O(N) forward passes per patch); in a 100-edit Gemma chain that epsilon rose 7.3 -> 10.5 while the irrelevant
  prompts' largest activation stayed 1.38, so neither form routes irrelevant prompts there. With ``act_floor``
  (our addition) epsilon is at least ``act_ratio * beta``, so an edit that missed its margin is not routed
  instead of lowering the threshold for every input.

Lifelong editing: when the model already carries a WISE wrapper at the chosen projection, training starts from
its side memory and the patch's adapter *replaces* it (``AdapterSpec.parent``); the patch stores only the rows
it changed (``index``, ``rows``), the threshold, the running minimum activation and the chain's length.

    >>> session = lmedit.EditSession(loaded)
    >>> session.apply(lmedit.edit(loaded, req1, method="wise"))
    >>> session.apply(lmedit.edit(loaded, req2, method="wise"))   # the same side memory, extended

Not implemented from the paper: WISE-Retrieve (several side memories with top-1 activation retrieval) and its
replay of earlier edits' training data (``replay_keys`` replays their keys instead). Different: the mask selects
rows, not single entries (so a patch stores only the rows it changed), the optimiser is Adam (the paper's is SGD),
and during cached generation each token after the first generated one is routed by its own activation (a decoding
step sees one position).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Literal

import torch

from lmedit.config import MethodConfig, hp
from lmedit.core.adapters import AdapterSpec, adapter_site, unwrap, wise_side_delta
from lmedit.core.corpus import resolve_corpus
from lmedit.core.forward import replay_below, target_logprobs
from lmedit.core.hooks import Trace
from lmedit.core.patch import EditPatch
from lmedit.core.stats import covariances, token_sequences
from lmedit.data.loaders import load_dataset
from lmedit.errors import ConfigError
from lmedit.models import tokens
from lmedit.registry import register_method
from lmedit.request import EditRequest

log = logging.getLogger(__name__)

#: Generic sentences unrelated to any edit: WISE's irrelevant inputs x_i and T-Patcher's memory set.
UNRELATED_PROMPTS: tuple[str, ...] = (
    "The weather was cold and windy all week.",
    "She opened the door and walked into the kitchen.",
    "Water boils at a lower temperature on a high mountain.",
    "He practises the piano for an hour every evening.",
    "The meeting was moved to Thursday afternoon.",
    "Most birds build their nests in the spring.",
    "The recipe calls for two cups of flour and one egg.",
    "After the long drive, we stopped for coffee.",
    "The children played football in the park until dark.",
    "Please remember to turn off the lights when you leave.",
    "The museum is closed on public holidays.",
    "A good night's sleep helps you concentrate.",
)

#: Other subjects put into each edit's own template (none occurs in the bundled dataset): extra irrelevant inputs.
CONTRAST_SUBJECTS: tuple[str, ...] = ("Mount Kilimanjaro", "Marie Curie", "Heineken", "Vincent van Gogh")

#: Windows at the end of the irrelevant-text pool never sampled for training: the held-out routing check.
HELDOUT_WINDOWS = 32

#: Prompts at the end of the irrelevant-facts pool never sampled for training: the held-out check on facts.
HELDOUT_FACTS = 32

#: Layer presets for the bundled models: 2/3 of the depth (Gemma 3 270M has 18 layers, SmolLM2 135M 30).
PRESETS = {
    "gemma3-270m": {"layer": 12},
    "smollm2-135m": {"layer": 20},
}


@dataclass
class WiseConfig(MethodConfig):
    layer: int | None = hp(
        None, "Decoder layer whose MLP output projection gets the side memory (default: 2/3 of the depth)."
    )
    lr: float = hp(0.005, "Adam learning rate for the side memory's trainable rows.")
    steps: int = hp(60, "Maximum optimisation steps (Adam updates) per shard.")
    mask_ratio: float = hp(
        0.2, "rho: fraction of the side memory's rows (MLP neurons) one shard may change (its random mask)."
    )
    act_margin: list[float] = hp(
        [0.5, 2.0, 1.0],
        "alpha, beta, gamma of the routing loss: irrelevant prompts' activation below alpha, edit prompts' "
        "above beta, and the edit's above the irrelevant ones' by gamma; in units of the mean L2 norm of the base "
        "projection's output over the irrelevant prompts' tokens.",
    )
    act_ratio: float = hp(
        0.88,
        "Routing threshold epsilon = act_ratio * the smallest activation over the chain's edit prompts, each "
        "recorded when its patch was made.",
    )
    act_floor: bool = hp(
        False,
        "Floor the threshold at act_ratio * beta (our addition): an edit whose activation stayed below beta (its "
        "shard missed the margin) is then not routed, instead of lowering epsilon for every later input.",
    )
    edits_per_shard: int = hp(
        5,
        "Edits trained together in one shard; a patch with more requests trains several shards and merges them.",
    )
    merge: Literal["ties", "linear"] = hp(
        "ties", "How shards are merged: TIES (trim, elect sign, disjoint mean) or a plain average ('linear')."
    )
    merge_density: float = hp(
        0.53,
        "TIES trim: fraction of each shard's entries (of the whole matrix) kept, the largest by magnitude.",
    )
    irrelevant_prompts: list[str] = hp(
        list(UNRELATED_PROMPTS), "Irrelevant inputs x_i of the routing loss (every token counts)."
    )
    irrelevant_corpus: str | None = hp(
        "gensim-wiki",
        "Corpus (anything `lmedit stats --corpus` takes) from which each shard samples irrelevant passages; "
        "None uses only irrelevant_prompts and the contrast prompts.",
    )
    irrelevant_samples: int = hp(16, "Passages sampled from irrelevant_corpus per shard.")
    irrelevant_tokens: int = hp(48, "Length in tokens of each sampled passage (special prefix included).")
    irrelevant_pool: int = hp(
        1024,
        f"Passages the samples are drawn from: the corpus's first irrelevant_pool windows, less the last "
        f"{HELDOUT_WINDOWS}, which are kept for the held-out routing check.",
    )
    irrelevant_facts: str | None = hp(
        None,
        "Dataset (anything `lmedit bench --dataset` takes) whose prompts - edit prompts, paraphrases and "
        "locality prompts of its cases from irrelevant_facts_from on - form a pool of short factual prompts about "
        "other subjects; each shard trains against irrelevant_fact_samples of them (prompts naming one of the "
        "shard's subjects skipped), the paper's irrelevant data from the task's own distribution. Must not share "
        "prompts with the cases you evaluate: benchmarking the first N cases of a file, pool from case N on. "
        "None: no factual pool.",
    )
    irrelevant_facts_from: int = hp(
        0, "First case of irrelevant_facts in the pool (the cases before it are left for evaluation)."
    )
    irrelevant_fact_samples: int = hp(32, "Prompts sampled from the irrelevant_facts pool per shard.")
    fact_contrast: int = hp(
        0,
        "Subjects of the irrelevant_facts pool's cases put into each edit's own template per shard, as further "
        "contrast prompts with real entities (the form of CounterFact's neighbourhood prompts: same relation, "
        "other subject); the pool's last subjects are held out for the check "
        "info['heldout_neighbours_routed_to_side']. Needs irrelevant_facts (our addition; 0: off).",
    )
    object_contrast: int = hp(
        0,
        "Prompts of the irrelevant_facts pool whose true answer is the edit's true object (target_true) added per "
        "edit and shard as further irrelevant inputs: other subjects with the same relation and object, in the "
        "pool's own phrasings - how CounterFact builds its neighbourhood prompts (our addition; needs "
        "irrelevant_facts; 0: off; an edit without target_true, or whose object the pool lacks, gets none).",
    )
    contrast_subjects: list[str] = hp(
        list(CONTRAST_SUBJECTS),
        "Subjects put into each edit's own prompt template to make further irrelevant inputs, so that the "
        "template alone does not open the side memory (our addition to the paper; [] turns it off).",
    )
    replay_keys: int = hp(
        0,
        "Edit keys of earlier patches of the chain (each edit prompt's input at its most active token, stored in "
        "the patch) that each shard keeps above the edit margins, sampled per shard: with irrelevant_facts a shard "
        "that learns to stay silent on factual prompts about other subjects silences earlier edits too. As many "
        "of the earlier edits' contrast keys (their contrast prompts' inputs at the most active token) are kept "
        "below the irrelevant margin, so the replayed keys do not reopen their neighbours (our addition; 0: off, "
        "the default - measured trade-off in docs/weight-preserving.md).",
    )
    cov_weight: float = hp(
        0.0,
        "Weight of the penalty on the mean squared activation of the rows a shard adds, "
        "E||A(x)[index] rows||^2 / scale^2 over irrelevant_corpus (from the key statistics of the projection's "
        "inputs, cov_tokens tokens); 0 turns it off. Those tokens include the "
        "held-out windows' text, so with it the held-out routing check is not independent.",
    )
    cov_tokens: int = hp(100_000, "Corpus tokens of the key statistics behind cov_weight.")
    early_stop_loss: float = hp(
        1e-2,
        "Stop a shard once its target NLL is below this and every routing margin holds (routing loss 0).",
    )
    progress: bool = hp(False, "Log each shard's losses at INFO level.")

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if not 0 < self.mask_ratio <= 1:
            raise ConfigError(f"mask_ratio must be in (0, 1], got {self.mask_ratio}")
        if len(self.act_margin) != 3 or min(self.act_margin) < 0:
            raise ConfigError(
                f"act_margin must be three non-negative numbers [alpha, beta, gamma], got {self.act_margin}"
            )
        if not 0 < self.act_ratio <= 1:
            raise ConfigError(f"act_ratio must be in (0, 1], got {self.act_ratio}")
        if self.edits_per_shard < 1:
            raise ConfigError(f"edits_per_shard must be >= 1, got {self.edits_per_shard}")
        if not 0 < self.merge_density <= 1:
            raise ConfigError(f"merge_density must be in (0, 1], got {self.merge_density}")
        if not self.irrelevant_prompts:
            raise ConfigError(
                "irrelevant_prompts must not be empty: the routing loss needs irrelevant inputs"
            )
        if self.fact_contrast < 0:
            raise ConfigError(f"fact_contrast must be >= 0 (0 turns it off), got {self.fact_contrast}")
        if self.fact_contrast and self.irrelevant_facts is None:
            raise ConfigError("fact_contrast takes its subjects from irrelevant_facts: set irrelevant_facts")
        if self.object_contrast < 0:
            raise ConfigError(f"object_contrast must be >= 0 (0 turns it off), got {self.object_contrast}")
        if self.object_contrast and self.irrelevant_facts is None:
            raise ConfigError("object_contrast takes its prompts from irrelevant_facts: set irrelevant_facts")
        if self.replay_keys < 0:
            raise ConfigError(f"replay_keys must be >= 0 (0 turns replay off), got {self.replay_keys}")
        if self.cov_weight < 0:
            raise ConfigError(f"cov_weight must be >= 0 (0 turns the penalty off), got {self.cov_weight}")
        if self.cov_weight > 0:
            if self.irrelevant_corpus is None:
                raise ConfigError(
                    "cov_weight > 0 needs irrelevant_corpus (its key statistics give the penalty); "
                    "set irrelevant_corpus or cov_weight=0"
                )
            if self.cov_tokens < 1:
                raise ConfigError(f"cov_tokens must be >= 1, got {self.cov_tokens}")
        if self.irrelevant_corpus is not None:
            if self.irrelevant_samples < 1:
                raise ConfigError(
                    f"irrelevant_samples must be >= 1, got {self.irrelevant_samples} "
                    "(set irrelevant_corpus=None to sample no passages)"
                )
            if self.irrelevant_tokens < 2:
                raise ConfigError(f"irrelevant_tokens must be >= 2, got {self.irrelevant_tokens}")
            if self.irrelevant_pool < HELDOUT_WINDOWS + self.irrelevant_samples:
                raise ConfigError(
                    f"irrelevant_pool must be >= {HELDOUT_WINDOWS} held-out + irrelevant_samples "
                    f"({self.irrelevant_samples}) windows, got {self.irrelevant_pool}"
                )

        if self.irrelevant_facts is not None:
            if self.irrelevant_facts_from < 0:
                raise ConfigError(f"irrelevant_facts_from must be >= 0, got {self.irrelevant_facts_from}")
            if self.irrelevant_fact_samples < 1:
                raise ConfigError(
                    f"irrelevant_fact_samples must be >= 1, got {self.irrelevant_fact_samples} "
                    "(set irrelevant_facts=None to use no factual pool)"
                )


# ------------------------------------------------------------------------------------------------ merging
def ties_merge(task_vectors: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES merging (Yadav et al. 2023) of task vectors of one shape.

    1. Trim: keep the ``round(density * numel)`` entries of largest magnitude of each vector, zero the rest.
    2. Elect: each entry's sign is the sign of the sum of the trimmed vectors there.
    3. Disjoint merge: the mean, per entry, of the trimmed values whose sign agrees with the elected one (0 where
       none does).

    Args:
        task_vectors: k tensors of the same shape.
        density: fraction of entries kept by the trim, in (0, 1].
    Returns:
        The merged tensor (shape of the inputs).
    """
    stacked = torch.stack([t.float() for t in task_vectors])  # [k, ...]
    flat = stacked.reshape(stacked.shape[0], -1)  # [k, N]
    keep = max(1, min(flat.shape[1], round(density * flat.shape[1])))
    top = flat.abs().topk(keep, dim=1).indices  # [k, keep]
    trimmed = torch.zeros_like(flat).scatter(1, top, flat.gather(1, top))  # [k, N]
    sign = torch.sign(trimmed.sum(0))  # [N]
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)  # [k, N]
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)  # [N]
    return merged.reshape(stacked.shape[1:])


def merge_shards(
    shards: list[tuple[torch.Tensor, torch.Tensor]], d_in: int, method: str, density: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge shards given as (row index [r_i], rows [r_i, d_out]) into one (index [r], rows [r, d_out]).

    One shard is returned as it is; several are scattered into dense [d_in, d_out] task vectors, merged by
    ``ties_merge`` or averaged (``method="linear"``), and the rows any shard touched are returned.
    """
    if len(shards) == 1:
        return shards[0]
    d_out = shards[0][1].shape[1]
    dense = []
    for index, rows in shards:
        tv = torch.zeros(d_in, d_out)
        tv[index] = rows.float()
        dense.append(tv)
    merged = ties_merge(dense, density) if method == "ties" else torch.stack(dense).mean(0)
    index = torch.unique(torch.cat([i for i, _ in shards]))  # sorted
    return index, merged[index]


# ------------------------------------------------------------------------------------------------ editing
def edit_prompt(request: EditRequest) -> str:
    """The prompt as scored with its target (``tokens.join_target`` moves trailing whitespace to the target)."""
    return tokens.join_target(request.prompt_text, request.target_new)[0]


def contrast_prompts(request: EditRequest, subjects: list[str]) -> list[str]:
    """The request's template filled with each of ``subjects`` (its own subject skipped), as ``edit_prompt``."""
    text = [request.template.replace("{}", s) for s in subjects if s != request.subject]
    return [tokens.join_target(t, request.target_new)[0] for t in text]


@functools.lru_cache(maxsize=4)
def fact_pool(dataset: str, start: int) -> tuple[str, ...]:
    """The factual prompts of ``dataset``'s cases from ``start`` on: edit prompts, paraphrases and locality
    prompts, deduplicated in file order (trailing whitespace stripped)."""
    cases = load_dataset(dataset).cases[start:]
    prompts = (
        p.prompt.rstrip()
        for c in cases
        for kind in (c.reliability, c.generalization, c.locality)
        for p in kind
    )
    return tuple(dict.fromkeys(p for p in prompts if p))


@functools.lru_cache(maxsize=4)
def fact_subjects(dataset: str, start: int) -> tuple[str, ...]:
    """The subjects of ``dataset``'s cases from ``start`` on (every request's), deduplicated in file order."""
    cases = load_dataset(dataset).cases[start:]
    return tuple(dict.fromkeys(r.subject for c in cases for r in c.requests if r.subject))


def _answer_key(text: str) -> str:
    return text.strip().lower()


@functools.lru_cache(maxsize=4)
def fact_answers(dataset: str, start: int) -> dict[str, tuple[str, ...]]:
    """``fact_pool``'s prompts grouped by their true answer (stripped, lower-cased): edit prompts and paraphrases
    under their case's true target (those without one are left out), locality prompts under their own answer."""
    groups: dict[str, dict[str, None]] = {}
    for c in load_dataset(dataset).cases[start:]:
        for kind in (c.reliability, c.generalization, c.locality):
            for p in kind:
                true = p.answer if kind is c.locality else p.compare
                if p.prompt.strip() and true and true.strip():
                    groups.setdefault(_answer_key(true), {})[p.prompt.rstrip()] = None
    return {a: tuple(ps) for a, ps in groups.items()}


def pick_facts(pool: tuple[str, ...], k: int, subjects: list[str], gen: torch.Generator | None) -> list[str]:
    """``k`` prompts of ``pool`` in a random order drawn from ``gen`` (file order when None), skipping those naming one of ``subjects``
    (case-insensitive), so that a shard is never trained to keep its own subjects on the main memory."""
    names = [s.lower() for s in subjects]
    out: list[str] = []
    order = range(len(pool)) if gen is None else torch.randperm(len(pool), generator=gen).tolist()
    for i in order:
        text = pool[i].lower()
        if not any(n in text for n in names):
            out.append(pool[i])
            if len(out) == k:
                break
    return out


def _inputs(loaded, path: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Input of module ``path`` at every position of the batch ``ids`` [b, n] (forward stopped there)."""
    with (
        torch.no_grad(),
        Trace(loaded.model, path, retain_input=True, retain_output=False, stop=True) as tr,
    ):
        loaded.model(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device), use_cache=False)
    return tr.input.float()


def module_inputs(loaded, path: str, prompts: list[str]) -> list[torch.Tensor]:
    """Input of module ``path`` at every token of each prompt, one float32 tensor [n_tokens, d_in] per prompt."""
    out: list[torch.Tensor] = []
    for start in range(0, len(prompts), 16):
        chunk = prompts[start : start + 16]
        batch = tokens.pair_batch(loaded.tokenizer, chunk, [""] * len(chunk))
        x = _inputs(loaded, path, batch.input_ids, batch.attention_mask)
        out.extend(x[i, :n] for i, n in enumerate(batch.prompt_lens))
    return out


def corpus_windows(loaded, corpus: str, n: int, length: int) -> torch.Tensor:
    """The first ``n`` windows of ``length`` token ids of ``corpus``, packed as for key statistics [n, length]."""
    corp = resolve_corpus(corpus)
    windows: list[list[int]] = []
    for seq in token_sequences(loaded.tokenizer, corp, length):
        if len(seq) < length:
            break
        windows.append(seq)
        if len(windows) == n:
            return torch.tensor(windows)
    raise ConfigError(
        f"irrelevant_corpus {corp.id!r} holds only {len(windows)} windows of {length} tokens but "
        f"irrelevant_pool={n} were asked for: lower irrelevant_pool or irrelevant_tokens, or give a larger corpus"
    )


def window_inputs(loaded, path: str, ids: torch.Tensor) -> list[torch.Tensor]:
    """Input of module ``path`` at every token of each window of ``ids`` [m, length]: m float32 [length, d_in]."""
    out: list[torch.Tensor] = []
    for start in range(0, len(ids), 16):
        chunk = ids[start : start + 16]
        out.extend(_inputs(loaded, path, chunk, torch.ones_like(chunk)).unbind(0))
    return out


def prompt_activation(xs: list[torch.Tensor], delta: torch.Tensor) -> torch.Tensor:
    """WISE activation of each prompt: max over its tokens of ``||A(x) @ delta||_2``.

    Args:
        xs: per prompt, the projection inputs [n_tokens, d_in].
        delta: [d_in, d_out] side memory minus main memory.
    Returns:
        [n_prompts] (differentiable in ``delta``).
    """
    return torch.stack([torch.linalg.vector_norm(x @ delta, dim=-1).max() for x in xs])


def routing_loss(act_edit: torch.Tensor, act_irr: torch.Tensor, alpha: float, beta: float, gamma: float):
    """The paper's margin loss: irrelevant activations below alpha, edit ones above beta, apart by gamma.

    Args:
        act_edit: [n_e] activations of the edit prompts; act_irr: [n_i] of the irrelevant prompts.
    Returns:
        A scalar: ``mean ReLU(act_irr - alpha) + mean ReLU(beta - act_edit)
        + mean over pairs ReLU(gamma - (act_edit - act_irr))``.
    """
    gap = act_edit[:, None] - act_irr[None, :]  # [n_e, n_i]
    return (
        torch.relu(act_irr - alpha).mean()
        + torch.relu(beta - act_edit).mean()
        + torch.relu(gamma - gap).mean()
    )


def _shard_draws(
    seed: int, stream_pos: int, d_in: int, ratio: float, pool: int, samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A shard's random draws from (seed, its stream position).

    Returns:
        (sorted row indices [r] the shard may change: ``ratio`` of ``d_in``,
        indices [samples] of the irrelevant passages it trains against, out of ``pool``; empty when pool is 0).
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + stream_pos)
    r = max(1, round(ratio * d_in))
    rows = torch.randperm(d_in, generator=gen)[:r].sort().values
    passages = torch.randperm(pool, generator=gen)[:samples] if pool else torch.zeros(0, dtype=torch.long)
    return rows, passages


def most_active(xs: list[torch.Tensor], delta: torch.Tensor) -> torch.Tensor:
    """Each input's row at its most active token under the side memory ``delta`` (the token the router sees).

    Args:
        xs: per prompt [n_tokens, d_in]; delta: [d_in, d_out].
    Returns:
        [len(xs), d_in] (``[0, d_in]`` for no prompts).
    """
    if not xs:
        return delta.new_zeros(0, delta.shape[0])
    return torch.stack([x[torch.linalg.vector_norm(x @ delta, dim=-1).argmax()] for x in xs])


def fact_gen(seed: int, stream_pos: int) -> torch.Generator:
    """The generator of a shard's draw from the factual pool (independent of ``_shard_draws``'s)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stream_pos + 500_009)


class ShardActivations:
    """``prompt_activation(xs, start + rows at index)`` as a function of the trainable ``rows``.

    Every prompt's tokens go into one flat [T, d_in] tensor (no padding: sampled passages of 48 tokens and
    prompts of 10 are mixed) and ``x @ start`` is computed once, so each call costs ``x[:, index] @ rows`` for
    all tokens at once and a per-prompt max (``scatter_reduce``).

    Args:
        xs: per prompt, the projection inputs [n_tokens, d_in].
        start: [d_in, d_out] the side memory before the shard.
        index: [r] the rows the shard trains.
    """

    def __init__(self, xs: list[torch.Tensor], start: torch.Tensor, index: torch.Tensor):
        flat = torch.cat(xs)  # [T, d_in]
        self.fixed = flat @ start  # [T, d_out]
        self.sub = flat[:, index]  # [T, r]
        self.prompt = torch.repeat_interleave(
            torch.arange(len(xs), device=flat.device), torch.tensor([len(x) for x in xs], device=flat.device)
        )  # [T]: the prompt of each token

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:  # [P]
        norms = torch.linalg.vector_norm(self.fixed + self.sub @ rows, dim=-1)  # [T]
        out = norms.new_zeros(int(self.prompt[-1]) + 1)
        return out.scatter_reduce(0, self.prompt, norms, "amax", include_self=False)


class MeanSquareActivation:
    """``E[||x[index] rows||^2] = <rows, E[x x^T][index, index] rows>``: the mean squared activation over the
    statistics' keys of the rows a shard adds (not of the side memory they extend: penalising that made later
    shards cancel earlier edits).

    Args:
        mom2: E[x x^T] [d_in, d_in] of the projection's inputs (key statistics).
        index: [r] the rows the shard trains.
    """

    def __init__(self, mom2: torch.Tensor, index: torch.Tensor):
        self.block = mom2[index][:, index]  # [r, r]

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return (rows * (self.block @ rows)).sum()


def _nll(loaded, batch: tokens.PairBatch) -> torch.Tensor:
    lp, _ = target_logprobs(loaded.model, loaded.arch, batch)
    return -(lp.sum(1) / batch.target_mask.sum(1)).mean()


def run_wise(loaded, requests: list[EditRequest], config: WiseConfig) -> EditPatch:
    """Compute the WISE patch for ``requests``, extending the installed side memory if there is one."""
    model, device = loaded.model, loaded.device
    n_layers = loaded.arch.n_layers(model)
    layer = config.layer if config.layer is not None else (2 * n_layers) // 3
    if not 0 <= layer < n_layers:
        raise ConfigError(f"layer {layer} out of range: the model has layers 0..{n_layers - 1}")
    site = adapter_site(model, loaded.arch.module_name("mlp_out", layer), "wise", "WISE")
    name, path, previous, base_mod = site.name, site.path, site.previous, site.base
    t0 = time.perf_counter()

    irr = list(config.irrelevant_prompts)
    prompts = [edit_prompt(r) for r in requests]
    x_irr = module_inputs(loaded, path, irr)
    if config.irrelevant_corpus is not None:
        pool = corpus_windows(
            loaded, config.irrelevant_corpus, config.irrelevant_pool, config.irrelevant_tokens
        )
        train_pool, heldout = pool[:-HELDOUT_WINDOWS], pool[-HELDOUT_WINDOWS:]
    else:
        train_pool = heldout = torch.zeros(0, 0, dtype=torch.long)
    train_facts: tuple[str, ...] = ()
    held_facts: list[str] = []
    train_subjects: tuple[str, ...] = ()
    held_neighbours: list[str] = []  # each edit's template filled with held-out pool subjects
    by_object: dict[str, tuple[str, ...]] = {}  # training prompts of the pool by true answer
    if config.irrelevant_facts is not None:
        facts = fact_pool(config.irrelevant_facts, config.irrelevant_facts_from)
        if len(facts) < HELDOUT_FACTS + config.irrelevant_fact_samples:
            raise ConfigError(
                f"irrelevant_facts {config.irrelevant_facts!r} from case {config.irrelevant_facts_from} holds "
                f"{len(facts)} prompts, fewer than {HELDOUT_FACTS} held out + irrelevant_fact_samples "
                f"({config.irrelevant_fact_samples}): lower irrelevant_facts_from or give a larger dataset"
            )
        train_facts = facts[:-HELDOUT_FACTS]
        held_facts = pick_facts(facts[-HELDOUT_FACTS:], HELDOUT_FACTS, [r.subject for r in requests], None)
        if config.fact_contrast:
            subjects = fact_subjects(config.irrelevant_facts, config.irrelevant_facts_from)
            if len(subjects) < HELDOUT_FACTS + config.fact_contrast:
                raise ConfigError(
                    f"irrelevant_facts {config.irrelevant_facts!r} names {len(subjects)} subjects, fewer than "
                    f"{HELDOUT_FACTS} held out + fact_contrast ({config.fact_contrast})"
                )
            train_subjects = subjects[:-HELDOUT_FACTS]
            held = pick_facts(subjects[-HELDOUT_FACTS:], HELDOUT_FACTS, [r.subject for r in requests], None)
            held_neighbours = [c for r in requests for c in contrast_prompts(r, held)]
        if config.object_contrast:
            train = set(train_facts)
            groups = fact_answers(config.irrelevant_facts, config.irrelevant_facts_from)
            by_object = {a: tuple(p for p in ps if p in train) for a, ps in groups.items()}
    x_edit = module_inputs(loaded, path, prompts)
    contrast = [contrast_prompts(r, config.contrast_subjects) for r in requests]
    flat = iter(module_inputs(loaded, path, [c for cs in contrast for c in cs]))
    x_contrast = [[next(flat) for _ in cs] for cs in contrast]  # per request
    with torch.no_grad():
        flat_irr = torch.cat(x_irr)  # [n_tokens, d_in]
        base_irr = base_mod(flat_irr.to(next(base_mod.parameters()).dtype)[None])[0].float()
        scale = float(torch.linalg.vector_norm(base_irr, dim=-1).mean())
    d_in, d_out = flat_irr.shape[1], base_irr.shape[1]
    margins = tuple(m * scale for m in config.act_margin)  # alpha, beta, gamma
    if previous is not None:
        start_delta = previous.delta.detach().float()
        chain_keys = previous.keys.detach().float()  # [n_earlier_keys, d_in]
        chain_contrast = previous.contrast_keys.detach().float()  # [n_earlier_contrast, d_in]
        n_earlier, earlier_min = int(previous.spec.config["n_edits"]), float(previous.spec.config["min_act"])
    else:
        start_delta = torch.zeros(d_in, d_out, device=device)
        chain_keys = torch.zeros(0, d_in, device=device)
        chain_contrast = chain_keys
        n_earlier, earlier_min = 0, float("inf")

    mom2 = None
    if config.cov_weight > 0:
        covs, _prov = covariances(loaded, [layer], config.irrelevant_corpus, config.cov_tokens)
        mom2 = covs[layer].float() / scale**2  # [d_in, d_in]
    shards: list[tuple[torch.Tensor, torch.Tensor]] = []
    shard_log: list[dict] = []
    n_object = 0  # object_contrast prompts trained against, all shards
    for s in range(0, len(requests), config.edits_per_shard):
        reqs = requests[s : s + config.edits_per_shard]
        index, passages = _shard_draws(
            config.seed, n_earlier + s, d_in, config.mask_ratio, len(train_pool), config.irrelevant_samples
        )
        x_shard = x_edit[s : s + len(reqs)]
        x_passages = window_inputs(loaded, path, train_pool[passages]) if len(passages) else []
        fgen = fact_gen(config.seed, n_earlier + s)
        subjects = [r.subject for r in reqs]
        facts = pick_facts(train_facts, config.irrelevant_fact_samples, subjects, fgen)
        if config.fact_contrast:  # the shard's templates with real subjects from the pool
            names = pick_facts(train_subjects, config.fact_contrast, subjects, fgen)
            facts += [c for r in reqs for c in contrast_prompts(r, names)]
        if config.object_contrast:  # other subjects with the same relation and object
            for r in reqs:
                taken = set(facts)  # a prompt drawn already would weigh twice in the margin loss
                same = tuple(q for q in by_object.get(_answer_key(r.target_true or ""), ()) if q not in taken)
                picked = pick_facts(same, config.object_contrast, subjects, fgen)
                n_object += len(picked)
                facts += picked
        x_facts = module_inputs(loaded, path, facts) if facts else []
        gen = fact_gen(config.seed, -1 - n_earlier - s)
        replay = torch.randperm(len(chain_keys), generator=gen)[: config.replay_keys]
        x_replay = list(chain_keys[replay].unsqueeze(1))  # one-token inputs [1, d_in]
        replay = torch.randperm(len(chain_contrast), generator=gen)[: config.replay_keys]
        x_neg = x_irr + x_passages + x_facts + [x for xs in x_contrast[s : s + len(reqs)] for x in xs]
        x_neg += list(chain_contrast[replay].unsqueeze(1))
        rows, entry = _train_shard(
            loaded,
            layer,
            path,
            base_mod,
            previous is not None,
            start_delta,
            index,
            reqs,
            x_shard + x_replay,
            x_neg,
            margins,
            config,
            mom2,
        )
        shards.append((index, rows))
        shard_log.append(entry)
        (log.info if config.progress else log.debug)("wise shard %d: %s", len(shards), entry)

    index, rows = merge_shards(shards, d_in, config.merge, config.merge_density)
    # the side memory exactly as the wrapper will assemble it (in the base layer's dtype), for the threshold
    dtype = next(base_mod.parameters()).dtype
    prior = (
        previous.delta.detach()
        if previous is not None
        else torch.zeros(d_in, d_out, dtype=dtype, device=device)
    )
    final = wise_side_delta(prior, index, rows).float()
    with torch.no_grad():
        # each edit's key: its prompt's input at the token the router sees (the most active one), whose
        # activation is the prompt's (recorded now for the running minimum)
        keys = most_active(x_edit, final)  # [n_requests, d_in]
        act_edits = torch.linalg.vector_norm(keys @ final, dim=-1)  # [n_requests]
        act_irr = prompt_activation(x_irr, final)  # [n_irr]
        contrast_keys = most_active([x for xs in x_contrast for x in xs], final)  # [n_contrast, d_in]
        act_con = torch.linalg.vector_norm(contrast_keys @ final, dim=-1)  # [n_contrast]
        x_held = window_inputs(loaded, path, heldout) if len(heldout) else []
        act_held = prompt_activation(x_held, final) if x_held else act_irr[:0]  # [HELDOUT_WINDOWS]
        x_hf = module_inputs(loaded, path, held_facts) if held_facts else []
        act_hf = prompt_activation(x_hf, final) if x_hf else act_irr[:0]  # [<= HELDOUT_FACTS]
        x_hn = module_inputs(loaded, path, held_neighbours) if held_neighbours else []
        act_hn = prompt_activation(x_hn, final) if x_hn else act_irr[:0]  # [n_requests * <= HELDOUT_FACTS]
    min_act = min(earlier_min, float(act_edits.min()))
    epsilon = config.act_ratio * (max(min_act, margins[1]) if config.act_floor else min_act)
    spec = AdapterSpec(
        "wise",
        name,
        config={
            "d_in": d_in,
            "d_out": d_out,
            "epsilon": epsilon,
            "min_act": min_act,
            "act_ratio": config.act_ratio,
            "n_edits": n_earlier + len(requests),
        },
        tensors={
            "index": index.cpu(),
            "rows": rows.detach().float().cpu(),
            "keys": keys.cpu(),
            "contrast_keys": contrast_keys.cpu(),
        },
        parent=previous.spec_fingerprint if previous is not None else None,
    )
    params = [f"{name}.{n}" for n, _ in unwrap(base_mod).named_parameters()]
    info = {
        "shards": shard_log,
        "epsilon": epsilon,
        "scale": scale,
        "edit_activations": act_edits.tolist(),
        "edits_below_epsilon": int((act_edits <= epsilon).sum()),
        "irrelevant_max_activation": float(act_irr.max()),
        "irrelevant_routed_to_side": int((act_irr > epsilon).sum()),
        "contrast_routed_to_side": int((act_con > epsilon).sum()),
        "heldout_max_activation": float(act_held.max()) if len(act_held) else None,
        "heldout_routed_to_side": int((act_held > epsilon).sum()),
        "heldout_facts_max_activation": float(act_hf.max()) if len(act_hf) else None,
        "heldout_facts_routed_to_side": int((act_hf > epsilon).sum()),
        "heldout_neighbours": len(act_hn),
        "object_contrast_prompts": n_object,
        "heldout_neighbours_routed_to_side": int((act_hn > epsilon).sum()),
        "earlier_keys_routed_to_side": int(
            (torch.linalg.vector_norm(chain_keys @ final, dim=-1) > epsilon).sum()
        ),
        "earlier_keys": len(chain_keys),
        "earlier_contrast_keys_routed_to_side": int(
            (torch.linalg.vector_norm(chain_contrast @ final, dim=-1) > epsilon).sum()
        ),
        "rows_changed": int(index.numel()),
        "seconds": time.perf_counter() - t0,
    }
    return EditPatch(
        method="wise",
        config=config.to_dict() | {"layer": layer},
        requests=[r.to_dict() for r in requests],
        deltas=[],
        base=EditPatch.base_of(loaded, params),
        info=info,
        adapters=[spec],
    )


def _train_shard(
    loaded,
    layer: int,
    path: str,
    base_mod: torch.nn.Module,
    recompute_base: bool,
    start_delta: torch.Tensor,
    index: torch.Tensor,
    requests: list[EditRequest],
    x_edit: list[torch.Tensor],
    x_neg: list[torch.Tensor],
    margins: tuple[float, float, float],
    config: WiseConfig,
    mom2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Train the rows ``index`` of the side memory on one shard; returns (rows added [r, d_out], log entry).

    ``x_edit`` holds the shard's edit prompts' projection inputs (and the replayed earlier edit keys, one token
    each) and ``x_neg`` the irrelevant ones (generic sentences, sampled passages and factual prompts, the shard's
    contrast prompts), each [n_tokens, d_in]. The layers below
    ``layer`` run once (``replay_below``): each step computes the layers from the side memory's up. The
    activations are ``||x @ start + x[:, index] @ rows||``, the first term computed once.
    """
    device = loaded.device
    batch = tokens.pair_batch(
        loaded.tokenizer, [r.prompt_text for r in requests], [r.target_new for r in requests]
    )
    batch = batch.to(device)
    idx = index.to(device)
    rows = torch.zeros(idx.numel(), start_delta.shape[1], device=device, requires_grad=True)  # [r, d_out]
    opt = torch.optim.Adam([rows], lr=config.lr)
    state: dict[str, torch.Tensor] = {}

    def side(out: torch.Tensor, _name: str) -> torch.Tensor:
        x = tr.input
        base_out = base_mod(x) if recompute_base else out  # an installed WISE wrapper's output is routed
        return base_out + x @ state["delta"].to(x.dtype)

    entry: dict = {
        "edits": len(requests),
        "rows": int(idx.numel()),
        "edit_inputs": len(x_edit),
        "irrelevant": len(x_neg),
    }
    start = start_delta.to(device)
    act_edit = ShardActivations([x.to(device) for x in x_edit], start, idx)
    act_neg = ShardActivations([x.to(device) for x in x_neg], start, idx)
    mean_sq = MeanSquareActivation(mom2.to(device), idx) if mom2 is not None else None

    with (
        replay_below(loaded.model, loaded.arch, layer),
        Trace(loaded.model, path, retain_input=True, retain_output=False, edit_output=side) as tr,
    ):
        for step in range(config.steps + 1):  # evaluation `step` sees the rows after `step` updates
            state["delta"] = start_delta.index_add(0, idx, rows)  # [d_in, d_out]
            nll = _nll(loaded, batch)
            act_e, act_i = act_edit(rows), act_neg(rows)  # [n_e], [n_i]
            act_loss = routing_loss(act_e, act_i, *margins)
            penalty = config.cov_weight * mean_sq(rows) if mean_sq is not None else None
            separation = (act_e.min() - act_i.max()).item()
            if step == 0:
                entry.update(nll_first=nll.item(), act_loss_first=act_loss.item())
            entry.update(
                steps=step, nll_last=nll.item(), act_loss_last=act_loss.item(), separation=separation
            )
            if penalty is not None:
                entry["mean_sq"] = penalty.item() / config.cov_weight
            if (nll.item() < config.early_stop_loss and act_loss.item() == 0) or step == config.steps:
                break
            opt.zero_grad()
            (nll + act_loss + (penalty if penalty is not None else 0.0)).backward()
            opt.step()
    return rows.detach().float().cpu(), entry


@register_method("wise", WiseConfig, family="weight-preserving", presets=PRESETS)
def edit_wise(loaded, requests: list[EditRequest], config: WiseConfig) -> EditPatch:
    """WISE: a routed side memory of one MLP projection (sharded, TIES-merged); weights untouched."""
    return run_wise(loaded, requests, config)


__all__ = [
    "CONTRAST_SUBJECTS",
    "UNRELATED_PROMPTS",
    "HELDOUT_WINDOWS",
    "MeanSquareActivation",
    "ShardActivations",
    "contrast_prompts",
    "corpus_windows",
    "edit_prompt",
    "module_inputs",
    "WiseConfig",
    "merge_shards",
    "prompt_activation",
    "routing_loss",
    "run_wise",
    "ties_merge",
    "window_inputs",
]
