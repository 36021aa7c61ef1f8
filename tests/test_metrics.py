"""Metrics on hand-made logits and texts where the answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from lmedit.data.loaders import EvalCase, EvalProbe
from lmedit.evaluate import metrics as M
from lmedit.evaluate.protocols import CaseScores, ScoringSettings, case_metrics
from lmedit.evaluate.scoring import PairScore, score_logits
from lmedit.request import EditRequest


def test_score_logits_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    lp, am = score_logits(logits, torch.tensor([0, 1]))
    z0 = math.log(math.exp(2) + 2)
    z1 = math.log(1 + math.e + math.exp(3))
    assert lp.tolist() == pytest.approx([2 - z0, 1 - z1], abs=1e-6)
    assert am.tolist() == [0, 2]


def test_teacher_forced_accuracy_from_logits():
    # answer of 3 tokens; the model's argmax gets tokens 0 and 2 right
    logits = torch.tensor([[5.0, 0, 0, 0], [0, 0, 5.0, 0], [0, 0, 0, 5.0]])
    targets = torch.tensor([0, 1, 3])
    _, am = score_logits(logits, targets)
    correct = (am == targets).tolist()
    assert M.token_accuracy(correct) == pytest.approx(2 / 3)
    assert M.accuracy_tf([correct, [True]]) == pytest.approx((2 / 3 + 1) / 2)
    assert M.accuracy_tf([]) is None


def test_locality_tf_is_agreement_with_pre_edit_argmax_not_with_gold():
    pre = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).argmax(-1).tolist()  # [0, 1]
    post = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]).argmax(-1).tolist()  # [0, 2]
    assert M.locality_tf([pre], [post]) == pytest.approx(0.5)
    assert M.locality_tf([pre, pre], [pre, post]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        M.argmax_agreement([1, 2], [1])


def test_probability_comparison_as_rome():
    # mean per-token NLLs of " new" and " true" on three prompts
    new, true = [0.5, 2.0, 1.0], [1.0, 1.0, 3.0]
    score, mag = M.efficacy(new, true)
    assert score == pytest.approx(2 / 3)  # prompts 0 and 2: NLL(new) < NLL(true)
    expected = sum(math.exp(-n) - math.exp(-t) for n, t in zip(new, true)) / 3
    assert mag == pytest.approx(expected)
    nscore, nmag = M.neighborhood(new, true)
    assert nscore == pytest.approx(1 / 3)
    assert nmag == pytest.approx(-expected)
    assert M.paraphrase([], []) == (None, None)


def test_generation_metrics():
    assert M.exact_match(" Rome, the capital", " Rome")
    assert M.exact_match("rome", "Rome")
    assert not M.exact_match(" Romeo and Juliet", " Rome")
    assert not M.exact_match(" Paris", " Rome")
    assert M.exact_match(" New  York City", "New York")
    assert M.prefix_match([5, 6, 9], [5, 6, 7, 8]) == pytest.approx(0.5)
    assert M.prefix_match([1], [5]) == 0.0
    assert M.generation_equality([" a b", "c"], ["a b ", "d"]) == pytest.approx(0.5)


def test_ngram_entropy_known_value():
    # bigrams (a,b) x2, (b,a) x1 -> H2 = h(1/3); trigrams (a,b,a), (b,a,b) -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert M.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    repetitive = "the the the the the the the the"
    varied = "the quick brown fox jumps over a lazy dog"
    assert M.ngram_entropy(repetitive) == pytest.approx(0.0)
    assert M.fluency([varied]) > M.fluency([repetitive])


def test_tfidf_consistency():
    idf = M.idf_table(["rome is in italy", "paris is in france"])
    assert M.tfidf_cosine("rome italy", "rome italy", idf) == pytest.approx(1.0)
    assert M.tfidf_cosine("rome italy", "paris france", idf) == pytest.approx(0.0)
    near = M.consistency(["Rome is the capital of Italy"], ["rome italy pasta"], idf)
    far = M.consistency(["Paris is in France"], ["rome italy pasta"], idf)
    assert near > far
    assert M.consistency(["x"], [], idf) is None


def _ps(nll: float, correct: list[bool], argmax: list[int]) -> PairScore:
    n = len(correct)
    return PairScore([-nll] * n, correct, argmax, list(range(n)))


def test_case_metrics_wires_directions_correctly():
    req = EditRequest("The Eiffel Tower is in", "Eiffel Tower", " Rome", " Paris")
    case = EvalCase(
        0,
        [req],
        reliability=[EvalProbe(req.prompt_text, " Rome", " Paris")],
        locality=[EvalProbe("The Colosseum is in", " Rome", " Paris")],
    )
    pre = CaseScores(
        answer={
            "reliability": [_ps(3.0, [False], [7])],
            "generalization": [],
            "locality": [_ps(0.1, [True, True], [0, 1])],
            "portability": [],
        },
        compare={
            "reliability": [_ps(0.2, [True], [0])],
            "generalization": [],
            "locality": [_ps(5.0, [False], [9])],
        },
    )
    post = CaseScores(
        answer={
            "reliability": [_ps(0.1, [True], [0])],
            "generalization": [],
            "locality": [_ps(0.2, [True, False], [0, 4])],
            "portability": [],
        },
        # locality probe answers " Rome" (its true answer); compare is " Paris" (the edit's new target here)
        compare={
            "reliability": [_ps(4.0, [False], [0])],
            "generalization": [],
            "locality": [_ps(0.05, [True], [0])],
        },
    )
    settings = ScoringSettings(families=("tf", "prob"))
    m = case_metrics(case, post, pre, settings)
    assert m["reliability_tf"] == 1.0
    assert m["locality_tf"] == pytest.approx(0.5)  # argmax [0, 4] vs pre [0, 1]
    assert m["efficacy_score"] == 1.0  # NLL(new)=0.1 < NLL(true)=4.0
    assert m["neighborhood_score"] == 0.0  # compare (0.05) now beats the neighbour's answer (0.2)
    assert m["generalization_tf"] is None
    m_pre = case_metrics(case, pre, pre, settings)
    assert (
        m_pre["efficacy_score"] == 0.0 and m_pre["neighborhood_score"] == 1.0 and m_pre["locality_tf"] == 1.0
    )


def test_aggregate_skips_missing():
    agg = M.aggregate([{"reliability_tf": 1.0, "portability_tf": None}, {"reliability_tf": 0.0}])
    assert agg["reliability_tf"] == 0.5 and agg["portability_tf"] is None
