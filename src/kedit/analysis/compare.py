"""Edits seen through mechanisms: the causal trace and the circuit of a fact before and after
an edit.

Before the edit the old answer is traced on the unedited model; after it, the new answer on
the edited one, with the same noise. The circuit of the fact is found on the prompt against
corrupted twins (other subjects of the same token count, asked the same way) for the old
answer before and the new answer after; `CircuitDiff` says how many edges the two circuits
share and which heads and MLPs gained or lost the most attribution.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedit.analysis._common import (
    Result,
    TokenizedFact,
    as_facts,
    new_figure,
    save_figure,
    tokenize_facts,
)
from kedit.analysis.circuit import Circuit, ContrastPair, circuit, contrast_pairs
from kedit.analysis.trace import (
    KINDS,
    TOKEN_CLASSES,
    CausalTrace,
    draw_heatmaps,
    embedding_std,
    token_classes,
    trace_tokenized,
)
from kedit.data.facts import Fact
from kedit.edits import Edit
from kedit.lm import LM
from kedit.requests import EditRequest

TOP_NODES = 8


@dataclass
class CircuitDiff:
    """Two circuits of one model's graph compared: edges both keep (Jaccard overlap) and the
    nodes whose attribution (sum of |edge score| over outgoing edges) changed most."""

    before: Circuit
    after: Circuit

    @property
    def shared_edges(self) -> int:
        return int((self.before.edges & self.after.edges).sum())

    @property
    def overlap(self) -> float:
        union = int((self.before.edges | self.after.edges).sum())
        return self.shared_edges / union if union else 1.0

    def changed_nodes(self, k: int = TOP_NODES) -> list[dict[str, Any]]:
        """The k nodes whose attribution changed most, largest change first."""
        before, after = self.before.node_scores(), self.after.node_scores()
        names = sorted(before, key=lambda node: -abs(after[node] - before[node]))[:k]
        return [
            {"node": node, "before": round(before[node], 5), "after": round(after[node], 5)}
            for node in names
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "edges_before": self.before.n_edges,
            "edges_after": self.after.n_edges,
            "shared_edges": self.shared_edges,
            "jaccard_overlap": self.overlap,
            "faithfulness_before": self.before.evaluation["faithfulness"],
            "faithfulness_after": self.after.evaluation["faithfulness"],
            "metric_kept_before": self.before.evaluation["metric_kept"],
            "metric_kept_after": self.after.evaluation["metric_kept"],
            "changed_nodes": self.changed_nodes(),
        }

    def save(self, folder: str | Path) -> list[Path]:
        """`before/` and `after/` (each circuit's files) and `diff.json`."""
        written = self.before.save(Path(folder) / "before") + self.after.save(
            Path(folder) / "after"
        )
        diff = Path(folder) / "diff.json"
        diff.write_text(json.dumps(self.to_json(), indent=1))
        return [*written, diff]


def compare_circuits(before: Circuit, after: Circuit) -> CircuitDiff:
    """`CircuitDiff` of two circuits found on the same model's graph."""
    if before.graph != after.graph:
        raise ValueError("circuits: the two circuits come from different computation graphs")
    return CircuitDiff(before, after)


def trace_summary(result: CausalTrace) -> dict[str, Any]:
    """Where each kind's indirect effect peaks, with the token's class."""
    summary = {}
    classes = token_classes(len(result.tokens), result.subject)
    for kind in result.scores:
        token, layer, effect = result.peak(kind)
        named = [name for name in TOKEN_CLASSES if token in classes[name]]
        summary[kind] = {
            "token": token,
            "token_text": result.tokens[token],
            "token_class": named[-1] if named else None,
            "layer": layer,
            "indirect_effect": round(effect, 5),
        }
    return summary


@dataclass
class EditMechanisms(Result):
    """The trace and circuit of an edited fact before and after the edit."""

    request: EditRequest
    method: str
    trace_before: CausalTrace
    trace_after: CausalTrace
    circuits: CircuitDiff | None
    name = "edit_mechanisms"

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "prompt": self.request.text,
            "subject": self.request.subject,
            "old_answer": self.trace_before.answer,
            "new_answer": self.trace_after.answer,
            "trace_before": {
                "p_answer": self.trace_before.high_score,
                "total_effect": self.trace_before.total_effect,
                "peaks": trace_summary(self.trace_before),
            },
            "trace_after": {
                "p_answer": self.trace_after.high_score,
                "total_effect": self.trace_after.total_effect,
                "peaks": trace_summary(self.trace_after),
            },
            "circuits": None if self.circuits is None else self.circuits.to_json(),
        }

    def plot(self, path: str | Path | None = None) -> Any:
        """The three trace heatmaps before (top row) and after (bottom row) the edit."""
        kinds = list(self.trace_before.scores)
        figure = new_figure(4.2 * len(kinds), 2 * (0.35 * len(self.trace_before.tokens) + 1.4))
        axes = figure.subplots(2, len(kinds), squeeze=False)
        for row, (when, result) in enumerate(
            (("before", self.trace_before), ("after", self.trace_after))
        ):
            draw_heatmaps(figure, axes[row], result, f", {when} {self.method}")
        return save_figure(figure, path)


