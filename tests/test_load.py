"""load_model: every accepted spec form, and clear errors for the rest."""

from __future__ import annotations

import pytest

import lmedit
from lmedit.errors import ModelLoadError
from tiny_models import tiny_model


def test_pair_and_loaded_passthrough(smol_tok):
    model = tiny_model("llama", len(smol_tok))
    loaded = lmedit.load_model((model, smol_tok))
    m, t = loaded
    assert m is model and t is smol_tok and loaded.arch.name == "llama"
    assert lmedit.load_model(loaded) is loaded
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_local_folder_roundtrip(tmp_path, smol_tok):
    model = tiny_model("gpt2", len(smol_tok))
    model.save_pretrained(tmp_path)
    smol_tok.save_pretrained(tmp_path)
    loaded = lmedit.load_model(tmp_path)
    assert loaded.arch.name == "gpt2" and loaded.source["kind"] == "folder"
    assert loaded.max_positions == model.config.n_positions


def test_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="offline mode is on.*bundled model"):
        lmedit.load_model("someorg/some-model-that-is-not-cached")
    with pytest.raises(ModelLoadError, match="no such .gguf file"):
        lmedit.load_model(tmp_path / "missing.gguf")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        lmedit.load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="neither an existing folder"):
        lmedit.load_model("./not/here/at/all")
    with pytest.raises(ModelLoadError, match="pair"):
        lmedit.load_model((1, 2, 3))
