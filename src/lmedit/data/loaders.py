"""Dataset loaders: every supported benchmark format into one case type, ``EvalCase``.

    >>> ds = load_dataset("bundled")                                   # the dataset shipped with lmedit
    >>> ds = load_dataset("../shared/data/counterfact/counterfact-val.json", n=100)
    >>> case = ds.cases[0]
    >>> case.requests[0].prompt_text, [p.prompt for p in case.generalization]

Formats (detected from the first record, or forced with ``format=``):

* ``counterfact`` (ROME): ``requested_rewrite`` {prompt with ``{}``, subject, target_new.str, target_true.str},
  ``paraphrase_prompts``, ``neighborhood_prompts``, ``generation_prompts``; optional ``portability`` as
  EasyEdit's dict {"New Question", "New Answer"} or a list of {"prompt", "answer"}; optional ``reference_texts``.
* ``counterfact-flat`` (MEND/EasyEdit): prompt, subject, target_new, ground_truth, rephrase_prompt,
  locality_prompt, locality_ground_truth.
* ``zsre`` (MEND eval): src, subject, alt, answers, rephrase, loc, loc_ans; optional portability
  (``portability`` dict, ``inverse question``, ``alter_subject_question``).
* ``knowedit`` (ZsRE, WikiData_counterfact, WikiData_recent): subject, prompt, target_new, ground_truth,
  rephrase_prompt, locality/portability as {category: [{"prompt", "ground_truth"}]}.
* ``wikibio`` (KnowEdit WikiBio): text, labels, concept, locality.
* ``convsent`` (KnowEdit ConvSent): ent, pos, neg (edit = a positive opinion of ``ent``; ``pos`` are the
  reference texts for consistency).
* ``mquake``: case_id, requested_rewrite (list: several edits per case), questions, answer, new_answer,
  new_single_hops (multi-hop questions are scored as portability).

Malformed records raise ``DatasetError`` naming the file, the record index and the field. Records whose subject
does not occur in the edit prompt (a few in zsRE) cannot be edited by subject-locating methods; they are skipped
with a warning and counted in ``Dataset.skipped``.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmedit.errors import LmeditError, RequestError
from lmedit.request import EditRequest

log = logging.getLogger(__name__)

BUNDLED = {"bundled": "counterfact_bundled.json"}
FORMATS = ("counterfact", "counterfact-flat", "zsre", "knowedit", "wikibio", "convsent", "mquake")


class DatasetError(LmeditError, ValueError):
    """A dataset file or record is malformed; the message names file, record index and field."""

    def __init__(self, path: str, index: int | None, field: str, message: str):
        where = (
            f"{path}"
            + (f" record {index}" if index is not None else "")
            + (f" field {field!r}" if field else "")
        )
        super().__init__(f"{where}: {message}")
        self.path, self.index, self.field = path, index, field


class _SkipRecord(Exception):
    """Internal: the record is well-formed but unusable (reason in args[0])."""


@dataclass(frozen=True)
class EvalProbe:
    """One probe: ``prompt`` should be answered by ``answer``.

    ``compare`` is the competing answer used by probability comparison (the true target for edit prompts and
    paraphrases, the new target for neighbourhood prompts); None when the dataset has none. ``tag`` is the
    dataset's own category (e.g. KnowEdit's "Reasoning").
    """

    prompt: str
    answer: str
    compare: str | None = None
    tag: str = ""


@dataclass
class EvalCase:
    """One evaluation case: the edit(s) to make and the probes that check them.

    Attributes:
        case_id: the dataset's id (or the record index).
        requests: the edits (one for most datasets; several for MQuAKE).
        reliability: edit prompts -> new targets (compare: true targets).
        generalization: paraphrases -> new targets.
        locality: prompts whose answers must not change (compare: the new target where it is the same relation).
        portability: consequences that should follow from the edit.
        generation_prompts: prompts for free generation (fluency, consistency).
        reference_texts: text about the new target, for consistency (empty when the dataset has none).
    """

    case_id: Any
    requests: list[EditRequest]
    reliability: list[EvalProbe]
    generalization: list[EvalProbe] = field(default_factory=list)
    locality: list[EvalProbe] = field(default_factory=list)
    portability: list[EvalProbe] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    reference_texts: list[str] = field(default_factory=list)

    def probes(self) -> dict[str, list[EvalProbe]]:
        """The probe lists by kind."""
        return {
            "reliability": self.reliability,
            "generalization": self.generalization,
            "locality": self.locality,
            "portability": self.portability,
        }

    def to_dict(self) -> dict:
        """JSON-able summary (used in reports)."""
        return {
            "case_id": self.case_id,
            "requests": [r.to_dict() for r in self.requests],
            **{
                k: [[p.prompt, p.answer] + ([p.compare] if p.compare else []) for p in v]
                for k, v in self.probes().items()
            },
        }


@dataclass
class Dataset:
    """Loaded cases plus provenance (recorded in reports)."""

    name: str
    path: str
    format: str
    cases: list[EvalCase]
    total: int
    skipped: list[tuple[int, str]] = field(default_factory=list)
    selection: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.cases)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "path": self.path,
            "format": self.format,
            "records": self.total,
            "skipped": len(self.skipped),
            **self.selection,
        }


# ----------------------------------------------------------------------------------------------- field access


class _Rec:
    """Typed field access on one record; every failure names file, index and field."""

    def __init__(self, path: str, index: int, rec: Any):
        if not isinstance(rec, dict):
            raise DatasetError(path, index, "", f"must be a JSON object, got {type(rec).__name__}")
        self.path, self.index, self.rec = path, index, rec

    def fail(self, field_: str, message: str) -> DatasetError:
        return DatasetError(self.path, self.index, field_, message)

    def get(self, key: str, default: Any = None) -> Any:
        return self.rec.get(key, default)

    def str(self, key: str, value: Any = None, required: bool = True) -> str | None:
        v = self.rec.get(key) if value is None else value
        if v is None and not required:
            return None
        if not isinstance(v, str) or (required and not v.strip()):
            got = "missing" if v is None else f"{type(v).__name__} {v!r}"[:80]
            raise self.fail(key, f"must be a non-empty string, got {got}")
        return v

    def strs(self, key: str, required: bool = False) -> list[str]:
        v = self.rec.get(key)
        if v is None and not required:
            return []
        if isinstance(v, str):
            return [v]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self.fail(key, f"must be a list of strings, got {type(v).__name__}")
        return [x for x in v if x.strip()]

    def obj(self, key: str, required: bool = True) -> dict | None:
        v = self.rec.get(key)
        if v is None and not required:
            return None
        if not isinstance(v, dict):
            raise self.fail(key, f"must be an object, got {'missing' if v is None else type(v).__name__}")
        return v


def _first_str(value: Any) -> str | None:
    """First string of a str / list[str] / list[list[str]] answer field (KnowEdit aliases)."""
    while isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, str) and value.strip() else None


def _request(r: _Rec, prefix: str, **kwargs: Any) -> EditRequest:
    """Build an EditRequest, turning RequestError into DatasetError (or a skip for a subject not in prompt)."""
    prompt, subject = kwargs["prompt"], kwargs["subject"]
    if "{}" not in prompt and subject not in prompt:
        low = prompt.lower().find(subject.lower())
        if low < 0:
            raise _SkipRecord(f"subject {subject!r} does not occur in the prompt {prompt!r}")
        kwargs["subject"] = prompt[low : low + len(subject)]
    try:
        return EditRequest(**kwargs)
    except RequestError as e:
        raise r.fail(prefix + e.field, str(e).split(": ", 1)[-1]) from None


def _category_probes(r: _Rec, key: str, compare: str | None = None) -> list[EvalProbe]:
    """KnowEdit's {category: [{"prompt", "ground_truth"}]} (also accepts a bare list)."""
    v = r.get(key)
    if v is None:
        return []
    groups = v.items() if isinstance(v, dict) else [("", v)] if isinstance(v, list) else None
    if groups is None:
        raise r.fail(key, f"must be an object of lists or a list, got {type(v).__name__}")
    out = []
    for tag, items in groups:
        if not isinstance(items, list):
            raise r.fail(f"{key}.{tag}", "must be a list of {prompt, ground_truth} objects")
        for j, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise r.fail(f"{key}.{tag}[{j}].prompt", "must be a string")
            raw = item.get("ground_truth", item.get("answer"))
            answer = _first_str(raw)
            if answer is None:
                if (
                    raw == "" or raw == []
                ):  # a few real KnowEdit probes have an empty answer: nothing to score
                    continue
                raise r.fail(f"{key}.{tag}[{j}].ground_truth", "must be a non-empty string (or list of them)")
            out.append(EvalProbe(item["prompt"], answer, compare, tag))
    return out


