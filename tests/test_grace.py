"""GRACE: the deferral/expand/split rules on constructed keys, and edits on a tiny model (lifelong, undo, save)."""

from __future__ import annotations

import pytest
import torch

import lmedit
from lmedit.core.adapters import GraceCodebook, codebook_forward
from lmedit.core.patch import EditPatch
from lmedit.errors import ConfigError, PatchError
from lmedit.methods.grace import Codebook, update_codebook
from tiny_models import REQ, REQ2, reload_scores, same, state, tiny_loaded

UNRELATED = ["My favourite food is", "The capital of Japan is"]
FAST = dict(steps=15, lr=1.0)


def e(*xs):
    return torch.tensor(xs, dtype=torch.float32)


# ------------------------------------------------------------------------------------- rules, constructed keys
def test_add_expand_split_rules():
    book = Codebook.empty(2, 3)
    assert update_codebook(book, e(0, 0), e(1, 1, 1), "Rome", 1.0) == ("add", 0, None)
    # far away (distance 5 > eps_0 + eps_init = 2): a new entry
    assert update_codebook(book, e(5, 0), e(2, 2, 2), "Paris", 1.0) == ("add", 1, 5.0)
    assert book.epsilons.tolist() == [1.0, 1.0] and book.labels == ["Rome", "Paris"]
    # same label, distance 1.5 (inside eps + eps_init, outside eps): the ball grows to reach the key
    assert update_codebook(book, e(0, 1.5), e(9, 9, 9), "Rome", 1.0) == ("expand", 0, 1.5)
    assert book.epsilons.tolist() == [1.5, 1.0] and len(book) == 2
    # same label already covered: nothing shrinks
    assert update_codebook(book, e(0, 0.5), e(9, 9, 9), "Rome", 1.0) == ("expand", 0, 0.5)
    assert book.epsilons.tolist() == [1.5, 1.0]
    # different label overlapping entry 1 at distance 1.2: both radii become 0.6, new entry holds its value
    action, idx, d = update_codebook(book, e(5, 1.2), e(3, 3, 3), "Berlin", 1.0)
    assert (action, idx) == ("split", 2) and d == pytest.approx(1.2)
    assert book.epsilons.tolist() == pytest.approx([1.5, 0.6, 0.6])
    assert book.labels == ["Rome", "Paris", "Berlin"] and book.values[2].tolist() == [3, 3, 3]


def test_codebook_forward_replaces_only_inside_the_radius():
    keys = e(0, 0, 5, 0).reshape(2, 2)
    values = e(1, 1, 1, 2, 2, 2).reshape(2, 3)
    eps = e(1.0, 0.5)
    x = torch.tensor([[[0.0, 0.9], [5.0, 0.6], [2.5, 0.0], [4.8, 0.1]]])  # [batch 1, pos 4, d_in 2]
    out = torch.arange(12, dtype=torch.float32).reshape(1, 4, 3)
    got = codebook_forward(x, out, keys, values, eps)
    assert got[0, 0].tolist() == [1, 1, 1]  # within key 0's radius
    assert torch.equal(got[0, 1], out[0, 1])  # nearest is key 1 but 0.6 > 0.5
    assert torch.equal(got[0, 2], out[0, 2])  # halfway, outside both
    assert got[0, 3].tolist() == [2, 2, 2]
    assert torch.equal(codebook_forward(x, out, keys[:0], values[:0], eps[:0]), out)


# ---------------------------------------------------------------------------------------------- tiny models
def lp(loaded, prompts, targets):
    return [s.mean_logprob for s in lmedit.score_pairs(loaded, prompts, targets)]


@pytest.fixture(scope="module")
def loaded(smol_tok):
    return tiny_loaded("llama", smol_tok)


@pytest.fixture(scope="module")
def patch(loaded):
    return lmedit.edit(loaded, REQ, method="grace", **FAST)


