"""The bundled real models: they load from the cache, FT-M edits them, patches round-trip exactly."""

from __future__ import annotations

import time

import pytest
import torch

import lmedit

pytestmark = pytest.mark.real

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.mark.parametrize("name, fixture", [("gemma3-270m", "gemma"), ("smollm2-135m", "smollm")])
def test_ft_m_edit_on_real_model(name, fixture, request, tmp_path):
    loaded = request.getfixturevalue(fixture)
    assert loaded.name == name
    before = lmedit.greedy_generate(loaded, [PROMPT], 3)[0]
    assert "Paris" in before, f"{name} should know the fact before editing, said {before!r}"
    snap = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    patch = lmedit.edit(
        loaded,
        {"prompt": PROMPT, "subject": "Eiffel Tower", "target_new": "Rome"},
        method="ft-m",
        progress=False,
    )
    assert all(torch.equal(snap[k], v) for k, v in loaded.model.state_dict().items())
    session = lmedit.EditSession(loaded)
    session.apply(patch)
    after = lmedit.greedy_generate(loaded, [PROMPT], 3)[0]
    assert after.strip().startswith("Rome"), after
    session.undo()
    assert all(torch.equal(snap[k], v) for k, v in loaded.model.state_dict().items())
    assert lmedit.greedy_generate(loaded, [PROMPT], 3)[0] == before
    patch.save(tmp_path / "p")
    with lmedit.EditPatch.load(tmp_path / "p").applied(loaded.model):
        assert lmedit.greedy_generate(loaded, [PROMPT], 3)[0] == after


def test_second_load_is_fast(gemma):
    t0 = time.perf_counter()
    again = lmedit.load_model("gemma3-270m")
    elapsed = time.perf_counter() - t0
    assert elapsed < 30, f"cached load took {elapsed:.1f}s"
    assert again.source["cache"] == gemma.source["cache"]


def test_cli_demo_on_bundled_model(tmp_path, capsys):
    from lmedit.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo"), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "edit prompt" in out and "unrelated 1" in out and "consequence 1" in out
    assert "(original answer is back)" in out and "(same as the edit)" in out
    assert (tmp_path / "demo" / "patch.json").exists()
