"""Batched scoring: teacher-forced target log-probabilities / argmax tokens, and greedy generation.

One forward pass per batch, pairs sorted by length to keep padding small; pad positions are never counted;
only the positions that predict target tokens go through the LM head (``lmedit.core.forward``). Token handling
(BOS, leading spaces) is ``lmedit.models.tokens``'s, shared with the editing code.

Both entry points read each prompt as the model's installed context memory says (``lmedit.core.context``, e.g.
an IKE patch): a prefix may be prepended, whose tokens are never scored and never returned by generation.

    >>> scores = score_pairs(loaded, ["The Eiffel Tower is in"], [" Paris"])
    >>> scores[0].mean_logprob, scores[0].accuracy, scores[0].argmax
    >>> greedy_generate(loaded, ["The Eiffel Tower is in"], max_new_tokens=10)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lmedit.core.context import with_context
from lmedit.core.forward import HEAD_CHUNK, score_logits, target_logprobs
from lmedit.models import tokens

__all__ = ["HEAD_CHUNK", "PairScore", "generate_ids", "greedy_generate", "score_logits", "score_pairs"]


@dataclass
class PairScore:
    """Teacher-forced score of one (prompt, target) pair, one entry per target token."""

    logprobs: list[float]
    correct: list[bool]
    argmax: list[int] = field(default_factory=list)
    target_ids: list[int] = field(default_factory=list)

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs)

    @property
    def nll(self) -> float:
        """Mean per-token negative log-likelihood (what ROME's probability comparison compares)."""
        return -self.mean_logprob

    @property
    def accuracy(self) -> float:
        """Fraction of target tokens that are the argmax given the prefix (EasyEdit's token accuracy)."""
        return sum(self.correct) / len(self.correct)


def _order(prompts: Sequence[str], targets: Sequence[str] | None = None) -> list[int]:
    """Indices sorted by text length (a cheap proxy for token length), longest first."""
    lengths = [len(p) + (len(targets[i]) if targets is not None else 0) for i, p in enumerate(prompts)]
    return sorted(range(len(prompts)), key=lambda i: -lengths[i])


@torch.no_grad()
def score_pairs(
    loaded, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32
) -> list[PairScore]:
    """Teacher-forced scores for many pairs, ``batch_size`` pairs per forward pass (results in input order)."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    model, tok = loaded
    arch, device = loaded.arch, loaded.device
    prompts = with_context(model, prompts)
    order = _order(prompts, targets)
    out: list[PairScore | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokens.pair_batch(tok, [prompts[i] for i in idx], [targets[i] for i in idx]).to(device)
        lp, am = target_logprobs(model, arch, batch)  # [b, pos] each
        mask = batch.target_mask  # [b, pos]
        lp_all = lp[mask].cpu().tolist()
        am_all = am[mask].cpu().tolist()
        tg_all = batch.target_ids[mask].cpu().tolist()
        counts = mask.sum(1).cpu().tolist()
        pos = 0
        for i, n in zip(idx, counts):
            am, tg = am_all[pos : pos + n], tg_all[pos : pos + n]
            out[i] = PairScore(lp_all[pos : pos + n], [a == t for a, t in zip(am, tg)], am, tg)
            pos += n
    return out  # type: ignore[return-value]


@torch.no_grad()
def generate_ids(
    loaded, prompts: Sequence[str], max_new_tokens: int = 20, batch_size: int = 16
) -> list[list[int]]:
    """Greedy continuation token ids (left-padded batches, prompts sorted by length; input order kept).

    Generation stops at ``max_new_tokens`` or EOS (ids after EOS are dropped).
    """
    model, tok = loaded
    device = loaded.device
    prompts = with_context(model, prompts)
    order = _order(prompts)
    eos = tok.eos_token_id
    out: list[list[int] | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = tokens.left_padded(tok, [prompts[i] for i in idx])
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            do_sample=False,
            pad_token_id=tokens.pad_id(tok),
        )
        for i, row in zip(idx, gen[:, ids.shape[1] :].cpu().tolist()):
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            out[i] = row
    return out  # type: ignore[return-value]


@torch.no_grad()
def greedy_generate(
    loaded, prompts: Sequence[str], max_new_tokens: int = 20, batch_size: int = 16
) -> list[str]:
    """Greedy continuations (text after the prompt), left-padded batches."""
    ids = generate_ids(loaded, prompts, max_new_tokens, batch_size)
    return loaded.tokenizer.batch_decode(ids, skip_special_tokens=True)
