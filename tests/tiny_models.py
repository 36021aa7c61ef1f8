"""Tiny random models of every ArchSpec table entry, built from configs (no downloads), with a real tokenizer."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lmedit.models.load import LoadedModel, _prepare

_D = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
)
_HEAD8 = dict(_D, head_dim=8)

#: model_type -> config kwargs (vocab_size and positions are filled in from the tokenizer).
#: Edit requests shared by the method tests.
REQ = {
    "prompt": "The Eiffel Tower is located in the city of",
    "subject": "Eiffel Tower",
    "target_new": " Rome",
}
REQ2 = {
    "prompt": "The mother tongue of Danielle Darrieux is",
    "subject": "Danielle Darrieux",
    "target_new": " English",
}

TINY_CONFIGS: dict[str, dict] = {
    "llama": _D,
    "mistral": _D,
    "qwen2": _D,
    "qwen3": _HEAD8,
    "gemma": _HEAD8,
    "gemma2": _HEAD8,
    "gemma3_text": _HEAD8,
    "olmo": _D,
    "olmo2": _D,
    "phi3": _D,
    "gpt2": dict(n_embd=32, n_layer=4, n_head=4),
    "gptj": dict(n_embd=32, n_layer=4, n_head=4, rotary_dim=4),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4),
    "opt": dict(
        hidden_size=32, ffn_dim=64, num_hidden_layers=4, num_attention_heads=4, word_embed_proj_dim=32
    ),
    "gemma3": {},  # multimodal wrapper, built separately below
}


def tiny_model(
    model_type: str, vocab_size: int, seed: int = 0, n_layers: int = 4, init_std: float | None = 0.2
) -> torch.nn.Module:
    """A tiny random ``model_type``; ``init_std`` re-draws every weight matrix (None: transformers' init)."""
    torch.manual_seed(seed)
    if model_type == "gemma3":
        from transformers import Gemma3Config

        cfg = Gemma3Config(
            text_config=dict(_HEAD8, vocab_size=vocab_size, max_position_embeddings=256),
            vision_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            mm_tokens_per_image=4,
        )
    else:
        kw = dict(TINY_CONFIGS[model_type], vocab_size=vocab_size)
        kw["n_layer" if model_type in ("gpt2", "gptj") else "num_hidden_layers"] = n_layers
        kw["n_positions" if model_type in ("gpt2", "gptj") else "max_position_embeddings"] = 256
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            kw[key] = 0
        cfg = AutoConfig.for_model(model_type, **kw)
    model = AutoModelForCausalLM.from_config(cfg)
    if init_std is not None:
        # random init is tiny in scale; make the weights large enough that edits have to do something
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, init_std)
    return model


def tiny_loaded(model_type: str, tokenizer, seed: int = 0, **kw) -> LoadedModel:
    model = tiny_model(model_type, len(tokenizer), seed, **kw)
    return _prepare(model, tokenizer, None, f"tiny-{model_type}", {"kind": "tiny"})


def state(model):
    """A copy of every tensor of ``model``'s state dict (to check later that nothing was written)."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(model, snapshot):
    """True when ``model`` holds exactly the tensors of ``snapshot`` (same names, bit for bit)."""
    sd = model.state_dict()
    return sd.keys() == snapshot.keys() and all(torch.equal(snapshot[k], v) for k, v in sd.items())


def reload_scores(patch, loaded: LoadedModel, path, prompts: list[str], target: str = " Rome"):
    """Per-token log-probs of ``target`` after ``prompts`` under ``patch`` applied to ``loaded``, and under the
    patch saved to ``path`` and loaded onto a fresh tiny llama with the same seed: ``(want, got)``."""
    import lmedit
    from lmedit.core.patch import EditPatch

    reloaded = EditPatch.load(patch.save(path))
    with patch.applied(loaded):
        want = [s.logprobs for s in lmedit.score_pairs(loaded, prompts, [target] * len(prompts))]
    fresh = tiny_loaded("llama", loaded.tokenizer)
    with reloaded.applied(fresh):
        got = [s.logprobs for s in lmedit.score_pairs(fresh, prompts, [target] * len(prompts))]
    return want, got
