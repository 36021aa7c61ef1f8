"""Evaluation protocols: single edits, batches of k, sequential (lifelong) editing; one Report each.

    >>> ds = load_dataset("bundled", n=20)
    >>> report = evaluate(loaded, ds, method="ft-m", protocol="single")
    >>> report = evaluate(loaded, ds, method="ft-m", protocol="sequential", k=5, eval_every=1)
    >>> print(report.table())

* ``single``: every case is edited on the pristine model (``patch.applied``: the model is restored bit for bit
  after each case; nothing is reloaded) and evaluated under its own edit.
* ``batch``: the requests of ``k`` consecutive cases are edited at once; each case is evaluated under the
  batch edit.
* ``sequential``: ``k`` cases per step over T = ceil(N / k) steps, each edit computed on the already-edited
  model; all cases are evaluated after the last step, and with ``eval_every=m`` after every m-th step too (the
  retention curve: teacher-forced and probability metrics of every case edited so far, and of the first
  step's cases alone). A method with sequential state (a ``previous`` config field, e.g. AlphaEdit) gets the
  previous step's patch as ``previous``. Each step records its edit time, the bytes its patch stores, the
  bytes stored by all patches so far and the process's peak resident memory (``meta["edits"]``).
  With ``held_out`` (``lmedit.evaluate.perplexity.HeldOut``), the perplexity of held-out text is measured on the
  pristine model, at every retention checkpoint (``retention[i]["perplexity"]``) and after the last step
  (``meta["perplexity"]``): the general-ability check of lifelong runs. With ``checkpoint`` (a folder), every
  retention checkpoint saves the patches so far, the curve and a partial report, and a run started again with
  the same folder and settings continues after the last checkpoint (``lmedit.evaluate.checkpoint``).

The frozen pre-edit reference (locality) is always the pristine model, scored once, batched, before any edit.
Locality stays out of scope: in ``batch`` and ``sequential`` runs a locality probe that names a subject which
another request of the run edits (batch: the case's group; sequential: any case of the run) is dropped before
scoring, since that edit legitimately changes its answer (the bundled set's neighbourhood prompts are other
cases' subjects: 438 of the first 100 cases' 489 probes). ``meta["locality_dropped"]`` counts them.
Scoring and metrics never import methods; only this module calls ``lmedit.edit``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm.auto import tqdm

from lmedit.core.stats import model_fingerprint
from lmedit.data.loaders import Dataset, EvalCase
from lmedit.evaluate import metrics as M
from lmedit.evaluate.report import Report
from lmedit.evaluate.scoring import PairScore, generate_ids, score_pairs

log = logging.getLogger(__name__)

PROTOCOLS = ("single", "batch", "sequential")
FAMILIES = ("tf", "prob", "gen", "text")
KINDS = ("reliability", "generalization", "locality", "portability")


@dataclass
class ScoringSettings:
    """What is scored and how (recorded in ``report.meta["scoring"]``).

    Attributes:
        families: subset of tf (teacher-forced), prob (probability comparison), gen (greedy generation),
            text (fluency, consistency).
        batch_size: pairs per teacher-forced forward pass.
        gen_batch_size: prompts per generation batch.
        gen_slack: extra tokens generated beyond the answer length (rounded up to a power of two, >= 4).
        text_tokens: tokens generated per prompt for fluency / consistency.
        text_prompts: at most this many generation prompts per case (the dataset's ``generation_prompts``,
            else the edit prompt and its paraphrases).
    """

    families: tuple[str, ...] = FAMILIES
    batch_size: int = 64
    gen_batch_size: int = 16
    gen_slack: int = 2
    text_tokens: int = 40
    text_prompts: int = 3

    def __post_init__(self) -> None:
        self.families = tuple(self.families)
        bad = set(self.families) - set(FAMILIES)
        if bad:
            raise ValueError(f"unknown scoring families {sorted(bad)}; choose from {FAMILIES}")


@dataclass
class CaseScores:
    """Raw scores of one case on one model state."""

    answer: dict[str, list[PairScore]] = field(default_factory=dict)  # kind -> per probe, scored answer
    compare: dict[str, list[PairScore | None]] = field(default_factory=dict)  # kind -> competing answer
    gen_ids: dict[str, list[list[int]]] = field(default_factory=dict)  # kind -> greedy continuation ids
    gen_text: dict[str, list[str]] = field(default_factory=dict)
    text: list[str] = field(default_factory=list)  # prompt + continuation, for fluency / consistency

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> CaseScores:
        def pairs(d: dict) -> dict[str, list]:
            return {k: [None if x is None else PairScore(**x) for x in v] for k, v in d.items()}

        return cls(
            answer=pairs(data["answer"]),
            compare=pairs(data["compare"]),
            gen_ids=data["gen_ids"],
            gen_text=data["gen_text"],
            text=data["text"],
        )


def _gen_len(answer_tokens: int, slack: int) -> int:
    return max(4, 1 << math.ceil(math.log2(answer_tokens + slack)))


def _text_prompts(case: EvalCase, limit: int) -> list[str]:
    prompts = case.generation_prompts or [p.prompt for p in case.reliability + case.generalization]
    return list(dict.fromkeys(prompts))[:limit]


def score_cases(loaded, cases: Sequence[EvalCase], settings: ScoringSettings) -> list[CaseScores]:
    """Score every probe of every case on the model as it is now: all pairs in one batched pass, all
    generations in length buckets."""
    fam = set(settings.families)
    out = [CaseScores() for _ in cases]
    # teacher-forced: every answer (tf, gen lengths, gen prefix) and every competing answer (prob)
    pairs: list[tuple[str, str]] = []
    slots: list[tuple[int, str, str, int]] = []  # (case, "answer"|"compare", kind, probe)
    for ci, case in enumerate(cases):
        for kind, probes in case.probes().items():
            out[ci].answer[kind] = [None] * len(probes)  # type: ignore[list-item]
            out[ci].compare[kind] = [None] * len(probes)
            for pi, p in enumerate(probes):
                pairs.append((p.prompt, p.answer))
                slots.append((ci, "answer", kind, pi))
                if "prob" in fam and p.compare is not None:
                    pairs.append((p.prompt, p.compare))
                    slots.append((ci, "compare", kind, pi))
    if pairs:
        scores = score_pairs(loaded, [a for a, _ in pairs], [b for _, b in pairs], settings.batch_size)
        for (ci, which, kind, pi), s in zip(slots, scores):
            getattr(out[ci], which)[kind][pi] = s
    if "gen" in fam:
        buckets: dict[int, list[tuple[int, str, int, str]]] = {}
        for ci, case in enumerate(cases):
            for kind, probes in case.probes().items():
                out[ci].gen_ids[kind] = [[] for _ in probes]
                out[ci].gen_text[kind] = ["" for _ in probes]
                for pi, p in enumerate(probes):
                    n = _gen_len(len(out[ci].answer[kind][pi].target_ids), settings.gen_slack)
                    buckets.setdefault(n, []).append((ci, kind, pi, p.prompt))
        for n, items in sorted(buckets.items()):
            ids = generate_ids(loaded, [it[3] for it in items], n, settings.gen_batch_size)
            texts = loaded.tokenizer.batch_decode(ids, skip_special_tokens=True)
            for (ci, kind, pi, _), row, text in zip(items, ids, texts):
                out[ci].gen_ids[kind][pi] = row
                out[ci].gen_text[kind][pi] = text
    if "text" in fam:
        items = [(ci, p) for ci, case in enumerate(cases) for p in _text_prompts(case, settings.text_prompts)]
        if items:
            ids = generate_ids(loaded, [p for _, p in items], settings.text_tokens, settings.gen_batch_size)
            texts = loaded.tokenizer.batch_decode(ids, skip_special_tokens=True)
            for (ci, p), t in zip(items, texts):
                out[ci].text.append(p + t)
    return out


def case_metrics(
    case: EvalCase,
    post: CaseScores,
    pre: CaseScores,
    settings: ScoringSettings,
    idf: dict[str, float] | None = None,
) -> dict[str, float | None]:
    """Every metric of one case from its post-edit scores and the frozen pre-edit reference."""
    fam = set(settings.families)
    m: dict[str, float | None] = {}
    probes = case.probes()
    if "tf" in fam:
        for kind in ("reliability", "generalization", "portability"):
            m[f"{kind}_tf"] = M.accuracy_tf([s.correct for s in post.answer[kind]])
        m["locality_tf"] = M.locality_tf(
            [s.argmax for s in pre.answer["locality"]], [s.argmax for s in post.answer["locality"]]
        )
    if "prob" in fam:
        for key, kind, fn in (
            ("efficacy", "reliability", M.efficacy),
            ("paraphrase", "generalization", M.paraphrase),
            ("neighborhood", "locality", M.neighborhood),
        ):
            new, true = [], []
            for a, c in zip(post.answer[kind], post.compare[kind]):
                if c is None:
                    continue
                # locality probes answer with the true target and compare against the new one
                n_, t_ = (c, a) if kind == "locality" else (a, c)
                new.append(n_.nll)
                true.append(t_.nll)
            m[f"{key}_score"], m[f"{key}_magnitude"] = fn(new, true)
    if "gen" in fam:
        for kind in ("reliability", "generalization", "portability"):
            texts = post.gen_text[kind]
            m[f"{kind}_gen"] = M.mean(M.exact_match(t, p.answer) for t, p in zip(texts, probes[kind]))
            if kind != "portability":
                m[f"{kind}_gen_prefix"] = M.mean(
                    M.prefix_match(g, s.target_ids) for g, s in zip(post.gen_ids[kind], post.answer[kind])
                )
        m["locality_gen"] = M.generation_equality(pre.gen_text["locality"], post.gen_text["locality"])
    if "text" in fam:
        m["fluency"] = M.fluency(post.text)
        m["consistency"] = M.consistency(post.text, case.reference_texts, idf or {})
    return m


def _case_record(
    case: EvalCase, group: int, pre: dict, post: dict, pre_s: CaseScores, post_s: CaseScores
) -> dict:
    return {
        "case_id": case.case_id,
        "group": group,
        "requests": [r.to_dict() for r in case.requests],
        "pre": pre,
        "post": post,
        "generations": {
            "pre": {**{k: v for k, v in pre_s.gen_text.items() if v}, "text": pre_s.text},
            "post": {**{k: v for k, v in post_s.gen_text.items() if v}, "text": post_s.text},
        },
    }


def _method_overrides(method: str, config: dict | None) -> dict:
    """User overrides, with the method's own progress bar off unless asked for (bench shows its own)."""
    from dataclasses import fields

    from lmedit.registry import get_method

    out = dict(config or {})
    if "progress" not in out and any(f.name == "progress" for f in fields(get_method(method).config_cls)):
        out["progress"] = False
    return out