def _portability_pairs(r: _Rec, key: str = "portability") -> list[EvalProbe]:
    """EasyEdit's {"New Question", "New Answer"} dict, our list of {"prompt", "answer"}, or KnowEdit's form."""
    v = r.get(key)
    if v is None:
        return []
    if isinstance(v, dict) and ("New Question" in v or "New Answer" in v):
        q, a = v.get("New Question"), v.get("New Answer")
        if not isinstance(q, str) or not q.strip():
            raise r.fail(f"{key}.New Question", "must be a non-empty string")
        if not isinstance(a, str) or not a.strip():
            raise r.fail(f"{key}.New Answer", "must be a non-empty string")
        return [EvalProbe(q, a, None, "portability")]
    if isinstance(v, list):
        out = []
        for j, item in enumerate(v):
            if isinstance(item, (list, tuple)) and len(item) == 2:
                item = {"prompt": item[0], "answer": item[1]}
            if not isinstance(item, dict):
                raise r.fail(f"{key}[{j}]", "must be a {prompt, answer} object")
            p, a = item.get("prompt"), item.get("answer", item.get("ground_truth"))
            a = _first_str(a)
            if not isinstance(p, str) or not p.strip():
                raise r.fail(f"{key}[{j}].prompt", "must be a non-empty string")
            if a is None:
                raise r.fail(f"{key}[{j}].answer", "must be a non-empty string")
            out.append(EvalProbe(p, a, None, str(item.get("tag", "portability"))))
        return out
    return _category_probes(r, key)


