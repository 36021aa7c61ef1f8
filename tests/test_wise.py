"""WISE: routing and TIES merging on constructed tensors, and edits on a tiny model (lifelong, undo, save/load)."""

from __future__ import annotations

import pytest
import torch

import lmedit
from lmedit.core.adapters import AdapterSpec, WiseSideMemory, install_adapters, side_memory_forward
from lmedit.core.patch import EditPatch
from lmedit.errors import ConfigError, PatchError
from lmedit.methods.wise import (
    CONTRAST_SUBJECTS,
    HELDOUT_FACTS,
    HELDOUT_WINDOWS,
    UNRELATED_PROMPTS,
    MeanSquareActivation,
    ShardActivations,
    _shard_draws,
    contrast_prompts,
    corpus_windows,
    fact_answers,
    fact_gen,
    fact_pool,
    fact_subjects,
    merge_shards,
    module_inputs,
    pick_facts,
    prompt_activation,
    routing_loss,
    ties_merge,
    window_inputs,
)
from lmedit.request import EditRequest
from tiny_models import REQ, REQ2, reload_scores, same, state, tiny_loaded

IRRELEVANT = list(UNRELATED_PROMPTS[:3])
FAST = dict(steps=25, lr=0.2)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


# ------------------------------------------------------------------------------- constructed tensors
def test_ties_merge_trims_elects_sign_and_averages_agreeing_entries():
    tvs = [t(3, -2, 0, 1), t(-1, -4, 2, 0.5), t(2, 1, -1.5, 0)]
    # no trim: signs of the sums (4, -5, 0.5, 1.5); entries disagreeing with them are left out of the means
    assert ties_merge(tvs, 1.0).tolist() == [2.5, -3.0, 2.0, 0.75]
    # keep the 2 largest of each: (3, -2, 0, 0), (0, -4, 2, 0), (2, 0, -1.5, 0); sums (5, -6, 0.5, 0)
    assert ties_merge(tvs, 0.5).tolist() == [2.5, -3.0, 2.0, 0.0]
    # an entry whose trimmed values cancel exactly has no elected sign: 0
    assert ties_merge([t(1, 5), t(-1, 5)], 1.0).tolist() == [0.0, 5.0]


def test_merge_shards_keeps_disjoint_shards_whole_with_ties_and_averages_with_linear():
    a = (torch.tensor([0, 2]), t(1, 2, 3, 4).reshape(2, 2))
    b = (torch.tensor([2, 3]), t(5, 6, 7, 8).reshape(2, 2))
    assert merge_shards([a], 4, "ties", 0.5) is a
    index, rows = merge_shards([a, b], 4, "ties", 1.0)
    assert index.tolist() == [0, 2, 3]
    assert rows.tolist() == [[1, 2], [4, 5], [7, 8]]  # row 2 is shared: mean of (3, 4) and (5, 6)
    index, rows = merge_shards([a, b], 4, "linear", 1.0)
    assert rows.tolist() == [[0.5, 1], [4, 5], [3.5, 4]]


def test_routing_uses_the_side_memory_once_the_running_max_activation_exceeds_epsilon():
    delta = torch.zeros(3, 2)
    delta[0] = t(3, 4)  # only input feature 0 reaches the side memory; |x @ delta| = 5 * x[0]
    edit = [[0, 1, 0], [1, 0, 0], [0, 0, 1]]  # activations 0, 5, 0
    unrelated = [[0, 1, 0], [0.1, 0, 0], [0, 0, 1]]  # activations 0, 0.5, 0
    x = torch.tensor([edit, unrelated], dtype=torch.float32)  # [batch 2, pos 3, d_in 3]
    out = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)
    got = side_memory_forward(x, out, delta, epsilon=2.0)
    assert torch.equal(got[0, 0], out[0, 0]), "before the activating token: main memory"
    assert got[0, 1].tolist() == (out[0, 1] + t(3, 4)).tolist()
    assert torch.equal(got[0, 2], out[0, 2] + x[0, 2] @ delta), "later positions stay on the side memory"
    assert torch.equal(got[1], out[1]), "an unrelated sequence is answered by the main memory, bit for bit"
    assert prompt_activation([x[0], x[1]], delta).tolist() == [5.0, 0.5]


