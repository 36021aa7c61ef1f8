"""Knowledge Neurons: patch contract, bit-identical model, the modes' column updates, IG completeness."""

from __future__ import annotations

import pytest
import torch
import transformers

import lmedit
from lmedit.core.delta import fingerprint
from lmedit.core.hooks import active_hook_count
from lmedit.methods.kn import _scaled_answer_prob, integrated_gradients, last_activations
from lmedit.models.arch import as_out_in, weight_layout
from tiny_models import tiny_loaded

REQ = dict(
    prompt="The Eiffel Tower is located in the city of",
    subject="Eiffel Tower",
    target_new=" Rome",
    target_true=" Paris",
    rephrase=["Where is the Eiffel Tower? It is in the city of"],
)


@pytest.fixture(scope="module")
def tok(smol_tok):
    return smol_tok


def _tiny(tok, arch: str):
    return tiny_loaded(arch, tok, n_layers=3, init_std=None)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tok):
    return _tiny(tok, request.param)


def _values(loaded, layer: int) -> torch.Tensor:
    module = loaded.model.get_submodule(loaded.arch.module_name("mlp_out", layer))
    return as_out_in(module.weight, weight_layout(module))


@pytest.mark.parametrize("mode", ["erase", "amplify", "edit"])
def test_patch_contract(tiny, mode, tmp_path):
    model = tiny.model
    before = {n: fingerprint(p) for n, p in model.named_parameters()}
    patch = lmedit.edit(tiny, REQ, method="kn", mode=mode, steps=4, max_neurons=3)
    assert {n: fingerprint(p) for n, p in model.named_parameters()} == before, (
        "edit must not mutate the model"
    )
    assert active_hook_count(model) == 0
    assert patch.method == "kn" and patch.config["mode"] == mode
    neurons = patch.info["requests"][0]["neurons"]
    assert 1 <= len(neurons) <= 3
    touched = {}
    for layer, neuron, _ in neurons:
        touched.setdefault(layer, set()).add(neuron)
    assert {d.name for d in patch.deltas} == {
        tiny.arch.module_name("mlp_out", la) + ".weight" for la in touched
    }
    for d in patch.deltas:
        layer = int(d.name.split(".")[-4])
        module = model.get_submodule(d.name.rsplit(".", 1)[0])
        view = as_out_in(d.delta, weight_layout(module))  # [d_model, d_ff]
        nonzero = set(torch.nonzero(view.abs().sum(0)).flatten().tolist())
        assert nonzero == touched[layer], "only the selected neurons' value vectors may change"
    # the columns after applying
    originals = {(la, n): _values(tiny, la)[:, n].clone() for la, ns in touched.items() for n in ns}
    touched_layers = sorted(touched)
    acts = last_activations(tiny, REQ["prompt"], touched_layers)  # [layers, d_ff]
    with patch.applied(model):
        for (la, n), v in originals.items():
            now = _values(tiny, la)[:, n]
            if mode == "erase":
                assert torch.count_nonzero(now) == 0
            elif mode == "amplify":
                torch.testing.assert_close(now, 2 * v)
            else:
                head = as_out_in(model.lm_head.weight, weight_layout(model.lm_head))
                old_id = tiny.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
                new_id = tiny.tokenizer(" Rome", add_special_tokens=False)["input_ids"][0]
                t_old = head[old_id] / head[old_id].norm() * v.norm()
                t_new = head[new_id] / head[new_id].norm() * v.norm()
                sign = 1.0 if float(acts[touched_layers.index(la), n]) >= 0 else -1.0
                torch.testing.assert_close(now, v + sign * (8 * t_new - t_old), rtol=1e-4, atol=1e-5)
    assert {n: fingerprint(p) for n, p in model.named_parameters()} == before, "revert must be bit-exact"
    saved = patch.save(tmp_path / "kn")
    loaded_patch = lmedit.EditPatch.load(saved)
    assert [d.name for d in loaded_patch.deltas] == [d.name for d in patch.deltas]


def test_erase_lowers_answer_probability(tok):
    """Zeroing the neurons with the largest attribution lowers the attributed answer's probability."""
    loaded = _tiny(tok, "llama")
    from lmedit.evaluate.scoring import score_pairs

    pre = score_pairs(loaded, [REQ["prompt"]], [" Paris"])[0].logprobs[0]
    patch = lmedit.edit(loaded, REQ, method="kn", mode="erase", steps=8, max_neurons=5)
    with patch.applied(loaded.model):
        post = score_pairs(loaded, [REQ["prompt"]], [" Paris"])[0].logprobs[0]
    assert post < pre


