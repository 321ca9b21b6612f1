"""PersonalityEdit (Mao et al., 2023, "Editing Personality for Large Language Models"): the
records EasyEdit's loader reads (``PersonalityEdit/{train,val,test}.json``) and tinyworld 2's
file. Each record: `ent` (the topic), optionally `target_per` (the trait an edit should bring
about; drawn from `seed` where absent, as EasyEdit draws it at random), and per trait
(`extraversion`, `agreeableness`, `neuroticism`) a list of opinion texts about the topic.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from kedit.data._common import Loaded, Record, collect, read_records
from kedit.requests import EditRequest

TRAITS = ("extraversion", "agreeableness", "neuroticism")
QUESTION = "What do you think of {}?"  # PersonalityEdit's question about a topic


@dataclass(frozen=True)
class PersonalityCase:
    """A topic, the trait to bring about, and opinion texts about the topic in every trait."""

    topic: str
    target: str
    texts: dict[str, tuple[str, ...]]
    case_id: str

    def requests(self, prompt: str) -> list[EditRequest]:
        """One request per target-trait text, each a reply (after a space) to `prompt`, which
        holds the topic: what a fine-tuning or locate-then-edit method trains on."""
        return [
            EditRequest(
                prompt=prompt,
                subject=self.topic,
                target_new=" " + text,
                case_id=self.case_id,
                extra={"target_per": self.target},
            )
            for text in self.texts[self.target]
        ]


def _case(record: Record, seed: int) -> PersonalityCase:
    topic = record.get("ent")
    texts = {}
    for trait in TRAITS:
        texts[trait] = tuple(record.strings(trait))
        if not texts[trait]:
            raise record.error(trait, "expected a non-empty list of opinion texts")
    if record.has("target_per"):
        target = record.get("target_per")
        if target not in TRAITS:
            raise record.error("target_per", f"expected one of {', '.join(TRAITS)}, got {target!r}")
    else:
        target = random.Random(f"personality-{seed}-{record.index}").choice(TRAITS)
    return PersonalityCase(topic, target, texts, str(record.index))


def load_personalityedit(
    path: str | Path, n: int | None = None, seed: int = 0, skip_bad: bool = False
) -> Loaded:
    """The PersonalityEdit cases of a file (the first `n`); `seed` draws a missing target
    trait, the same for a record whatever `n`."""
    source, records = read_records(path)
    return collect(
        records, source, "personalityedit", lambda record: _case(record, seed), n, skip_bad
    )
