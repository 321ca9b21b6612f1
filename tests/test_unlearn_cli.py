"""`kedit unlearn` and `kedit zoo retrain-without`: thin layers over the Python API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kedit
from kedit.cli import app
from kedit.zoo import build_world
from kedit.zoo.forget_task import build_forget_task, write_forget_task

TOFU = Path(__file__).parent / "data" / "real-formats"


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    world = build_world()
    folder = tmp_path_factory.mktemp("task")
    write_forget_task(world, build_forget_task(world, share=0.004), folder)
    return folder


def test_unlearn_writes_the_edit_scores_and_curves(task_files, tmp_path):
    out = tmp_path / "run"
    files = [("--data", "forget.jsonl"), ("--retain", "retain.jsonl"), ("--general", "general.txt")]
    args = ["unlearn", "--out", str(out), *(x for o, f in files for x in (o, str(task_files / f)))]
    args += "--method grad_diff -p steps=2 -p eval_every=1 -p stop_forget_acc=null --n 8".split()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "grad_diff on tiny-gpt2" in result.output
    record = json.loads((out / "results.json").read_text())
    assert record["method"] == "grad_diff" and record["hparams"]["steps"] == 2
    assert record["before"]["sets"]["forget"]["teacher_forced"]["token_accuracy"] == 1.0
    assert [p["step"] for p in record["info"]["curve"]] == [0, 1, 2]
    assert record["after"]["general"]["probability"]["perplexity"] > 0
    assert (out / "curves.png").stat().st_size > 0
    edit = kedit.apply(kedit.load("tiny-gpt2"), out / "unlearning.kedit")
    assert edit.method == "grad_diff" and edit.info["unlearning"]["forget_items"] == 8


def test_unlearn_scores_against_each_baseline_given(task_files, tmp_path):
    out = tmp_path / "run"
    args = ["unlearn", "--out", str(out), "--data", str(task_files / "forget.jsonl")]
    args += ["--retain", str(task_files / "retain.jsonl"), "--n", "8"]
    args += "--method grad_diff -p steps=1 -p stop_forget_acc=null".split()
    args += ["--baseline", "tiny-gpt2", "--baseline", "tiny-gpt2-wide"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())
    for stage in ("before", "after"):
        assert len(record[stage]["vs_baselines"]) == 2
        low, high = record[stage]["forget_quality_range"]
        assert low <= high
    # before unlearning, against itself as the first baseline: indistinguishable
    assert record["before"]["vs_baselines"][0]["forget_quality"] == 1.0


def _long_context_model(folder: Path) -> Path:
    """A random one-block GPT-2 with the bundled tokenizer and a context for TOFU's answers."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(kedit.zoo.model_path("tiny-gpt2"))
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=512,
        n_embd=32,
        n_layer=1,
        n_head=2,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_unlearn_reads_a_benchmark_spec_from_a_local_copy(tmp_path):
    shutil.copy(TOFU / "tofu_forget01_perturbed.jsonl", tmp_path / "forget01_perturbed.json")
    shutil.copy(TOFU / "tofu_retain90.jsonl", tmp_path / "retain99.json")
    model = _long_context_model(tmp_path / "model")
    args = [
        "unlearn",
        "--data",
        "tofu:forget01",
        "--data-dir",
        str(tmp_path),
        "--model",
        str(model),
        "--out",
        str(tmp_path / "run"),
    ] + "--method npo -p steps=1".split()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["after"]["sets"]["forget"]["items"] == 3
    assert record["after"]["sets"]["retain"]["items"] == 5
    assert "truth_ratio" in record["after"]["sets"]["forget"]["probability"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "forget-it"], "unknown unlearning method 'forget-it'"),
        (["--method", "memflex"], "retain: method 'memflex' trains on a retain set"),
        (["--data-dir", "."], "--data-dir: only with --data knowundo:CONFIG or tofu:SPLIT"),
        (["-p", "lr=-1"], "lr: expected a positive number"),
        (
            ["--data", str(TOFU / "tofu_retain90.jsonl")],
            "forget[0]: prompt and answer take 142 tokens, more than tiny-gpt2",
        ),
    ],
)
def test_unlearn_bad_input_is_one_error_line(task_files, tmp_path, extra, message):
    args = ["unlearn", "--data", str(task_files / "forget.jsonl"), "--out", str(tmp_path)]
    args += extra
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_retrain_without_passes_the_forget_facts_and_reports(task_files, tmp_path, monkeypatch):
    import kedit.zoo.retrain

    seen = {}

    def fake(name, pairs, out, seed):
        seen.update(name=name, pairs=pairs, out=out, seed=seed)
        out.mkdir(parents=True)
        made = {"facts": [["x", "lives_in"]] * 2, "sentences_left_out": 9}
        (out / "kedit_zoo.json").write_text(json.dumps({kedit.zoo.retrain.RETRAIN_KEY: made}))
        return out

    monkeypatch.setattr(kedit.zoo.retrain, "retrain_without", fake)
    forget = task_files / "forget.jsonl"
    args = [
        "zoo",
        "retrain-without",
        "tiny-gpt2",
        "--forget",
        str(forget),
        "--out",
        str(tmp_path / "r"),
        "--seed",
        "3",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in forget.read_text().splitlines()]
    assert seen["name"] == "tiny-gpt2" and seen["out"] == tmp_path / "r" and seen["seed"] == 3
    assert seen["pairs"] == [(row["prompt"], row["answer"]) for row in rows]
    assert "without 2 facts (9 training sentences)" in result.output


def test_the_help_names_every_registered_unlearning_method():
    from kedit.cli import UNLEARNING_METHODS
    from kedit.unlearn.registry import list_unlearning_methods

    assert sorted(UNLEARNING_METHODS.split(", ")) == list_unlearning_methods()
