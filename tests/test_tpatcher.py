"""T-Patcher: the patch neuron and its losses on constructed tensors, and edits on a tiny model (sequential, undo,
save/load)."""

from __future__ import annotations

import pytest
import torch

import lmedit
from lmedit.core.adapters import TPatcherNeurons, patch_neurons_forward
from lmedit.errors import ConfigError, PatchError
from lmedit.methods.tpatcher import TPatcherConfig, hinge, neuron_losses
from lmedit.methods.wise import UNRELATED_PROMPTS, module_inputs
from tiny_models import REQ, REQ2, reload_scores, same, state, tiny_loaded

MEMORY = list(UNRELATED_PROMPTS[:4])
FAST = dict(steps=40, lr=0.1, memory_prompts=MEMORY)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


# ------------------------------------------------------------------------------- constructed tensors
def test_neuron_adds_its_value_only_where_it_fires():
    keys = t(1, 0, 0, 1).reshape(2, 2)  # neuron 0 reads feature 0, neuron 1 feature 1
    biases = t(-1, 0)
    values = t(10, 0, 0, 100).reshape(2, 2)
    x = torch.tensor([[[0.5, -1.0], [3.0, 0.0], [3.0, 0.5]]])  # pre-activations (-0.5, -1), (2, 0), (2, 0.5)
    out = torch.arange(6, dtype=torch.float32).reshape(1, 3, 2)
    got = patch_neurons_forward(x, out, keys, biases, values)
    assert torch.equal(got[0, 0], out[0, 0]), "silent neurons add nothing"
    assert got[0, 1].tolist() == (out[0, 1] + t(20, 0)).tolist()
    assert got[0, 2].tolist() == (out[0, 2] + t(20, 50)).tolist()
    assert torch.equal(patch_neurons_forward(x, out, keys[:0], biases[:0], values[:0]), out)


def test_hinge_and_neuron_losses():
    assert hinge(t(-1, 2, 4)).item() == 3.0  # the mean over the positive entries
    assert hinge(t(-1, -2)).item() == 0.0
    cfg = TPatcherConfig(act_margin=1.0, memory_margin=-1.0, memory_gap=2.0)
    act, mem = neuron_losses(torch.tensor(3.0), t(-2, -1.5), cfg)
    assert act.item() == 0 and mem.item() == 0
    # edit at 0.5: 0.5 below the margin; memory -0.5 > -1 by 0.5 and > 0.5 - 2 by 1 (the -3 entry is fine)
    act, mem = neuron_losses(torch.tensor(0.5), t(-0.5, -3), cfg)
    assert act.item() == 0.5 and mem.item() == 0.5 + 1.0


def test_config_validation(loaded):
    with pytest.raises(ConfigError, match="memory_margin"):
        lmedit.edit(loaded, REQ, method="tpatcher", memory_margin=0.5)


def test_an_inlined_mlp_is_refused(smol_tok):
    with pytest.raises(ConfigError, match="no MLP submodule"):
        lmedit.edit(tiny_loaded("opt", smol_tok), REQ, method="tpatcher", steps=1)


# ---------------------------------------------------------------------------------------------- tiny models
def lp(loaded, prompts, target=" Rome"):
    return [s.mean_logprob for s in lmedit.score_pairs(loaded, prompts, [target] * len(prompts))]


@pytest.fixture(scope="module")
def loaded(smol_tok):
    return tiny_loaded("llama", smol_tok)


@pytest.fixture(scope="module")
def patch(loaded):
    return lmedit.edit(loaded, REQ, method="tpatcher", **FAST)


def test_edit_adds_one_neuron_in_the_last_mlp_silent_on_the_memory(loaded, patch):
    snap = state(loaded.model)
    again = lmedit.edit(loaded, REQ, method="tpatcher", **FAST)
    assert same(loaded.model, snap), "computing the edit never writes the model"
    spec = patch.adapters[0]
    assert torch.equal(again.adapters[0].tensors["values"], spec.tensors["values"])
    assert patch.deltas == [] and spec.kind == "tpatcher" and spec.parent is None
    assert spec.module == loaded.arch.module_name("layer", loaded.arch.n_layers(loaded.model) - 1) + ".mlp"
    assert spec.tensors["keys"].shape == (1, loaded.model.config.hidden_size) and spec.tensors[
        "biases"
    ].shape == (1,)
    x_edit, *x_mem = module_inputs(loaded, spec.module, [REQ["prompt"], *MEMORY])
    key, bias = spec.tensors["keys"][0], spec.tensors["biases"][0]
    assert (x_edit[-1] @ key + bias).item() >= 1.0, "the neuron fires on the edit prompt's last token"
    assert (torch.cat(x_mem) @ key + bias).max().item() <= 0, "and is silent on every memory token"
    before = lp(loaded, [REQ["prompt"], *MEMORY])
    with patch.applied(loaded):
        assert isinstance(loaded.model.get_submodule(spec.module), TPatcherNeurons)
        after = lp(loaded, [REQ["prompt"], *MEMORY])
    assert after[0] > before[0] + 3, (before[0], after[0])
    assert after[1:] == before[1:], "memory prompts are unchanged bit for bit"
    assert same(loaded.model, snap)


def test_save_load_reproduces_outputs_on_a_fresh_copy(loaded, patch, tmp_path):
    want, got = reload_scores(patch, loaded, tmp_path / "t", [REQ["prompt"], REQ2["prompt"], *MEMORY])
    assert got == want


