"""T-Patcher (Huang et al. ICLR 2023, "Transformer-Patcher: One Mistake Worth One Neuron"): one neuron per edit.

Each edit adds one neuron (key ``k``, bias ``b``, value ``v``) to the MLP of the last decoder layer. The whole MLP
module is wrapped by a ``TPatcherNeurons`` adapter (``lmedit.core.adapters``) that adds
``relu(x . k + b) * v`` to the MLP's output, ``x`` being the MLP's input hidden state at each position; no base
weight is written. A neuron whose pre-activation ``x . k + b`` is <= 0 adds exactly nothing, so the patch is
invisible wherever its neurons stay silent.

Training one neuron (Adam, ``steps``), with ``x_e`` the MLP input at the edit prompt's last token and ``M`` the
MLP inputs at every token of a memory set: unrelated prompts (``memory_prompts``), the other edit prompts of the
chain (so neurons do not fire on each other's edits) and the edit's template filled with other subjects
(``contrast_subjects``, our addition):

* **edit loss**: teacher-forced NLL of the target with the neuron in place;
* **activation loss** (weight ``act_weight``): ``hinge(act_margin - a_e)``, the neuron must fire on the edit,
  with ``a_e = x_e . k + b``;
* **memory loss** (weight ``memory_weight``): ``hinge(a_m - memory_margin) + hinge(a_m - (a_e - memory_gap))``
  over ``a_m = m . k + b`` for every ``m`` in ``M``: inactive on the memory set, and below the edit's
  pre-activation by a gap.

``hinge`` averages the positive entries (the paper's "margin" loss). Initialisation as in the paper: the key is
the edit input scaled to ``x_e . k = 1`` (``k = x_e / ||x_e||^2``), ``b = 0``; the value starts at zero, so
the patched model equals the base model before the first step. The key is trained as ``k = u / ||x_e||`` in a
unit-scale parameter ``u``, so one learning rate serves key, bias and value.

Not as in the paper: the neuron's activation is a ReLU whatever the MLP's own activation (SiLU/GELU are not zero
for negative inputs, so "inactive" would not mean "no effect"); the memory set is a fixed list of sentences and
contrast prompts instead of the task's training data.

Sequential edits add further neurons: with a T-Patcher wrapper already installed on that MLP, the patch's
adapter *replaces* it (``AdapterSpec.parent``) and stores only the neurons it adds, plus the MLP inputs at every
token of its edit prompts (``prompt_inputs``, about 4 x d_model bytes per token): the wrapper keeps the chain's,
so the next edit's memory set does not re-encode every earlier edit prompt and an edit's cost no longer grows with
the chain (only the memory loss's product over the stored tokens does). These are the inputs each earlier prompt
had when its neuron was trained: the MLP's input does not depend on this layer's neurons, but an edit below the
layer made in between (another method, or an adapter at a lower layer) is not reflected. A chain begun before
patches stored them keeps re-encoding.

    >>> session = lmedit.EditSession(loaded)
    >>> session.apply(lmedit.edit(loaded, req1, method="tpatcher"))   # one neuron
    >>> session.apply(lmedit.edit(loaded, req2, method="tpatcher"))   # two neurons
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from lmedit.config import MethodConfig, hp
from lmedit.core.adapters import AdapterSpec, adapter_site, patch_neurons_forward, unwrap
from lmedit.core.forward import replay_below, target_logprobs
from lmedit.core.hooks import Trace
from lmedit.core.patch import EditPatch
from lmedit.errors import ConfigError
from lmedit.methods.wise import (
    CONTRAST_SUBJECTS,
    UNRELATED_PROMPTS,
    contrast_prompts,
    edit_prompt,
    module_inputs,
)
from lmedit.models import tokens
from lmedit.registry import register_method
from lmedit.request import EditRequest

log = logging.getLogger(__name__)


@dataclass
class TPatcherConfig(MethodConfig):
    layer: int | None = hp(
        None, "Decoder layer whose MLP gets the patch neurons (default: the last, as in the paper)."
    )
    lr: float = hp(0.05, "Adam learning rate for the neuron (unit-scale key parameter, bias and value).")
    steps: int = hp(100, "Maximum optimisation steps per neuron.")
    act_margin: float = hp(
        1.0, "The neuron's pre-activation on the edit prompt's last token should reach this."
    )
    memory_margin: float = hp(
        -1.0, "The neuron's pre-activation on every memory token should stay below this (<= 0: silent)."
    )
    memory_gap: float = hp(
        2.0,
        "The pre-activation on every memory token should also stay below the edit's minus this (the paper's "
        "second memory loss).",
    )
    act_weight: float = hp(1.0, "Weight of the activation loss.")
    memory_weight: float = hp(1.0, "Weight of the memory loss.")
    memory_prompts: list[str] = hp(
        list(UNRELATED_PROMPTS),
        "Memory set: unrelated prompts on which the neuron must stay silent (every token counts); the chain's "
        "other edit prompts are added.",
    )
    contrast_subjects: list[str] = hp(
        list(CONTRAST_SUBJECTS),
        "Subjects put into each edit's own prompt template, added to that neuron's memory set so that the "
        "template alone does not fire it (our addition to the paper; [] turns it off).",
    )
    early_stop_loss: float = hp(
        1e-2, "Stop a neuron once its target NLL is below this and its activation and memory losses are zero."
    )
    progress: bool = hp(False, "Log each neuron's losses at INFO level.")

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.memory_margin > 0:
            raise ConfigError(
                f"memory_margin must be <= 0 (a ReLU neuron is silent below 0), got {self.memory_margin}"
            )
        if self.act_margin <= 0:
            raise ConfigError(f"act_margin must be > 0, got {self.act_margin}")
        if self.memory_gap < 0 or self.act_weight < 0 or self.memory_weight < 0:
            raise ConfigError("memory_gap, act_weight and memory_weight must be >= 0")
        if not self.memory_prompts:
            raise ConfigError("memory_prompts must not be empty: the memory loss needs a memory set")


def hinge(t: torch.Tensor) -> torch.Tensor:
    """Mean of the positive entries of ``t`` (0 when there are none): the paper's margin loss."""
    pos = torch.relu(t)
    return pos.sum() / (t > 0).sum().clamp(min=1)


