"""ROME, MEMIT, EMMET and PMET on tiny random models (+ one real ROME edit on the bundled Gemma 3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lmedit
import lmedit.methods.rome as rome_mod
from lmedit.core.keys import DEFAULT_TEMPLATES, compute_keys, mlp_out_weight
from lmedit.core.patch import EditPatch
from lmedit.errors import ConfigError
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


@pytest.fixture(scope="module", params=ARCHS)
def loaded(request, smol_tok, stats_env):
    return tiny_loaded(request.param, smol_tok)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    return all(torch.equal(snap[k], v) for k, v in model.state_dict().items())


@pytest.fixture
def captured(monkeypatch):
    """``captured["res"]``: the ValueResult of ROME's last ``optimize_values`` call."""
    out = {}
    real = rome_mod.optimize_values

    def spy(*a, **k):
        out["res"] = real(*a, **k)
        return out["res"]

    monkeypatch.setattr(rome_mod, "optimize_values", spy)
    return out


@pytest.mark.parametrize("key_mode", ["averaged", "original"])
def test_rome_rank_one_writes_v_star(loaded, stats_env, captured, key_mode):
    snap = _snapshot(loaded.model)
    patch = lmedit.edit(loaded, REQS[0], method="rome", layer=1, key_mode=key_mode, v_steps=5, **stats_env)
    assert _same(loaded.model, snap), "ROME mutated the model"
    (delta,) = patch.deltas
    assert delta.kind == "lowrank" and delta.left.shape[1] == 1
    layer, templates = 1, patch.config["context_templates"]
    req = lmedit.EditRequest(**REQS[0])
    keys = compute_keys(loaded, [req], [layer], templates)
    k = keys.mean[layer][0] if key_mode == "averaged" else keys.plain(layer)[0]
    site = loaded.arch.module_name("mlp_out", layer)
    _, w, _ = mlp_out_weight(loaded, layer)  # [out, in]
    v_star = w @ k + captured["res"].delta[site][0]
    with patch.applied(loaded.model):
        _, w_new, _ = mlp_out_weight(loaded, layer)
        err = (w_new @ k - v_star).norm() / v_star.norm()
    assert float(err) < 1e-4
    assert _same(loaded.model, snap)


def test_rome_templates_key_mode_adds_delta_at_every_template_key(loaded, stats_env, captured):
    patch = lmedit.edit(
        loaded, REQS[0], method="rome", layer=1, key_mode="templates", key_ridge=0.0, v_steps=5, **stats_env
    )
    (delta,) = patch.deltas
    assert delta.left.shape[1] == 1, "still a rank-one update"
    keys = compute_keys(loaded, [lmedit.EditRequest(**REQS[0])], [1], patch.config["context_templates"])
    k_all = keys.per_template[1][0]  # [n_templates, in]
    want = captured["res"].delta[loaded.arch.module_name("mlp_out", 1)][0]  # [out]
    w = mlp_out_weight(loaded, 1)[1].clone()
    with patch.applied(loaded.model):
        w_new = mlp_out_weight(loaded, 1)[1].clone()
    got = (w_new - w) @ k_all.T  # [out, n_templates]
    err = (got - want[:, None]).norm(dim=0) / want.norm()
    assert float(err.max()) < 1e-3, err
    with pytest.raises(ConfigError, match="key_ridge"):
        lmedit.edit(loaded, REQS[0], method="rome", key_mode="templates", key_ridge=-1, **stats_env)


def test_rome_raises_target_probability_and_round_trips(loaded, stats_env, tmp_path):
    patch = lmedit.edit(loaded, REQS, method="rome", layer=1, v_steps=8, **stats_env)
    assert patch.deltas[0].left.shape[1] == 2  # two sequential rank-one updates
    prompts, targets = [r["prompt"] for r in REQS], [r["target_new"] for r in REQS]
    before = [s.mean_logprob for s in lmedit.score_pairs(loaded, prompts, targets)]
    with patch.applied(loaded.model):
        after = [s.mean_logprob for s in lmedit.score_pairs(loaded, prompts, targets)]
    assert all(a > b for a, b in zip(after, before))
    back = EditPatch.load(patch.save(tmp_path / "p"))
    assert back.config == patch.config and back.method == "rome"
    torch.testing.assert_close(back.deltas[0].materialize(), patch.deltas[0].materialize())
    with back.applied(loaded.model):
        again = [s.mean_logprob for s in lmedit.score_pairs(loaded, prompts, targets)]
    assert again == pytest.approx(after, abs=1e-6)


