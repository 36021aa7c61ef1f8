"""AlphaEdit (Fang et al. 2025): MEMIT's pipeline with the update projected onto the preserved keys' null space.

Per layer, P projects onto the eigenvectors of C = E[k k^T] with the smallest eigenvalues (directions the
preserved knowledge hardly uses): those below ``nullspace_threshold`` (the paper's rule, relative to the largest
by default) and below ``nullspace_mean_cap`` times the mean eigenvalue, or, with ``nullspace_energy`` set (the
Gemma 3 270M preset), those holding at most that share of the preserved keys' energy tr C.
The update solves

    Delta^T = (P (Kp Kp^T + K K^T) + l2 I)^-1 P K R^T        (``core.solvers.projected_least_squares``)

so Delta lies in the range of P and leaves preserved keys' outputs untouched; Kp are the keys of earlier
sequential edits. That sequential state is an explicit ``AlphaEditState`` carried in each patch
(``patch.extras``, saved with it) and passed to the next edit as ``previous=`` (a state or the previous patch):

    >>> p1 = lmedit.edit(loaded, batch1, method="alphaedit")
    >>> session.apply(p1)
    >>> p2 = lmedit.edit(loaded, batch2, method="alphaedit", previous=p1)   # or AlphaEditState.from_patch(p1)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from lmedit.config import hp
from lmedit.core.patch import EditPatch
from lmedit.core.solvers import null_space_projector, projected_least_squares
from lmedit.errors import ConfigError
from lmedit.methods.memit import PRESETS as MEMIT_PRESETS
from lmedit.methods.memit import MEMITConfig, pipeline_patch, resolved_layers, run_pipeline
from lmedit.registry import register_method
from lmedit.request import EditRequest

_PREFIX = "alphaedit.keys."


@dataclass
class AlphaEditState:
    """Keys of all edits made so far in a sequence, per layer: ``{layer: [d_in, n_edits]}`` (float32)."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)

    def gram(self, layer: int) -> torch.Tensor | None:
        """Kp Kp^T [d_in, d_in] float64 of the earlier edits at ``layer`` (None when there are none)."""
        k = self.keys.get(layer)
        return None if k is None else k.double() @ k.double().T

    def extended(self, new: dict[int, torch.Tensor]) -> AlphaEditState:
        """A new state with ``new`` keys ([d_in, n]) appended per layer (self is unchanged)."""
        out = dict(self.keys)
        for layer, k in new.items():
            k = k.detach().float().cpu()
            out[layer] = torch.cat([out[layer], k], 1) if layer in out else k
        return AlphaEditState(out)

    def to_extras(self) -> dict[str, torch.Tensor]:
        return {f"{_PREFIX}{layer}": k.contiguous() for layer, k in self.keys.items()}

    @classmethod
    def from_patch(cls, patch: EditPatch) -> AlphaEditState:
        """The state after ``patch`` (an AlphaEdit patch, fresh or loaded from disk)."""
        if patch.method != "alphaedit":
            raise ConfigError(f"previous: expected an alphaedit patch, got a {patch.method!r} patch")
        return cls({int(k[len(_PREFIX) :]): v for k, v in patch.extras.items() if k.startswith(_PREFIX)})

    @property
    def n_edits(self) -> int:
        return max((k.shape[1] for k in self.keys.values()), default=0)


