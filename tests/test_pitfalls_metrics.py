"""The pitfalls metrics (Li et al., 2024) on hand-built cases whose values are worked out here."""

import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from kedit.pitfalls.metrics import (
    distortion,
    fact_probability,
    failed,
    group_means,
    ignore_rate,
    preferred,
    relative_drop,
    round_success,
    summarize,
)

probability = st.floats(min_value=0.0, max_value=1.0)
positive = st.floats(min_value=1e-3, max_value=1.0)


def test_fact_probability_averages_exp_minus_nll_over_prompts():
    # exp(-0) = 1 and exp(-ln 2) = 1/2 after two prompts, exp(-ln 4) = 1/4 after a third.
    assert fact_probability([0.0, math.log(2)]) == pytest.approx(0.75)
    assert fact_probability([0.0, math.log(2), math.log(4)]) == pytest.approx(1.75 / 3)


def test_conflict_score_counts_strict_wins_of_the_new_fact():
    assert preferred(0.3, 0.2) == 1.0
    assert preferred(0.2, 0.3) == 0.0
    assert preferred(0.25, 0.25) == 0.0  # a tie leaves the old fact standing


def test_conflict_magnitude_and_tied_fact_damage_are_relative_drops():
    # The first edit's fact fell from 0.8 to 0.2: three quarters of it is gone.
    assert relative_drop(0.8, 0.2, floor=-1.0) == pytest.approx(0.75)
    # It rose from 0.2 to 0.8: a drop of -3, which the authors' code floors at -1.
    assert relative_drop(0.2, 0.8) == pytest.approx(-3.0)
    assert relative_drop(0.2, 0.8, floor=-1.0) == -1.0
    # A tied fact the model held at 0.9 and holds at 0.6 after both edits: a third damaged.
    assert relative_drop(0.9, 0.6) == pytest.approx(1 / 3)


def test_distortion_is_the_jensen_shannon_divergence_of_the_normalised_shapes():
    # before (0.2, 0.2) -> (1/2, 1/2); after (0.6, 0) -> (1, 0); middle (3/4, 1/4).
    # KL(before || middle) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3); KL(after || middle) = ln(4/3).
    expected = (0.5 * math.log(4 / 3) + math.log(4 / 3)) / 2
    assert distortion([0.2, 0.2], [0.6, 0.0]) == pytest.approx(expected)
    assert distortion([0.1, 0.3], [0.2, 0.6]) == pytest.approx(0.0, abs=1e-12)
    assert distortion([0.5, 0.0], [0.0, 0.4]) == pytest.approx(math.log(2))


def test_ignore_rate_and_failure():
    # Of three other true objects only the first lost probability (the second kept it).
    assert ignore_rate([0.3, 0.2, 0.1], [0.1, 0.2, 0.3]) == pytest.approx(1 / 3)
    assert failed(0.5) == 0.0
    assert failed(2 / 3) == 1.0


def test_round_success_gives_half_a_point_per_edit():
    # The first edit won (0.6 > 0.3), the edit back lost (0.2 < 0.4).
    assert round_success(0.6, 0.3, 0.2, 0.4) == 0.5
    assert round_success(0.6, 0.3, 0.5, 0.4) == 1.0


def test_group_means_average_each_metric_over_the_cases_that_have_it():
    cases = [
        {"reverse": {"conflict_score": 1.0, "conflict_magnitude": 0.5}},
        {"reverse": {"conflict_score": 0.0, "conflict_magnitude": 0.1}},
        {"composite": {"tied_fact_damage": 0.3}},
    ]
    assert group_means(cases) == {
        "reverse": {"conflict_score": 0.5, "conflict_magnitude": pytest.approx(0.3)},
        "composite": {"tied_fact_damage": 0.3},
    }
    records = [{"metrics": case} for case in cases]
    assert summarize(records)["n_cases"] == 3


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: fact_probability([]), "nlls"),
        (lambda: fact_probability([0.1, -1.0]), r"nlls\[1\]"),
        (lambda: preferred(1.5, 0.2), "p_new"),
        (lambda: relative_drop(0.0, 0.3), "before"),
        (lambda: distortion([0.1, 0.2], [0.3]), "same objects"),
        (lambda: distortion([0.0, 0.0], [0.1, 0.2]), "all probabilities are 0"),
        (lambda: ignore_rate([], []), "at least one"),
        (lambda: failed(1.2), "ignore"),
    ],
)
def test_bad_inputs_are_named(call, field):
    with pytest.raises(ValueError, match=field):
        call()


@given(st.lists(st.tuples(probability, probability), min_size=1, max_size=6))
@example(pairs=[(0.0, 5e-324), (1.0, 1.0)])  # the middle of 5e-324 and 0 underflows to 0
def test_distortion_is_bounded_and_symmetric(pairs):
    before, after = [a for a, _ in pairs], [b for _, b in pairs]
    if sum(before) == 0 or sum(after) == 0:
        return
    value = distortion(before, after)
    assert -1e-12 <= value <= math.log(2) + 1e-12
    assert value == pytest.approx(distortion(after, before), abs=1e-12)


@given(st.lists(positive, min_size=1, max_size=6), st.floats(min_value=0.01, max_value=1.0))
def test_distortion_ignores_scale(values, scale):
    assert distortion(values, [v * scale for v in values]) == pytest.approx(0.0, abs=1e-9)


@given(st.lists(st.tuples(probability, probability), min_size=1, max_size=6))
def test_ignore_rate_is_a_share(pairs):
    rate = ignore_rate([a for a, _ in pairs], [b for _, b in pairs])
    assert 0.0 <= rate <= 1.0
    assert rate * len(pairs) == pytest.approx(round(rate * len(pairs)))
