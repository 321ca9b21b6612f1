"""`evaluate_unlearning`: how much of a forget set a model still knows, how much of the retain
sets it keeps, and how close it is to the model retrained without the forget set.

Every number sits under the protocol that produced it (`kedit.eval.protocols`):
- teacher_forced: KnowUnDo's scores, the mean over items of the share of answer tokens that
  are the argmax after the gold prefix: `unlearn_success` = 1 − that on the forget set,
  `retention_success` = that on a retain set;
- probability: `answer_perplexity` (exp of the mean over items of the answer's NLL per token),
  `probability` (mean of exp(−NLL per token), TOFU's Prob. on its retain set) and, for items
  with wrong answers, TOFU's `truth_ratio` (forget form on the forget set, retain form on the
  others) and `true_answer_share`; `perplexity` of the general texts;
- generation: greedy answers' `rouge_l_recall` against the answer (TOFU's ROUGE) and
  `exact_match` of their first words.
With a baseline (the model retrained without the forget set), the same for it, and TOFU's
`forget_quality`: the KS-test p-value between the two models' per-item truth-ratio statistics
on the forget set (high: indistinguishable from the retrained model).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kedit.data.unlearn_items import UnlearnItem, as_items, item_pairs
from kedit.eval.protocols import (
    GENERATION,
    PROBABILITY,
    TEACHER_FORCED,
    perplexity,
    score_generation,
    score_probability,
    score_teacher_forced,
)
from kedit.lm import LM, require_lm
from kedit.unlearn._train import check_fits
from kedit.unlearn.metrics import (
    forget_truth_ratio,
    harmonic_mean,
    ks_2samp,
    retain_truth_ratio,
    rouge_l_recall,
    true_answer_share,
    truth_ratio_statistic,
)

FORGET = "forget"
GENERATION_MARGIN = 2  # tokens generated beyond the answer's length


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def score_set(
    lm: LM,
    name: str,
    items: Sequence[UnlearnItem],
    forget: bool,
    generation: bool,
    batch_size: int,
) -> tuple[dict[str, dict[str, float]], list[float]]:
    """One set's metrics by protocol, and its items' truth-ratio statistics (items with wrong
    answers only)."""
    check_fits(lm, items, name, GENERATION_MARGIN if generation else 0)
    accuracy = _mean(s.accuracy for s in score_teacher_forced(lm, item_pairs(items), batch_size))
    candidates = [
        (item.prompt, [item.answer, item.paraphrased_answer or item.answer, *item.perturbed])
        for item in items
    ]
    nlls = score_probability(lm, candidates, batch_size)
    success = "unlearn_success" if forget else "retention_success"
    scores = {
        TEACHER_FORCED: {
            "token_accuracy": accuracy,
            success: 1 - accuracy if forget else accuracy,
        },
        PROBABILITY: {
            "answer_perplexity": math.exp(_mean(n[0] for n in nlls)),
            "probability": _mean(math.exp(-n[0]) for n in nlls),
        },
    }
    statistics = [truth_ratio_statistic(n[1], n[2:]) for n in nlls if len(n) > 2]
    if statistics:
        truth_ratio = forget_truth_ratio if forget else retain_truth_ratio
        scores[PROBABILITY]["truth_ratio"] = truth_ratio(statistics)
        scores[PROBABILITY]["true_answer_share"] = _mean(
            true_answer_share(n[0], n[2:]) for n in nlls if len(n) > 2
        )
    if generation:
        generated = score_generation(lm, item_pairs(items), batch_size, GENERATION_MARGIN)
        scores[GENERATION] = {
            "rouge_l_recall": _mean(
                rouge_l_recall(g.text, item.answer)
                for g, item in zip(generated, items, strict=True)
            ),
            "exact_match": _mean(float(g.match) for g in generated),
        }
    return scores, statistics


def _utility_parts(scores: dict[str, dict[str, float]]) -> list[float]:
    """A retain set's part of TOFU's model utility: its probability score (the true answer's
    share where there are wrong answers), truth ratio and ROUGE-L, where measured."""
    probability = scores[PROBABILITY]
    parts = [probability.get("true_answer_share", probability["probability"])]
    if "truth_ratio" in probability:
        parts.append(probability["truth_ratio"])
    if GENERATION in scores:
        parts.append(scores[GENERATION]["rouge_l_recall"])
    return parts


def _evaluate_model(
    lm: LM,
    forget: dict[str, list[UnlearnItem]],
    retain: dict[str, list[UnlearnItem]],
    general: list[str] | None,
    generation: bool,
    batch_size: int,
) -> dict[str, Any]:
    result: dict[str, Any] = {"model": lm.name, "sets": {}}
    utility: list[float] = []
    for name, items in [*forget.items(), *retain.items()]:
        is_forget = name in forget
        scores, statistics = score_set(lm, name, items, is_forget, generation, batch_size)
        result["sets"][name] = {"items": len(items), "kind": FORGET if is_forget else "retain"}
        result["sets"][name].update(scores)
        if is_forget and statistics and "truth_ratio_statistics" not in result:
            result["truth_ratio_statistics"] = statistics  # the first forget set's, for the KS test
        if not is_forget:
            utility += _utility_parts(scores)
    if utility:
        result["model_utility"] = harmonic_mean(utility)
    if general:
        result["general"] = {PROBABILITY: {"perplexity": perplexity(lm, general, batch_size)}}
    return result


def _named_sets(value: Any, field: str) -> dict[str, list[UnlearnItem]]:
    """A list of items as {field: items}, or a mapping of names to lists of items."""
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(f"{field}: expected at least one named set, got an empty mapping")
        return {str(name): as_items(items, f"{field}[{name!r}]") for name, items in value.items()}
    return {field: as_items(value, field)}


def evaluate_unlearning(
    lm: LM,
    forget: Iterable[Any] | Mapping[str, Iterable[Any]],
    retain: Iterable[Any] | Mapping[str, Iterable[Any]] | None = None,
    *,
    baseline: LM | dict[str, Any] | Sequence[LM | dict[str, Any]] | None = None,
    general: Sequence[str] | None = None,
    generation: bool = True,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Score `lm` on the forget and retain sets, each a list of items or a mapping of names to
    lists (e.g. the forget prompts and their paraphrases; the same subjects' public facts and
    other subjects' facts, scored separately), the perplexity of the `general` texts, and TOFU's
    model utility (harmonic mean of the retain sets' probability, truth ratio and ROUGE-L).

    `baseline` is the model retrained without the forget set, or the result of this function on
    it (to score many methods against one baseline). With it: each set's token-accuracy gap
    (lm − baseline) and, where the first forget set's items have wrong answers, TOFU's
    `forget_quality` (KS-test p-value of the two models' truth-ratio statistics on it).

    A list of baselines (retrains with other seeds, or made on other machines: a retrain's own
    numerics move forget quality, docs/unlearning.md) scores against each: `vs_baselines`, one
    comparison per baseline in order, and `forget_quality_range` (lowest, highest); `baseline`
    and `vs_baseline` stay those of the first. A list of one is that one baseline.
    """
    require_lm(lm)
    forget_sets = _named_sets(forget, FORGET)
    retain_sets = {} if retain is None else _named_sets(retain, "retain")
    clash = forget_sets.keys() & retain_sets.keys()
    if clash:
        raise ValueError(f"retain: set names {sorted(clash)} are forget sets' names too")
    texts = None if general is None else [t for t in general if t.strip()]
    if general is not None and not texts:
        raise ValueError("general: expected at least one non-empty text")
    result = _evaluate_model(lm, forget_sets, retain_sets, texts, generation, batch_size)
    if baseline is None:
        return result
    several = isinstance(baseline, Sequence)
    if several and not baseline:
        raise ValueError("baseline: expected a retrained model or a list of them, got []")
    baselines = [
        _evaluate_model(b, forget_sets, retain_sets, texts, generation, batch_size)
        if isinstance(b, LM)
        else b
        for b in (baseline if several else [baseline])
    ]
    return compare_with_baseline(result, baselines)