def _pairs(
    clean: TokenizedFact, partners: Sequence[TokenizedFact], avoid: set[int], k: int
) -> list[ContrastPair]:
    """Up to k corrupted twins of `clean`: same template and token count, answers outside
    `avoid`."""
    chosen = [
        other
        for other in partners
        if other.fact.template == clean.fact.template
        and len(other.ids) == len(clean.ids)
        and other.fact.subject != clean.fact.subject
        and other.answer_id not in avoid
    ][:k]
    return [ContrastPair(clean, other) for other in chosen]


def edit_mechanisms(
    lm: LM,
    edit: Edit,
    request: EditRequest,
    method: str = "",
    partners: Sequence[Any] = (),
    n_partners: int = 20,
    kinds: Sequence[str] = KINDS,
    samples: int = 10,
    noise: float = 3.0,
    window: int | None = None,
    circuit_method: str = "eap-ig",
    steps: int = 5,
    size: int | None = None,
) -> EditMechanisms:
    """Trace (and, given `partners`, find the circuit of) `request`'s fact before and after
    `edit`, an edit of `lm` made for it. `partners` are facts whose subjects serve as the
    corrupted twins (the same template and token count as the request's prompt, another
    answer). The edit is left applied or undone as it was."""
    if not isinstance(request, EditRequest):
        raise TypeError(f"request: expected an EditRequest, got {type(request).__name__}")
    was_applied = edit.applied
    old = Fact(request.template, request.subject, request.target_true)
    new = Fact(request.template, request.subject, request.target_new)
    std = noise * embedding_std(lm, [request.subject])
    pool = tokenize_facts(lm, as_facts(partners)) if partners else []
    try:
        if edit.applied:
            edit.undo()
        [before_item] = tokenize_facts(lm, [old])
        before = trace_tokenized(lm, before_item, std, kinds, samples, window)
        [after_item] = tokenize_facts(lm, [new])
        avoid = {before_item.answer_id, after_item.answer_id}
        pairs_before = _pairs(before_item, pool, avoid, n_partners)
        pairs_after = [ContrastPair(after_item, pair.corrupted) for pair in pairs_before]
        circuit_before = (
            circuit(lm, pairs_before, circuit_method, steps, size=size) if pairs_before else None
        )
        edit.apply()
        after = trace_tokenized(lm, after_item, std, kinds, samples, window)
        circuit_after = (
            circuit(lm, pairs_after, circuit_method, steps, size=size) if pairs_after else None
        )
    finally:
        if was_applied and not edit.applied:
            edit.apply()
        elif edit.applied and not was_applied:
            edit.undo()
    diff = None
    if circuit_before is not None and circuit_after is not None:
        diff = compare_circuits(circuit_before, circuit_after)
    return EditMechanisms(request, method, before, after, diff)


def _answered(fact: Fact, answers: dict[tuple[str, str], str]) -> Fact:
    """The fact with the answer `answers` gives its (template, subject), if any."""
    answer = answers.get((fact.template, fact.subject), fact.answer)
    return Fact(fact.template, fact.subject, answer, fact.relation)


def edit_circuits(
    lm: LM,
    edit: Edit,
    facts: Sequence[Any],
    method: str = "eap-ig",
    steps: int = 5,
    metric: str = "logit_diff",
    size: int | None = None,
    seed: int = 0,
) -> CircuitDiff:
    """The circuit of `facts` without and with `edit`: after the edit, a fact about an edited
    subject asked with an edited prompt takes the edit's new answer (pairs whose corrupted
    twin has that answer are dropped)."""
    was_applied = edit.applied
    new_answers = {(r.template, r.subject): r.target_new for r in edit.requests}
    try:
        if edit.applied:
            edit.undo()
        pairs = contrast_pairs(lm, facts, seed)
        before = circuit(lm, pairs, method, steps, metric, size=size)
        edit.apply()
        cleans = tokenize_facts(lm, [_answered(pair.clean.fact, new_answers) for pair in pairs])
        after_pairs = [
            ContrastPair(clean, pair.corrupted)
            for clean, pair in zip(cleans, pairs, strict=True)
            if clean.answer_id != pair.corrupted.answer_id
        ]
        after = circuit(lm, after_pairs, method, steps, metric, size=size)
    finally:
        if was_applied and not edit.applied:
            edit.apply()
        elif edit.applied and not was_applied:
            edit.undo()
    return compare_circuits(before, after)