def test_routing_in_a_packed_row_looks_only_at_each_positions_own_sequence():
    delta = torch.zeros(3, 2)
    delta[0] = t(3, 4)
    # one row packing two sequences: the first activates (5 at its 2nd token), the second does not
    x = torch.tensor([[[0, 1, 0], [1, 0, 0], [0, 0, 1], [0.1, 0, 0], [0, 1, 0]]], dtype=torch.float32)
    out = torch.arange(10, dtype=torch.float32).reshape(1, 5, 2)
    visible = torch.zeros(1, 5, 5, dtype=torch.bool)
    visible[0, :3, :3] = torch.ones(3, 3, dtype=torch.bool).tril()
    visible[0, 3:, 3:] = torch.ones(2, 2, dtype=torch.bool).tril()
    got = side_memory_forward(x, out, delta, 2.0, visible)
    assert torch.equal(got[0, 3:], out[0, 3:]), "the second sequence is not routed by the first one's maximum"
    assert torch.equal(got[0, 2], out[0, 2] + x[0, 2] @ delta), "the first sequence keeps its own running max"
    assert torch.equal(got[0, :3], side_memory_forward(x[:, :3], out[:, :3], delta, 2.0)[0])
    assert not torch.equal(side_memory_forward(x, out, delta, 2.0)[0, 3:], out[0, 3:]), (
        "without the mask it would"
    )
    with pytest.raises(PatchError, match="sequence mask"):
        side_memory_forward(x, out, delta, 2.0, visible[:, :4, :4])


@pytest.mark.parametrize("last_layer", [False, True])
def test_packed_scoring_of_a_wise_model_equals_scoring_each_prompt_alone(loaded, last_layer, monkeypatch):
    """Teacher-forced scoring packs several prompts into a row: an edit prompt packed before an unrelated one
    must not route the unrelated one to the side memory (the running maximum is per sequence)."""
    import contextlib

    from lmedit.core import forward
    from lmedit.evaluate.scoring import score_pairs

    layer = {"layer": loaded.arch.n_layers(loaded.model) - 1} if last_layer else {}
    p = lmedit.edit(
        loaded, REQ, method="wise", irrelevant_prompts=IRRELEVANT, irrelevant_corpus=None, mask_ratio=1.0,
        steps=60, lr=0.2, **layer,
    )  # fmt: skip
    path = p.adapters[0].module
    # the packer puts the widest unit first, then fills the row from the narrowest up: here the Louvre prompt
    # (16 tokens), the short ones, the edit prompt (10), then two unrouted sentences of 11 and 12 tokens after it
    longer = [
        UNRELATED_PROMPTS[3],
        UNRELATED_PROMPTS[6],
        "The Louvre is located in the city of Paris, France, and it is",
    ]
    prompts = [REQ["prompt"], *longer, "The capital of Japan is", "Water boils at"]
    targets = [REQ["target_new"]] + [" Paris"] * (len(prompts) - 1)
    with p.applied(loaded):
        act = prompt_activation(module_inputs(loaded, path, prompts), loaded.model.get_submodule(path).delta)
        eps = p.adapters[0].config["epsilon"]
        assert act[0] > eps and (act[1:] <= eps).sum() >= 3, "the edit prompt routes, unrelated ones do not"
        together = score_pairs(loaded, prompts, targets)
        alone = [score_pairs(loaded, [q], [a])[0] for q, a in zip(prompts, targets)]
    for got, want in zip(together, alone):
        assert got.argmax == want.argmax
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    # control: with the routing maximum running along the packed row, the packed scores would differ
    monkeypatch.setattr(forward, "sequence_mask", lambda _visible: contextlib.nullcontext())
    monkeypatch.setattr(forward, "last_mlp_only", lambda *_a: contextlib.nullcontext())
    with p.applied(loaded):
        leaky = score_pairs(loaded, prompts, targets)
    assert any(got.logprobs != pytest.approx(want.logprobs, abs=1e-4) for got, want in zip(leaky, alone))


def test_contrast_prompts_put_other_subjects_into_the_edit_template():
    req = EditRequest(**dict(REQ, prompt="The {} is located in the city of "))
    got = contrast_prompts(req, ["Big Ben", "Eiffel Tower", "Louvre"])
    assert got == ["The Big Ben is located in the city of", "The Louvre is located in the city of"]


