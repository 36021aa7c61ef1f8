"""Adapters: edits that keep the base weights, as wrapper modules around one submodule.

An adapter is installed by replacing a submodule (``model.layers.9.mlp.down_proj``) with a wrapper that holds the
original module as ``base_layer`` plus its own state, and removed by putting the original module object back, so
undo is exact: the very same base module object is restored and no base tensor was ever written.

    >>> spec = AdapterSpec("grace", "model.layers.9.mlp.down_proj", config={...}, tensors={"keys": k, ...})
    >>> handle = install_adapters(model, [spec])     # the submodule is now a GraceCodebook wrapper
    >>> handle.revert()                               # the original module object is back

An ``AdapterSpec`` is plain data (kind, module name, JSON config, tensors); ``EditPatch`` carries a list of them
next to its weight deltas, saves their tensors into ``patch.safetensors`` and installs them in ``apply()``.

Lifelong editing: a spec may *replace* an installed adapter of the same kind (a GRACE patch that extends the
codebook of the previous one). It names the adapter it replaces by that adapter's spec fingerprint in
``spec.parent``; installing it anywhere else is refused, so an edit computed on another edit history cannot
silently drop edits. ``None`` means "install on a module that has no adapter of this kind".

Wrapper tensors are registered as non-persistent buffers cast to the base layer's device and floating dtype, so
they follow ``model.to(...)``; the spec keeps the exact tensors the patch was made with.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lmedit.core.delta import fingerprint
from lmedit.errors import PatchError

log = logging.getLogger(__name__)


@dataclass
class AdapterSpec:
    """One adapter, as data.

    Attributes:
        kind: adapter kind, a key of ``ADAPTER_KINDS`` (``"grace"``).
        module: canonical dotted name of the wrapped submodule (as in the bare base model).
        config: JSON-able settings of the adapter (e.g. GRACE's labels).
        tensors: the adapter's state tensors, by name (saved under ``adapter.<i>.<name>``).
        parent: spec fingerprint of the same-kind adapter this one replaces, or None (see module docstring).
    """

    kind: str
    module: str
    config: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    parent: str | None = None

    def fingerprint(self) -> str:
        """sha256 over kind, module, config, parent and every tensor's fingerprint (16 hex digits)."""
        h = hashlib.sha256()
        head = {"kind": self.kind, "module": self.module, "config": self.config, "parent": self.parent}
        h.update(json.dumps(head, sort_keys=True).encode())
        for name in sorted(self.tensors):
            h.update(f"|{name}:{fingerprint(self.tensors[name])}".encode())
        return h.hexdigest()[:16]

    def to_json(self) -> dict:
        """The JSON part (tensors are saved separately)."""
        return {
            "kind": self.kind,
            "module": self.module,
            "config": self.config,
            "parent": self.parent,
            "tensors": sorted(self.tensors),
        }


#: [rows, width, width] bool while a forward pass packs several sequences into each row: True where a position
#: (dim 1) sees a position (dim 2) of its own sequence (``sequence_mask``); None: each row is one sequence.
_SEQUENCE_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "lmedit_sequence_mask", default=None
)


@contextlib.contextmanager
def sequence_mask(visible: torch.Tensor) -> Iterator[None]:
    """Tell sequence-stateful adapters (``AdapterWrapper.sequence_state``) which positions of a row belong to
    each position's own sequence, for a forward pass that packs several sequences into one row.

    Args:
        visible: [rows, width, width] bool, True where the position of dim 1 may look at the one of dim 2 (its own
            sequence, itself and earlier: the packed pass's attention mask).
    """
    token = _SEQUENCE_MASK.set(visible)
    try:
        yield
    finally:
        _SEQUENCE_MASK.reset(token)


