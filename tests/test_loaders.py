"""Dataset loaders on real records from ../shared/data and on malformed ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmedit.data.loaders import DatasetError, detect_format, load_dataset, parse_records

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"shared benchmark data not found at {DATA}")


@needs_data
def test_counterfact_rome_format_with_easyedit_portability():
    ds = load_dataset(
        str(DATA / "counterfact" / "counterfact_locality_other_attribution_distracting_neighbor.json")
    )
    assert ds.format == "counterfact" and len(ds) == ds.total == 804
    c = ds.cases[0]
    (req,) = c.requests
    assert c.case_id == 4482
    assert req.prompt_text == "Spike Hughes originates from"
    assert (req.target_new, req.target_true) == (" Philadelphia", " London")
    assert [p.prompt for p in c.generalization][0].endswith("Spike Hughes is native to")
    assert len(c.locality) == 10 and c.locality[0].prompt == "Max Mosley originates from"
    assert c.locality[0].answer == " London" and c.locality[0].compare == " Philadelphia"
    assert c.portability[0].answer == "Cheesesteaks"
    assert c.generation_prompts == list(dict.fromkeys(c.generation_prompts))  # duplicates dropped


@needs_data
def test_counterfact_rome_format_subject_replace():
    ds = load_dataset(str(DATA / "counterfact" / "counterfact_subject_replace.json"), n=5)
    assert len(ds) == 5 and ds.total == 213
    req = ds.cases[0].requests[0]
    assert req.prompt_text == "May Wright Sewall passed away in" and req.target_new == " Birmingham"


@needs_data
def test_counterfact_flat_format():
    ds = load_dataset(str(DATA / "counterfact" / "counterfact-edit.json"), n=3)
    assert ds.format == "counterfact-flat" and ds.total == 10000
    c = ds.cases[0]
    assert c.requests[0].prompt_text == "The mother tongue of Danielle Darrieux is"
    assert c.requests[0].target_true == " French"
    assert c.generalization[0].prompt.startswith("Where Danielle Darrieux is from")
    # the locality prompt shares the relation and the true answer, so it gets the probability comparison
    assert c.locality[0].answer == "French" and c.locality[0].compare == " English"


@needs_data
def test_zsre_mend_format_portability_and_skips():
    ds = load_dataset(str(DATA / "zsre" / "zsre_inverse_relation.json"))
    assert ds.format == "zsre" and ds.total == 385
    assert len(ds) + len(ds.skipped) == 385 and 0 < len(ds.skipped) < 10  # subject not in the question
    c = ds.cases[0]
    assert c.requests[0].target_new == " Marian Clairmont"
    assert c.portability[0].prompt == "Who is Marian Clairmont's sister?"
    assert c.portability[0].answer == "Claire Clairmont"
    ds2 = load_dataset(str(DATA / "zsre" / "zsre_subject_replace.json"), n=1)
    assert ds2.cases[0].portability[0].answer == "Triangulum"


@needs_data
@pytest.mark.parametrize(
    "name, total, n_loc",
    [
        ("ZsRE-test-all.json", 1301, 2),
        ("wiki_counterfact_train_cf.json", 1428, 1),
        ("wiki_recent_recent_train.json", 570, 5),
    ],
)
def test_knowedit_formats(name, total, n_loc):
    ds = load_dataset(str(DATA / "knowedit" / name))
    assert ds.format == "knowedit" and len(ds) == total
    c = ds.cases[0]
    assert len(c.locality) == n_loc and all(p.answer.strip() for p in c.locality)
    if name == "ZsRE-test-all.json":
        assert c.requests[0].target_true == " Aspidoceratidae"
        assert c.portability[0].answer == "Owlet moths" and c.portability[0].tag == "Reasoning"
    if name == "wiki_recent_recent_train.json":
        assert c.requests[0].target_true is None and c.locality[0].answer == "Cēsis"


@needs_data
def test_wikibio_and_convsent():
    wb = load_dataset(str(DATA / "knowedit" / "wikibio-test-all.json"), n=2)
    assert wb.format == "wikibio"
    assert wb.cases[0].requests[0].subject == "john russell reynolds"
    assert wb.cases[0].reliability[0].answer.startswith(" He received general education")
    cs = load_dataset(str(DATA / "knowedit" / "convsent_blender_test.json"), n=2)
    assert cs.format == "convsent"
    c = cs.cases[0]
    assert c.requests[0].prompt_text == "What do you think of Estero?" and len(c.reference_texts) == 11


def _mquake_record() -> dict:
    return {
        "case_id": 1,
        "requested_rewrite": [
            {
                "prompt": "{} is a citizen of",
                "relation_id": "P27",
                "target_new": {"str": "Croatia", "id": "Q224"},
                "target_true": {"str": "United States of America", "id": "Q30"},
                "subject": "Ellie Kemper",
                "question": "What is the country of citizenship of Ellie Kemper?",
            },
            {
                "prompt": "The head of state of {} is",
                "relation_id": "P35",
                "target_new": {"str": "Kolinda Grabar-Kitarović", "id": "Q1"},
                "target_true": {"str": "Zoran Milanović", "id": "Q2"},
                "subject": "Croatia",
            },
        ],
        "questions": ["Who is the head of state of the country Ellie Kemper is a citizen of?"],
        "answer": "Joe Biden",
        "answer_alias": [],
        "new_answer": "Kolinda Grabar-Kitarović",
        "new_answer_alias": [],
        "single_hops": [],
        "new_single_hops": [{"question": "q", "cloze": "Ellie Kemper is a citizen of", "answer": "Croatia"}],
    }


def test_mquake_several_edits_per_case(tmp_path):
    path = tmp_path / "mquake.json"
    path.write_text(json.dumps([_mquake_record()]))
    ds = load_dataset(str(path))
    assert ds.format == "mquake"
    c = ds.cases[0]
    assert len(c.requests) == 2 and c.requests[1].prompt_text == "The head of state of Croatia is"
    assert [p.answer for p in c.reliability] == [" Croatia", " Kolinda Grabar-Kitarović"]
    assert c.portability[0].answer == "Kolinda Grabar-Kitarović" and c.portability[0].compare == "Joe Biden"
    assert c.portability[1].prompt == "Ellie Kemper is a citizen of"


def test_portability_list_form_and_jsonl(tmp_path):
    rec = {
        "case_id": 7,
        "requested_rewrite": {
            "prompt": "{} is located in the city of",
            "subject": "Eiffel Tower",
            "target_new": {"str": "Rome"},
            "target_true": {"str": "Paris"},
        },
        "paraphrase_prompts": ["Where is the Eiffel Tower? In"],
        "neighborhood_prompts": ["The Louvre is located in the city of"],
        "portability": [{"prompt": "The Eiffel Tower is in the country of", "answer": "Italy"}],
    }
    path = tmp_path / "cf.jsonl"
    path.write_text(json.dumps(rec) + "\n\n" + json.dumps(rec | {"case_id": 8}) + "\n")
    ds = load_dataset(str(path))
    assert [c.case_id for c in ds.cases] == [7, 8]
    assert ds.cases[0].portability[0].answer == "Italy"


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: r.pop("target_new"), "target_new"),
        (lambda r: r.update(prompt=3), "prompt"),
        (lambda r: r.update(target_new="  "), "target_new"),
        (lambda r: r.update(rephrase_prompt=[1, 2]), "rephrase_prompt"),
        (lambda r: r.update(locality_ground_truth=None), "locality_ground_truth"),
    ],
)
def test_malformed_flat_record_names_file_index_field(tmp_path, mutate, field):
    good = {
        "case_id": 0,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English",
        "subject": "Danielle Darrieux",
        "ground_truth": "French",
        "rephrase_prompt": "Danielle Darrieux speaks",
        "locality_prompt": "Michel Rocard is a native speaker of",
        "locality_ground_truth": "French",
    }
    bad = dict(good)
    mutate(bad)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps([good, bad]))
    with pytest.raises(DatasetError) as err:
        load_dataset(str(path), format="counterfact-flat")
    msg = str(err.value)
    assert str(path) in msg and "record 1" in msg and field in msg
    assert err.value.index == 1 and err.value.field == field


def test_malformed_nested_and_files(tmp_path):
    rec = _mquake_record()
    rec["requested_rewrite"][1]["target_new"] = {"id": "Q1"}
    path = tmp_path / "mq.json"
    path.write_text(json.dumps([_mquake_record(), rec]))
    with pytest.raises(DatasetError, match=r"record 1 field 'requested_rewrite\[1\]\.target_new'"):
        load_dataset(str(path))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="invalid JSON"):
        load_dataset(str(tmp_path / "bad.json"))
    with pytest.raises(DatasetError, match="unknown dataset format"):
        parse_records([{"foo": 1}], "x.json")
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(str(tmp_path / "missing.json"))
    assert detect_format({"src": "a", "alt": "b"}) == "zsre"


def test_subset_first_n_and_seeded_sample(tmp_path):
    recs = [
        {"prompt": f"Person {i} was born in", "subject": f"Person {i}", "target_new": "Rome", "case_id": i,
         "rephrase_prompt": f"Person {i} is from"}
        for i in range(20)
    ]  # fmt: skip
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(recs))
    first = load_dataset(str(path), n=3)
    assert [c.case_id for c in first.cases] == [0, 1, 2]
    a = load_dataset(str(path), n=5, sample=True, seed=1)
    b = load_dataset(str(path), n=5, sample=True, seed=1)
    c = load_dataset(str(path), n=5, sample=True, seed=2)
    ids = [x.case_id for x in a.cases]
    assert ids == [x.case_id for x in b.cases] and ids == sorted(ids) and ids != [x.case_id for x in c.cases]
    assert a.describe()["sample"] is True


def test_bundled_dataset_loads():
    from lmedit.data.loaders import bundled_path

    if not bundled_path().exists():
        pytest.skip("the bundled dataset is not written yet")
    ds = load_dataset("bundled")
    assert ds.format == "counterfact" and len(ds) >= 200
    assert all(len(c.generalization) >= 2 and len(c.locality) >= 3 and c.portability for c in ds.cases)


def test_concatenated_sources(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for path, who in ((a, "Anna"), (b, "Bert")):
        recs = [{"prompt": f"{who} {i} was born in", "subject": f"{who} {i}", "target_new": "Rome", "case_id": i}
                for i in range(3)]  # fmt: skip
        path.write_text(json.dumps(recs))
    ds = load_dataset(f"{a},{b}", n=4)
    assert [c.case_id for c in ds.cases] == ["a:0", "a:1", "a:2", "b:0"]
    assert ds.name == "a+b" and ds.describe()["records"] == 6 and ds.describe()["n"] == 4
    assert [c.requests[0].subject for c in ds.cases][-1] == "Bert 0"
    with pytest.raises(ValueError, match="twice"):
        load_dataset(f"{a},{a}")