def test_shard_activations_equal_prompt_activation_with_their_gradient():
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 5, generator=gen) for n in (3, 1, 4)]
    start = torch.randn(5, 2, generator=gen)
    index = torch.tensor([0, 3])
    rows = torch.randn(2, 2, generator=gen, requires_grad=True)
    want = prompt_activation(xs, start.index_add(0, index, rows))
    (grad_want,) = torch.autograd.grad(want.sum(), rows)
    got = ShardActivations(xs, start, index)(rows)
    (grad_got,) = torch.autograd.grad(got.sum(), rows)
    assert torch.allclose(got, want) and torch.allclose(grad_got, grad_want)
    zero = torch.zeros(2, 2, requires_grad=True)  # a fresh side memory: every activation 0, gradients finite
    (g,) = torch.autograd.grad(ShardActivations(xs, torch.zeros(5, 2), index)(zero).sum(), zero)
    assert torch.isfinite(g).all()


def test_mean_square_activation_is_the_mean_over_keys():
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(50, 6, generator=gen, dtype=torch.float64)  # 50 key vectors x, d_in 6
    start = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    index = torch.tensor([1, 4])
    rows = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    delta = torch.zeros_like(start).index_add(0, index, rows)  # the shard's rows alone (what WISE penalises)
    want = (keys @ delta).pow(2).sum(-1).mean()
    msq = MeanSquareActivation(keys.T @ keys / 50, index)
    assert float(msq(rows)) == pytest.approx(float(want), rel=1e-12)
    whole = (keys @ (start + delta)).pow(2).sum(-1).mean()
    assert float(msq(rows)) != pytest.approx(float(whole), rel=1e-3), (
        "the side memory extended is not penalised"
    )


def test_shard_draws_are_seeded_by_stream_position():
    rows, passages = _shard_draws(0, 3, 100, 0.2, 50, 8)
    again = _shard_draws(0, 3, 100, 0.2, 50, 8)
    assert torch.equal(rows, again[0]) and torch.equal(passages, again[1])
    assert rows.numel() == 20 and rows.tolist() == sorted(rows.tolist())
    assert passages.numel() == 8 and len(set(passages.tolist())) == 8 and max(passages.tolist()) < 50
    other = _shard_draws(0, 4, 100, 0.2, 50, 8)
    assert not torch.equal(passages, other[1]), "the next shard of a chain trains against other passages"
    assert _shard_draws(0, 3, 100, 0.2, 0, 8)[1].numel() == 0


def test_fact_pool_holds_the_cases_prompts_from_the_start_case_on():
    from lmedit.data.loaders import load_dataset

    cases = load_dataset("bundled").cases
    pool = fact_pool("bundled", 5)
    assert len(pool) == len(set(pool)), "deduplicated"
    first = cases[5]
    assert pool[0] == first.reliability[0].prompt.rstrip()
    assert first.locality[0].prompt.rstrip() in pool
    later = {p.prompt for c in cases[5:] for p in c.reliability + c.generalization + c.locality}
    assert set(pool) == later, "exactly the prompts of the cases from the start on"
    assert set(fact_pool("bundled", 0)) > set(pool)


def test_fact_answers_groups_the_pool_by_true_answer():
    from lmedit.data.loaders import load_dataset

    cases = load_dataset("bundled").cases
    groups = fact_answers("bundled", 5)
    first = cases[5]
    true = first.requests[0].target_true.strip().lower()
    assert first.reliability[0].prompt.rstrip() in groups[true], "an edit prompt under its true target"
    assert first.generalization[0].prompt.rstrip() in groups[true]
    loc = first.locality[0]
    assert loc.prompt.rstrip() in groups[loc.answer.strip().lower()], "a locality prompt under its own answer"
    grouped = {p for ps in groups.values() for p in ps}
    assert grouped == set(fact_pool("bundled", 5)), "exactly the pool's prompts (the cases from 5 on)"


