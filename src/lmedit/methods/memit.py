"""MEMIT (Meng et al. 2023): many edits at once, spread over a range of layers by least squares.

For requests i = 1..n and layers l_1 < ... < l_m = L:

1. z_i = h_L(i) + delta_i: the decoder layer L's output at the subject's last token, plus the optimised delta
   (``core.values`` with the layer as the site; all requests in one batched optimisation).
2. For each l in order, with the updates of the layers below already in place (parameter overrides, never
   written to the model): keys K_l [in, n] (template-averaged, ``core.keys``); current h_L at the subject
   token; residual R = (z - h_L) / (number of layers left); Delta_l = R K^T (lam C_l + K K^T)^-1
   (``core.solvers.least_squares``). With ``key_mode="templates"`` K holds every context template's key of
   every request (weighted 1/sqrt(n_templates), each with its request's residual) instead of their average.

Where the architecture normalises the MLP output before adding it to the residual stream (Gemma 2/3, OLMo 2:
``ArchSpec.mlp_post_norm``), a residual-space target is not what the projections deliver: a normalised output
keeps its size whatever the weights (on Gemma 3 270M the spread residual grew from layer to layer instead of
shrinking, and 10 batched edits reached efficacy 0.2-0.4). There the values are optimised at every layer's MLP
output projection at once (one delta per layer and request, each clamped against its own output), and each
layer's update realises its own delta on top of what the layer outputs after the updates below it (keys
recomputed likewise).
``info["value_sites"]`` says which form ran.

``run_pipeline`` is this loop with the solve as a parameter: AlphaEdit (null-space projection), EMMET
(equality constraints) and PMET (attention + MLP values) reuse it unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from lmedit.config import hp
from lmedit.core.delta import DenseDelta
from lmedit.core.keys import compute_keys, mlp_out_weight, run_sites, template_site
from lmedit.core.patch import EditPatch
from lmedit.core.solvers import least_squares
from lmedit.core.stats import covariances
from lmedit.core.values import optimize_values
from lmedit.errors import ConfigError
from lmedit.methods.rome import LocateEditConfig, check_layers
from lmedit.registry import register_method
from lmedit.request import EditRequest

log = logging.getLogger(__name__)


@dataclass
class MEMITConfig(LocateEditConfig):
    layers: list[int] | None = hp(None, "Decoder layers to spread the update over (default: model preset).")
    mom2_update_weight: float = hp(
        15000.0, "lam: weight of the preserved-key covariance E[k k^T] against the edits' K K^T."
    )
    clamp_norm_factor: float = hp(0.75, "Clamp |delta| to this multiple of the residual norm |h_L|.")
    n_templates: int = hp(
        6,
        "Templates used when context_templates is None: the plain prompt and the first n_templates - 1 prefixes "
        "(as MEMIT's and AlphaEdit's reference code: 1 + 5). On SmolLM2 and Gemma 3 270M, 100-edit batches "
        "scored as well with 6 as with all 11 at about half the cost (BENCHMARKS.md, session 8).",
    )
    plain_key_weight: float | None = hp(
        0.5,
        "key_mode='averaged': the plain prompt's key weighs w and the other templates' mean 1 - w (MEMIT's "
        "reference code: 0.5, the mean over the groups ['{}'] and the prefixes; on SmolLM2 100-edit batches "
        "reliability_tf 0.730 vs 0.657 with None, which weighs every template's key alike).",
    )
    key_mode: Literal["averaged", "templates"] = hp(
        "averaged",
        "averaged: one key per request, the template average (MEMIT); templates: every context template's key "
        "is a column of the least-squares fit with the request's residual (columns weighted 1/n_templates), so "
        "the update reaches the subject under every context, as ROME's key_mode='templates'.",
    )

    def validate(self) -> None:
        super().validate()
        if self.mom2_update_weight < 0:
            raise ConfigError(f"mom2_update_weight must be >= 0, got {self.mom2_update_weight}")
        if self.plain_key_weight is not None and not 0 <= self.plain_key_weight <= 1:
            raise ConfigError(f"plain_key_weight must be in [0, 1] (or None), got {self.plain_key_weight}")
        if self.layers is not None and not self.layers:
            raise ConfigError("layers must not be empty")


#: Layer presets for the bundled models (quick sweep, see docs/locate-then-edit.md).
PRESETS = {
    "gemma3-270m": {"layers": [1, 2, 3], "mom2_update_weight": 2000.0, "clamp_norm_factor": 0.5},
    # lam 2000 (session 13): efficacy 0.960 against 0.650 with 15000 on a 100-edit batch, neighbourhood -0.021
    "smollm2-135m": {"layers": [3, 4, 5, 6, 7], "mom2_update_weight": 2000.0},
}


def default_layers(n_layers: int) -> list[int]:
    """Five consecutive layers ending near 30% of the stack (GPT-J: 3..8 of 28), clipped for small models."""
    last = max(0, min(n_layers - 1, round(n_layers * 0.3)))
    return list(range(max(0, last - 4), last + 1))


#: solve(layer, K [in, n], R [out, n], C [in, in]) -> Delta [out, in]
Solve = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def run_pipeline(
    loaded,
    requests: list[EditRequest],
    config: LocateEditConfig,
    layers: list[int],
    solve: Solve,
    value_sites: list[str] | None = None,
    z_site: str | None = None,
    spread: Literal["linear", "sqrt"] = "linear",
) -> tuple[list[DenseDelta], dict, dict[int, torch.Tensor]]:
    """The MEMIT loop (see module docstring) with a pluggable solve.

    Args:
        layers: ascending layer indices; values are optimised at the last one.
        solve: the per-layer closed form.
        value_sites: modules whose outputs get optimised deltas (default: decoder layer L).
        z_site: module whose output space the targets live in (default: decoder layer L; with a single layer,
            its MLP output projection, where the delta is exactly what the weight must add); must be one of
            ``value_sites``.
        spread: layer i of m takes the remaining residual divided by (m - i) ("linear", MEMIT: the layers share
            it) or by sqrt(m - i) ("sqrt", PMET's square-root spread: the lower layers write more than their
            share).

    Returns:
        (deltas, info, keys) where keys maps each layer to its K [in, n] (float32).
    """
    if spread not in ("linear", "sqrt"):
        raise ValueError(f"spread must be 'linear' or 'sqrt', got {spread!r}")
    t0 = time.perf_counter()
    arch = loaded.arch
    layers = sorted(layers)
    check_layers(loaded, layers, "layers")
    top = layers[-1]
    # a norm on the MLP output makes a top-layer target unreachable from the layers below: one value per layer
    # instead (other value sites, e.g. PMET's attention output, are still optimised jointly but not written)
    mlp_sites = [arch.module_name("mlp_out", layer) for layer in layers]
    per_layer_values = len(layers) > 1 and arch.mlp_post_norm is not None and z_site in (None, mlp_sites[-1])
    if per_layer_values:
        value_sites = mlp_sites + [s for s in value_sites or [] if s not in mlp_sites]
    if z_site is None:
        z_site = arch.module_name("mlp_out" if len(layers) == 1 else "layer", top)
    value_sites = value_sites or [z_site]
    templates = config.templates(loaded)
    cov, prov = covariances(loaded, layers, config.stats_corpus, config.stats_tokens, config.stats_seq_len)
    t_stats = time.perf_counter()
    vals = optimize_values(loaded, requests, value_sites, templates, **config.value_kwargs())
    t_vals = time.perf_counter()
    z = None if per_layer_values else vals.init[z_site] + vals.delta[z_site]  # [n, d]
    plain = [template_site(loaded.tokenizer, r, "{}") for r in requests]
    overrides: dict[str, torch.Tensor] = {}
    deltas: list[DenseDelta] = []
    keys_used: dict[int, torch.Tensor] = {}
    targets: dict[str, torch.Tensor] = {}  # per-layer mode: each projection's wanted output [n, out]
    per_layer = []
    for i, layer in enumerate(layers):
        name, w, layout = mlp_out_weight(loaded, layer)
        param = loaded.model.get_parameter(name)
        keyset = compute_keys(loaded, requests, [layer], templates, overrides=overrides or None)
        k = keyset.averaged(layer, config.plain_key_weight).T  # [in, n]
        if per_layer_values:
            site = mlp_sites[i]
            cur = run_sites(loaded, plain, [site], overrides or None, retain="output")[site]
            targets[site] = cur + vals.delta[site]  # this layer's own delta on what it outputs now
            gap = vals.delta[site]
            r = gap.T  # [out, n]
        else:
            cur = run_sites(loaded, plain, [z_site], overrides or None, retain="output")[z_site]
            gap = z - cur  # [n, d]
            share = len(layers) - i
            r = (gap / (share**0.5 if spread == "sqrt" else share)).T  # [out, n]
        k_fit, r_fit = k, r
        if config.key_mode == "templates":  # every template's key with its request's residual, weight 1/T
            per = keyset.per_template[layer]  # [n, T, in]
            n_t = per.shape[1]
            k_fit = per.reshape(-1, per.shape[-1]).T / n_t**0.5  # [in, n*T]
            r_fit = r.repeat_interleave(n_t, dim=1) / n_t**0.5  # [out, n*T]
        upd = solve(layer, k_fit, r_fit, cov[layer])  # [out, in]
        keys_used[layer] = k_fit
        per_layer.append(
            {
                "layer": layer,
                "residual_before": float(gap.norm(dim=-1).mean()),
                "update_norm": float(upd.norm()),
                "fit": float((upd @ k_fit - r_fit).norm() / r_fit.norm().clamp_min(1e-12)),
            }
        )
        stored = (upd if layout == "out_in" else upd.T).contiguous()
        overrides[name] = (param.float() + stored).to(param.dtype)
        deltas.append(DenseDelta(name, stored.cpu()))
    if per_layer_values:
        after = run_sites(loaded, plain, mlp_sites, overrides, retain="output")
        before = sum(d["residual_before"] for d in per_layer) / len(per_layer)
        residual_after = sum(float((targets[s] - after[s]).norm(dim=-1).mean()) for s in mlp_sites)
        residual_after /= len(mlp_sites)
    else:
        before = per_layer[0]["residual_before"]
        cur = run_sites(loaded, plain, [z_site], overrides, retain="output")[z_site]
        residual_after = float((z - cur).norm(dim=-1).mean())
    extra = [s for s in value_sites if s not in mlp_sites] if per_layer_values else []
    info = {
        "seconds": time.perf_counter() - t0,
        "stats_seconds": t_stats - t0,
        "values_seconds": t_vals - t_stats,
        "solve_seconds": time.perf_counter() - t_vals,
        "value_timing": vals.timing,
        "value_loss": vals.loss,
        "value_steps": vals.steps,
        "value_sites": (
            "per layer (MLP outputs" + "".join(f", {s}" for s in extra) + ")" if per_layer_values else z_site
        ),
        "spread": "per layer" if per_layer_values else spread,
        "residual_before": before,
        "residual_after": residual_after,
        "layers": per_layer,
        "statistics": {str(k): v for k, v in prov.items()},
        "context_templates": templates,
    }
    return deltas, info, keys_used


def resolved_layers(loaded, config) -> list[int]:
    n = loaded.arch.n_layers(loaded.model)
    return sorted(config.layers) if config.layers is not None else default_layers(n)


def pipeline_patch(
    method: str, loaded, requests: list[EditRequest], config, layers: list[int], deltas, info: dict, **kw
) -> EditPatch:
    """The EditPatch of a ``run_pipeline`` result (layers and templates recorded in the config)."""
    return EditPatch(
        method=method,
        config=config.to_dict() | {"layers": layers, "context_templates": info["context_templates"]},
        requests=[r.to_dict() for r in requests],
        deltas=deltas,
        base=EditPatch.base_of(loaded, [d.name for d in deltas]),
        info=info,
        **kw,
    )


@register_method("memit", MEMITConfig, family="locate-then-edit", presets=PRESETS)
def edit_memit(loaded, requests: list[EditRequest], config: MEMITConfig) -> EditPatch:
    """MEMIT: batch edits spread over several layers' MLP output projections by least squares."""
    layers = resolved_layers(loaded, config)

    def solve(layer: int, k: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return least_squares(k, r, c, config.mom2_update_weight, config.damping)

    deltas, info, _ = run_pipeline(loaded, requests, config, layers, solve)
    return pipeline_patch("memit", loaded, requests, config, layers, deltas, info)
