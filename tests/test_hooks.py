"""Trace/TraceDict: retain, edit, stop; hooks always removed, also on exceptions."""

from __future__ import annotations

import pytest
import torch

from lmedit.core.hooks import Trace, TraceDict, active_hook_count
from lmedit.errors import ArchitectureError
from tiny_models import tiny_loaded


@pytest.fixture(scope="module")
def loaded(smol_tok):
    return tiny_loaded("llama", smol_tok)


def _ids(tok):
    return torch.tensor([tok("The capital of France is")["input_ids"]])


def test_retain_and_edit_output(loaded, smol_tok):
    model, spec = loaded.model, loaded.arch
    ids = _ids(smol_tok)
    name = spec.module_name("mlp_out", 2)
    base = model(input_ids=ids).logits
    with Trace(model, name, retain_input=True) as tr:
        again = model(input_ids=ids).logits
    assert torch.equal(base, again)
    assert tr.input.shape[-1] == 64 and tr.output.shape[-1] == 32
    with Trace(model, name, edit_output=lambda out, _: out + 1.0):
        edited = model(input_ids=ids).logits
    assert not torch.allclose(base, edited)
    assert active_hook_count(model) == 0


def test_tracedict_stop_skips_later_layers_and_is_reusable(loaded, smol_tok):
    model, spec = loaded.model, loaded.arch
    ids = _ids(smol_tok)
    names = [spec.module_name("layer", 0), spec.module_name("layer", 1)]
    later = spec.module_name("layer", 3)
    for _ in range(2):  # the stop must re-arm for the next forward pass
        with Trace(model, later) as late, TraceDict(model, names, stop=True) as td:
            model(input_ids=ids)
        assert all(td[n].output is not None for n in names)
        assert late.output is None, "layers after the last traced one must not run"
    assert active_hook_count(model) == 0


def test_hooks_removed_on_exception(loaded, smol_tok):
    model, spec = loaded.model, loaded.arch

    def boom(out, _):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with TraceDict(model, [spec.module_name("mlp_out", i) for i in range(4)], edit_output=boom):
            model(input_ids=_ids(smol_tok))
    assert active_hook_count(model) == 0
    with pytest.raises(ArchitectureError, match="no.such.module"):
        TraceDict(model, [spec.module_name("mlp_out", 0), "no.such.module"])
    assert active_hook_count(model) == 0


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_replay_below_reuses_lower_layers_and_restores_them(arch, smol_tok):
    from lmedit.core.forward import replay_below

    loaded = tiny_loaded(arch, smol_tok)
    model, spec = loaded.model, loaded.arch
    ids = _ids(smol_tok)
    base = model(input_ids=ids).logits
    lower = model.get_submodule(spec.module_name("layer", 0))
    upper = model.get_submodule(spec.module_name("layer", 2))
    weight, up = next(lower.parameters()), next(upper.parameters())
    saved = weight.detach().clone(), up.detach().clone()
    with replay_below(model, spec, 2):
        first = model(input_ids=ids).logits
        with torch.no_grad():
            weight.add_(1.0)  # a layer below 2 changes: replayed, so no effect
        second = model(input_ids=ids).logits
        with torch.no_grad():
            up.add_(1.0)  # layer 2 still computes
        third = model(input_ids=ids).logits
        with torch.no_grad():
            up.copy_(saved[1])
        with pytest.raises(RuntimeError, match="shape"):
            model(input_ids=ids[:, :-1])
    assert torch.equal(first, base) and torch.equal(second, base) and not torch.equal(third, base)
    assert "forward" not in lower.__dict__, "the class's forward is back"
    assert not torch.equal(model(input_ids=ids).logits, base), "outside the block layer 0 computes again"
    with torch.no_grad():
        weight.copy_(saved[0])
    assert torch.equal(model(input_ids=ids).logits, base)
