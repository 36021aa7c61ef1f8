"""Keys k* and values v* on tiny random models: positions, template averaging, the cached-prefix optimisation."""

from __future__ import annotations

import pytest
import torch

import lmedit
from lmedit.core.hooks import Trace
from lmedit.core.keys import DEFAULT_TEMPLATES, check_templates, compute_keys, run_sites, template_site
from lmedit.core.values import optimize_values
from lmedit.errors import ConfigError
from lmedit.models import tokens
from lmedit.request import EditRequest
from tiny_models import tiny_loaded

ARCHS = ["llama", "gpt2", "gemma3_text", "gpt_neox"]
REQ = EditRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", " Rome")
REQ2 = EditRequest("{} speaks the language", "Danielle Darrieux", " English")


@pytest.fixture(scope="module", params=ARCHS)
def loaded(request, smol_tok):
    return tiny_loaded(request.param, smol_tok)


def test_template_site_finds_subject_last_token(smol_tok):
    site = template_site(smol_tok, REQ, "Therefore, {}")
    assert site.text == "Therefore, " + REQ.prompt_text
    assert "Tower" in smol_tok.decode(site.ids[site.subject_index])
    assert "Tower" not in smol_tok.decode(site.ids[site.subject_index + 1])


def test_check_templates_rejects_bad_ones():
    assert check_templates(DEFAULT_TEMPLATES)[0] == "{}"
    for bad in ([], ["no placeholder"], ["{} trailing"], ["{} and {}"]):
        with pytest.raises(ConfigError):
            check_templates(bad)


def test_keys_match_a_direct_forward_and_average(loaded):
    layer = 1
    keys = compute_keys(loaded, [REQ, REQ2], [layer], ["{}", "Therefore, {}"])
    assert keys.per_template[layer].shape[:2] == (2, 2)
    torch.testing.assert_close(keys.mean[layer], keys.per_template[layer].mean(1))
    # the plain prompt's key, from an unpadded single forward pass
    site = template_site(loaded.tokenizer, REQ2, "{}")
    name = loaded.arch.module_name("mlp_out", layer)
    with torch.no_grad(), Trace(loaded.model, name, retain_input=True, stop=True) as tr:
        loaded.model(input_ids=torch.tensor([site.ids]))
    torch.testing.assert_close(
        keys.plain(layer)[1], tr.input[0, site.subject_index].float(), rtol=1e-5, atol=1e-5
    )


def _mean_nll(loaded, prompts, target):
    scores = lmedit.score_pairs(loaded, prompts, [target] * len(prompts))
    return sum(-s.mean_logprob for s in scores) / len(scores)


def test_cached_prefix_loss_equals_full_forward(loaded):
    """At delta = 0 the optimiser's NLL (prefix cached once, suffix recomputed) equals plain scoring."""
    templates = ["{}", "I read this in a book. {}"]
    site = loaded.arch.module_name("mlp_out", 1)
    res = optimize_values(loaded, [REQ, REQ2], [site], templates, steps=1, kl_factor=0.0)
    for i, r in enumerate([REQ, REQ2]):
        prompts = [t.replace("{}", r.prompt_text) for t in templates]
        assert res.nll[i] == pytest.approx(_mean_nll(loaded, prompts, r.target_new), rel=1e-4, abs=1e-4)
    # init is the site's output at the plain prompt's subject token
    sites = [template_site(loaded.tokenizer, r, "{}") for r in (REQ, REQ2)]
    out = run_sites(loaded, sites, [site], retain="output")[site]
    torch.testing.assert_close(res.init[site], out, rtol=1e-4, atol=1e-4)


