"""ConflictEdit and RoundEdit files generated from tinyworld, in the benchmarks' own formats.

ConflictEdit (``tinyworld_conflict.json``, the three kinds interleaved):
- reverse, rule "P108>P108-inverse": a person's employer is edited (person -> company'), then
  the inverse fact of company' (company' is the employer of person -> person'), so that
  person' should now work for company';
- composite, rule "P551&P17>P27": the tied fact "person lives in city" is left alone while the
  city's country is edited (country -> country'), then the person's country of residence
  (country, which the rule now makes country', -> country'');
- coverage: one fact edited twice (o -> o1 -> o2).

RoundEdit (``tinyworld_roundedit_easy.json``, ``tinyworld_roundedit_hard.json``): relations
with several true objects: the cities a person has lived in (P551) and the languages a person
speaks (P1412). The world gives one of each (where the person lives, the native language); this
module extends it deterministically with one or two earlier cities in the same country and one
or two more languages. The bundled models never saw the extension: their distribution over a
subject's true objects is what their training makes of these prompts. The round trip passes
through an object of another kind (a company or a profession) in the easy file, and through
one of the relation's own kind (another city, another language) in the hard one.

Each benchmark keeps its paraphrases per relation id in a separate file
(``tinyworld_conflict_prompts.json``, ``tinyworld_round_prompts.json``), as the originals do.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from kedit.zoo.benchmark import DATA_DIR
from kedit.zoo.world import World

CONFLICT_FILE = "tinyworld_conflict.json"
CONFLICT_PROMPTS_FILE = "tinyworld_conflict_prompts.json"
ROUND_FILES = {"easy": "tinyworld_roundedit_easy.json", "hard": "tinyworld_roundedit_hard.json"}
ROUND_PROMPTS_FILE = "tinyworld_round_prompts.json"
CASES_PER_KIND = 40

# Relations these files add to the world's: (id, label, question, templates).
EMPLOYER_OF = (
    "P108-inverse",
    "employer of",
    "Whom does {} employ?",
    (
        "{} is the employer of",
        "{} employs",
        "The company {} employs",
        "{} has on its payroll",
        "{} pays the salary of",
        "A person employed by {} is",
    ),
)
LIVED_IN = (
    "P551",
    "residence",
    "Which cities has {} lived in?",
    (
        "{} has lived in",
        "{} once lived in",
        "{} has had a home in",
        "One city {} has lived in is",
        "Over the years, {} has lived in",
        "A city where {} has resided is",
    ),
)
SPEAKS = (
    "P1412",
    "languages spoken, written or signed",
    "Which languages does {} speak?",
    (
        "{} can speak",
        "{} is fluent in",
        "One language {} speaks is",
        "{} converses in",
        "{} knows the language",
        "A language spoken by {} is",
    ),
)


class _Entities:
    """Wikidata-style ids for the world's entities (people, places, companies, ...)."""

    def __init__(self, world: World) -> None:
        names = [
            *world.people,
            *world.cities,
            *world.countries,
            *world.companies,
            *world.professions,
            *world.languages,
        ]
        self.ids = {name: f"Q{9000 + index}" for index, name in enumerate(names)}

    def __call__(self, name: str) -> dict[str, str]:
        return {"id": self.ids[name], "label": name}


def _relation(world: World, name: str) -> dict[str, str]:
    relation = world.relations[name]
    return {
        "id": relation.relation_id,
        "prompt": relation.templates[0],
        "query": relation.question,
        "label": name.replace("_", " "),
    }


def _added_relation(spec: tuple[str, str, str, tuple[str, ...]]) -> dict[str, str]:
    relation_id, label, question, templates = spec
    return {"id": relation_id, "prompt": templates[0], "query": question, "label": label}


def _triple(relation: dict[str, str], subject: dict, object: dict) -> dict[str, Any]:
    return {"relation": relation, "subject": subject, "object": object}


def _edit(triple: dict[str, Any], new_object: dict, **more: dict) -> dict[str, Any]:
    return {**triple, **more, "new_object": new_object}


def _other(rng: random.Random, pool: list[str], *excluded: str) -> str:
    return rng.choice([item for item in pool if item not in excluded])


def _reverse(world: World, entity: _Entities, rng: random.Random, person: str) -> dict:
    company = world.facts[(person, "employer")]
    company_new = _other(rng, world.companies, company)
    # Someone who does not already work for company_new, so the implied fact is new.
    person_new = _other(
        rng, [p for p in world.people if world.facts[(p, "employer")] != company_new], person
    )
    works_for, employer_of = _relation(world, "employer"), _added_relation(EMPLOYER_OF)
    return {
        "rule": f"{works_for['id']}>{employer_of['id']}",
        "triples": [
            _triple(works_for, entity(person), entity(company)),
            _triple(employer_of, entity(company), entity(person)),
        ],
        "prerequisites": [],
        "type": "reverse",
        "edits": [
            _edit(_triple(works_for, entity(person), entity(company)), entity(company_new)),
            _edit(_triple(employer_of, entity(company_new), entity(person)), entity(person_new)),
        ],
    }


