"""Causal tracing and FFN value-vector projection: tiny random models (llama + GPT-2 layouts), one real check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lmedit
from lmedit.core.hooks import active_hook_count
from lmedit.locate import aggregate, causal_trace, plot_trace, suggest_layers
from lmedit.locate.causal_trace import TraceResult, subject_token_range
from lmedit.locate.ffn import ffn_report, value_matrix
from tiny_models import tiny_loaded

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"


@pytest.fixture(scope="module")
def tok(smol_tok):
    return smol_tok


def _tiny(tok, arch: str):
    return tiny_loaded(arch, tok, n_layers=3, init_std=None)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tok):
    return _tiny(tok, request.param)


def test_trace_shapes_and_subject(tiny):
    r = causal_trace(tiny, PROMPT, SUBJECT, samples=2, window=2)
    n_layers = tiny.arch.n_layers(tiny.model)
    assert set(r.scores) == {"hidden", "mlp", "attn"}
    for v in r.scores.values():
        assert v.shape == (n_layers, len(r.tokens))
        assert np.isfinite(v).all()
    s0, s1 = r.subject_range
    assert "".join(r.tokens[s0:s1]).strip() == SUBJECT
    assert 0 <= r.corrupted_prob <= 1 and 0 <= r.clean_prob <= 1
    assert active_hook_count(tiny.model) == 0


def test_restoring_last_layer_last_token_gives_clean_prob(tiny):
    """The last layer's output at the last position determines the prediction: restoring it is exact."""
    r = causal_trace(tiny, PROMPT, SUBJECT, kinds=("hidden",), samples=3, noise=5.0)
    last = tiny.arch.n_layers(tiny.model) - 1
    assert r.scores["hidden"][last, -1] == pytest.approx(r.clean_prob, rel=1e-4)
    # restoring a position other than the last, after the last layer, changes nothing
    assert np.allclose(r.scores["hidden"][last, :-1], r.corrupted_prob, rtol=1e-4)
    # restoring a non-subject token before the subject in layer 0 changes nothing either (it was clean)
    assert r.scores["hidden"][0, 0] == pytest.approx(r.corrupted_prob, rel=1e-4)


def test_seeded_reproducible_and_batching_invariant(tiny):
    kw = dict(kinds=("mlp",), samples=3, window=2, noise=2.0)
    a = causal_trace(tiny, PROMPT, SUBJECT, seed=1, batch_size=1000, **kw)
    b = causal_trace(tiny, PROMPT, SUBJECT, seed=1, batch_size=5, **kw)
    c = causal_trace(tiny, PROMPT, SUBJECT, seed=2, **kw)
    np.testing.assert_allclose(a.scores["mlp"], b.scores["mlp"], rtol=1e-4, atol=1e-9)
    assert a.corrupted_prob == pytest.approx(b.corrupted_prob, rel=1e-5)
    assert c.corrupted_prob != pytest.approx(a.corrupted_prob, rel=1e-6)


def test_positions_and_layers_subset(tiny):
    r = causal_trace(tiny, PROMPT, SUBJECT, kinds=("attn",), samples=1, positions=[-1], layers=[1])
    scores = r.scores["attn"]
    assert np.isfinite(scores[1, -1])
    assert np.isnan(scores).sum() == scores.size - 1


def test_answer_and_placeholder(tiny):
    r = causal_trace(
        tiny, "The {} is located in the city of", SUBJECT, answer="Paris", kinds=("hidden",), samples=1
    )
    assert r.prompt == PROMPT
    assert (
        r.answer.strip() != ""
        and r.answer_id == tiny.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    )


def test_bad_inputs(tiny):
    with pytest.raises(lmedit.RequestError, match="subject"):
        causal_trace(tiny, PROMPT, "Colosseum")
    with pytest.raises(ValueError, match="kinds"):
        causal_trace(tiny, PROMPT, SUBJECT, kinds=("resid",))