def test_edit_raises_target_and_leaves_unrelated_prompts_identical(loaded, patch):
    snap = state(loaded.model)
    again = lmedit.edit(loaded, REQ, method="grace", **FAST)
    assert same(loaded.model, snap), "computing the edit never writes the model"
    assert torch.equal(again.adapters[0].tensors["values"], patch.adapters[0].tensors["values"])
    assert patch.deltas == [] and patch.info["edits"][0]["action"] == "add"
    unrelated_before = [s.logprobs for s in lmedit.score_pairs(loaded, UNRELATED, [" Rome"] * 2)]
    gen_before = lmedit.greedy_generate(loaded, UNRELATED, 5)
    before = lp(loaded, [REQ["prompt"]], [REQ["target_new"]])[0]
    with patch.applied(loaded):
        after = lp(loaded, [REQ["prompt"]], [REQ["target_new"]])[0]
        assert [s.logprobs for s in lmedit.score_pairs(loaded, UNRELATED, [" Rome"] * 2)] == unrelated_before
        assert lmedit.greedy_generate(loaded, UNRELATED, 5) == gen_before
        assert lmedit.greedy_generate(loaded, [REQ["prompt"]], 1) == [REQ["target_new"]]
    assert after > before + 3, (before, after)
    assert same(loaded.model, snap)


def test_batched_contrast_keys_equal_one_prompt_at_a_time(loaded, patch):
    from lmedit.methods.grace import _last_token_inputs, _prompt_key

    path = patch.adapters[0].module
    prompts = [
        REQ["prompt"].replace("Eiffel Tower", s) for s in ("Big Ben", "the Statue of Liberty in New York")
    ]
    lens = [len(_prompt_key(loaded, path, t, " Rome")[0].ids) for t in prompts]
    assert lens[0] != lens[1], "right padding is exercised"
    batched = _last_token_inputs(loaded, path, prompts, " Rome")
    for row, t in zip(batched, prompts):
        torch.testing.assert_close(row, _prompt_key(loaded, path, t, " Rome")[1], rtol=1e-5, atol=1e-6)


def test_radius_is_bounded_by_the_nearest_contrast_key(loaded, patch):
    from lmedit.methods.grace import _prompt_key

    path = patch.adapters[0].module
    _, key, _ = _prompt_key(loaded, path, REQ["prompt"], REQ["target_new"])
    subjects = ["Big Ben", "Marie Curie"]
    contrast = [
        _prompt_key(loaded, path, REQ["prompt"].replace("Eiffel Tower", s), " Rome")[1] for s in subjects
    ]
    nearest = min(float(torch.linalg.vector_norm(c - key)) for c in contrast)
    wide = lmedit.edit(loaded, REQ, method="grace", epsilon=1e6, contrast_subjects=subjects, **FAST)
    entry = wide.info["edits"][0]
    assert entry["contrast_distance"] == pytest.approx(nearest, rel=1e-5)
    assert wide.adapters[0].tensors["epsilons"].tolist() == pytest.approx([0.5 * nearest], rel=1e-5)
    with wide.applied(loaded):  # the contrast prompts keep the base model's output
        base = [
            s.logprobs
            for s in lmedit.score_pairs(
                loaded, [REQ["prompt"].replace("Eiffel Tower", s) for s in subjects], [" Rome"] * 2
            )
        ]
    unbounded = lmedit.edit(loaded, REQ, method="grace", epsilon=1e6, contrast_subjects=[], **FAST)
    assert unbounded.adapters[0].tensors["epsilons"].tolist() == [1e6]
    plain = [
        s.logprobs
        for s in lmedit.score_pairs(
            loaded, [REQ["prompt"].replace("Eiffel Tower", s) for s in subjects], [" Rome"] * 2
        )
    ]
    assert base == plain
    with pytest.raises(ConfigError, match="contrast_fraction"):
        lmedit.edit(loaded, REQ, method="grace", contrast_fraction=0)


