"""Adapters in patches: exact install/remove, disk round-trip into a fresh model, refusals, device/dtype, sessions."""

from __future__ import annotations

import json

import pytest
import torch

import lmedit
from lmedit.core.adapters import AdapterSpec, GraceCodebook, install_adapters, installed_adapter, resolve_name
from lmedit.core.delta import DenseDelta
from lmedit.core.hooks import Trace, active_hook_count
from lmedit.core.patch import EditPatch
from lmedit.errors import PatchError
from lmedit.models import tokens
from tiny_models import same, state, tiny_loaded

PROMPT = "The Eiffel Tower is located in the city of"
OTHER = "My favourite food is"
LAYER = 2


@pytest.fixture(scope="module")
def loaded(smol_tok):
    return tiny_loaded("llama", smol_tok)


def module_name(loaded):
    return loaded.arch.module_name("mlp_out", LAYER)


def key_of(loaded, prompt):
    """Input of the wrapped module at the prompt's last token, [d_in]."""
    ids, _ = tokens.encode_prompt(loaded.tokenizer, prompt)
    with torch.no_grad(), Trace(loaded.model, module_name(loaded), retain_input=True, stop=True) as tr:
        loaded.model(input_ids=torch.tensor([ids]))
    return tr.input[0, -1].clone()


def grace_spec(loaded, value_scale=5.0, parent=None, labels=("Rome",), prompts=(PROMPT,), seed=0):
    """A GRACE spec adding one entry per prompt (keys at their last token, random values) to ``parent``."""
    keys = torch.stack([key_of(loaded, p) for p in prompts])  # [m, d_ff]
    d_out = loaded.model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(len(prompts), d_out, generator=g) * value_scale  # [m, d_out]
    return AdapterSpec(
        "grace",
        module_name(loaded),
        config={"labels": list(labels), "epsilon_init": 1.0},
        tensors={"keys": keys, "values": values, "epsilons": torch.ones(len(labels))},
        parent=parent,
    )


def adapter_patch(loaded, spec, deltas=()):
    params = [f"{spec.module}.weight"] + [d.name for d in deltas]
    return EditPatch("manual", {}, [], list(deltas), EditPatch.base_of(loaded, params), adapters=[spec])


def outputs(loaded, prompts=(PROMPT, OTHER)):
    return [s.logprobs for s in lmedit.score_pairs(loaded, list(prompts), [" Rome"] * len(prompts))]


def test_install_and_remove_restore_the_same_module_object(loaded):
    snap = state(loaded.model)
    name = module_name(loaded)
    original = loaded.model.get_submodule(name)
    before = outputs(loaded)
    patch = adapter_patch(loaded, grace_spec(loaded))
    with patch.applied(loaded):
        wrapper = loaded.model.get_submodule(name)
        assert isinstance(wrapper, GraceCodebook) and wrapper.base_layer is original
        assert installed_adapter(loaded.model, name, "grace") is wrapper
        during = outputs(loaded)
        assert active_hook_count(loaded.model) == 0, "adapters are modules, not hooks"
    assert loaded.model.get_submodule(name) is original
    assert same(loaded.model, snap)
    assert outputs(loaded) == before
    assert during[0] != before[0], "the prompt whose key is in the codebook gets the value"
    assert during[1] == before[1], "a prompt far from every key is bit-identical"


def test_save_load_into_fresh_model_gives_identical_outputs(loaded, tmp_path, smol_tok):
    patch = adapter_patch(loaded, grace_spec(loaded))
    out = patch.save(tmp_path / "p")
    meta = json.loads((out / "patch.json").read_text())
    assert meta["adapters"] == [
        {
            "index": 0,
            "kind": "grace",
            "module": module_name(loaded),
            "config": {"labels": ["Rome"], "epsilon_init": 1.0},
            "parent": None,
            "tensors": ["epsilons", "keys", "values"],
        }
    ]
    reloaded = EditPatch.load(out)
    assert reloaded.adapters[0].fingerprint() == patch.adapters[0].fingerprint()
    prompts = [PROMPT, OTHER]
    with patch.applied(loaded):
        want = outputs(loaded)
        want_gen = lmedit.greedy_generate(loaded, prompts, 4)
    fresh = tiny_loaded("llama", smol_tok)  # same seed: an identical, separate copy of the base model
    snap = state(fresh.model)
    with reloaded.applied(fresh):
        assert outputs(fresh) == want
        assert lmedit.greedy_generate(fresh, prompts, 4) == want_gen
    assert same(fresh.model, snap)
    assert "adapters: 1" in reloaded.summary() and "grace" in reloaded.summary()


def test_patch_for_another_base_is_refused(loaded, smol_tok):
    patch = adapter_patch(loaded, grace_spec(loaded))
    other = tiny_loaded("llama", smol_tok, seed=1)
    original = other.model.get_submodule(module_name(other))
    with pytest.raises(PatchError, match="another base model"):
        patch.apply(other)
    assert other.model.get_submodule(module_name(other)) is original