def test_sequential_edits_add_neurons_and_undo_restores(loaded, patch):
    snap = state(loaded.model)
    name = patch.adapters[0].module
    base_scores = lp(loaded, [REQ["prompt"]])[0], lp(loaded, [REQ2["prompt"]], " English")[0]
    session = lmedit.EditSession(loaded)
    session.apply(patch)
    first = loaded.model.get_submodule(name)
    second = lmedit.edit(loaded, REQ2, method="tpatcher", **FAST)
    spec = second.adapters[0]
    assert spec.parent == first.spec_fingerprint and spec.tensors["keys"].shape[0] == 1, (
        "stores only its neuron"
    )
    assert spec.config["prompts"] == [REQ["prompt"], REQ2["prompt"]] and second.info["n_neurons"] == 2
    session.apply(second)
    wrapper = loaded.model.get_submodule(name)
    assert wrapper.keys.shape[0] == 2 and wrapper.base_layer is first.base_layer
    assert torch.equal(wrapper.keys[0], first.keys[0])
    scores = lp(loaded, [REQ["prompt"]])[0], lp(loaded, [REQ2["prompt"]], " English")[0]
    assert scores[0] > base_scores[0] + 3 and scores[1] > base_scores[1] + 3, (base_scores, scores)
    # the second neuron had the first edit's prompt in its memory: silent there
    x_first = module_inputs(loaded, name, [REQ["prompt"]])[0]
    assert (x_first @ spec.tensors["keys"][0] + spec.tensors["biases"][0]).max().item() <= 0
    session.undo()
    assert loaded.model.get_submodule(name) is first
    session.reset()
    assert same(loaded.model, snap)
    with pytest.raises(PatchError, match="not installed"):
        second.apply(loaded)
    assert same(loaded.model, snap)


def test_a_batch_gets_one_neuron_per_request(loaded):
    p = lmedit.edit(loaded, [REQ, REQ2], method="tpatcher", **FAST)
    assert p.adapters[0].tensors["keys"].shape[0] == 2 and len(p.info["neurons"]) == 2
    before = lp(loaded, [REQ["prompt"]])[0], lp(loaded, [REQ2["prompt"]], " English")[0]
    with p.applied(loaded):
        after = lp(loaded, [REQ["prompt"]])[0], lp(loaded, [REQ2["prompt"]], " English")[0]
    assert after[0] > before[0] + 3 and after[1] > before[1] + 3, (before, after)


def test_stacks_with_a_wise_side_memory_in_the_same_layer(loaded):
    snap = state(loaded.model)
    session = lmedit.EditSession(loaded, check=False)
    session.apply(lmedit.edit(loaded, REQ, method="wise", layer=3, steps=5))
    tp = lmedit.edit(loaded, REQ2, method="tpatcher", **FAST)
    down = f"{tp.adapters[0].module}.down_proj.weight"
    assert down in tp.base["fingerprints"], "parameters under the WISE wrapper are named canonically"
    session.apply(tp)
    mlp = loaded.model.get_submodule(tp.adapters[0].module)
    assert isinstance(mlp, TPatcherNeurons) and mlp.base_layer.down_proj.kind == "wise"
    session.reset()
    assert same(loaded.model, snap)


def test_replaying_the_layers_below_the_patched_mlp_changes_nothing(loaded, patch, monkeypatch):
    import contextlib

    import lmedit.methods.tpatcher as tpatcher

    monkeypatch.setattr(tpatcher, "replay_below", lambda *a: contextlib.nullcontext())
    full = lmedit.edit(loaded, REQ, method="tpatcher", **FAST)
    for name in ("keys", "biases", "values"):
        assert torch.equal(full.adapters[0].tensors[name], patch.adapters[0].tensors[name]), name


def test_the_chain_keeps_its_prompt_inputs_so_the_next_edit_does_not_re_encode_them(
    loaded, patch, monkeypatch
):
    import dataclasses

    import lmedit.methods.tpatcher as tpatcher

    snap = state(loaded.model)
    name = patch.adapters[0].module
    encoded: list[str] = []

    def spy(loaded_, path, prompts):
        encoded.extend(prompts)
        return module_inputs(loaded_, path, prompts)

    monkeypatch.setattr(tpatcher, "module_inputs", spy)
    session = lmedit.EditSession(loaded)
    session.apply(patch)
    wrapper = loaded.model.get_submodule(name)
    want = module_inputs(loaded, name, [REQ["prompt"]])[0]
    assert torch.allclose(wrapper.prompt_inputs, want), "the wrapper holds the edit prompt's MLP inputs"
    encoded.clear()
    kept = lmedit.edit(loaded, REQ2, method="tpatcher", **FAST)
    assert REQ["prompt"] not in encoded, "the earlier edit prompt was re-encoded"
    session.apply(kept)
    both = module_inputs(loaded, name, [REQ["prompt"], REQ2["prompt"]])  # one padded batch: rounding differs
    assert torch.allclose(loaded.model.get_submodule(name).prompt_inputs, torch.cat(both), atol=1e-5)
    session.reset()

    # a chain saved before the wrapper kept them (no prompt_inputs): the earlier prompts are encoded instead,
    # and the neuron comes out the same
    spec = patch.adapters[0]
    old_spec = dataclasses.replace(
        spec, tensors={k: v for k, v in spec.tensors.items() if k != "prompt_inputs"}
    )
    session.apply(dataclasses.replace(patch, adapters=[old_spec]))
    assert loaded.model.get_submodule(name).prompt_inputs is None
    encoded.clear()
    again = lmedit.edit(loaded, REQ2, method="tpatcher", **FAST)
    assert REQ["prompt"] in encoded
    for key in ("keys", "biases", "values"):
        assert torch.allclose(again.adapters[0].tensors[key], kept.adapters[0].tensors[key], atol=1e-6), key
    session.apply(again)  # extending an old chain: it still has no prompt_inputs, so the next edit re-encodes
    assert loaded.model.get_submodule(name).prompt_inputs is None
    session.reset()
    assert same(loaded.model, snap)
