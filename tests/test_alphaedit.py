"""AlphaEdit: the update lives in the preserved keys' null space; its sequential state travels in the patch."""

from __future__ import annotations

import json

import pytest
import torch

import lmedit
from lmedit.core.patch import EditPatch
from lmedit.core.solvers import null_space_projector, projected_least_squares
from lmedit.core.stats import key_stats
from lmedit.errors import ConfigError
from lmedit.methods.alphaedit import AlphaEditConfig, AlphaEditState
from lmedit.models.arch import as_out_in, get_submodule, weight_layout
from tiny_models import tiny_loaded

ARCHS = ["llama", "gpt2", "gemma3_text", "gpt_neox"]
REQS = [
    {
        "prompt": "The Eiffel Tower is located in the city of",
        "subject": "Eiffel Tower",
        "target_new": " Rome",
    },
    {
        "prompt": "The mother tongue of Danielle Darrieux is",
        "subject": "Danielle Darrieux",
        "target_new": " English",
    },
]
MORE = [
    {"prompt": "Michel Rocard is a native speaker of", "subject": "Michel Rocard", "target_new": " German"}
]
#: tiny random models have a flat key spectrum: a generous relative threshold leaves a real null space
FAST = {"nullspace_energy": None, "nullspace_threshold": 0.3, "v_steps": 4, "layers": [1, 2]}


@pytest.fixture(scope="module", params=ARCHS)
def loaded(request, smol_tok, stats_env):
    return tiny_loaded(request.param, smol_tok)


def test_update_is_orthogonal_to_preserved_keys(loaded, stats_env):
    snap = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    patch = lmedit.edit(loaded, REQS, method="alphaedit", **FAST, **stats_env)
    assert all(torch.equal(snap[k], v) for k, v in loaded.model.state_dict().items())
    stats = key_stats(
        loaded,
        [1, 2],
        stats_env["stats_corpus"],
        stats_env["stats_tokens"],
        stats_env["stats_seq_len"],
        progress=False,
    )
    for layer, d in zip((1, 2), patch.deltas):
        module = get_submodule(loaded.model, loaded.arch.module_name("mlp_out", layer))
        delta = as_out_in(d.materialize(), weight_layout(module)).double()  # [out, in]
        p, _ = null_space_projector(
            stats[layer].mom2, FAST["nullspace_threshold"], mean_cap=AlphaEditConfig().nullspace_mean_cap
        )
        preserved = torch.eye(p.shape[0], dtype=torch.float64) - p  # projector onto the preserved subspace
        assert 0 < patch.info["nullspace_rank"][str(layer)] < p.shape[0]
        assert float(delta.norm()) > 0
        assert float((delta @ preserved).norm() / delta.norm()) < 1e-4
    assert patch.info["residual_after"] < patch.info["residual_before"]


def test_energy_rule_bounds_the_preserved_keys_reach(loaded, stats_env):
    patch = lmedit.edit(loaded, REQS, method="alphaedit", **(FAST | {"nullspace_energy": 0.05}), **stats_env)
    stats = key_stats(
        loaded, [1, 2], stats_env["stats_corpus"], stats_env["stats_tokens"], stats_env["stats_seq_len"],
        progress=False,
    )  # fmt: skip
    for layer, d in zip((1, 2), patch.deltas):
        share = patch.info["nullspace_key_energy"][str(layer)]
        assert 0 < share <= 0.05
        c = stats[layer].mom2.double()
        p, _ = null_space_projector(c, energy=0.05)
        assert share == pytest.approx(
            float(torch.trace(p @ c) / torch.trace(c)), rel=1e-6
        )  # E|Pk|^2 / E|k|^2
        module = get_submodule(loaded.model, loaded.arch.module_name("mlp_out", layer))
        delta = as_out_in(d.materialize(), weight_layout(module)).double()  # [out, in]
        preserved = torch.eye(p.shape[0], dtype=torch.float64) - p
        assert float((delta @ preserved).norm() / delta.norm()) < 1e-4