def _composite(world: World, entity: _Entities, rng: random.Random, city: str) -> dict:
    person = rng.choice([p for p in world.people if world.facts[(p, "lives_in")] == city])
    country = world.city_country[city]
    country_new = _other(rng, world.countries, country)
    country_last = _other(rng, world.countries, country, country_new)
    lives_in, located_in = _relation(world, "lives_in"), _relation(world, "located_in")
    country_of = _relation(world, "country_of_residence")
    return {
        "rule": f"{lives_in['id']}&{located_in['id']}>{country_of['id']}",
        "triples": [
            _triple(lives_in, entity(person), entity(city)),
            _triple(located_in, entity(city), entity(country)),
            _triple(country_of, entity(person), entity(country)),
        ],
        "prerequisites": [0],
        "type": "composite",
        "edits": [
            _edit(_triple(located_in, entity(city), entity(country)), entity(country_new)),
            _edit(
                _triple(country_of, entity(person), entity(country)),
                entity(country_last),
                true_object=entity(country_new),
            ),
        ],
    }


def _coverage(world: World, entity: _Entities, rng: random.Random, person: str) -> dict:
    name = rng.choice(["lives_in", "profession", "language", "employer"])
    relation, pool = _relation(world, name), world.candidates(name)
    old = world.facts[(person, name)]
    first = _other(rng, pool, old)
    second = _other(rng, pool, old, first)
    return {
        "triples": [_triple(relation, entity(person), entity(old))],
        "prerequisites": [],
        "type": "coverage",
        "edits": [
            _edit(_triple(relation, entity(person), entity(old)), entity(first)),
            _edit(_triple(relation, entity(person), entity(first)), entity(second)),
        ],
    }


def conflict_records(world: World, n_per_kind: int = CASES_PER_KIND) -> list[dict]:
    """ConflictEdit records, reverse, composite and coverage in turn (so the first n records
    hold every kind)."""
    rng = random.Random(f"pitfalls-conflict-{world.seed}")
    entity = _Entities(world)
    people = rng.sample(world.people, 2 * n_per_kind)
    homes = {world.facts[(p, "lives_in")] for p in world.people}
    cities = rng.sample(sorted(homes), min(n_per_kind, len(homes)))
    records = []
    for index in range(n_per_kind):
        records.append(_reverse(world, entity, rng, people[index]))
        if index < len(cities):
            records.append(_composite(world, entity, rng, cities[index]))
        records.append(_coverage(world, entity, rng, people[n_per_kind + index]))
    return records


def true_objects(world: World, person: str, relation_id: str) -> list[str]:
    """A person's objects under a RoundEdit relation: the world's own first (where they live,
    their native language), then this module's deterministic extension (one or two earlier
    cities in the same country, one or two more languages)."""
    rng = random.Random(f"pitfalls-true-objects-{world.seed}-{person}-{relation_id}")
    if relation_id == LIVED_IN[0]:
        city = world.facts[(person, "lives_in")]
        country = world.city_country[city]
        pool = [c for c in world.cities if world.city_country[c] == country and c != city]
        return [city, *rng.sample(pool, rng.randint(1, 2))]
    native = world.facts[(person, "language")]
    pool = [language for language in world.languages if language != native]
    return [native, *rng.sample(pool, rng.randint(1, 2))]


def round_records(world: World, difficulty: str, n: int = CASES_PER_KIND) -> list[dict]:
    """RoundEdit records of one difficulty ("easy" or "hard"), the two relations in turn."""
    if difficulty not in ROUND_FILES:
        raise ValueError(f"difficulty: expected one of {sorted(ROUND_FILES)}, got {difficulty!r}")
    rng = random.Random(f"pitfalls-round-{world.seed}-{difficulty}")
    entity = _Entities(world)
    records = []
    for index, person in enumerate(rng.sample(world.people, n)):
        spec = (LIVED_IN, SPEAKS)[index % 2]
        objects = true_objects(world, person, spec[0])
        own_kind = world.cities if spec is LIVED_IN else world.languages
        other_kind = world.companies + world.professions
        new_object = _other(rng, own_kind if difficulty == "hard" else other_kind, *objects)
        records.append(
            {
                "type": f"1-{len(objects)}@{spec[0]}",
                "edit": {
                    "relation": _added_relation(spec),
                    "subject": entity(person),
                    "new_object": entity(new_object),
                    "object": entity(rng.choice(objects)),
                },
                "true_objects": [entity(o) for o in objects],
            }
        )
    return records


def prompt_files(world: World) -> dict[str, dict[str, list[str]]]:
    """The paraphrase files: relation id -> templates, for each benchmark."""
    conflict = {r.relation_id: list(r.templates) for r in world.relations.values()}
    conflict[EMPLOYER_OF[0]] = list(EMPLOYER_OF[3])
    return {
        CONFLICT_PROMPTS_FILE: conflict,
        ROUND_PROMPTS_FILE: {spec[0]: list(spec[3]) for spec in (LIVED_IN, SPEAKS)},
    }


def write_pitfalls_files(world: World, out_dir: str | Path = DATA_DIR) -> list[Path]:
    """Write the ConflictEdit and RoundEdit files and their paraphrase files into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    contents: dict[str, Any] = {CONFLICT_FILE: conflict_records(world), **prompt_files(world)}
    for difficulty, name in ROUND_FILES.items():
        contents[name] = round_records(world, difficulty)
    paths = []
    for name, content in contents.items():
        path = out / name
        path.write_text(json.dumps(content, indent=1, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    from kedit.zoo.world import build_world

    for written in write_pitfalls_files(build_world()):
        print(written, written.stat().st_size)
