"""EMMET (Gupta et al. 2024): batch editing with equality constraints, ROME's objective for many facts.

    min_Delta  tr(Delta C Delta^T)   subject to   (W + Delta) K = W K + R
    =>  Delta = R (K^T C^-1 K)^-1 K^T C^-1                      (``core.solvers.equality_constrained``)

Every edit's key is mapped exactly onto its new value (ROME's guarantee, batched), while preserved keys move as
little as possible under C. A small ``gram_damping`` keeps near-duplicate keys (same subject twice) solvable.
By default EMMET edits one layer (ROME's preset) with targets in that layer's MLP-output space; given several
``layers`` it spreads the residual over them with MEMIT's pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmedit.config import hp
from lmedit.core.patch import EditPatch
from lmedit.core.solvers import equality_constrained
from lmedit.errors import ConfigError
from lmedit.methods.memit import MEMITConfig, pipeline_patch, run_pipeline
from lmedit.methods.rome import PRESETS as ROME_PRESETS
from lmedit.methods.rome import default_layer
from lmedit.registry import register_method
from lmedit.request import EditRequest


@dataclass
class EMMETConfig(MEMITConfig):
    layers: list[int] | None = hp(None, "Layers to edit (default: ROME's single-layer preset).")
    gram_damping: float = hp(1e-4, "Relative ridge on K^T C^-1 K (0: exact equality constraints).")
    clamp_norm_factor: float = hp(4.0, "Clamp |delta| to this multiple of the original value's norm |v0|.")

    def validate(self) -> None:
        super().validate()
        if self.gram_damping < 0:
            raise ConfigError(f"gram_damping must be >= 0, got {self.gram_damping}")
        if self.key_mode != "averaged":
            raise ConfigError(
                "key_mode='templates' is not for EMMET (near-collinear equality constraints); use 'averaged'"
            )


PRESETS = {
    name: {"layers": [p["layer"]]} | {k: v for k, v in p.items() if k != "layer"}
    for name, p in ROME_PRESETS.items()
}


@register_method("emmet", EMMETConfig, family="locate-then-edit", presets=PRESETS)
def edit_emmet(loaded, requests: list[EditRequest], config: EMMETConfig) -> EditPatch:
    """EMMET: batched equality-constrained (ROME-style) editing."""
    n = loaded.arch.n_layers(loaded.model)
    layers = sorted(config.layers) if config.layers is not None else [default_layer(n)]

    def solve(layer: int, k: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return equality_constrained(k, r, c, config.damping, config.gram_damping)

    deltas, info, _ = run_pipeline(loaded, requests, config, layers, solve)
    return pipeline_patch("emmet", loaded, requests, config, layers, deltas, info)