def test_sequential_state_travels_in_the_patch(loaded, stats_env, tmp_path):
    p1 = lmedit.edit(loaded, REQS, method="alphaedit", **FAST, **stats_env)
    s1 = AlphaEditState.from_patch(p1)
    assert s1.n_edits == 2 and sorted(s1.keys) == [1, 2]
    json.dumps(p1.to_json())  # the config stays JSON-able
    back = EditPatch.load(p1.save(tmp_path / "p1"))
    assert sorted(back.extras) == sorted(p1.extras)
    assert all(torch.equal(back.extras[k], p1.extras[k]) for k in p1.extras)
    with p1.applied(loaded.model):
        p2 = lmedit.edit(loaded, MORE, method="alphaedit", previous=back, **FAST, **stats_env)
        p2b = lmedit.edit(loaded, MORE, method="alphaedit", previous=s1, **FAST, **stats_env)
    s2 = AlphaEditState.from_patch(p2)
    assert s2.n_edits == 3 and p2.info["sequential_edits_before"] == 2
    torch.testing.assert_close(s2.keys[1][:, :2], s1.keys[1])
    assert p2.config["previous"] == "AlphaEditState(2 earlier edits)"
    torch.testing.assert_close(p2.deltas[0].materialize(), p2b.deltas[0].materialize())
    with pytest.raises(ConfigError, match="alphaedit"):
        lmedit.edit(
            loaded, MORE, method="alphaedit", previous=lmedit.edit(loaded, MORE, method="ft-m", steps=1)
        )


def test_projected_solver_math():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=g, dtype=torch.float64) @ torch.diag(
        torch.linspace(3, 1e-3, 12).double()
    )
    c = x.T @ x / 300
    p, _ = null_space_projector(c, 1e-3)
    k, r = torch.randn(12, 3, generator=g), torch.randn(6, 3, generator=g)
    kp = torch.randn(12, 4, generator=g, dtype=torch.float64)
    upd = projected_least_squares(k, r, p, kp @ kp.T, l2=1.0).double()
    torch.testing.assert_close(
        upd @ (torch.eye(12, dtype=torch.float64) - p),
        torch.zeros(6, 12, dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )


def test_empty_null_space_is_an_error(smol_tok, stats_env):
    loaded = tiny_loaded("llama", smol_tok)
    kw = dict(v_steps=2, layers=[1], **stats_env)
    with pytest.raises(ConfigError, match="nullspace_threshold=1e-09"):
        lmedit.edit(
            loaded, REQS[0], method="alphaedit", nullspace_energy=None, nullspace_threshold=1e-9, **kw
        )
    with pytest.raises(ConfigError, match="nullspace_energy=1e-09"):  # below the smallest eigenvalue's share
        lmedit.edit(loaded, REQS[0], method="alphaedit", nullspace_energy=1e-9, **kw)
    with pytest.raises(ConfigError, match=r"nullspace_energy must be in \(0, 1\)"):
        lmedit.edit(loaded, REQS[0], method="alphaedit", nullspace_energy=1.5, **kw)
    with pytest.raises(ConfigError, match="nullspace_mean_cap=1e-09"):  # the cap alone empties it
        lmedit.edit(loaded, REQS[0], method="alphaedit", nullspace_energy=None, nullspace_mean_cap=1e-9, **kw)
    with pytest.raises(ConfigError, match="nullspace_mean_cap must be > 0"):
        lmedit.edit(loaded, REQS[0], method="alphaedit", nullspace_mean_cap=0.0, **kw)


def test_sequential_protocol_carries_the_state(loaded, stats_env):
    """The sequential protocol hands each step's patch to the next AlphaEdit edit as ``previous``."""
    from lmedit.data.loaders import EvalCase, EvalProbe
    from lmedit.evaluate.protocols import ScoringSettings, evaluate
    from lmedit.request import as_requests

    cases = [
        EvalCase(i, as_requests(r), [EvalProbe(r["prompt"], r["target_new"])], [], [], [])
        for i, r in enumerate(REQS + MORE)
    ]
    report = evaluate(
        loaded,
        cases,
        "alphaedit",
        "sequential",
        k=1,
        config=FAST | stats_env,
        settings=ScoringSettings(families=("tf",)),
        progress=False,
    )
    steps = report.meta["edits"]
    assert [s["info"]["sequential_edits_before"] for s in steps] == [0, 1, 2]
    assert [s["patch_bytes"] > 0 for s in steps] == [True] * 3
    assert steps[-1]["stored_bytes"] == sum(s["patch_bytes"] for s in steps)
