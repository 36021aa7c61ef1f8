"""GRACE (Hartvigsen et al. 2023, "Aging with GRACE"): a codebook adapter that leaves the weights alone.

One module (by default the MLP output projection of one layer) is wrapped by a ``GraceCodebook``
(``lmedit.core.adapters``). Its keys are the module's *input* at the last prompt token of each edit, its values
replacement *outputs* trained so that the model produces the target, and every key has a deferral radius
epsilon: at inference a position whose input lies within the radius of its nearest key gets that key's value as
the module's output; every other position passes through untouched (so unrelated prompts are unchanged).

Codebook update for a new edit with key ``h`` and label ``y`` (the target string), nearest key ``k_i`` at L2
distance ``d`` with radius ``eps_i`` and label ``y_i`` (the paper's rules):

* empty codebook, or ``d > eps_i + epsilon``: **add** ``(h, v, epsilon, y)`` and train ``v``;
* ``y == y_i``: **expand**: ``eps_i = max(eps_i, d)`` (the existing value already produces ``y``);
* ``y != y_i``: **split**: ``eps_i = d / 2`` and add ``(h, v, d / 2, y)``, so the two balls touch without
  overlapping; train ``v``.

**Contrast-bounded radii** (our addition, like WISE's contrast prompts here): the edit's own template filled
with other subjects (``contrast_subjects``) gives contrast keys, and a new entry's radius is capped at
``contrast_fraction`` times the distance from its key to the nearest of them. Without it, a same-template
neighbour ("Notre-Dame is located in the city of" after editing the Eiffel Tower) falls inside the ball: on
Gemma 3 270M such neighbour keys lie closer to the edit key (L2 0.6-2) than many paraphrase keys do.

Values are trained with Adam (step size relative to the module's output scale) on the teacher-forced NLL of
the target, with the codebook applied exactly as at inference (through a Trace on the module; the model is
never written to). The trained value can only change the positions from the edit's last prompt token on,
unless an earlier prompt token falls inside the new entry's ball: otherwise the earlier tokens' key/value cache
is computed once and each step runs only the last prompt token and the target (``lmedit.core.forward.run_prefix``
/ ``run_suffix``), the same loss at a fraction of the cost.

Lifelong editing: when the model already has a GRACE adapter at the chosen module (an ``EditSession`` applied an
earlier GRACE patch), the method starts from that adapter's codebook and returns a patch whose adapter
*replaces* it (``AdapterSpec.parent`` = the installed adapter's fingerprint). The patch stores only the entries
it adds (plus every radius), so N sequential edits store O(N) rows. Undoing the new patch puts the previous
codebook back; applying the new patch to a model without the previous one is refused.

    >>> session = lmedit.EditSession(loaded)
    >>> session.apply(lmedit.edit(loaded, req1, method="grace"))
    >>> session.apply(lmedit.edit(loaded, req2, method="grace"))   # codebook of 2 entries
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

import torch

from lmedit.config import MethodConfig, hp
from lmedit.core.adapters import (
    AdapterSpec,
    GraceCodebook,
    adapter_site,
    codebook_forward,
    unwrap,
)
from lmedit.core.forward import head_scores, prefix_layout, run_prefix, run_suffix
from lmedit.core.hooks import Trace
from lmedit.core.keys import PromptSite, run_sites
from lmedit.core.patch import EditPatch
from lmedit.errors import ConfigError
from lmedit.methods.wise import CONTRAST_SUBJECTS
from lmedit.models import tokens
from lmedit.registry import register_method
from lmedit.request import EditRequest

log = logging.getLogger(__name__)


@dataclass
class GraceConfig(MethodConfig):
    layer: int | None = hp(None, "Decoder layer whose module gets the codebook (default: 3/4 of the depth).")
    module: Literal["mlp_out", "mlp_in", "attn_out"] = hp(
        "mlp_out", "Which projection of the layer is wrapped (keys = its input, values = its output)."
    )
    epsilon: float = hp(
        1.0, "Initial deferral radius epsilon_init (L2 distance in the wrapped module's input space)."
    )
    lr: float = hp(
        0.25,
        "Adam learning rate for a value, relative to the RMS of the module's own output at the edit's key "
        "(GRACE's edit_lr, made scale-free: Gemma 3 270M's MLP outputs have RMS ~0.08, where the paper's "
        "absolute 1.0 overshoots and needs 5-8x more steps).",
    )
    steps: int = hp(100, "Maximum optimisation steps per trained value.")
    early_stop_loss: float = hp(1e-2, "Stop training a value once the target NLL falls below this.")
    contrast_subjects: list[str] = hp(
        list(CONTRAST_SUBJECTS),
        "Subjects put into each edit's own template; their keys bound the new entry's radius (our addition; [] "
        "turns it off).",
    )
    contrast_fraction: float = hp(
        0.5,
        "A new entry's radius is at most this fraction of the distance from its key to the nearest contrast key.",
    )
    progress: bool = hp(False, "Log each edit's codebook action and loss at INFO level.")

    def validate(self) -> None:
        if self.epsilon <= 0:
            raise ConfigError(f"epsilon must be > 0, got {self.epsilon}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if not 0 < self.contrast_fraction <= 1:
            raise ConfigError(f"contrast_fraction must be in (0, 1], got {self.contrast_fraction}")


@dataclass
class Codebook:
    """GRACE codebook state: keys [n, d_in], values [n, d_out], epsilons [n] (float32, CPU) and labels."""

    keys: torch.Tensor
    values: torch.Tensor
    epsilons: torch.Tensor
    labels: list[str]

    @classmethod
    def empty(cls, d_in: int, d_out: int) -> Codebook:
        return cls(torch.zeros(0, d_in), torch.zeros(0, d_out), torch.zeros(0), [])

    @classmethod
    def from_adapter(cls, wrapper: GraceCodebook) -> Codebook:
        """The state of an installed wrapper (radii from its spec, exact; keys/values from its buffers)."""
        return cls(
            wrapper.keys.detach().float().cpu().clone(),
            wrapper.values.detach().float().cpu().clone(),
            wrapper.spec.tensors["epsilons"].float().clone(),
            list(wrapper.spec.config["labels"]),
        )

    def __len__(self) -> int:
        return self.keys.shape[0]


def update_codebook(
    book: Codebook, key: torch.Tensor, value: torch.Tensor, label: str, epsilon: float
) -> tuple[str, int, float | None]:
    """Insert one edit into ``book`` in place by GRACE's rules (see the module docstring).

    Args:
        key: [d_in] the module input at the edit's last prompt token.
        value: [d_out] initial value for a new entry (the base output there).
        label: the edit's target string.
        epsilon: epsilon_init.

    Returns:
        (action, index, distance): action is "add", "expand" or "split"; ``index`` is the entry whose value must
        be trained ("add"/"split": the new entry) or that was expanded; distance to the nearest key (None if
        the codebook was empty).
    """
    key = key.float().cpu()
    if len(book) == 0:
        action, d, i = "add", None, -1
    else:
        dist = torch.linalg.vector_norm(book.keys - key[None], dim=-1)  # [n]
        i = int(dist.argmin())
        d = float(dist[i])
        if d > float(book.epsilons[i]) + epsilon:
            action = "add"
        elif book.labels[i] == label:
            action = "expand"
        else:
            action = "split"
    if action == "expand":
        book.epsilons[i] = max(float(book.epsilons[i]), d)
        return action, i, d
    radius = epsilon
    if action == "split":
        radius = d / 2
        book.epsilons[i] = radius
    book.keys = torch.cat([book.keys, key[None]])
    book.values = torch.cat([book.values, value.float().cpu()[None]])
    book.epsilons = torch.cat([book.epsilons, torch.tensor([radius])])
    book.labels.append(label)
    return action, len(book) - 1, d


def run_grace(loaded, requests: list[EditRequest], config: GraceConfig) -> EditPatch:
    """Compute the GRACE patch for ``requests`` (in order), extending the installed codebook if there is one."""
    model = loaded.model
    n_layers = loaded.arch.n_layers(model)
    layer = config.layer if config.layer is not None else (3 * n_layers) // 4
    if not 0 <= layer < n_layers:
        raise ConfigError(f"layer {layer} out of range: the model has layers 0..{n_layers - 1}")
    site = adapter_site(model, loaded.arch.module_name(config.module, layer), "grace", "GRACE")
    name, path, current, previous, base_mod = site.name, site.path, site.current, site.previous, site.base
    t0 = time.perf_counter()
    log_entries: list[dict] = []
    book: Codebook | None = Codebook.from_adapter(previous) if previous is not None else None
    n_previous = len(book) if book is not None else 0

    for r in requests:
        enc, x, earlier = _prompt_key(loaded, path, r.prompt_text, r.target_new)
        contrast = [r.template.replace("{}", s) for s in config.contrast_subjects if s != r.subject]
        contrast_keys = _last_token_inputs(loaded, path, contrast, r.target_new)  # [n_contrast, d_in]
        with torch.no_grad():
            out0 = base_mod(x[None, None])[0, 0]  # [d_out]
        if book is None:
            book = Codebook.empty(x.shape[-1], out0.shape[-1])
        label = r.target_new.strip()
        action, idx, dist = update_codebook(book, x, out0, label, config.epsilon)
        entry = {"action": action, "index": idx, "distance": dist, "codebook_size": len(book)}
        if len(contrast_keys) and action != "expand":
            d_contrast = float(torch.linalg.vector_norm(contrast_keys - x[None], dim=-1).min())
            bound = config.contrast_fraction * d_contrast
            book.epsilons[idx] = min(float(book.epsilons[idx]), bound)
            entry.update(contrast_distance=d_contrast, radius=float(book.epsilons[idx]))
        if action != "expand":
            losses, cached = _train_value(
                loaded, path, base_mod, current is not base_mod, book, idx, enc, earlier, config
            )
            entry.update(steps=len(losses), loss_first=losses[0], loss_last=losses[-1], prefix_cached=cached)
        log_entries.append(entry)
        (log.info if config.progress else log.debug)("grace %r -> %r: %s", r.prompt_text, r.target_new, entry)

    assert book is not None
    spec = AdapterSpec(
        "grace",
        name,
        config={"labels": book.labels, "epsilon_init": config.epsilon, "n_previous": n_previous},
        # only the rows added here (copied: a view would keep the whole codebook alive in every patch of a
        # chain); the radii of every entry (see GraceCodebook)
        tensors={
            "keys": book.keys[n_previous:].clone(),
            "values": book.values[n_previous:].clone(),
            "epsilons": book.epsilons,
        },
        parent=previous.spec_fingerprint if previous is not None else None,
    )
    params = [f"{name}.{n}" for n, _ in unwrap(base_mod).named_parameters()]
    return EditPatch(
        method="grace",
        config=config.to_dict() | {"layer": layer},
        requests=[r.to_dict() for r in requests],
        deltas=[],
        base=EditPatch.base_of(loaded, params),
        info={"edits": log_entries, "codebook_size": len(book), "seconds": time.perf_counter() - t0},
        adapters=[spec],
    )


def _prompt_key(loaded, path: str, prompt: str, target: str):
    """(encoding, module input at the last prompt token [d_in], inputs at the earlier prompt tokens [p, d_in])."""
    enc = tokens.encode_pair(loaded.tokenizer, prompt, target)
    pos = enc.prompt_len - 1
    ids = torch.tensor([enc.ids[: pos + 1]], device=loaded.device)
    with torch.no_grad(), Trace(loaded.model, path, retain_input=True, stop=True) as tr:
        loaded.model(input_ids=ids, use_cache=False)
    return enc, tr.input[0, pos], tr.input[0, :pos]


def _last_token_inputs(loaded, path: str, prompts: list[str], target: str) -> torch.Tensor:
    """Input of module ``path`` at each prompt's last token (as ``_prompt_key``), batched [n, d_in] float32."""
    if not prompts:
        return torch.zeros(0)
    encs = [tokens.encode_pair(loaded.tokenizer, t, target) for t in prompts]
    sites = [PromptSite(t, e.ids[: e.prompt_len], e.prompt_len - 1) for t, e in zip(prompts, encs)]
    return run_sites(loaded, sites, [path], retain="input")[path]