def _takes_previous(method: str) -> bool:
    """Whether the method's config has a ``previous`` field (sequential state passed from patch to patch)."""
    from dataclasses import fields

    from lmedit.registry import get_method

    return any(f.name == "previous" for f in fields(get_method(method).config_cls))


def _peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MiB (None where ``resource`` is unavailable)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    import sys

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024  # macOS reports bytes


def in_scope_locality(cases: list[EvalCase], k: int, protocol: str) -> tuple[list[EvalCase], int]:
    """The cases without the locality probes that another edit of the run makes in scope, and how many went.

    A probe is dropped when its prompt names (whole words) the subject of a request other than the case's own
    that is in effect when the case is evaluated: the case's group of ``k`` (``batch``) or any case
    (``sequential``; the same probes at every checkpoint). ``single`` keeps everything.
    """
    if protocol == "single":
        return cases, 0
    scopes = [cases] if protocol == "sequential" else [cases[i : i + k] for i in range(0, len(cases), k)]
    out, dropped = [], 0
    for scope in scopes:
        subjects = sorted({r.subject for c in scope for r in c.requests}, key=len, reverse=True)
        named = re.compile("|".join(rf"(?<!\w){re.escape(x)}(?!\w)" for x in subjects))  # longest first
        for c in scope:
            own = {r.subject for r in c.requests}
            keep = [p for p in c.locality if all(m.group(0) in own for m in named.finditer(p.prompt))]
            dropped += len(c.locality) - len(keep)
            out.append(dataclasses.replace(c, locality=keep) if len(keep) < len(c.locality) else c)
    return out, dropped