@pytest.mark.parametrize("method", ["memit", "pmet"])
def test_batch_methods_reduce_the_residual(loaded, stats_env, method):
    snap = _snapshot(loaded.model)
    patch = lmedit.edit(
        loaded, REQS, method=method, layers=[1, 2], mom2_update_weight=1.0, v_steps=6, **stats_env
    )
    assert _same(loaded.model, snap)
    assert [d.name for d in patch.deltas] == [
        loaded.arch.module_name("mlp_out", x) + ".weight" for x in (1, 2)
    ]
    info = patch.info
    assert info["residual_after"] < info["residual_before"]
    assert all(x["fit"] < 0.5 for x in info["layers"])
    if loaded.arch.mlp_post_norm is not None:  # one delta per layer's MLP output (+ PMET's attention site)
        assert info["value_sites"].startswith("per layer (MLP outputs")
        assert (loaded.arch.module_name("attn_out", 2) in info["value_sites"]) == (method == "pmet")
    else:  # PMET: the paper's square-root spread of the top layer's MLP-output target
        assert info["spread"] == ("sqrt" if method == "pmet" else "linear")
    prompts, targets = [r["prompt"] for r in REQS], [r["target_new"] for r in REQS]
    before = sum(s.mean_logprob for s in lmedit.score_pairs(loaded, prompts, targets))
    with patch.applied(loaded.model):
        after = sum(s.mean_logprob for s in lmedit.score_pairs(loaded, prompts, targets))
    assert after > before


def test_memit_templates_key_mode_fits_every_template_key(loaded, stats_env):
    kw = dict(layers=[1], mom2_update_weight=1e-3, v_steps=4, **stats_env)
    templates = lmedit.edit(loaded, REQS, method="memit", key_mode="templates", **kw)
    averaged = lmedit.edit(loaded, REQS, method="memit", **kw)
    reqs = [lmedit.EditRequest(**r) for r in REQS]
    keys = compute_keys(loaded, reqs, [1], templates.config["context_templates"]).per_template[
        1
    ]  # [n, T, in]

    def spread(patch):  # how far the realised change differs between a request's template keys
        upd = patch.deltas[0].materialize()
        upd = upd if upd.shape[1] == keys.shape[-1] else upd.T  # [out, in]
        got = torch.einsum("oi,nti->nto", upd, keys)  # [n, T, out]
        return float((got - got.mean(1, keepdim=True)).norm() / got.norm())

    assert spread(templates) < 0.5 * spread(averaged), (spread(templates), spread(averaged))
    with pytest.raises(ConfigError, match="EMMET"):
        lmedit.edit(loaded, REQS, method="emmet", key_mode="templates", **stats_env)
    with pytest.raises(ConfigError, match="PMET"):
        lmedit.edit(loaded, REQS, method="pmet", key_mode="templates", **stats_env)


def test_memit_default_weight_still_moves_towards_target(loaded, stats_env):
    patch = lmedit.edit(loaded, REQS, method="memit", layers=[1, 2], v_steps=4, **stats_env)
    assert patch.info["residual_after"] < patch.info["residual_before"]


def test_emmet_meets_equality_constraints(loaded, stats_env):
    snap = _snapshot(loaded.model)
    patch = lmedit.edit(loaded, REQS, method="emmet", layers=[1], gram_damping=0.0, v_steps=4, **stats_env)
    assert _same(loaded.model, snap)
    assert patch.info["layers"][0]["fit"] < 1e-3  # Delta K = R up to float error


def test_pmet_square_root_spread(smol_tok, stats_env):
    """PMET's paper: layer i of m writes (target - current top MLP output) / sqrt(m - i), not / (m - i)."""
    loaded = tiny_loaded("llama", smol_tok)  # pre-norm: the top layer's MLP-output target is spread
    patch = lmedit.edit(
        loaded, REQS, method="pmet", layers=[1, 2], mom2_update_weight=1e-6, v_steps=4, **stats_env
    )
    reqs = [lmedit.EditRequest(**r) for r in REQS]
    k = compute_keys(loaded, reqs, [1], patch.config["context_templates"]).averaged(
        1, patch.config["plain_key_weight"]
    )  # [n, in]
    upd = patch.deltas[0].materialize()
    upd = upd if upd.shape[1] == k.shape[-1] else upd.T  # [out, in]
    first = patch.info["layers"][0]
    assert first["fit"] < 1e-3  # a near-exact fit, so the written change is the layer's residual target
    written = float((upd @ k.T).norm(dim=0).mean())
    assert written == pytest.approx(first["residual_before"] / 2**0.5, rel=1e-2)