class AdapterWrapper(nn.Module):
    """Base class of wrapper modules: ``forward(x, ...) = adapt(x, base_layer(x, ...))``.

    Subclasses set ``kind`` and implement ``adapt``; they are registered with ``@register_adapter``.
    ``sequence_state`` is True for a wrapper whose output at a position depends on other positions of its
    sequence (WISE's running maximum): a pass that packs sequences must run under ``sequence_mask``, and no
    pass may feed it a subset of a sequence's positions as if they were a sequence.
    """

    kind: ClassVar[str] = ""
    sequence_state: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Module, spec: AdapterSpec, previous: AdapterWrapper | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.spec = spec
        self.spec_fingerprint = spec.fingerprint()
        ref = next(base_layer.parameters(), None)
        device = ref.device if ref is not None else torch.device("cpu")
        dtype = ref.dtype if ref is not None else torch.float32
        cast = {
            name: t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
            for name, t in spec.tensors.items()
        }
        for name, t in self.build_buffers(cast, previous).items():
            self.register_buffer(name, t, persistent=False)

    def build_buffers(self, tensors: dict[str, torch.Tensor], previous: AdapterWrapper | None) -> dict:
        """The wrapper's buffers from the spec's tensors (already on the base layer's device/dtype) and the
        same-kind adapter this one replaces (None if none). Default: the spec's tensors as they are."""
        return tensors

    def extend_rows(
        self, previous: AdapterWrapper | None, new: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``new`` rows appended after the replaced adapter's buffers of the same names (after nothing without
        one), in the chain's shared growing storage (``_RowStore``, kept in ``self._stores``); returns the views."""
        stores = getattr(previous, "_stores", {}) if previous is not None else {}
        mine = self.__dict__.setdefault("_stores", {})
        for name, rows in new.items():
            old = getattr(previous, name) if previous is not None else rows[:0]
            mine[name] = _RowStore.extend(stores.get(name), old, rows)
        return {name: mine[name].view() for name in new}

    def release(self) -> None:
        """Called when this wrapper is taken out and the module it replaced goes back (default: nothing).

        A wrapper that updated the replaced adapter's buffers in place (to avoid a copy) restores them here.
        """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.adapt(x, self.base_layer(x, *args, **kwargs))

    def adapt(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The wrapped output given the module input ``x`` and the base output ``out``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, spec={self.spec_fingerprint}"


ADAPTER_KINDS: dict[str, type[AdapterWrapper]] = {}


def register_adapter(cls: type[AdapterWrapper]) -> type[AdapterWrapper]:
    """Class decorator adding a wrapper class to ``ADAPTER_KINDS`` under its ``kind``."""
    ADAPTER_KINDS[cls.kind] = cls
    return cls


class _RowStore:
    """Append-only rows with spare capacity, so a chain of adapters that each add a few rows shares one storage.

    Wrapper ``i`` of a chain holds the view ``data[:n_i]``; appending after the last row writes in place (earlier
    views are unaffected), appending after any other row (a branch, e.g. after an undo) copies.
    """

    def __init__(self, rows: torch.Tensor):
        n = rows.shape[0]
        self.data = rows.new_empty((max(16, 2 * n), *rows.shape[1:]))
        self.data[:n] = rows
        self.used = n

    def view(self) -> torch.Tensor:
        return self.data[: self.used]

    @staticmethod
    def extend(store: _RowStore | None, old: torch.Tensor, rows: torch.Tensor) -> _RowStore:
        """A store whose first rows are ``old`` (a view previously returned) followed by ``rows``."""
        n, m = old.shape[0], rows.shape[0]
        shares = (
            store is not None
            and store.used == n
            and store.data.dtype == rows.dtype
            and store.data.device == rows.device
            and (n == 0 or old.data_ptr() == store.data.data_ptr())
        )
        if not shares:
            return _RowStore(torch.cat([old.to(rows), rows]))
        if n + m > store.data.shape[0]:
            return _RowStore(torch.cat([old, rows]))
        store.data[n : n + m] = rows
        store.used = n + m
        return store


# ----------------------------------------------------------------------------------------------------- GRACE
def codebook_forward(
    x: torch.Tensor, out: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, epsilons: torch.Tensor
) -> torch.Tensor:
    """GRACE's deferral: where the nearest key lies within its radius, the output becomes that key's value.

    Args:
        x: module input [..., d_in] (the query at every position).
        out: base module output [..., d_out].
        keys: [n, d_in]; values: [n, d_out]; epsilons: [n] deferral radii (L2 distance).

    Returns:
        [..., d_out]: ``values[i]`` at positions whose nearest key ``i`` has distance <= ``epsilons[i]``, else
        ``out``. Differentiable in ``values``.
    """
    if keys.shape[0] == 0:
        return out
    flat_x = x.reshape(-1, x.shape[-1]).float()  # [N, d_in]
    flat_out = out.reshape(-1, out.shape[-1])  # [N, d_out]
    dist = torch.cdist(flat_x, keys.float().to(flat_x.device))  # [N, n]
    d, idx = dist.min(dim=-1)  # [N], [N]
    hit = d <= epsilons.float().to(d.device)[idx]  # [N]
    chosen = values.to(device=flat_out.device, dtype=flat_out.dtype)[idx]  # [N, d_out]
    return torch.where(hit[:, None], chosen, flat_out).reshape(out.shape)


@register_adapter
class GraceCodebook(AdapterWrapper):
    """GRACE codebook (Hartvigsen et al. 2023) around one module.

    Buffers: ``keys`` [n, d_in], ``values`` [n, d_out], ``epsilons`` [n]; ``spec.config["labels"]`` holds the
    target string of each entry (used by the expand/split rules when the codebook is extended).

    The spec stores the codebook incrementally: ``keys``/``values`` hold only the rows this patch adds after
    those of the adapter it replaces (``parent``), ``epsilons`` the radii of all n entries (the expand/split rules
    change earlier radii; keys and values of earlier entries never change). So a chain of N single-edit patches
    stores O(N) key/value rows in total, and the wrappers of one chain share one growing storage.
    """

    kind = "grace"

    def build_buffers(self, tensors: dict[str, torch.Tensor], previous: AdapterWrapper | None) -> dict:
        rows = self.extend_rows(previous, {"keys": tensors["keys"], "values": tensors["values"]})
        keys, values, eps = rows["keys"], rows["values"], tensors["epsilons"]
        if not keys.shape[0] == values.shape[0] == eps.shape[0] == len(self.spec.config.get("labels", [])):
            raise PatchError(
                f"GRACE adapter at {self.spec.module}: {keys.shape[0]} keys, {values.shape[0]} values, "
                f"{eps.shape[0]} radii and {len(self.spec.config.get('labels', []))} labels after extending "
                f"{previous.spec_fingerprint if previous is not None else 'nothing'}; the patch is corrupt"
            )
        return {"keys": keys, "values": values, "epsilons": eps}

    def adapt(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return codebook_forward(x, out, self.keys, self.values, self.epsilons)


# ------------------------------------------------------------------------------------------------------ WISE
def side_memory_forward(
    x: torch.Tensor,
    out: torch.Tensor,
    delta: torch.Tensor,
    epsilon: float,
    visible: torch.Tensor | None = None,
) -> torch.Tensor:
    """WISE's routing between the main memory (the base output) and the side memory ``W_v' = W_v + delta``.

    The activation of the side memory at a position is ``act = ||A(x) @ (W_v' - W_v)||_2 = ||x @ delta||_2``. A
    position uses the side memory when the largest ``act`` over its sequence so far (itself included) exceeds
    ``epsilon``, else the main memory: so the position that predicts the first target token is routed by the
    maximum over the whole prompt, and routing never looks at later positions (padding on the right included).

    Args:
        x: module input ``A(x)`` [..., pos, d_in].
        out: base module output ``W_v A(x)`` (+ bias) [..., pos, d_out].
        delta: [d_in, d_out] side-memory change ``(W_v' - W_v)`` in input-major layout.
        epsilon: routing threshold.
        visible: [..., pos, pos] bool when a row packs several sequences (``sequence_mask``): the maximum at a
            position is then taken over the positions it sees (its own sequence up to itself), not over the row.

    Returns:
        [..., pos, d_out]: ``out + x @ delta`` at routed positions, ``out`` bit for bit elsewhere.
    """
    side = x @ delta.to(device=x.device, dtype=x.dtype)  # [..., pos, d_out]
    act = torch.linalg.vector_norm(side.float(), dim=-1)  # [..., pos]
    if visible is None:
        top = act.cummax(dim=-1).values  # [..., pos]
    else:
        if tuple(visible.shape) != (*act.shape, act.shape[-1]):
            raise PatchError(
                f"WISE side memory: the packed pass's sequence mask {tuple(visible.shape)} does not match the "
                f"projection's input {tuple(x.shape)}"
            )
        top = act[..., None, :].masked_fill(~visible.to(act.device), float("-inf")).amax(-1)  # [..., pos]
    routed = top > epsilon  # [..., pos]
    return torch.where(routed[..., None], out + side.to(out.dtype), out)


def wise_side_delta(base: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``base`` [d_in, d_out] with ``rows`` [r, d_out] added at rows ``index`` [r] (a new tensor, dtype of base).

    The one place where a WISE side memory is assembled, used by the wrapper and by the method (so the threshold
    the method computes sees exactly the side memory the wrapper will hold).
    """
    out = base.clone()
    out.index_add_(0, index.to(out.device), rows.to(device=out.device, dtype=out.dtype))
    return out


@register_adapter
class WiseSideMemory(AdapterWrapper):
    """WISE side memory (Wang et al. 2024) around one projection (``lmedit.methods.wise``).

    Buffer: ``delta`` [d_in, d_out], the whole side memory's difference to the wrapped projection's weight, in
    input-major layout whatever the projection's storage layout (so Linear and GPT-2 Conv1D are handled alike).
    ``spec.config`` holds ``d_in``, ``d_out`` and the routing threshold ``epsilon``.

    The spec stores the side memory incrementally: ``index`` [r] (long) names the rows (input features, i.e. the
    MLP's neurons) this patch changed and ``rows`` [r, d_out] what it added to them; the side memory is the
    parent adapter's ``delta`` (zero without a parent) plus those rows. A wrapper that extends a parent updates
    the parent's ``delta`` in place and keeps only the overwritten rows, which ``release()`` writes back when it
    is taken out, so undo is bit-exact and a chain of N patches holds one dense side memory.

    Optional ``keys`` [n, d_in]: the patch's edit keys (each edit prompt's input at its most active token), which
    later patches keep routed, and ``contrast_keys`` [m, d_in]: its contrast prompts' inputs at their most active
    token, which later patches keep on the main memory; the buffers of the same names hold the whole chain's,
    each in one shared growing storage.
    """

    kind = "wise"
    sequence_state = True

    def build_buffers(self, tensors: dict[str, torch.Tensor], previous: AdapterWrapper | None) -> dict:
        cfg = self.spec.config
        index, rows = tensors["index"], tensors["rows"]
        d_in, d_out = int(cfg.get("d_in", 0)), int(cfg.get("d_out", 0))
        base = previous.delta if previous is not None else rows.new_zeros(d_in, d_out)
        if not (
            "epsilon" in cfg
            and tuple(base.shape) == (d_in, d_out)
            and index.dim() == 1
            and tuple(rows.shape) == (index.shape[0], d_out)
            and (index.numel() == 0 or 0 <= int(index.min()) <= int(index.max()) < d_in)
        ):
            raise PatchError(
                f"WISE adapter at {self.spec.module}: side memory {tuple(base.shape)} (config {d_in} x {d_out}), "
                f"row indices {tuple(index.shape)}, rows {tuple(rows.shape)} after extending "
                f"{previous.spec_fingerprint if previous is not None else 'nothing'}; the patch is corrupt"
            )
        new_keys = {name: tensors.get(name, rows.new_zeros(0, d_in)) for name in ("keys", "contrast_keys")}
        for name, k in new_keys.items():
            old = getattr(previous, name) if previous is not None else k[:0]
            if k.dim() != 2 or k.shape[1] != d_in or old.shape[1] != d_in:
                raise PatchError(
                    f"WISE adapter at {self.spec.module}: {name} {tuple(k.shape)} after "
                    f"{tuple(old.shape)}, expected [n, {d_in}]; the patch is corrupt"
                )
        keys = self.extend_rows(previous, new_keys)
        if previous is None:
            return {"delta": wise_side_delta(base, index, rows), **keys}
        # extend the replaced adapter's side memory in place: keep only the rows this patch overwrites, so a
        # chain of N patches holds one side memory plus N patches' rows, not N copies (restored in release())
        idx = index.to(base.device)
        self._saved = (previous.delta, idx, previous.delta[idx].clone())
        base.index_add_(0, idx, rows.to(device=base.device, dtype=base.dtype))
        return {"delta": base, **keys}

    def release(self) -> None:
        saved = getattr(self, "_saved", None)
        if saved is not None:
            delta, idx, old = saved
            delta[idx] = old  # bit-exact: the saved values are written back, not subtracted
            self._saved = None

    def adapt(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return side_memory_forward(
            x, out, self.delta, float(self.spec.config["epsilon"]), _SEQUENCE_MASK.get()
        )


# ------------------------------------------------------------------------------------------------- T-Patcher
def patch_neurons_forward(
    x: torch.Tensor, out: torch.Tensor, keys: torch.Tensor, biases: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """T-Patcher's extra FFN neurons: ``out + relu(x @ keys.T + biases) @ values``.

    Args:
        x: the MLP's input hidden state [..., d_model].
        out: the MLP's output [..., d_model].
        keys: [n, d_model]; biases: [n]; values: [n, d_model] (one row per patch neuron).

    Returns:
        [..., d_model]. A neuron whose pre-activation is <= 0 adds exactly nothing (ReLU), so positions where no
        patch neuron fires keep the base output bit for bit.
    """
    if keys.shape[0] == 0:
        return out
    pre = x @ keys.to(x).T + biases.to(x)  # [..., n]
    act = torch.relu(pre)  # [..., n]
    return out + (act @ values.to(x)).to(out.dtype)  # rows where every act is 0 add exactly 0


@register_adapter
class TPatcherNeurons(AdapterWrapper):
    """T-Patcher patch neurons (Huang et al. 2023) around one whole MLP module (``lmedit.methods.tpatcher``).

    Buffers: ``keys`` [n, d_model], ``biases`` [n], ``values`` [n, d_model]; the MLP's output gains
    ``relu(x . key_i + bias_i) * value_i`` for every neuron, ``x`` being the MLP's input. The spec holds only
    the neurons this patch adds after those of its parent; a chain's wrappers share one growing storage.
    ``prompt_inputs`` [t, d_model] holds the MLP inputs at every token of the chain's edit prompts (the next
    edit's memory set, so it need not re-encode them); None when a patch of the chain predates it.
    """

    kind = "tpatcher"

    def build_buffers(self, tensors: dict[str, torch.Tensor], previous: AdapterWrapper | None) -> dict:
        rows = self.extend_rows(previous, {n: tensors[n] for n in ("keys", "biases", "values")})
        keys, biases, values = rows["keys"], rows["biases"], rows["values"]
        if not (
            keys.shape[0] == biases.shape[0] == values.shape[0]
            and biases.dim() == 1
            and keys.shape[1:] == values.shape[1:]
        ):
            raise PatchError(
                f"T-Patcher adapter at {self.spec.module}: keys {tuple(keys.shape)}, biases "
                f"{tuple(biases.shape)}, values {tuple(values.shape)} after extending "
                f"{previous.spec_fingerprint if previous is not None else 'nothing'}; the patch is corrupt"
            )
        inputs = tensors.get("prompt_inputs")
        if inputs is not None and not (inputs.dim() == 2 and inputs.shape[1] == keys.shape[1]):
            raise PatchError(
                f"T-Patcher adapter at {self.spec.module}: prompt_inputs {tuple(inputs.shape)} do not match keys "
                f"{tuple(keys.shape)}; the patch is corrupt"
            )
        if inputs is not None and (previous is None or previous.prompt_inputs is not None):
            inputs = self.extend_rows(previous, {"prompt_inputs": inputs})["prompt_inputs"]
        else:  # a patch of the chain predates prompt_inputs
            inputs = None
        return {"keys": keys, "biases": biases, "values": values, "prompt_inputs": inputs}

    def adapt(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise PatchError(f"T-Patcher wraps {self.spec.module}, whose output is not a tensor")
        return patch_neurons_forward(x, out, self.keys, self.biases, self.values)


# ------------------------------------------------------------------------------------------ install / remove
def unwrap(module: nn.Module) -> nn.Module:
    """The innermost base module under any stack of adapter wrappers."""
    while isinstance(module, AdapterWrapper):
        module = module.base_layer
    return module


def resolve_name(model: nn.Module, name: str) -> str:
    """Translate a canonical dotted name (module or parameter) to its current path through installed wrappers.

    ``model.layers.2.mlp.down_proj.weight`` becomes ``model.layers.2.mlp.down_proj.base_layer.weight`` while a
    wrapper sits at ``down_proj``. Names that do not resolve are returned unchanged (the caller's lookup raises).
    """
    parts = name.split(".")
    mod: nn.Module = model
    out: list[str] = []
    for i, part in enumerate(parts):
        child = mod._modules.get(part)
        if child is None:
            return ".".join(out + parts[i:])
        out.append(part)
        mod = child
        if i < len(parts) - 1:
            while isinstance(mod, AdapterWrapper):
                mod = mod.base_layer
                out.append("base_layer")
    return ".".join(out)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding canonical submodule ``name`` (resolved through wrappers above it) and its attribute."""
    path = resolve_name(model, name)
    head, _, attr = path.rpartition(".")
    try:
        parent = model.get_submodule(head) if head else model
    except AttributeError:
        parent = None
    if parent is None or attr not in parent._modules:
        raise PatchError(f"the model has no submodule {name!r}: this patch was made for another architecture")
    return parent, attr


def installed_adapter(model: nn.Module, name: str, kind: str) -> AdapterWrapper | None:
    """The outermost adapter of ``kind`` installed at canonical module ``name``, or None."""
    parent, attr = _parent(model, name)
    mod = parent._modules[attr]
    while isinstance(mod, AdapterWrapper):
        if mod.kind == kind:
            return mod
        mod = mod.base_layer
    return None


@dataclass
class AdapterSite:
    """Where a chaining adapter method (GRACE, WISE, T-Patcher) writes: canonical ``name``, its current module
    ``path``, the ``current`` module there, the installed adapter of the method's kind it extends
    (``previous``, or None) and the ``base`` layer under it."""

    name: str
    path: str
    current: nn.Module
    previous: AdapterWrapper | None
    base: nn.Module


def adapter_site(model: nn.Module, name: str, kind: str, label: str) -> AdapterSite:
    """The ``AdapterSite`` of module ``name`` for adapters of ``kind``; ConfigError when an adapter of that kind
    sits under another adapter (``label`` names the method in the message)."""
    from lmedit.errors import ConfigError

    path = resolve_name(model, name)
    current = model.get_submodule(path)
    previous = installed_adapter(model, name, kind)
    if previous is not None and previous is not current:
        raise ConfigError(f"{name} holds a {label} adapter under another adapter; remove the outer one first")
    return AdapterSite(
        name, path, current, previous, previous.base_layer if previous is not None else current
    )


class AppliedAdapters:
    """Handle returned by ``install_adapters``; ``revert()`` puts the previous module objects back."""

    def __init__(self) -> None:
        self._swaps: list[tuple[nn.Module, str, nn.Module, AdapterWrapper]] = []
        self.active = True

    def revert(self) -> None:
        if not self.active:
            return
        for parent, attr, previous, wrapper in reversed(self._swaps):
            wrapper.release()
            setattr(parent, attr, previous)
        self._swaps.clear()
        self.active = False


def install_adapters(model: nn.Module, specs: Sequence[AdapterSpec]) -> AppliedAdapters:
    """Install ``specs`` in order; transactional (a failure puts every replaced module back).

    A spec whose ``parent`` is None wraps whatever sits at its module; one with a ``parent`` replaces the
    installed same-kind adapter with that fingerprint (its base layer is re-wrapped). Anything else is refused.
    """
    handle = AppliedAdapters()
    try:
        for spec in specs:
            if spec.kind not in ADAPTER_KINDS:
                raise PatchError(f"unknown adapter kind {spec.kind!r}; known: {sorted(ADAPTER_KINDS)}")
            parent, attr = _parent(model, spec.module)
            current = parent._modules[attr]
            if isinstance(current, AdapterWrapper) and current.kind == spec.kind:
                if spec.parent != current.spec_fingerprint:
                    raise PatchError(
                        f"{spec.module} already holds a {spec.kind} adapter ({current.spec_fingerprint}) that this "
                        f"patch does not extend (it extends {spec.parent}). Compute the patch on the current edit "
                        "history (with the adapter installed), or undo the installed one first."
                    )
                base = current.base_layer
            elif spec.parent is not None:
                raise PatchError(
                    f"this patch extends the {spec.kind} adapter {spec.parent} at {spec.module}, which is not "
                    "installed: apply the earlier patch of that edit history first."
                )
            else:
                base = current
            previous = current if current is not base else None
            wrapper = ADAPTER_KINDS[spec.kind](base, spec, previous)
            handle._swaps.append((parent, attr, current, wrapper))
            setattr(parent, attr, wrapper)
            log.debug("installed %s adapter at %s", spec.kind, spec.module)
    except BaseException:
        handle.revert()
        raise
    return handle