def _train_value(
    loaded,
    path: str,
    base_mod: torch.nn.Module,
    recompute_base: bool,
    book: Codebook,
    idx: int,
    enc: tokens.PairEncoding,
    earlier: torch.Tensor,
    config: GraceConfig,
) -> tuple[list[float], bool]:
    """Optimise ``book.values[idx]`` (in place) with the whole codebook applied at ``path``.

    ``earlier`` [p, d_in] holds the module inputs at the prompt's tokens before the last one: when none of them
    is deferred to entry ``idx``, they are computed once (a key/value cache) and every step runs the rest.
    Returns the losses and whether the cache was used.
    """
    model, arch, device = loaded.model, loaded.arch, loaded.device
    keys = book.keys.to(device)
    eps = book.epsilons.to(device)
    fixed = book.values.to(device)
    value = book.values[idx].to(device).clone().requires_grad_(True)  # [d_out]
    onehot = torch.zeros(len(book), 1, device=device)
    onehot[idx] = 1.0
    scale = float(value.detach().pow(2).mean().sqrt().clamp_min(1e-6))  # the base output's RMS at the key
    opt = torch.optim.Adam([value], lr=config.lr * scale)

    def edit(out: torch.Tensor, _name: str) -> torch.Tensor:
        x = tr.input
        base_out = base_mod(x) if recompute_base else out  # an installed GRACE wrapper's output is replaced
        values = fixed * (1 - onehot) + value[None] * onehot  # [n, d_out]
        return codebook_forward(x, base_out, keys, values, eps)

    with torch.no_grad():
        d_new = torch.cdist(earlier.float(), keys.float())  # [p, n]
        near, which = d_new.min(dim=-1)  # [p]
        cached = not bool(((which == idx) & (near <= eps[idx])).any())
    split = enc.prompt_len - 1 if cached else 0
    pad = tokens.pad_id(loaded.tokenizer)
    layout = prefix_layout([enc.ids[:split]], [enc.ids[split:-1]], pad).to(device)
    targets = torch.tensor(enc.ids[enc.prompt_len :], device=device)
    cols = torch.arange(enc.prompt_len - 1 - split, len(enc.ids) - 1 - split, device=device)

    losses: list[float] = []
    with Trace(model, path, retain_input=True, retain_output=False, edit_output=edit) as tr:
        cache = run_prefix(model, arch, layout)  # with the codebook applied; unaffected by this value
        for _ in range(config.steps):
            hidden = run_suffix(model, arch, layout, cache)[0]  # [S, d_model]
            loss = -head_scores(model, arch, hidden[cols], targets)[0].mean()
            losses.append(loss.item())
            if losses[-1] < config.early_stop_loss:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    book.values[idx] = value.detach().float().cpu()
    return losses, cached


@register_method("grace", GraceConfig, family="memory-based")
def edit_grace(loaded, requests: list[EditRequest], config: GraceConfig) -> EditPatch:
    """GRACE: a codebook adapter at one layer (keys, trained values, deferral radii); weights untouched."""
    return run_grace(loaded, requests, config)


__all__ = ["Codebook", "GraceConfig", "run_grace", "update_codebook"]
