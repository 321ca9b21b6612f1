"""tinyworld's training split of edit requests, for the editors that learn to edit (MEND, MALMEN,
SERAC): counterfactual edits of people who are no subject of the benchmark's first
`BENCHMARK_CASES` cases, so that an editor is never trained on a subject it is measured on.

Every training person gets, for each relation of theirs but the derived country of residence,
`targets_per_fact` counterfactual edits (distinct new answers), each with its held-out
paraphrases and locality probes about other training people. The file is written in EasyEdit's
KnowEdit format (`tinyworld_train_edits.json`), which `kedit.data.load_requests` reads.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from kedit.zoo.benchmark import DATA_DIR, EditCase, make_cases, to_knowedit
from kedit.zoo.world import PERSON_RELATIONS, World

TRAIN_EDITS_FILE = "tinyworld_train_edits.json"
BENCHMARK_CASES = 200  # the benchmark's cases whose subjects the training split leaves out
VALIDATION_PEOPLE = 12  # the split's last people, kept for validation
EDITED_RELATIONS = tuple(r for r in PERSON_RELATIONS if r != "country_of_residence")


def training_people(world: World, benchmark_cases: int = BENCHMARK_CASES) -> list[str]:
    """The people who are no subject of the benchmark's first `benchmark_cases` cases."""
    taken = {case.subject for case in make_cases(world)[:benchmark_cases]}
    return [person for person in world.people if person not in taken]


def _probe(world: World, person: str, relation: str, rng: random.Random) -> tuple[str, str]:
    template = rng.choice(world.templates(person, relation, "train"))
    return template.format(person), world.facts[(person, relation)]


def make_train_cases(
    world: World, targets_per_fact: int = 2, seed: int = 0, people: list[str] | None = None
) -> list[EditCase]:
    """Counterfactual edits of the training people (`training_people` unless given)."""
    rng = random.Random(f"train-edits-{world.seed}-{seed}")
    people = training_people(world) if people is None else people
    cases: list[EditCase] = []
    for person in people:
        others = [q for q in people if q != person]
        for relation in EDITED_RELATIONS:
            true = world.facts[(person, relation)]
            pool = [a for a in world.candidates(relation) if a != true]
            for new in rng.sample(pool, targets_per_fact):
                neighbours = rng.sample(others, 3)
                other_relations = [r for r in PERSON_RELATIONS if r != relation]
                case = EditCase(
                    case_id=len(cases),
                    subject=person,
                    relation=relation,
                    template=rng.choice(world.templates(person, relation, "train")),
                    target_true=true,
                    target_new=new,
                    rephrase=[
                        t.format(person) for t in world.templates(person, relation, "heldout")
                    ],
                    neighborhood=[],
                    attribute=[],
                    locality=[_probe(world, q, relation, rng) for q in neighbours[:2]],
                    forgetfulness=[
                        _probe(world, neighbours[2], rng.choice(other_relations), rng),
                        _probe(world, person, rng.choice(other_relations), rng),
                    ],
                )
                if relation == "lives_in":
                    template = rng.choice(world.templates(person, "country_of_residence"))
                    case.reasoning = [(template.format(person), world.city_country[new])]
                cases.append(case)
    return cases


def write_train_edits(world: World, out_dir: str | Path = DATA_DIR) -> Path:
    """Write `tinyworld_train_edits.json` (one KnowEdit record per line) into `out_dir`."""
    path = Path(out_dir) / TRAIN_EDITS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    records = to_knowedit(make_train_cases(world))
    lines = ",\n".join(json.dumps(record, ensure_ascii=False) for record in records)
    path.write_text(f"[\n{lines}\n]\n")
    return path


if __name__ == "__main__":
    from kedit.zoo.world import build_world

    written = write_train_edits(build_world())
    print(written, written.stat().st_size)
