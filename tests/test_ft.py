"""FT-L / FT-M follow their definitions: the L-inf constraint holds, the loss is what it says."""

from __future__ import annotations

import torch

import lmedit
from tiny_models import tiny_loaded

REQ = {
    "prompt": "The Eiffel Tower is located in the city of",
    "subject": "Eiffel Tower",
    "target_new": " Rome Italy",
}


def test_ft_l_respects_linf_constraint(smol_tok):
    loaded = tiny_loaded("llama", smol_tok)
    patch = lmedit.edit(
        loaded, REQ, method="ft-l", steps=5, lr=1e-2, norm_constraint=1e-3, layers=[1, 2], progress=False
    )
    assert [d.name for d in patch.deltas] == [
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.2.mlp.down_proj.weight",
    ]
    for d in patch.deltas:
        assert d.delta.abs().max() <= 1e-3 + 1e-9
        assert d.delta.abs().max() > 0
    assert patch.config["objective"] == "prompt_last" and patch.info["steps"] == 5


def test_ft_m_teacher_forced_loss_drops(smol_tok):
    loaded = tiny_loaded("gpt2", smol_tok)
    patch = lmedit.edit(loaded, REQ, method="ft-m", steps=20, lr=1e-2, progress=False)
    assert patch.config["objective"] == "target_new" and patch.config["norm_constraint"] is None
    assert patch.info["loss_last"] < 0.5 * patch.info["loss_first"]
    # FT-M's reported first loss is the teacher-forced mean NLL of the target tokens on the unedited model
    s = lmedit.score_pairs(loaded, [REQ["prompt"]], [REQ["target_new"]])[0]
    assert abs(-s.mean_logprob - patch.info["loss_first"]) < 1e-4
    # gpt2's Conv1D weight [in, out]: the delta has the parameter's own shape
    (d,) = patch.deltas
    assert d.delta.shape == loaded.model.get_parameter(d.name).shape


def test_multiple_requests_in_one_patch(smol_tok):
    loaded = tiny_loaded("llama", smol_tok)
    reqs = [REQ, {"prompt": "The capital of Japan is", "subject": "Japan", "target_new": " Paris"}]
    patch = lmedit.edit(loaded, reqs, method="ft-m", steps=30, lr=1e-2, batch_size=1, progress=False)
    before = [
        s.mean_logprob
        for s in lmedit.score_pairs(loaded, [r["prompt"] for r in reqs], [r["target_new"] for r in reqs])
    ]
    with patch.applied(loaded.model):
        after = [
            s.mean_logprob
            for s in lmedit.score_pairs(loaded, [r["prompt"] for r in reqs], [r["target_new"] for r in reqs])
        ]
    assert all(a > b for a, b in zip(after, before))
    assert torch.isfinite(patch.deltas[0].delta).all()
