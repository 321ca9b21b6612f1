"""The pitfalls benchmarks (Li et al., 2024): each case's edits made one after the other on the
unedited model, the facts scored after each, then undone.

- ConflictEdit: edit e1, score the fact it wrote; edit e2 on top, score that fact again, the
  fact e2 implies in its place and (composite) the tied fact, which is also scored on the
  unedited model; for coverage cases, e2 alone is also made and scored (Success).
- RoundEdit: edit o -> o*, score both; edit o* -> o on top and score every true object and o*
  ("single"). On the same first edit, the second is also made as a Multi-Label Edit, towards
  every true object: as one request with several targets by the methods that take them
  ("multi_label", the paper's description), and as one single-target request per true object
  in one batch by the batchable methods ("multi_label_batch", the authors' code).

A stateful method (AlphaEdit) carries its memory from the first edit to the second, as in a
session; the Multi-Label Edit starts from the memory as the first edit left it. Probabilities
are exp(-mean token NLL) averaged over a fact's prompts (`kedit.pitfalls.metrics`). Per-case
records stream to `cases.jsonl`, so an interrupted run resumes.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kedit.api import edit
from kedit.bench.runs import (
    CASES_FILE,
    BenchConfig,
    _read_jsonl,
    open_run,
    records_digest,
    select_cases,
    write_summary,
)
from kedit.data import (
    ConflictCase,
    Loaded,
    RoundCase,
    detect_format,
    load_conflictedit,
    load_requests,
    load_roundedit,
)
from kedit.data._common import read_json
from kedit.data.pitfalls import Fact
from kedit.edits import Edit
from kedit.eval.protocols import score_probability
from kedit.lm import LM
from kedit.methods.registry import HyperParams, MethodSpec, get_method, resolve_hparams
from kedit.pitfalls.metrics import (
    distortion,
    fact_probability,
    failed,
    ignore_rate,
    preferred,
    relative_drop,
    round_success,
    summarize,
)
from kedit.pitfalls.probes import conflict_probes, multi_label_back, multi_label_batch
from kedit.requests import EditRequest

PITFALLS_LOADERS = {"conflictedit": load_conflictedit, "roundedit": load_roundedit}
PITFALLS_FORMATS = tuple(PITFALLS_LOADERS)
CM_FLOOR = -1.0  # the authors' code floors Conflict Magnitude at -1
Question = tuple[Sequence[str], Sequence[str]]  # prompts, answers


def load_benchmark(path: str | Path, format: str | None = None, n: int | None = None) -> Loaded:
    """A benchmark file's cases where its format has cases of several edits (ConflictEdit,
    RoundEdit: `run_pitfalls` runs them), its EditRequests otherwise (`run_bench`)."""
    if format is None and Path(path).is_file():
        source, content = read_json(path)
        format = detect_format(content, source)
    if format in PITFALLS_LOADERS:
        return PITFALLS_LOADERS[format](path, n=n)
    return load_requests(path, format=format, n=n)


def answer_probabilities(lm: LM, questions: Sequence[Question]) -> list[list[float]]:
    """For each (prompts, answers), each answer's probability: exp(-mean token NLL) after each
    prompt, averaged over the prompts. One batched pass over all of them."""
    items = [(prompt, list(answers)) for prompts, answers in questions for prompt in prompts]
    scores = iter(score_probability(lm, items))
    out = []
    for prompts, answers in questions:
        per_prompt = [next(scores) for _ in prompts]
        out.append([fact_probability([row[k] for row in per_prompt]) for k in range(len(answers))])
    return out


def fact_probabilities(lm: LM, facts: Sequence[Fact]) -> list[float]:
    """The probability of each fact's object after its prompts."""
    found = answer_probabilities(lm, [(fact.prompts, [fact.object]) for fact in facts])
    return [row[0] for row in found]


class _Editor:
    """Makes a case's edits with one method, its hyper-parameters and, for a stateful method, a
    memory that starts empty for every case."""

    def __init__(self, lm: LM, spec: MethodSpec, params: HyperParams) -> None:
        self.lm, self.spec, self.params = lm, spec, params
        self.seconds = 0.0

    def fresh_state(self) -> Any:
        return None if self.spec.state is None else self.spec.state()

    def __call__(self, request: EditRequest | list[EditRequest], state: Any) -> Edit:
        started = time.perf_counter()
        try:
            return edit(self.lm, request, self.spec.name, self.params, state=state)
        finally:
            self.seconds += time.perf_counter() - started


def _conflict_record(editor: _Editor, case: ConflictCase, tied_before: float | None) -> dict:
    lm = editor.lm
    probes = conflict_probes(case)
    first_request, second_request = case.requests
    state = editor.fresh_state()
    first = editor(first_request, state)
    try:
        (old_first,) = fact_probabilities(lm, [probes.old])
        second = editor(second_request, state)
        try:
            scored = [probes.old, probes.new] + ([probes.tied] if probes.tied else [])
            old_both, new_both, *tied = fact_probabilities(lm, scored)
        finally:
            second.undo()
    finally:
        first.undo()
    p = {"old_after_first": old_first, "old_after_both": old_both, "new_after_both": new_both}
    metrics = {
        "conflict_score": preferred(new_both, old_both),
        "conflict_magnitude": relative_drop(old_first, old_both, CM_FLOOR),
    }
    if probes.tied is not None:
        p.update(tied_before=tied_before, tied_after_both=tied[0])
        metrics["tied_fact_damage"] = relative_drop(tied_before, tied[0])
    if case.kind == "coverage":
        alone = editor(second_request, editor.fresh_state())
        try:
            new_alone, old_alone = fact_probabilities(lm, [probes.new, probes.old])
        finally:
            alone.undo()
        p.update(new_second_alone=new_alone, old_second_alone=old_alone)
        metrics["success"] = preferred(new_alone, old_alone)
    return {"kind": case.kind, "probabilities": p, "metrics": {case.kind: metrics}}