# -------------------------------------------------------------------------------------------------- parsers


def _target_str(r: _Rec, rw: dict, key: str, where: str) -> str:
    v = rw.get(key)
    if isinstance(v, dict):
        v = v.get("str")
    if not isinstance(v, str) or not v.strip():
        raise r.fail(f"{where}.{key}", 'must be a non-empty string or {"str": ...}')
    return v


def _parse_counterfact(r: _Rec) -> EvalCase:
    rw = r.obj("requested_rewrite")
    for k in ("prompt", "subject"):
        if not isinstance(rw.get(k), str) or not rw[k].strip():
            raise r.fail(f"requested_rewrite.{k}", "must be a non-empty string")
    new = _target_str(r, rw, "target_new", "requested_rewrite")
    true = _target_str(r, rw, "target_true", "requested_rewrite")
    paraphrases = r.strs("paraphrase_prompts")
    neighbours = r.strs("neighborhood_prompts")
    portability = _portability_pairs(r)
    req = _request(
        r,
        "requested_rewrite.",
        prompt=rw["prompt"],
        subject=rw["subject"],
        target_new=new,
        target_true=true,
        rephrase=paraphrases,
        locality=[(p, true) for p in neighbours],
        portability=[(p.prompt, p.answer) for p in portability],
    )
    gen = list(dict.fromkeys(r.strs("generation_prompts")))
    return EvalCase(
        case_id=r.get("case_id", r.index),
        requests=[req],
        reliability=[EvalProbe(req.prompt_text, req.target_new, req.target_true, "rewrite")],
        generalization=[EvalProbe(p, req.target_new, req.target_true, "paraphrase") for p in paraphrases],
        locality=[EvalProbe(p, req.target_true, req.target_new, "neighborhood") for p in neighbours],
        portability=portability,
        generation_prompts=gen,
        reference_texts=r.strs("reference_texts"),
    )


