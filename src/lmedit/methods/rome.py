"""ROME (Meng et al. 2022): a rank-one update of one MLP output projection, with r-ROME's corrected key.

For a request with subject s at layer l (W: the layer's MLP output projection, [out, in]):

1. k* = mean over context templates of the input of W at s's last token (``core.keys``).
2. delta = optimised vector added to W's output at s's last token: target NLL over the template prompts + KL on
   "{s} is a" + weight decay, norm-clamped (``core.values``); v* = W k* + delta.
3. Delta = (v* - W k*) (C^-1 k*)^T / ((C^-1 k*)^T k*)  with C = E[k k^T] over a text corpus (``core.stats``),
   so (W + Delta) k* = v* while keys uncorrelated with k* under C move least (``core.solvers.rank_one``).

Key modes. ``key_mode="templates"`` (default, ours) makes the rank-one update add delta at every context
template's key at once, with the least expected change elsewhere (``core.solvers.rank_one_on_keys``; steps 1
and 3 then use the per-template keys instead of their mean). ``key_mode="averaged"`` (r-ROME, Gupta et al.
2024) fixes W' k* = v* for the same averaged key that sets the update's direction: exact at k*, but a prompt
whose key is far from the mean gets only part of delta (on Gemma 3 270M a one-token subject at the start of
the plain prompt realises 20-60% of it, and 7 of the first 100 bundled edits failed there; the templates mode
made all 7 and raised paraphrase and locality on 20 cases, docs/locate-then-edit.md).
``key_mode="original"`` reproduces the original code, which fixed the value for the plain prompt's key
instead (the mismatch that makes sequential ROME edits collapse).

Several requests are edited one after the other, each on top of the previous ones (through parameter
overrides; the model is never written), and returned as one LowRankDelta of rank n.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

import torch

from lmedit.config import MethodConfig, hp
from lmedit.core.delta import LowRankDelta
from lmedit.core.keys import (
    DEFAULT_TEMPLATES,
    check_templates,
    compute_keys,
    generate_templates,
    mlp_out_weight,
)
from lmedit.core.patch import EditPatch
from lmedit.core.solvers import rank_one, rank_one_on_keys
from lmedit.core.stats import covariances
from lmedit.core.values import optimize_values
from lmedit.errors import ConfigError
from lmedit.registry import register_method
from lmedit.request import EditRequest

log = logging.getLogger(__name__)


@dataclass
class LocateEditConfig(MethodConfig):
    """Hyperparameters shared by the locate-then-edit methods (keys, values, statistics)."""

    context_templates: list[str] | None = hp(
        None,
        "Context templates ending in '{}' over which keys and the value loss are averaged. None: n_templates "
        "of the bundled fixed list ('{}' + 10 neutral prefixes), or generated ones when "
        "template_source='generated' or 'sampled'.",
    )
    template_source: Literal["fixed", "generated", "sampled"] = hp(
        "fixed",
        "fixed: bundled templates; generated: greedy continuations of 'The', 'Therefore', ...; sampled: "
        "continuations of those words (in turn) sampled from the model's top 5 tokens with the method's seed, as "
        "MEMIT's reference code and EasyEdit's MEMIT draw theirs (10 tokens each; recorded in the patch).",
    )
    n_templates: int = hp(
        len(DEFAULT_TEMPLATES),
        f"Templates used when context_templates is None: the plain prompt '{{}}' and the first n_templates - 1 "
        f"prefixes (fixed: at most {len(DEFAULT_TEMPLATES)}; generated, sampled: n_templates - 1 "
        f"continuations). Each is a row of every value-optimisation step, so the edit's cost grows with it.",
    )
    v_steps: int = hp(25, "Adam steps of the value (delta) optimisation.")
    v_lr: float = hp(0.5, "Adam learning rate of the value optimisation.")
    kl_factor: float = hp(0.0625, "Weight of the KL term on the essence prompt '{subject} is a' (0: off).")
    kl_position: Literal["last", "subject"] = hp(
        "last",
        "Where the essence prompt's distribution is kept: 'last', after its last token (the next token after "
        "'{subject} is a', the ROME paper's definition), or 'subject', after the subject's last token (ROME's "
        "and MEMIT's reference code, and EasyEdit).",
    )
    v_weight_decay: float = hp(0.5, "Weight of |delta| / |v0|^2 in the value loss.")
    clamp_norm_factor: float = hp(4.0, "Clamp |delta| to this multiple of the original value's norm |v0|.")
    early_stop: float = hp(0.05, "A request's value optimisation stops once its loss is below this.")
    value_batch: int = hp(16, "Requests whose values are optimised together in one batch.")
    stats_corpus: str | None = hp(
        None,
        "Text for the key statistics: file/folder/JSONL, 'hf:NAME[:CONFIG][@SPLIT]' or 'gensim-wiki' (None).",
    )
    stats_tokens: int = hp(100_000, "Tokens over which E[k k^T] is averaged (cached on disk).")
    stats_seq_len: int = hp(256, "Sequence length of the statistics pass.")
    damping: float = hp(1e-6, "Relative ridge added to covariance matrices before factorising.")
    progress: bool = hp(False, "Show progress bars.")

    def validate(self) -> None:
        if self.template_source == "fixed" and not 1 <= self.n_templates <= len(DEFAULT_TEMPLATES):
            raise ConfigError(
                f"n_templates must be 1..{len(DEFAULT_TEMPLATES)} with the fixed templates, got {self.n_templates}"
                "; give context_templates for more"
            )
        for name in ("v_steps", "value_batch", "stats_tokens", "stats_seq_len", "n_templates"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("v_lr", "clamp_norm_factor"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("kl_factor", "v_weight_decay", "damping"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.context_templates is not None:
            check_templates(self.context_templates)

    def templates(self, loaded) -> list[str]:
        """The context templates to use (resolved once per edit and recorded in the patch)."""
        if self.context_templates is not None:
            return check_templates(self.context_templates)
        if self.template_source in ("generated", "sampled") and self.n_templates > 1:
            seed = self.seed if self.template_source == "sampled" else None
            return generate_templates(loaded, n=self.n_templates - 1, sample_seed=seed)
        if self.template_source != "fixed":
            return ["{}"]
        return list(DEFAULT_TEMPLATES[: self.n_templates])

    def value_kwargs(self) -> dict:
        return dict(
            steps=self.v_steps,
            lr=self.v_lr,
            kl_factor=self.kl_factor,
            kl_position=self.kl_position,
            weight_decay=self.v_weight_decay,
            clamp_norm_factor=self.clamp_norm_factor,
            early_stop=self.early_stop,
            batch_requests=self.value_batch,
        )


@dataclass
class ROMEConfig(LocateEditConfig):
    layer: int | None = hp(
        None, "Decoder layer whose MLP output projection is edited (default: model preset)."
    )
    key_mode: Literal["templates", "averaged", "original"] = hp(
        "templates",
        "templates: W' k_t = W k_t + delta for every context template's key k_t (the least-disruptive rank-one "
        "update meeting all of them, softened by key_ridge); averaged: W' k* = v* for the template-averaged key "
        "(r-ROME's correction); original: for the plain prompt's key, as in the original ROME code.",
    )
    key_ridge: float = hp(
        1e-2,
        "key_mode='templates': relative ridge on the per-template constraints (0: exact; larger: closer to the "
        "averaged update, fewer parameters moved).",
    )

    def validate(self) -> None:
        super().validate()
        if self.key_ridge < 0:
            raise ConfigError(f"key_ridge must be >= 0, got {self.key_ridge}")


#: Presets for the bundled models (10-case sweeps of layer and clamp, see docs/locate-then-edit.md).
PRESETS = {
    "gemma3-270m": {"layer": 1, "clamp_norm_factor": 0.75},
    "smollm2-135m": {"layer": 1, "clamp_norm_factor": 2.0},
}


def default_layer(n_layers: int) -> int:
    """ROME's layers sit around the first fifth of the stack (GPT-2 XL 17/48, GPT-J 5/28)."""
    return max(0, round(n_layers * 0.2))


