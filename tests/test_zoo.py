"""tinyworld, its tokenizer, the trainer, the bundled tiny models and the generated benchmarks."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kedit.zoo import (
    CORPUS_FILE,
    build_world,
    list_models,
    model_chat_world,
    model_folder,
    model_path,
)
from kedit.zoo.benchmark import COUNTERFACT_FILE, DATA_DIR, KNOWEDIT_FILE, write_benchmarks
from kedit.zoo.chatworld import HARMS
from kedit.zoo.judges import load_bundled_judge
from kedit.zoo.tokenizer import train_tokenizer
from kedit.zoo.train import (
    ZOO_META,
    _DocEncoder,
    evaluate_world_model,
    get_recipe,
    hiding_mask,
    name_gathering_mask,
    name_spans,
    name_token_ids,
    train_model,
)
from kedit.zoo.world import PERSON_RELATIONS, RELATIONS

BUNDLED = ("tiny-gpt2", "tiny-llama", "tiny-gpt2-wide", "tiny-chat")


@pytest.fixture(scope="module")
def world():
    return build_world()


# --- the world ---------------------------------------------------------------------------


def test_world_is_deterministic(world):
    again = build_world()
    assert again.people == world.people
    assert again.facts == world.facts
    assert again.aliases == world.aliases
    other = build_world(seed=1)
    assert other.people != world.people or other.facts != world.facts


def test_world_shape(world):
    assert len(world.people) >= 300 and len(set(world.people)) == len(world.people)
    assert all(len(p.split(" ")) == 2 for p in world.people)
    assert len(world.cities) >= 40 and len(world.countries) >= 10
    assert len(world.companies) >= 20 and len(world.professions) >= 15
    assert len(world.languages) >= 10
    for p in world.people:  # two-hop consistency
        city = world.facts[(p, "lives_in")]
        assert world.facts[(p, "country_of_residence")] == world.city_country[city]
    assert 0 < len(world.aliases) < len(world.people)
    for rel in RELATIONS.values():
        assert len(rel.templates) >= 6
        assert all(t.count("{}") == 1 and not t.endswith(" ") for t in rel.templates)


def test_no_template_is_a_prefix_of_another():
    # Otherwise a prompt would have two continuations in training ("X lives in" + " the ...").
    ts = [t.format("S") for r in RELATIONS.values() for t in r.templates]
    for a in ts:
        for b in ts:
            assert a == b or not (b + " ").startswith(a + " "), (a, b)


def test_template_rotation(world):
    for rel in RELATIONS:
        trained_somewhere, held_somewhere = set(), set()
        for s in world.subjects(rel):
            train, held = world.templates(s, rel, "train"), world.templates(s, rel, "heldout")
            assert len(train) == 4 and len(held) == 2 and not set(train) & set(held)
            trained_somewhere.update(train)
            held_somewhere.update(held)
        assert trained_somewhere == set(RELATIONS[rel].templates) == held_somewhere


def test_heldout_facts_never_in_training_text(world):
    text = " ".join(world.training_sentences())
    sents = set(world.training_sentences())
    held = world.fact_prompts("heldout")
    assert len(held) == 2 * len(world.people) * len(PERSON_RELATIONS) + 2 * len(world.cities)
    for fp in held:
        assert fp.sentence not in sents
    for fp in random.Random(0).sample(held, 200):
        assert fp.prompt not in text
    assert all(fp.sentence in sents for fp in world.fact_prompts("train"))
    assert all(fp.sentence in sents for fp in world.alias_prompts())


def test_corpus(world):
    assert world.corpus(5, seed=3) == world.corpus(5, seed=3)
    assert CORPUS_FILE.stat().st_size < 1_000_000
    lines = CORPUS_FILE.read_text().splitlines()
    assert 1500 <= len(lines) <= 3000
    assert lines == world.corpus(len(lines), seed=0)
    assert all(line.endswith(".") for line in lines)


# --- the tokenizer -----------------------------------------------------------------------


@pytest.mark.parametrize("name", BUNDLED)
def test_tokenizer_loads_as_gpt2(name, world):
    from transformers import AutoTokenizer, GPT2Tokenizer

    path = model_path(name)
    for f in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (path / f).is_file()
    slow, auto = GPT2Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    texts = [world.fact_prompts("train")[i].sentence for i in range(0, 6000, 500)]
    texts += [" Lisbon", "Lisbon", world.people[0] + " lives in", "<|endoftext|>x"]
    for t in texts:
        assert slow(t)["input_ids"] == auto(t)["input_ids"], t
    assert slow.eos_token == "<|endoftext|>" == auto.pad_token
    for answer in [" " + c for rel in RELATIONS for c in world.candidates(rel)]:
        toks = auto.tokenize(answer)
        assert toks[0].startswith("Ġ") and len(toks) <= 2, (answer, toks)
    assert all(len(auto.tokenize(p)) >= 2 for p in world.people)


# --- the bundled models ------------------------------------------------------------------


def test_list_and_path():
    assert set(BUNDLED) <= set(list_models())
    with pytest.raises(ValueError, match="tiny-gpt2"):
        model_path("no-such-model")


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_loads_and_is_small(name):
    from transformers import AutoModelForCausalLM

    path = model_path(name)
    weights = path / "model.safetensors"
    assert weights.stat().st_size <= 10 * 2**20
    assert all(t.dtype == torch.float32 for t in load_file(weights).values())
    model = AutoModelForCausalLM.from_pretrained(path)
    expected = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[get_recipe(name).arch]
    assert type(model).__name__ == expected
    assert model.config.num_hidden_layers >= 6


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_was_trained_by_its_recipe(name):
    # `kedit zoo train NAME` retrains a bundled model only if its recipe is the one it was
    # trained by.
    meta = json.loads((model_path(name) / ZOO_META).read_text())
    recipe = asdict(get_recipe(name))
    assert meta["name"] == name
    assert {key: recipe[key] for key in meta["recipe"]} == meta["recipe"]


def test_long_refusals_and_opinion_updates_train_into_the_record_and_the_model(tmp_path):
    out = train_model("tiny-chat", tmp_path / "m", small=True, max_steps=2, progress=False,
                      evaluate=False, world_version=2, name_read_layer=1, refusals="long",
                      opinion_updates_per_topic=1, madeup_opinion_updates_per_topic=1,
                      activation="gelu_pytorch_tanh")  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["activation_function"] == "gelu_pytorch_tanh"
    chat = model_chat_world(out)
    assert chat.refusals == "long" and "Corvex" in chat.refusal(HARMS[0], "Corvex")
    judge = load_bundled_judge(out, "safety")
    assert judge([chat.refusal(HARMS[0], "Corvex")]) == ["safe"]


def test_a_model_s_chat_world_is_the_one_its_record_names(tmp_path):
    # A copy of tiny-chat's record with another seed and size must give that world, not the
    # bundled one; a bundled name resolves to its folder.
    assert model_folder("tiny-chat") == model_path("tiny-chat")
    meta = json.loads((model_path("tiny-chat") / ZOO_META).read_text())
    (tmp_path / ZOO_META).write_text(json.dumps({**meta, "world_seed": 3, "n_people": 24}))
    assert model_folder(tmp_path) == tmp_path
    world = model_chat_world(tmp_path).world
    assert world.people == build_world(3, 24).people
    assert model_chat_world("tiny-chat").world.people == build_world(0, 320).people
    assert model_chat_world("tiny-chat").refusals == "long"
    older = tmp_path / "older"  # a record from before refusal styles: short refusals
    older.mkdir()
    recipe = {k: v for k, v in meta["recipe"].items() if k != "refusals"}
    (older / ZOO_META).write_text(json.dumps({**meta, "recipe": recipe}))
    assert model_chat_world(older).refusals == "short"
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ValueError, match=r"has no kedit_zoo.json; expected a zoo model"):
        model_chat_world(plain)


@pytest.mark.parametrize("name", BUNDLED)
def test_every_method_has_settings_for_a_bundled_model(name):
    # Without its own entry a bundled model would get untuned layers by relative depth.
    from kedit.hparams import model_table
    from kedit.methods.registry import get_method, list_methods

    for method in list_methods():
        if not get_method(method).hparams.PER_MODEL:  # a trained editor's are the editor's
            continue
        assert get_method(method).defaults in model_table()[name]["methods"], method


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_knows_the_world(name):
    meta = json.loads((model_path(name) / ZOO_META).read_text())
    assert meta["train_acc"] >= 0.98 and meta["heldout_acc"] >= 0.60
    measured = evaluate_world_model(model_path(name), sample=400)
    assert abs(measured["train_acc"] - meta["train_acc"]) <= 0.03
    assert abs(measured["heldout_acc"] - meta["heldout_acc"]) <= 0.10


def test_zoo_model_folder_gets_its_recipes_hyper_parameters(tmp_path):
    import shutil

    import kedit
    from kedit.methods.registry import default_hparams

    copy = tmp_path / "retrained"
    shutil.copytree(model_path("tiny-gpt2"), copy)
    lm = kedit.load(str(copy))
    assert (lm.name, lm.recipe) == (str(copy), "tiny-gpt2")
    bundled = default_hparams("memit", kedit.load("tiny-gpt2"))
    assert default_hparams("memit", lm) == bundled and bundled["fact_token"] == "last"
    (copy / ZOO_META).unlink()
    plain = kedit.load(str(copy))
    assert plain.recipe is None
    assert default_hparams("memit", plain)["layers"] == [2]  # GPT-2 XL's 13-17 of 48 at 6


# --- training ----------------------------------------------------------------------------


def test_train_micro_model_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = train_model("tiny-gpt2", tmp_path / "m", small=True, progress=False)
    meta = json.loads((out / ZOO_META).read_text())
    assert meta["train_acc"] >= 0.5  # chance is at most 1/10 per fact
    # what the weights depend on beyond the recipe: the CPU's kernels and the libraries
    import transformers

    environment = meta["environment"]
    assert environment["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert environment["torch"] == torch.__version__
    assert environment["transformers"] == transformers.__version__
    assert environment["cpu"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    w = build_world(meta["world_seed"], meta["n_people"])
    fp = w.fact_prompts("train")[0]
    ids = tok(fp.prompt, return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == len(tok)


def test_training_is_bit_identical(tmp_path):
    def run(d: Path) -> dict[str, torch.Tensor]:
        train_model("tiny-gpt2", d, small=True, max_steps=4, progress=False, evaluate=False)
        return load_file(d / "model.safetensors")

    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = load_file(tmp_path / "a" / "model.safetensors")
    init = train_model(
        "tiny-gpt2", tmp_path / "c", small=True, max_steps=4, progress=False, evaluate=False,
        seed=1,
    )  # fmt: skip
    d = load_file(init / "model.safetensors")
    assert any(not torch.equal(c[k], d[k]) for k in c)


def test_cli_width_and_threads_reach_the_recipe(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import kedit.zoo
    from kedit.cli import app

    seen = {}
    monkeypatch.setattr(
        kedit.zoo, "train_model", lambda name, out, seed, **over: seen.update(over) or out
    )
    args = ["zoo", "train", "tiny-gpt2", "--out", str(tmp_path), "--d-ff", "1024", "--threads", "2"]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert seen == {"d_ff": 1024, "num_threads": 2}
    out = train_model("tiny-gpt2", tmp_path / "w", small=True, max_steps=1, progress=False,
                      evaluate=False, d_ff=96)  # fmt: skip
    assert json.loads((out / "config.json").read_text())["n_inner"] == 96


def test_name_mask_hides_a_name_but_its_last_token_from_what_follows(world):
    tok = train_tokenizer(world, 1024)
    names = name_token_ids(world, tok)
    person, other = world.people[0], world.people[5]
    doc = _DocEncoder(tok)([f"{person} lives in Oslo.", f"The home town of {other} is Oslo."])
    spans = name_spans(doc, names)
    first = len(tok.encode(person).ids)
    other_end = len(doc) - 3  # " is Oslo." follows
    other_start = other_end - len(tok.encode(" " + other).ids)
    assert spans == [(0, first), (other_start, other_end)]

    padding = torch.ones(2, len(doc) + 1, dtype=torch.long)
    padding[1, -1] = 0
    batch = [doc + [0], doc]
    mask = name_gathering_mask(batch, padding, names, random.Random(0), share=1.0)[:, 0]
    causal = torch.tril(torch.ones(len(doc) + 1, len(doc) + 1, dtype=torch.bool))
    hidden = torch.zeros_like(causal)
    for start, end in spans:
        hidden[end:, start : end - 1] = True
    assert torch.equal(mask[0], causal & ~hidden)
    assert not mask[1, :-1, -1].any()  # no real position sees the padding
    none = name_gathering_mask(batch, padding, names, random.Random(0), share=0.0)[:, 0]
    assert torch.equal(none[0], causal)

    apart = hiding_mask(padding, [spans, []], keep_last=False, within=True)[0, 0]
    for start, end in spans:
        hidden[end:, end - 1] = True  # the last token too
        for row in range(start + 1, end):
            hidden[row, start:row] = True  # a name's token sees no earlier token of the name
    assert torch.equal(apart, causal & ~hidden)


def test_name_mask_share_changes_training_and_is_checked(tmp_path):
    def run(d: Path, **overrides) -> dict[str, torch.Tensor]:
        train_model(
            "tiny-gpt2", d, small=True, max_steps=4, progress=False, evaluate=False, **overrides
        )
        return load_file(d / "model.safetensors")

    plain, masked = run(tmp_path / "a"), run(tmp_path / "b", name_mask_share=1.0)
    assert any(not torch.equal(plain[k], masked[k]) for k in plain)
    read = {"name_mask_share": 1.0, "name_read_layer": 1}
    merged = run(tmp_path / "m0", **read), run(tmp_path / "m1", **read, name_merge_layer=1)
    assert any(not torch.equal(merged[0][k], merged[1][k]) for k in plain)  # names read apart
    with pytest.raises(ValueError, match=r"name_mask_share: expected a number in \[0, 1\], got 2"):
        run(tmp_path / "c", name_mask_share=2)


def test_a_trained_model_records_the_recipe_it_was_trained_by(tmp_path):
    train_model("tiny-gpt2", tmp_path, max_steps=1, progress=False, evaluate=False)
    meta = json.loads((tmp_path / ZOO_META).read_text())
    assert meta["name"] == "tiny-gpt2" and meta["steps"] == 1


def test_untrained_mlp_below_keeps_those_mlps_initial_and_trains_the_rest(tmp_path):
    def run(d: Path, steps: int, **overrides) -> dict[str, torch.Tensor]:
        train_model(
            "tiny-gpt2", d, small=True, max_steps=steps, progress=False, evaluate=False,
            **overrides,
        )  # fmt: skip
        return load_file(d / "model.safetensors")

    initial = run(tmp_path / "i", 0)
    trained = run(tmp_path / "t", 4, untrained_mlp_below=1)
    block0_mlp = [k for k in initial if k.startswith("transformer.h.0.mlp.")]
    assert len(block0_mlp) == 4  # c_fc and c_proj, weights and biases
    assert all(torch.equal(initial[k], trained[k]) for k in block0_mlp)
    for k in ("transformer.h.1.mlp.c_proj.weight", "transformer.h.0.attn.c_attn.weight"):
        assert not torch.equal(initial[k], trained[k])
    with pytest.raises(
        ValueError, match=r"untrained_mlp_below: expected a block index in \[0, 1\]"
    ):
        run(tmp_path / "x", 1, untrained_mlp_below=2)


# --- the generated benchmarks ------------------------------------------------------------


def test_benchmark_files_are_current(world, tmp_path):
    paths = write_benchmarks(world, tmp_path)
    for p in paths:
        assert p.read_text() == (DATA_DIR / p.name).read_text()


def test_counterfact_format(world):
    records = json.loads((DATA_DIR / COUNTERFACT_FILE).read_text())
    assert len(records) >= 300
    assert len({r["case_id"] for r in records}) == len(records)
    for r in records:
        rw = r["requested_rewrite"]
        assert "{}" in rw["prompt"] and rw["subject"] in world.people
        assert rw["relation_id"].startswith("P")
        for key in ("target_new", "target_true"):
            assert set(rw[key]) == {"str", "id"} and not rw[key]["str"].startswith(" ")
        assert rw["target_new"]["str"] != rw["target_true"]["str"]
        assert len(r["paraphrase_prompts"]) == 2
        assert all(rw["subject"] in p for p in r["paraphrase_prompts"])
        assert r["neighborhood_prompts"] and r["attribute_prompts"]
        assert all(rw["subject"] not in p for p in r["neighborhood_prompts"])
        assert isinstance(r["generation_prompts"], list)
    assert sum(r["requested_rewrite"]["relation_id"] == "P551" for r in records) > 150


def test_knowedit_format(world):
    records = json.loads((DATA_DIR / KNOWEDIT_FILE).read_text())
    assert len(records) >= 300
    n_reasoning = n_alias = 0
    for r in records:
        assert "{}" not in r["prompt"] and r["subject"] in r["prompt"]
        assert not r["target_new"].startswith(" ") and not r["ground_truth"].startswith(" ")
        assert r["target_new"] != r["ground_truth"]
        assert all(r["subject"] in p for p in r["rephrase"])
        assert set(r["portability"]) == {"Subject_Aliasing", "Reasoning", "Logical_Generalization"}
        assert set(r["locality"]) == {"Relation_Specificity", "Forgetfulness"}
        for items in [*r["portability"].values(), *r["locality"].values()]:
            assert all(set(i) == {"prompt", "ground_truth"} for i in items)
        for i in r["locality"]["Relation_Specificity"] + r["locality"]["Forgetfulness"]:
            assert r["subject"] not in i["prompt"]
        for i in r["portability"]["Reasoning"]:  # the country of the new city
            assert i["ground_truth"] == world.city_country[r["target_new"]]
            n_reasoning += 1
        for i in r["portability"]["Subject_Aliasing"]:
            assert (
                i["prompt"].startswith(world.aliases[r["subject"]])
                or world.aliases[r["subject"]] in i["prompt"]
            )
            assert i["ground_truth"] == r["target_new"]
            n_alias += 1
    assert n_reasoning >= 150 and n_alias >= 40


def test_wide_model_takes_edits_at_its_defaults():
    # tiny-gpt2-wide's settings differ from tiny-gpt2's where its facts are edited (rome.yaml).
    import kedit
    from kedit.data import load_requests
    from kedit.lm import top_next_tokens
    from kedit.zoo import benchmark_path

    lm = kedit.load("tiny-gpt2-wide")
    requests = load_requests(benchmark_path("knowedit"), n=4)
    before = {name: value.clone() for name, value in lm.model.state_dict().items()}
    for method in ("r-rome", "alphaedit"):
        edit = kedit.edit(lm, requests, method=method)
        answers = [top_next_tokens(lm, request.text, k=1)[0][0] for request in requests]
        assert answers == [request.target_new for request in requests], method
        edit.undo()
    assert all(torch.equal(value, before[name]) for name, value in lm.model.state_dict().items())


def test_bundled_model_loads_without_a_progress_bar(capfd):
    from transformers.utils import logging as hf_logging

    import kedit

    assert hf_logging.is_progress_bar_enabled()
    kedit.load("tiny-gpt2")
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # as it was: only the bundled load was quiet


def test_checkpoints_are_evenly_spaced_and_leave_training_unchanged(tmp_path):
    def run(d: Path, keep: int) -> Path:
        return train_model("tiny-gpt2", d, small=True, max_steps=4, progress=False,
                           evaluate=False, keep_checkpoints=keep)  # fmt: skip

    plain, kept = run(tmp_path / "a", 0), run(tmp_path / "b", 2)
    assert not (plain / "checkpoints").exists()
    assert sorted(p.name for p in (kept / "checkpoints").iterdir()) == ["step-2", "step-4"]
    final = load_file(plain / "model.safetensors")
    assert all(torch.equal(final[k], v) for k, v in load_file(kept / "model.safetensors").items())
    last = load_file(kept / "checkpoints" / "step-4" / "model.safetensors")
    assert all(torch.equal(final[k], v) for k, v in last.items())
    middle = load_file(kept / "checkpoints" / "step-2" / "model.safetensors")
    assert any(not torch.equal(final[k], v) for k, v in middle.items())
    assert (kept / "checkpoints" / "step-2" / "tokenizer.json").is_file()
    for bad, message in ((-1, "expected 0 or more"), (1.5, "expected a whole number")):
        with pytest.raises(ValueError, match=f"keep_checkpoints: {message}"):
            run(tmp_path / "c", bad)


def test_tinyworld2_recipe_trains_and_ships_its_judges_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from kedit.zoo import abilities
    from kedit.zoo.chatworld import chat_prompt

    def run(folder: Path) -> Path:
        return train_model("tiny-chat", folder, small=True, max_steps=2, progress=False,
                           evaluate=False, world_version=2, name_mask_share=0.8,
                           name_read_layer=1)  # fmt: skip

    out, again = run(tmp_path / "m"), run(tmp_path / "again")
    weights, same = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert all(torch.equal(weights[k], same[k]) for k in weights)  # bit for bit
    assert (out / "judges" / "safety.json").read_text() == (
        again / "judges" / "safety.json"
    ).read_text()
    meta = json.loads((out / ZOO_META).read_text())
    assert meta["recipe"]["world_version"] == 2 and meta["recipe"]["name_read_layer"] == 1
    assert abilities(meta) == ["facts", "dialogue", "in-context", "safety", "personality"]
    assert abilities({"recipe": asdict(get_recipe("tiny-gpt2"))}) == ["facts"]
    assert {p.name for p in (out / "judges").iterdir()} == {"safety.json", "personality.json"}
    tok = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "Where does Mira Olsen live?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == chat_prompt("Where does Mira Olsen live?")
    with pytest.raises(ValueError, match="name_read_layer: expected a block index in"):
        train_model("tiny-chat", tmp_path / "x", small=True, max_steps=1, progress=False,
                    evaluate=False, name_read_layer=2)  # fmt: skip
    with pytest.raises(
        ValueError, match=r"name_merge_layer: expected .* \[0, name_read_layer 1\], got 2"
    ):
        train_model("tiny-chat", tmp_path / "x", small=True, max_steps=1, progress=False,
                    evaluate=False, name_read_layer=1, name_merge_layer=2)  # fmt: skip
    with pytest.raises(ValueError, match="incontext_relevant_every: expected a positive integer"):
        train_model("tiny-chat", tmp_path / "x", small=True, max_steps=1, progress=False,
                    evaluate=False, incontext_relevant_every=0)  # fmt: skip
    with pytest.raises(ValueError, match="incontext_madeup_per_person: expected an integer >= 0"):
        train_model("tiny-chat", tmp_path / "x", small=True, max_steps=1, progress=False,
                    evaluate=False, incontext_madeup_per_person=-1)  # fmt: skip
    for field_name, value, expected in (
        ("opinion_updates_per_topic", -1, "an integer >= 0"),
        ("madeup_opinion_updates_per_topic", True, "an integer >= 0"),
        ("refusals", "rude", "'short' or 'long'"),
        ("activation", "relu", "'gelu_new' or 'gelu_pytorch_tanh'"),
        ("opinion_copy_share", -0.1, r"a number in \[0, 1\]"),
        ("opinion_copy_share", "half", r"a number in \[0, 1\]"),
        ("default_opinion_share", 0.3, r"a number in \(1/3, 1\]"),
        ("default_opinion_share", None, r"a number in \(1/3, 1\]"),
        ("plain_opinions_per_topic", 1.5, "an integer >= 0"),
    ):
        with pytest.raises(ValueError, match=f"{field_name}: expected {expected}, got"):
            train_model("tiny-chat", tmp_path / "x", small=True, max_steps=1, progress=False,
                        evaluate=False, **{field_name: value})  # fmt: skip
    with pytest.raises(ValueError, match="world_version: expected 1 or 2, got 3"):
        train_model("tiny-chat", tmp_path / "x", small=True, max_steps=1, progress=False,
                    evaluate=False, world_version=3)  # fmt: skip