def test_object_contrast_adds_pool_prompts_with_the_edits_true_object(loaded):
    kw = dict(
        irrelevant_prompts=IRRELEVANT, irrelevant_corpus=None, irrelevant_facts="bundled", contrast_subjects=[],
        steps=1, lr=1e-3,
    )  # fmt: skip
    paris = {**REQ, "target_true": " Paris"}
    p = lmedit.edit(loaded, paris, method="wise", object_contrast=3, **kw)
    assert p.info["object_contrast_prompts"] == 3
    assert p.info["shards"][0]["irrelevant"] == len(IRRELEVANT) + 32 + 3
    plain = lmedit.edit(loaded, paris, method="wise", **kw)
    assert plain.info["object_contrast_prompts"] == 0
    assert plain.info["shards"][0]["irrelevant"] == len(IRRELEVANT) + 32
    unknown = lmedit.edit(loaded, {**REQ, "target_true": " Atlantis"}, method="wise", object_contrast=3, **kw)
    assert unknown.info["object_contrast_prompts"] == 0, "an object the pool lacks adds nothing"
    # the Paris prompts the pool holds besides the edited subject's: more than 3, so the cap is what binds
    others = [q for q in fact_answers("bundled", 0)["paris"] if "eiffel tower" not in q.lower()]
    assert len(others) > 3


def test_pick_facts_skips_the_shards_subjects_and_is_seeded():
    pool = ("The Eiffel Tower is in", "Paris is the capital of", "the eiffel tower stands in", "Rome lies in")
    picked = pick_facts(pool, 3, ["Eiffel Tower"], fact_gen(0, 2))
    assert sorted(picked) == ["Paris is the capital of", "Rome lies in"], "case-insensitive, fewer when short"
    assert pick_facts(pool, 2, [], fact_gen(0, 2)) == pick_facts(pool, 2, [], fact_gen(0, 2))
    draws = {tuple(pick_facts(pool, 2, [], fact_gen(0, pos))) for pos in range(8)}
    assert len(draws) > 1, "shards at other stream positions draw other prompts"
    assert pick_facts(pool, 2, ["Paris"], None) == ["The Eiffel Tower is in", "the eiffel tower stands in"]


def test_routing_loss_margins():
    alpha, beta, gamma = 1.0, 4.0, 2.0
    assert routing_loss(t(5.0), t(0.5, 0.8), alpha, beta, gamma).item() == 0.0
    # irrelevant 1.5 > alpha by 0.5 (mean over 2: 0.25); edit 3 < beta by 1; gaps (2.5, 1.5): 0.5 short (0.25)
    assert routing_loss(t(3.0), t(0.5, 1.5), alpha, beta, gamma).item() == pytest.approx(0.25 + 1 + 0.25)


def test_wrapper_routes_like_the_function_and_refuses_a_corrupt_spec():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    rows = t(3, 4)[None]
    good = AdapterSpec(
        "wise", "0", {"d_in": 3, "d_out": 2, "epsilon": 2.0}, {"index": torch.tensor([0]), "rows": rows}
    )
    x = torch.tensor([[[0.0, 1, 0], [1, 0, 0]]])
    with torch.no_grad():
        want = side_memory_forward(x, model[0](x), torch.cat([rows, torch.zeros(2, 2)]), 2.0)
        handle = install_adapters(model, [good])
        assert torch.equal(model(x), want)
        handle.revert()
    bad = AdapterSpec(
        "wise", "0", {"d_in": 3, "d_out": 2, "epsilon": 2.0}, {"index": torch.tensor([5]), "rows": rows}
    )
    with pytest.raises(PatchError, match="corrupt"):
        install_adapters(model, [bad])
    assert isinstance(model[0], torch.nn.Linear)


# ---------------------------------------------------------------------------------------------- tiny models
def lp(loaded, prompts, target=" Rome"):
    return [s.mean_logprob for s in lmedit.score_pairs(loaded, prompts, [target] * len(prompts))]


@pytest.fixture(scope="module")
def loaded(smol_tok):
    return tiny_loaded("llama", smol_tok)


