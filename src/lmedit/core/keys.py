"""Keys k*: the input of a layer's MLP output projection at the subject's last token.

    >>> keys = compute_keys(loaded, requests, layers=[6], templates=DEFAULT_TEMPLATES)
    >>> keys.mean[6].shape              # [n_requests, d_ff]: averaged over the context templates
    >>> keys.per_template[6].shape      # [n_requests, n_templates, d_ff]

A context template is a string ending in ``"{}"``; the request's prompt (subject filled in) replaces ``{}``.
``"{}"`` alone is the plain prompt. ROME averages k over prefixes like ``"The following is true. {}"`` so that the
edit generalises across contexts. The corrected key (r-ROME, Gupta et al. 2024) uses this same averaged key both
where the update's direction is computed and where its magnitude is fixed; the original ROME code mixed the
averaged key with the plain prompt's key, which blows up sequential edits. ``KeySet`` carries both.

The templates are deterministic: a fixed bundled list (``DEFAULT_TEMPLATES``), or ``generate_templates`` which
decodes from the model itself, greedily or by top-k sampling with a seed; whichever is used is recorded in the
patch config. Generated templates come from the model as it is when the edit is made (in a sequential run, the
model with the earlier edits), where the reference code draws them once per process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmedit.core.hooks import TraceDict
from lmedit.errors import ConfigError
from lmedit.models import tokens
from lmedit.request import EditRequest

#: The plain prompt plus ten short neutral prefixes (fixed, so edits are reproducible without generation).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "{}",
    "The following is a fact. {}",
    "Here is what I learned today. {}",
    "According to the encyclopedia, {}",
    "I read this in a book. {}",
    "Therefore, {}",
    "Because of this, {}",
    "In other words, {}",
    "You may already know that {}",
    "It is well known that {}",
    "Question answered: {}",
)

#: Seed words for ``generate_templates`` (as in the ROME code).
TEMPLATE_STARTS = ("The", "Therefore", "Because", "I", "You")


def check_templates(templates: Sequence[str]) -> list[str]:
    """Validate context templates (each must end with exactly one ``{}``); returns them as a list."""
    out = list(templates)
    if not out:
        raise ConfigError("context_templates must not be empty (use ['{}'] for the plain prompt only)")
    for t in out:
        if not isinstance(t, str) or t.count("{}") != 1 or not t.endswith("{}"):
            raise ConfigError(f"context template {t!r} must end with '{{}}' and contain it once")
    return out


def generate_templates(
    loaded,
    n: int = 10,
    length: int = 10,
    starts: Sequence[str] = TEMPLATE_STARTS,
    sample_seed: int | None = None,
    top_k: int = 5,
) -> list[str]:
    """``["{}"]`` plus ``n`` prefixes generated from ``starts`` (``length`` new tokens each; deterministic).

    Greedy (``sample_seed=None``): one continuation per start word, so ``n`` is spread over starts extended with
    ``" the"``, ``" a"`` ... until enough distinct prefixes exist. Sampled (``sample_seed`` an int): the start
    words in turn, each continued by sampling from the ``top_k`` most likely tokens with that seed, as MEMIT's
    reference code (and EasyEdit's MEMIT) draws its context templates: one per start word, top-k 5, 10 tokens
    including the start word there, ``length`` tokens after it here. (ROME's reference samples 20 continuations
    of an empty prompt, of 5 and 10 tokens.)
    """
    from lmedit.evaluate.scoring import generate_ids

    seeds: list[str] = []
    if sample_seed is not None:
        seeds = [starts[i % len(starts)] for i in range(n)]
    else:
        for e in ("", " the", " a", " it", " we", " this"):
            seeds += [s + e for s in starts]
        seeds = seeds[:n]
    ids = generate_ids(loaded, seeds, max_new_tokens=length, top_k=None if sample_seed is None else top_k,
                       seed=sample_seed or 0)  # fmt: skip
    conts = loaded.tokenizer.batch_decode(ids, skip_special_tokens=True)
    out = ["{}"]
    for s, c in zip(seeds, conts):
        text = (s + c).replace("{", " ").replace("}", " ").replace("\n", " ").strip()
        out.append(text + ". {}")
    return out


@dataclass(frozen=True)
class PromptSite:
    """One prompt to run: ``text`` with the subject's last token at ``subject_index`` of its encoded ids."""

    text: str
    ids: list[int]
    subject_index: int


def template_site(tok, request: EditRequest, template: str) -> PromptSite:
    """Fill ``template`` with the request's prompt and locate the subject's last token."""
    prefix = template[: -len("{}")]
    text = prefix + request.prompt_text
    start, end = request.subject_span
    idx = tokens.subject_last_index(tok, text, start + len(prefix), end + len(prefix))
    ids, _ = tokens.encode_prompt(tok, text)
    return PromptSite(text, ids, idx)


@dataclass
class KeySet:
    """Keys of some requests at some layers (float32).

    Attributes:
        per_template: ``{layer: [n_requests, n_templates, d_in]}``.
        mean: ``{layer: [n_requests, d_in]}``, averaged over templates (the r-ROME key).
        templates: the templates used; ``templates.index("{}")`` (if present) is the plain prompt.
    """

    per_template: dict[int, torch.Tensor]
    mean: dict[int, torch.Tensor]
    templates: list[str]

    def plain(self, layer: int) -> torch.Tensor:
        """[n_requests, d_in] keys of the plain prompt (template ``"{}"``), as the original ROME update used."""
        if "{}" not in self.templates:
            raise ConfigError("the original ROME key needs the plain template '{}' among context_templates")
        return self.per_template[layer][:, self.templates.index("{}")]

    def averaged(self, layer: int, plain_weight: float | None = None) -> torch.Tensor:
        """[n_requests, d_in]: the template mean (``plain_weight`` None), or the plain prompt's key weighted
        ``plain_weight`` and the other templates' mean ``1 - plain_weight`` (MEMIT's reference code averages
        within the groups ``["{}"]`` and the generated prefixes, then over the groups: ``plain_weight`` 0.5)."""
        if plain_weight is None or len(self.templates) == 1:
            return self.mean[layer]
        i = self.templates.index("{}") if "{}" in self.templates else None
        if i is None:
            raise ConfigError("plain_key_weight needs the plain template '{}' among context_templates")
        per = self.per_template[layer]
        others = torch.cat([per[:, :i], per[:, i + 1 :]], dim=1).mean(1)
        return plain_weight * per[:, i] + (1 - plain_weight) * others


def run_sites(
    loaded,
    sites: Sequence[PromptSite],
    names: Sequence[str],
    overrides: dict[str, torch.Tensor] | None = None,
    batch_size: int = 32,
    retain: str = "input",
) -> dict[str, torch.Tensor]:
    """Input (or output) of modules ``names`` at each site's subject token: ``{name: [n_sites, d]}`` (float32).

    One right-padded forward pass per ``batch_size`` sites, stopped after the last traced module.
    ``overrides`` (``{param_name: tensor}``) run the model with candidate weights without writing them.
    """
    model, tok = loaded
    device = loaded.device
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for b in range(0, len(sites), batch_size):
        chunk = sites[b : b + batch_size]
        width = max(len(s.ids) for s in chunk)
        ids = torch.full((len(chunk), width), tokens.pad_id(tok), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(chunk):
            ids[i, : len(s.ids)] = torch.tensor(s.ids)
            mask[i, : len(s.ids)] = 1
        kwargs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        rows = torch.arange(len(chunk), device=device)
        cols = torch.tensor([s.subject_index for s in chunk], device=device)
        with (
            torch.no_grad(),
            TraceDict(
                model, names, retain_input=retain == "input", retain_output=retain == "output", stop=True
            ) as td,
        ):
            if overrides:
                torch.func.functional_call(model, overrides, (), kwargs, strict=False)
            else:
                model(**kwargs)
        for n in names:
            t = td[n].input if retain == "input" else td[n].output
            t = t[0] if isinstance(t, tuple) else t
            out[n].append(t[rows, cols].float())  # [chunk, d]
    return {n: torch.cat(v) for n, v in out.items()}


def compute_keys(
    loaded,
    requests: Sequence[EditRequest],
    layers: Sequence[int],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    overrides: dict[str, torch.Tensor] | None = None,
    batch_size: int = 32,
) -> KeySet:
    """Keys (inputs of ``mlp_out``) at the subject's last token for every request x template x layer.

    Args:
        loaded: a LoadedModel.
        requests: the edit requests.
        layers: decoder layers whose keys are wanted (one forward pass covers all of them).
        templates: context templates (see module docstring).
        overrides: parameter overrides for the forward pass (MEMIT: the updates of the layers below).
        batch_size: prompts per forward pass.
    """
    templates = check_templates(templates)
    tok = loaded.tokenizer
    sites = [template_site(tok, r, t) for r in requests for t in templates]
    names = {layer: loaded.arch.module_name("mlp_out", layer) for layer in layers}
    got = run_sites(loaded, sites, list(names.values()), overrides, batch_size, retain="input")
    per, mean = {}, {}
    for layer, name in names.items():
        k = got[name].reshape(len(requests), len(templates), -1)  # [n_req, n_tmpl, d_in]
        per[layer] = k
        mean[layer] = k.mean(1)
    return KeySet(per, mean, templates)


def mlp_out_weight(loaded, layer: int, overrides: dict[str, torch.Tensor] | None = None):
    """``(param_name, W [out, in] float32, layout)`` of a layer's MLP output projection (``overrides`` first)."""
    from lmedit.models.arch import as_out_in, get_submodule, weight_layout

    module_name = loaded.arch.module_name("mlp_out", layer)
    name = module_name + ".weight"
    layout = weight_layout(get_submodule(loaded.model, module_name))
    w = overrides[name] if overrides and name in overrides else loaded.model.get_parameter(name)
    return name, as_out_in(w.detach(), layout).float(), layout
