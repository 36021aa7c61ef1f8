"""Knowledge Neurons (Dai et al. ACL 2022, "Knowledge Neurons in Pretrained Transformers").

1. **Attribution**: for each of the fact's prompts (the request's prompt and its rephrases), integrated
   gradients of P(answer) at the prompt's last position with respect to each intermediate MLP neuron (the
   input of ``mlp_out``) at that position: ``attr_i = a_i * mean_k dP(alpha_k * a)/da_i`` with
   ``alpha_k = k/steps``, one layer's activations scaled at a time (the other layers run naturally). The
   ``steps`` scaled copies of every layer are batched into a few forward/backward passes.
2. **Selection**: per prompt, neurons whose attribution exceeds ``threshold`` x that prompt's maximum; then
   those selected for at least ``agreement`` of the prompts; minus the neurons selected (same threshold) for
   the same answer on *negative prompts* - the fact's template with other subjects (``negative_subjects``) -
   which are answer- or relation-generic rather than about this subject (the "negative examples" refinement
   of EleutherAI's knowledge-neurons library; without it, erasing "born in London" also erases London for
   every other Londoner); at most ``max_neurons`` (by mean attribution).
3. **Edit** of the selected neurons' value vectors (columns of ``mlp_out``'s [out, in] weight):

   * ``erase`` / ``suppress``: zero them (the same as zeroing the neurons' activations for every input);
   * ``amplify``: multiply them by ``amplify_factor``;
   * ``edit``: ``v <- v + s * (lambda_new * t_new - lambda_old * t_old)`` with ``t`` the LM-head rows (output
     embeddings; the input embeddings in tied models) of the old and new answers' first tokens and ``s`` the
     sign of the neuron's activation at the prompt (the paper's BERT neurons are GELU-positive; gated MLPs
     have negative coefficients too, and ``m_i * v_i`` must move toward ``t_new``). With
     ``direction_scale="value_norm"`` (default) ``t`` is scaled to the norm of ``v``, so the lambdas are
     relative to each value vector; ``"raw"`` uses the embedding rows as they are (the paper's BERT setting,
     where embeddings and value vectors have comparable scale).

The answer attributed is the request's ``target_true`` (first token); without one, the model's top token
at the prompt. The method returns an EditPatch with one DenseDelta per touched ``mlp_out`` weight, nonzero
only in the selected neurons' columns; the model is never written to.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Literal

import torch

from lmedit.config import MethodConfig, hp
from lmedit.core.delta import DenseDelta, get_parameter
from lmedit.core.forward import cache_kwarg
from lmedit.core.hooks import TraceDict
from lmedit.core.patch import EditPatch
from lmedit.errors import ConfigError
from lmedit.methods.wise import CONTRAST_SUBJECTS, contrast_prompts
from lmedit.models import tokens
from lmedit.models.arch import as_out_in, final_logits, get_submodule, weight_layout
from lmedit.registry import register_method
from lmedit.request import EditRequest

log = logging.getLogger(__name__)


@dataclass
class KNConfig(MethodConfig):
    mode: Literal["erase", "suppress", "amplify", "edit"] = hp(
        "edit",
        "erase/suppress: zero the neurons' value vectors; amplify: scale them by amplify_factor; edit: move "
        "them from the old answer's embedding direction to the new answer's.",
    )
    layers: list[int] | None = hp(None, "Layers whose neurons are attributed (default: all).")
    steps: int = hp(20, "Integrated-gradients steps (Riemann sum over alpha = k/steps).")
    threshold: float = hp(0.2, "Keep neurons with attribution > threshold x the prompt's maximum.")
    agreement: float = hp(0.7, "Keep neurons selected for at least this fraction of the prompts.")
    max_neurons: int = hp(10, "At most this many neurons per request (largest mean attribution first).")
    min_neurons: int = hp(
        1, "If agreement leaves fewer, take this many by mean normalized attribution instead."
    )
    negative_subjects: list[str] = hp(
        list(CONTRAST_SUBJECTS),
        "Subjects put into the fact's template; neurons selected for the same answer on those prompts are "
        "dropped as not specific to this subject ([] turns the refinement off).",
    )
    amplify_factor: float = hp(2.0, "amplify: value vectors are multiplied by this.")
    lambda_old: float = hp(1.0, "edit: weight of the old answer's direction removed.")
    lambda_new: float = hp(8.0, "edit: weight of the new answer's direction added.")
    direction_scale: Literal["value_norm", "raw"] = hp(
        "value_norm",
        "edit: scale answer embeddings to each value vector's norm (value_norm) or use them as they are (raw).",
    )
    batch_size: int = hp(64, "Rows (layer x IG step) per forward/backward pass.")
    progress: bool = hp(False, "Log each request's selected neurons at INFO level.")
    prefix_cache: bool = hp(
        True, "Run the prompt's prefix once and share its key/value cache (same result, fewer tokens)."
    )

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if not 0 <= self.threshold < 1:
            raise ConfigError(f"threshold must lie in [0, 1), got {self.threshold}")
        if not 0 < self.agreement <= 1:
            raise ConfigError(f"agreement must lie in (0, 1], got {self.agreement}")
        if self.max_neurons < 1 or self.min_neurons < 0 or self.min_neurons > self.max_neurons:
            raise ConfigError("need 0 <= min_neurons <= max_neurons and max_neurons >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


def _prompt_ids(tok, prompt: str) -> list[int]:
    prompt, _ = tokens.join_target(prompt, " x")
    return tokens.encode_prompt(tok, prompt)[0]


def _answer_id(loaded, prompt: str, answer: str | None) -> int:
    model, tok = loaded
    if answer is not None:
        enc = tokens.encode_pair(tok, prompt, answer)
        return enc.ids[enc.prompt_len]
    ids = torch.tensor([_prompt_ids(tok, prompt)], device=loaded.device)
    with TraceDict(model, [loaded.arch.ln_f], detach=True, stop=True) as td, torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return int(final_logits(model, loaded.arch, td[loaded.arch.ln_f].output[:, -1]).argmax(-1)[0])


@torch.no_grad()
def last_activations(loaded, prompt: str, layers: list[int]) -> torch.Tensor:
    """Inputs of ``mlp_out`` (the neuron activations) at the prompt's last position -> [len(layers), d_ff]."""
    model, tok = loaded
    ids = torch.tensor([_prompt_ids(tok, prompt)], device=loaded.device)
    names = [loaded.arch.module_name("mlp_out", layer) for layer in layers]
    with TraceDict(model, names, retain_input=True, retain_output=False, detach=True) as td:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return torch.stack([td[n].input[0, -1].float() for n in names])


