"""LoRA (peft): merged low-rank deltas in the weight's layout; the model is never written; the edit works."""

from __future__ import annotations

import pytest
import torch

import lmedit
from lmedit.core.delta import LowRankDelta, apply_deltas
from lmedit.errors import ConfigError
from lmedit.methods.lora import LoRAConfig, _lora_layer
from lmedit.models.arch import weight_layout
from tiny_models import REQ, same, state, tiny_loaded

pytest.importorskip("peft")


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_factors_merge_exactly_in_the_weight_layout(smol_tok, model_type):
    """The LowRankDelta built from peft's factors reproduces peft's own LoRA forward (Linear and Conv1D)."""
    loaded = tiny_loaded(model_type, smol_tok)
    name = loaded.arch.module_name("mlp_out", 1)
    module = loaded.model.get_submodule(name)
    layout = weight_layout(module)
    layer = _lora_layer(module, LoRAConfig(rank=3, alpha=6.0), layout)
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # peft starts B at zero
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    delta = LowRankDelta.from_out_in(f"{name}.weight", b * layer.scaling["default"], a.T, layout)
    assert torch.allclose(delta.materialize(), layer.get_delta_weight("default"))
    x = torch.randn(2, 5, a.shape[1])
    with torch.no_grad():
        want = layer(x)
    handle = apply_deltas(loaded.model, [delta])
    with torch.no_grad():
        got = module(x)
    handle.revert()
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_lora_edit_raises_target_without_touching_the_model(smol_tok, model_type):
    loaded = tiny_loaded(model_type, smol_tok)
    snap = state(loaded.model)
    flags = [p.requires_grad for p in loaded.model.parameters()]
    patch = lmedit.edit(loaded, REQ, method="lora", rank=4, steps=12, lr=1e-2, layers=[1, 2])
    assert same(loaded.model, snap) and flags == [p.requires_grad for p in loaded.model.parameters()]
    assert len(patch.deltas) == 2 and all(isinstance(d, LowRankDelta) for d in patch.deltas)
    assert all(d.left.shape[1] == d.right.shape[1] == 4 for d in patch.deltas)
    again = lmedit.edit(loaded, REQ, method="lora", rank=4, steps=12, lr=1e-2, layers=[1, 2])
    assert all(
        torch.equal(x.left, y.left) and torch.equal(x.right, y.right)
        for x, y in zip(patch.deltas, again.deltas)
    )
    score = lambda: lmedit.score_pairs(loaded, [REQ["prompt"]], [REQ["target_new"]])[0].mean_logprob  # noqa: E731
    before = score()
    with patch.applied(loaded):
        after = score()
    assert same(loaded.model, snap)
    assert after > before + 2, (before, after)
    assert patch.info["loss_last"] < patch.info["loss_first"]


def test_config_validation():
    with pytest.raises(ConfigError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ConfigError, match="modules"):
        LoRAConfig(modules=[])


def test_lora_on_a_module_that_carries_an_adapter(smol_tok):
    """LoRA computed and applied on top of a GRACE codebook at the same projection; undo restores all."""
    loaded = tiny_loaded("gpt2", smol_tok)
    snap = state(loaded.model)
    name = loaded.arch.module_name("mlp_out", 1)
    original = loaded.model.get_submodule(name)
    other = dict(
        REQ, prompt="The Colosseum is located in the city of", subject="Colosseum", target_new=" Paris"
    )
    session = lmedit.EditSession(loaded)
    session.apply(lmedit.edit(loaded, other, method="grace", layer=1, steps=10))
    patch = lmedit.edit(loaded, REQ, method="lora", rank=2, steps=10, lr=1e-2, layers=[1], progress=False)
    assert patch.deltas[0].name == f"{name}.weight", "deltas use canonical names"
    session.apply(patch)
    assert loaded.model.get_submodule(name).base_layer is original
    session.reset()
    assert loaded.model.get_submodule(name) is original and same(loaded.model, snap)
