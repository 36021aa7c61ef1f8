"""FFN value vectors in vocabulary space (Geva et al. EMNLP 2021, 2022).

An MLP layer's output at one position is a sum of sub-updates ``m_i * v_i``: ``m_i`` is the activation
coefficient of neuron ``i`` (the ``i``-th entry of the input of ``mlp_out``) and ``v_i`` its value vector (the
``i``-th column of ``mlp_out``'s [out, in] weight). Projecting a value vector through the unembedding shows
which tokens that sub-update promotes.

    >>> report = ffn_report(loaded, "The Eiffel Tower is located in the city of", layer=12)
    >>> print(report.table())
    >>> report.rows[0].tokens               # tokens promoted by the largest sub-update

Projection: by default (``project="lm_head"``) a vector is multiplied by the LM head weight directly, with no
final norm, as Geva et al. 2022 project value vectors through the output embedding matrix. With
``project="final_norm"`` the vector is first passed through the model's final norm (as if it were the whole
residual stream), then through ``final_logits``; for models whose final norm has a strongly non-uniform gain
(Gemma) that changes the ranking. Either way sub-updates are projected with their sign (``m_i * v_i``), so
the listed tokens are the ones the sub-update actually pushes up.

The sub-update decomposition: ``lm_head(mlp_out) = sum_i m_i * lm_head(v_i)`` (exact for the LM head's
linear map, before any final norm), so the MLP's contribution to the logit of the model's prediction splits
into per-neuron shares; ``prediction_share`` says how much of it the top-k sub-updates carry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch

from lmedit.core.hooks import TraceDict
from lmedit.models import tokens
from lmedit.models.arch import as_out_in, final_logits, get_submodule, weight_layout

log = logging.getLogger(__name__)

Projection = Literal["lm_head", "final_norm"]


@dataclass
class SubUpdate:
    """One neuron's sub-update ``m_i * v_i`` at the traced position."""

    neuron: int
    coefficient: float  # m_i
    value_norm: float  # ||v_i||
    magnitude: float  # |m_i| * ||v_i||, the ranking key
    prediction_logit: float  # m_i * <lm_head row of the prediction, v_i>
    tokens: list[str]  # top promoted tokens of m_i * v_i
    scores: list[float]  # their projection scores


@dataclass
class FFNReport:
    """Top sub-updates of one MLP layer at one position, and the layer's whole update projected."""

    prompt: str
    layer: int
    position: int
    token: str
    projection: str
    prediction: str  # the model's top next token at this position
    rows: list[SubUpdate]
    update_tokens: list[str]  # top tokens promoted by the whole MLP update
    update_prediction_logit: float  # <lm_head row of the prediction, MLP update>
    prediction_share: float  # sum of the rows' prediction_logit / update_prediction_logit
    n_neurons: int = 0
    extra: dict = field(default_factory=dict)

    def table(self) -> str:
        """A readable fixed-width table."""
        head = (
            f"layer {self.layer}, position {self.position} ({self.token!r}) of {self.prompt!r}\n"
            f"model predicts {self.prediction!r}; projection: {self.projection}\n"
            f"whole MLP update promotes: {', '.join(repr(t) for t in self.update_tokens)}\n"
            f"top {len(self.rows)} of {self.n_neurons} sub-updates carry {self.prediction_share:.1%} of the MLP's "
            f"logit contribution to {self.prediction!r} ({self.update_prediction_logit:+.3f})\n"
        )
        lines = [f"{'neuron':>7} {'m_i':>8} {'|v_i|':>7} {'|m_i v_i|':>9} {'to pred':>8}  promoted tokens"]
        for r in self.rows:
            toks = ", ".join(repr(t) for t in r.tokens)
            lines.append(
                f"{r.neuron:>7} {r.coefficient:>8.3f} {r.value_norm:>7.3f} {r.magnitude:>9.3f} "
                f"{r.prediction_logit:>+8.3f}  {toks}"
            )
        return head + "\n".join(lines)

    def to_dict(self) -> dict:
        return {**self.__dict__, "rows": [r.__dict__ for r in self.rows]}


def value_matrix(loaded, layer: int) -> torch.Tensor:
    """Value vectors of ``layer`` as the columns of a [d_model, d_ff] view of ``mlp_out``'s weight."""
    module = get_submodule(loaded.model, loaded.arch.module_name("mlp_out", layer))
    return as_out_in(module.weight, weight_layout(module))


