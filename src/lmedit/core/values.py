"""Values v*: optimise a vector added at the subject's last token so the model says the new target.

    >>> res = optimize_values(loaded, requests, sites=["model.layers.6.mlp.down_proj"], templates=templates)
    >>> res.delta["model.layers.6.mlp.down_proj"].shape      # [n_requests, d_model]
    >>> res.init[...]                                        # the site's original output there (plain prompt)

For each request a delta is added to the output of each ``site`` module (ROME: the layer's MLP output
projection; MEMIT: the decoder layer; PMET: attention and MLP output projections) at the subject's last token
of every prompt: the context-template prompts (teacher-forced target NLL) and the essence prompt ``"{} is a"``
(KL divergence to the unedited next-token distribution). The loss per request is::

    NLL(target | template prompts)  +  kl_factor * KL(p_orig || p_edit)("{} is a")  +  weight_decay * |d| / |v0|^2

and |d| is clamped to ``clamp_norm_factor * |v0|`` after every Adam step (v0: the site's original output at the
plain prompt), as in ROME/MEMIT.

Speed. The delta changes nothing before the subject's last token, so the prefix of every prompt (the template,
BOS, and the prompt up to the subject's last token) runs ONCE with a key/value cache; each step then runs only
the suffix (subject's last token + rest of prompt + target tokens) on top of a copy of that cache. Gradients
flow only from the site's layer upward (nothing below it depends on the delta), the final norm output is taken
with a stopping Trace (the LM head never runs on the whole sequence), and logits are computed only at target
positions and the essence prompts' last positions. Requests are optimised together in batches of
``batch_requests`` (their deltas are independent: the summed loss gives each its own gradient), formed in order
of suffix length, because a batch's rows are padded to its longest suffix (100 bundled requests in batches of
16: 4564 positions a step in order against 6384 as given, on SmolLM2), and the essence prompts run as a part
of the step apart from the template prompts (their suffix, the subject's last token + " is a", is shorter:
4212 positions instead of 4564). Each request stops when its loss is below
``early_stop``; a stopped request's rows leave the batch (its layout rows and prefix cache entries are dropped),
so later steps cost only what the requests still running need. The decoder layers below the lowest site see
no delta: they run in the first pass and replay their outputs at every step (``core.forward.replay_below``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lmedit.core.forward import prefix_layout, replay_below, run_prefix, run_suffix, site_layer
from lmedit.core.hooks import TraceDict
from lmedit.models import tokens
from lmedit.models.arch import final_logits
from lmedit.request import EditRequest

log = logging.getLogger(__name__)


@dataclass
class ValueResult:
    """Optimised deltas per site.

    Attributes:
        delta: ``{site: [n_requests, d]}`` the optimised additive vectors (float32).
        init: ``{site: [n_requests, d]}`` the site's original output at the plain prompt's subject token.
        loss: final loss per request; nll: final target NLL per request (mean over template prompts).
        steps: steps taken per request.
        timing: seconds spent in the prefix pass, the optimisation steps and in total; ``row_steps`` and
            ``positions`` count the rows and the suffix positions (padding included) the steps computed.
    """

    delta: dict[str, torch.Tensor]
    init: dict[str, torch.Tensor]
    loss: list[float]
    nll: list[float]
    steps: list[int]
    timing: dict = field(default_factory=dict)


@dataclass
class _Row:
    req: int
    ids: list[int]  # model input ids (prompt + target[:-1], or the essence prompt)
    subject: int  # subject's last token index in ids
    targets: list[tuple[int, int]]  # (position in ids whose logits predict it, token id)
    kl: bool = False
    plain: bool = False


def _rows(
    tok, requests: Sequence[EditRequest], templates: Sequence[str], kl_prompt: str | None
) -> list[_Row]:
    rows: list[_Row] = []
    plain_t = templates.index("{}") if "{}" in templates else 0
    for i, r in enumerate(requests):
        start, end = r.subject_span
        for ti, t in enumerate(templates):
            prefix = t[:-2]
            text = prefix + r.prompt_text
            s = tokens.subject_last_index(tok, text, start + len(prefix), end + len(prefix))
            enc = tokens.encode_pair(tok, text, r.target_new)
            ids = enc.ids[:-1]
            tg = [(enc.prompt_len - 1 + j, enc.ids[enc.prompt_len + j]) for j in range(enc.target_len)]
            rows.append(_Row(i, ids, s, tg, plain=ti == plain_t))
        if kl_prompt:
            text = kl_prompt.replace("{}", r.subject)
            ks = kl_prompt.index("{}")
            s = tokens.subject_last_index(tok, text, ks, ks + len(r.subject))
            ids, _ = tokens.encode_prompt(tok, text)
            rows.append(_Row(i, ids, s, [], kl=True))
    return rows


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _replace_first(x, new):
    return (new, *x[1:]) if isinstance(x, tuple) else new


def optimize_values(
    loaded,
    requests: Sequence[EditRequest],
    sites: Sequence[str],
    templates: Sequence[str],
    *,
    steps: int = 25,
    lr: float = 0.5,
    kl_factor: float = 0.0625,
    weight_decay: float = 0.5,
    clamp_norm_factor: float = 4.0,
    early_stop: float = 5e-2,
    kl_prompt: str | None = "{} is a",
    kl_position: str = "last",
    batch_requests: int = 16,
    overrides: dict[str, torch.Tensor] | None = None,
) -> ValueResult:
    """Optimise one additive vector per request and site (see module docstring).

    Args:
        loaded: a LoadedModel (not modified).
        requests: edit requests.
        sites: module names whose output gets the delta at the subject's last token.
        templates: context templates (``"...{}"``); the NLL is averaged over them.
        steps, lr: Adam steps and learning rate.
        kl_factor: weight of the KL essence term (0 disables it).
        weight_decay: weight of ``|d| / |v0|^2``.
        clamp_norm_factor: |d| <= clamp_norm_factor * |v0| after every step.
        early_stop: a request stops once its loss is below this.
        kl_prompt: essence prompt template (``None`` to skip it).
        kl_position: where the essence distribution is taken: ``"last"``, its last token (the next token after
            "{subject} is a", the ROME paper's definition), or ``"subject"``, the subject's last token (where
            ROME's and MEMIT's reference code, and EasyEdit, take it).
        batch_requests: requests optimised together (batches formed in order of suffix length; results are
            returned in request order).
        overrides: ``{param_name: tensor}`` used instead of the model's parameters (earlier edits of a batch).
    """
    if kl_position not in ("last", "subject"):
        raise ValueError(f"kl_position must be 'last' or 'subject', got {kl_position!r}")
    t_start = time.perf_counter()
    n = len(requests)
    deltas = {s: [] for s in sites}
    inits = {s: [] for s in sites}
    losses, nlls, nsteps = [], [], []
    timing = {"prefix_s": 0.0, "steps_s": 0.0, "step_count": 0}
    # chunks of requests with similar suffix lengths: a chunk's rows are padded to its longest suffix
    order = sorted(range(n), key=lambda i: _suffix_len(loaded.tokenizer, requests[i]))
    for b in range(0, n, batch_requests):
        chunk = [requests[i] for i in order[b : b + batch_requests]]
        res = _optimize_chunk(
            loaded, chunk, sites, list(templates), steps, lr, kl_factor, weight_decay, clamp_norm_factor,
            early_stop, kl_prompt, kl_position, timing, overrides,
        )  # fmt: skip
        for s in sites:
            deltas[s].append(res[0][s])
            inits[s].append(res[1][s])
        losses += res[2]
        nlls += res[3]
        nsteps += res[4]
    timing["total_s"] = time.perf_counter() - t_start
    timing["per_step_s"] = timing["steps_s"] / max(timing["step_count"], 1)
    back = torch.tensor(order).argsort().tolist()  # chunk order -> request order
    return ValueResult(
        {s: torch.cat(v)[back] for s, v in deltas.items()},
        {s: torch.cat(v)[back] for s, v in inits.items()},
        [losses[i] for i in back],
        [nlls[i] for i in back],
        [nsteps[i] for i in back],
        timing,
    )


def _suffix_len(tok, request: EditRequest) -> int:
    """Positions a request's template rows run at every step: from the subject's last token to the end of
    prompt + target (the same under every context template, which only adds a prefix)."""
    (row,) = _rows(tok, [request], ["{}"], None)
    return len(row.ids) - row.subject


def _optimize_chunk(
    loaded, requests, sites, templates, steps, lr, kl_factor, weight_decay, clamp, early_stop, kl_prompt,
    kl_position, timing, overrides,
):  # fmt: skip
    model, tok = loaded
    arch = loaded.arch
    device = loaded.device
    rows = _rows(tok, requests, templates, kl_prompt if kl_factor > 0 else None)
    n_req = len(requests)
    n_tmpl = len(templates)
    pad = tokens.pad_id(tok)

    def index(keep: list[int]) -> dict[str, torch.Tensor]:
        """Gather indices for the batch made of the rows ``keep`` (in that order): target positions (in suffix
        coordinates), token ids, owning requests and weights, and the essence prompts' last positions."""
        t_row, t_pos, t_tok, t_w = [], [], [], []
        for j, i in enumerate(keep):
            for pos, tid in rows[i].targets:
                t_row.append(j)
                t_pos.append(pos - rows[i].subject)
                t_tok.append(tid)
                # each template prompt's NLL is a mean over its target tokens, then a mean over templates
                t_w.append(1.0 / (len(rows[i].targets) * n_tmpl))
        kl = [j for j, i in enumerate(keep) if rows[i].kl]
        row_req = torch.tensor([rows[i].req for i in keep], device=device)  # [n_rows]
        t_row_t = torch.tensor(t_row, dtype=torch.long, device=device)
        kl_t = torch.tensor(kl, dtype=torch.long, device=device)
        return {
            "row_req": row_req,
            "t_row": t_row_t,
            "t_pos": torch.tensor(t_pos, dtype=torch.long, device=device),
            "t_tok": torch.tensor(t_tok, dtype=torch.long, device=device),
            "t_w": torch.tensor(t_w, device=device),
            "tok_req": row_req[t_row_t],
            "kl_row": kl_t,
            "kl_pos": torch.tensor(  # suffix coordinates: 0 is the subject's last token
                [
                    0 if kl_position == "subject" else len(rows[keep[j]].ids) - 1 - rows[keep[j]].subject
                    for j in kl
                ],
                dtype=torch.long,
                device=device,
            ),
            "kl_req": row_req[kl_t],
        }

    # The batch runs as parts: the template prompts, and the essence prompts apart (their suffix, "{subject's last
    # token} is a", is shorter than the prompts', so in one batch it would be padded to theirs). Each part has
    # its own layout, prefix cache and replay slot; the step's loss sums over the parts.
    t0 = time.perf_counter()
    parts: list[dict] = []
    for kind in (False, True):
        keep = [i for i, r in enumerate(rows) if r.kl == kind]
        if keep:
            layout = prefix_layout(
                [rows[i].ids[: rows[i].subject] for i in keep],
                [rows[i].ids[rows[i].subject :] for i in keep],
                pad,
            ).to(device)
            cache = run_prefix(model, arch, layout, overrides)  # once; every step runs on a copy of it
            parts.append(
                {"keep": keep, "layout": layout, "cache": cache, "ix": index(keep), "slot": len(parts)}
            )
    timing["prefix_s"] += time.perf_counter() - t0

    d_sites = {}
    init = {s: None for s in sites}  # the sites' original outputs at the plain prompts, [n_req, d]
    state: dict = {"capture": True, "part": parts[0]}

    def edit(output, name):
        h = _first(output)  # [rows, S, d]
        part = state["part"]
        if state["capture"]:
            plain = [j for j, i in enumerate(part["keep"]) if rows[i].plain]
            if plain:
                if init[name] is None:
                    init[name] = torch.zeros(n_req, h.shape[-1], device=h.device)
                init[name][[rows[part["keep"][j]].req for j in plain]] = h[plain, 0].detach().float()
            return output
        d = d_sites[name][part["ix"]["row_req"]].to(h.dtype)  # [rows, d]
        h = torch.cat([h[:, :1] + d[:, None], h[:, 1:]], dim=1)
        return _replace_first(output, h)

    def forward(part):
        state["part"] = part
        replay.slot = part["slot"]
        with TraceDict(model, sites, retain_output=False, edit_output=edit):
            return run_suffix(model, arch, part["layout"], part["cache"], overrides)  # [rows, S, d_model]

    def picked(hiddens):
        """Target and essence positions of every part, targets first: [n_tok + n_kl, d_model] and the gather
        indices in that order (token ids, weights, owning requests)."""
        ixs = [p["ix"] for p in parts]
        h_t = [h[ix["t_row"], ix["t_pos"]] for h, ix in zip(hiddens, ixs)]
        h_k = [h[ix["kl_row"], ix["kl_pos"]] for h, ix in zip(hiddens, ixs)]
        cat = {k: torch.cat([ix[k] for ix in ixs]) for k in ("t_tok", "t_w", "tok_req", "kl_req")}
        return torch.cat(h_t + h_k), cat

    # layers below the lowest site see no delta: they compute in the first pass and replay after
    low = min(site_layer(arch, s) or 0 for s in sites)
    with replay_below(model, arch, low) as replay:
        # a first forward without deltas: the sites' original outputs (init) and the essence reference
        with torch.no_grad():
            hidden0 = [forward(p) for p in parts]
        state["capture"] = False
        for s in sites:
            d_sites[s] = torch.zeros(n_req, init[s].shape[-1], device=device, requires_grad=True)
        # essence reference [n_req, vocab] in request order (one essence row each; none when kl_factor is 0)
        ref_kl = torch.zeros(n_req, 0, device=device)
        h0, ix0 = picked(hidden0)
        n_kl0 = len(ix0["kl_req"])
        if n_kl0:
            logits0 = final_logits(model, arch, h0[len(h0) - n_kl0 :]).float()
            ref_kl = torch.zeros(n_req, logits0.shape[-1], device=device)
            ref_kl[ix0["kl_req"]] = torch.log_softmax(logits0, -1)
        del hidden0, h0
        init_norm = {s: init[s].norm(dim=-1).clamp_min(1e-8) for s in sites}  # [n_req]
        opt = torch.optim.Adam(list(d_sites.values()), lr=lr)
        active = torch.ones(n_req, dtype=torch.bool, device=device)
        steps_taken = [0] * n_req
        last_loss = torch.zeros(n_req)
        last_nll = torch.zeros(n_req)
        row_count = 0  # row-steps actually computed (the compacted batch's size summed over steps)
        positions = 0  # suffix positions computed, padding included (rows x padded suffix length, summed)

        t1 = time.perf_counter()
        for step in range(steps):
            hiddens = [forward(p) for p in parts]
            row_count += sum(h.shape[0] for h in hiddens)
            positions += sum(h.shape[0] * h.shape[1] for h in hiddens)
            # target and essence positions through the LM head in one product: the head's weight (262k x 640
            # on the bundled model) is read once per step and once more in the backward, not twice each
            hp, ix = picked(hiddens)
            n_tok = len(ix["t_tok"])
            all_lp = torch.log_softmax(final_logits(model, arch, hp).float(), -1)  # [n_tok + n_kl, vocab]
            lp = all_lp[:n_tok].gather(1, ix["t_tok"][:, None])[:, 0]
            nll = torch.zeros(n_req, device=device).index_add(0, ix["tok_req"], -lp * ix["t_w"])  # [n_req]
            loss = nll.clone()
            if len(ix["kl_req"]):
                kl_lp = all_lp[n_tok:]
                ref = ref_kl[ix["kl_req"]]
                kl = (ref.exp() * (ref - kl_lp)).sum(-1)  # [n_kl], KL(orig || edited)
                loss = loss.index_add(0, ix["kl_req"], kl_factor * kl)
            for s in sites:
                loss = loss + weight_decay * d_sites[s].norm(dim=-1) / init_norm[s] ** 2
            was = active.cpu().clone()
            last_loss[was] = loss.detach().cpu()[was]
            last_nll[was] = nll.detach().cpu()[was]
            for i in range(n_req):
                if was[i]:
                    steps_taken[i] = step + 1
            active &= loss.detach() >= early_stop
            if not active.any() or step == steps - 1:
                break
            if bool((active.cpu() != was).any()):
                # requests stopped: drop their rows from every part (layout, prefix cache, replay, indices)
                for part in list(parts):
                    keep_local = active[part["ix"]["row_req"]].nonzero()[:, 0]
                    if len(keep_local) == 0:
                        parts.remove(part)
                        continue
                    part["layout"] = part["layout"].select(keep_local)
                    if part["cache"] is not None:
                        part["cache"].batch_select_indices(keep_local)
                    replay.slot = part["slot"]
                    replay.select(keep_local)
                    part["keep"] = [part["keep"][j] for j in keep_local.tolist()]
                    part["ix"] = index(part["keep"])
            opt.zero_grad()
            loss[active].sum().backward()
            frozen = {s: d_sites[s].detach()[~active].clone() for s in sites}
            opt.step()
            with torch.no_grad():
                for s in sites:
                    d = d_sites[s]
                    d[~active] = frozen[s]
                    limit = clamp * init_norm[s]  # [n_req]
                    norm = d.norm(dim=-1).clamp_min(1e-12)
                    d.mul_(torch.where(norm > limit, limit / norm, torch.ones_like(norm))[:, None])
    timing["steps_s"] += time.perf_counter() - t1
    timing["step_count"] += max(steps_taken)
    timing["row_steps"] = timing.get("row_steps", 0) + row_count
    timing["positions"] = timing.get("positions", 0) + positions
    log.info(
        "values: %d request(s), loss %s after %s steps",
        n_req,
        [round(x, 3) for x in last_loss.tolist()],
        steps_taken,
    )
    return (
        {s: d_sites[s].detach().clone() for s in sites},
        init,
        last_loss.tolist(),
        last_nll.tolist(),
        steps_taken,
    )
