"""The bundled CounterFact-style dataset: schema, counts and consistency with its candidate list (no model)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from lmedit.data import bundled_json
from lmedit.request import EditRequest

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "src" / "lmedit" / "data" / "bundled" / "counterfact_bundled.json"
CANDIDATES = ROOT / "benchmarks" / "data" / "bundled_candidates.json"
README = BUNDLED.parent / "README.md"


@pytest.fixture(scope="module")
def cases():
    return bundled_json("counterfact_bundled.json")


@pytest.fixture(scope="module")
def candidates():
    return json.loads(CANDIDATES.read_text(encoding="utf-8"))


def _schema_errors(case: dict, min_neighbours: int = 3) -> list[str]:
    """Everything wrong with one case (empty when it is well-formed)."""
    errors = []

    def strings(name, value, minimum):
        if not isinstance(value, list) or len(value) < minimum:
            errors.append(f"{name}: need a list of >= {minimum}, got {value!r}")
            return
        for j, v in enumerate(value):
            if not isinstance(v, str) or not v.strip() or v != v.strip():
                errors.append(f"{name}[{j}]: not a trimmed non-empty string: {v!r}")

    rw = case.get("requested_rewrite")
    if not isinstance(rw, dict):
        return ["requested_rewrite missing"]
    for key in ("prompt", "relation_id", "subject"):
        if not isinstance(rw.get(key), str) or not rw[key].strip():
            errors.append(f"requested_rewrite.{key} missing or empty")
    for key in ("target_new", "target_true"):
        value = rw.get(key, {}).get("str") if isinstance(rw.get(key), dict) else None
        if not isinstance(value, str) or not value or value != value.strip():
            errors.append(
                f"requested_rewrite.{key}.str must be a non-empty string without edge spaces: {value!r}"
            )
    if errors:
        return errors
    if rw["prompt"].count("{}") != 1:
        errors.append(f"prompt must contain '{{}}' exactly once: {rw['prompt']!r}")
    if rw["target_new"]["str"] == rw["target_true"]["str"]:
        errors.append("target_new equals target_true")
    strings("paraphrase_prompts", case.get("paraphrase_prompts"), 2)
    strings("neighborhood_prompts", case.get("neighborhood_prompts"), min_neighbours)
    strings("generation_prompts", case.get("generation_prompts"), 2)
    port = case.get("portability")
    if not isinstance(port, list) or not port:
        errors.append("portability: need >= 1 probe")
    else:
        for j, p in enumerate(port):
            ok = isinstance(p, dict) and all(
                isinstance(p.get(k), str) and p[k].strip() for k in ("prompt", "answer")
            )
            if not ok or p["answer"] != p["answer"].strip():
                errors.append(f"portability[{j}]: need trimmed 'prompt' and 'answer' strings: {p!r}")
    subject = rw["subject"]
    for j, p in enumerate(case.get("paraphrase_prompts", [])):
        if subject not in p:
            errors.append(f"paraphrase_prompts[{j}] does not mention the subject {subject!r}: {p!r}")
    for j, p in enumerate(case.get("neighborhood_prompts", [])):
        if subject in p:
            errors.append(f"neighborhood_prompts[{j}] is about the edited subject {subject!r}: {p!r}")
    return errors


def test_loads_as_json_list_with_enough_cases(cases):
    assert isinstance(cases, list)
    assert len(cases) >= 200, f"only {len(cases)} cases; the bundled dataset promises at least 200"
    assert [c["case_id"] for c in cases] == list(range(len(cases)))
    assert json.loads(BUNDLED.read_text(encoding="utf-8")) == cases


def test_every_case_is_well_formed(cases):
    errors = [f"case {c.get('case_id')}: {e}" for c in cases for e in _schema_errors(c)]
    assert not errors, "\n".join(errors[:20])


def test_subjects_are_unique(cases):
    counts = Counter(c["requested_rewrite"]["subject"] for c in cases)
    assert not [s for s, n in counts.items() if n > 1]


def test_every_case_is_a_valid_edit_request(cases):
    for c in cases:
        rw = c["requested_rewrite"]
        true = rw["target_true"]["str"]
        req = EditRequest(
            rw["prompt"],
            rw["subject"],
            rw["target_new"]["str"],
            true,
            rephrase=c["paraphrase_prompts"],
            locality=[(p, true) for p in c["neighborhood_prompts"]],
            portability=c["portability"],
            index=c["case_id"],
        )
        assert req.prompt_text[slice(*req.subject_span)] == rw["subject"]


def test_many_relations_and_the_first_hundred_cover_them(cases):
    relations = Counter(c["requested_rewrite"]["relation_id"] for c in cases)
    assert len(relations) >= 10, relations
    assert set(c["requested_rewrite"]["relation_id"] for c in cases[:100]) == set(relations)


def test_check_record_matches_the_kept_neighbours(cases):
    for c in cases:
        check = c["check"]
        assert check["edit_prompt_correct"] is True
        assert check["neighborhood_correct"] == len(c["neighborhood_prompts"]) >= 3
        assert check["neighborhood_candidates"] >= check["neighborhood_correct"]


def test_candidates_are_well_formed(candidates):
    errors = [f"candidate {c.get('case_id')}: {e}" for c in candidates for e in _schema_errors(c)]
    assert not errors, "\n".join(errors[:20])
    counts = Counter(c["requested_rewrite"]["subject"] for c in candidates)
    assert not [s for s, n in counts.items() if n > 1]


def test_bundled_cases_are_filtered_candidates(cases, candidates):
    """Each kept case is its candidate with some neighbours dropped; nothing else changed."""
    by_subject = {c["requested_rewrite"]["subject"]: c for c in candidates}
    for c in cases:
        src = by_subject[c["requested_rewrite"]["subject"]]
        for key in ("requested_rewrite", "paraphrase_prompts", "generation_prompts", "portability"):
            assert c[key] == src[key], (c["case_id"], key)
        kept = c["neighborhood_prompts"]
        assert [p for p in src["neighborhood_prompts"] if p in kept] == kept


def test_readme_states_provenance_and_figures(cases):
    text = README.read_text(encoding="utf-8")
    assert "Apache-2.0" in text
    assert "build_bundled_dataset.py" in text
    assert f"| kept | {len(cases)} |" in text


def test_schema_checker_catches_defects(cases):
    good = cases[0]
    assert _schema_errors(good) == []
    broken = json.loads(json.dumps(good))
    broken["requested_rewrite"]["prompt"] = "no placeholder"
    broken["requested_rewrite"]["target_new"]["str"] = broken["requested_rewrite"]["target_true"]["str"]
    broken["paraphrase_prompts"] = broken["paraphrase_prompts"][:1]
    broken["neighborhood_prompts"] = [" leading space", "x"]
    broken["portability"] = [{"prompt": "p", "answer": " spaced"}]
    errors = "\n".join(_schema_errors(broken))
    for needle in (
        "exactly once",
        "target_new equals",
        "paraphrase_prompts",
        "neighborhood_prompts",
        "portability",
    ):
        assert needle in errors, (needle, errors)
