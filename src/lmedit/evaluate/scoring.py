"""Batched scoring: teacher-forced target log-probabilities / token accuracy, and greedy generation.

One forward pass per batch; pad positions are never counted. Token handling is ``lmedit.models.tokens``'s.

    >>> scores = score_pairs(loaded, ["The Eiffel Tower is in"], [" Paris"])
    >>> scores[0].mean_logprob, scores[0].accuracy
    >>> greedy_generate(loaded, ["The Eiffel Tower is in"], max_new_tokens=10)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmedit.core.forward import target_logprobs
from lmedit.models import tokens


@dataclass
class PairScore:
    """Teacher-forced score of one (prompt, target) pair."""

    logprobs: list[float]
    correct: list[bool]

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs)

    @property
    def accuracy(self) -> float:
        """Fraction of target tokens that are the argmax given the prefix (EasyEdit's token accuracy)."""
        return sum(self.correct) / len(self.correct)


@torch.no_grad()
def score_pairs(
    loaded, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32
) -> list[PairScore]:
    """Teacher-forced scores for many pairs, ``batch_size`` pairs per forward pass."""
    model, tok = loaded
    device = loaded.device
    out: list[PairScore] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokens.pair_batch(
            tok, prompts[start : start + batch_size], targets[start : start + batch_size]
        )
        lp, ok = target_logprobs(model, loaded.arch, batch.to(device))
        mask = batch.target_mask
        for i in range(lp.shape[0]):
            row = mask[i]
            out.append(PairScore(lp[i][row.to(lp.device)].tolist(), ok[i][row.to(ok.device)].tolist()))
    return out


@torch.no_grad()
def greedy_generate(
    loaded, prompts: Sequence[str], max_new_tokens: int = 20, batch_size: int = 16
) -> list[str]:
    """Greedy continuations (text after the prompt), left-padded batches."""
    model, tok = loaded
    device = loaded.device
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = tokens.left_padded(tok, prompts[start : start + batch_size])
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokens.pad_id(tok),
        )
        texts.extend(tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True))
    return texts