def _parse_counterfact_flat(r: _Rec) -> EvalCase:
    prompt, subject, new = r.str("prompt"), r.str("subject"), r.str("target_new")
    true = r.str("ground_truth", required=False)
    rephrase = r.strs("rephrase_prompt")
    loc_p = r.str("locality_prompt", required=False)
    loc_a = _first_str(r.get("locality_ground_truth"))
    if loc_p and loc_a is None:
        raise r.fail("locality_ground_truth", "must be a non-empty string when locality_prompt is given")
    req = _request(r, "", prompt=prompt, subject=subject, target_new=new, target_true=true, rephrase=rephrase)
    locality = []
    if loc_p:
        same_relation = req.target_true is not None and loc_a.strip() == req.target_true.strip()
        locality = [EvalProbe(loc_p, loc_a, req.target_new if same_relation else None, "neighborhood")]
    return EvalCase(
        case_id=r.get("case_id", r.index),
        requests=[req],
        reliability=[EvalProbe(req.prompt_text, req.target_new, req.target_true, "rewrite")],
        generalization=[EvalProbe(p, req.target_new, req.target_true, "paraphrase") for p in rephrase],
        locality=locality,
        portability=_portability_pairs(r),
    )


def _parse_zsre(r: _Rec) -> EvalCase:
    prompt, subject, new = r.str("src"), r.str("subject"), r.str("alt")
    answers = r.strs("answers")
    true = answers[0] if answers else None
    if true is not None and true.strip() == new.strip():
        true = None
    rephrase = r.strs("rephrase")
    req = _request(r, "", prompt=prompt, subject=subject, target_new=new, target_true=true, rephrase=rephrase)
    locality = []
    if r.get("loc") is not None:
        loc = r.str("loc")
        loc_a = _first_str(r.get("loc_ans"))
        if loc_a is None:
            raise r.fail("loc_ans", "must be a non-empty string when loc is given")
        locality = [EvalProbe(loc, loc_a, None, "nq")]
    portability = _portability_pairs(r)
    if isinstance(r.get("inverse question"), str):
        portability.append(EvalProbe(r.str("inverse question"), subject, None, "inverse_relation"))
    if isinstance(r.get("alter_subject_question"), str):
        portability.append(EvalProbe(r.str("alter_subject_question"), new, None, "subject_replace"))
    return EvalCase(
        case_id=r.get("case_id", r.index),
        requests=[req],
        reliability=[EvalProbe(req.prompt_text, req.target_new, req.target_true, "rewrite")],
        generalization=[EvalProbe(p, req.target_new, req.target_true, "paraphrase") for p in rephrase],
        locality=locality,
        portability=portability,
    )


def _parse_knowedit(r: _Rec) -> EvalCase:
    prompt, subject, new = r.str("prompt"), r.str("subject"), r.str("target_new")
    true = _first_str(r.get("ground_truth"))
    if true is not None and true.strip() == new.strip():
        true = None
    rephrase = r.strs("rephrase_prompt")
    req = _request(r, "", prompt=prompt, subject=subject, target_new=new, target_true=true, rephrase=rephrase)
    return EvalCase(
        case_id=r.get("case_id", r.index),
        requests=[req],
        reliability=[EvalProbe(req.prompt_text, req.target_new, req.target_true, "rewrite")],
        generalization=[EvalProbe(p, req.target_new, req.target_true, "paraphrase") for p in rephrase],
        locality=_category_probes(r, "locality"),
        portability=_category_probes(r, "portability"),
    )


def _parse_wikibio(r: _Rec) -> EvalCase:
    text, labels, concept = r.str("text"), r.str("labels"), r.str("concept")
    req = _request(r, "", prompt=text, subject=concept, target_new=labels)
    return EvalCase(
        case_id=r.get("case_id", r.index),
        requests=[req],
        reliability=[EvalProbe(req.prompt_text, req.target_new, None, "rewrite")],
        locality=_category_probes(r, "locality"),
    )


