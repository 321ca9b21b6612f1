"""Counterfactual edit benchmarks generated from tinyworld, in the real benchmarks' formats.

``tinyworld_counterfact.json`` follows ROME/MEMIT's CounterFact records and
``tinyworld_knowedit.json`` follows EasyEdit's KnowEdit (WikiData_counterfact) records, so the
loaders for those formats can be exercised offline on facts the bundled models know.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from kedit.zoo.world import PERSON_RELATIONS, World

COUNTERFACT_FILE = "tinyworld_counterfact.json"
KNOWEDIT_FILE = "tinyworld_knowedit.json"
DATA_DIR = Path(__file__).parent / "data"


@dataclass
class EditCase:
    """One counterfactual edit of a person's fact, with its evaluation probes."""

    case_id: int
    subject: str
    relation: str
    template: str  # a training template of this fact, with "{}"
    target_true: str  # no leading space
    target_new: str  # no leading space
    rephrase: list[str]  # the fact's held-out templates, filled
    neighborhood: list[tuple[str, str]]  # other people whose true answer is target_true
    attribute: list[tuple[str, str]]  # other people whose true answer is target_new
    locality: list[tuple[str, str]]  # other people's facts, same relation
    forgetfulness: list[tuple[str, str]]  # other people's facts, other relations
    reasoning: list[tuple[str, str]] = field(default_factory=list)  # two-hop after the edit
    aliasing: list[tuple[str, str]] = field(default_factory=list)  # alias, answer target_new
    generation: list[str] = field(default_factory=list)

    @property
    def prompt(self) -> str:
        return self.template.format(self.subject)


def _filled(world: World, person: str, relation: str, rng: random.Random) -> tuple[str, str]:
    """A training-template question about a person's fact and its answer (no leading space)."""
    t = rng.choice(world.templates(person, relation, "train"))
    return t.format(person), world.facts[(person, relation)]


def make_cases(world: World, seed: int = 0, n_cases: int | None = None) -> list[EditCase]:
    """One counterfactual edit per person (or ``n_cases``), mostly of where they live."""
    rng = random.Random(f"bench-{world.seed}-{seed}")
    people = list(world.people)
    rng.shuffle(people)
    if n_cases is not None:
        people = people[:n_cases]
    others_rel = [r for r in PERSON_RELATIONS if r not in ("lives_in", "country_of_residence")]
    cases = []
    for cid, person in enumerate(people):
        rel = "lives_in" if rng.random() < 0.6 else rng.choice(others_rel)
        true = world.facts[(person, rel)]
        if rel == "lives_in":  # a city in another country, so the two-hop answer changes too
            country = world.city_country[true]
            pool = [c for c in world.cities if world.city_country[c] != country]
        else:
            pool = [a for a in world.candidates(rel) if a != true]
        new = rng.choice(pool)
        template = rng.choice(world.templates(person, rel, "train"))

        def others(answer: str | None, relation: str, k: int, p: str = person) -> list:
            cands = [
                q
                for q in world.people
                if q != p and (answer is None or world.facts[(q, relation)] == answer)
            ]
            picked = rng.sample(cands, min(k, len(cands)))
            return [_filled(world, q, relation, rng) for q in picked]

        other_rels = [r for r in PERSON_RELATIONS if r != rel]
        case = EditCase(
            case_id=cid,
            subject=person,
            relation=rel,
            template=template,
            target_true=true,
            target_new=new,
            rephrase=[t.format(person) for t in world.templates(person, rel, "heldout")],
            neighborhood=others(true, rel, 5),
            attribute=others(new, rel, 5),
            locality=others(None, rel, 3),
            forgetfulness=[others(None, r, 1)[0] for r in rng.sample(other_rels, 2)],
            generation=[t.format(person) for t in world.templates(person, rel, "train")[:3]],
        )
        if rel == "lives_in":
            t = rng.choice(world.templates(person, "country_of_residence", "train"))
            case.reasoning = [(t.format(person), world.city_country[new])]
        if person in world.aliases:
            case.aliasing = [(template.format(world.aliases[person]), new)]
        cases.append(case)
    return cases


def _entity_ids(world: World) -> dict[str, str]:
    names = world.cities + world.countries + world.companies + world.professions
    return {n: f"Q{7000 + i}" for i, n in enumerate(names + world.languages)}


def to_counterfact(world: World, cases: list[EditCase]) -> list[dict]:
    """Records in ROME/MEMIT's CounterFact format (``str`` fields without leading space)."""
    ids = _entity_ids(world)
    return [
        {
            "case_id": c.case_id,
            "pararel_idx": c.case_id,
            "requested_rewrite": {
                "prompt": c.template,
                "relation_id": world.relations[c.relation].relation_id,
                "target_new": {"str": c.target_new, "id": ids[c.target_new]},
                "target_true": {"str": c.target_true, "id": ids[c.target_true]},
                "subject": c.subject,
            },
            "paraphrase_prompts": c.rephrase,
            "neighborhood_prompts": [p for p, _ in c.neighborhood],
            "attribute_prompts": [p for p, _ in c.attribute],
            "generation_prompts": c.generation,
        }
        for c in cases
    ]


def to_knowedit(cases: list[EditCase]) -> list[dict]:
    """Records in EasyEdit's KnowEdit (WikiData_counterfact) format."""

    def pairs(items: list[tuple[str, str]]) -> list[dict]:
        return [{"prompt": p, "ground_truth": a} for p, a in items]

    return [
        {
            "subject": c.subject,
            "prompt": c.prompt,
            "target_new": c.target_new,
            "ground_truth": c.target_true,
            "rephrase": c.rephrase,
            "portability": {
                "Subject_Aliasing": pairs(c.aliasing),
                "Reasoning": pairs(c.reasoning),
                "Logical_Generalization": [],
            },
            "locality": {
                "Relation_Specificity": pairs(c.locality),
                "Forgetfulness": pairs(c.forgetfulness),
            },
        }
        for c in cases
    ]


def write_benchmarks(world: World, out_dir: str | Path = DATA_DIR, seed: int = 0) -> list[Path]:
    """Write ``tinyworld_counterfact.json`` and ``tinyworld_knowedit.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases = make_cases(world, seed)
    paths = [out / COUNTERFACT_FILE, out / KNOWEDIT_FILE]
    for path, records in zip(
        paths, (to_counterfact(world, cases), to_knowedit(cases)), strict=True
    ):
        path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    return paths


def write_corpus(world: World, path: str | Path, n_docs: int = 2000, seed: int = 0) -> Path:
    """Write the plain-text world corpus, one document per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(world.corpus(n_docs, seed)) + "\n")
    return path


if __name__ == "__main__":
    from kedit.zoo.world import build_world

    w = build_world()
    for p in [*write_benchmarks(w), write_corpus(w, DATA_DIR / "tinyworld_corpus.txt")]:
        print(p, p.stat().st_size)
