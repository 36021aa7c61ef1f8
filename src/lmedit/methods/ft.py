"""FT-L and FT-M: constrained fine-tuning of one or more layers' MLP weights.

* **FT-L** (Zhu et al. 2020, as used in the ROME paper): the loss is the target's negative log-likelihood read
  at the prompt's last position (every target token scored from that one distribution, as in ROME's and
  EasyEdit's ``prompt_last`` objective), and each weight is kept within an L-infinity ball of radius
  ``norm_constraint`` around its original value.
* **FT-M** (EasyEdit): teacher-forced NLL of the target tokens given prompt + preceding target tokens, the loss
  masked to the target tokens; no norm constraint by default.

Both optimise a delta on the chosen weights through ``torch.func.functional_call`` and return it as a
DenseDelta: the model itself is never written to.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from lmedit.config import MethodConfig, hp
from lmedit.core.delta import DenseDelta, get_parameter
from lmedit.core.forward import final_hidden, target_logprobs
from lmedit.core.patch import EditPatch
from lmedit.errors import ConfigError
from lmedit.models import tokens
from lmedit.models.arch import final_logits
from lmedit.registry import register_method
from lmedit.request import EditRequest

log = logging.getLogger(__name__)


@dataclass
class FTConfig(MethodConfig):
    layers: list[int] | None = hp(None, "Decoder layers whose weights are tuned (default: the model preset).")
    module: Literal["mlp_out", "mlp_in", "attn_out"] = hp(
        "mlp_out", "Which projection of each layer is tuned."
    )
    lr: float = hp(5e-4, "Adam learning rate.")
    steps: int = hp(25, "Maximum optimisation steps.")
    norm_constraint: float | None = hp(
        None, "L-infinity bound on each weight's change (None: unconstrained)."
    )
    weight_decay: float = hp(0.0, "Adam weight decay on the delta.")
    objective: Literal["prompt_last", "target_new"] = hp(
        "target_new",
        "prompt_last: all target tokens scored at the prompt's last position (FT-L); "
        "target_new: teacher-forced target tokens (FT-M).",
    )
    early_stop_loss: float = hp(1e-2, "Stop once the mean loss falls below this.")
    batch_size: int = hp(16, "Requests per optimisation batch.")
    progress: bool = hp(True, "Show a progress bar.")

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            raise ConfigError(f"norm_constraint must be > 0 or None, got {self.norm_constraint}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class FTLConfig(FTConfig):
    norm_constraint: float | None = hp(
        5e-5, "L-infinity bound on each weight's change (None: unconstrained)."
    )
    objective: Literal["prompt_last", "target_new"] = hp(
        "prompt_last", FTConfig.__dataclass_fields__["objective"].metadata["help"]
    )


#: Layer presets by bundled model name or config.model_type (chosen on the bundled models; see docs/methods.md).
PRESETS = {
    "gemma3-270m": {"layers": [6]},
    "smollm2-135m": {"layers": [12]},
}


def default_layers(n_layers: int) -> list[int]:
    return [n_layers // 3]


def _prompt_last_loss(loaded, batch_reqs: list[EditRequest], overrides: dict) -> torch.Tensor:
    model, tok = loaded
    device = loaded.device
    encs = [tokens.encode_pair(tok, r.prompt_text, r.target_new) for r in batch_reqs]
    width = max(e.prompt_len for e in encs)
    tmax = max(e.target_len for e in encs)
    pid = tokens.pad_id(tok)
    ids = torch.full((len(encs), width), pid, dtype=torch.long)
    mask = torch.zeros_like(ids)
    tgt = torch.full((len(encs), tmax), pid, dtype=torch.long)
    tmask = torch.zeros((len(encs), tmax), dtype=torch.bool)
    for i, e in enumerate(encs):
        ids[i, : e.prompt_len] = torch.tensor(e.ids[: e.prompt_len])
        mask[i, : e.prompt_len] = 1
        tgt[i, : e.target_len] = torch.tensor(e.ids[e.prompt_len :])
        tmask[i, : e.target_len] = True
    hidden = final_hidden(model, loaded.arch, ids.to(device), mask.to(device), overrides)
    last = torch.tensor([e.prompt_len - 1 for e in encs], device=device)
    logits = final_logits(model, loaded.arch, hidden[torch.arange(len(encs), device=device), last]).float()
    lp = torch.log_softmax(logits, -1).gather(1, tgt.to(device))  # [batch, tmax]
    tmask = tmask.to(device)
    return -((lp * tmask).sum(1) / tmask.sum(1)).mean()


def _target_new_loss(loaded, batch_reqs: list[EditRequest], overrides: dict) -> torch.Tensor:
    model, tok = loaded
    batch = tokens.pair_batch(tok, [r.prompt_text for r in batch_reqs], [r.target_new for r in batch_reqs])
    batch = batch.to(loaded.device)
    lp, _ = target_logprobs(model, loaded.arch, batch, overrides)
    return -(lp.sum(1) / batch.target_mask.sum(1)).mean()


def run_ft(loaded, requests: list[EditRequest], config: FTConfig, method: str) -> EditPatch:
    model = loaded.model
    n_layers = loaded.arch.n_layers(model)
    layers = config.layers if config.layers is not None else default_layers(n_layers)
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ConfigError(f"layers {bad} out of range: the model has layers 0..{n_layers - 1}")
    names = [loaded.arch.module_name(config.module, layer) + ".weight" for layer in layers]
    base = {n: get_parameter(model, n) for n in names}
    deltas = {n: torch.zeros_like(p, dtype=torch.float32, requires_grad=True) for n, p in base.items()}
    opt = torch.optim.Adam(deltas.values(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = _prompt_last_loss if config.objective == "prompt_last" else _target_new_loss
    t0 = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc=f"{method} steps", disable=not config.progress, leave=False)
    for _step in bar:
        total = 0.0
        for start in range(0, len(requests), config.batch_size):
            chunk = requests[start : start + config.batch_size]
            overrides = {n: base[n] + deltas[n].to(base[n].dtype) for n in names}
            loss = loss_fn(loaded, chunk, overrides)
            opt.zero_grad()
            (loss * len(chunk) / len(requests)).backward()
            opt.step()
            if config.norm_constraint is not None:
                with torch.no_grad():
                    for d in deltas.values():
                        d.clamp_(-config.norm_constraint, config.norm_constraint)
            total += loss.item() * len(chunk) / len(requests)
        losses.append(total)
        bar.set_postfix(loss=f"{total:.3f}")
        if total < config.early_stop_loss:
            break
    log.info("%s: %d steps, loss %.4f -> %.4f", method, len(losses), losses[0], losses[-1])
    return EditPatch(
        method=method,
        config=config.to_dict() | {"layers": layers},
        requests=[r.to_dict() for r in requests],
        deltas=[DenseDelta(n, d.detach().clone()) for n, d in deltas.items()],
        base=EditPatch.base_of(loaded, names),
        info={
            "steps": len(losses),
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "seconds": time.perf_counter() - t0,
        },
    )


@register_method("ft-l", FTLConfig, family="fine-tuning", presets=PRESETS)
def edit_ft_l(loaded, requests: list[EditRequest], config: FTLConfig) -> EditPatch:
    """FT-L: fine-tune MLP weights within an L-inf ball, loss at the prompt's last position."""
    return run_ft(loaded, requests, config, "ft-l")


@register_method("ft-m", FTConfig, family="fine-tuning", presets=PRESETS)
def edit_ft_m(loaded, requests: list[EditRequest], config: FTConfig) -> EditPatch:
    """FT-M: fine-tune MLP weights with the NLL masked to the target tokens (teacher-forced)."""
    return run_ft(loaded, requests, config, "ft-m")