def _parse_convsent(r: _Rec) -> EvalCase:
    ent = r.str("ent")
    pos = r.strs("pos", required=True)
    if not pos:
        raise r.fail("pos", "must hold at least one positive text")
    prompt = f"What do you think of {ent}?"
    target = " " + pos[0].strip()
    req = _request(r, "", prompt=prompt, subject=ent, target_new=target)
    return EvalCase(
        case_id=r.get("case_id", r.index),
        requests=[req],
        reliability=[EvalProbe(prompt, req.target_new, None, "sentiment")],
        generation_prompts=[prompt],
        reference_texts=[p.strip() for p in pos],
    )


def _parse_mquake(r: _Rec) -> EvalCase:
    rewrites = r.get("requested_rewrite")
    if not isinstance(rewrites, list) or not rewrites:
        raise r.fail("requested_rewrite", "must be a non-empty list of rewrites")
    reqs, reliability, generalization = [], [], []
    for j, rw in enumerate(rewrites):
        where = f"requested_rewrite[{j}]"
        if not isinstance(rw, dict):
            raise r.fail(where, "must be an object")
        for k in ("prompt", "subject"):
            if not isinstance(rw.get(k), str) or not rw[k].strip():
                raise r.fail(f"{where}.{k}", "must be a non-empty string")
        new = _target_str(r, rw, "target_new", where)
        true = _target_str(r, rw, "target_true", where)
        req = _request(
            r, where + ".", prompt=rw["prompt"], subject=rw["subject"], target_new=new, target_true=true
        )
        reqs.append(req)
        reliability.append(EvalProbe(req.prompt_text, req.target_new, req.target_true, f"rewrite{j}"))
        if isinstance(rw.get("question"), str) and rw["question"].strip():
            generalization.append(EvalProbe(rw["question"], req.target_new, req.target_true, f"question{j}"))
    questions = r.strs("questions", required=True)
    new_answer = r.str("new_answer")
    answer = r.str("answer", required=False)
    portability = [EvalProbe(q, new_answer, answer, "multi_hop") for q in questions]
    hops = r.get("new_single_hops") or []
    if not isinstance(hops, list):
        raise r.fail("new_single_hops", "must be a list")
    for j, hop in enumerate(hops):
        if (
            not isinstance(hop, dict)
            or not isinstance(hop.get("cloze"), str)
            or not _first_str(hop.get("answer"))
        ):
            raise r.fail(f"new_single_hops[{j}]", "must be an object with string cloze and answer")
        portability.append(EvalProbe(hop["cloze"], hop["answer"], None, f"hop{j}"))
    return EvalCase(
        case_id=r.get("case_id", r.index),
        requests=reqs,
        reliability=reliability,
        generalization=generalization,
        portability=portability,
    )


PARSERS: dict[str, Callable[[_Rec], EvalCase]] = {
    "counterfact": _parse_counterfact,
    "counterfact-flat": _parse_counterfact_flat,
    "zsre": _parse_zsre,
    "knowedit": _parse_knowedit,
    "wikibio": _parse_wikibio,
    "convsent": _parse_convsent,
    "mquake": _parse_mquake,
}