def compare_with_baseline(result: dict[str, Any], baseline: Any) -> dict[str, Any]:
    """`result` (of `evaluate_unlearning`) with the baseline's result on the same sets added,
    each set's token-accuracy gap (model − baseline) and, where both have truth-ratio
    statistics, TOFU's forget quality (KS-test p-value) and the KS statistic. A list of two or
    more baseline results gives `vs_baselines` and `forget_quality_range` too (see
    `evaluate_unlearning`)."""
    baselines = baseline if isinstance(baseline, list) else [baseline]
    comparisons = [_versus(result, each) for each in baselines]
    result["baseline"], result["vs_baseline"] = baselines[0], comparisons[0]
    if len(baselines) > 1:
        result["baselines"], result["vs_baselines"] = baselines, comparisons
        qualities = [c["forget_quality"] for c in comparisons if "forget_quality" in c]
        if qualities:
            result["forget_quality_range"] = [min(qualities), max(qualities)]
    return result


def _versus(result: dict[str, Any], baseline: Any) -> dict[str, Any]:
    """Each set's token-accuracy gap (model − baseline) and, where both have truth-ratio
    statistics, the forget quality and KS statistic."""
    if not isinstance(baseline, dict) or set(result["sets"]) - set(baseline.get("sets", {})):
        raise ValueError(
            "baseline: expected the retrained LM, or evaluate_unlearning's result on it for the "
            f"same sets ({sorted(result['sets'])})"
        )
    gaps = {
        name: scores[TEACHER_FORCED]["token_accuracy"]
        - baseline["sets"][name][TEACHER_FORCED]["token_accuracy"]
        for name, scores in result["sets"].items()
    }
    versus: dict[str, Any] = {"token_accuracy_gap": gaps}
    ours, theirs = result.get("truth_ratio_statistics"), baseline.get("truth_ratio_statistics")
    if ours and theirs:
        statistic, pvalue = ks_2samp(ours, theirs)
        versus.update(forget_quality=pvalue, ks_statistic=statistic)
    return versus