def test_hooks_removed_after_exception(tok):
    loaded = _tiny(tok, "llama")
    layer = loaded.model.model.layers[2]
    original = layer.forward

    def broken(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[0] > 1:  # only the corrupted (batched) runs fail
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    layer.forward = broken
    try:
        with pytest.raises(RuntimeError, match="boom"):
            causal_trace(loaded, PROMPT, SUBJECT, samples=2)
        assert active_hook_count(loaded.model) == 0
    finally:
        layer.forward = original


def test_plot_and_json_roundtrip(tiny, tmp_path):
    r = causal_trace(tiny, PROMPT, SUBJECT, samples=1, positions=[-1, 3])
    paths = plot_trace(r, tmp_path / "t.png")
    assert [p.name for p in paths] == ["t-hidden.png", "t-mlp.png", "t-attn.png", "t.json"]
    assert all(p.stat().st_size > 1000 for p in paths[:3])
    back = TraceResult.from_dict(json.loads(paths[-1].read_text()))
    np.testing.assert_array_equal(np.isnan(back.scores["mlp"]), np.isnan(r.scores["mlp"]))
    np.testing.assert_allclose(np.nan_to_num(back.scores["mlp"]), np.nan_to_num(r.scores["mlp"]))


def test_aggregate_and_suggest(tiny):
    cases = [
        {"prompt": "{} is located in the city of", "subject": "Eiffel Tower", "target_true": " Paris"},
        {
            "requested_rewrite": {
                "prompt": "{} is a native speaker of",
                "subject": "Danielle Darrieux",
                "target_true": {"str": "French"},
                "target_new": {"str": "English"},
            }
        },
        {"prompt": "no subject here", "subject": "Nobody", "ground_truth": "x"},
    ]
    agg = aggregate(tiny, cases, n=5, samples=2, window=2, known_only=False)
    n_layers = tiny.arch.n_layers(tiny.model)
    assert agg.n_used == 2 and agg.n_scanned == 3
    assert len(agg.effects["mlp"]["last_subject"]) == n_layers
    assert agg.best_layer == int(np.argmax(agg.effects["mlp"]["last_subject"]))
    sug = suggest_layers(agg)
    assert sug["rome"]["layers"] == [agg.best_layer]
    assert sug["memit"]["layers"][-1] == agg.best_layer
    assert active_hook_count(tiny.model) == 0


def test_subject_range_gemma_style_bos(tok):
    text, (s0, s1) = subject_token_range(tok, "{} is in", "Eiffel Tower")
    assert text == "Eiffel Tower is in" and s0 < s1


# ---------------------------------------------------------------------------------------------------- ffn
def test_ffn_decomposition_is_exact(tiny):
    model = tiny.model
    n_ff = value_matrix(tiny, 1).shape[1]
    full = ffn_report(tiny, PROMPT, layer=1, k=n_ff, top_tokens=3)
    assert full.prediction_share == pytest.approx(1.0, abs=1e-4)
    assert len(full.rows) == n_ff and all(len(r.tokens) == 3 for r in full.rows)
    # the sum of sub-updates m_i v_i is the mlp_out output (minus its bias)
    from lmedit.core.hooks import Trace

    ids = torch.tensor([lmedit.models.tokens.encode_prompt(tiny.tokenizer, PROMPT)[0]])
    name = tiny.arch.module_name("mlp_out", 1)
    with Trace(model, name, retain_input=True, detach=True) as tr, torch.no_grad():
        model(input_ids=ids)
    coeff = tr.input[0, -1]
    bias = getattr(model.get_submodule(name), "bias", None)
    out = tr.output[0, -1] - (bias if bias is not None else 0)
    torch.testing.assert_close(value_matrix(tiny, 1) @ coeff, out, rtol=1e-4, atol=1e-5)
    top = ffn_report(tiny, PROMPT, layer=1, k=4)
    mags = [r.magnitude for r in top.rows]
    assert mags == sorted(mags, reverse=True) and "neuron" in top.table()
    assert active_hook_count(model) == 0


def test_ffn_final_norm_projection_and_errors(tiny):
    r = ffn_report(tiny, PROMPT, layer=0, position=2, k=2, projection="final_norm")
    assert r.position == 2 and r.projection == "final_norm"
    with pytest.raises(ValueError, match="layer"):
        ffn_report(tiny, PROMPT, layer=99)


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_trace_and_ffn(tok, tmp_path, capsys):
    from lmedit.cli import main

    loaded = _tiny(tok, "llama")
    folder = tmp_path / "tiny"
    loaded.model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "out"
    rc = main(
        [
            "trace",
            "--model",
            str(folder),
            "--prompt",
            PROMPT,
            "--subject",
            SUBJECT,
            "--samples",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    assert {p.name for p in out.iterdir()} == {
        "trace-hidden.png",
        "trace-mlp.png",
        "trace-attn.png",
        "trace.json",
    }
    data = tmp_path / "cases.json"
    data.write_text(
        json.dumps([{"prompt": "{} is located in", "subject": "Eiffel Tower", "target_true": " Paris"}])
    )
    assert (
        main(
            [
                "trace",
                "--model",
                str(folder),
                "--aggregate",
                str(data),
                "--n",
                "1",
                "--samples",
                "1",
                "--suggest-layers",
                "--include-unknown",
            ]
        )
        == 0
    )
    assert main(["ffn", "--model", str(folder), "--prompt", PROMPT, "--layer", "2", "--k", "3"]) == 0
    text = capsys.readouterr().out
    assert (
        "largest restoration" in text
        and "best layer" in text
        and "suggested presets" in text
        and "neuron" in text
    )


# ---------------------------------------------------------------------------------------------------- real
@pytest.fixture(scope="module")
def gemma():
    try:
        return lmedit.load_model("gemma3-270m")
    except lmedit.ModelLoadError as e:
        pytest.skip(str(e))


@pytest.mark.real
def test_gemma_eiffel_restoration_top_layers(gemma):
    """Restoring the clean residual at the last token in the top layers recovers the clean answer."""
    n_layers = gemma.arch.n_layers(gemma.model)
    top = list(range(n_layers - 3, n_layers))
    r = causal_trace(
        gemma, PROMPT, SUBJECT, answer=" Paris", kinds=("hidden",), samples=3, positions=[-1], layers=top
    )
    assert r.clean_prob > 0.3, "Gemma 3 270M should know the Eiffel Tower is in Paris"
    assert r.corrupted_prob < 0.5 * r.clean_prob, "the subject corruption should destroy the fact"
    for layer in top:
        assert r.scores["hidden"][layer, -1] > 0.8 * r.clean_prob
    assert active_hook_count(gemma.model) == 0