def _round_scores(before: list[float], after: list[float]) -> dict[str, float]:
    """Distortion, Ignore Rate and failure of one round trip, from the probabilities of the
    true objects (the edited one first) before and after it."""
    ignored = ignore_rate(before[1:], after[1:])
    return {
        "distortion": distortion(before, after),
        "ignore_rate": ignored,
        "failure_rate": failed(ignored),
    }


def _round_record(editor: _Editor, case: RoundCase, before: list[float]) -> dict:
    lm, objects = editor.lm, len(case.true_objects)
    question = [(case.fact.prompts, [*case.true_objects, case.new_object])]
    seconds: list[tuple[str, EditRequest | list[EditRequest]]] = [("single", case.back)]
    if editor.spec.hparams.MULTI_LABEL:
        seconds.append(("multi_label", multi_label_back(case)))
    if editor.spec.batchable:
        seconds.append(("multi_label_batch", multi_label_batch(case)))
    state = editor.fresh_state()
    first = editor(case.edit, state)
    finals = {}
    try:
        (after_first,) = answer_probabilities(lm, question)
        for variant, request in seconds:
            second = editor(request, copy.copy(state))
            try:
                (finals[variant],) = answer_probabilities(lm, question)
            finally:
                second.undo()
    finally:
        first.undo()
    # The edited object is index 0, the passed-through one the last.
    first_success = (after_first[-1], after_first[0])
    p: dict[str, Any] = {"before": before, "after_first": after_first}
    metrics = {}
    for variant, final in finals.items():
        p[variant] = final
        metrics[variant] = {
            "success": round_success(*first_success, final[0], final[-1]),
            **_round_scores(before, final[:objects]),
        }
    return {"kind": case.kind, "objects": objects, "probabilities": p, "metrics": metrics}


def _before(lm: LM, cases: list[Any]) -> list[Any]:
    """What each case needs scored on the unedited model: a composite case's tied fact, a round
    trip's true objects; None for the others."""
    if not cases:
        return []
    if isinstance(cases[0], RoundCase):
        return answer_probabilities(lm, [(c.fact.prompts, c.true_objects) for c in cases])
    tied = [conflict_probes(c).tied for c in cases]
    found = iter(fact_probabilities(lm, [fact for fact in tied if fact is not None]))
    return [None if fact is None else next(found) for fact in tied]


def run_pitfalls(
    lm: LM,
    cases: Sequence[ConflictCase] | Sequence[RoundCase],
    config: BenchConfig,
    out_dir: str | Path,
    on_case: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run a ConflictEdit or RoundEdit benchmark (`cases` from `load_conflictedit` or
    `load_roundedit`) into `out_dir`, resuming what is there; returns the summary, whose
    `metrics["pitfalls"]` holds the means per ConflictEdit kind or per RoundEdit variant
    ("single", "multi_label", "multi_label_batch")."""
    config.validate()
    if config.mode != "independent":
        raise ValueError(
            f"mode: the pitfalls benchmarks make each case's edits on the unedited model; use "
            f"mode 'independent', got {config.mode!r}"
        )
    kinds = {type(case) for case in cases}
    if kinds not in ({ConflictCase}, {RoundCase}):
        raise ValueError(
            "cases: expected the cases of a ConflictEdit or RoundEdit file (load_conflictedit, "
            f"load_roundedit), got {', '.join(sorted(k.__name__ for k in kinds)) or 'none'}"
        )
    spec = get_method(config.method)
    params = resolve_hparams(spec.name, lm, config.seeded_hparams())
    out = Path(out_dir)
    digest = records_digest([asdict(case) for case in cases])
    header = open_run(lm, config, params, len(cases), digest, out)
    records = _read_jsonl(out / CASES_FILE)
    notify = on_case or (lambda record: None)
    for record in records:
        notify(record)
    done = {record["case_id"] for record in records}
    todo = [case for case in select_cases(cases, config) if case.case_id not in done]
    editor = _Editor(lm, spec, params)
    score = _round_record if kinds == {RoundCase} else _conflict_record
    for case, before in zip(todo, _before(lm, todo), strict=True):
        editor.seconds, started = 0.0, time.perf_counter()
        record = {"case_id": case.case_id, **score(editor, case, before)}
        record["edit_seconds"] = editor.seconds
        record["eval_seconds"] = time.perf_counter() - started - editor.seconds
        with (out / CASES_FILE).open("a") as sink:
            sink.write(json.dumps(record) + "\n")
        records.append(record)
        notify(record)
    return write_summary(out, header, records, summarize(records))