def detect_format(record: Any) -> str | None:
    """The format of one record, from its keys (None if unknown)."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    rw = record.get("requested_rewrite")
    if isinstance(rw, list) or ("questions" in keys and "new_answer" in keys):
        return "mquake"
    if isinstance(rw, dict):
        return "counterfact"
    if {"src", "alt"} <= keys:
        return "zsre"
    if {"text", "labels", "concept"} <= keys:
        return "wikibio"
    if {"ent", "pos"} <= keys:
        return "convsent"
    if "locality_prompt" in keys or ("rephrase_prompt" in keys and "case_id" in keys):
        return "counterfact-flat"
    if {"prompt", "subject", "target_new"} <= keys:
        return "knowedit"
    return None


def _read_records(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DatasetError(str(path), i, "", f"invalid JSON line: {e}") from None
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(str(path), None, "", f"invalid JSON: {e}") from None
    if isinstance(data, dict):
        for key in ("cases", "data", "records"):
            if isinstance(data.get(key), list):
                return data[key]
        raise DatasetError(str(path), None, "", "expected a JSON list of records (or an object with 'cases')")
    if not isinstance(data, list):
        raise DatasetError(str(path), None, "", f"expected a JSON list of records, got {type(data).__name__}")
    return data


def bundled_path(name: str = "bundled") -> Path:
    """Path of a dataset shipped with lmedit."""
    from importlib.resources import files

    return Path(str(files("lmedit.data").joinpath("bundled", BUNDLED[name])))


def parse_records(records: Sequence, path: str = "<memory>", format: str | None = None) -> Dataset:
    """Parse in-memory records (see ``load_dataset``)."""
    if not records:
        raise DatasetError(path, None, "", "holds no records")
    fmt = format or detect_format(records[0])
    if fmt not in PARSERS:
        keys = sorted(records[0]) if isinstance(records[0], dict) else type(records[0]).__name__
        raise DatasetError(
            path, 0, "", f"unknown dataset format (keys {keys}); pass format= one of {', '.join(FORMATS)}"
        )
    parse = PARSERS[fmt]
    cases, skipped = [], []
    for i, rec in enumerate(records):
        try:
            cases.append(parse(_Rec(path, i, rec)))
        except _SkipRecord as e:
            skipped.append((i, str(e)))
    if skipped:
        log.warning(
            "%s: skipped %d of %d records (e.g. record %d: %s)", path, len(skipped), len(records), *skipped[0]
        )
    if not cases:
        raise DatasetError(path, None, "", "no usable records")
    return Dataset(Path(path).stem, path, fmt, cases, len(records), skipped)


def load_dataset(
    name_or_path: str = "bundled",
    n: int | None = None,
    sample: bool = False,
    seed: int = 0,
    format: str | None = None,
) -> Dataset:
    """Load a dataset by bundled name or file path (JSON list or JSONL), or several joined by commas.

    Args:
        name_or_path: "bundled" (default) or a path; "a,b" concatenates the sources in that order (each
            case id becomes ``"<source name>:<id>"``, ``n`` and ``sample`` apply to the concatenation).
        n: keep the first ``n`` cases in file order (or ``n`` random ones with ``sample``).
        sample: take a seeded random subset instead of the first ``n`` (kept in file order).
        seed: seed of the random subset.
        format: force a format (see ``FORMATS``); detected from the first record otherwise.
    """
    if "," in name_or_path:
        ds = _concatenate([load_dataset(part.strip(), format=format) for part in name_or_path.split(",")])
        return _select(ds, n, sample, seed)
    if name_or_path in BUNDLED:
        path = bundled_path(name_or_path)
        if not path.exists():
            raise DatasetError(str(path), None, "", "the bundled dataset is missing from this installation")
        name = name_or_path
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise DatasetError(
                str(path),
                None,
                "",
                f"no such file; give a path or one of the bundled names {sorted(BUNDLED)}",
            )
        name = path.stem
    ds = parse_records(_read_records(path), str(path), format)
    ds.name = name
    return _select(ds, n, sample, seed)


def _concatenate(parts: list[Dataset]) -> Dataset:
    """One dataset of ``parts`` in order; case ids are prefixed with their source's name."""
    if len({d.name for d in parts}) < len(parts):
        raise ValueError(f"a dataset appears twice in {[d.path for d in parts]}; list each source once")
    cases = []
    for d in parts:
        for c in d.cases:
            c.case_id = f"{d.name}:{c.case_id}"
            cases.append(c)
    skipped = [(i, f"{d.name}: {why}") for d in parts for i, why in d.skipped]
    return Dataset(
        "+".join(d.name for d in parts),
        ",".join(d.path for d in parts),
        ",".join(dict.fromkeys(d.format for d in parts)),
        cases,
        sum(d.total for d in parts),
        skipped,
    )


def _select(ds: Dataset, n: int | None, sample: bool, seed: int) -> Dataset:
    """Keep the first ``n`` cases (or a seeded random ``n``, kept in order) and record the selection."""
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if sample:
            keep = sorted(random.Random(seed).sample(range(len(ds.cases)), min(n, len(ds.cases))))
            ds.cases = [ds.cases[i] for i in keep]
        else:
            ds.cases = ds.cases[:n]
    ds.selection = {"n": len(ds.cases), "sample": bool(sample and n is not None), "seed": seed}
    return ds
