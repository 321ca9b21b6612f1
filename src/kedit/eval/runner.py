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

Locality probes that ask about a subject edited on the model being measured (another request
of the same batch, say) may legitimately change their answer, so with `edited_subjects`
`assemble` leaves them out of locality at both stages and counts them per case in
`"locality_excluded"` (summed by `summarize`).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import lru_cache, partial
from statistics import mean
from typing import Any

from kedit.edits import Edit
from kedit.eval.metrics import (
    exact_match,
    fluency_entropy,
    leading_words,
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
    teacher_forced_metrics,
)
from kedit.lm import LM, require_lm
from kedit.requests import EditRequest, as_requests

__all__ = ["assemble", "evaluate", "kept_locality", "measure", "summarize"]

PROBES = ("reliability", "robustness", "generalization", "locality", "portability")
DEFAULT_CONTEXTS = 3
STAGES = ("pre", "post")
Raw = dict[str, list[dict[str, list[Any]]]]


@lru_cache(maxsize=4)
def context_sentences(corpus: str | None = None) -> tuple[str, ...]:
    """Sentences of a corpus (the bundled tinyworld corpus by default), to put before prompts."""
    from kedit.stats import read_corpus

    _, docs = read_corpus(corpus)
    sentences = (part.strip() for doc in docs for part in doc.split(". "))
    return tuple(sorted({s if s.endswith(".") else s + "." for s in sentences if len(s) > 3}))


def pick_contexts(request: EditRequest, sentences: Sequence[str], k: int, seed: int) -> list[str]:
    """`k` sentences that do not mention the subject, the same for a request at every call."""
    if k == 0:
        return []
    rng = random.Random(zlib.crc32(f"{seed}|{request.text}".encode()))
    picked: list[str] = []
    for _ in range(50 * k):
        sentence = rng.choice(sentences)
        if request.subject not in sentence and sentence not in picked:
            picked.append(sentence)
            if len(picked) == k:
                break
    return picked


def with_contexts(
    requests: list[EditRequest], k: int = DEFAULT_CONTEXTS, seed: int = 0, corpus: str | None = None
) -> list[EditRequest]:
    """Requests carrying `k` unrelated preceding sentences each, for the robustness metric
    (reliability asked after unrelated context); requests that already carry some keep them."""
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"contexts: expected a number of sentences >= 0, got {k!r}")
    if k == 0:
        return requests
    sentences = context_sentences(corpus)
    return [
        r
        if "robustness_contexts" in r.extra
        else replace(
            r, extra={**r.extra, "robustness_contexts": pick_contexts(r, sentences, k, seed)}
        )
        for r in requests
    ]


def _contexts(request: EditRequest) -> list[str]:
    return list(request.extra.get("robustness_contexts", ()))


