"""Metrics: pure functions over scores and generations, each named with the protocol that computes it.

Teacher-forced (EasyEdit-compatible):
    ``reliability_tf`` / ``generalization_tf`` / ``portability_tf``: token accuracy (fraction of answer tokens
    that are the argmax given the prompt and the gold prefix), averaged over a case's probes.
    ``locality_tf``: fraction of locality-answer tokens whose argmax after the edit equals the argmax of the
    frozen pre-edit model.
Probability comparison (ROME/MEMIT CounterFact evaluation):
    each answer is scored by its mean per-token NLL; ``efficacy_score`` / ``paraphrase_score`` count a prompt
    when NLL(new) < NLL(true), ``neighborhood_score`` when NLL(true) < NLL(new); the ``*_magnitude`` keys are
    mean exp(-NLL(new)) - exp(-NLL(true)) (reversed for neighbours).
Generation (greedy continuation):
    ``reliability_gen`` / ``generalization_gen`` / ``portability_gen``: exact match, the continuation starts
    with the answer at a word boundary; ``*_gen_prefix``: fraction of the answer's tokens reproduced in order
    before the first mismatch; ``locality_gen``: fraction of locality prompts whose continuation is identical
    to the pre-edit model's.
Free text:
    ``fluency``: ROME's weighted bi/tri-gram entropy of generations; ``consistency``: tf-idf cosine of the
    generations to the reference texts about the new target.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

TF_KEYS = ("reliability_tf", "generalization_tf", "locality_tf", "portability_tf")
PROB_KEYS = (
    "efficacy_score",
    "efficacy_magnitude",
    "paraphrase_score",
    "paraphrase_magnitude",
    "neighborhood_score",
    "neighborhood_magnitude",
)
GEN_KEYS = (
    "reliability_gen",
    "reliability_gen_prefix",
    "generalization_gen",
    "generalization_gen_prefix",
    "portability_gen",
    "locality_gen",
)
TEXT_KEYS = ("fluency", "consistency")
ALL_KEYS = TF_KEYS + PROB_KEYS + GEN_KEYS + TEXT_KEYS


def mean(values: Iterable[float | None]) -> float | None:
    """Mean of the non-None values; None when there are none."""
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


# ------------------------------------------------------------------------------------------- teacher-forced


def token_accuracy(correct: Sequence[bool]) -> float:
    """Fraction of answer tokens predicted (argmax) given the prompt and the gold prefix."""
    if not correct:
        raise ValueError("token_accuracy of an empty answer")
    return sum(bool(c) for c in correct) / len(correct)


def accuracy_tf(probes_correct: Sequence[Sequence[bool]]) -> float | None:
    """Mean token accuracy over a case's probes (reliability_tf, generalization_tf, portability_tf)."""
    return mean(token_accuracy(c) for c in probes_correct)


def argmax_agreement(pre: Sequence[int], post: Sequence[int]) -> float:
    """Fraction of positions where the post-edit argmax token equals the pre-edit one."""
    if len(pre) != len(post) or not pre:
        raise ValueError(f"argmax_agreement needs equal, non-empty spans, got {len(pre)} and {len(post)}")
    return sum(a == b for a, b in zip(pre, post)) / len(pre)


def locality_tf(pre_argmax: Sequence[Sequence[int]], post_argmax: Sequence[Sequence[int]]) -> float | None:
    """Mean over locality probes of the pre/post argmax agreement on the answer span."""
    return mean(argmax_agreement(a, b) for a, b in zip(pre_argmax, post_argmax))


# ------------------------------------------------------------------------------------ probability comparison


def prob_comparison(
    nll_new: Sequence[float], nll_true: Sequence[float], reverse: bool = False
) -> tuple[float | None, float | None]:
    """ROME's comparison of mean per-token NLLs of the new and the true answer over some prompts.

    Returns (score, magnitude): score = fraction of prompts with NLL(new) < NLL(true) (``reverse``: NLL(true) <
    NLL(new)), magnitude = mean of exp(-NLL(new)) - exp(-NLL(true)) (``reverse``: the negation).
    """
    if len(nll_new) != len(nll_true):
        raise ValueError(f"{len(nll_new)} new vs {len(nll_true)} true scores")
    if not nll_new:
        return None, None
    sign = -1.0 if reverse else 1.0
    wins = [(t > n) if not reverse else (n > t) for n, t in zip(nll_new, nll_true)]
    diffs = [sign * (math.exp(-n) - math.exp(-t)) for n, t in zip(nll_new, nll_true)]
    return sum(wins) / len(wins), sum(diffs) / len(diffs)


