"""The contract every registered method keeps, on tiny models of several architectures:
it returns an EditPatch, leaves the model bit-identical, and the patch raises the target's probability."""

from __future__ import annotations

import pytest
import torch

import lmedit
from lmedit.config import build_config, describe
from lmedit.core.patch import EditPatch
from lmedit.errors import ConfigError, RequestError
from lmedit.registry import get_method
from tiny_models import REQ, tiny_loaded

#: Per-method overrides that keep the tiny runs fast (methods not listed run with their defaults).
FAST: dict[str, dict] = {
    "ft-l": {"steps": 3, "norm_constraint": 0.05, "lr": 1e-2},
    "ft-m": {"steps": 3, "lr": 1e-2},
    # random tiny models have a nearly flat key spectrum: the default (relative 1e-2) null space can be empty
    "alphaedit": {"nullspace_energy": 0.3},
    "grace": {"steps": 10},
    "wise": {"steps": 20},
    "tpatcher": {"steps": 20},
    "lora": {"steps": 10, "lr": 1e-2},
    "ike": {"k": 2},  # the default 16 demonstrations exceed the tiny models' 256 positions
}
#: In-context methods: random tiny models do no in-context learning, so the contract checks that the patch
#: changes what the model reads (the target's score moves), not that the probability rises.
IN_CONTEXT = {"ike"}
ARCHS = ["llama", "gpt2", "gemma3_text", "gpt_neox"]


@pytest.fixture(scope="module", params=ARCHS)
def loaded(request, smol_tok):
    return tiny_loaded(request.param, smol_tok)


@pytest.mark.parametrize("method", lmedit.list_methods())
def test_method_contract(method, loaded):
    snap = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    patch = lmedit.edit(loaded, REQ, method=method, progress=False, **FAST.get(method, {}))
    assert isinstance(patch, EditPatch) and patch.method == method
    assert all(torch.equal(snap[k], v) for k, v in loaded.model.state_dict().items()), (
        "edit() mutated the model"
    )
    before = lmedit.score_pairs(loaded, [REQ["prompt"]], [REQ["target_new"]])[0].mean_logprob
    with patch.applied(loaded.model):
        after = lmedit.score_pairs(loaded, [REQ["prompt"]], [REQ["target_new"]])[0].mean_logprob
    assert after != before if method in IN_CONTEXT else after > before
    assert all(torch.equal(snap[k], v) for k, v in loaded.model.state_dict().items())
    # the patch keeps only its own tensors alive (no view into a larger tensor, e.g. a whole codebook)
    own = sum(
        t.numel() * t.element_size() for t in {t.data_ptr(): t for t in patch.tensors().values()}.values()
    )
    assert patch.nbytes <= own, f"{method}: the patch's tensors keep {patch.nbytes} bytes alive for {own}"


@pytest.mark.parametrize("method", lmedit.list_methods())
def test_every_hyperparameter_is_documented(method):
    for name, _tp, _default, help_ in describe(get_method(method).config_cls):
        assert help_, f"{method}.{name} has no help text"


def test_config_precedence_and_errors():
    info = get_method("ft-m")
    cfg = build_config(
        info.config_cls, {"m": {"layers": [2], "lr": 0.1}}, {"lr": "0.5", "steps": "7"}, model_keys=("m",)
    )
    assert cfg.layers == [2] and cfg.lr == 0.5 and cfg.steps == 7
    assert build_config(info.config_cls, {}, {"layers": "3,4"}).layers == [3, 4]
    assert build_config(info.config_cls, {}, {"layers": "5"}).layers == [5]
    templates = get_method("memit").config_cls
    got = build_config(templates, {}, {"context_templates": '["{}", "Therefore, {}"]'}).context_templates
    assert got == ["{}", "Therefore, {}"], "a JSON list for a list[str] field is parsed, not wrapped"
    assert build_config(templates, {}, {"context_templates": "{}"}).context_templates == ["{}"]
    for spelling in ("None", "null"):  # an optional field set back to None from the command line
        assert build_config(templates, {}, {"plain_key_weight": spelling}).plain_key_weight is None
    with pytest.raises(ConfigError, match="lr"):
        build_config(info.config_cls, {}, {"lr": "None"})  # not optional: None is refused, naming the field
    with pytest.raises(ConfigError, match="unknown FTConfig field 'lrr'"):
        build_config(info.config_cls, {}, {"lrr": 1})
    with pytest.raises(ConfigError, match="lr must be > 0"):
        build_config(info.config_cls, {}, {"lr": -1})
    with pytest.raises(ConfigError, match="objective"):
        build_config(info.config_cls, {}, {"objective": "bogus"})
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        get_method("nope")


def test_bad_inputs_leave_model_identical(smol_tok):
    loaded = tiny_loaded("llama", smol_tok)
    snap = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    with pytest.raises(ConfigError, match="out of range"):
        lmedit.edit(loaded, REQ, method="ft-m", layers=[99])
    with pytest.raises(RequestError, match="subject"):
        lmedit.edit(loaded, dict(REQ, subject="Louvre"), method="ft-m")
    with pytest.raises(RequestError, match="longer than the model's context"):
        lmedit.edit(loaded, dict(REQ, prompt=REQ["prompt"] + " word" * 300), method="ft-m")
    assert all(torch.equal(snap[k], v) for k, v in loaded.model.state_dict().items())
