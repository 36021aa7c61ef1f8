"""Forward passes shared by methods and evaluation: hidden states, logits only where needed.

The bundled Gemma 3 has a 262k-token vocabulary, so full logits for every position cost more than the rest of
the model. ``target_logprobs`` stops the forward pass at the final norm and projects only the positions that
predict target tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lmedit.core.hooks import Trace
from lmedit.models.arch import ArchSpec, final_logits
from lmedit.models.tokens import PairBatch


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients inside the block; both restored after (values are untouched)."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)


def final_hidden(
    model: nn.Module,
    arch: ArchSpec,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    overrides: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Output of the final norm, [batch, pos, d_model]; the LM head is skipped.

    ``overrides`` maps parameter names to tensors used in their place for this call only
    (``torch.func.functional_call``), which lets methods differentiate through candidate weights without
    writing to the model.
    """
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    with Trace(model, arch.ln_f, stop=True) as tr:
        if overrides:
            torch.func.functional_call(model, overrides, (), kwargs, strict=False)
        else:
            model(**kwargs)
    return tr.output


#: Target positions projected through the LM head at once (a 262k vocabulary costs ~1 MB per position).
HEAD_CHUNK = 512


def score_logits(logits: torch.Tensor, target_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target and the argmax token, from raw logits.

    Args:
        logits: [n, vocab] (any float dtype; scored in float32).
        target_ids: [n].
    Returns:
        logprobs [n] float32 and argmax [n] long.
    """
    logits = logits.float()
    lp = torch.log_softmax(logits, dim=-1).gather(1, target_ids[:, None])[:, 0]  # [n]
    return lp, logits.argmax(-1)


def target_logprobs(
    model: nn.Module, arch: ArchSpec, batch: PairBatch, overrides: dict[str, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log-probability of the target token and the argmax token (differentiable in the former).

    Only the positions in ``batch.target_mask`` go through the LM head, ``HEAD_CHUNK`` at a time.

    Returns:
        logprobs [batch, pos] (float32, 0 outside ``batch.target_mask``) and argmax [batch, pos] (long, -1
        outside the mask).
    """
    hidden = final_hidden(model, arch, batch.input_ids, batch.attention_mask, overrides)  # [b, pos, d]
    mask = batch.target_mask
    h = hidden[mask]  # [n_target_tokens, d_model], row-major over (b, pos)
    targets = batch.target_ids[mask]  # [n_target_tokens]
    lps, amax = [], []
    for c in range(0, h.shape[0], HEAD_CHUNK):
        lp, am = score_logits(final_logits(model, arch, h[c : c + HEAD_CHUNK]), targets[c : c + HEAD_CHUNK])
        lps.append(lp)
        amax.append(am)
    lp = torch.cat(lps)
    out_lp = torch.zeros(mask.shape, dtype=torch.float32, device=lp.device)
    out_am = torch.full(mask.shape, -1, dtype=torch.long, device=lp.device)
    out_lp[mask] = lp
    out_am[mask] = torch.cat(amax)
    return out_lp, out_am
