"""PMET (Li et al. 2024): optimise attention and MLP values together, update only the MLP weights.

The value optimisation adds one delta to the attention output projection's output and one to the MLP output
projection's output of the top layer L at the subject's last token (``core.values`` with two sites), so the
target is reached jointly; only the MLP part becomes the weight update's target (the attention part is the share
of the change the paper attributes to attention and is not written). The MLP target is spread over ``layers``
with MEMIT's least squares, progress counted by the updates' own outputs (the targets live in MLP-output space).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmedit.config import hp
from lmedit.core.patch import EditPatch
from lmedit.core.solvers import least_squares
from lmedit.errors import ConfigError
from lmedit.methods.memit import PRESETS as MEMIT_PRESETS
from lmedit.methods.memit import MEMITConfig, pipeline_patch, resolved_layers, run_pipeline
from lmedit.registry import register_method
from lmedit.request import EditRequest


@dataclass
class PMETConfig(MEMITConfig):
    clamp_norm_factor: float = hp(
        4.0, "Clamp each site's |delta| to this multiple of its original output's norm."
    )

    def validate(self) -> None:
        super().validate()
        if self.key_mode != "averaged":
            raise ConfigError(
                "key_mode='templates' is not for PMET (its targets are per request); use 'averaged'"
            )


#: MEMIT's, except on Gemma 3 270M: its MLP output is normalised before the residual (``mlp_post_norm``), so an
#: MLP-output target of the top layer cannot be spread over the layers below it (per-layer fit 0.47-0.52 with
#: layers 1-3, efficacy 0.30 on a 100-edit batch); one layer with clamp 2 gives efficacy 0.94, paraphrase 0.845,
#: neighbourhood 0.967 (unedited 1.000) on the same batch (BENCHMARKS.md, session 9).
PRESETS = MEMIT_PRESETS | {
    "gemma3-270m": {"layers": [1], "mom2_update_weight": 2000.0, "clamp_norm_factor": 2.0},
}


@register_method("pmet", PMETConfig, family="locate-then-edit", presets=PRESETS)
def edit_pmet(loaded, requests: list[EditRequest], config: PMETConfig) -> EditPatch:
    """PMET: joint attention + MLP value optimisation, MLP-only least-squares update over layers."""
    layers = resolved_layers(loaded, config)
    top = layers[-1]
    attn = loaded.arch.module_name("attn_out", top)
    mlp = loaded.arch.module_name("mlp_out", top)

    def solve(layer: int, k: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return least_squares(k, r, c, config.mom2_update_weight, config.damping)

    deltas, info, _ = run_pipeline(
        loaded, requests, config, layers, solve, value_sites=[attn, mlp], z_site=mlp, realised=True
    )
    return pipeline_patch("pmet", loaded, requests, config, layers, deltas, info)
