"""The batched scoring engine equals a straightforward per-example computation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

import lmedit
from lmedit.evaluate.scoring import (
    generate_ids,
    greedy_generate,
    prefix_groups,
    score_pairs,
)
from lmedit.models import tokens

CACHE = Path.home() / ".cache" / "lmedit" / "models"

PAIRS = [
    ("The Eiffel Tower is located in the city of", " Paris"),
    ("The mother tongue of Danielle Darrieux is", "French"),
    ("Which family does Epaspidoceras belong to?", " Aspidoceratidae"),
    ("Michel Rocard is a native speaker of", " French language, as his"),
    ("BBC One, by", "BBC"),
]


def _tokenizer():
    folders = sorted(CACHE.glob("SmolLM2*")) + sorted(CACHE.glob("gemma*"))
    if not folders:
        pytest.skip(f"no cached tokenizer under {CACHE} (run lmedit.load_model('smollm2-135m') once)")
    return transformers.AutoTokenizer.from_pretrained(folders[0])


@pytest.fixture(scope="module")
def tiny():
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=256,
    )
    return lmedit.load_model((transformers.LlamaForCausalLM(cfg), tok))


def _reference(loaded, prompt: str, target: str) -> tuple[list[float], list[int]]:
    """One pair, no padding, full logits of every position: the obvious computation.

    The log-softmax runs in float64: over Gemma's 262k-token vocabulary a float32 log-softmax is itself off
    by up to ~6e-5 (measured against float64), more than the tolerance.
    """
    model, tok = loaded
    enc = tokens.encode_pair(tok, prompt, target)
    with torch.no_grad():
        logits = model(torch.tensor([enc.ids])).logits[0].double()  # [pos, vocab]
    pos = torch.arange(enc.prompt_len - 1, len(enc.ids) - 1)
    lp = torch.log_softmax(logits[pos], -1)
    tgt = torch.tensor(enc.ids[enc.prompt_len :])
    return lp.gather(1, tgt[:, None])[:, 0].tolist(), logits[pos].argmax(-1).tolist()


def _reference_generate(loaded, prompt: str, n: int) -> list[int]:
    model, tok = loaded
    ids = torch.tensor([tokens.encode_prompt(tok, prompt)[0]])
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def _check_scores(loaded, pairs, batch_size):
    scores = score_pairs(loaded, [p for p, _ in pairs], [t for _, t in pairs], batch_size=batch_size)
    for (p, t), s in zip(pairs, scores):
        ref_lp, ref_am = _reference(loaded, p, t)
        assert len(s.logprobs) == len(ref_lp) == tokens.encode_pair(loaded.tokenizer, p, t).target_len
        assert s.logprobs == pytest.approx(ref_lp, abs=1e-5)
        assert s.argmax == ref_am
        assert s.correct == [a == b for a, b in zip(ref_am, s.target_ids)]


@pytest.mark.parametrize("batch_size", [1, 2, 32])
def test_batched_scores_equal_per_example(tiny, batch_size):
    _check_scores(tiny, PAIRS, batch_size)


#: pairs that share prefixes: one prompt with two answers, two prompts about one subject, unrelated ones
SHARED = [
    ("The Eiffel Tower is located in the city of", " Paris"),
    ("The Eiffel Tower is located in the city of", " Rome"),
    ("The Eiffel Tower is located in the country of", " France"),
    ("The Eiffel Tower is located in the country of", " Italy and Spain"),
    ("The Eiffel Tower is", " tall"),
    ("The mother tongue of Danielle Darrieux is", "French"),
    ("The mother tongue of Danielle Darrieux is", " English"),
    ("BBC One, by", "BBC"),
]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text", "gpt_neox"])
@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_shared_prefix_scores_equal_per_example(smol_tok, arch, batch_size):
    from tiny_models import tiny_loaded

    loaded = tiny_loaded(arch, smol_tok)
    encs = [tokens.encode_pair(smol_tok, p, t) for p, t in SHARED]
    groups = prefix_groups([e.ids[:-1] for e in encs], [e.prompt_len - 1 for e in encs])
    assert sum(len(g) for n, g in groups if n > 0) >= 5  # the shared-prefix path is exercised
    _check_scores(loaded, SHARED, batch_size)


def test_prefix_groups_share_only_what_is_allowed():
    inputs = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7], [1, 2, 3, 4, 9], [8, 8, 8, 8, 8], [1, 2]]
    limits = [5, 5, 4, 4, 1]
    groups = prefix_groups(inputs, limits, min_shared=3)
    assert sorted(i for _, g in groups for i in g) == [0, 1, 2, 3, 4]  # every input exactly once
    assert (4, [2, 0, 1]) in groups or (4, [0, 1, 2]) in groups  # the prefix [1,2,3,4] is shared by three
    assert (0, [3]) in groups and (0, [4]) in groups  # nothing shared: singletons
    for n, g in groups:
        assert n <= min(limits[i] for i in g)
        assert all(inputs[i][:n] == inputs[g[0]][:n] for i in g)
    # a limit stops sharing: only 2 tokens may be shared, below min_shared
    assert all(n == 0 for n, _ in prefix_groups(inputs[:2], [2, 2], min_shared=3))


def test_head_chunking_does_not_change_scores(tiny, monkeypatch):
    from lmedit.core import forward

    full = score_pairs(tiny, [p for p, _ in PAIRS], [t for _, t in PAIRS])
    monkeypatch.setattr(forward, "HEAD_CHUNK", 3)
    chunked = score_pairs(tiny, [p for p, _ in PAIRS], [t for _, t in PAIRS])
    for a, b in zip(full, chunked):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6) and a.argmax == b.argmax


def test_batched_generation_equals_per_example(tiny):
    prompts = [p for p, _ in PAIRS]
    batched = generate_ids(tiny, prompts, max_new_tokens=5, batch_size=4)
    for p, got in zip(prompts, batched):
        assert got == _reference_generate(tiny, p, 5)
    texts = greedy_generate(tiny, prompts[:2], max_new_tokens=5)
    assert texts == tiny.tokenizer.batch_decode(batched[:2], skip_special_tokens=True)


@pytest.fixture(scope="module")
def gemma():
    return lmedit.load_model("gemma3-270m")


@pytest.mark.real
def test_real_model_batched_scores_equal_per_example(gemma):
    _check_scores(gemma, PAIRS[:4], batch_size=4)
    _check_scores(gemma, SHARED[:5], batch_size=8)
    s = score_pairs(gemma, ["The Eiffel Tower is located in the city of"], [" Paris"])[0]
    assert s.accuracy == 1.0  # the bundled model knows this fact


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_shared_lead_token_scores_equal_per_example(smol_tok, arch, monkeypatch):
    """Inputs that all start with one token (here "The"; BOS on real models) share one copy of it per row."""
    import lmedit.evaluate.scoring as scoring
    from tiny_models import tiny_loaded

    leads = []
    real_pack = scoring.pack

    def spy(*args, **kwargs):
        packing = real_pack(*args, **kwargs)
        leads.append(packing.lead)
        return packing

    monkeypatch.setattr(scoring, "pack", spy)
    loaded = tiny_loaded(arch, smol_tok)
    for batch_size in (1, 3, 32):
        _check_scores(loaded, [(p, t) for p, t in SHARED if p.startswith("The")], batch_size)
    assert leads == [True, True, True]
