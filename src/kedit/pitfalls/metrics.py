"""The metrics of "Unveiling the Pitfalls of Knowledge Editing" (Li et al., 2024), as pure
functions of answer probabilities.

The probability of a fact is `fact_probability`: exp(-mean token NLL) of its object after each
of its prompts (the edit prompt and its paraphrases), averaged over the prompts. θ is the
unedited model, θ' the model after the first edit, θ'' after both.

Knowledge conflict (ConflictEdit), per case; a benchmark reports the means over cases:
- Conflict Score, CS = 1[p_θ''(k_new) > p_θ''(k_old)]: the fact the second edit implies beats
  the one the first edit wrote (`preferred`);
- Conflict Magnitude, CM = (p_θ'(k_old) - p_θ''(k_old)) / p_θ'(k_old), floored at -1 as the
  authors' code does (`relative_drop`);
- Tied Fact Damage, TFD = (p_θ(k_tied) - p_θ''(k_tied)) / p_θ(k_tied) (`relative_drop`);
- Success (coverage): 1[the second edit's object beats the first's, on the model edited with
  the second edit alone] (`preferred`).

Knowledge distortion (RoundEdit: o -> o* -> o), per case:
- Success = (1[p_θ'(o*) > p_θ'(o)] + 1[p_θ''(o) > p_θ''(o*)]) / 2 (`round_success`);
- Distortion, D = JS divergence of the normalised probabilities of (o, the other true objects)
  under θ and θ'' (`distortion`);
- Ignore Rate, IR = the fraction of the other true objects whose probability fell
  (`ignore_rate`); Failure Rate = the fraction of cases with IR > 0.5 (`failed`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def _probabilities(values: Sequence[float], name: str) -> list[float]:
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"{name}: expected at least one probability, got none")
    for index, value in enumerate(values):
        if not 0 <= value <= 1:
            raise ValueError(f"{name}[{index}]: expected a probability in [0, 1], got {value!r}")
    return values


def fact_probability(nlls: Sequence[float]) -> float:
    """The probability of a fact from the mean token NLL of its object after each of its
    prompts: the mean over prompts of exp(-NLL)."""
    if not nlls:
        raise ValueError("nlls: expected the NLL of at least one prompt, got none")
    for index, nll in enumerate(nlls):
        if not nll >= 0:
            raise ValueError(f"nlls[{index}]: expected a mean NLL >= 0, got {nll!r}")
    return sum(math.exp(-nll) for nll in nlls) / len(nlls)


def preferred(p_new: float, p_old: float) -> float:
    """1.0 if the new fact is the more probable, else 0.0 (Conflict Score, coverage Success)."""
    _probabilities([p_new, p_old], "p_new, p_old")
    return 1.0 if p_new > p_old else 0.0


def relative_drop(before: float, after: float, floor: float | None = None) -> float:
    """(before - after) / before, at least `floor` when given (Conflict Magnitude with floor
    -1, Tied Fact Damage without)."""
    _probabilities([before, after], "before, after")
    if before == 0:
        raise ValueError("before: the probability before is 0, so a relative drop is undefined")
    drop = (before - after) / before
    return drop if floor is None else max(drop, floor)


def _paired(before: Sequence[float], after: Sequence[float]) -> tuple[list[float], list[float]]:
    """The probabilities of the same objects before and after, checked."""
    if len(before) != len(after):
        raise ValueError(
            f"before, after: expected the probabilities of the same objects, got {len(before)}"
            f" and {len(after)} values"
        )
    return _probabilities(before, "before"), _probabilities(after, "after")


def _normalised(values: list[float], name: str) -> list[float]:
    total = sum(values)
    if total == 0:
        raise ValueError(f"{name}: all probabilities are 0; they cannot be normalised")
    return [v / total for v in values]


def _kl_to_middle(p: Sequence[float], q: Sequence[float]) -> float:
    """KL(p ‖ (p + q) / 2), each term's ratio a / m written as 2a / (a + b): the middle of a
    subnormal probability and 0 underflows to 0, the ratio does not."""
    return sum(a * math.log(2 * a / (a + b)) for a, b in zip(p, q, strict=True) if a > 0)


def distortion(before: Sequence[float], after: Sequence[float]) -> float:
    """Jensen-Shannon divergence (nats) between the normalised probabilities `before` and
    `after` of the same objects: 0 when the shape is unchanged, at most log 2."""
    before, after = _paired(before, after)
    p, q = _normalised(before, "before"), _normalised(after, "after")
    return (_kl_to_middle(p, q) + _kl_to_middle(q, p)) / 2


def ignore_rate(before: Sequence[float], after: Sequence[float]) -> float:
    """The fraction of objects whose probability fell from `before` to `after`."""
    before, after = _paired(before, after)
    return sum(b > a for b, a in zip(before, after, strict=True)) / len(before)


def failed(ignore: float) -> float:
    """1.0 if more than half of the other true objects were ignored (IR > 0.5), else 0.0."""
    if not 0 <= ignore <= 1:
        raise ValueError(f"ignore: expected an ignore rate in [0, 1], got {ignore!r}")
    return 1.0 if ignore > 0.5 else 0.0


def round_success(
    first_new: float, first_old: float, second_new: float, second_old: float
) -> float:
    """Half a point for each edit of the round trip whose target beats the object it replaced
    on the model it produced: p_θ'(o*) > p_θ'(o), then p_θ''(o) > p_θ''(o*)."""
    return (preferred(first_new, first_old) + preferred(second_new, second_old)) / 2


def group_means(cases: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """The mean of each (group, metric) over the cases that have it: cases are
    {group: {metric: value}} (a ConflictEdit case's kind, a RoundEdit case's variant)."""
    values: dict[str, dict[str, list[float]]] = {}
    for case in cases:
        for group, metrics in case.items():
            for metric, value in metrics.items():
                values.setdefault(group, {}).setdefault(metric, []).append(value)
    return {
        group: {metric: sum(v) / len(v) for metric, v in metrics.items()}
        for group, metrics in values.items()
    }


def summarize(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A pitfalls run's metrics: the number of cases and `group_means` of their "metrics"."""
    return {"n_cases": len(cases), "pitfalls": group_means([case["metrics"] for case in cases])}