def test_value_optimisation_lowers_nll_and_respects_clamp(loaded):
    site = loaded.arch.module_name("layer", 1)
    snap = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    res = optimize_values(
        loaded,
        [REQ],
        [site],
        list(DEFAULT_TEMPLATES[:3]),
        steps=8,
        lr=0.5,
        clamp_norm_factor=0.5,
        early_stop=0.0,
    )
    first = optimize_values(loaded, [REQ], [site], list(DEFAULT_TEMPLATES[:3]), steps=1).nll[0]
    assert res.nll[0] < first
    assert res.steps == [8]
    assert float(res.delta[site].norm()) <= 0.5 * float(res.init[site].norm()) * (1 + 1e-5)
    assert res.timing["prefix_s"] >= 0 and res.timing["step_count"] == 8
    assert all(torch.equal(snap[k], v) for k, v in loaded.model.state_dict().items())


def test_batched_requests_are_independent(smol_tok):
    """Optimising two requests together gives each the delta it gets alone (separate losses and Adam states)."""
    loaded = tiny_loaded("llama", smol_tok)
    site = loaded.arch.module_name("mlp_out", 1)
    kw = dict(steps=4, early_stop=0.0, kl_factor=0.0625)
    both = optimize_values(loaded, [REQ, REQ2], [site], ["{}", "Therefore, {}"], **kw)
    alone = optimize_values(loaded, [REQ2], [site], ["{}", "Therefore, {}"], **kw)
    torch.testing.assert_close(both.delta[site][1], alone.delta[site][0], rtol=1e-3, atol=1e-4)


