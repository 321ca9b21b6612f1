"""The exact retrain baseline: which facts a forget set names, which training sentences go, the
trainer's `exclude` hook, and the cached retrain of a zoo model (micro recipe, a few steps)."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from kedit.zoo import ZOO_META, build_world
from kedit.zoo.retrain import RETRAIN_KEY, forgotten_facts, retrain_without, sentences_of
from kedit.zoo.tokenizer import EOS, train_tokenizer
from kedit.zoo.train import _DocEncoder, _epoch_batches, get_recipe, train_model


@pytest.fixture(scope="module")
def world():
    return build_world()


def test_a_fact_is_named_by_any_of_its_templates_or_its_alias(world):
    person = next(p for p in world.people if p in world.aliases)
    trained = world.templates(person, "lives_in", "train")[0].format(person)
    heldout = world.templates(person, "employer", "heldout")[0].format(world.aliases[person])
    items = [
        (trained, world.answer(person, "lives_in")),
        (heldout + " ", world.facts[(person, "employer")]),  # spaces do not matter
    ]
    assert forgotten_facts(world, items) == {(person, "lives_in"), (person, "employer")}
    with pytest.raises(ValueError, match=r"forget item 1: 'Mira Olsen lives in' -> ' Oslo'"):
        forgotten_facts(world, [items[0], ("Mira Olsen lives in", " Oslo")])
    wrong_answer = (trained, " Atlantis")
    with pytest.raises(ValueError, match="states no fact of this tinyworld"):
        forgotten_facts(world, [wrong_answer])


def test_every_training_sentence_of_a_forgotten_fact_goes_and_no_other(world):
    aliased = next(p for p in world.people if p in world.aliases)
    plain = next(p for p in world.people if p not in world.aliases)
    facts = {(aliased, "employer"), (plain, "lives_in"), (world.cities[0], "located_in")}

    def stating(subject: str, relation: str) -> set[str]:
        names = [subject, world.aliases.get(subject)]
        answer = world.answer(subject, relation)
        templates = world.relations[relation].templates
        return {t.format(name) + answer + "." for name in names if name for t in templates}

    trained = set(world.training_sentences())
    expected = set().union(*(stating(*fact) for fact in facts)) & trained
    assert sentences_of(world, facts) == expected
    # Four training templates per fact, and the alias states the person's facts twice more.
    assert len(expected) == 4 + 2 + 4 + 4


def test_the_trainer_leaves_out_exactly_the_excluded_sentences():
    world = build_world(0, 24)
    recipe = replace(get_recipe("micro-gpt2"), n_positions=4096)  # no document is cut short
    tokenizer = train_tokenizer(world, recipe.vocab_size)
    eos = tokenizer.token_to_id(EOS)
    sentences = world.training_sentences()
    excluded = set(random.Random(0).sample(sorted(set(sentences)), 10))
    batches = _epoch_batches(
        world, None, _DocEncoder(tokenizer), random.Random(1), recipe, eos, excluded
    )
    docs = [doc for batch in batches for doc in batch]
    text = " ".join(tokenizer.decode(ids) for ids, _ in docs)
    kept = Counter(s for s in sentences if s not in excluded)
    distinct = sorted(set(sentences))
    assert not any(a != b and a in b for a in distinct for b in distinct)  # counts are exact
    assert not any(sentence in text for sentence in excluded)
    assert {sentence: text.count(sentence) for sentence in kept} == kept


def test_excluding_nothing_trains_bit_identical_weights(tmp_path):
    def run(folder, **options):
        train_model(
            "tiny-gpt2", folder, small=True, max_steps=3, progress=False, evaluate=False, **options
        )
        return load_file(folder / "model.safetensors")

    plain, hooked = run(tmp_path / "a"), run(tmp_path / "b", exclude=frozenset())
    assert all(torch.equal(plain[k], hooked[k]) for k in plain)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A micro zoo model (two steps), its metadata, world and a person of it."""
    folder = tmp_path_factory.mktemp("micro") / "model"
    source = train_model(
        "tiny-gpt2", folder, small=True, max_steps=2, progress=False, evaluate=False
    )
    meta = json.loads((source / ZOO_META).read_text())
    world = build_world(meta["world_seed"], meta["n_people"])
    return source, meta, world, world.people[3]


def test_retrain_without_records_what_it_left_out_and_is_cached(micro, tmp_path, monkeypatch):
    source, meta, world, person = micro
    forget = [
        (t.format(person), world.answer(person, "lives_in"))
        for t in world.templates(person, "lives_in", "train")
    ]
    out = retrain_without(
        source, forget, tmp_path / "without", progress=False, max_steps=2, evaluate=False
    )
    made = json.loads((out / ZOO_META).read_text())[RETRAIN_KEY]
    assert made["facts"] == [[person, "lives_in"]]
    assert made["sentences_left_out"] == len(sentences_of(world, {(person, "lives_in")}))
    assert made["model"] == "micro-gpt2" and made["from"] == str(source)
    assert made["seed"] == meta["seed"]

    import kedit.zoo.train

    def no_training(*args, **kwargs):
        raise AssertionError("the cached retrain was trained again")

    monkeypatch.setattr(kedit.zoo.train, "train_model", no_training)
    assert retrain_without(source, forget[:1], tmp_path / "without") == out
    other = [
        (
            world.templates(person, "employer", "train")[0].format(person),
            world.answer(person, "employer"),
        )
    ]
    with pytest.raises(ValueError, match="out: .* already holds another model"):
        retrain_without(source, other, tmp_path / "without")
    with pytest.raises(ValueError, match="is itself a retrain"):
        retrain_without(out, forget, tmp_path / "again")


def test_retrain_without_takes_another_seed_and_caches_each_seed_apart(
    micro, tmp_path, monkeypatch
):
    import kedit.zoo.train

    source, meta, world, person = micro
    forget = [
        (
            world.templates(person, "lives_in", "train")[0].format(person),
            world.answer(person, "lives_in"),
        )
    ]
    seeds = []
    original = kedit.zoo.train.train_model

    def recording(name, out, seed, **options):
        seeds.append(seed)
        return original(name, out, seed, **options)

    monkeypatch.setattr(kedit.zoo.train, "train_model", recording)
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))
    options = {"progress": False, "max_steps": 2, "evaluate": False}
    exact = retrain_without(source, forget, **options)
    other = retrain_without(source, forget, seed=meta["seed"] + 1, **options)
    assert seeds == [meta["seed"], meta["seed"] + 1] and exact != other
    assert json.loads((other / ZOO_META).read_text())[RETRAIN_KEY]["seed"] == meta["seed"] + 1
    assert retrain_without(source, forget, seed=meta["seed"] + 1, **options) == other
    assert len(seeds) == 2  # cached
    with pytest.raises(ValueError, match="out: .* already holds another model"):
        retrain_without(source, forget, other, seed=meta["seed"] + 2)
    with pytest.raises(ValueError, match="seed: expected a whole number or None, got 1.5"):
        retrain_without(source, forget, seed=1.5)
