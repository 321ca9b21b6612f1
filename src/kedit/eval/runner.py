"""Evaluate edits: every metric before ("pre") and after ("post") the edit, under the named
protocols, with all requests' probes scored together in batches.

Metrics per protocol (a metric whose probes are absent is left out):

- `teacher_forced` (EasyEdit): reliability, generalization and portability are token
  accuracies; locality (post only) is the agreement of post-edit argmax tokens with pre-edit
  ones on each locality prompt + answer.
- `probability` (ROME/MEMIT CounterFact): reliability and generalization are the efficacy and
  paraphrase scores, the fraction of prompts where target_new is more likely than
  target_true (only with target_true); locality is the neighborhood score, the fraction of
  locality probes whose answer is more likely than target_new; `*_nll` are the mean
  per-token NLLs of target_new (reliability, generalization) and of the portability answers.
- `generation`: reliability, generalization and portability are exact matches of greedy
  continuations; locality (post only) is the fraction of locality prompts whose continuation
  is unchanged over the answer's length in words.
- `sampling` (with `fluency=True`): ROME's n-gram entropy of sampled continuations of the
  request's `extra["generation_prompts"]`, or of its prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from statistics import mean
from typing import Any

from kedit.edits import Edit
from kedit.eval.metrics import (
    exact_match,
    fluency_entropy,
    leading_words,
    locality_agreement,
    more_likely,
)
from kedit.eval.protocols import (
    GENERATION,
    PROBABILITY,
    SAMPLING,
    TEACHER_FORCED,
    check_batch_size,
    check_protocol,
    sample_continuations,
    score_generation,
    score_probability,
    score_teacher_forced,
)
from kedit.lm import LM
from kedit.requests import EditRequest, as_requests

__all__ = ["evaluate", "summarize"]

PROBES = ("reliability", "generalization", "locality", "portability")
STAGES = ("pre", "post")
Raw = dict[str, list[dict[str, list[Any]]]]


def _pairs(request: EditRequest) -> dict[str, list[tuple[str, str]]]:
    """Each probe set of a request as (prompt, expected answer) pairs."""
    return {
        "reliability": [(request.text, request.target_new)],
        "generalization": [(prompt, request.target_new) for prompt in request.rephrase],
        "locality": [(p.prompt, p.answer) for p in request.locality],
        "portability": [(p.prompt, p.answer) for p in request.portability],
    }


def _candidates(request: EditRequest) -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    """Each probe set as (prompt, answers to compare), the expected answer first."""
    new = request.target_new
    contrast = () if request.target_true is None else (request.target_true,)
    return {
        "reliability": [(request.text, (new, *contrast))],
        "generalization": [(prompt, (new, *contrast)) for prompt in request.rephrase],
        "locality": [(p.prompt, (p.answer, new)) for p in request.locality],
        "portability": [(p.prompt, (p.answer,)) for p in request.portability],
    }


def _fluency_prompts(request: EditRequest) -> list[str]:
    return list(request.extra.get("generation_prompts") or [request.text])


def _mean(values: Iterable[float | bool]) -> float:
    return float(mean(values))


SCORERS = {
    TEACHER_FORCED: (_pairs, score_teacher_forced),
    PROBABILITY: (_candidates, score_probability),
    GENERATION: (_pairs, score_generation),
}


def _score_all(
    per_request: list[dict[str, list[Any]]], score: Callable[[list[Any]], list[Any]]
) -> list[dict[str, list[Any]]]:
    """Score every request's items in one call and hand the scores back per request and set."""
    flat = [item for groups in per_request for items in groups.values() for item in items]
    scores = iter(score(flat))
    return [
        {name: [next(scores) for _ in items] for name, items in groups.items()}
        for groups in per_request
    ]


def _measure(
    lm: LM,
    requests: list[EditRequest],
    protocols: list[str],
    batch_size: int,
    with_fluency: bool,
    seed: int,
) -> Raw:
    """Raw per-probe scores of the model as it is now, per protocol, per request."""
    raw: Raw = {}
    for protocol in protocols:
        probes, scorer = SCORERS[protocol]
        raw[protocol] = _score_all(
            [probes(r) for r in requests], partial(scorer, lm, batch_size=batch_size)
        )
    if with_fluency:
        # Per request, so that a request's samples do not depend on the other requests.
        raw[SAMPLING] = [
            {"fluency": sample_continuations(lm, _fluency_prompts(r), seed=seed)} for r in requests
        ]
    return raw


def _teacher_forced(
    request: EditRequest, scores: dict[str, list], pre: dict[str, list] | None
) -> dict[str, float]:
    out = {}
    for name in PROBES:
        if not scores[name]:
            continue
        if name != "locality":
            out[name] = _mean(s.accuracy for s in scores[name])
        elif pre is not None:
            out[name] = _mean(
                locality_agreement(post.predicted, before.predicted)
                for post, before in zip(scores[name], pre[name], strict=True)
            )
    return out


def _probability(
    request: EditRequest, scores: dict[str, list], pre: dict[str, list] | None
) -> dict[str, float]:
    out = {}
    for name in ("reliability", "generalization"):
        if scores[name] and request.target_true is not None:
            out[name] = _mean(more_likely(new, than=true) for new, true in scores[name])
    if scores["locality"]:
        out["locality"] = _mean(more_likely(answer, than=new) for answer, new in scores["locality"])
    for name in ("reliability", "generalization", "portability"):
        if scores[name]:
            out[f"{name}_nll"] = _mean(nlls[0] for nlls in scores[name])
    return out