def test_config_validation(loaded):
    with pytest.raises(ConfigError, match="act_margin"):
        lmedit.edit(loaded, REQ, method="wise", act_margin=[1.0, 2.0])
    with pytest.raises(ConfigError, match="mask_ratio"):
        lmedit.edit(loaded, REQ, method="wise", mask_ratio=0)
    with pytest.raises(ConfigError, match="irrelevant_pool"):
        lmedit.edit(loaded, REQ, method="wise", irrelevant_pool=HELDOUT_WINDOWS)
    with pytest.raises(ConfigError, match="irrelevant_samples"):
        lmedit.edit(loaded, REQ, method="wise", irrelevant_samples=0)
    with pytest.raises(ConfigError, match="cov_weight must be >= 0"):
        lmedit.edit(loaded, REQ, method="wise", cov_weight=-1.0)
    with pytest.raises(ConfigError, match="needs irrelevant_corpus"):
        lmedit.edit(loaded, REQ, method="wise", cov_weight=1.0, irrelevant_corpus=None)
    with pytest.raises(ConfigError, match="irrelevant_fact_samples"):
        lmedit.edit(loaded, REQ, method="wise", irrelevant_facts="bundled", irrelevant_fact_samples=0)
    with pytest.raises(ConfigError, match="lower irrelevant_facts_from"):
        lmedit.edit(loaded, REQ, method="wise", irrelevant_facts="bundled", irrelevant_facts_from=365)
    with pytest.raises(ConfigError, match="fact_contrast takes its subjects from irrelevant_facts"):
        lmedit.edit(loaded, REQ, method="wise", fact_contrast=4)
    with pytest.raises(ConfigError, match="fact_contrast must be >= 0"):
        lmedit.edit(loaded, REQ, method="wise", irrelevant_facts="bundled", fact_contrast=-1)
    with pytest.raises(ConfigError, match="object_contrast takes its prompts from irrelevant_facts"):
        lmedit.edit(loaded, REQ, method="wise", object_contrast=4)
    with pytest.raises(ConfigError, match="object_contrast must be >= 0"):
        lmedit.edit(loaded, REQ, method="wise", irrelevant_facts="bundled", object_contrast=-1)


def test_corpus_windows_are_full_length_packed_windows_or_a_clear_error(loaded, tmp_path):
    from lmedit.models import tokens

    (tmp_path / "a.txt").write_text("One short paragraph of text.\n\nAnother, a little longer, about rivers.")
    prefix = tokens.special_prefix(loaded.tokenizer)
    win = corpus_windows(loaded, str(tmp_path), 2, len(prefix) + 4)
    assert win.shape == (2, len(prefix) + 4) and win[:, : len(prefix)].tolist() == [prefix, prefix]
    with pytest.raises(ConfigError, match="irrelevant_pool=500"):
        corpus_windows(loaded, str(tmp_path), 500, 8)


@pytest.fixture(scope="module")
def patch(loaded):
    return lmedit.edit(loaded, REQ, method="wise", irrelevant_prompts=IRRELEVANT, **FAST)


def test_edit_leaves_model_identical_raises_target_and_routes(loaded, patch):
    snap = state(loaded.model)
    again = lmedit.edit(loaded, REQ, method="wise", irrelevant_prompts=IRRELEVANT, **FAST)
    assert same(loaded.model, snap), "computing the edit never writes the model"
    spec = patch.adapters[0]
    assert torch.equal(again.adapters[0].tensors["rows"], spec.tensors["rows"]), (
        "deterministic given the seed"
    )
    assert patch.deltas == [] and spec.kind == "wise" and spec.parent is None
    assert spec.tensors["index"].numel() == round(0.2 * loaded.model.config.intermediate_size)
    assert patch.info["irrelevant_routed_to_side"] == 0
    assert patch.info["shards"][0]["irrelevant"] == len(IRRELEVANT) + 16 + 4, (
        "fixed prompts, 16 sampled passages and 4 contrast prompts"
    )
    x_edit, *x_irr = module_inputs(loaded, spec.module, [REQ["prompt"], *IRRELEVANT])
    before = lp(loaded, [REQ["prompt"], *IRRELEVANT])
    with patch.applied(loaded):
        wrapper = loaded.model.get_submodule(spec.module)
        assert isinstance(wrapper, WiseSideMemory)
        after = lp(loaded, [REQ["prompt"], *IRRELEVANT])
        eps = spec.config["epsilon"]
        assert prompt_activation([x_edit], wrapper.delta).item() > eps, (
            "the edit prompt reaches the side memory"
        )
        assert prompt_activation(x_irr, wrapper.delta).max().item() < eps, (
            "irrelevant prompts stay on the main"
        )
    assert after[0] > before[0] + 2, (before[0], after[0])
    assert after[1:] == before[1:], "prompts routed to the main memory are unchanged bit for bit"
    assert same(loaded.model, snap)


