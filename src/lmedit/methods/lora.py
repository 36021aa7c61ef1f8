"""LoRA editing (Hu et al. 2021) through ``peft``, with FT-M's loss; the result is a merged low-rank delta.

For every chosen module (by default the MLP output projection of the FT preset's layer) a ``peft`` LoRA layer
is built around it only to own the factors (its initialisation, ``lora_alpha``/rank scaling, rsLoRA option and
``get_delta_weight`` in the weight's storage layout, Conv1D included). The factors are trained on the
teacher-forced NLL of the target tokens (FT-M: the loss is masked to the target) by running the *unchanged*
model through ``torch.func.functional_call`` with ``W + get_delta_weight()`` in place of each weight, so the
model is never written to and no adapter has to be installed at apply time. Weights under an installed adapter
(e.g. a GRACE codebook from an earlier edit) are found through the wrapper.

The patch holds one ``LowRankDelta`` per adapted weight, ``left @ right.T = scaling * B @ A`` in the weight's
layout: exact, rank ``rank``, and applied/reverted like any other delta.

    >>> patch = lmedit.edit(loaded, request, method="lora", rank=4, layers=[6])
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from lmedit.config import MethodConfig, hp
from lmedit.core.adapters import resolve_name, unwrap
from lmedit.core.delta import LowRankDelta, get_parameter
from lmedit.core.forward import target_logprobs
from lmedit.core.patch import EditPatch
from lmedit.errors import ConfigError
from lmedit.methods.ft import PRESETS as FT_PRESETS
from lmedit.methods.ft import default_layers
from lmedit.models import tokens
from lmedit.models.arch import get_submodule, weight_layout
from lmedit.registry import register_method
from lmedit.request import EditRequest

log = logging.getLogger(__name__)

Component = Literal["mlp_out", "mlp_in", "attn_out"]


@dataclass
class LoRAConfig(MethodConfig):
    layers: list[int] | None = hp(
        None, "Decoder layers whose modules get LoRA factors (default: the preset)."
    )
    modules: list[Component] = hp(["mlp_out"], "Projections of each layer that are adapted.")
    rank: int = hp(8, "LoRA rank r.")
    alpha: float = hp(16.0, "lora_alpha; the update is scaled by alpha / r (alpha / sqrt(r) with rslora).")
    rslora: bool = hp(False, "Use rank-stabilised scaling alpha / sqrt(r).")
    lr: float = hp(5e-3, "Adam learning rate for the factors.")
    steps: int = hp(50, "Maximum optimisation steps.")
    weight_decay: float = hp(0.0, "Adam weight decay on the factors.")
    early_stop_loss: float = hp(1e-2, "Stop once the mean target NLL falls below this.")
    batch_size: int = hp(16, "Requests per optimisation batch.")
    progress: bool = hp(True, "Show a progress bar.")

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"rank must be >= 1, got {self.rank}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.modules:
            raise ConfigError("modules must name at least one of mlp_out, mlp_in, attn_out")


def _lora_layer(module: torch.nn.Module, config: LoRAConfig, layout: str) -> torch.nn.Module:
    """A peft LoRA layer owning fresh float32 factors for ``module`` (which it only reads)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    conv = layout == "in_out"
    kw = dict(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=0.0,
        use_rslora=config.rslora,
        fan_in_fan_out=conv,
    )
    layer = LoraLinear(module, "default", config=PeftLoraConfig(**kw), is_target_conv_1d_layer=conv, **kw)
    layer.lora_A["default"].float()
    layer.lora_B["default"].float()
    return layer


def run_lora(loaded, requests: list[EditRequest], config: LoRAConfig) -> EditPatch:
    """Train LoRA factors on the requests' target NLL; return them merged as LowRankDeltas."""
    model, tok = loaded
    n_layers = loaded.arch.n_layers(model)
    layers = config.layers if config.layers is not None else default_layers(n_layers)
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ConfigError(f"layers {bad} out of range: the model has layers 0..{n_layers - 1}")
    modules = [loaded.arch.module_name(c, layer) for layer in layers for c in dict.fromkeys(config.modules)]
    loras, layouts = {}, {}
    for name in modules:
        mod = unwrap(get_submodule(model, resolve_name(model, name)))  # the base layer under any adapter
        layouts[name] = weight_layout(mod)
        loras[name] = _lora_layer(mod, config, layouts[name])
    weights = {f"{n}.weight": get_parameter(model, resolve_name(model, f"{n}.weight")) for n in modules}
    params = [p for lo in loras.values() for p in (lo.lora_A["default"].weight, lo.lora_B["default"].weight)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    t0 = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc="lora", unit="steps", disable=not config.progress, leave=False)
    for _step in bar:
        total = 0.0
        for start in range(0, len(requests), config.batch_size):
            chunk = requests[start : start + config.batch_size]
            overrides = {
                resolve_name(model, f"{n}.weight"): weights[f"{n}.weight"]
                + lo.get_delta_weight("default").to(weights[f"{n}.weight"].dtype)
                for n, lo in loras.items()
            }
            batch = tokens.pair_batch(tok, [r.prompt_text for r in chunk], [r.target_new for r in chunk])
            batch = batch.to(loaded.device)
            lp, _ = target_logprobs(model, loaded.arch, batch, overrides)
            loss = -(lp.sum(1) / batch.target_mask.sum(1)).mean()
            opt.zero_grad()
            (loss * len(chunk) / len(requests)).backward()
            opt.step()
            total += loss.item() * len(chunk) / len(requests)
        losses.append(total)
        bar.set_postfix(loss=f"{total:.3f}")
        if total < config.early_stop_loss:
            break
    log.info("lora: %d steps, loss %.4f -> %.4f", len(losses), losses[0], losses[-1])
    deltas = []
    for name, lo in loras.items():
        a = lo.lora_A["default"].weight.detach()  # [r, in]
        b = lo.lora_B["default"].weight.detach()  # [out, r]
        scale = lo.scaling["default"]
        deltas.append(
            LowRankDelta.from_out_in(f"{name}.weight", (b * scale).clone(), a.T.clone(), layouts[name])
        )
    return EditPatch(
        method="lora",
        config=config.to_dict() | {"layers": layers},
        requests=[r.to_dict() for r in requests],
        deltas=deltas,
        base=EditPatch.base_of(loaded, list(weights)),
        info={
            "steps": len(losses),
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "seconds": time.perf_counter() - t0,
            "peft": _peft_version(),
        },
    )


def _peft_version() -> str:
    from importlib.metadata import version

    return version("peft")


@register_method("lora", LoRAConfig, family="fine-tuning", presets=FT_PRESETS)
def edit_lora(loaded, requests: list[EditRequest], config: LoRAConfig) -> EditPatch:
    """LoRA (peft) on chosen projections, FT-M masked loss; returned as merged low-rank deltas."""
    return run_lora(loaded, requests, config)
