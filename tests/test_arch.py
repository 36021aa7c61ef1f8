"""Every ArchSpec table entry resolves on a tiny random model; the weight layout comes from the module type."""

from __future__ import annotations

import pytest
import torch

from lmedit.core.hooks import Trace
from lmedit.errors import ArchitectureError
from lmedit.models.arch import ARCH_TABLE, ArchSpec, as_out_in, get_submodule, resolve_arch, weight_layout
from tiny_models import TINY_CONFIGS, tiny_loaded, tiny_model


def test_table_covers_required_types():
    required = {
        "llama",
        "mistral",
        "qwen2",
        "gemma",
        "gemma2",
        "gemma3",
        "gemma3_text",
        "gpt2",
        "gptj",
        "gpt_neox",
        "phi3",
        "opt",
    }
    assert required <= set(ARCH_TABLE)
    assert set(TINY_CONFIGS) == set(ARCH_TABLE), "every table entry needs a tiny-model test config"


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_entry_resolves_and_components_behave(model_type, smol_tok):
    loaded = tiny_loaded(model_type, smol_tok)
    model, spec = loaded.model, loaded.arch
    assert spec.n_layers(model) == 4
    ids = torch.tensor([smol_tok("The Eiffel Tower is in")["input_ids"]])
    # mlp_out's input has the MLP width, its output the model width; layout from the module type
    mod = get_submodule(model, spec.module_name("mlp_out", 1))
    with Trace(model, spec.module_name("mlp_out", 1), retain_input=True) as tr:
        full = model(input_ids=ids).logits
    d_model = tr.output.shape[-1]
    w = as_out_in(mod.weight, weight_layout(mod))
    assert w.shape == (d_model, tr.input.shape[-1])
    # the final norm + LM head reproduce the model's logits (final_logits handles soft-capping)
    from lmedit.core.forward import final_hidden
    from lmedit.models.arch import final_logits

    hidden = final_hidden(model, spec, ids, torch.ones_like(ids))
    torch.testing.assert_close(final_logits(model, spec, hidden), full, rtol=1e-4, atol=1e-4)


def test_gpt2_conv1d_layout_is_from_type_not_shape(smol_tok):
    # a square Conv1D: shapes cannot tell the orientation, the module type does
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(8, 8)
    assert weight_layout(conv) == "in_out"
    assert weight_layout(torch.nn.Linear(8, 8)) == "out_in"
    x = torch.randn(3, 8)
    torch.testing.assert_close(conv(x), x @ as_out_in(conv.weight, "in_out").T + conv.bias)
    with pytest.raises(ArchitectureError, match="only nn.Linear"):
        weight_layout(torch.nn.Conv2d(1, 1, 1))


def test_unknown_type_lists_known_and_escape_hatch(smol_tok):
    model = tiny_model("llama", len(smol_tok))
    model.config.model_type = "mystery"
    with pytest.raises(ArchitectureError) as e:
        resolve_arch(model)
    msg = str(e.value)
    assert "mystery" in msg and "llama" in msg and "ArchSpec(" in msg
    spec = ArchSpec(
        "mystery",
        layers="model.layers",
        mlp_in="mlp.up_proj",
        mlp_out="mlp.down_proj",
        attn_out="self_attn.o_proj",
        ln_f="model.norm",
        lm_head="lm_head",
        embed="model.embed_tokens",
    )
    assert resolve_arch(model, spec) == spec
    # a dict override with every path works too
    assert (
        resolve_arch(model, {k: v for k, v in spec.to_dict().items() if k != "name"}).mlp_out
        == "mlp.down_proj"
    )


def test_bad_override_path_names_the_module(smol_tok):
    model = tiny_model("llama", len(smol_tok))
    with pytest.raises(ArchitectureError, match="mlp.nope"):
        resolve_arch(model, {"mlp_out": "mlp.nope"})
