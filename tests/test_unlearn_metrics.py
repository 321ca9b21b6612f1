"""Unlearning metrics against golden values computed by hand, and the KS test against the
permutation distribution enumerated here."""

from __future__ import annotations

import math
from itertools import combinations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kedit.unlearn.metrics import (
    _asymptotic_ks_pvalue,
    _exact_ks_pvalue,
    forget_truth_ratio,
    harmonic_mean,
    ks_2samp,
    retain_truth_ratio,
    rouge_l_recall,
    true_answer_share,
    truth_ratio_statistic,
)


def _ecdf_gap(first: list[float], second: list[float]) -> float:
    points = sorted(set(first) | set(second))
    return max(
        abs(sum(x <= p for x in first) / len(first) - sum(y <= p for y in second) / len(second))
        for p in points
    )


def _permutation_pvalue(first: list[float], second: list[float]) -> float:
    """The exact null distribution of D for distinct values: every way of drawing len(first)
    of the pooled values is equally likely; the share with a gap at least the observed one."""
    pooled, m = sorted(first + second), len(first)
    observed = _ecdf_gap(first, second)
    draws = list(combinations(range(len(pooled)), m))
    hits = 0
    for chosen in draws:
        a = [pooled[i] for i in chosen]
        b = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        hits += _ecdf_gap(a, b) >= observed - 1e-12
    return hits / len(draws)


def test_ks_golden_values():
    # All of one sample below the other: D = 1, and only 2 of the C(6, 3) = 20 orderings do so.
    assert ks_2samp([1, 2, 3], [4, 5, 6]) == pytest.approx((1.0, 2 / 20))
    assert ks_2samp([1, 2, 3], [1, 2, 3]) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ([0.1, 0.5, 0.9, 1.3], [0.2, 0.3, 1.1]),
        ([1.0, 2.0, 3.0, 4.0, 5.0], [1.5, 2.5, 3.5]),
        ([0.3, 0.7, 1.9, 2.2, 4.0], [0.1, 0.2, 2.0, 5.0, 6.0, 7.0]),
        ([5.0, 6.0], [1.0, 2.0, 3.0, 4.0, 7.0]),
    ],
)
def test_ks_matches_the_enumerated_permutation_distribution(first, second):
    statistic, pvalue = ks_2samp(first, second)
    assert statistic == pytest.approx(_ecdf_gap(first, second))
    assert pvalue == pytest.approx(_permutation_pvalue(first, second))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 30), min_size=1, max_size=6),
    st.lists(st.integers(0, 30), min_size=1, max_size=6),
)
def test_ks_statistic_is_the_largest_ecdf_gap(first, second):
    statistic, pvalue = ks_2samp(first, second)
    assert statistic == pytest.approx(_ecdf_gap(first, second))
    assert 0 <= pvalue <= 1
    assert ks_2samp(second, first) == pytest.approx((statistic, pvalue))


def test_ks_asymptotic_p_value_approaches_the_exact_one():
    m = n = 150
    for gap in (15 * n, 25 * n):  # D = 0.1 and 1/6
        exact = _exact_ks_pvalue(m, n, gap)
        assert _asymptotic_ks_pvalue(gap / (m * n), m, n) == pytest.approx(exact, abs=0.02)


def test_truth_ratio_and_tofu_scores_by_hand():
    # R = exp(mean perturbed NLL − paraphrased NLL) = exp((2 + 3) / 2 − 1).
    assert truth_ratio_statistic(1.0, [2.0, 3.0]) == pytest.approx(math.exp(1.5))
    assert forget_truth_ratio([math.e, 1 / math.e]) == pytest.approx(1 / math.e)
    assert retain_truth_ratio([2.0, 0.5]) == pytest.approx((0.5 + 0.0) / 2)
    # p(true) = 1/2, p(wrong) = 1/4 and 1/4: the true answer's share is 1/2.
    assert true_answer_share(math.log(2), [math.log(4), math.log(4)]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="perturbed_nlls"):
        truth_ratio_statistic(1.0, [])


def test_rouge_l_recall_by_hand():
    # LCS of the words: "the cat on mat" (4) of the reference's 5 words.
    assert rouge_l_recall("the cat sat on the mat", "the cat on a mat") == pytest.approx(0.8)
    assert rouge_l_recall("The CAT, sat.", "the cat sat") == 1.0
    assert rouge_l_recall("", "Lisbon") == 0.0
    assert rouge_l_recall(" Lisbon Lisbon", " Lisbon") == 1.0


def test_harmonic_mean_by_hand():
    assert harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert harmonic_mean([0.9, 0.0, 0.8]) == 0.0
    with pytest.raises(ValueError, match="values"):
        harmonic_mean([])