def _pairs(request: EditRequest) -> dict[str, list[tuple[str, str]]]:
    """Each probe set of a request as (prompt, expected answer) pairs."""
    return {
        "reliability": [(request.text, request.target_new)],
        "robustness": [(f"{c} {request.text}", request.target_new) for c in _contexts(request)],
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
        "robustness": [(f"{c} {request.text}", (new, *contrast)) for c in _contexts(request)],
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
    values = teacher_forced_metrics(scores, pre, locality={"locality"})
    return {name: _mean(values[name]) for name in PROBES if name in values}


def _probability(
    request: EditRequest, scores: dict[str, list], pre: dict[str, list] | None
) -> dict[str, float]:
    out = {}
    for name in ("reliability", "robustness", "generalization"):
        if scores[name] and request.target_true is not None:
            out[name] = _mean(more_likely(new, than=true) for new, true in scores[name])
    if scores["locality"]:
        out["locality"] = _mean(more_likely(answer, than=new) for answer, new in scores["locality"])
    for name in ("reliability", "robustness", "generalization", "portability"):
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


def _stage(
    request: EditRequest, index: int, raw: Raw, pre: Raw | None, kept: list[int] | None = None
) -> dict[str, Any]:
    """One request's metrics at one stage; `pre` is the unedited model's raw scores; `kept`,
    the indices of the locality probes to score (all by default)."""

    def only_kept(scores: dict[str, list]) -> dict[str, list]:
        if kept is None or "locality" not in scores:
            return scores
        return {**scores, "locality": [scores["locality"][i] for i in kept]}

    if kept is not None:
        request = replace(request, locality=[request.locality[i] for i in kept])
    return {
        protocol: METRICS[protocol](
            request,
            only_kept(scores[index]),
            None if pre is None else only_kept(pre[protocol][index]),
        )
        for protocol, scores in raw.items()
    }


def mentions_edited(prompt: str, subjects: Collection[str]) -> bool:
    """Whether a probe's prompt names one of the edited subjects."""
    return any(subject in prompt for subject in subjects)


def kept_locality(request: EditRequest, edited_subjects: Collection[str]) -> list[int]:
    """Indices of the request's locality probes that name none of `edited_subjects`."""
    return [
        i
        for i, probe in enumerate(request.locality)
        if not mentions_edited(probe.prompt, edited_subjects)
    ]


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


def measure(
    lm: LM,
    requests: list[EditRequest],
    protocols: str | Sequence[str] = (TEACHER_FORCED,),
    batch_size: int = 64,
    fluency: bool = False,
    seed: int = 0,
) -> Raw:
    """Raw per-probe scores of the model as it is now (for `assemble`); one call scores every
    request's probes together, in batches."""
    check_batch_size(batch_size)
    return _measure(lm, requests, _check_protocols(protocols), batch_size, fluency, seed)


def assemble(
    requests: list[EditRequest],
    pre: Raw,
    post: Raw | None = None,
    edited_subjects: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """Per-request metrics from raw scores of the unedited (`pre`) and edited (`post`) model.

    `edited_subjects`: the subjects of every request edited on the `post` model. A locality
    probe whose prompt names one of them asks about an edited fact (or a fact of an edited
    subject), whose answer may rightly change; such probes are left out of locality at both
    stages and counted in the case's `"locality_excluded"`. None: every probe is scored.
    """
    results = []
    for index, request in enumerate(requests):
        case: dict[str, Any] = {"case_id": request.case_id}
        kept = None
        if edited_subjects is not None:
            kept = kept_locality(request, edited_subjects)
            case["locality_excluded"] = len(request.locality) - len(kept)
        case["pre"] = _stage(request, index, pre, None, kept)
        if post is not None:
            case["post"] = _stage(request, index, post, pre, kept)
        if PROBABILITY in pre and request.target_true is None:
            case["notes"] = [
                "probability: reliability and generalization (ROME's efficacy and paraphrase "
                "scores) compare target_new with target_true, which this request lacks"
            ]
        results.append(case)
    return results


def evaluate(
    lm: LM,
    requests: EditRequest | Iterable[EditRequest],
    edit: Edit | None = None,
    protocols: str | Sequence[str] = (TEACHER_FORCED,),
    batch_size: int = 64,
    fluency: bool = False,
    seed: int = 0,
    contexts: int = DEFAULT_CONTEXTS,
    exclude_edited: bool = True,
) -> dict[str, Any] | list[dict[str, Any]]:
    """Pre- and post-edit metrics of each request, every number under its protocol.

    `robustness` asks the edit prompt after each of `contexts` unrelated sentences from the
    tinyworld corpus (an edit that holds only on the bare prompt is not a working edit).
    With an `edit` and `exclude_edited`, locality probes that name a subject of the edit's
    requests are left out and counted per case in `"locality_excluded"` (see `assemble`).

    With an `edit`, "post" is measured with it applied and "pre" with it undone (both
    bit-exact); the edit is left applied or not as it was found. Without one, only "pre" is
    measured. Returns one dict for one request, else a list:
    `{"case_id": ..., "pre": {protocol: {metric: value}}, "post": {...}, "notes": [...]}`
    ("notes" only when some metric could not be computed). `seed` seeds fluency sampling.
    """
    require_lm(lm)
    items = with_contexts(as_requests(requests), contexts, seed)
    names = _check_protocols(protocols)
    check_batch_size(batch_size)
    if edit is not None and not isinstance(edit, Edit):
        raise TypeError(f"edit: expected a kedit.Edit or None, got {type(edit).__name__}")
    if edit is not None and edit.lm is not lm:
        raise ValueError(f"edit: it was made on another model object than lm ({lm.name!r})")

    def run() -> Raw:
        return _measure(lm, items, names, batch_size, fluency, seed)

    post = None
    if edit is None:
        pre = run()
    else:
        with _edit_state(edit, applied=True):
            post = run()
        with _edit_state(edit, applied=False):
            pre = run()
    edited = None
    if edit is not None and exclude_edited:
        edited = {r.subject for r in edit.requests}
    results = assemble(items, pre, post, edited)
    return results[0] if isinstance(requests, EditRequest) else results


def summarize(results: dict[str, Any] | Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each (stage, protocol, metric) over the cases that have it; protocols are never
    mixed. Returns `{"n_cases": N, "pre": {protocol: {metric: mean}}, "post": {...}}`, and
    `"locality_excluded"`, the number of locality probes left out in all, when the cases
    count them."""
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
    excluded = [case["locality_excluded"] for case in cases if "locality_excluded" in case]
    if excluded:
        summary["locality_excluded"] = sum(excluded)
    for stage, protocols in values.items():
        summary[stage] = {
            protocol: {metric: _mean(v) for metric, v in metrics.items()}
            for protocol, metrics in protocols.items()
        }
    return summary
