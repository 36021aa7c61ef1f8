"""PMET (Li et al. 2024): optimise attention and MLP values together, update only the MLP weights.

The value optimisation adds one delta to the attention output projection's output and one to the MLP output
projection's output of the top layer L at the subject's last token (``core.values`` with two sites), so the
target is reached jointly; only the MLP part becomes the weight update's target (the attention part is the share
of the change the paper attributes to attention and is not written). The MLP target m_L = v_L + delta is spread
over ``layers`` by MEMIT's least squares with the paper's square-root spread: layer i of m takes
(m_L - current MLP output of layer L) / sqrt(m - i), the current output measured by a forward pass with the
updates below in place, as PMET's reference code. The lower layers' MLP changes add to the residual stream, not
to layer L's MLP output, so the MLP change written in all is larger than delta (sum of 1/sqrt(m - i) times it
for small fits: 3.2x over 5 layers), which makes up for the attention share that is not written.

Where the MLP output is normalised before the residual (``ArchSpec.mlp_post_norm``: Gemma 2/3, OLMo 2) a layer-L
MLP-output target means nothing to the layers below, so, as MEMIT there, each layer's MLP output gets its own
delta, optimised jointly with layer L's attention delta, and each layer's update realises its own delta
(``info["value_sites"]`` says which form ran).
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


#: MEMIT's layers, except on Gemma 3 270M: one layer (1) with clamp 2 reached efficacy 0.94, neighbourhood 0.967
#: (unedited 1.000) on a 100-edit batch. The per-layer form over MEMIT's layers 1-3 scores alike on 20 edits
#: (clamp 0.5: efficacy 0.95, paraphrase 0.90, neighbourhood 0.775; layer 1, clamp 2: 0.95 / 0.825 / 0.838;
#: per-layer with clamp 2: 1.00 / 1.00 / 0.45) (BENCHMARKS.md, sessions 9-10).
PRESETS = MEMIT_PRESETS | {
    "gemma3-270m": {"layers": [1], "mom2_update_weight": 2000.0, "clamp_norm_factor": 2.0},
    "smollm2-135m": {"layers": [3, 4, 5, 6, 7]},  # measured with lam 15000 (sessions 9-10), not MEMIT's 2000
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
        loaded, requests, config, layers, solve, value_sites=[attn, mlp], z_site=mlp, spread="sqrt"
    )
    return pipeline_patch("pmet", loaded, requests, config, layers, deltas, info)