def project(loaded, vectors: torch.Tensor, projection: Projection = "lm_head") -> torch.Tensor:
    """Vocabulary scores of residual-space ``vectors`` [n, d_model] -> [n, vocab] (see module docstring)."""
    model, arch = loaded.model, loaded.arch
    if projection == "lm_head":
        return get_submodule(model, arch.lm_head)(vectors).float()
    if projection == "final_norm":
        return final_logits(model, arch, get_submodule(model, arch.ln_f)(vectors)).float()
    raise ValueError(f"projection must be 'lm_head' or 'final_norm', got {projection!r}")


@torch.no_grad()
def ffn_report(
    loaded,
    prompt: str,
    layer: int,
    position: int = -1,
    k: int = 10,
    top_tokens: int = 8,
    projection: Projection = "lm_head",
) -> FFNReport:
    """The ``k`` largest sub-updates ``m_i * v_i`` of ``layer`` at ``position`` of ``prompt``, projected.

    Args:
        loaded: a LoadedModel.
        prompt: the text (the tokenizer's special prefix is added as everywhere in lmedit).
        layer: the decoder layer.
        position: token index (negative counts from the end; default the last token).
        k: number of sub-updates listed (ranked by ``|m_i| * ||v_i||``).
        top_tokens: tokens listed per sub-update.
        projection: ``"lm_head"`` (Geva et al. 2022) or ``"final_norm"``.
    """
    model, tok = loaded
    arch = loaded.arch
    n_layers = arch.n_layers(model)
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer must lie in 0..{n_layers - 1}, got {layer}")
    ids_list, _ = tokens.encode_prompt(tok, prompt)
    if not -len(ids_list) <= position < len(ids_list):
        raise ValueError(f"position {position} outside the prompt's {len(ids_list)} tokens")
    pos = position % len(ids_list)
    ids = torch.tensor([ids_list], device=loaded.device)
    name = arch.module_name("mlp_out", layer)
    with TraceDict(
        model, [name, arch.ln_f], retain_input=True, retain_output=True, detach=True, stop=True
    ) as td:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    coeff = td[name].input[0, pos].float()  # [d_ff]
    update = td[name].output[0, pos].float()  # [d_model]
    final = td[arch.ln_f].output[0, pos]  # [d_model]
    prediction_id = int(final_logits(model, arch, final[None]).argmax(-1)[0])

    values = value_matrix(loaded, layer).float()  # [d_model, d_ff]
    norms = values.norm(dim=0)  # [d_ff]
    magnitude = coeff.abs() * norms
    top = magnitude.topk(min(k, magnitude.numel())).indices
    sub = (values[:, top] * coeff[top]).T  # [k, d_model], the sub-updates m_i * v_i
    scores = project(loaded, sub.to(values.dtype), projection)  # [k, vocab]
    lm_rows = _lm_head_rows(loaded, [prediction_id]).float()[0]  # [d_model]
    to_pred_all = coeff * (lm_rows @ values)  # [d_ff], each neuron's share of the prediction's logit
    rows = []
    for j, i in enumerate(top.tolist()):
        best = scores[j].topk(top_tokens)
        rows.append(
            SubUpdate(
                neuron=i,
                coefficient=float(coeff[i]),
                value_norm=float(norms[i]),
                magnitude=float(magnitude[i]),
                prediction_logit=float(to_pred_all[i]),
                tokens=[tok.decode([t]) for t in best.indices.tolist()],
                scores=best.values.tolist(),
            )
        )
    update_scores = project(loaded, update[None].to(values.dtype), projection)[0]
    total = float(to_pred_all.sum())
    return FFNReport(
        prompt=prompt,
        layer=layer,
        position=pos,
        token=tok.decode([ids_list[pos]]),
        projection=projection,
        prediction=tok.decode([prediction_id]),
        rows=rows,
        update_tokens=[tok.decode([t]) for t in update_scores.topk(top_tokens).indices.tolist()],
        update_prediction_logit=total,
        prediction_share=float(to_pred_all[top].sum()) / total if total else float("nan"),
        n_neurons=int(coeff.numel()),
    )


def _lm_head_rows(loaded, ids: list[int]) -> torch.Tensor:
    """Rows of the LM head for token ``ids`` in [vocab, d_model] orientation -> [len(ids), d_model]."""
    head = get_submodule(loaded.model, loaded.arch.lm_head)
    weight = as_out_in(head.weight, weight_layout(head))  # [vocab, d_model]
    return weight[ids]