def evaluate(
    loaded,
    dataset: Dataset | Sequence[EvalCase],
    method: str = "ft-m",
    protocol: str = "single",
    k: int = 1,
    eval_every: int = 0,
    config: dict | None = None,
    settings: ScoringSettings | None = None,
    progress: bool = True,
    held_out=None,
    checkpoint: str | os.PathLike | None = None,
    run_meta: dict | None = None,
) -> Report:
    """Edit and evaluate ``dataset`` with ``method`` under ``protocol``; the model is restored afterwards.

    Args:
        loaded: a LoadedModel.
        dataset: a Dataset from ``load_dataset`` or a list of EvalCase.
        method: a registered method name.
        protocol: "single", "batch" (k cases per edit) or "sequential" (k cases per step).
        k: cases per edit (batch) or per step (sequential).
        eval_every: sequential only: evaluate every case edited so far after every ``eval_every``-th step (the
            retention curve; 0: only after the last step).
        config: method config overrides (``seed`` included).
        settings: ScoringSettings.
        progress: show a tqdm bar with ETA.
        held_out: sequential only: a ``HeldOut`` text whose perplexity is measured before, along and after.
        checkpoint: sequential with ``eval_every`` only: a folder that makes the run resumable (module docstring).
        run_meta: provenance (dataset, model, seed, versions) put into the report's ``meta``, partial ones too.
    Returns:
        Report (model/dataset provenance in its ``meta`` only as given by ``run_meta``; ``lmedit.bench`` does).
    """
    import lmedit
    from lmedit.session import EditSession

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if eval_every < 0:
        raise ValueError(f"eval_every must be >= 0, got {eval_every}")
    if held_out is not None and protocol != "sequential":
        raise ValueError("held-out perplexity is measured along sequential runs: use protocol='sequential'")
    if checkpoint is not None and (protocol != "sequential" or not eval_every):
        raise ValueError(
            "checkpoint: a run is saved at its retention checkpoints; use protocol='sequential' with eval_every "
            "(lmedit bench --protocol sequential --eval-every M --checkpoint DIR)"
        )
    cases = list(dataset.cases if isinstance(dataset, Dataset) else dataset)
    if not cases:
        raise ValueError("no cases to evaluate")
    settings = settings or ScoringSettings()
    overrides = _method_overrides(method, config)
    k = 1 if protocol == "single" else k
    cases, dropped = in_scope_locality(cases, k, protocol)
    groups = [cases[i : i + k] for i in range(0, len(cases), k)]
    timings: dict[str, float] = {"edit_s": 0.0, "eval_s": 0.0}
    refs = [t for c in cases for t in c.reference_texts]
    idf = M.idf_table(refs) if refs else {}

    ckpt = None
    if checkpoint is not None:
        from lmedit.evaluate.checkpoint import RunCheckpoint

        identity = {
            "method": method,
            "protocol": protocol,
            "k": k,
            "eval_every": eval_every,
            "config_overrides": overrides,
            "scoring": asdict(settings),
            "perplexity": held_out.describe() if held_out is not None else None,
            "model": loaded.name,
            "case_ids": [c.case_id for c in cases],
        }
        ckpt = RunCheckpoint(checkpoint, identity)

    t0 = time.perf_counter()
    # a resumed run's pre-edit reference, saved with its first checkpoint (used if the model is the same)
    kept = ckpt.pristine() if ckpt is not None else None
    fp = model_fingerprint(loaded) if ckpt is not None else None
    if kept is not None and kept.get("model") != fp:
        log.warning("checkpoint: the saved pre-edit scores are of another model (fingerprint); scoring again")
        kept = None
    if kept is not None:
        pre_scores = [CaseScores.from_json(x) for x in kept["scores"]]
    else:
        if progress:
            tqdm.write(
                f"scoring {len(cases)} cases on the pristine model (the frozen pre-edit reference) ..."
            )
        pre_scores = score_cases(loaded, cases, settings)
    timings["pre_s"] = time.perf_counter() - t0
    pre_metrics = [case_metrics(c, s, s, settings, idf) for c, s in zip(cases, pre_scores)]
    perplexity = None
    if held_out is not None:
        pre_ppl = kept["perplexity"] if kept is not None else held_out.perplexity(loaded)
        perplexity = held_out.describe() | {"pre": pre_ppl}
    if ckpt is not None and kept is None:
        ckpt.keep_pristine(
            {
                "model": fp,
                "scores": [x.to_json() for x in pre_scores],
                "perplexity": perplexity and perplexity["pre"],
            }
        )

    post_scores: list[CaseScores | None] = [None] * len(cases)
    edit_info: list[dict] = []
    method_config: dict | None = None
    retention: list[dict] = []
    bar = tqdm(total=len(cases), desc=f"{method} {protocol}", unit="case", disable=not progress)
    session = EditSession(loaded, check=False) if protocol == "sequential" else None
    chained = session is not None and _takes_previous(method)
    stored = 0

    def build_meta() -> dict[str, Any]:
        meta: dict[str, Any] = {
            "protocol": {
                "name": protocol,
                "k": k,
                "steps": len(groups),
                "eval": f"every_{eval_every}_steps+end"
                if (protocol == "sequential" and eval_every)
                else "end"
                if protocol == "sequential"
                else "per_edit",
                "reference": "pristine model, scored once before any edit",
            },
            "scoring": asdict(settings) | {"families": list(settings.families)},
            "n": len(cases),
            "method": method,
            "config_overrides": overrides,
            "config": method_config,
            "edits": edit_info,
            "timings": timings,
            "locality_dropped": dropped,
        }
        if perplexity is not None:
            meta["perplexity"] = perplexity
        return meta | (run_meta or {})

    history: list = []
    try:
        start = 0
        patch = None
        done = 0
        if ckpt is not None:
            resumed = ckpt.resume(session)
            if resumed is not None:
                done, patch = resumed.steps_done, resumed.previous
                edit_info, retention = resumed.edits, resumed.retention
                for key in ("edit_s", "eval_s"):
                    timings[key] += resumed.timings.get(key, 0.0)
                if kept is not None:  # the pristine scoring was done by the run that saved it
                    timings["pre_s"] = resumed.timings.get("pre_s", timings["pre_s"])
                stored = edit_info[-1]["stored_bytes"]
                method_config = dict(session.history[0].config)
                start = sum(len(g) for g in groups[:done])
                bar.update(start)
                log.info("resumed %s after step %d of %d (%d cases)", checkpoint, done, len(groups), start)
        for gi, group in enumerate(groups):
            if gi < done:
                continue
            reqs = [r for c in group for r in c.requests]
            extra = {"previous": patch} if chained and patch is not None else {}
            t1, c1 = time.perf_counter(), time.process_time()
            patch = lmedit.edit(loaded, reqs, method=method, **overrides, **extra)
            seconds, cpu_seconds = time.perf_counter() - t1, time.process_time() - c1
            timings["edit_s"] += seconds
            size = patch.nbytes
            stored = stored + size if session is not None else size
            edit_info.append(
                {
                    "group": gi,
                    "cases": len(group),
                    "requests": len(reqs),
                    "seconds": seconds,
                    "cpu_seconds": cpu_seconds,  # all threads of the process; robust to a busy machine
                    "patch_bytes": size,
                    "stored_bytes": stored,
                    "peak_rss_mb": _peak_rss_mb(),
                    "info": patch.info,
                }
            )
            method_config = method_config or dict(patch.config)
            t2 = time.perf_counter()
            if session is None:
                with patch.applied(loaded.model):
                    scores = score_cases(loaded, group, settings)
                for j, s in enumerate(scores):
                    post_scores[start + j] = s
            else:
                session.apply(patch)
                if eval_every and (gi + 1) % eval_every == 0 and gi < len(groups) - 1:
                    seen = cases[: start + len(group)]
                    cheap = ScoringSettings(
                        tuple(f for f in settings.families if f in ("tf", "prob")), settings.batch_size
                    )
                    now = score_cases(loaded, seen, cheap)
                    per = [case_metrics(c, s, p, cheap) for c, s, p in zip(seen, now, pre_scores)]
                    retention.append(
                        {
                            "step": gi + 1,
                            "edits": len(seen),
                            "metrics": M.aggregate(per),
                            "first_step": M.aggregate(per[: len(groups[0])]),
                        }
                    )
                    if held_out is not None:
                        retention[-1]["perplexity"] = held_out.perplexity(loaded)
                    if ckpt is not None:
                        timings["eval_s"] += time.perf_counter() - t2
                        t2 = time.perf_counter()
                        partial = build_meta() | {"partial": {"steps_done": gi + 1, "edits_done": len(seen)}}
                        so_far = Report(
                            M.aggregate(pre_metrics), retention[-1]["metrics"], [], partial, retention
                        )
                        ckpt.save(session.history, gi + 1, edit_info, retention, timings, so_far)
            timings["eval_s"] += time.perf_counter() - t2
            start += len(group)
            bar.update(len(group))
        if session is not None:
            t2 = time.perf_counter()
            final = score_cases(loaded, cases, settings)
            if perplexity is not None:
                perplexity["post"] = held_out.perplexity(loaded)
            timings["eval_s"] += time.perf_counter() - t2
            post_scores = list(final)
    finally:
        bar.close()
        if session is not None:
            history = session.history
            session.reset()
    post_metrics = [
        case_metrics(c, s, p, settings, idf)
        for c, s, p in zip(cases, post_scores, pre_scores)  # type: ignore[arg-type]
    ]
    if session is not None and eval_every:
        cheap_keys = set(M.TF_KEYS + M.PROB_KEYS)
        retention.append(
            {
                "step": len(groups),
                "edits": len(cases),
                "metrics": {k_: v for k_, v in M.aggregate(post_metrics).items() if k_ in cheap_keys},
                "first_step": {
                    k_: v for k_, v in M.aggregate(post_metrics[: len(groups[0])]).items() if k_ in cheap_keys
                },
            }
        )
        if perplexity is not None:
            retention[-1]["perplexity"] = perplexity["post"]
    group_of = [gi for gi, g in enumerate(groups) for _ in g]
    records = [
        _case_record(c, g, a, b, sa, sb)
        for c, g, a, b, sa, sb in zip(cases, group_of, pre_metrics, post_metrics, pre_scores, post_scores)
    ]
    timings["total_s"] = time.perf_counter() - t0
    timings["eval_per_case_s"] = timings["eval_s"] / len(cases)
    report = Report(M.aggregate(pre_metrics), M.aggregate(post_metrics), records, build_meta(), retention)
    if ckpt is not None:  # the finished run: its report replaces the partial one
        ckpt.save(history, len(groups), edit_info, retention, timings, report)
    return report