def test_lifelong_edits_extend_the_codebook_and_undo_restores_it(loaded, patch, tmp_path, smol_tok):
    snap = state(loaded.model)
    name = loaded.arch.module_name("mlp_out", patch.config["layer"])
    session = lmedit.EditSession(loaded)
    session.apply(patch)
    first = loaded.model.get_submodule(name)
    lp1 = lp(loaded, [REQ["prompt"]], [REQ["target_new"]])[0]
    second = lmedit.edit(loaded, REQ2, method="grace", **FAST)
    assert second.adapters[0].parent == first.spec_fingerprint
    assert second.info["codebook_size"] == 2 and second.adapters[0].config["labels"] == ["Rome", "English"]
    assert second.adapters[0].tensors["keys"].shape[0] == 1, "the patch stores only the entry it adds"
    row = sum(second.adapters[0].tensors[k][0].nbytes for k in ("keys", "values"))
    assert second.nbytes == row + 2 * 4, "and keeps nothing else alive (no view of the whole codebook)"
    session.apply(second)
    assert loaded.model.get_submodule(name).keys.shape[0] == 2
    assert isinstance(loaded.model.get_submodule(name), GraceCodebook)
    assert loaded.model.get_submodule(name).base_layer is first.base_layer
    assert lp(loaded, [REQ["prompt"]], [REQ["target_new"]])[0] == pytest.approx(lp1, abs=1e-5), "edit 1 kept"
    prompts = [REQ["prompt"], REQ2["prompt"], *UNRELATED]
    want = [s.logprobs for s in lmedit.score_pairs(loaded, prompts, [" Rome"] * 4)]
    session.undo()
    assert loaded.model.get_submodule(name) is first
    session.reset()
    assert same(loaded.model, snap)
    # the chain saved and loaded reproduces the outputs on a fresh copy of the base model
    chain = [EditPatch.load(p.save(tmp_path / f"p{i}")) for i, p in enumerate([patch, second])]
    fresh = tiny_loaded("llama", smol_tok)
    with chain[0].applied(fresh), chain[1].applied(fresh):
        assert [s.logprobs for s in lmedit.score_pairs(fresh, prompts, [" Rome"] * 4)] == want
    with pytest.raises(PatchError, match="not installed"):
        second.apply(loaded)
    assert same(loaded.model, snap)


def test_saved_grace_patch_reproduces_outputs_in_fresh_model(loaded, patch, tmp_path):
    want, got = reload_scores(patch, loaded, tmp_path / "g", [REQ["prompt"], *UNRELATED])
    assert got == want


def test_gpt2_conv1d_module(smol_tok):
    gpt2 = tiny_loaded("gpt2", smol_tok)
    p = lmedit.edit(gpt2, REQ, method="grace", **FAST)
    before = lp(gpt2, [REQ["prompt"]], [REQ["target_new"]])[0]
    with p.applied(gpt2):
        after = lp(gpt2, [REQ["prompt"]], [REQ["target_new"]])[0]
    assert after > before + 1, (before, after)


def test_refuses_to_extend_a_codebook_under_another_adapter(loaded, patch):
    """A GRACE codebook wrapped by another adapter (here WISE at the same module) cannot be extended."""
    layer = int(patch.adapters[0].module.split(".")[2])  # model.layers.N.mlp.down_proj
    wise = lmedit.edit(loaded, REQ2, method="wise", layer=layer, steps=2, irrelevant_prompts=UNRELATED)
    snap = state(loaded.model)
    with patch.applied(loaded), wise.applied(loaded):
        with pytest.raises(ConfigError, match="GRACE adapter under another adapter"):
            lmedit.edit(loaded, REQ2, method="grace", **FAST)
    assert same(loaded.model, snap)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_cached_prefix_training_equals_full_forward(arch, smol_tok):
    """Training a value on a cached prompt prefix gives the losses of full forward passes; a prompt token
    inside the new entry's ball turns the cache off."""
    from lmedit.core.hooks import Trace
    from lmedit.methods.grace import GraceConfig, _train_value
    from lmedit.models import tokens

    loaded = tiny_loaded(arch, smol_tok)
    path = loaded.arch.module_name("mlp_out", 1)
    base = loaded.model.get_submodule(path)
    enc = tokens.encode_pair(smol_tok, REQ["prompt"], REQ["target_new"])
    pos = enc.prompt_len - 1
    with torch.no_grad(), Trace(loaded.model, path, retain_input=True, stop=True) as tr:
        loaded.model(input_ids=torch.tensor([enc.ids[: pos + 1]]), use_cache=False)
    x, earlier = tr.input[0, pos], tr.input[0, :pos]
    with torch.no_grad():
        out0 = base(x[None, None])[0, 0]
    runs = {}
    for name, prompt_keys in (("cached", earlier), ("full", torch.cat([earlier[:-1], x[None]]))):
        book = Codebook.empty(x.shape[-1], out0.shape[-1])
        update_codebook(book, x, out0, "Rome", 1e-3)
        config = GraceConfig(steps=4, lr=0.1, early_stop_loss=0.0)
        runs[name] = _train_value(loaded, path, base, False, book, 0, enc, prompt_keys, config)
    assert runs["cached"][1] is True and runs["full"][1] is False
    assert runs["cached"][0] == pytest.approx(runs["full"][0], rel=1e-4, abs=1e-5)
    assert runs["cached"][0][-1] < runs["cached"][0][0]
