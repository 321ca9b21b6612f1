"""Pure unlearning metrics: KnowUnDo's success rates, TOFU's truth ratio, probability, ROUGE-L
recall, model utility and forget quality (a two-sample Kolmogorov-Smirnov test against the
model retrained without the forget set)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

WORD = re.compile(r"[a-z0-9]+")
EXACT_KS_MAX_CELLS = 1_000_000  # m·n up to which the KS p-value is exact (lattice paths)


def truth_ratio_statistic(paraphrased_nll: float, perturbed_nlls: Sequence[float]) -> float:
    """TOFU's per-item statistic R = exp(mean perturbed NLL − paraphrased NLL), NLLs per token:
    the paraphrased (true) answer's length-normalised probability over the perturbed (wrong)
    ones' geometric mean. Above 1 where the model prefers the truth."""
    if not perturbed_nlls:
        raise ValueError("perturbed_nlls: expected at least one perturbed answer's NLL")
    return math.exp(sum(perturbed_nlls) / len(perturbed_nlls) - paraphrased_nll)


def forget_truth_ratio(statistics: Sequence[float]) -> float:
    """TOFU's truth ratio on a forget set: mean of min(R, 1/R), 1 where true and wrong answers
    are equally likely (nothing known), lower where either is preferred."""
    return _mean([min(r, 1 / r) for r in statistics], "statistics")


def retain_truth_ratio(statistics: Sequence[float]) -> float:
    """TOFU's truth ratio on retained data: mean of max(0, 1 − 1/R), higher where the truth is
    preferred."""
    return _mean([max(0.0, 1 - 1 / r) for r in statistics], "statistics")


def true_answer_share(true_nll: float, perturbed_nlls: Sequence[float]) -> float:
    """TOFU's probability score with wrong answers: p(true) / (p(true) + Σ p(wrong)), each
    p = exp(−NLL per token)."""
    true = math.exp(-true_nll)
    return true / (true + sum(math.exp(-nll) for nll in perturbed_nlls))


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall: the longest common subsequence of the two texts' words over the
    reference's word count (lower-cased words of letters and digits, as rouge-score splits them;
    without its optional stemming)."""
    predicted, wanted = WORD.findall(prediction.lower()), WORD.findall(reference.lower())
    if not wanted:
        raise ValueError(f"reference: {reference!r} has no words")
    previous = [0] * (len(wanted) + 1)
    for word in predicted:
        current = [0]
        for index, other in enumerate(wanted):
            if word == other:
                current.append(previous[index] + 1)
            else:
                current.append(max(previous[index + 1], current[index]))
        previous = current
    return previous[-1] / len(wanted)


def harmonic_mean(values: Sequence[float]) -> float:
    """The harmonic mean (0 where any value is 0), as TOFU's model utility combines scores."""
    if not values:
        raise ValueError("values: expected at least one value")
    if any(v < 0 for v in values):
        raise ValueError(f"values: expected numbers >= 0, got {list(values)}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def ks_2samp(first: Sequence[float], second: Sequence[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test, two-sided: the statistic D (largest gap between the
    samples' empirical CDFs) and its p-value, exact for m·n up to EXACT_KS_MAX_CELLS (the share
    of the C(m+n, m) equally likely orderings with a gap of at least D, as scipy's exact mode),
    asymptotic (Kolmogorov's distribution) above. TOFU's forget quality is this p-value."""
    m, n = len(first), len(second)
    if not m or not n:
        raise ValueError(f"first, second: expected two non-empty samples, got {m} and {n} values")
    a, b = sorted(first), sorted(second)
    # D·m·n as an integer: the largest |i·n − j·m| after each distinct value.
    i = j = gap = 0
    for value in sorted(set(a) | set(b)):
        while i < m and a[i] <= value:
            i += 1
        while j < n and b[j] <= value:
            j += 1
        gap = max(gap, abs(i * n - j * m))
    statistic = gap / (m * n)
    if m * n <= EXACT_KS_MAX_CELLS:
        return statistic, _exact_ks_pvalue(m, n, gap)
    return statistic, _asymptotic_ks_pvalue(statistic, m, n)


def _exact_ks_pvalue(m: int, n: int, gap: int) -> float:
    """1 − (lattice paths from (0,0) to (m,n) with every |i·n − j·m| < gap) / C(m+n, m)."""
    if gap == 0:
        return 1.0
    inside = [1 if j * m < gap else 0 for j in range(n + 1)]
    for j in range(1, n + 1):
        inside[j] = inside[j - 1] if inside[j] else 0
    for i in range(1, m + 1):
        row = [0] * (n + 1)
        for j in range(n + 1):
            if abs(i * n - j * m) < gap:
                row[j] = inside[j] + (row[j - 1] if j else 0)
        inside = row
    return min(1.0, max(0.0, 1 - inside[n] / math.comb(m + n, m)))


def _asymptotic_ks_pvalue(statistic: float, m: int, n: int) -> float:
    """P(K > √(mn/(m+n))·D) under Kolmogorov's limiting distribution."""
    x = math.sqrt(m * n / (m + n)) * statistic
    if x < 0.2:
        return 1.0
    total = sum((-1) ** (k - 1) * math.exp(-2 * k * k * x * x) for k in range(1, 101))
    return min(1.0, max(0.0, 2 * total))


def _mean(values: Sequence[float], name: str) -> float:
    if not values:
        raise ValueError(f"{name}: expected at least one value")
    return sum(values) / len(values)