def integrated_gradients(
    loaded,
    prompt: str,
    answer_id: int,
    layers: list[int],
    steps: int = 20,
    batch_size: int = 64,
    prefix_cache: bool = True,
) -> torch.Tensor:
    """Attribution of every MLP neuron of ``layers`` at the prompt's last position -> [len(layers), d_ff].

    ``attr_i = a_i * (1/steps) * sum_k dP(answer | a_layer <- (k/steps) a_layer) / da_i``.

    With ``prefix_cache`` the positions before the last (which scaling the last position cannot change, the
    attention being causal) are run once and their key/value cache is shared by every scaled row, so each
    row costs one token instead of the whole prompt.
    """
    model, tok = loaded
    arch = loaded.arch
    device = loaded.device
    ids = torch.tensor([_prompt_ids(tok, prompt)], device=device)  # [1, pos]
    last = ids.shape[1] - 1
    names = [arch.module_name("mlp_out", layer) for layer in layers]
    base = dict(zip(names, last_activations(loaded, prompt, layers)))  # [d_ff] each
    cache = None
    if prefix_cache and last > 0:
        with torch.no_grad():
            prefix = ids[:, :last]
            out = model(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True)
            cache = getattr(out, "cache", None) or out.past_key_values
    alphas = torch.arange(1, steps + 1, device=device, dtype=torch.float32) / steps  # [steps]
    per_batch = max(1, batch_size // steps)
    grads: dict[str, torch.Tensor] = {}
    for start in range(0, len(names), per_batch):
        group = names[start : start + per_batch]
        # leaf tensors: the scaled activations of each layer in the group, [steps, d_ff]
        scaled = {n: (alphas[:, None] * base[n][None]).requires_grad_(True) for n in group}
        prob = _scaled_answer_prob(loaded, ids, scaled, answer_id, cache)
        g = torch.autograd.grad(prob, [scaled[n] for n in group])
        for n, gn in zip(group, g):
            grads[n] = gn.mean(0)  # [d_ff]
    return torch.stack([base[n] * grads[n] for n in names])  # [layers, d_ff]


@torch.enable_grad()
def _scaled_answer_prob(
    loaded, ids: torch.Tensor, scaled: dict[str, torch.Tensor], answer_id: int, cache=None
) -> torch.Tensor:
    """Sum over rows of P(answer) at the last position, row block j using ``scaled``'s j-th entry.

    ``scaled`` maps mlp_out module names to [steps, d_ff]; rows ``j*steps .. (j+1)*steps`` of the batch get
    their last-position input of the j-th module replaced by it (the other layers run naturally). With
    ``cache`` (the key/value cache of ``ids[:, :-1]``, batch 1) only the last token is run.
    """
    model, arch = loaded.model, loaded.arch
    last = -1
    group = list(scaled)
    steps = next(iter(scaled.values())).shape[0]
    rows = {n: torch.arange(j * steps, (j + 1) * steps, device=ids.device) for j, n in enumerate(group)}
    final: dict[str, torch.Tensor] = {}

    def edit_in(x: torch.Tensor, name: str) -> torch.Tensor:
        x = x.clone()  # [rows, pos, d_ff]
        x[rows[name], last] = scaled[name].to(x.dtype)
        return x

    def keep_final(out: torch.Tensor, name: str) -> torch.Tensor:
        final["h"] = out[:, last] if not isinstance(out, tuple) else out[0][:, last]
        return out

    n = len(group) * steps
    kwargs: dict = {"use_cache": False}
    batch = ids.expand(n, -1)
    if cache is not None:
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(n)
        kwargs = {cache_kwarg(model): cache, "use_cache": True}
        batch = ids[:, -1:].expand(n, -1)
    mask = torch.ones((n, ids.shape[1]), dtype=torch.long, device=ids.device)
    with TraceDict(model, group, retain_output=False, edit_input=edit_in):
        with TraceDict(model, [arch.ln_f], retain_output=False, edit_output=keep_final, stop=True):
            model(input_ids=batch, attention_mask=mask, **kwargs)
    logits = final_logits(model, arch, final["h"]).float()  # [rows, vocab]
    return torch.softmax(logits, -1)[:, answer_id].sum()


def select_neurons(
    attributions: list[torch.Tensor],
    layers: list[int],
    config: KNConfig,
    negatives: list[torch.Tensor] | None = None,
) -> list[tuple[int, int, float]]:
    """(layer, neuron, mean normalized attribution) selected by threshold + prompt agreement, minus every
    neuron over the threshold on any of the ``negatives`` (attributions on negative prompts)."""
    norm = [a / a.max().clamp_min(1e-12) for a in attributions]  # each [layers, d_ff], max 1
    votes = torch.stack([(a > config.threshold).float() for a in norm]).sum(0)  # [layers, d_ff]
    mean = torch.stack(norm).mean(0)
    generic = torch.zeros_like(mean, dtype=torch.bool)
    for a in negatives or []:
        generic |= a / a.max().clamp_min(1e-12) > config.threshold
    need = math.ceil(config.agreement * len(norm) - 1e-9)
    chosen = ((votes >= need) & ~generic).nonzero().tolist()
    chosen.sort(key=lambda li: -float(mean[li[0], li[1]]))
    if len(chosen) < config.min_neurons:
        flat = mean.masked_fill(generic, -torch.inf).flatten().topk(config.min_neurons).indices
        chosen = [[int(i) // mean.shape[1], int(i) % mean.shape[1]] for i in flat]
        log.info("agreement left too few neurons; taking the top %d by mean attribution", config.min_neurons)
    chosen = chosen[: config.max_neurons]
    return [(layers[li], ni, float(mean[li, ni])) for li, ni in chosen]


def _answer_direction(loaded, answer_id: int) -> torch.Tensor:
    head = get_submodule(loaded.model, loaded.arch.lm_head)
    return as_out_in(head.weight, weight_layout(head))[answer_id].float()  # [d_model]


@register_method("kn", KNConfig, family="locate-then-edit")
def edit_kn(loaded, requests: list[EditRequest], config: KNConfig) -> EditPatch:
    """Knowledge Neurons: integrated-gradients neuron attribution, then erase/amplify/edit their value vectors."""
    model, tok = loaded
    arch = loaded.arch
    n_layers = arch.n_layers(model)
    layers = list(range(n_layers)) if config.layers is None else list(config.layers)
    bad = [la for la in layers if not 0 <= la < n_layers]
    if bad:
        raise ConfigError(f"layers {bad} out of range: the model has layers 0..{n_layers - 1}")
    t0 = time.perf_counter()
    new_cols: dict[int, dict[int, torch.Tensor]] = {}  # layer -> neuron -> new value vector [d_model]
    per_request = []
    for req in requests:
        prompts = [req.prompt_text, *req.rephrase]
        answer_id = _answer_id(loaded, req.prompt_text, req.target_true)
        attrs = [
            integrated_gradients(
                loaded, p, answer_id, layers, config.steps, config.batch_size, config.prefix_cache
            ).cpu()
            for p in prompts
        ]
        negatives = [
            integrated_gradients(
                loaded, p, answer_id, layers, config.steps, config.batch_size, config.prefix_cache
            )
            for p in contrast_prompts(req, config.negative_subjects)
        ]
        chosen = select_neurons(attrs, layers, config, [a.cpu() for a in negatives])
        acts = last_activations(loaded, req.prompt_text, layers).cpu()  # [layers, d_ff]
        new_id = tokens.encode_pair(tok, req.prompt_text, req.target_new)
        new_id = new_id.ids[new_id.prompt_len]
        for layer, neuron, _ in chosen:
            module = get_submodule(model, arch.module_name("mlp_out", layer))
            values = as_out_in(module.weight, weight_layout(module))  # [d_model, d_ff]
            v = new_cols.get(layer, {}).get(neuron, values[:, neuron].detach().float().clone())
            if config.mode in ("erase", "suppress"):
                v = torch.zeros_like(v)
            elif config.mode == "amplify":
                v = v * config.amplify_factor
            else:
                t_old = _answer_direction(loaded, answer_id).to(v.device)
                t_new = _answer_direction(loaded, new_id).to(v.device)
                if config.direction_scale == "value_norm":
                    scale = values[:, neuron].float().norm()
                    t_old = t_old / t_old.norm() * scale
                    t_new = t_new / t_new.norm() * scale
                # the neuron writes m_i * v_i: with a negative coefficient, moving v toward t_new would push
                # the output away from it, so the direction follows the sign of the neuron's activation
                sign = 1.0 if float(acts[layers.index(layer), neuron]) >= 0 else -1.0
                v = v + sign * (config.lambda_new * t_new - config.lambda_old * t_old)
            new_cols.setdefault(layer, {})[neuron] = v
        if config.progress:
            log.info("kn: %r -> neurons %s", req.prompt_text, [(la, ni) for la, ni, _ in chosen])
        per_request.append(
            {
                "answer": tok.decode([answer_id]),
                "prompts": len(prompts),
                "negative_prompts": len(negatives),
                "neurons": [[la, ni, round(s, 4)] for la, ni, s in chosen],
            }
        )
    deltas = []
    for layer, cols in sorted(new_cols.items()):
        name = arch.module_name("mlp_out", layer) + ".weight"
        module = get_submodule(model, arch.module_name("mlp_out", layer))
        layout = weight_layout(module)
        param = get_parameter(model, name)
        delta = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        view = as_out_in(delta, layout)  # [d_model, d_ff] view of the delta
        original = as_out_in(param.detach().float(), layout)
        for neuron, v in cols.items():
            view[:, neuron] = v.to(delta.device) - original[:, neuron]
        deltas.append(DenseDelta(name, delta))
    names = [d.name for d in deltas]
    log.info(
        "kn %s: %d neurons in layers %s",
        config.mode,
        sum(len(c) for c in new_cols.values()),
        sorted(new_cols),
    )
    return EditPatch(
        method="kn",
        config=config.to_dict() | {"layers": layers},
        requests=[r.to_dict() for r in requests],
        deltas=deltas,
        base=EditPatch.base_of(loaded, names),
        info={"requests": per_request, "seconds": time.perf_counter() - t0},
    )
