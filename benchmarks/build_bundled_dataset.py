"""Build lmedit's bundled CounterFact-style dataset from the hand-written candidates.

Keeps only the facts the default model (Gemma 3 270M) gets right before any edit:

* a case is kept when the teacher-forced token accuracy of ``target_true`` after the edit prompt is 1.0
  (every target token is the argmax given the prefix, i.e. greedy decoding produces it);
* its neighbourhood prompts answered wrongly (accuracy < 1.0 on ``target_true``) are dropped when at least 3
  correct ones remain; otherwise the whole case is dropped.

Kept cases are interleaved round-robin over relations (candidate order within a relation) so that the first
``n`` cases cover every relation, and renumbered ``0..N-1``. Each kept case records its check under ``"check"``.

    .venv/bin/python benchmarks/build_bundled_dataset.py                      # writes the bundled file
    .venv/bin/python benchmarks/build_bundled_dataset.py --compare smollm2-135m   # + how many SmolLM2 knows
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = ROOT / "benchmarks" / "data" / "bundled_candidates.json"
OUT = ROOT / "src" / "lmedit" / "data" / "bundled" / "counterfact_bundled.json"
MIN_NEIGHBOURS = 3


def load_candidates(path: Path) -> list[dict[str, Any]]:
    """Read the candidate list (ROME CounterFact format + ``portability``)."""
    cases = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(cases, list):
        raise ValueError(f"{path}: expected a JSON list of cases, got {type(cases).__name__}")
    return cases


def edit_prompt(case: dict[str, Any]) -> str:
    """The edit prompt with the subject filled in."""
    rw = case["requested_rewrite"]
    return rw["prompt"].replace("{}", rw["subject"])


def true_answer_pairs(cases: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """Every distinct (prompt, target_true) pair the check needs: edit prompts, paraphrases, neighbours."""
    pairs: dict[tuple[str, str], None] = {}
    for case in cases:
        true = case["requested_rewrite"]["target_true"]["str"]
        for prompt in [edit_prompt(case), *case["paraphrase_prompts"], *case["neighborhood_prompts"]]:
            pairs[(prompt, true)] = None
    return list(pairs)


def knows(loaded, pairs: Sequence[tuple[str, str]], batch_size: int) -> dict[tuple[str, str], bool]:
    """Whether the model's teacher-forced token accuracy on each pair is 1.0 (batched)."""
    from lmedit.evaluate.scoring import score_pairs

    scores = score_pairs(loaded, [p for p, _ in pairs], [t for _, t in pairs], batch_size=batch_size)
    return {pair: s.accuracy == 1.0 for pair, s in zip(pairs, scores)}


def select(
    cases: Sequence[dict[str, Any]], known: dict[tuple[str, str], bool], model_name: str
) -> tuple[list[dict[str, Any]], Counter]:
    """Apply the check; returns kept cases (with a ``check`` record) and counts of why others were dropped."""
    kept: list[dict[str, Any]] = []
    dropped: Counter = Counter()
    for case in cases:
        true = case["requested_rewrite"]["target_true"]["str"]
        if not known[(edit_prompt(case), true)]:
            dropped["edit prompt wrong"] += 1
            continue
        neighbours = case["neighborhood_prompts"]
        right = [p for p in neighbours if known[(p, true)]]
        if len(right) < MIN_NEIGHBOURS:
            dropped[f"fewer than {MIN_NEIGHBOURS} neighbours right"] += 1
            continue
        out = json.loads(json.dumps(case))  # deep copy
        out["neighborhood_prompts"] = right
        out["check"] = {
            "model": model_name,
            "edit_prompt_correct": True,
            "paraphrases_correct": sum(known[(p, true)] for p in case["paraphrase_prompts"]),
            "neighborhood_correct": len(right),
            "neighborhood_candidates": len(neighbours),
        }
        kept.append(out)
    return kept, dropped


def interleave(cases: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Round-robin over relations (first-appearance order), candidate order within each; renumbered."""
    by_rel: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for case in cases:
        by_rel[case["requested_rewrite"]["relation_id"]].append(case)
    queues = list(by_rel.values())
    out: list[dict[str, Any]] = []
    depth = 0
    while len(out) < len(cases):
        out.extend(q[depth] for q in queues if depth < len(q))
        depth += 1
    return [{**c, "case_id": i} for i, c in enumerate(out)]


def per_relation(cases: Sequence[dict[str, Any]]) -> dict[str, int]:
    counts = Counter(c["requested_rewrite"]["relation_id"] for c in cases)
    return dict(counts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--candidates", type=Path, default=CANDIDATES)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--model", default="gemma3-270m", help="model whose knowledge filters the cases")
    parser.add_argument(
        "--compare",
        default=None,
        help="second model: report how many kept cases it also knows (no filtering)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    import lmedit

    candidates = load_candidates(args.candidates)
    pairs = true_answer_pairs(candidates)
    t0 = time.perf_counter()
    loaded = lmedit.load_model(args.model)
    known = knows(loaded, pairs, args.batch_size)
    seconds = time.perf_counter() - t0
    del loaded
    kept, dropped = select(candidates, known, args.model)
    kept = interleave(kept)

    figures: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "model": args.model,
        "candidates": len(candidates),
        "kept": len(kept),
        "dropped": dict(dropped),
        "pairs_scored": len(pairs),
        "check_seconds": round(seconds, 1),
        "candidates_per_relation": per_relation(candidates),
        "kept_per_relation": per_relation(kept),
        "kept_neighbourhood_prompts": sum(len(c["neighborhood_prompts"]) for c in kept),
        "kept_paraphrases_correct": sum(c["check"]["paraphrases_correct"] for c in kept),
        "kept_paraphrases": sum(len(c["paraphrase_prompts"]) for c in kept),
    }

    if args.compare:
        other = lmedit.load_model(args.compare)
        kept_pairs = true_answer_pairs(kept)
        other_known = knows(other, kept_pairs, args.batch_size)
        also = [
            c for c in kept if other_known[(edit_prompt(c), c["requested_rewrite"]["target_true"]["str"])]
        ]
        figures["compare"] = {
            "model": args.compare,
            "edit_prompt_correct": len(also),
            "edit_prompt_correct_per_relation": per_relation(also),
            "neighbourhood_correct": sum(
                other_known[(p, c["requested_rewrite"]["target_true"]["str"])]
                for c in kept
                for p in c["neighborhood_prompts"]
            ),
            "neighbourhood_total": figures["kept_neighbourhood_prompts"],
        }

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(kept, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(figures, indent=1, ensure_ascii=False))
    print(f"wrote {len(kept)} cases to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
