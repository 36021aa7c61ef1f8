"""Architecture facts as data: one ArchSpec per ``config.model_type``.

Everything in lmedit that needs to find a layer, an MLP projection, the final norm or the LM head asks the
ArchSpec, never the model's class name. Adding a model family is one entry in ``ARCH_TABLE`` plus a tiny-model
test.

    >>> spec = resolve_arch(model)                      # from model.config.model_type
    >>> spec.module_name("mlp_out", 5)                  # 'model.layers.5.mlp.down_proj'
    >>> custom = ArchSpec("mine", layers="blocks", mlp_in="ff.w1", mlp_out="ff.w2", attn_out="att.proj",
    ...                   ln_f="norm", lm_head="head", embed="tok_emb")   # the raw-path escape hatch
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields, replace

import torch
from torch import nn

from lmedit.errors import ArchitectureError

#: Components that live inside each decoder layer (paths relative to the layer module).
LAYER_COMPONENTS = ("mlp_in", "mlp_out", "attn_out")
#: Components addressed from the model root.
ROOT_COMPONENTS = ("layers", "ln_f", "lm_head", "embed")


@dataclass(frozen=True)
class ArchSpec:
    """Where the editable parts of a decoder-only transformer live.

    Attributes:
        name: the ``model_type`` this entry describes (or a free name for hand-made specs).
        layers: path of the ``ModuleList`` of decoder layers, from the model root.
        mlp_in: path of the MLP input (key) projection inside a layer; for gated MLPs the up projection.
        mlp_out: path of the MLP output (value) projection inside a layer; its input is the key k, its output
            the MLP's additive update to the residual stream.
        attn_out: path of the attention output projection inside a layer.
        ln_f: path of the final norm, from the root.
        lm_head: path of the unembedding, from the root.
        embed: path of the token embedding, from the root.
        mlp_post_norm: path of a norm applied to the MLP's output before it joins the residual stream, inside
            a layer (Gemma 2/3 and OLMo 2's ``post_feedforward_layernorm``), or None. Where it exists, a change
            of the output projection's output reaches the residual stream through that norm.
    """

    name: str
    layers: str
    mlp_in: str
    mlp_out: str
    attn_out: str
    ln_f: str
    lm_head: str
    embed: str
    mlp_post_norm: str | None = None

    def module_name(self, component: str, layer: int | None = None) -> str:
        """Full dotted module name of ``component`` (``layer`` required for per-layer components)."""
        if component in LAYER_COMPONENTS:
            if layer is None:
                raise ValueError(f"component {component!r} lives in a layer: pass layer=")
            return f"{self.layers}.{layer}.{getattr(self, component)}"
        if component == "layer":
            return f"{self.layers}.{layer}"
        if component == "mlp_post_norm":
            if self.mlp_post_norm is None or layer is None:
                raise ValueError(f"{self.name} has no MLP post-norm (or no layer= given)")
            return f"{self.layers}.{layer}.{self.mlp_post_norm}"
        if component in ROOT_COMPONENTS:
            return getattr(self, component)
        raise ValueError(f"unknown component {component!r}; known: {LAYER_COMPONENTS + ROOT_COMPONENTS}")

    def n_layers(self, model: nn.Module) -> int:
        return len(get_submodule(model, self.layers))

    def to_dict(self) -> dict:
        return asdict(self)


def _llama_like(name: str) -> ArchSpec:
    return ArchSpec(
        name,
        layers="model.layers",
        mlp_in="mlp.up_proj",
        mlp_out="mlp.down_proj",
        attn_out="self_attn.o_proj",
        ln_f="model.norm",
        lm_head="lm_head",
        embed="model.embed_tokens",
    )


_GPT2 = dict(
    layers="transformer.h",
    mlp_in="mlp.c_fc",
    mlp_out="mlp.c_proj",
    attn_out="attn.c_proj",
    ln_f="transformer.ln_f",
    lm_head="lm_head",
    embed="transformer.wte",
)

#: The table. Keys are ``config.model_type`` values.
ARCH_TABLE: dict[str, ArchSpec] = {
    **{t: _llama_like(t) for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo")},
    **{
        t: replace(_llama_like(t), mlp_post_norm="post_feedforward_layernorm")
        for t in ("gemma2", "gemma3_text", "olmo2")
    },
    "phi3": replace(_llama_like("phi3"), mlp_in="mlp.gate_up_proj"),
    "gemma3": ArchSpec(
        "gemma3",
        layers="model.language_model.layers",
        mlp_in="mlp.up_proj",
        mlp_out="mlp.down_proj",
        attn_out="self_attn.o_proj",
        ln_f="model.language_model.norm",
        lm_head="lm_head",
        embed="model.language_model.embed_tokens",
        mlp_post_norm="post_feedforward_layernorm",
    ),
    "gpt2": ArchSpec("gpt2", **_GPT2),
    "gptj": ArchSpec(
        "gptj",
        layers="transformer.h",
        mlp_in="mlp.fc_in",
        mlp_out="mlp.fc_out",
        attn_out="attn.out_proj",
        ln_f="transformer.ln_f",
        lm_head="lm_head",
        embed="transformer.wte",
    ),
    "gpt_neox": ArchSpec(
        "gpt_neox",
        layers="gpt_neox.layers",
        mlp_in="mlp.dense_h_to_4h",
        mlp_out="mlp.dense_4h_to_h",
        attn_out="attention.dense",
        ln_f="gpt_neox.final_layer_norm",
        lm_head="lm_head|embed_out",  # transformers >= 5 | older releases
        embed="gpt_neox.embed_in",
    ),
    "opt": ArchSpec(
        "opt",
        layers="model.decoder.layers",
        mlp_in="fc1",
        mlp_out="fc2",
        attn_out="self_attn.out_proj",
        ln_f="model.decoder.final_layer_norm",
        lm_head="lm_head",
        embed="model.decoder.embed_tokens",
    ),
}


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` with an error that says which path failed and what exists there."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        parent, _, _ = name.rpartition(".")
        try:
            children = [n for n, _ in model.get_submodule(parent).named_children()] if parent else []
        except AttributeError:
            children = []
        raise ArchitectureError(
            f"module {name!r} not found in {type(model).__name__}"
            + (f"; children of {parent!r}: {children}" if children else "")
            + ". Pass a corrected ArchSpec (load_model(..., arch=ArchSpec(...)))."
        ) from None


def resolve_arch(model: nn.Module, override: ArchSpec | dict | None = None) -> ArchSpec:
    """The ArchSpec of ``model``, from ``model.config.model_type`` (or ``override``), checked to resolve.

    ``override`` may be a full ArchSpec, or a dict of fields replacing those of the table entry.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(override, ArchSpec):
        spec = override
    else:
        spec = ARCH_TABLE.get(model_type)
        required = {f.name for f in fields(ArchSpec) if f.default is MISSING} - {"name"}
        if spec is None and not (override and set(override) >= required):
            raise ArchitectureError(
                f"unsupported architecture model_type={model_type!r}. Known: {sorted(ARCH_TABLE)}. "
                "For another decoder-only model pass its module paths by hand, e.g. "
                "load_model(spec, arch=ArchSpec(name, layers='model.layers', mlp_in='mlp.up_proj', "
                "mlp_out='mlp.down_proj', attn_out='self_attn.o_proj', ln_f='model.norm', "
                "lm_head='lm_head', embed='model.embed_tokens')) or --arch-json on the CLI."
            )
        if override:
            unknown = set(override) - set(ArchSpec.__dataclass_fields__)
            if unknown:
                raise ArchitectureError(f"unknown ArchSpec fields {sorted(unknown)}")
            spec = (
                ArchSpec(**{"name": model_type or "custom", **override})
                if spec is None
                else replace(spec, **override)
            )
    spec = _pick_alternatives(model, spec)
    layers = get_submodule(model, spec.layers)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ArchitectureError(f"{spec.layers!r} is not a non-empty ModuleList of decoder layers")
    for comp in LAYER_COMPONENTS:
        get_submodule(model, spec.module_name(comp, 0))
    for comp in ("ln_f", "lm_head", "embed"):
        get_submodule(model, spec.module_name(comp))
    if spec.mlp_post_norm is not None:
        get_submodule(model, spec.module_name("mlp_post_norm", 0))
    return spec


def _pick_alternatives(model: nn.Module, spec: ArchSpec) -> ArchSpec:
    """Table paths may list alternatives ``"a|b"`` (module names that changed between transformers releases);
    keep the first that exists in ``model``."""
    chosen = {}
    for f in ArchSpec.__dataclass_fields__:
        value = getattr(spec, f)
        if f == "name" or value is None or "|" not in value:
            continue
        options = value.split("|")
        for option in options:
            path = f"{spec.layers.split('|')[0]}.0.{option}" if f in LAYER_COMPONENTS else option
            try:
                model.get_submodule(path)
            except AttributeError:
                continue
            chosen[f] = option
            break
        else:
            chosen[f] = options[0]
    return replace(spec, **chosen) if chosen else spec


def weight_layout(module: nn.Module) -> str:
    """``"out_in"`` for ``nn.Linear`` (weight [out, in]); ``"in_out"`` for GPT-2's Conv1D (weight [in, out]).

    Decided from the module's type, never from tensor shapes (square matrices make shapes ambiguous).
    """
    if isinstance(module, nn.Linear):
        return "out_in"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "in_out"
    raise ArchitectureError(
        f"cannot edit weights of {type(module).__name__}: only nn.Linear and transformers' Conv1D are supported"
    )


def as_out_in(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """View of a projection weight as [out_features, in_features] whatever its storage layout."""
    return weight if layout == "out_in" else weight.T


def final_logits(
    model: nn.Module, spec: ArchSpec, hidden: torch.Tensor, vocab: slice | None = None
) -> torch.Tensor:
    """Logits from final-norm outputs ``hidden`` [..., d_model], including any final logit soft-capping.

    ``vocab`` (a slice of token ids) computes only those logits; it needs a linear LM head.
    """
    head = get_submodule(model, spec.lm_head)
    if vocab is None:
        logits = head(hidden)
    else:
        bias = None if head.bias is None else head.bias[vocab]
        logits = torch.nn.functional.linear(hidden, head.weight[vocab], bias)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
