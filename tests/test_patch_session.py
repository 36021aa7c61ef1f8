"""Patches: apply/revert bit for bit, disk round-trip, atomic save, fingerprint refusal; sessions: undo, transactions."""

from __future__ import annotations

import json
import os

import pytest
import torch

import lmedit
from lmedit.core.delta import DenseDelta, LowRankDelta, apply_deltas, fingerprint
from lmedit.core.patch import EditPatch
from lmedit.errors import EditFailedError, PatchError
from tiny_models import REQ, same, state, tiny_loaded


@pytest.fixture(scope="module")
def loaded(smol_tok):
    return tiny_loaded("llama", smol_tok)


@pytest.fixture(scope="module")
def patch(loaded):
    return lmedit.edit(loaded, REQ, method="ft-m", steps=5, lr=1e-2, progress=False)


def test_edit_leaves_model_untouched_and_patch_changes_it(loaded, patch):
    snap = state(loaded.model)
    p2 = lmedit.edit(loaded, REQ, method="ft-m", steps=5, lr=1e-2, progress=False)
    assert same(loaded.model, snap)
    assert all(torch.equal(a.delta, b.delta) for a, b in zip(patch.deltas, p2.deltas)), (
        "seeded edits are deterministic"
    )
    before = lmedit.score_pairs(loaded, [REQ["prompt"]], [REQ["target_new"]])[0].mean_logprob
    with patch.applied(loaded.model):
        assert not same(loaded.model, snap)
        after = lmedit.score_pairs(loaded, [REQ["prompt"]], [REQ["target_new"]])[0].mean_logprob
    assert same(loaded.model, snap)
    assert after > before


def test_lowrank_delta_in_bf16_reverts_bitwise(smol_tok):
    loaded = tiny_loaded("gpt2", smol_tok)
    loaded.model.to(torch.bfloat16)
    snap = state(loaded.model)
    name = loaded.arch.module_name("mlp_out", 1) + ".weight"
    w = loaded.model.get_parameter(name)
    d = LowRankDelta(name, torch.randn(w.shape[0], 2), torch.randn(w.shape[1], 2))
    h = apply_deltas(loaded.model, [d])
    assert not same(loaded.model, snap)
    h.revert()
    assert same(loaded.model, snap)


def test_failed_apply_restores_everything(loaded):
    snap = state(loaded.model)
    n1 = loaded.arch.module_name("mlp_out", 0) + ".weight"
    n2 = loaded.arch.module_name("mlp_out", 1) + ".weight"
    good = DenseDelta(n1, torch.ones_like(loaded.model.get_parameter(n1)))
    bad = DenseDelta(n2, torch.full_like(loaded.model.get_parameter(n2), float("nan")))
    with pytest.raises(EditFailedError, match="non-finite"):
        apply_deltas(loaded.model, [good, bad])
    assert same(loaded.model, snap)
    wrong_shape = DenseDelta(n1, torch.ones(3, 3))
    with pytest.raises(PatchError, match="shape"):
        apply_deltas(loaded.model, [good, wrong_shape])
    assert same(loaded.model, snap)


def test_save_load_roundtrip_reproduces_outputs(loaded, patch, tmp_path, smol_tok):
    out = patch.save(tmp_path / "p")
    assert sorted(os.listdir(out)) == ["patch.json", "patch.safetensors"]
    meta = json.loads((out / "patch.json").read_text())
    assert meta["method"] == "ft-m" and meta["base"]["fingerprints"] and meta["versions"]["torch"]
    assert meta["requests"][0]["target_new"] == " Rome"
    loaded_patch = EditPatch.load(out)
    prompts = [REQ["prompt"], "Hello there"]
    with patch.applied(loaded.model):
        want = lmedit.greedy_generate(loaded, prompts, 5)
        want_lp = lmedit.score_pairs(loaded, prompts, [" Rome", " you"])
    fresh = tiny_loaded("llama", smol_tok)  # same seed: an identical, separate copy of the base model
    with loaded_patch.applied(fresh.model):
        assert lmedit.greedy_generate(fresh, prompts, 5) == want
        assert [s.logprobs for s in lmedit.score_pairs(fresh, prompts, [" Rome", " you"])] == [
            s.logprobs for s in want_lp
        ]


def test_patch_for_another_base_is_refused(patch, smol_tok):
    other = tiny_loaded("llama", smol_tok, seed=1)
    snap = state(other.model)
    with pytest.raises(PatchError, match="another base model"):
        patch.apply(other)
    assert same(other.model, snap)


def test_atomic_save_leaves_no_partial_patch(loaded, patch, tmp_path, monkeypatch):
    target = tmp_path / "p"
    patch.save(target)
    before = (target / "patch.json").read_text()

    def fail(*a, **k):
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        patch.save(target)
    with pytest.raises(OSError, match="disk full"):
        patch.save(tmp_path / "new")
    assert (target / "patch.json").read_text() == before, "the previous patch survives a failed save"
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["p"], "no temporary folders are left behind"


def test_load_rejects_non_patch(tmp_path):
    with pytest.raises(PatchError, match="not a patch folder"):
        EditPatch.load(tmp_path)
    (tmp_path / "patch.json").write_text("{")
    (tmp_path / "patch.safetensors").write_bytes(b"")
    with pytest.raises(PatchError, match="not valid JSON"):
        EditPatch.load(tmp_path)


def test_session_history_undo_reset(loaded, patch):
    snap = state(loaded.model)
    session = lmedit.EditSession(loaded)
    session.apply(patch)
    mid = state(loaded.model)
    second = lmedit.edit(
        loaded, dict(REQ, target_new=" Berlin"), method="ft-m", steps=5, lr=1e-2, progress=False
    )
    session.apply(second)
    assert session.history == [patch, second]
    assert session.undo() == [second]
    assert same(loaded.model, mid)
    session.apply(second)
    session.reset()
    assert same(loaded.model, snap) and session.history == []
    with pytest.raises(ValueError, match="history holds 0"):
        session.undo()


def test_session_refuses_edit_that_does_not_help(loaded):
    snap = state(loaded.model)
    name = loaded.arch.module_name("mlp_out", 3) + ".weight"
    useless = EditPatch(
        method="manual",
        config={},
        requests=[REQ],
        deltas=[DenseDelta(name, torch.zeros_like(loaded.model.get_parameter(name)))],
        base=EditPatch.base_of(loaded, [name]),
    )
    session = lmedit.EditSession(loaded)
    with pytest.raises(EditFailedError, match="did not raise"):
        session.apply(useless)
    assert same(loaded.model, snap) and len(session) == 0


def test_fingerprint_sensitive_to_dtype_and_values():
    t = torch.arange(6.0).reshape(2, 3)
    assert fingerprint(t) == fingerprint(t.clone())
    assert fingerprint(t) != fingerprint(t.to(torch.float64))
    t2 = t.clone()
    t2[0, 0] = 1e-30
    assert fingerprint(t) != fingerprint(t2)
