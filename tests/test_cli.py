"""The CLI on a tiny model saved as a local folder: edit -> patch show/apply/revert, errors, --help."""

from __future__ import annotations

import json

import pytest
import torch

import lmedit
from lmedit.cli import build_parser, main
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smol_tok):
    d = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", len(smol_tok)).save_pretrained(d)
    smol_tok.save_pretrained(d)
    return d


def test_help_on_every_command(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: lmedit " + name in capsys.readouterr().out


def test_methods_listing(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for m in lmedit.list_methods():
        assert m in out
    assert main(["methods", "--describe", "ft-l"]) == 0
    assert "norm_constraint" in capsys.readouterr().out


def test_edit_show_apply_revert(model_dir, tmp_path, capsys):
    req = tmp_path / "req.json"
    req.write_text(
        json.dumps(
            {
                "prompt": "The Eiffel Tower is located in the city of",
                "subject": "Eiffel Tower",
                "target_new": "Rome",
            }
        )
    )
    patch_dir = tmp_path / "patch"
    args = ["edit", "--model", str(model_dir), "--request", str(req), "--set", "steps=3", "--set", "lr=0.01"]
    assert main(args + ["--set", "progress=false", "--out", str(patch_dir), "--show"]) == 0
    out = capsys.readouterr().out
    assert "before:" in out and "after:" in out and (patch_dir / "patch.json").exists()
    assert main(["patch", "show", str(patch_dir)]) == 0
    shown = capsys.readouterr().out
    assert "method:   ft-m" in shown and "mlp.down_proj.weight" in shown
    edited = tmp_path / "edited"
    assert main(["patch", "apply", str(patch_dir), "--model", str(model_dir), "--out", str(edited)]) == 0
    restored = tmp_path / "restored"
    assert main(["patch", "revert", str(patch_dir), "--model", str(edited), "--out", str(restored)]) == 0
    assert "reverted" in capsys.readouterr().out
    # applying the patch to the already-edited model is refused: its fingerprints no longer match
    assert main(["patch", "apply", str(patch_dir), "--model", str(edited), "--out", str(tmp_path / "x")]) == 2
    assert "another base model" in capsys.readouterr().err


def test_bad_request_file_gives_clear_error(model_dir, tmp_path, capsys):
    req = tmp_path / "bad.jsonl"
    req.write_text(
        json.dumps({"prompt": "The Eiffel Tower is in", "subject": "Louvre", "target_new": "Rome"}) + "\n"
    )
    assert main(["edit", "--model", str(model_dir), "--request", str(req)]) == 2
    err = capsys.readouterr().err
    assert "request[0].subject" in err and "does not occur in the prompt" in err
    assert main(["edit", "--model", str(model_dir), "--request", str(req), "--method", "nope"]) == 2
    assert (
        main(
            [
                "edit",
                "--model",
                str(model_dir),
                "--prompt",
                "The capital of Japan is",
                "--subject",
                "Japan",
                "--target",
                "Paris",
                "--set",
                "lr=-1",
            ]
        )
        == 2
    )
    assert "lr must be > 0" in capsys.readouterr().err


def test_device_option(model_dir, capsys):
    args = [
        "generate",
        "--model",
        str(model_dir),
        "--prompt",
        "The Eiffel Tower is in",
        "--max-new-tokens",
        "2",
    ]
    assert main(args + ["--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(args + ["--device", "nope"]) == 2
    assert "device 'nope' is not a torch device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(args + ["--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    else:
        assert main(args + ["--device", f"cuda:{torch.cuda.device_count()}"]) == 2
        assert "CUDA device(s)" in capsys.readouterr().err