def check_layers(loaded, layers: list[int], field: str) -> None:
    n = loaded.arch.n_layers(loaded.model)
    bad = [x for x in layers if not 0 <= x < n]
    if bad:
        raise ConfigError(f"{field}={bad} out of range: the model has layers 0..{n - 1}")


@register_method("rome", ROMEConfig, family="locate-then-edit", presets=PRESETS)
def edit_rome(loaded, requests: list[EditRequest], config: ROMEConfig) -> EditPatch:
    """ROME: rank-one update of one MLP output projection (r-ROME keys by default)."""
    t0 = time.perf_counter()
    layer = config.layer if config.layer is not None else default_layer(loaded.arch.n_layers(loaded.model))
    check_layers(loaded, [layer], "layer")
    templates = config.templates(loaded)
    if config.key_mode == "original" and "{}" not in templates:
        raise ConfigError("key_mode='original' needs the plain template '{}' in context_templates")
    cov, prov = covariances(loaded, [layer], config.stats_corpus, config.stats_tokens, config.stats_seq_len)
    t_stats = time.perf_counter() - t0
    site = loaded.arch.module_name("mlp_out", layer)
    name, w0, layout = mlp_out_weight(loaded, layer)
    param = loaded.model.get_parameter(name)
    w = w0.clone()  # [out, in], includes the earlier requests' updates
    lefts, rights, per_request = [], [], []
    timing = {"keys_s": 0.0, "values_s": 0.0, "solve_s": 0.0}
    for req in requests:
        overrides = None
        if lefts:
            overrides = {name: _storage(w, layout).to(param.dtype)}
        t = time.perf_counter()
        keys = compute_keys(loaded, [req], [layer], templates, overrides=overrides)
        timing["keys_s"] += time.perf_counter() - t
        t = time.perf_counter()
        vals = optimize_values(loaded, [req], [site], templates, overrides=overrides, **config.value_kwargs())
        timing["values_s"] += time.perf_counter() - t
        t = time.perf_counter()
        delta = vals.delta[site][0]  # [out]
        if config.key_mode == "templates":
            left, right = rank_one_on_keys(
                cov[layer], keys.per_template[layer][0], delta, config.damping, config.key_ridge
            )
        else:
            k_star = keys.mean[layer][0]  # [in]
            k_fix = k_star if config.key_mode == "averaged" else keys.plain(layer)[0]
            v_star = w @ k_fix + delta  # [out]: the value W' must produce for k_fix
            left, right = rank_one(w, cov[layer], k_star, v_star, k_fix=k_fix, damping=config.damping)
        w = w + torch.outer(left, right)
        timing["solve_s"] += time.perf_counter() - t
        lefts.append(left)
        rights.append(right)
        per_request.append(
            {
                "loss": vals.loss[0],
                "nll": vals.nll[0],
                "steps": vals.steps[0],
                "delta_norm": float(delta.norm()),
                "v0_norm": float(vals.init[site][0].norm()),
                "update_norm": float(left.norm() * right.norm()),
                "value_timing": vals.timing,
            }
        )
    u = torch.stack(lefts, 1)  # [out, n]
    v = torch.stack(rights, 1)  # [in, n]
    deltas = [LowRankDelta.from_out_in(name, u.cpu(), v.cpu(), layout)]
    return EditPatch(
        method="rome",
        config=config.to_dict() | {"layer": layer, "context_templates": templates},
        requests=[r.to_dict() for r in requests],
        deltas=deltas,
        base=EditPatch.base_of(loaded, [name]),
        info={
            "seconds": time.perf_counter() - t0,
            "stats_seconds": t_stats,
            "timing": timing,
            "statistics": {str(k): v for k, v in prov.items()},
            "requests": per_request,
        },
    )


def _storage(w_out_in: torch.Tensor, layout: str) -> torch.Tensor:
    return w_out_in if layout == "out_in" else w_out_in.T.contiguous()