def neuron_losses(
    pre_edit: torch.Tensor, pre_memory: torch.Tensor, config: TPatcherConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation and memory losses of one neuron.

    Args:
        pre_edit: scalar pre-activation ``x_e . k + b`` at the edit prompt's last token.
        pre_memory: [n_memory_tokens] pre-activations on the memory set.
    Returns:
        (activation loss, memory loss), scalars.
    """
    act = hinge(config.act_margin - pre_edit[None])
    memory = hinge(pre_memory - config.memory_margin) + hinge(pre_memory - (pre_edit - config.memory_gap))
    return act, memory


def _mlp_name(loaded, layer: int) -> str:
    """The MLP module of ``layer``: the parent of its output projection, which must not be the layer itself."""
    mlp = loaded.arch.module_name("mlp_out", layer).rpartition(".")[0]
    if mlp == loaded.arch.module_name("layer", layer):
        raise ConfigError(
            f"T-Patcher wraps the MLP module, but {loaded.arch.name} keeps its MLP projections directly in the "
            "decoder layer (no MLP submodule to wrap)"
        )
    return mlp


def run_tpatcher(loaded, requests: list[EditRequest], config: TPatcherConfig) -> EditPatch:
    """Compute the T-Patcher patch for ``requests`` (one neuron each, in order), extending an installed one."""
    model = loaded.model
    n_layers = loaded.arch.n_layers(model)
    layer = config.layer if config.layer is not None else n_layers - 1
    if not 0 <= layer < n_layers:
        raise ConfigError(f"layer {layer} out of range: the model has layers 0..{n_layers - 1}")
    site = adapter_site(model, _mlp_name(loaded, layer), "tpatcher", "T-Patcher")
    name, path, previous = site.name, site.path, site.previous
    t0 = time.perf_counter()

    earlier = list(previous.spec.config["prompts"]) if previous is not None else []
    prompts = [edit_prompt(r) for r in requests]
    x_edit = module_inputs(loaded, path, prompts)
    x_mem = module_inputs(loaded, path, list(config.memory_prompts))
    if earlier and previous.prompt_inputs is not None:  # kept by the installed wrapper: no re-encoding
        x_mem.append(previous.prompt_inputs.to(device=x_edit[0].device, dtype=torch.float32))
    else:  # none earlier, or a chain saved before the wrapper kept them
        x_mem += module_inputs(loaded, path, earlier)
    d = x_edit[0].shape[1]
    keys, biases, values = torch.zeros(0, d), torch.zeros(0), torch.zeros(0, d)
    log_entries = []
    for j, r in enumerate(requests):
        others = [x for p, x in zip(prompts, x_edit) if p != prompts[j]]
        contrast = module_inputs(loaded, path, contrast_prompts(r, config.contrast_subjects))
        memory = torch.cat(x_mem + others + contrast)  # [n_memory_tokens, d]
        k, b, v, entry = _train_neuron(
            loaded, layer, path, (keys, biases, values), x_edit[j][-1], memory, r, config
        )
        keys, biases, values = (
            torch.cat([keys, k[None]]),
            torch.cat([biases, b[None]]),
            torch.cat([values, v[None]]),
        )
        log_entries.append(entry)
        (log.info if config.progress else log.debug)(
            "tpatcher %r -> %r: %s", r.prompt_text, r.target_new, entry
        )

    spec = AdapterSpec(
        "tpatcher",
        name,
        config={"prompts": earlier + prompts, "n_previous": len(earlier)},
        tensors={"keys": keys, "biases": biases, "values": values, "prompt_inputs": torch.cat(x_edit).cpu()},
        parent=previous.spec_fingerprint if previous is not None else None,
    )
    base_mod = site.base
    params = [
        ".".join([name, *(p for p in n.split(".") if p != "base_layer")])
        for n, _ in unwrap(base_mod).named_parameters()
    ]
    return EditPatch(
        method="tpatcher",
        config=config.to_dict() | {"layer": layer},
        requests=[r.to_dict() for r in requests],
        deltas=[],
        base=EditPatch.base_of(loaded, params),
        info={
            "neurons": log_entries,
            "n_neurons": len(earlier) + len(requests),
            "seconds": time.perf_counter() - t0,
        },
        adapters=[spec],
    )


def _train_neuron(
    loaded,
    layer: int,
    path: str,
    fixed: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    x_e: torch.Tensor,
    memory: torch.Tensor,
    request: EditRequest,
    config: TPatcherConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Train one neuron for ``request`` on top of the wrapper's output and this patch's ``fixed`` neurons.

    The layers below ``layer`` run once (``replay_below``): each step computes only the patched layer and up.

    Args:
        fixed: (keys [n, d], biases [n], values [n, d]) of the neurons this patch already added.
        x_e: [d] MLP input at the edit prompt's last token; memory: [m, d] MLP inputs on the memory set.
    Returns:
        key [d], bias [], value [d] (float32, CPU) and a log entry.
    """
    device = loaded.device
    batch = tokens.pair_batch(loaded.tokenizer, [request.prompt_text], [request.target_new]).to(device)
    norm = torch.linalg.vector_norm(x_e)
    unit = (x_e / norm).clone().requires_grad_(True)  # key = unit / ||x_e||: x_e . key = 1 at init
    bias = torch.zeros((), device=device, requires_grad=True)
    value = torch.zeros_like(x_e, requires_grad=True)
    opt = torch.optim.Adam([unit, bias, value], lr=config.lr)
    fk, fb, fv = (t.to(device) for t in fixed)
    state: dict[str, torch.Tensor] = {}

    def add_neurons(out: torch.Tensor, _name: str) -> torch.Tensor:
        return patch_neurons_forward(tr.input, out, state["keys"], state["biases"], state["values"])

    entry: dict = {}
    with (
        replay_below(loaded.model, loaded.arch, layer),
        Trace(loaded.model, path, retain_input=True, retain_output=False, edit_output=add_neurons) as tr,
    ):
        for step in range(config.steps):
            key = unit / norm  # [d]
            state.update(
                keys=torch.cat([fk, key[None]]),
                biases=torch.cat([fb, bias[None]]),
                values=torch.cat([fv, value[None]]),
            )
            lp, _ = target_logprobs(loaded.model, loaded.arch, batch)
            nll = -(lp.sum() / batch.target_mask.sum())
            pre_e = x_e @ key + bias
            act_loss, mem_loss = neuron_losses(pre_e, memory @ key + bias, config)
            if step == 0:
                entry.update(nll_first=nll.item())
            entry.update(
                steps=step + 1,
                nll_last=nll.item(),
                act_loss=act_loss.item(),
                memory_loss=mem_loss.item(),
                pre_activation=pre_e.item(),
            )
            if nll.item() < config.early_stop_loss and act_loss.item() == 0 and mem_loss.item() == 0:
                break
            opt.zero_grad()
            (nll + config.act_weight * act_loss + config.memory_weight * mem_loss).backward()
            opt.step()
    with torch.no_grad():
        key = unit / norm
        entry["memory_max_pre_activation"] = float((memory @ key + bias).max())
    return key.detach().float().cpu(), bias.detach().float().cpu(), value.detach().float().cpu(), entry


@register_method("tpatcher", TPatcherConfig, family="weight-preserving")
def edit_tpatcher(loaded, requests: list[EditRequest], config: TPatcherConfig) -> EditPatch:
    """T-Patcher: one trained ReLU neuron per edit added to the last layer's MLP; weights untouched."""
    return run_tpatcher(loaded, requests, config)


__all__ = ["TPatcherConfig", "hinge", "neuron_losses", "run_tpatcher"]
