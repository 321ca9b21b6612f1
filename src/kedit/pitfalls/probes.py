"""Which facts each pitfall is measured on, and the Multi-Label Edit of a round trip.

ConflictEdit (first edit e1 = (s, r, o -> o1), second e2), as the authors' code scores them:
- reverse, e2 = (o1, r⁻¹, s -> s1): old k_old = (s, r, o1), new k_new = (s1, r, o1);
- composite, e1 = (s', r2, o' -> o1) with the tied fact (s, r1, s'), e2 = (s, r3, o' -> o2):
  k_old = (s', r2, o1), k_new = (s', r2, o2), the rule r1 ∧ r2 -> r3 read backwards;
- coverage, e2 = (s, r, o1 -> o2): k_old = (s, r, o1), k_new = (s, r, o2).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kedit.data.pitfalls import ConflictCase, Fact, RoundCase
from kedit.requests import EditRequest


@dataclass(frozen=True)
class ConflictProbes:
    """The facts a ConflictEdit case is scored on: the one the first edit wrote (`old`), the one
    the second edit implies in its place (`new`) and, for a composite case, the tied fact."""

    old: Fact
    new: Fact
    tied: Fact | None = None


def conflict_probes(case: ConflictCase) -> ConflictProbes:
    """`old`, `new` and the tied fact of a case, by its kind."""
    first, second = case.edits
    old = replace(first, object=case.new_objects[0])
    if case.kind == "reverse":
        return ConflictProbes(old, replace(old, subject=case.new_objects[1].strip()))
    if case.kind == "composite":
        tied = case.triples[case.prerequisites[0]]
        return ConflictProbes(old, replace(old, object=case.new_objects[1]), tied)
    return ConflictProbes(old, replace(second, object=case.new_objects[1]))


def multi_label_back(case: RoundCase) -> EditRequest:
    """Multi-Label Edit (MLE) as the paper describes it: the second edit of the round trip made
    towards every true object at once (the object first), instead of the object alone."""
    return replace(case.back, extra_targets=case.true_objects[1:])


def multi_label_batch(case: RoundCase) -> list[EditRequest]:
    """Multi-Label Edit as the authors' code makes it: one single-target request per true object
    (the object first), edited in one batch. With MEMIT the keys are the same, so the update
    maps the key towards the mean of the requests' values."""
    return [
        replace(case.back, target_new=target, case_id=f"{case.case_id}/1/{index}")
        for index, target in enumerate(case.true_objects)
    ]