def efficacy(nll_new: Sequence[float], nll_true: Sequence[float]) -> tuple[float | None, float | None]:
    """Efficacy score and magnitude on the edit prompts."""
    return prob_comparison(nll_new, nll_true)


def paraphrase(nll_new: Sequence[float], nll_true: Sequence[float]) -> tuple[float | None, float | None]:
    """Paraphrase score and magnitude."""
    return prob_comparison(nll_new, nll_true)


def neighborhood(nll_new: Sequence[float], nll_true: Sequence[float]) -> tuple[float | None, float | None]:
    """Neighbourhood score and magnitude: the true answer must stay more likely."""
    return prob_comparison(nll_new, nll_true, reverse=True)


# ---------------------------------------------------------------------------------------------- generation

_WORD = re.compile(r"\w", re.UNICODE)


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def exact_match(continuation: str, answer: str) -> bool:
    """The continuation starts with the answer (case- and whitespace-insensitive) at a word boundary."""
    c, a = _norm(continuation), _norm(answer)
    if not a or not c.startswith(a):
        return False
    rest = c[len(a) : len(a) + 1]
    return not rest or not (_WORD.match(rest) and _WORD.match(a[-1]))


def prefix_match(generated_ids: Sequence[int], answer_ids: Sequence[int]) -> float:
    """Fraction of the answer's tokens reproduced in order before the first mismatch."""
    if not answer_ids:
        raise ValueError("prefix_match of an empty answer")
    n = 0
    for g, a in zip(generated_ids, answer_ids):
        if g != a:
            break
        n += 1
    return n / len(answer_ids)


def generation_equality(pre: Sequence[str], post: Sequence[str]) -> float | None:
    """Fraction of prompts whose post-edit continuation equals the pre-edit one (after whitespace strip)."""
    if len(pre) != len(post):
        raise ValueError(f"{len(pre)} pre vs {len(post)} post generations")
    return mean(a.strip() == b.strip() for a, b in zip(pre, post)) if pre else None


# ---------------------------------------------------------------------------------------------- free text

_TOKEN = re.compile(r"\w+(?:'\w+)?|[^\w\s]", re.UNICODE)


def word_tokens(text: str) -> list[str]:
    """Word/punctuation tokens (close to NLTK's word_tokenize for English prose)."""
    return _TOKEN.findall(text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency of one text: arithmetic mean over n of weight_n * entropy (bits) of its n-gram counts."""
    toks = word_tokens(text)
    values = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(w * h)
    return sum(values) / len(values)


def fluency(texts: Sequence[str]) -> float | None:
    """Mean n-gram entropy of generated texts (ROME's ``n_gram_entropy``)."""
    return mean(ngram_entropy(t) for t in texts) if texts else None


def idf_table(documents: Sequence[str]) -> dict[str, float]:
    """Smoothed inverse document frequencies, ln((1 + N) / (1 + df)) + 1 (scikit-learn's default)."""
    df: Counter[str] = Counter()
    for doc in documents:
        df.update({w.lower() for w in word_tokens(doc)})
    n = len(documents)
    return {w: math.log((1 + n) / (1 + c)) + 1 for w, c in df.items()}


def tfidf_cosine(text_a: str, text_b: str, idf: dict[str, float]) -> float:
    """Cosine similarity of the tf-idf vectors of two texts (unknown words get the largest idf)."""
    default = max(idf.values(), default=1.0)

    def vec(text: str) -> dict[str, float]:
        tf = Counter(w.lower() for w in word_tokens(text))
        return {w: c * idf.get(w, default) for w, c in tf.items()}

    a, b = vec(text_a), vec(text_b)
    dot = sum(v * b.get(w, 0.0) for w, v in a.items())
    na = math.sqrt(sum(v * v for v in a.values()))
    nb = math.sqrt(sum(v * v for v in b.values()))
    return dot / (na * nb) if na and nb else 0.0


def consistency(generations: Sequence[str], references: Sequence[str], idf: dict[str, float]) -> float | None:
    """tf-idf cosine of all generations (joined) to all reference texts (joined); None without references."""
    if not references or not generations:
        return None
    return tfidf_cosine(" ".join(generations), " ".join(references), idf)


def aggregate(per_case: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    """Mean of every metric over the cases that have it (ROME/EasyEdit aggregate per case first)."""
    keys = [k for k in ALL_KEYS if any(k in c for c in per_case)]
    keys += sorted({k for c in per_case for k in c} - set(keys))
    return {k: mean(c.get(k) for c in per_case) for k in keys}