def test_integrated_gradients_completeness(tok):
    """IG completeness axiom: attributions sum to P(a) - P(0) (up to the Riemann error, O(1/steps))."""
    loaded = _tiny(tok, "llama")
    ids = tok(REQ["prompt"], add_special_tokens=False)["input_ids"]
    prefix = lmedit.models.tokens.special_prefix(tok)
    answer = tok(" Paris", add_special_tokens=False)["input_ids"][0]
    attr = integrated_gradients(loaded, REQ["prompt"], answer, [1], steps=200, batch_size=400)  # [1, d_ff]
    x = torch.tensor([prefix + ids])
    name = loaded.arch.module_name("mlp_out", 1)
    with torch.no_grad():
        full = _scaled_answer_prob(loaded, x, {name: _mlp_in(loaded, x, name)[None]}, answer)
        zero = _scaled_answer_prob(loaded, x, {name: torch.zeros_like(attr)}, answer)
    assert float(attr.sum()) == pytest.approx(float(full - zero), rel=0.05, abs=1e-9)


def _mlp_in(loaded, x, name):
    from lmedit.core.hooks import Trace

    with Trace(loaded.model, name, retain_input=True, detach=True) as tr, torch.no_grad():
        loaded.model(input_ids=x)
    return tr.input[0, -1]


def test_config_errors(tiny):
    with pytest.raises(lmedit.ConfigError, match="threshold"):
        lmedit.edit(tiny, REQ, method="kn", threshold=1.5)
    with pytest.raises(lmedit.ConfigError, match="layers"):
        lmedit.edit(tiny, REQ, method="kn", layers=[99])


def test_registered():
    assert "kn" in lmedit.list_methods()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_prefix_cache_gives_the_same_attributions(tok, arch):
    if arch == "gemma3":
        torch.manual_seed(0)
        cfg = transformers.Gemma3TextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=len(tok),
            sliding_window=4,  # shorter than the prompt: the sliding-window cache path is exercised
        )
        loaded = lmedit.load_model((transformers.Gemma3ForCausalLM(cfg), tok))
    else:
        loaded = _tiny(tok, arch)
    answer = tok(" Paris", add_special_tokens=False)["input_ids"][0]
    a = integrated_gradients(loaded, REQ["prompt"], answer, [0, 2], steps=3, prefix_cache=False)
    b = integrated_gradients(loaded, REQ["prompt"], answer, [0, 2], steps=3, prefix_cache=True)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(a.abs().max()))
    assert active_hook_count(loaded.model) == 0


def test_negative_prompts_remove_generic_neurons():
    """Neurons over the threshold on a negative prompt (the template with another subject) are dropped."""
    from lmedit.methods.kn import KNConfig, select_neurons

    cfg = KNConfig(threshold=0.2, agreement=1.0, max_neurons=10, min_neurons=1)
    pos = [torch.tensor([[1.0, 0.9, 0.5, 0.0]]), torch.tensor([[0.8, 1.0, 0.6, 0.1]])]  # 1 layer x 4 neurons
    assert [n for _, n, _ in select_neurons(pos, [3], cfg)] == [1, 0, 2]  # by mean attribution
    neg = [torch.tensor([[0.05, 1.0, 0.1, 0.0]])]  # neuron 1 fires for the answer whatever the subject
    got = select_neurons(pos, [3], cfg, neg)
    assert [(la, n) for la, n, _ in got] == [(3, 0), (3, 2)]
    # when every agreed neuron is generic, the fallback takes the best non-generic one
    neg_all = [torch.tensor([[1.0, 1.0, 1.0, 0.0]])]
    assert [n for _, n, _ in select_neurons(pos, [3], cfg, neg_all)] == [3]


def test_negative_prompts_are_run_and_recorded(tok):
    loaded = _tiny(tok, "llama")
    patch = lmedit.edit(
        loaded, REQ, method="kn", mode="erase", steps=4, negative_subjects=["Marie Curie", "Eiffel Tower"]
    )
    assert patch.info["requests"][0]["negative_prompts"] == 1  # its own subject is skipped
    off = lmedit.edit(loaded, REQ, method="kn", mode="erase", steps=4, negative_subjects=[])
    assert off.info["requests"][0]["negative_prompts"] == 0
