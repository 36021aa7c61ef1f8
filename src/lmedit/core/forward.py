"""Forward passes shared by methods and evaluation: hidden states, logits only where needed.

The bundled Gemma 3 has a 262k-token vocabulary, so full logits for every position cost more than the rest of
the model. ``target_logprobs`` stops the forward pass at the final norm and projects only the positions that
predict target tokens.

Prefix caches. A value optimisation runs the same prompts at every step but changes them only from the
subject's last token on: ``prefix_layout`` lays out left-padded prefixes and right-padded suffixes (row r continues
prefix r), ``run_prefix`` fills a key/value cache with the prefixes once, and
``run_suffix`` runs the suffixes on top of a copy of it (the cache is never modified, so every step reuses
it). Positions are explicit, so a row's suffix continues its own prefix's positions whatever the padding.

Packing. Scoring many short sequences wastes compute on padding and pays the fixed cost of a forward pass
(reading every weight) once per small batch. ``pack`` puts several *units* into one row instead - a unit is
a prefix and the suffixes that continue it (a shared prefix computed once) - with a block attention mask (each
token sees only its own unit's prefix and its own suffix) and explicit positions, so every token computes
exactly what it would alone; ``packed_hidden`` runs the rows.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lmedit.core.adapters import sequence_mask
from lmedit.core.hooks import Trace
from lmedit.models.arch import ArchSpec, final_logits, get_submodule
from lmedit.models.tokens import PairBatch


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients inside the block; both restored after (values are untouched)."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)


@contextlib.contextmanager
def seeded(seed: int, device: str | torch.device | None = None) -> Iterator[None]:
    """Inside the block, torch's CPU random generator and that of ``device`` (when it is a CUDA device) start
    from ``seed``; after it both are as they were, and no other device's generator is touched (unlike
    ``torch.manual_seed``, which seeds every device and keeps nothing)."""
    dev = torch.device(device if device is not None else "cpu")
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(cuda[0]):
                torch.cuda.manual_seed(seed)
        yield


class Replay:
    """What ``replay_below`` recorded; ``select(rows)`` keeps only some rows of the batch for later passes.

    A loop that runs several different batches at every step (e.g. prompts and essence prompts apart) sets
    ``slot`` before each: every slot records and replays its own batch.
    """

    def __init__(self) -> None:
        self.recorded: dict[tuple[int, int], object] = {}  # (slot, layer) -> the layer's output
        self.shapes: dict[tuple[int, int], torch.Size | None] = {}
        self.slot = 0

    def select(self, rows: torch.Tensor) -> None:
        """Later passes of the current slot run only ``rows`` of its recorded batch (their inputs must be those
        rows)."""

        def pick(x, n: int):
            if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n:
                return x[rows]
            if isinstance(x, tuple):
                return tuple(pick(y, n) for y in x)
            return x

        for key, shape in self.shapes.items():
            if key[0] == self.slot and shape is not None:
                self.recorded[key] = pick(self.recorded[key], shape[0])
                self.shapes[key] = torch.Size([len(rows), *shape[1:]])


@contextlib.contextmanager
def replay_below(model: nn.Module, arch: ArchSpec, layer: int) -> Iterator[Replay]:
    """Inside the block, decoder layers below ``layer`` compute once and then replay their outputs.

    For training loops that run the same inputs at every step and change nothing below ``layer`` (an adapter or
    side memory at ``layer`` is trained, or a value added there is optimised; the model's weights are fixed):
    the first forward pass in the block runs every layer and records what each layer ``< layer`` returns
    (without autograd: nothing below ``layer`` has a trainable input); later passes get those outputs back
    without computing them, so each step costs only the layers from ``layer`` up. Every pass must use the same
    inputs (the hidden states' shape is checked), or the rows kept by the yielded ``Replay.select``.
    """
    blocks = list(get_submodule(model, arch.layers))[:layer]
    replay = Replay()
    recorded, shapes = replay.recorded, replay.shapes

    def replaying(i: int, block: nn.Module):
        original = block.forward

        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            shape = hidden.shape if isinstance(hidden, torch.Tensor) else None
            key = (replay.slot, i)
            if key in recorded:
                if shape != shapes[key]:
                    raise RuntimeError(
                        f"replay_below: layer {i} got inputs of shape {shape}, recorded {shapes[key]} "
                        f"(slot {replay.slot})"
                    )
                return recorded[key]
            with torch.no_grad():
                recorded[key] = original(*args, **kwargs)
            shapes[key] = shape
            return recorded[key]

        return forward

    before = [block.__dict__.get("forward") for block in blocks]  # an instance-level forward (e.g. a hook)
    for i, block in enumerate(blocks):
        block.forward = replaying(i, block)
    try:
        yield replay
    finally:
        for block, prev in zip(blocks, before):
            if prev is None:
                del block.forward  # the class's forward is back
            else:
                block.forward = prev


def site_layer(arch: ArchSpec, name: str) -> int | None:
    """Decoder layer index of module ``name`` (``"model.layers.5.mlp.down_proj"`` -> 5), None outside layers."""
    prefix = arch.layers + "."
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def final_hidden(
    model: nn.Module,
    arch: ArchSpec,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    overrides: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Output of the final norm, [batch, pos, d_model]; the LM head is skipped.

    ``overrides`` maps parameter names to tensors used in their place for this call only
    (``torch.func.functional_call``), which lets methods differentiate through candidate weights without
    writing to the model.
    """
    with Trace(model, arch.ln_f, stop=True) as tr:
        call(model, overrides, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return tr.output


def call(model: nn.Module, overrides: dict[str, torch.Tensor] | None, **kwargs):
    """``model(**kwargs)``, with ``overrides`` (parameter name -> tensor) in place of those parameters."""
    if overrides:
        return torch.func.functional_call(model, overrides, (), kwargs, strict=False)
    return model(**kwargs)


def cache_kwarg(model: nn.Module) -> str:
    """``cache`` (recent transformers) or ``past_key_values`` (older), whichever ``forward`` takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class PrefixLayout:
    """Left-padded prefixes and right-padded suffixes; row r's suffix continues prefix r.

    Attributes:
        pre_ids, pre_pos, pre_mask: [rows, P] prefix ids, positions, attention mask (0 on left padding).
        suf_ids, suf_pos: [rows, S] suffix ids and positions (continuing the prefix's).
        mask: [rows, P + S] attention mask of a suffix row over its prefix and itself.
    """

    pre_ids: torch.Tensor
    pre_pos: torch.Tensor
    pre_mask: torch.Tensor
    suf_ids: torch.Tensor
    suf_pos: torch.Tensor
    mask: torch.Tensor

    def _map(self, fn) -> PrefixLayout:
        return PrefixLayout(
            *(
                fn(t)
                for t in (self.pre_ids, self.pre_pos, self.pre_mask, self.suf_ids, self.suf_pos, self.mask)
            )
        )

    def to(self, device) -> PrefixLayout:
        return self._map(lambda t: t.to(device))

    def select(self, rows: torch.Tensor) -> PrefixLayout:
        """The layout of ``rows`` only (a prefix cache of it: ``cache.batch_select_indices(rows)``)."""
        return self._map(lambda t: t[rows])


def prefix_layout(
    prefixes: Sequence[Sequence[int]], suffixes: Sequence[Sequence[int]], pad: int
) -> PrefixLayout:
    """Lay out prefixes (left-padded) and their suffixes (right-padded), one row per pair."""
    n = len(prefixes)
    P = max((len(p) for p in prefixes), default=0)
    S = max(len(s) for s in suffixes)
    pre_ids = torch.full((n, P), pad, dtype=torch.long)
    pre_pos = torch.zeros((n, P), dtype=torch.long)
    suf_ids = torch.full((n, S), pad, dtype=torch.long)
    suf_pos = torch.zeros((n, S), dtype=torch.long)
    mask = torch.zeros((n, P + S), dtype=torch.long)
    for r, (p, s) in enumerate(zip(prefixes, suffixes)):
        if p:
            pre_ids[r, P - len(p) :] = torch.tensor(list(p))
            pre_pos[r, P - len(p) :] = torch.arange(len(p))
        suf_ids[r, : len(s)] = torch.tensor(list(s))
        suf_pos[r] = torch.arange(len(p), len(p) + S)
        mask[r, P - len(p) : P + len(s)] = 1
    return PrefixLayout(pre_ids, pre_pos, mask[:, :P], suf_ids, suf_pos, mask)


@torch.no_grad()
def run_prefix(
    model: nn.Module, arch: ArchSpec, layout: PrefixLayout, overrides: dict[str, torch.Tensor] | None = None
):
    """Key/value cache of the layout's prefixes (None when they are all empty); the LM head never runs."""
    if layout.pre_ids.shape[1] == 0:
        return None
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with Trace(model, arch.ln_f, stop=True):
        call(
            model,
            overrides,
            input_ids=layout.pre_ids,
            attention_mask=layout.pre_mask,
            position_ids=layout.pre_pos,
            use_cache=True,
            **{cache_kwarg(model): cache},
        )
    return cache


def run_suffix(
    model: nn.Module,
    arch: ArchSpec,
    layout: PrefixLayout,
    cache,
    overrides: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Final-norm output [R, S, d_model] of the suffixes on top of a copy of ``cache`` (``run_prefix``'s)."""
    kwargs: dict = {"use_cache": False}
    if cache is not None:
        kwargs = {"use_cache": True, cache_kwarg(model): copy.deepcopy(cache)}
    with Trace(model, arch.ln_f, stop=True) as fin:
        call(
            model,
            overrides,
            input_ids=layout.suf_ids,
            attention_mask=layout.mask,
            position_ids=layout.suf_pos,
            **kwargs,
        )
    return fin.output


#: Target positions projected through the LM head at once (a 262k vocabulary costs ~1 MB per position).
HEAD_CHUNK = 512


def score_logits(logits: torch.Tensor, target_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target and the argmax token, from raw logits.

    Args:
        logits: [n, vocab] (any float dtype; scored in float32).
        target_ids: [n].
    Returns:
        logprobs [n] float32 and argmax [n] long.
    """
    logits = logits.float()
    lp = torch.log_softmax(logits, dim=-1).gather(1, target_ids[:, None])[:, 0]  # [n]
    return lp, logits.argmax(-1)


def target_logprobs(
    model: nn.Module, arch: ArchSpec, batch: PairBatch, overrides: dict[str, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log-probability of the target token and the argmax token (differentiable in the former).

    Only the positions in ``batch.target_mask`` go through the LM head, ``HEAD_CHUNK`` at a time.

    Returns:
        logprobs [batch, pos] (float32, 0 outside ``batch.target_mask``) and argmax [batch, pos] (long, -1
        outside the mask).
    """
    hidden = final_hidden(model, arch, batch.input_ids, batch.attention_mask, overrides)  # [b, pos, d]
    mask = batch.target_mask
    lp, am = head_scores(model, arch, hidden[mask], batch.target_ids[mask])  # rows in (b, pos) order
    out_lp = torch.zeros(mask.shape, dtype=torch.float32, device=lp.device)
    out_am = torch.full(mask.shape, -1, dtype=torch.long, device=lp.device)
    out_lp[mask] = lp
    out_am[mask] = am
    return out_lp, out_am


#: LM-head rows (token ids) computed at once by ``head_scores``: a [positions, 4096] block of logits stays in
#: cache, which made the bundled Gemma's 262k-token head 25% faster on CPU than one [positions, 262k] product.
VOCAB_CHUNK = 4096


def head_scores(
    model: nn.Module, arch: ArchSpec, hidden: torch.Tensor, target_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``score_logits`` of final-norm states [n, d_model] through the LM head, ``HEAD_CHUNK`` rows at a time.

    A linear head is streamed over the vocabulary ``VOCAB_CHUNK`` ids at a time (running max, argmax and
    log-sum-exp), so full logits are never held; other heads get ``score_logits`` of full logits.

    Returns logprobs [n] float32 (differentiable) and argmax [n] long.
    """
    head = get_submodule(model, arch.lm_head)
    streamed = isinstance(head, nn.Linear)
    lps, amax = [], []
    for c in range(0, hidden.shape[0], HEAD_CHUNK):
        h, t = hidden[c : c + HEAD_CHUNK], target_ids[c : c + HEAD_CHUNK]
        if streamed:
            lp, am = _streamed_scores(model, arch, h, t, head.weight.shape[0])
        else:
            lp, am = score_logits(final_logits(model, arch, h), t)
        lps.append(lp)
        amax.append(am)
    if not lps:
        return hidden.new_zeros(0, dtype=torch.float32), target_ids.new_zeros(0)
    return torch.cat(lps), torch.cat(amax)


def _streamed_scores(
    model: nn.Module, arch: ArchSpec, h: torch.Tensor, targets: torch.Tensor, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``score_logits`` without full logits: one ``VOCAB_CHUNK`` block of the vocabulary at a time."""
    n = h.shape[0]
    best = torch.full((n,), -torch.inf, device=h.device)
    arg = torch.zeros(n, dtype=torch.long, device=h.device)
    total = torch.zeros(n, device=h.device)  # sum of exp(logit - best)
    picked = torch.zeros(n, device=h.device)  # the target's logit
    for v0 in range(0, vocab, VOCAB_CHUNK):
        v1 = min(v0 + VOCAB_CHUNK, vocab)
        logits = final_logits(model, arch, h, slice(v0, v1)).float()  # [n, chunk]
        cmax, carg = logits.max(-1)
        arg = torch.where(cmax > best, carg + v0, arg)  # ties keep the lower id, as argmax does
        new_best = torch.maximum(best, cmax)
        total = total * torch.exp(best - new_best) + torch.exp(logits - new_best[:, None]).sum(-1)
        best = new_best
        inside = (targets >= v0) & (targets < v1)
        got = logits.gather(1, (targets - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0]
        picked = torch.where(inside, got, picked)
    return picked - best - torch.log(total), arg


@dataclass
class Packing:
    """Rows of packed units (``pack``).

    Attributes:
        input_ids, position_ids: [rows, width].
        where: per unit ``(row, start, suffix_starts)``: the prefix occupies columns ``start ..`` of ``row``
            and suffix k starts at column ``suffix_starts[k]``.
        lengths: per unit ``(prefix_len, suffix_lens)``.
        rows: the units in each row; fill: tokens used in each row.
        chunks: row index lists, each one forward pass (run up to its widest row).
        lead: every unit's first token (the same in all, e.g. BOS) sits once in column 0 of each row, at
            position 0, and every token of the row attends to it: its states are exactly those each unit would
            compute for its own copy (it sees only itself), so one copy per row serves them all. Unit columns,
            ``where`` and ``lengths`` then describe the units without that token.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    where: list[tuple[int, int, list[int]]]
    lengths: list[tuple[int, list[int]]]
    rows: list[list[int]]
    fill: list[int]
    chunks: list[list[int]]
    lead: bool = False

    def column(self, unit: int, suffix: int, pos: int) -> int:
        """Column (in the unit's row) of input position ``pos`` of the unit's ``suffix``-th sequence (its
        prefix when the unit has no suffixes)."""
        if self.lead:
            if pos == 0:
                return 0
            pos -= 1
        _, start, sufs = self.where[unit]
        prefix_len = self.lengths[unit][0]
        return start + pos if pos < prefix_len else sufs[suffix] + pos - prefix_len

    def allowed(self, rows: Sequence[int], width: int) -> torch.Tensor:
        """[len(rows), width, width] bool: True where a query token (dim 1) may attend to a key (dim 2) - its
        own unit's prefix (causally) and its own suffix (causally); padding sees only itself."""
        out = torch.zeros((len(rows), width, width), dtype=torch.bool)
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        for j, r in enumerate(rows):
            for u in self.rows[r]:
                _, start, sufs = self.where[u]
                L, sizes = self.lengths[u]
                out[j, start : start + L, start : start + L] = causal[:L, :L]
                for c, n in zip(sufs, sizes):
                    out[j, c : c + n, start : start + L] = True
                    out[j, c : c + n, c : c + n] = causal[:n, :n]
            if self.lead:
                out[j, : self.fill[r], 0] = True
            idle = torch.arange(self.fill[r], width)
            out[j, idle, idle] = True
        return out


def pack(
    units: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    capacity: int,
    max_items: int,
    pad: int,
    lead: bool = False,
) -> Packing:
    """Pack ``(prefix, suffixes)`` units into rows of at most ``capacity`` tokens (wider units get a row of
    their own) holding at most ``max_items`` sequences each (a unit counts one per suffix, at least one);
    rows are grouped into forward passes of at most ``max_items`` sequences.

    ``lead``: every unit's prefix starts with the same token (checked); it is stored once per row, in column 0
    (``Packing.lead``)."""
    first = units[0][0][0] if lead else None
    if lead:
        if any(not p or p[0] != first for p, _ in units):
            raise ValueError("lead=True needs every unit's prefix to start with the same token")
        units = [(p[1:], sfx) for p, sfx in units]
    size = [len(p) + sum(len(x) for x in sfx) for p, sfx in units]
    items = [max(1, len(sfx)) for _, sfx in units]
    order = sorted(range(len(units)), key=lambda u: -size[u])
    rows: list[list[int]] = []
    lo, hi = 0, len(order) - 1  # largest first, then fill each row's gap with the smallest remaining
    while lo <= hi:
        row, used, n = [order[lo]], size[order[lo]], items[order[lo]]
        lo += 1
        while lo <= hi and used + size[order[hi]] <= capacity and n + items[order[hi]] <= max_items:
            row.append(order[hi])
            used, n = used + size[order[hi]], n + items[order[hi]]
            hi -= 1
        rows.append(row)
    fill = [int(lead) + sum(size[u] for u in row) for row in rows]
    width = max(fill, default=1)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    where: list[tuple[int, int, list[int]]] = [(0, 0, [])] * len(units)
    off = int(lead)  # positions of unit tokens start after the shared lead token
    for r, row in enumerate(rows):
        col = off
        if lead:
            input_ids[r, 0] = first
        for u in row:
            prefix, sfx = units[u]
            L = len(prefix)
            input_ids[r, col : col + L] = torch.tensor(list(prefix), dtype=torch.long)
            position_ids[r, col : col + L] = torch.arange(off, off + L)
            starts = []
            c = col + L
            for x in sfx:
                starts.append(c)
                input_ids[r, c : c + len(x)] = torch.tensor(list(x), dtype=torch.long)
                position_ids[r, c : c + len(x)] = torch.arange(off + L, off + L + len(x))
                c += len(x)
            where[u] = (r, col, starts)
            col = c
    chunks: list[list[int]] = []
    n = 0
    for r, row in enumerate(rows):
        k = sum(items[u] for u in row)
        if chunks and n + k <= max_items:
            chunks[-1].append(r)
            n += k
        else:
            chunks.append([r])
            n = k
    lengths = [(len(p), [len(x) for x in sfx]) for p, sfx in units]
    return Packing(input_ids, position_ids, where, lengths, rows, fill, chunks, lead)


def packed_hidden(
    model: nn.Module,
    arch: ArchSpec,
    packing: Packing,
    rows: Sequence[int],
    keep: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Final-norm output [len(rows), width, d_model] of some of a packing's rows, one forward pass.

    ``keep`` = (row index into ``rows``, column) tensors of the positions whose output will be used: the last
    layer's MLP then runs only there (``last_mlp_only``), and every other position of the result is garbage.
    """
    param = next(model.parameters())
    idx = torch.tensor(list(rows))
    w = max(packing.fill[r] for r in rows)
    allowed = packing.allowed(rows, w).to(param.device)
    mask = torch.zeros(allowed.shape, dtype=param.dtype, device=param.device)
    mask.masked_fill_(~allowed, torch.finfo(param.dtype).min)
    # sequence-stateful adapters (WISE's running maximum) must not look across the row's sequences
    with sequence_mask(allowed), Trace(model, arch.ln_f, stop=True) as tr, last_mlp_only(model, arch, keep):
        model(
            input_ids=packing.input_ids[idx, :w].to(param.device),
            attention_mask=mask[:, None],  # [rows, 1, w, w], additive
            position_ids=packing.position_ids[idx, :w].to(param.device),
            use_cache=False,
        )
    return tr.output


@contextlib.contextmanager
def last_mlp_only(model: nn.Module, arch: ArchSpec, keep: tuple[torch.Tensor, torch.Tensor] | None):
    """Run the last decoder layer's MLP only at positions ``keep`` = (batch index, position) tensors.

    Nothing after the last layer mixes positions, so the final states at ``keep`` are exact; the MLP's output
    elsewhere is zero (those states are wrong and must not be read). The MLP is the module holding the output
    projection; where that is the decoder layer itself (OPT), ``keep`` is None, or the MLP holds an adapter
    whose output depends on the other positions of the sequence (WISE), nothing changes.
    """
    last = arch.n_layers(model) - 1
    path = arch.module_name("mlp_out", last).rpartition(".")[0]
    if keep is None or path == arch.module_name("layer", last):
        yield
        return
    mlp = get_submodule(model, path)
    if any(getattr(m, "sequence_state", False) for m in mlp.modules()):
        yield
        return
    shape: list[torch.Size] = []

    def pre(_mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        shape[:] = [x.shape]
        picked = x[keep[0], keep[1]][None]  # [1, n, d]
        return ((picked, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": picked})

    def post(_mod, _args, out):
        full = out.new_zeros(*shape[0][:-1], out.shape[-1])
        full[keep[0], keep[1]] = out[0]
        return full

    handles = [mlp.register_forward_pre_hook(pre, with_kwargs=True), mlp.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
