"""Defaults per model: the model table, matching by name, hub id and config, relative depth."""

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)
from typer.testing import CliRunner

import kedit
from kedit.cli import app
from kedit.hparams import match_model
from kedit.lm import LM
from kedit.methods.registry import explain_hparams, list_methods, resolve_hparams

BUNDLED = ["tiny-gpt2", "tiny-llama", "tiny-gpt2-wide"]
# Every method's hyper-parameters on the bundled models, as resolved before the model table
# replaced the per-method YAML files (main at 11aa028).
BEFORE = json.loads((Path(__file__).parent / "data" / "bundled_hparams.json").read_text())


def on_meta(config, tokenizer, name):
    """A model of `config`'s shape whose weights take no memory (enough to match and resolve)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return LM(model, tokenizer, name=name)


# The published configs of the table's models, with a tiny vocabulary, and their ROME layer.
REAL = [
    ("gpt2-xl", GPT2Config(n_layer=48, n_embd=1600, n_head=25), [17]),
    ("gpt-j-6b", GPTJConfig(n_layer=28, n_embd=4096, n_head=16, rotary_dim=64), [5]),
    (
        "llama-2-7b",
        LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008),
        [5],
    ),
    (
        "llama-3-8b",
        LlamaConfig(
            num_hidden_layers=32,
            hidden_size=4096,
            intermediate_size=14336,
            num_attention_heads=32,
            num_key_value_heads=8,
        ),
        [5],
    ),
    (
        "mistral-7b",
        MistralConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336),
        [5],
    ),
    (
        "qwen2.5-7b",
        Qwen2Config(
            num_hidden_layers=28,
            hidden_size=3584,
            intermediate_size=18944,
            num_attention_heads=28,
            num_key_value_heads=4,
        ),
        [5],
    ),
]


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_models_keep_their_settings(name):
    lm = kedit.load(name)
    assert set(BEFORE[name]) <= set(list_methods())
    for method, before in BEFORE[name].items():
        after = json.loads(json.dumps(resolve_hparams(method, lm).to_dict()))
        assert after == before, method


@pytest.mark.parametrize(("entry", "config", "rome_layers"), REAL, ids=[r[0] for r in REAL])
def test_a_local_copy_is_matched_by_its_config(entry, config, rome_layers, bpe_tokenizer):
    config.vocab_size = 128
    lm = on_meta(config, bpe_tokenizer, name=f"/models/copy-of-{entry}")
    matched, how = match_model(lm)
    assert matched == entry and how.startswith("config")
    settings = explain_hparams("rome", lm)
    assert settings["layers"].value == rome_layers
    assert settings["layers"].source.startswith(f"model table: {entry}, matched by config")
    assert "EasyEdit" in settings["layers"].source or "ROME" in settings["layers"].source
    assert settings["mom2_corpus"].value == "Salesforce/wikitext:wikitext-103-raw-v1"


def test_hub_ids_match_in_any_case(bpe_tokenizer):
    # A small config under a hub id: the id decides, not the shape.
    lm = on_meta(GPTJConfig(vocab_size=128, n_layer=2, n_embd=64, n_head=4), bpe_tokenizer, "x")
    for hub_id, entry in [
        ("EleutherAI/GPT-J-6B", "gpt-j-6b"),
        ("meta-llama/Meta-Llama-3-8B-Instruct", "llama-3-8b"),
        ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
        ("openai-community/gpt2-xl", "gpt2-xl"),
    ]:
        lm.name = hub_id
        assert match_model(lm) == (entry, f"hub id {hub_id}")
    lm.name = "gpt2-xl"  # the entry's own name
    assert match_model(lm) == ("gpt2-xl", "name")
    assert match_model(kedit.load("tiny-llama")) == ("tiny-llama", "name")


def test_published_values_are_carried_with_easyedit_meaning(bpe_tokenizer):
    gpt2_xl = on_meta(REAL[0][1], bpe_tokenizer, "openai-community/gpt2-xl")
    memit = resolve_hparams("memit", gpt2_xl)
    # EasyEdit's hparams/MEMIT/gpt2-xl.yaml: layers 13-17, lambda 20000, clamp 0.75, 20 steps.
    assert memit.layers == [13, 14, 15, 16, 17] and memit.mom2_update_weight == 20000
    assert (memit.clamp_norm_factor, memit.v_steps, memit.v_weight_decay) == (0.75, 20, 0.5)
    assert memit.v_weight_decay_form == "easyedit"  # the decay term that 0.5 was tuned for


def test_other_models_get_layers_by_relative_depth_and_one_notice(bpe_tokenizer, caplog):
    small = on_meta(GPT2Config(vocab_size=128, n_layer=12), bpe_tokenizer, "my-gpt2")
    with caplog.at_level(logging.WARNING, logger="kedit"):
        for _ in range(2):
            rome = explain_hparams("rome", small)
    # GPT-2 XL's 17 of 48 at 12 layers: 4.25; its MEMIT window 13..17: 3.25..4.25.
    assert rome["layers"].value == [4]
    assert rome["layers"].source.startswith("relative depth: gpt2-xl's layers [17] of 48")
    assert resolve_hparams("memit", small).layers == [3, 4]
    # No GPT-2 has PMET settings: GPT-J-6B's 3..8 of 28 (the nearest depth) at 12: 1.3..3.4.
    assert resolve_hparams("pmet", small).layers == [1, 2, 3]
    notices = [r.getMessage() for r in caplog.records if "my-gpt2" in r.getMessage()]
    assert len(notices) == 3 and "\n" not in notices[0]
    assert "no tuned rome settings for my-gpt2" in notices[0] and "layers [4]" in notices[0]
    assert "no tuned memit settings" in notices[1]

    # A family with entries scales the nearest of them (Llama-2-7B's layer 5 of 32: 2.5 at 16).
    llama = on_meta(
        LlamaConfig(vocab_size=128, num_hidden_layers=16, hidden_size=64, intermediate_size=128),
        bpe_tokenizer,
        "my-llama",
    )
    assert resolve_hparams("rome", llama).layers == [3]
    # A family without entries scales GPT-2 XL's: 17 of 48 at 6 layers is 2.1.
    neox = on_meta(
        GPTNeoXConfig(vocab_size=128, num_hidden_layers=6, hidden_size=64, num_attention_heads=4),
        bpe_tokenizer,
        "my-neox",
    )
    assert resolve_hparams("rome", neox).layers == [2]
    assert resolve_hparams("ft-l", neox).layers == [0]


def test_a_table_entry_without_the_method_scales_its_family(bpe_tokenizer):
    llama3 = on_meta(REAL[3][1], bpe_tokenizer, "meta-llama/Meta-Llama-3-8B")
    memit = explain_hparams("memit", llama3)["layers"]  # EasyEdit has no MEMIT file for it
    assert memit.value == [4, 5, 6, 7, 8]
    assert memit.source.startswith("relative depth: llama-2-7b's layers [4, 5, 6, 7, 8] of 32")


def test_cli_methods_shows_where_each_value_comes_from(model_folder):
    runner = CliRunner()
    env = {"COLUMNS": "250"}
    shown = runner.invoke(app, ["methods", "rome", "-p", "v_lr=0.9"], env=env)
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert "rome on tiny-gpt2 (the CLI's default model" in shown.output
    row = {line.split("│")[1].strip(): line.split("│")[2:4] for line in lines if "│" in line}
    assert [cell.strip() for cell in row["layers"]] == ["[0]", "[2]"]
    assert [cell.strip() for cell in row["v_lr"]] == ["0.9", "override"]
    assert [cell.strip() for cell in row["kl_factor"]] == ["0.0625", "default"]
    assert [cell.strip() for cell in row["mom2_corpus"]] == ['"tinyworld"', "[1]"]
    assert "[2] model table: tiny-gpt2, matched by name; measured on tinyworld" in shown.output

    shown = runner.invoke(app, ["methods", "memit", "-m", str(model_folder)], env=env)
    assert shown.exit_code == 0, shown.output
    assert "relative depth: gpt2-xl's layers [13, 14, 15, 16, 17] of 48" in shown.output
    assert "Salesforce/wikitext:wikitext-103-raw-v1" in shown.output
    assert "not a bundled model" in shown.output


@pytest.fixture
def model_folder(random_gpt2, tmp_path):
    folder = tmp_path / "model"
    random_gpt2.model.save_pretrained(folder)
    random_gpt2.tokenizer.save_pretrained(folder)
    return folder
