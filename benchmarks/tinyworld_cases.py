"""More tinyworld edit cases than the bundled benchmark's 320, for the batch and sequential
benchmarks (imported by batch_scale.py and sequential.py; not a benchmark itself).

The bundled benchmark (`kedit.zoo.benchmark.make_cases(world, seed=0)`) edits one fact of each
of the world's 320 people. The world has four editable facts per person (lives_in, profession,
language, employer: `make_cases` never edits country_of_residence), so up to 1280 distinct
facts can be edited. `make_cases` with seeds 1, 2, ... picks other relations (and targets) for
the same people; the first case found for each new (person, relation) pair is kept.

Cases come in rounds: round 0 is the bundled benchmark (file order), round r >= 1 holds each
person's (r+1)-th distinct fact. Within a round every person appears once, so the first 320
cases edit 320 different people and later cases edit people already edited (another fact of
theirs). Locate-then-edit methods key an edit on the subject's last token, so two facts of one
person share (nearly) one key: in one batch they compete, in a sequence the later one can
overwrite the earlier one.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

from kedit.requests import EditRequest

MAX_GENERATOR_SEEDS = 200


def _requests(cases: list, tag: str) -> list[EditRequest]:
    from kedit.data.knowedit import knowedit_requests
    from kedit.zoo.benchmark import to_knowedit

    loaded = knowedit_requests(to_knowedit(cases), source=tag)
    return [
        replace(
            request,
            case_id=f"{case.subject}|{case.relation}",
            extra={**request.extra, "relation": case.relation},
        )
        for request, case in zip(loaded, cases, strict=True)
    ]


def fact_rounds(
    n: int, people: int | None = None
) -> tuple[list[list[EditRequest]], dict[str, Any]]:
    """Rounds of cases (see the module docstring) holding at least `n` cases in all (all the
    rounds that `n` needs, complete as far as the generator finds facts), and how they were
    made. With `people`, only the first `people` subjects of the bundled benchmark are edited,
    so that the locality probes naming the others stay measurable however many edits pile up."""
    from kedit.zoo import build_world
    from kedit.zoo.benchmark import make_cases

    world = build_world()
    first = make_cases(world, seed=0)
    if people is not None:
        if not 1 <= people <= len(first):
            raise ValueError(f"people: expected 1..{len(first)}, got {people}")
        first = first[:people]
    per_person = len(first)
    needed_rounds = -(-n // per_person)
    order = {case.subject: index for index, case in enumerate(first)}
    found: dict[str, list] = {case.subject: [case] for case in first}
    seeds = 1
    while needed_rounds > 1 and seeds < MAX_GENERATOR_SEEDS:
        if all(len(cases) >= needed_rounds for cases in found.values()):
            break
        for case in make_cases(world, seed=seeds):
            if case.subject in found and all(
                case.relation != c.relation for c in found[case.subject]
            ):
                found[case.subject].append(case)
        seeds += 1
    rounds = []
    for r in range(needed_rounds):
        cases = [found[s][r] for s in sorted(found, key=order.__getitem__) if len(found[s]) > r]
        if cases:
            rounds.append(_requests(cases, f"tinyworld make_cases round {r}"))
    total = sum(map(len, rounds))
    if total < n:
        raise ValueError(
            f"n: tinyworld has {total} distinct editable facts within reach "
            f"({len(found)} people), fewer than the {n} asked for"
        )
    info = {
        "source": "kedit.zoo.benchmark.make_cases on build_world(); round 0 is the bundled "
        "tinyworld_knowedit.json, round r >= 1 each person's (r+1)-th distinct fact"
        + (f" (from make_cases seeds 1..{seeds - 1})" if seeds > 1 else ""),
        "people": per_person,
        "round_sizes": [len(r) for r in rounds],
        "subjects_repeat_after": per_person,
    }
    return rounds, info


def distinct_fact_cases(
    n: int, shuffle_seed: int | None = None, people: int | None = None
) -> tuple[list[EditRequest], dict[str, Any]]:
    """`n` cases editing distinct (person, relation) facts of the first `people` subjects (all:
    None), round after round; with `shuffle_seed` each round is shuffled (rounds stay in order)."""
    rounds, info = fact_rounds(n, people)
    cases: list[EditRequest] = []
    for index, round_cases in enumerate(rounds):
        round_cases = list(round_cases)
        if shuffle_seed is not None:
            random.Random(f"{shuffle_seed}-{index}").shuffle(round_cases)
        cases.extend(round_cases)
    cases = cases[:n]
    info["cases"] = len(cases)
    info["distinct_subjects"] = len({c.subject for c in cases})
    info["distinct_facts"] = len({c.case_id for c in cases})
    return cases, info