def test_templates_are_recorded_and_deterministic(smol_tok, stats_env):
    loaded = tiny_loaded("llama", smol_tok)
    a = lmedit.edit(loaded, REQS[0], method="rome", layer=1, v_steps=3, **stats_env)
    b = lmedit.edit(loaded, REQS[0], method="rome", layer=1, v_steps=3, **stats_env)
    assert a.config["context_templates"][0] == "{}" and len(a.config["context_templates"]) == 11
    torch.testing.assert_close(a.deltas[0].materialize(), b.deltas[0].materialize())
    m = lmedit.edit(loaded, REQS[0], method="memit", layers=[1], v_steps=1, **stats_env)
    assert m.config["context_templates"] == list(DEFAULT_TEMPLATES[:6]), (
        "MEMIT's default: 1 + 5, as its paper"
    )
    r = lmedit.edit(loaded, REQS[0], method="rome", layer=1, v_steps=1, n_templates=3, **stats_env)
    assert r.config["context_templates"] == list(DEFAULT_TEMPLATES[:3])
    with pytest.raises(ConfigError, match="n_templates must be 1..11"):
        lmedit.edit(loaded, REQS[0], method="rome", layer=1, n_templates=12, **stats_env)


def test_generated_and_sampled_templates_are_deterministic_and_recorded(smol_tok, stats_env):
    """template_source='generated' decodes greedily, 'sampled' samples the top 5 with the method's seed (the same
    seed gives the same templates, another seed others; the global random state is left alone); either way the
    patch records the templates it used."""
    from lmedit.core.keys import TEMPLATE_STARTS, generate_templates

    loaded = tiny_loaded("llama", smol_tok)
    greedy = generate_templates(loaded, n=7)
    assert greedy == generate_templates(loaded, n=7) and len(greedy) == 8 and greedy[0] == "{}"
    assert greedy[6].startswith("The the") and all(t.endswith(". {}") for t in greedy[1:])
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    s0 = generate_templates(loaded, n=10, sample_seed=0)
    assert torch.equal(torch.random.get_rng_state(), state), "sampling must not move the global random state"
    assert (
        s0
        == generate_templates(loaded, n=10, sample_seed=0)
        != generate_templates(loaded, n=10, sample_seed=1)
    )
    assert all(t.startswith(TEMPLATE_STARTS[i % 5]) for i, t in enumerate(s0[1:])), s0
    assert s0[1:6] != greedy[1:6]  # the same five start words; top-5 sampling giving all 50 greedy tokens: no
    patch = lmedit.edit(
        loaded, REQS[0], method="memit", layers=[1], v_steps=1, template_source="sampled", seed=1, **stats_env
    )
    assert patch.config["context_templates"] == generate_templates(loaded, n=5, sample_seed=1)


# ------------------------------------------------------------------------------------------------ real
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.real
def test_rome_on_gemma_makes_rome_the_answer(gemma):
    import importlib.util

    corpus = "gensim-wiki"
    if importlib.util.find_spec("gensim") is None:
        corpus = str(DATA / "wikitext-2" / "valid.txt")
        if not Path(corpus).exists():
            pytest.skip("neither gensim (default statistics corpus) nor the shared wikitext-2 is available")
    prompt = "The Eiffel Tower is located in the city of"
    before = lmedit.greedy_generate(gemma, [prompt], max_new_tokens=3)[0]
    from lmedit.methods.rome import PRESETS

    weight = f"model.layers.{PRESETS['gemma3-270m']['layer']}.mlp.down_proj.weight"
    snap = gemma.model.get_parameter(weight).clone()
    patch = lmedit.edit(
        gemma,
        {"prompt": prompt, "subject": "Eiffel Tower", "target_new": " Rome"},
        method="rome",
        stats_corpus=corpus,
        stats_tokens=20_000,
    )
    assert torch.equal(gemma.model.get_parameter(weight), snap)
    assert patch.deltas[0].name == weight
    with patch.applied(gemma.model):
        after = lmedit.greedy_generate(gemma, [prompt], max_new_tokens=3)[0]
    assert "Rome" not in before
    assert after.strip().startswith("Rome"), after