def _held_out_activations(loaded, inputs, **config):
    """A WISE edit of REQ (every row trainable) and the activations of ``inputs(module path)`` under it."""
    p = lmedit.edit(
        loaded, REQ, method="wise", irrelevant_prompts=IRRELEVANT, mask_ratio=1.0, steps=60, lr=0.2, **config
    )
    path = p.adapters[0].module
    with p.applied(loaded):
        return p, prompt_activation(inputs(path), loaded.model.get_submodule(path).delta)


def test_sampled_passages_keep_held_out_text_on_the_main_memory(loaded):
    """Fixed sentences alone leave ordinary text routed to the side memory; sampled passages do not."""
    held = corpus_windows(loaded, "gensim-wiki", 1024, 48)[-HELDOUT_WINDOWS:]
    routed = {}
    for corpus in (None, "gensim-wiki"):
        p, act = _held_out_activations(
            loaded, lambda path: window_inputs(loaded, path, held), irrelevant_corpus=corpus
        )
        spec = p.adapters[0]
        routed[corpus] = int((act > spec.config["epsilon"]).sum())
        if corpus is not None:
            assert p.info["heldout_routed_to_side"] == routed[corpus], "the patch's own held-out check"
            assert p.info["edit_activations"][0] > spec.config["epsilon"]
    assert routed["gensim-wiki"] == 0 and routed[None] > HELDOUT_WINDOWS // 2, routed


def test_factual_pool_keeps_held_out_factual_prompts_on_the_main_memory(loaded):
    """Fixed sentences alone leave short factual prompts about other subjects routed to the side memory; prompts
    sampled from a factual pool keep held-out ones on the main memory (on this tiny random model the effect is
    small - 1 of 32 routed without the pool - on Gemma it is the difference measured in BENCHMARKS.md)."""
    held = list(fact_pool("bundled", 0)[-HELDOUT_FACTS:])
    routed, ratio = {}, {}
    for facts in (None, "bundled"):
        p, act = _held_out_activations(
            loaded, lambda path: module_inputs(loaded, path, held), irrelevant_facts=facts,
            irrelevant_corpus=None, contrast_subjects=[],
        )  # fmt: skip
        spec = p.adapters[0]
        routed[facts] = int((act > spec.config["epsilon"]).sum())
        ratio[facts] = act.max().item() / spec.config["epsilon"]
        assert p.info["edit_activations"][0] > spec.config["epsilon"]
        if facts is not None:
            assert p.info["heldout_facts_routed_to_side"] == routed[facts], "the patch's own held-out check"
            assert p.info["shards"][0]["irrelevant"] == len(IRRELEVANT) + 32
    assert routed["bundled"] == 0 and routed[None] > 0, routed
    assert ratio["bundled"] < ratio[None] - 0.1, ratio  # largest held-out activation / epsilon: 0.94 vs 1.08


def test_mean_activation_penalty_lowers_the_side_memorys_response_to_ordinary_text(loaded, stats_env):
    from lmedit.core.stats import covariances

    small = dict(
        irrelevant_corpus=stats_env["stats_corpus"], irrelevant_pool=64, irrelevant_tokens=16, cov_tokens=2000
    )
    mean_sq = {}
    for weight in (0.0, 50.0):
        p = lmedit.edit(
            loaded, REQ, method="wise", irrelevant_prompts=IRRELEVANT, cov_weight=weight, **small, **FAST
        )
        spec = p.adapters[0]
        layer = p.config["layer"]
        mom2 = covariances(loaded, [layer], small["irrelevant_corpus"], 2000)[0][layer].float()
        mean_sq[weight] = float(MeanSquareActivation(mom2, spec.tensors["index"])(spec.tensors["rows"]))
        if weight:
            scale = p.info["scale"]
            assert p.info["shards"][0]["mean_sq"] == pytest.approx(mean_sq[weight] / scale**2, rel=1e-3), (
                "the logged penalty is E||x delta||^2 / scale^2 over the statistics' keys"
            )
    assert mean_sq[50.0] < 0.5 * mean_sq[0.0], mean_sq