def _generation(
    request: EditRequest, scores: dict[str, list], pre: dict[str, list] | None
) -> dict[str, float]:
    out = {}
    for name in PROBES:
        if not scores[name]:
            continue
        if name != "locality":
            out[name] = _mean(s.match for s in scores[name])
        elif pre is not None:
            words = [len(probe.answer.split()) for probe in request.locality]
            out[name] = _mean(
                exact_match(leading_words(post.text, n), leading_words(before.text, n))
                for post, before, n in zip(scores[name], pre[name], words, strict=True)
            )
    return out


def _fluency(
    request: EditRequest, scores: dict[str, list], pre: dict[str, list] | None
) -> dict[str, float]:
    prompts = _fluency_prompts(request)
    texts = [p + c for p, c in zip(prompts, scores["fluency"], strict=True)]
    return {"fluency": fluency_entropy(texts)}


METRICS = {
    TEACHER_FORCED: _teacher_forced,
    PROBABILITY: _probability,
    GENERATION: _generation,
    SAMPLING: _fluency,
}


def _stage(request: EditRequest, index: int, raw: Raw, pre: Raw | None) -> dict[str, Any]:
    """One request's metrics at one stage; `pre` is the unedited model's raw scores."""
    return {
        protocol: METRICS[protocol](
            request, scores[index], None if pre is None else pre[protocol][index]
        )
        for protocol, scores in raw.items()
    }


@contextmanager
def _edit_state(edit: Edit, applied: bool) -> Iterator[None]:
    """Run the block with the edit applied (or undone), then restore the edit's state."""
    before = edit.applied
    _set_applied(edit, applied)
    try:
        yield
    finally:
        _set_applied(edit, before)


def _set_applied(edit: Edit, applied: bool) -> None:
    if applied and not edit.applied:
        edit.apply()
    elif not applied and edit.applied:
        edit.undo()


def _check_protocols(protocols: str | Iterable[str]) -> list[str]:
    names = [protocols] if isinstance(protocols, str) else list(protocols)
    if not names:
        raise ValueError("protocols: expected at least one protocol name, got none")
    return list(dict.fromkeys(check_protocol(name) for name in names))


def evaluate(
    lm: LM,
    requests: EditRequest | Iterable[EditRequest],
    edit: Edit | None = None,
    protocols: str | Sequence[str] = (TEACHER_FORCED,),
    batch_size: int = 64,
    fluency: bool = False,
    seed: int = 0,
) -> dict[str, Any] | list[dict[str, Any]]:
    """Pre- and post-edit metrics of each request, every number under its protocol.

    With an `edit`, "post" is measured with it applied and "pre" with it undone (both
    bit-exact); the edit is left applied or not as it was found. Without one, only "pre" is
    measured. Returns one dict for one request, else a list:
    `{"case_id": ..., "pre": {protocol: {metric: value}}, "post": {...}, "notes": [...]}`
    ("notes" only when some metric could not be computed). `seed` seeds fluency sampling.
    """
    if not isinstance(lm, LM):
        raise TypeError(f"lm: expected a kedit.LM (from kedit.load), got {type(lm).__name__}")
    items = as_requests(requests)
    names = _check_protocols(protocols)
    check_batch_size(batch_size)
    if edit is not None and not isinstance(edit, Edit):
        raise TypeError(f"edit: expected a kedit.Edit or None, got {type(edit).__name__}")
    if edit is not None and edit.lm is not lm:
        raise ValueError(f"edit: it was made on another model object than lm ({lm.name!r})")

    def measure() -> Raw:
        return _measure(lm, items, names, batch_size, fluency, seed)

    raw: dict[str, Raw] = {}
    if edit is None:
        raw["pre"] = measure()
    else:
        with _edit_state(edit, applied=True):
            raw["post"] = measure()
        with _edit_state(edit, applied=False):
            raw["pre"] = measure()

    results = []
    for index, request in enumerate(items):
        case: dict[str, Any] = {"case_id": request.case_id}
        case["pre"] = _stage(request, index, raw["pre"], None)
        if "post" in raw:
            case["post"] = _stage(request, index, raw["post"], raw["pre"])
        if PROBABILITY in names and request.target_true is None:
            case["notes"] = [
                "probability: reliability and generalization (ROME's efficacy and paraphrase "
                "scores) compare target_new with target_true, which this request lacks"
            ]
        results.append(case)
    return results[0] if isinstance(requests, EditRequest) else results


def summarize(results: dict[str, Any] | Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each (stage, protocol, metric) over the cases that have it; protocols are never
    mixed. Returns `{"n_cases": N, "pre": {protocol: {metric: mean}}, "post": {...}}`."""
    cases = [results] if isinstance(results, dict) else list(results)
    if not cases:
        raise ValueError("results: expected at least one evaluation result, got none")
    values: dict[str, dict[str, dict[str, list[float]]]] = {}
    for case in cases:
        for stage in STAGES:
            for protocol, metrics in case.get(stage, {}).items():
                for metric, value in metrics.items():
                    by_metric = values.setdefault(stage, {}).setdefault(protocol, {})
                    by_metric.setdefault(metric, []).append(value)
    summary: dict[str, Any] = {"n_cases": len(cases)}
    for stage, protocols in values.items():
        summary[stage] = {
            protocol: {metric: _mean(v) for metric, v in metrics.items()}
            for protocol, metrics in protocols.items()
        }
    return summary