def test_replacing_adapter_requires_its_parent(loaded):
    name = module_name(loaded)
    original = loaded.model.get_submodule(name)
    before_other = outputs(loaded, [OTHER])
    first = grace_spec(loaded)
    second = grace_spec(loaded, parent=first.fingerprint(), labels=("Rome", "Paris"), prompts=(OTHER,))
    with pytest.raises(PatchError, match="not installed"):
        install_adapters(loaded.model, [second])
    assert loaded.model.get_submodule(name) is original
    h1 = install_adapters(loaded.model, [first])
    w1 = loaded.model.get_submodule(name)
    try:
        with pytest.raises(PatchError, match="does not extend"):
            install_adapters(loaded.model, [grace_spec(loaded, value_scale=1.0)])
        assert loaded.model.get_submodule(name) is w1
        h2 = install_adapters(loaded.model, [second])
        w2 = loaded.model.get_submodule(name)
        assert isinstance(w2, GraceCodebook) and w2.base_layer is original, (
            "the new codebook replaces the old"
        )
        assert torch.equal(w2.keys, torch.cat([first.tensors["keys"], second.tensors["keys"]]))
        assert torch.equal(w2.values[:1], w1.values) and w2.keys.data_ptr() == w1.keys.data_ptr(), (
            "shared rows"
        )
        assert outputs(loaded, [OTHER]) != before_other
        h2.revert()
        assert loaded.model.get_submodule(name) is w1 and w1.keys.shape[0] == 1
        # a different extension of the same parent (a branch after undo) must not overwrite what w2 saw
        third = grace_spec(
            loaded, parent=first.fingerprint(), labels=("Rome", "Oslo"), prompts=(OTHER,), seed=1
        )
        h3 = install_adapters(loaded.model, [third])
        w3 = loaded.model.get_submodule(name)
        assert torch.equal(w3.values[1], third.tensors["values"][0])
        assert torch.equal(w2.values[1], second.tensors["values"][0])
        h3.revert()
    finally:
        h1.revert()
    assert loaded.model.get_submodule(name) is original


def test_deltas_and_adapters_together_on_a_wrapped_module(loaded):
    snap = state(loaded.model)
    spec = grace_spec(loaded)
    wname = f"{spec.module}.weight"
    delta = DenseDelta(wname, torch.full_like(loaded.model.get_parameter(wname), 0.01))
    patch = adapter_patch(loaded, spec, [delta])
    with patch.applied(loaded):
        assert resolve_name(loaded.model, wname) == f"{spec.module}.base_layer.weight"
        w = loaded.model.get_parameter(f"{spec.module}.base_layer.weight")
        assert torch.allclose(w, snap[wname] + 0.01)
    assert same(loaded.model, snap)


def test_adapters_follow_model_dtype(smol_tok):
    fresh = tiny_loaded("llama", smol_tok)
    patch = adapter_patch(fresh, grace_spec(fresh))
    handle = patch.apply(fresh)
    try:
        wrapper = fresh.model.get_submodule(module_name(fresh))
        assert wrapper.keys.dtype == torch.float32
        fresh.model.to(torch.bfloat16)
        assert wrapper.keys.dtype == wrapper.values.dtype == torch.bfloat16
        assert patch.adapters[0].tensors["keys"].dtype == torch.float32, "the spec keeps the exact tensors"
        lp = outputs(fresh)
        assert all(torch.isfinite(torch.tensor(x)).all() for x in lp)
    finally:
        handle.revert()
    assert fresh.model.get_submodule(module_name(fresh)) is wrapper.base_layer


def test_session_undo_removes_adapter(loaded):
    name = module_name(loaded)
    original = loaded.model.get_submodule(name)
    snap = state(loaded.model)
    session = lmedit.EditSession(loaded, check=False)
    session.apply(adapter_patch(loaded, grace_spec(loaded)))
    assert isinstance(loaded.model.get_submodule(name), GraceCodebook)
    session.undo()
    assert loaded.model.get_submodule(name) is original and same(loaded.model, snap)


def test_unknown_adapter_kind_is_refused(loaded):
    spec = AdapterSpec("nope", module_name(loaded))
    with pytest.raises(PatchError, match="unknown adapter kind"):
        install_adapters(loaded.model, [spec])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adapters_follow_model_device(smol_tok):
    fresh = tiny_loaded("llama", smol_tok)
    patch = adapter_patch(fresh, grace_spec(fresh))
    with patch.applied(fresh):
        want = outputs(fresh)
    fresh.model.to("cuda")
    with patch.applied(fresh):
        wrapper = fresh.model.get_submodule(module_name(fresh))
        assert wrapper.keys.device.type == "cuda"
        got = outputs(fresh)
    assert [pytest.approx(w, abs=1e-3) for w in want] == got