def test_edit_key_is_the_prompts_input_at_its_most_active_token(loaded, patch):
    spec = patch.adapters[0]
    (x,) = module_inputs(loaded, spec.module, [REQ["prompt"]])
    with patch.applied(loaded):
        delta = loaded.model.get_submodule(spec.module).delta.float()
    act = torch.linalg.vector_norm(x @ delta, dim=-1)
    assert spec.tensors["keys"].shape == (1, x.shape[1])
    assert torch.allclose(spec.tensors["keys"][0], x[act.argmax()])
    assert torch.linalg.vector_norm(spec.tensors["keys"] @ delta, dim=-1).item() == pytest.approx(
        patch.info["edit_activations"][0], rel=1e-5
    )
    contrast = contrast_prompts(EditRequest.from_dict(REQ), CONTRAST_SUBJECTS)
    want = torch.stack([x[torch.linalg.vector_norm(x @ delta, dim=-1).argmax()] for x in
                        module_inputs(loaded, spec.module, contrast)])  # fmt: skip
    assert torch.allclose(spec.tensors["contrast_keys"], want), "each contrast prompt's most active input"


def test_save_load_reproduces_outputs_on_a_fresh_copy(loaded, patch, tmp_path):
    back = EditPatch.load(patch.save(tmp_path / "w0")).adapters[0]
    assert back.config == patch.adapters[0].config
    assert torch.equal(back.tensors["keys"], patch.adapters[0].tensors["keys"]), "the edit keys travel too"
    want, got = reload_scores(patch, loaded, tmp_path / "w", [REQ["prompt"], REQ2["prompt"], *IRRELEVANT])
    assert got == want


def test_lifelong_second_patch_extends_the_side_memory_and_undo_restores(loaded, patch):
    snap = state(loaded.model)
    name = patch.adapters[0].module
    base_scores = lp(loaded, [REQ["prompt"]])[0], lp(loaded, [REQ2["prompt"]], " English")[0]
    session = lmedit.EditSession(loaded)
    session.apply(patch)
    first = loaded.model.get_submodule(name)
    # no sampled passages here: with 13 trainable rows the tiny model cannot keep 16 of them silent and the
    # first edit routed at once (the chain's mechanics are under test, not the routing's capacity)
    second = lmedit.edit(
        loaded, REQ2, method="wise", irrelevant_prompts=IRRELEVANT, irrelevant_corpus=None, replay_keys=8,
        **FAST,
    )  # fmt: skip
    no_replay = lmedit.edit(
        loaded, REQ2, method="wise", irrelevant_prompts=IRRELEVANT, irrelevant_corpus=None, **FAST
    )
    assert no_replay.info["shards"][0]["edit_inputs"] == 1, "replay is off by default"
    spec = second.adapters[0]
    assert spec.parent == first.spec_fingerprint
    assert spec.config["n_edits"] == 2
    first_min = patch.adapters[0].config["min_act"]
    assert spec.config["min_act"] == min(first_min, second.info["edit_activations"][0]), (
        "the running minimum of the activations recorded when each patch was made"
    )
    assert spec.config["epsilon"] == pytest.approx(spec.config["act_ratio"] * spec.config["min_act"])
    assert not torch.equal(spec.tensors["index"], patch.adapters[0].tensors["index"]), "a new random mask"
    assert second.info["earlier_keys"] == 1 and second.info["shards"][0]["edit_inputs"] == 2, (
        "the first edit's key is replayed beside the second's prompt"
    )
    assert second.info["earlier_keys_routed_to_side"] == 1, "the first edit stays routed"
    n_contrast = patch.adapters[0].tensors["contrast_keys"].shape[0]
    assert n_contrast == len(CONTRAST_SUBJECTS)
    assert second.info["shards"][0]["irrelevant"] == no_replay.info["shards"][0]["irrelevant"] + n_contrast, (
        "the first edit's contrast keys are replayed as irrelevant inputs"
    )
    first_memory = first.delta.clone()
    session.apply(second)
    wrapper = loaded.model.get_submodule(name)
    assert wrapper.base_layer is first.base_layer
    assert wrapper.delta is first.delta, "extended in place: one dense side memory for the whole chain"
    grown = first_memory.clone()
    grown.index_add_(0, spec.tensors["index"], spec.tensors["rows"])
    assert torch.equal(wrapper.delta, grown), "the side memory is the first one plus the rows the second adds"
    assert torch.equal(wrapper.keys, torch.cat([first.keys, spec.tensors["keys"]])), "the chain's edit keys"
    assert first.keys.shape[0] == 1, "the first wrapper's view is unchanged"
    assert torch.equal(wrapper.contrast_keys, torch.cat([first.contrast_keys, spec.tensors["contrast_keys"]]))
    scores = lp(loaded, [REQ["prompt"]])[0], lp(loaded, [REQ2["prompt"]], " English")[0]
    assert scores[0] > base_scores[0] and scores[1] > base_scores[1], (base_scores, scores)
    session.undo()
    assert loaded.model.get_submodule(name) is first
    assert torch.equal(first.delta, first_memory), "undo writes the overwritten rows back bit for bit"
    with pytest.raises(PatchError, match="does not extend"):
        patch.apply(loaded)
    session.reset()
    assert same(loaded.model, snap)
    with pytest.raises(PatchError, match="not installed"):
        second.apply(loaded)
    assert same(loaded.model, snap)


