"""tinyworld 2's data files, in the real benchmarks' formats, and its statistics corpus.

- ``tinyworld2_safeedit.json``: SafeEdit's records (Wang et al., 2024; the fields of
  ``zjunlp/SafeEdit``), one per harmful question, with the attacks taken in turn;
- ``tinyworld2_personality.json``: PersonalityEdit's records (``ent``, ``target_per`` and the
  opinion texts per trait, as EasyEdit's loader reads them), one per topic;
- ``tinyworld2_corpus.jsonl``: documents of statements and of dialogue, one JSON object with a
  ``text`` per line (dialogue spans lines), for second-moment statistics.

The tinyworld benchmark files (``tinyworld_knowedit.json``, ``tinyworld_counterfact.json``) hold
for tiny-chat as they are: its people and facts are tinyworld's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from kedit.zoo.chatworld import ATTACKS, TRAITS, ChatWorld, SafetyCase

SAFEEDIT_FILE = "tinyworld2_safeedit.json"
PERSONALITY_FILE = "tinyworld2_personality.json"
CORPUS2_FILE = "tinyworld2_corpus.jsonl"
DATA_DIR = Path(__file__).parent / "data"


def to_safeedit(chat: ChatWorld) -> list[dict]:
    """SafeEdit records: each harmful question (first phrasing) under one attack, the attacks
    in turn, with the generalization inputs (another attack, another question, both) and a
    fact question as the knowledge constraint."""
    questions = [case for case in chat.safety_cases("none") if case.question.startswith("How do")]
    facts = chat.chat_facts("train")
    records = []
    for index, case in enumerate(questions):
        attack = ATTACKS[index % len(ATTACKS)]
        other_attack = ATTACKS[(index + 3) % len(ATTACKS)]
        other: SafetyCase = questions[(index + len(questions) // 2) % len(questions)]
        fact = facts[(index * 37) % len(facts)]
        records.append(
            {
                "id": index,
                "unsafety category": case.category,
                "adversarial prompt": attack.template.format(case.question),
                "question": case.question,
                "attack category": attack.category,
                "attack name": attack.name,
                "unsafe generation": case.unsafe.strip(),
                "safe generation": case.safe.strip(),
                "generalization test": {
                    "test input of only harmful question": case.question,
                    "test input of other attack prompt input": other_attack.template.format(
                        case.question
                    ),
                    "attack_category": other_attack.category,
                    "attack_name": other_attack.name,
                    "test input of other question input": attack.template.format(other.question),
                    "test input of other questions and attack prompts": (
                        other_attack.template.format(other.question)
                    ),
                },
                "knowledge constrain": {"prompt": fact.question, "answer": fact.reply.strip()},
            }
        )
    return records


def to_personality(chat: ChatWorld) -> list[dict]:
    """PersonalityEdit records: per topic, four opinions in each trait and a target trait that
    is not the topic's default (the one an edit should bring about)."""
    records = []
    for index, topic in enumerate(chat.topics):
        others = [t for t in TRAITS if t != chat.default_trait[topic]]
        record: dict = {"ent": topic, "target_per": others[index % 2]}
        for trait in TRAITS:
            record[trait] = chat.opinions(topic, trait)[::5]
        records.append(record)
    return records


def corpus2(chat: ChatWorld, n_docs: int = 2000, seed: int = 0) -> list[str]:
    """`n_docs` documents: half of random training statements (as tinyworld's corpus), half of
    one to three dialogue turns (facts, opinions, safety, in-context updates)."""
    rng = random.Random(f"corpus2-{chat.seed}-{seed}")
    sents = chat.world.training_sentences(city_repeats=1)
    turns = chat.training_turns(random.Random(f"corpus2-turns-{chat.seed}-{seed}"))
    docs = []
    for k in range(n_docs):
        if k % 2 == 0:
            docs.append(" ".join(rng.choice(sents) for _ in range(rng.randint(2, 8))))
        else:
            docs.append("\n".join(rng.choice(turns) for _ in range(rng.randint(1, 3))))
    return docs


def write_chat_files(chat: ChatWorld, out_dir: str | Path = DATA_DIR) -> list[Path]:
    """Write the SafeEdit and PersonalityEdit files and the statistics corpus into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / SAFEEDIT_FILE, out / PERSONALITY_FILE, out / CORPUS2_FILE]
    paths[0].write_text(json.dumps(to_safeedit(chat), indent=4) + "\n")
    paths[1].write_text(json.dumps(to_personality(chat), indent=4) + "\n")
    paths[2].write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus2(chat)))
    return paths


if __name__ == "__main__":
    from kedit.zoo.chatworld import build_chat_world

    for path in write_chat_files(build_chat_world()):
        print(path, path.stat().st_size)
