"""The exact retrain baseline of unlearning: a zoo model trained again from its recipe and seed,
with every training sentence of the facts to forget left out.

A method that unlearns perfectly leaves the model as if it had never seen those facts; for the
bundled models that model can be built, so unlearning is scored against it (TOFU's forget
quality compares with such a model; on real models it is out of reach). A forget item names a
fact when its prompt and answer are one of the fact's sentences, with any of its six templates
(training or held-out) or the person's alias; the fact's sentences in every template go.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kedit.zoo import ZOO_META, model_path
from kedit.zoo.world import FactPrompt, World, build_world

RETRAIN_KEY = "retrained_without"  # the entry of kedit_zoo.json that says what was left out


def _statements(world: World) -> dict[tuple[str, str], tuple[str, str]]:
    """(prompt, answer) of every way the world states a fact -> (subject, relation)."""
    people_by_alias = {alias: person for person, alias in world.aliases.items()}
    found: dict[tuple[str, str], tuple[str, str]] = {}
    for split in ("train", "heldout"):
        for fact in world.fact_prompts(split):
            found[fact.prompt, fact.answer.strip()] = (fact.subject, fact.relation)
            alias = world.aliases.get(fact.subject)
            if alias is not None:
                aliased = FactPrompt(alias, fact.relation, fact.template, fact.answer)
                found[aliased.prompt, fact.answer.strip()] = (fact.subject, fact.relation)
    for fact in world.alias_prompts():
        found[fact.prompt, fact.answer.strip()] = (people_by_alias[fact.subject], fact.relation)
    return found


def forgotten_facts(world: World, items: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    """The (subject, relation) facts the (prompt, answer) items state; an item that states no
    fact of the world raises a ValueError naming it."""
    statements = _statements(world)
    facts = set()
    for index, (prompt, answer) in enumerate(items):
        fact = statements.get((prompt.strip(), answer.strip()))
        if fact is None:
            raise ValueError(
                f"forget item {index}: {prompt!r} -> {answer!r} states no fact of this "
                f"tinyworld (seed {world.seed}, {len(world.people)} people); the exact retrain "
                "baseline can only leave out the world's own facts"
            )
        facts.add(fact)
    if not facts:
        raise ValueError("forget: expected at least one item, got none")
    return facts


def sentences_of(world: World, facts: set[tuple[str, str]]) -> set[str]:
    """Every training sentence that states one of `facts` (all training templates, and the alias
    sentences of an aliased person)."""
    people_by_alias = {alias: person for person, alias in world.aliases.items()}
    trained = world.fact_prompts("train")
    sentences = {f.sentence for f in trained if (f.subject, f.relation) in facts}
    sentences |= {
        f.sentence
        for f in world.alias_prompts()
        if (people_by_alias[f.subject], f.relation) in facts
    }
    return sentences


def facts_digest(facts: set[tuple[str, str]]) -> str:
    """A short sha256 of a set of facts, naming a retrain in caches and model folders."""
    return hashlib.sha256(json.dumps(sorted(facts)).encode()).hexdigest()[:16]


def _zoo_folder(model: str | Path) -> tuple[Path, dict[str, Any]]:
    """A bundled model's or zoo model folder's path and its `kedit_zoo.json`."""
    folder = Path(model) if Path(model).is_dir() else model_path(str(model))
    meta_path = folder / ZOO_META
    if not meta_path.is_file():
        raise ValueError(
            f"model: {str(model)!r} has no {ZOO_META}; only zoo models (kedit zoo list) can be "
            "retrained from their recipe"
        )
    meta = json.loads(meta_path.read_text())
    if RETRAIN_KEY in meta:
        raise ValueError(
            f"model: {str(model)!r} is itself a retrain without some facts; give the model it "
            f"was retrained from ({meta[RETRAIN_KEY]['model']!r})"
        )
    return folder, meta


def default_retrain_dir(name: str, digest: str) -> Path:
    """Where a retrain is cached when no folder is given: $KEDIT_CACHE/retrain/NAME-DIGEST."""
    root = Path(os.environ.get("KEDIT_CACHE") or Path.home() / ".cache" / "kedit")
    return root / "retrain" / f"{name}-{digest}"


def retrain_without(
    model: str | Path,
    forget: Iterable[tuple[str, str]],
    out_dir: str | Path | None = None,
    progress: bool = True,
    seed: int | None = None,
    **train_options: Any,
) -> Path:
    """Retrain zoo model `model` (a bundled name or a zoo model folder) from its recipe and seed
    without the facts the (prompt, answer) items of `forget` state; return the new folder.

    `seed` None keeps the original's seed (the exact retrain); another seed retrains the same
    data from other initial weights and batch order, for the spread of models that never saw
    the facts. The folder (`out_dir`, by default under $KEDIT_CACHE/retrain) is a cache: if it
    already holds this retrain, it is returned at once. Its `kedit_zoo.json` records the model
    retrained, the facts, the seed and the number of sentences left out. `train_options` go to
    `kedit.zoo.train.train_model` (e.g. `max_steps`, for tests).
    """
    from kedit.zoo.train import train_model

    folder, meta = _zoo_folder(model)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed: expected a whole number or None, got {seed!r}")
    seed = meta["seed"] if seed is None else seed
    world = build_world(meta["world_seed"], meta["n_people"])
    facts = forgotten_facts(world, forget)
    digest = facts_digest(facts)
    if out_dir is not None:
        out = Path(out_dir)
    else:
        out = default_retrain_dir(
            meta["name"], digest if seed == meta["seed"] else f"{digest}-seed{seed}"
        )
    done = out / ZOO_META
    if done.is_file() and (out / "model.safetensors").is_file():
        made = json.loads(done.read_text()).get(RETRAIN_KEY, {})
        same = made.get("facts_digest") == digest and made.get("model") == meta["name"]
        if same and made.get("seed", meta["seed"]) == seed:
            return out
        raise ValueError(
            f"out: {str(out)!r} already holds another model ({made or 'not a retrain'}); "
            "give an empty folder"
        )
    sentences = sentences_of(world, facts)
    train_model(
        meta["name"],
        out,
        seed,
        progress=progress,
        exclude=sentences,
        **{**meta["recipe"], **train_options},
    )
    written = json.loads(done.read_text())
    written[RETRAIN_KEY] = {
        "model": meta["name"],
        "from": str(folder),
        "facts_digest": digest,
        "seed": seed,
        "facts": sorted(facts),
        "sentences_left_out": len(sentences),
        "original_train_time_s": meta.get("train_time_s"),
    }
    done.write_text(json.dumps(written, indent=2) + "\n")
    return out
