"""A KnowUnDo-like unlearning task on tinyworld: forget some people's private facts, keep the
rest.

KnowUnDo (Tian et al., 2024) splits what a model knows about a subject into an *unlearn scope*
(private or copyrighted knowledge) and a *retention scope* (public knowledge of the same
subject), and shows that gradient-ascent methods erase both. Here, for a share of tinyworld's
people, their home city and employer are private (to forget) while their country, profession
and native language are public (to keep); every fact of everyone else must stay too, and so
must general text (the world corpus without the forgotten people).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from kedit.zoo import CORPUS_FILE
from kedit.zoo.world import PERSON_RELATIONS, FactPrompt, World

PRIVATE_RELATIONS = ("lives_in", "employer")
PUBLIC_RELATIONS = tuple(r for r in PERSON_RELATIONS if r not in PRIVATE_RELATIONS)
N_PERTURBED = 4  # wrong answers per item, for TOFU's truth ratio
TASK_FILES = ("forget", "forget_paraphrase", "retain", "in_domain", "other_people")


@dataclass(frozen=True)
class ForgetTask:
    """The sets of one task; each item a fact asked with one template.

    - `forget`: the private facts of `people`, with their training templates (what is unlearned
      and what Unlearn Success scores);
    - `forget_paraphrase`: the same facts with their held-out templates;
    - `retain`: what retaining methods may train on: the public facts of `people` and all facts
      of `retain_people`, with training templates;
    - `in_domain`: the public facts of `people` with held-out templates (in-domain retention,
      on prompts no method trained on);
    - `other_people`: all facts of people in neither group, training templates;
    - `general`: world-corpus documents that name none of `people`.
    """

    people: tuple[str, ...]
    retain_people: tuple[str, ...]
    forget: list[FactPrompt]
    forget_paraphrase: list[FactPrompt]
    retain: list[FactPrompt]
    in_domain: list[FactPrompt]
    other_people: list[FactPrompt]
    general: list[str]


def _facts(world: World, people: list[str], relations: tuple[str, ...], split: str):
    return [
        FactPrompt(person, relation, template, world.answer(person, relation))
        for person in people
        for relation in relations
        for template in world.templates(person, relation, split)
    ]


def build_forget_task(
    world: World,
    share: float = 0.01,
    seed: int = 0,
    n_retain_people: int = 16,
    n_other_people: int = 40,
    n_general: int = 300,
) -> ForgetTask:
    """Pick `share` of the world's people (at least one) whose private facts are to be forgotten,
    `n_retain_people` others whose facts a method may train on to retain them, and
    `n_other_people` more on whom retention is measured; deterministic in `seed`."""
    if not 0 < share < 1:
        raise ValueError(f"share: expected a number between 0 and 1, got {share!r}")
    n_forget = max(1, round(share * len(world.people)))
    if n_forget + n_retain_people + n_other_people > len(world.people):
        raise ValueError(
            f"share, n_retain_people, n_other_people: {n_forget} + {n_retain_people} + "
            f"{n_other_people} people asked for, the world has {len(world.people)}"
        )
    order = random.Random(f"forget-task-{world.seed}-{seed}").sample(
        world.people, len(world.people)
    )
    people = order[:n_forget]
    retain_people = order[n_forget : n_forget + n_retain_people]
    other = order[n_forget + n_retain_people : n_forget + n_retain_people + n_other_people]
    names = set(people) | {world.aliases[p] for p in people if p in world.aliases}
    documents = [line for line in CORPUS_FILE.read_text().splitlines() if line.strip()]
    general = [doc for doc in documents if not any(name in doc for name in names)][:n_general]
    return ForgetTask(
        people=tuple(people),
        retain_people=tuple(retain_people),
        forget=_facts(world, people, PRIVATE_RELATIONS, "train"),
        forget_paraphrase=_facts(world, people, PRIVATE_RELATIONS, "heldout"),
        retain=_facts(world, people, PUBLIC_RELATIONS, "train")
        + _facts(world, retain_people, PERSON_RELATIONS, "train"),
        in_domain=_facts(world, people, PUBLIC_RELATIONS, "heldout"),
        other_people=_facts(world, other, PERSON_RELATIONS, "train"),
        general=general,
    )


def perturbed_answers(world: World, fact: FactPrompt, n: int = N_PERTURBED) -> list[str]:
    """`n` wrong answers of the fact's answer type (with a leading space), the same for every
    template of the fact: TOFU's perturbed answers."""
    wrong = [c for c in world.candidates(fact.relation) if " " + c != fact.answer]
    rng = random.Random(f"perturbed-{fact.subject}-{fact.relation}")
    return [" " + c for c in rng.sample(wrong, n)]


def write_forget_task(world: World, task: ForgetTask, out_dir: str | Path) -> list[Path]:
    """Write the task's sets as plain unlearning files (`{"prompt", "answer",
    "perturbed_answer", "subject", "relation"}` per line, `kedit.data.load_unlearning`) and the
    general documents as `general.txt`; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in TASK_FILES:
        lines = [
            json.dumps(
                {
                    "prompt": fact.prompt,
                    "answer": fact.answer,
                    "perturbed_answer": perturbed_answers(world, fact),
                    "subject": fact.subject,
                    "relation": fact.relation,
                }
            )
            for fact in getattr(task, name)
        ]
        path = out / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    general = out / "general.txt"
    general.write_text("\n".join(task.general) + "\n")
    return [*paths, general]
