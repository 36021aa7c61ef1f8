"""Protocols, reports and ``lmedit bench`` on a tiny model; the CLI once on the real model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers

import lmedit
from lmedit.bench import run_bench
from lmedit.cli import main
from lmedit.core.patch import EditPatch
from lmedit.data.loaders import load_dataset
from lmedit.errors import ConfigError
from lmedit.evaluate import protocols
from lmedit.evaluate.protocols import ScoringSettings, evaluate
from lmedit.evaluate.report import SCHEMA, Report

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FAST = {"steps": 8, "lr": 0.05, "layers": [1]}


def _records() -> list[dict]:
    facts = [
        ("Eiffel Tower", "{} is located in the city of", "Rome", "Paris"),
        ("Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
        ("BBC One", "{} is owned by", "Sega", "BBC"),
        ("Toyota", "{} was founded in the country of", "Italy", "Japan"),
    ]
    return [
        {
            "case_id": i,
            "requested_rewrite": {
                "prompt": p,
                "subject": s,
                "target_new": {"str": n},
                "target_true": {"str": t},
            },
            "paraphrase_prompts": [f"Everyone knows that {p.format(s)}"],
            "neighborhood_prompts": ["The capital of Japan is", "The Louvre is in the city of"],
            "generation_prompts": [f"{s} is"],
            "portability": [{"prompt": f"Of course, {p.format(s)}", "answer": n}],
        }
        for i, (s, p, n, t) in enumerate(facts)
    ]


@pytest.fixture(scope="module")
def tiny(smol_tok):
    tok = smol_tok
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=256,
    )
    return lmedit.load_model((transformers.LlamaForCausalLM(cfg), tok))


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "cf.json"
    path.write_text(json.dumps(_records()))
    return path


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


SETTINGS = ScoringSettings(text_tokens=8, text_prompts=1)


@pytest.mark.parametrize("protocol, k", [("single", 1), ("batch", 2), ("sequential", 2)])
def test_protocols_restore_model_and_improve_edits(tiny, dataset_file, protocol, k):
    before = _state(tiny.model)
    ds = load_dataset(str(dataset_file))
    report = evaluate(tiny, ds, "ft-m", protocol, k=k, config=FAST, settings=SETTINGS, progress=False)
    after = tiny.model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before), "model not restored bit for bit"
    assert report.meta["protocol"]["name"] == protocol and report.meta["n"] == 4
    assert report.meta["protocol"]["steps"] == (4 if protocol == "single" else 2)
    # the edits work on their own prompts (teacher-forced log-prob of the new target rises)
    assert report.post["efficacy_magnitude"] > report.pre["efficacy_magnitude"]
    assert report.pre["locality_tf"] == 1.0 and report.pre["locality_gen"] == 1.0
    for key in (
        "reliability_tf",
        "efficacy_score",
        "neighborhood_score",
        "reliability_gen",
        "locality_gen",
        "fluency",
    ):
        assert report.post[key] is not None, key
    assert report.post["consistency"] is None  # no reference texts in this dataset
    assert {c["group"] for c in report.cases} == set(range(report.meta["protocol"]["steps"]))


def test_single_protocol_equals_applying_each_patch(tiny, dataset_file):
    """Single = each case on the pristine model: the same numbers as editing it alone."""
    ds = load_dataset(str(dataset_file), n=2)
    settings = ScoringSettings(families=("tf", "prob"))
    report = evaluate(tiny, ds, "ft-m", "single", config=FAST, settings=settings, progress=False)
    alone = evaluate(tiny, ds.cases[1:], "ft-m", "single", config=FAST, settings=settings, progress=False)
    assert report.cases[1]["post"] == pytest.approx(alone.cases[0]["post"])


def test_sequential_retention_curve_and_plot(tiny, dataset_file, tmp_path):
    out = tmp_path / "seq.json"
    png = tmp_path / "seq.png"
    report = run_bench(
        tiny,
        dataset=str(dataset_file),
        protocol="sequential",
        k=1,
        eval_every=1,
        overrides=FAST,
        settings=ScoringSettings(families=("tf", "prob")),
        out=str(out),
        plot=str(png),
        progress=False,
    )
    assert [p["edits"] for p in report.retention] == [1, 2, 3, 4]
    steps = report.meta["edits"]
    assert all(s["seconds"] > 0 and s["patch_bytes"] > 0 and s["peak_rss_mb"] > 0 for s in steps)
    assert all(0 < s["cpu_seconds"] for s in steps)
    assert [s["stored_bytes"] for s in steps] == [
        sum(x["patch_bytes"] for x in steps[: i + 1]) for i in range(4)
    ]
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(out.read_text())
    assert data["schema"] == SCHEMA and set(data) >= {"pre", "post", "cases", "meta", "retention"}
    meta = data["meta"]
    assert set(meta) >= {
        "protocol",
        "scoring",
        "dataset",
        "n",
        "seed",
        "model",
        "method",
        "config",
        "versions",
        "timings",
    }
    assert meta["config"]["seed"] == 0 and meta["dataset"]["format"] == "counterfact"
    assert Report.load(out).post == report.post


def test_sequential_checkpoints_every_m_steps(tiny, dataset_file, tmp_path, capsys):
    report = evaluate(
        tiny,
        load_dataset(str(dataset_file)),
        "ft-m",
        "sequential",
        eval_every=3,
        config=FAST,
        settings=ScoringSettings(families=("tf",)),
        progress=False,
    )
    assert [p["edits"] for p in report.retention] == [3, 4]  # after step 3 and after the last
    assert report.meta["protocol"]["eval"] == "every_3_steps+end"
    # several runs' retention curves in one figure
    paths = [str(report.save(tmp_path / f"{name}.json")) for name in ("a", "b")]
    png = tmp_path / "all.png"
    assert main(["bench", "--compare", *paths, "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and "retention curves written" in capsys.readouterr().out
    single = evaluate(tiny, load_dataset(str(dataset_file), n=1), "ft-m", config=FAST, progress=False,
                      settings=ScoringSettings(families=("tf",)))  # fmt: skip
    from lmedit.evaluate.plots import perplexity_points, retention_compare

    with pytest.raises(ValueError, match="retention curve"):
        retention_compare([single], ["x"], tmp_path / "none.png")
    # a run measured with held-out text gets a perplexity panel: the unedited model at 0, then each checkpoint
    assert perplexity_points(report) == []
    measured = dataclasses.replace(
        report,
        meta=report.meta | {"perplexity": {"pre": 80.0}},
        retention=[p | {"perplexity": 80.0 + p["edits"]} for p in report.retention],
    )
    assert perplexity_points(measured) == [(0, 80.0), (3, 83.0), (4, 84.0)]
    assert (
        retention_compare([report, measured], ["a", "b"], tmp_path / "ppl.png").read_bytes()[:4] == b"\x89PNG"
    )
    collapsed = dataclasses.replace(
        measured, retention=[p | {"perplexity": 2000.0} for p in report.retention]
    )
    assert retention_compare([measured, collapsed], ["b", "c"], tmp_path / "log.png").exists()  # log scale


def test_cli_compare(tiny, dataset_file, tmp_path, capsys):
    paths = []
    for steps in (1, 8):
        p = tmp_path / f"steps{steps}.json"
        run_bench(
            tiny,
            dataset=str(dataset_file),
            n=2,
            overrides=FAST | {"steps": steps},
            settings=ScoringSettings(families=("tf", "prob")),
            out=str(p),
            progress=False,
        )
        paths.append(str(p))
    assert main(["bench", "--compare", *paths]) == 0
    out = capsys.readouterr().out
    assert "steps1" in out and "steps8" in out and "efficacy_score" in out


def _real_dataset() -> str:
    from lmedit.data.loaders import bundled_path

    if bundled_path().exists():
        return "bundled"
    path = DATA / "counterfact" / "counterfact_locality_other_attribution_distracting_neighbor.json"
    if not path.exists():
        pytest.skip("neither the bundled dataset nor the shared CounterFact data is available")
    return str(path)


@pytest.mark.real
def test_cli_bench_real_model(tmp_path, capsys):
    out = tmp_path / "real.json"
    rc = main(["bench", "--method", "ft-m", "--n", "3", "--dataset", _real_dataset(), "--scoring", "tf,prob,gen",
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "reliability_tf" in printed and "efficacy_score" in printed and "locality_gen" in printed
    report = Report.load(out)
    assert report.meta["model"]["name"] == "gemma3-270m" and report.meta["n"] == 3
    assert report.post["reliability_tf"] > report.pre["reliability_tf"]
    assert report.post["efficacy_score"] >= report.pre["efficacy_score"]


def test_held_out_perplexity_matches_full_logits_and_tracks_a_sequential_run(tiny, dataset_file, tmp_path):
    from lmedit.evaluate.perplexity import HeldOut

    text = tmp_path / "held.txt"
    text.write_text(
        "The river flows through the old town.\n\nA small bakery sells fresh bread every morning.\n"
    )
    held = HeldOut.from_corpus(tiny, text, n_tokens=12, seq_len=8)
    assert held.n_tokens == 12 and all(len(s) <= 8 for s in held.sequences)
    nll, count = 0.0, 0
    first = max(held.prefix_len, 1)
    with torch.no_grad():
        for s in held.sequences:
            logp = torch.log_softmax(tiny.model(input_ids=torch.tensor([s])).logits[0].double(), -1)
            nll -= float(logp[torch.arange(first - 1, len(s) - 1), torch.tensor(s[first:])].sum())
            count += len(s) - first
    assert count == 12
    assert held.perplexity(tiny) == pytest.approx(float(torch.tensor(nll / count).exp()), rel=1e-5)

    before = held.perplexity(tiny)
    report = evaluate(
        tiny, load_dataset(str(dataset_file)), "ft-m", "sequential", eval_every=2, config=FAST,
        settings=ScoringSettings(families=("tf",)), progress=False, held_out=held,
    )  # fmt: skip
    ppl = report.meta["perplexity"]
    assert ppl["pre"] == before and ppl["tokens"] == 12 and ppl["post"] != ppl["pre"]
    assert [r["perplexity"] for r in report.retention][-1] == ppl["post"]
    assert all("perplexity" in r for r in report.retention)
    assert held.perplexity(tiny) == before, "the model is restored after the run"
    with pytest.raises(ValueError, match="sequential"):
        evaluate(tiny, load_dataset(str(dataset_file), n=1), "ft-m", held_out=held, progress=False)


def test_locality_probes_naming_another_edited_subject_are_dropped(dataset_file):
    from lmedit.data.loaders import EvalProbe
    from lmedit.evaluate.protocols import in_scope_locality

    cases = load_dataset(str(dataset_file)).cases  # subjects Eiffel Tower, Danielle Darrieux, BBC One, Toyota
    cases[0] = dataclasses.replace(
        cases[0],
        locality=[
            EvalProbe("Toyota was founded in the country of", " Japan"),  # edited by case 3
            EvalProbe("Toyotas are popular in", " Japan"),  # not the subject as a whole word
            EvalProbe("The Eiffel Tower was built by", " Gustave Eiffel"),  # the case's own subject: kept
            EvalProbe("The capital of Japan is", " Tokyo"),
        ],
    )
    single, n_single = in_scope_locality(cases, 1, "single")
    assert n_single == 0 and single[0] is cases[0]
    batch, n_batch = in_scope_locality(cases, 2, "batch")  # case 3 is in the other group
    assert n_batch == 0 and len(batch[0].locality) == 4
    seq, n_seq = in_scope_locality(cases, 1, "sequential")
    assert n_seq == 1 and [p.prompt for p in seq[0].locality] == [p.prompt for p in cases[0].locality[1:]]
    assert seq[1:] == cases[1:]
    together, n_together = in_scope_locality(cases, 4, "batch")
    assert n_together == 1 and len(together[0].locality) == 3


def _interrupt_after(monkeypatch, calls: int) -> None:
    """Make ``lmedit.edit`` raise KeyboardInterrupt on its ``calls + 1``-th call (a run killed mid-way)."""
    real, count = lmedit.edit, [0]

    def edit(*args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(lmedit, "edit", edit)


def _resume_matches_uninterrupted(loaded, cases, method, config, tmp_path, monkeypatch):
    real_score = protocols.score_cases
    settings = ScoringSettings(families=("tf", "prob"))
    run = {
        "protocol": "sequential",
        "eval_every": 2,
        "config": config,
        "settings": settings,
        "progress": False,
    }
    whole = evaluate(loaded, cases, method, **run)
    before = _state(loaded.model)
    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as mp:
        _interrupt_after(mp, 3)  # steps 1-2 checkpointed, step 3 done but not saved, step 4 interrupted
        with pytest.raises(KeyboardInterrupt):
            evaluate(loaded, cases, method, checkpoint=ckpt, **run)
    assert all(torch.equal(before[n], v) for n, v in loaded.model.state_dict().items()), "model not restored"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["steps_done"] == 2 and [p["edits"] for p in state["retention"]] == [2]
    partial = Report.load(ckpt / "report.json")
    assert partial.meta["partial"]["edits_done"] == 2 and partial.post == whole.retention[0]["metrics"]
    assert (ckpt / "pristine.json").exists()
    with monkeypatch.context() as mp:
        _interrupt_after(mp, 2)  # the resumed run makes exactly steps 3 and 4
        scored = []
        mp.setattr(protocols, "score_cases", lambda *a: scored.append(1) or real_score(*a))
        resumed = evaluate(loaded, cases, method, checkpoint=ckpt, **run)
    assert len(scored) == 1, "the resumed run reads the pristine scores; it scores only after its last step"
    assert all(torch.equal(before[n], v) for n, v in loaded.model.state_dict().items()), "model not restored"
    assert resumed.pre == whole.pre and [r["pre"] for r in resumed.cases] == [r["pre"] for r in whole.cases]
    assert resumed.post == pytest.approx(whole.post)
    assert [p["edits"] for p in resumed.retention] == [2, 4]
    assert resumed.retention[0]["metrics"] == whole.retention[0]["metrics"]
    assert len(resumed.meta["edits"]) == 4 and resumed.meta["config"] == whole.meta["config"]
    assert json.loads((ckpt / "state.json").read_text())["steps_done"] == 4
    return ckpt


def test_sequential_checkpoint_resumes_to_the_uninterrupted_result(tiny, dataset_file, tmp_path, monkeypatch):
    cases = load_dataset(str(dataset_file)).cases
    ckpt = _resume_matches_uninterrupted(tiny, cases, "ft-m", FAST, tmp_path, monkeypatch)
    assert sorted(p.name for p in (ckpt / "patches").iterdir()) == [f"{i:06d}" for i in range(4)]
    # another run's settings are refused, naming the field; nothing is applied
    before = _state(tiny.model)
    with pytest.raises(ConfigError, match="field 'k'"):
        evaluate(
            tiny, cases, "ft-m", "sequential", k=2, eval_every=2, config=FAST, checkpoint=ckpt, progress=False
        )
    assert all(torch.equal(before[n], v) for n, v in tiny.model.state_dict().items())
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        evaluate(tiny, cases, "ft-m", "sequential", eval_every=2, config=FAST, checkpoint=tmp_path / "junk",
                 progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="eval_every"):
        evaluate(tiny, cases, "ft-m", "sequential", config=FAST, checkpoint=tmp_path / "new", progress=False)


def test_checkpoint_pristine_reference_is_read_back_checked_and_written_again(
    tiny, dataset_file, tmp_path, monkeypatch
):
    """A resumed run reads the unedited model's scores and held-out perplexity from pristine.json; a folder
    without the file (written before it existed) or whose unedited model had another fingerprint scores the
    unedited model again and writes the file with the next save."""
    import shutil

    class HeldOut:
        calls = 0

        def describe(self):
            return {"source": "stub"}

        def perplexity(self, _loaded):
            HeldOut.calls += 1
            return 50.0 + HeldOut.calls

    real_score = protocols.score_cases
    cases = load_dataset(str(dataset_file)).cases
    run = {
        "protocol": "sequential",
        "eval_every": 2,
        "config": FAST,
        "progress": False,
        "held_out": HeldOut(),
    }
    run["settings"] = ScoringSettings(families=("tf",))
    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as mp:
        _interrupt_after(mp, 3)
        with pytest.raises(KeyboardInterrupt):
            evaluate(tiny, cases, "ft-m", checkpoint=ckpt, **run)
    saved = json.loads((ckpt / "pristine.json").read_text())
    assert (
        HeldOut.calls == 2 and saved["perplexity"] == 51.0
    )  # the unedited model, then the step-2 checkpoint
    for name in ("old", "other"):
        shutil.copytree(ckpt, tmp_path / name)
    (tmp_path / "old" / "pristine.json").unlink()
    other = dict(saved, model="0" * 16)
    (tmp_path / "other" / "pristine.json").write_text(json.dumps(other))

    def resume(folder):
        scored, before = [], HeldOut.calls
        with monkeypatch.context() as mp:
            mp.setattr(protocols, "score_cases", lambda *a: scored.append(1) or real_score(*a))
            report = evaluate(tiny, cases, "ft-m", checkpoint=folder, **run)
        return report, len(scored), HeldOut.calls - before

    report, scored, measured = resume(ckpt)
    assert (scored, measured) == (1, 1), "only the finished run is scored and measured"
    assert report.meta["perplexity"]["pre"] == 51.0 and report.meta["timings"]["pre_s"] > 0
    for name in ("old", "other"):
        report, scored, measured = resume(tmp_path / name)
        assert (scored, measured) == (2, 2), f"{name}: the unedited model is scored and measured again"
        assert json.loads((tmp_path / name / "pristine.json").read_text())["model"] == saved["model"]
        assert report.meta["perplexity"]["pre"] == 50.0 + HeldOut.calls - 1  # measured again, before the post


def test_checkpoint_carries_alphaedit_state_in_the_newest_patch_only(
    smol_tok, stats_env, dataset_file, tmp_path, monkeypatch
):
    from tiny_models import tiny_loaded

    loaded = tiny_loaded("llama", smol_tok)
    config = {"nullspace_energy": 0.3, "v_steps": 4, "layers": [1, 2], **stats_env}
    cases = load_dataset(str(dataset_file)).cases
    ckpt = _resume_matches_uninterrupted(loaded, cases, "alphaedit", config, tmp_path, monkeypatch)
    saved = [EditPatch.load(ckpt / "patches" / f"{i:06d}") for i in range(4)]
    assert [bool(p.extras) for p in saved] == [False, False, False, True]
    assert saved[-1].info["sequential_edits_before"] == 3  # the resumed step 4 continued from step 3's state
