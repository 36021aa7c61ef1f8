"""Weight deltas and their symmetric apply/revert.

A delta names one parameter (``"model.layers.6.mlp.down_proj.weight"``) and says how it changes, in the
parameter's own storage layout:

* ``DenseDelta``: the full difference tensor.
* ``LowRankDelta``: ``left @ right.T`` (a rank-r update stored as two thin matrices).

``apply_deltas`` adds them in float32 (the parameter is cast back to its dtype) and returns an
``AppliedDeltas`` handle that keeps the original tensors, so ``revert()`` is bit-exact in any dtype.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lmedit.errors import EditFailedError, PatchError


def fingerprint(tensor: torch.Tensor) -> str:
    """sha256 over dtype, shape and raw bytes of a tensor (16 hex digits)."""
    t = tensor.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@dataclass
class DenseDelta:
    """``param += delta`` with ``delta`` of the parameter's shape."""

    name: str
    delta: torch.Tensor

    kind = "dense"

    def materialize(self) -> torch.Tensor:
        return self.delta.float()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"delta": self.delta}


@dataclass
class LowRankDelta:
    """``param += left @ right.T``; left [rows, r], right [cols, r] in the parameter's storage layout."""

    name: str
    left: torch.Tensor
    right: torch.Tensor

    kind = "lowrank"

    def materialize(self) -> torch.Tensor:
        return self.left.float() @ self.right.float().T

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"left": self.left, "right": self.right}

    @classmethod
    def from_out_in(cls, name: str, u: torch.Tensor, v: torch.Tensor, layout: str) -> LowRankDelta:
        """A delta ``u @ v.T`` given in [out, in] orientation (u [out, r], v [in, r]), stored for ``layout``."""
        return cls(name, u, v) if layout == "out_in" else cls(name, v, u)


Delta = DenseDelta | LowRankDelta
DELTA_KINDS = {"dense": DenseDelta, "lowrank": LowRankDelta}


def delta_from_tensors(kind: str, name: str, tensors: dict[str, torch.Tensor]) -> Delta:
    if kind == "dense":
        return DenseDelta(name, tensors["delta"])
    if kind == "lowrank":
        return LowRankDelta(name, tensors["left"], tensors["right"])
    raise PatchError(f"unknown delta kind {kind!r}; known: {sorted(DELTA_KINDS)}")


def get_parameter(model: nn.Module, name: str) -> nn.Parameter:
    try:
        return model.get_parameter(name)
    except AttributeError:
        raise PatchError(
            f"the model has no parameter {name!r}: this patch was made for another architecture"
        ) from None


class AppliedDeltas:
    """Handle returned by ``apply_deltas``: keeps the original tensors; ``revert()`` restores them bit for bit."""

    def __init__(self, model: nn.Module, originals: dict[str, torch.Tensor]):
        self.model = model
        self.originals = originals
        self.active = True

    def revert(self) -> None:
        if not self.active:
            return
        with torch.no_grad():
            for name, original in self.originals.items():
                get_parameter(self.model, name).data.copy_(original)
        self.active = False


def apply_deltas(model: nn.Module, deltas: Sequence[Delta], check_finite: bool = True) -> AppliedDeltas:
    """Add ``deltas`` to ``model``'s parameters; transactional (any failure restores every touched tensor)."""
    originals: dict[str, torch.Tensor] = {}
    handle = AppliedDeltas(model, originals)
    try:
        with torch.no_grad():
            for d in deltas:
                param = get_parameter(model, d.name)
                update = d.materialize().to(param.device)
                if update.shape != param.shape:
                    raise PatchError(
                        f"delta for {d.name} has shape {tuple(update.shape)} but the parameter is {tuple(param.shape)}"
                    )
                if d.name not in originals:
                    originals[d.name] = param.detach().clone()
                new = param.float() + update
                if check_finite and not torch.isfinite(new).all():
                    raise EditFailedError(
                        f"applying the delta to {d.name} gives non-finite values; model restored"
                    )
                param.copy_(new.to(param.dtype))
    except BaseException:
        handle.revert()
        raise
    return handle