def test_shards_are_trained_under_their_own_masks_and_merged(loaded):
    p = lmedit.edit(
        loaded, [REQ, REQ2], method="wise", edits_per_shard=1, irrelevant_prompts=IRRELEVANT, **FAST
    )
    assert len(p.info["shards"]) == 2
    r = round(0.2 * loaded.model.config.intermediate_size)
    assert r < p.adapters[0].tensors["index"].numel() <= 2 * r, "the union of two different masks"
    before = lp(loaded, [REQ["prompt"]])[0], lp(loaded, [REQ2["prompt"]], " English")[0]
    with p.applied(loaded):
        after = lp(loaded, [REQ["prompt"]])[0], lp(loaded, [REQ2["prompt"]], " English")[0]
    assert after[0] > before[0] and after[1] > before[1], (before, after)


def test_replaying_the_layers_below_the_side_memory_changes_nothing(loaded, patch, monkeypatch):
    import contextlib

    import lmedit.methods.wise as wise

    monkeypatch.setattr(wise, "replay_below", lambda *a: contextlib.nullcontext())
    full = lmedit.edit(loaded, REQ, method="wise", irrelevant_prompts=IRRELEVANT, **FAST)
    assert torch.equal(full.adapters[0].tensors["rows"], patch.adapters[0].tensors["rows"])


def test_act_floor_keeps_an_edit_that_missed_beta_from_lowering_the_threshold(loaded):
    # one tiny step: the edit's activation stays far below beta
    kw = dict(irrelevant_prompts=IRRELEVANT, irrelevant_corpus=None, steps=1, lr=1e-3)
    plain = lmedit.edit(loaded, REQ, method="wise", **kw)
    floored = lmedit.edit(loaded, REQ, method="wise", act_floor=True, **kw)
    act = plain.info["edit_activations"][0]
    assert floored.info["edit_activations"][0] == act, "the floor changes the threshold only, not training"
    beta = floored.config["act_margin"][1] * floored.info["scale"]
    assert act < beta
    assert plain.info["epsilon"] == pytest.approx(plain.config["act_ratio"] * act)
    assert plain.info["edits_below_epsilon"] == 0
    assert floored.info["epsilon"] == pytest.approx(floored.config["act_ratio"] * beta)
    assert floored.info["edits_below_epsilon"] == 1, "the edit that missed its margin is not routed"


def test_fact_contrast_fills_the_edit_template_with_pool_subjects_and_checks_held_out_ones(loaded):
    subjects = fact_subjects("bundled", 0)
    assert REQ["subject"] in subjects and len(subjects) == len(set(subjects))
    held = pick_facts(subjects[-HELDOUT_FACTS:], HELDOUT_FACTS, [REQ["subject"]], None)
    neighbours = contrast_prompts(EditRequest.from_dict(REQ), held)
    p, act = _held_out_activations(
        loaded, lambda path: module_inputs(loaded, path, neighbours), irrelevant_facts="bundled",
        irrelevant_corpus=None, contrast_subjects=[], fact_contrast=4,
    )  # fmt: skip
    assert p.info["shards"][0]["irrelevant"] == len(IRRELEVANT) + 32 + 4, (
        "4 pool subjects in the edit's template"
    )
    assert p.info["heldout_neighbours"] == len(neighbours) > 0
    assert p.info["heldout_neighbours_routed_to_side"] == int((act > p.adapters[0].config["epsilon"]).sum())