@dataclass
class AlphaEditConfig(MEMITConfig):
    nullspace_threshold: float = hp(
        1e-2,
        "With nullspace_energy=None: eigenvalues of E[k k^T] below this fraction of the largest (or below this "
        "value when nullspace_relative=False) span the null space the update is confined to.",
    )
    nullspace_relative: bool = hp(
        True, "Threshold relative to the largest eigenvalue (False: absolute, as the paper's 2e-2)."
    )
    nullspace_mean_cap: float | None = hp(
        1.0,
        "With the threshold rule, an eigenvalue must also be below this multiple of the mean eigenvalue "
        "tr E[k k^T] / d to count as null (None: the paper's rule alone): a direction with above-average variance "
        "is not one the preserved keys hardly use. It matters where a few outlier directions inflate the largest "
        "eigenvalue: on Gemma 3 270M 1e-2 of the largest is 2-4x the mean (null space 26-41 % of the keys' energy "
        "without the cap, 15-24 % with it); on SmolLM2 it is 0.3-0.7x and the cap changes nothing. 0.5 "
        "was measured on both (Gemma 10-15 %, SmolLM2 1.7-15 %; BENCHMARKS.md, session 11).",
    )
    nullspace_energy: float | None = hp(
        None,
        "If set, the null space is the smallest eigen-directions of E[k k^T] holding at most this share of the "
        "preserved keys' energy tr E[k k^T] instead (Gemma 3 270M preset: 0.05). On Gemma 200 sequential "
        "CounterFact edits keep their neighbours within 0.1 only with it (neighbourhood -0.060, efficacy 0.975; "
        "the default threshold rule with its mean cap: -0.126, perplexity 95.9 vs 100.8); on SmolLM2 0.05 halved "
        "reliability (BENCHMARKS.md, sessions 10-11). info['nullspace_key_energy'] reports the share either way: "
        "a large share means weak protection.",
    )
    l2: float = hp(10.0, "Ridge l2 on the projected update (AlphaEdit's L2).")
    previous: Any = hp(
        None,
        "Sequential state: an AlphaEditState or the previous alphaedit EditPatch (None: first edit).",
    )

    def validate(self) -> None:
        super().validate()
        if self.nullspace_threshold <= 0 or self.l2 < 0:
            raise ConfigError("nullspace_threshold must be > 0 and l2 >= 0")
        if self.nullspace_mean_cap is not None and not self.nullspace_mean_cap > 0:
            raise ConfigError(f"nullspace_mean_cap must be > 0 (or None), got {self.nullspace_mean_cap}")
        if self.nullspace_energy is not None and not 0 < self.nullspace_energy < 1:
            raise ConfigError(f"nullspace_energy must be in (0, 1) (or None), got {self.nullspace_energy}")
        if self.previous is not None and not isinstance(self.previous, (AlphaEditState, EditPatch)):
            raise ConfigError(
                f"previous must be an AlphaEditState or an alphaedit EditPatch, got {type(self.previous).__name__}"
            )

    def to_dict(self) -> dict:
        prev = self.previous
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "previous"}
        state = AlphaEditState.from_patch(prev) if isinstance(prev, EditPatch) else prev
        d["previous"] = None if state is None else f"AlphaEditState({state.n_edits} earlier edits)"
        return d


#: MEMIT's, plus the energy rule on Gemma 3 270M: the default rule's null space (15-24 % of the keys' energy there)
#: lets 200 sequential CounterFact edits move the neighbours by 0.126, 5 % by 0.060 (BENCHMARKS.md, session 11).
PRESETS = MEMIT_PRESETS | {"gemma3-270m": MEMIT_PRESETS["gemma3-270m"] | {"nullspace_energy": 0.05}}


@register_method("alphaedit", AlphaEditConfig, family="locate-then-edit", presets=PRESETS)
def edit_alphaedit(loaded, requests: list[EditRequest], config: AlphaEditConfig) -> EditPatch:
    """AlphaEdit: MEMIT with the update projected onto the null space of preserved keys (sequential-safe)."""
    layers = resolved_layers(loaded, config)
    prev = config.previous
    state = AlphaEditState.from_patch(prev) if isinstance(prev, EditPatch) else (prev or AlphaEditState())
    ranks: dict[str, int] = {}
    reach: dict[str, float] = {}

    def solve(layer: int, k: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        p, reach[str(layer)] = null_space_projector(
            c,
            config.nullspace_threshold,
            config.nullspace_relative,
            config.nullspace_energy,
            config.nullspace_mean_cap,
        )  # [in, in]
        rank = int(round(float(p.trace())))
        ranks[str(layer)] = rank
        if rank == 0:
            if config.nullspace_energy is not None:
                rule, fix = f"nullspace_energy={config.nullspace_energy}", "raise it"
            else:
                rule = (
                    f"nullspace_threshold={config.nullspace_threshold}, "
                    f"nullspace_mean_cap={config.nullspace_mean_cap}"
                )
                fix = "raise nullspace_threshold or nullspace_mean_cap (None: no cap)"
            ev = torch.linalg.eigvalsh(c.double()).clamp_min(0)
            raise ConfigError(
                f"layer {layer}: the null space of E[k k^T] under {rule} is empty (nothing can be edited); "
                f"{fix} - the smallest eigenvalue alone is {float(ev[0] / ev.sum()):.2e} of the trace, "
                f"{float(ev[0] / ev.mean()):.2e} of the mean and {float(ev[0] / ev[-1]):.2e} of the largest"
            )
        gram = state.gram(layer)
        return projected_least_squares(k, r, p, None if gram is None else gram.to(k.device), config.l2)

    deltas, info, keys = run_pipeline(loaded, requests, config, layers, solve)
    new_state = state.extended(keys)
    info["nullspace_rank"] = ranks
    info["nullspace_key_energy"] = reach
    info["sequential_edits_before"] = state.n_edits
    return pipeline_patch(
        "alphaedit", loaded, requests, config, layers, deltas, info, extras=new_state.to_extras()
    )