def test_batches_are_formed_by_suffix_length_and_results_come_back_in_request_order(smol_tok):
    """Requests given long, short, long, short are optimised in batches of similar suffix length (the two short
    ones together: fewer padded positions than the batches as given), and each result comes back at its
    request's index, equal to what the request gets alone."""
    from lmedit.core.values import _suffix_len

    loaded = tiny_loaded("llama", smol_tok)
    site = loaded.arch.module_name("mlp_out", 1)
    reqs = [
        EditRequest("{} was, as the records of the city archive show, founded by", "Ulm Minster", " Romans"),
        EditRequest("{} is in", "Paris", " Italy"),
        EditRequest(
            "{} is a famous landmark which everyone who visits the country sees, in", "Big Ben", " Oslo"
        ),
        EditRequest("{} speaks", "Danielle Darrieux", " English"),
    ]
    lens = [_suffix_len(loaded.tokenizer, r) for r in reqs]
    assert min(lens[0], lens[2]) > max(lens[1], lens[3]), lens
    kw = dict(steps=3, early_stop=0.0, kl_factor=0.0)
    res = optimize_values(loaded, reqs, [site], ["{}"], batch_requests=2, **kw)
    in_order = 2 * max(lens[1], lens[3]) + 2 * max(lens[0], lens[2])
    as_given = 2 * max(lens[0], lens[1]) + 2 * max(lens[2], lens[3])
    assert res.timing["positions"] == 3 * in_order < 3 * as_given
    for i, req in enumerate(reqs):
        alone = optimize_values(loaded, [req], [site], ["{}"], **kw)
        torch.testing.assert_close(res.delta[site][i], alone.delta[site][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(res.init[site][i], alone.init[site][0], rtol=1e-5, atol=1e-6)
        assert res.loss[i] == pytest.approx(alone.loss[0], rel=1e-5) and res.steps[i] == alone.steps[0]


def test_essence_prompts_run_apart_from_the_prompts_so_neither_is_padded_to_the_other(smol_tok):
    """The essence prompt's suffix ("{subject's last token} is a") is shorter than the edit prompt's: the two run
    as separate parts of each step, so the positions computed are each row's own length, not the longest."""
    from lmedit.core.values import _rows, _suffix_len

    loaded = tiny_loaded("llama", smol_tok)
    site = loaded.arch.module_name("mlp_out", 1)
    req = EditRequest("{} was, as the records of the city archive show, founded by", "Ulm Minster", " Romans")
    (kl_row,) = [r for r in _rows(loaded.tokenizer, [req], ["{}"], "{} is a") if r.kl]
    prompt, essence = _suffix_len(loaded.tokenizer, req), len(kl_row.ids) - kl_row.subject
    assert essence < prompt
    res = optimize_values(loaded, [req], [site], ["{}"], steps=3, early_stop=0.0, kl_factor=0.5)
    assert res.timing["positions"] == 3 * (prompt + essence) < 3 * 2 * prompt


def test_stopped_requests_leave_the_batch_and_the_others_are_unaffected(smol_tok):
    """With an early-stop loss between the two requests' losses after 3 steps, one stops by step 3 and the other
    runs on alone: only its rows (2 templates + the essence prompt) are computed from then on, and each delta is
    the one it gets when optimised alone."""
    loaded = tiny_loaded("llama", smol_tok)
    site = loaded.arch.module_name("mlp_out", 1)
    kw = dict(steps=10, lr=0.5)
    mid = optimize_values(loaded, [REQ, REQ2], [site], ["{}", "Therefore, {}"], steps=3, early_stop=0.0).loss
    kw["early_stop"] = sum(mid) / 2
    both = optimize_values(loaded, [REQ, REQ2], [site], ["{}", "Therefore, {}"], **kw)
    assert min(both.steps) <= 3 < max(both.steps), both.steps
    assert both.timing["row_steps"] == 3 * sum(both.steps), "rows of stopped requests are not recomputed"
    for i, req in enumerate([REQ, REQ2]):
        alone = optimize_values(loaded, [req], [site], ["{}", "Therefore, {}"], **kw)
        assert alone.steps == [both.steps[i]]
        torch.testing.assert_close(both.delta[site][i], alone.delta[site][0], rtol=1e-4, atol=1e-5)
        assert both.loss[i] == pytest.approx(alone.loss[0], rel=1e-5)


def test_layers_below_the_site_replay_without_changing_the_values(loaded, monkeypatch):
    """Replaying the layers below the site (and dropping a stopped request's rows from the replay) gives the
    deltas that recomputing every layer at every step gives."""
    import contextlib

    import lmedit.core.values as values
    from lmedit.core.forward import Replay

    site = loaded.arch.module_name("mlp_out", 2)
    kw = dict(steps=6, early_stop=0.0, lr=0.5)
    calls = []
    inner = loaded.model.get_submodule(loaded.arch.module_name("mlp_out", 0))  # runs only if layer 0 computes
    handle = inner.register_forward_hook(lambda *a: calls.append(1))
    try:
        replayed = optimize_values(loaded, [REQ, REQ2], [site], ["{}", "Therefore, {}"], **kw)
    finally:
        handle.remove()
    # the prompts and the essence prompts run as two parts: each part's prefix pass and first suffix pass
    assert len(calls) == 4, "layer 0 runs in each part's prefix pass and first suffix pass only"
    monkeypatch.setattr(values, "replay_below", lambda *a: contextlib.nullcontext(Replay()))
    full = optimize_values(loaded, [REQ, REQ2], [site], ["{}", "Therefore, {}"], **kw)
    torch.testing.assert_close(replayed.delta[site], full.delta[site], rtol=1e-6, atol=1e-7)
    # with a request stopping early, the replay keeps the remaining rows
    mid = optimize_values(loaded, [REQ, REQ2], [site], ["{}", "Therefore, {}"], **dict(kw, steps=3)).loss
    kw_stop = dict(kw, early_stop=sum(mid) / 2)  # one request stops by step 3, the other runs on
    recomputed = optimize_values(loaded, [REQ, REQ2], [site], ["{}", "Therefore, {}"], **kw_stop)
    monkeypatch.undo()
    replayed_stop = optimize_values(loaded, [REQ, REQ2], [site], ["{}", "Therefore, {}"], **kw_stop)
    assert recomputed.steps == replayed_stop.steps and min(recomputed.steps) <= 3 < max(recomputed.steps)
    torch.testing.assert_close(replayed_stop.delta[site], recomputed.delta[site], rtol=1e-4, atol=1e-5)


def test_subject_at_start_without_prefix(smol_tok):
    """GPT-2-style tokenizers add no BOS: a subject at position 0 leaves an empty prefix for the plain prompt."""
    loaded = tiny_loaded("gpt2", smol_tok)
    req = EditRequest("{} is located in", "Paris", " France")
    assert tokens.special_prefix(smol_tok) == []
    site = loaded.arch.module_name("mlp_out", 0)
    res = optimize_values(loaded, [req], [site], ["{}"], steps=2, kl_factor=0.0)
    assert res.nll[0] > 0 and torch.isfinite(res.delta[site]).all()


def _essence_kl(loaded, req, site, delta):
    """KL(orig || edited) of the next-token distribution after the subject's last token and after the last token
    of "{subject} is a", with ``delta`` added to ``site``'s output at the subject's last token."""
    tok = loaded.tokenizer
    text = req.subject + " is a"
    s = tokens.subject_last_index(tok, text, 0, len(req.subject))
    ids = torch.tensor([tokens.encode_prompt(tok, text)[0]])

    def add(out, _name):
        out = out.clone()
        out[0, s] += delta.to(out.dtype)
        return out

    with torch.no_grad():
        ref = torch.log_softmax(loaded.model(input_ids=ids).logits[0].float(), -1)
        with Trace(loaded.model, site, retain_output=False, edit_output=add):
            new = torch.log_softmax(loaded.model(input_ids=ids).logits[0].float(), -1)
    kl = (ref.exp() * (ref - new)).sum(-1)
    return float(kl[s]), float(kl[-1])


def test_kl_position_keeps_the_essence_distribution_where_it_is_taken(smol_tok):
    """kl_position='subject' takes the essence term after the subject's last token (the reference code's
    position), 'last' after "{subject} is a" (the paper's): the optimiser's KL term equals an independent forward's
    KL at that position, and constraining the subject position keeps it closer to the unedited model."""
    loaded = tiny_loaded("llama", smol_tok)
    site = loaded.arch.module_name("mlp_out", 1)
    kw = dict(steps=12, lr=0.5, early_stop=0.0, kl_factor=5.0, weight_decay=0.0)
    kl = {}
    for at, pos in enumerate(("subject", "last")):
        res = optimize_values(loaded, [REQ2], [site], ["{}", "Therefore, {}"], kl_position=pos, **kw)
        kl[pos] = _essence_kl(loaded, REQ2, site, res.delta[site][0])
        term = (res.loss[0] - res.nll[0]) / kw["kl_factor"]  # the loss's KL term at the final delta
        assert term == pytest.approx(kl[pos][at], rel=1e-3, abs=1e-6), (pos, term, kl[pos])
    assert kl["subject"][0] < kl["last"][0] / 10, kl
    with pytest.raises(ValueError, match="kl_position"):
        optimize_values(loaded, [REQ2], [site], ["{}"], kl_position="first")


def test_plain_key_weight_mixes_the_plain_prompts_key_with_the_templates_mean(loaded):
    keys = compute_keys(loaded, [REQ, REQ2], [1], ["Therefore, {}", "{}", "I read this in a book. {}"])
    per = keys.per_template[1]
    torch.testing.assert_close(keys.averaged(1), keys.mean[1])
    want = 0.5 * per[:, 1] + 0.25 * (per[:, 0] + per[:, 2])  # MEMIT's code: mean over ['{}'] and the others
    torch.testing.assert_close(keys.averaged(1, 0.5), want)
    torch.testing.assert_close(keys.averaged(1, 1.0), keys.plain(1))
    no_plain = compute_keys(loaded, [REQ], [1], ["Therefore, {}", "I read this in a book. {}"])
    with pytest.raises(ConfigError, match="plain template"):
        no_plain.averaged(1, 0.5)
    with pytest.raises(ConfigError, match="plain_key_weight must be in"):
        lmedit.edit(loaded, REQ, method="memit", layers=[1], plain_key_weight=1.5)
