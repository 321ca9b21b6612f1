import json
import shutil

import pytest
from typer.testing import CliRunner

from kedit.bench.plan import model_folder_name
from kedit.cli import app
from kedit.zoo import DATA_DIR, model_path

runner = CliRunner()
KNOWEDIT = str(DATA_DIR / "tinyworld_knowedit.json")


def run(*args):
    return runner.invoke(app, list(args))


def test_methods_lists_and_describes():
    result = run("methods")
    assert result.exit_code == 0 and "r-rome" in result.output
    result = run("methods", "rome")
    assert result.exit_code == 0 and "clamp_norm_factor" in result.output
    assert "[length in tokens, count]" in " ".join(result.output.replace("│", " ").split())
    result = run("methods", "memit", "--model", "tiny-gpt2")
    assert result.exit_code == 0 and "memit on tiny-gpt2" in result.output
    fact_token = next(line for line in result.output.splitlines() if "fact_token" in line)
    assert '"last"' in fact_token  # the model's default, not the dataclass's "subject_last"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["methods", "nope"], "unknown method 'nope'"),
        (["edit", "--prompt", "x", "--subject", "y", "--target", " z"], "prompt"),
        (["bench", "--data", "missing.json", "--out", "o"], "missing.json"),
        (
            ["edit", "--prompt", "{} is", "--subject", "y", "--target", " z", "-p", "v_stepz=1"],
            "v_stepz",
        ),
        (["edit", "--prompt", "{} is", "--subject", "y", "--target", " z", "-p", "nokey"], "key"),
        (
            ["edit", "--prompt", "{} is", "--subject", "y", "--target", " z", "-p", "layers=[0"],
            "--hparam 'layers=[0'",
        ),
        (["demo", "--model", "./no-such-model"], "'./no-such-model' is a path that does not exist"),
        (["demo", "--model", "README.md"], "'README.md' is a file; give a model folder"),
        (["stats", "collect", "--layers", "1", "--device", "nope"], "'nope' is not a torch device"),
        (["stats", "collect", "--layers", "1", "--device", "cuda:99"], "'cuda:99' asked for"),
        (
            ["edit", "--prompt", "{} is", "--subject", "Mira Olsen", "--target", " x"]
            + ["--method", "ft-m", "-p", "lr=1e30"],
            "non-finite",
        ),
    ],
)
def test_bad_input_is_one_clear_line(args, message):
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_bench_without_arguments_prints_its_help():
    result = run("bench")
    assert result.exit_code in (0, 2) and "bench [OPTIONS] COMMAND" in result.output
    assert "error" not in result.output


def test_a_hub_id_that_cannot_be_loaded_is_one_clear_line(monkeypatch):
    import transformers

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to the hub.\nCheck your connection.")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", unreachable)
    monkeypatch.setattr("kedit.lm.hub_reachable", lambda: True)  # reachable, yet loading fails
    result = run("demo", "--model", "some-org/some-model")
    assert result.exit_code == 2 and "Traceback" not in result.output
    output = " ".join(result.output.split())  # the console wraps long lines
    assert "'some-org/some-model' is not a bundled model" in output
    assert "failed: We couldn't connect to the hub." in output


def test_malformed_record_names_its_index(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"subject": "A B", "prompt": "A B is", "target_new": "x"}, {}]))
    result = run("bench", "--data", str(bad), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert "record 1" in result.output and "Traceback" not in result.output


def test_edit_shows_before_after_and_saves(tmp_path):
    path = tmp_path / "e.kedit"
    result = run(
        "edit",
        "--model",
        "tiny-gpt2",
        "--method",
        "r-rome",
        "--prompt",
        "{} lives in",
        "--subject",
        "Wim Dunmont",
        "--target",
        " Lisbon",
        "--save",
        str(path),
    )
    assert result.exit_code == 0, result.output
    assert "Before the edit" in result.output and "After the edit" in result.output
    assert path.stat().st_size > 0


def test_bench_writes_jsonl_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = ["bench", "--data", KNOWEDIT, "--out", str(out), "--method", "ft-m", "--n", "3"]
    first = run(*args, "--seeds", "1")
    assert first.exit_code == 0, first.output
    folder = out / "tiny-gpt2" / "ft-m" / "tinyworld_knowedit" / "independent" / "seed-0"
    lines = (folder / "cases.jsonl").read_text().splitlines()
    assert len(lines) == 3
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["metrics"]["n_cases"] == 3
    assert "reliability" in summary["metrics"]["post"]["teacher_forced"]
    assert "Edit Succ. (teacher_forced)" in (out / "report.md").read_text()
    (folder / "cases.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    again = run(*args, "--seeds", "1")
    assert again.exit_code == 0, again.output
    records = [json.loads(line) for line in (folder / "cases.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in records] == [json.loads(line)["case_id"] for line in lines]
    changed = run(*args, "--seeds", "1", "--contexts", "1")
    assert changed.exit_code == 2 and "other settings" in changed.output


def test_bench_refused_for_bad_input_leaves_out_as_it_was(tmp_path):
    out = tmp_path / "run"
    args = ["bench", "--data", KNOWEDIT, "--n", "1", "--seeds", "1", "--out", str(out)]
    for bad, message in [
        (["--method", "ft-m", "-p", "nope=1"], "unknown hyper-parameter 'nope'"),
        (["--method", "nope"], "unknown method 'nope'"),
        (["--method", "ft-m", "--protocol", "nope"], "protocols: expected some of"),
        (["--method", "ft-m", "--protocol", "sampling"], "sampling only adds fluency"),
        (["--method", "rome", "--mode", "batch", "--batch-size", "2"], "one request at a time"),
    ]:
        result = run(*args, *bad)
        assert result.exit_code == 2 and message in result.output, result.output
        assert not out.exists() or not any(out.rglob("*.json")), bad
    assert run(*args, "--method", "ft-m").exit_code == 0
    result = run("bench", "--method", "ft-m", "--out", str(out))
    assert result.exit_code == 2 and "give a benchmark file" in result.output
    assert "tinyworld_knowedit.json" in result.output.replace("\n", "")


def test_save_to_a_folder_and_out_on_a_file_are_one_line(tmp_path):
    args = ["edit", "--prompt", "{} lives in", "--subject", "Wim Dunmont", "--target", " Lisbon"]
    result = run(*args, "--method", "ft-m", "--save", str(tmp_path))
    assert result.exit_code == 2 and "is a folder; give a file name" in " ".join(
        result.output.split()
    )
    taken = tmp_path / "taken.txt"
    taken.write_text("x")
    result = run("bench", "--data", KNOWEDIT, "--n", "1", "--method", "ft-m", "--out", str(taken))
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "is a file; give a folder" in output


def test_bench_config_refuses_options_it_would_ignore(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"models: [tiny-gpt2]\nmethods: [ft-m]\ndatasets: [{KNOWEDIT}]\n")
    result = run("bench", "--config", str(plan), "--out", str(tmp_path / "o"), "--n", "1")
    assert result.exit_code == 2 and "--n would be ignored" in result.output
    assert not (tmp_path / "o").exists()


def test_bench_runs_of_a_model_folder_stay_inside_out(tmp_path):
    model = tmp_path / "models" / "my-model"
    shutil.copytree(model_path("tiny-gpt2"), model)
    out = tmp_path / "run"
    args = ["bench", "--data", KNOWEDIT, "--model", str(model), "--method", "ft-m", "--n", "1"]
    result = run(*args, "--seeds", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    leaf = out / "my-model" / "ft-m" / "tinyworld_knowedit" / "independent" / "seed-0"
    assert (leaf / "cases.jsonl").is_file()
    assert sorted(p.name for p in model.iterdir()) == sorted(
        p.name for p in model_path("tiny-gpt2").iterdir()
    )
    assert model_folder_name("org/some-model") == "org--some-model"


def test_bench_shards_merge_to_the_whole_run(tmp_path):
    base = ["bench", "--data", KNOWEDIT, "--method", "ft-m", "--n", "4", "--seeds", "1"]
    for index in range(2):
        result = run(*base, "--shard", f"{index}/2", "--out", str(tmp_path / f"s{index}"))
        assert result.exit_code == 0, result.output
    leaf = ("tiny-gpt2", "ft-m", "tinyworld_knowedit", "independent", "seed-0")
    folders = [str(tmp_path.joinpath(f"s{i}", *leaf)) for i in range(2)]
    for incomplete in ([folders[0]], [folders[0], folders[0]]):
        refused = run("bench", "merge", *incomplete, "--out", str(tmp_path / "part"))
        assert refused.exit_code == 2 and "expected the shards 0/2, 1/2 once each" in refused.output
    merged = run("bench", "merge", *folders, "--out", str(tmp_path / "all"))
    assert merged.exit_code == 0, merged.output
    summary = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert summary["metrics"]["n_cases"] == 4
    reliability = summary["metrics"]["post"]["teacher_forced"]["reliability"]
    report = (tmp_path / "all" / "report.md").read_text()
    assert f"tiny-gpt2 / ft-m / tinyworld_knowedit / independent | {reliability:.3f} |" in report
    assert report.splitlines()[0] == (
        "# Benchmark of ft-m: model tiny-gpt2; data tinyworld_knowedit.json; mode independent; "
        "seed 0, merged from 2 shards"
    )
    assert (tmp_path / "all" / "bars_teacher_forced.png").stat().st_size > 0
    sequential = run(*base, "--mode", "sequential", "--shard", "0/2", "--out", str(tmp_path / "q"))
    assert sequential.exit_code == 2 and "cannot be" in sequential.output
    assert run(*base, "--mode", "sequential", "--out", str(tmp_path / "q")).exit_code == 0
    (seq_run,) = (tmp_path / "q" / "tiny-gpt2" / "ft-m").glob("*/sequential*/seed-0")
    refused = run("bench", "merge", str(seq_run), "--out", str(tmp_path / "qm"))
    assert refused.exit_code == 2 and "is a sequential run" in " ".join(refused.output.split())


def test_zoo_list_shows_bundled_models():
    result = run("zoo", "list")
    assert result.exit_code == 0
    assert "tiny-gpt2" in result.output and "tiny-llama" in result.output
    cells = "".join(result.output.replace("│", " ").split())  # the console is 80 columns wide
    assert "tiny-gpt2-wide6/128/1024" in cells and "tiny-llama6/128/352" in cells
    folder = str(model_path("tiny-llama").parent)
    assert any(line.endswith(folder) for line in result.output.splitlines())  # never cut


def test_zoo_train_refuses_a_bad_name_mask_share(tmp_path):
    result = run("zoo", "train", "tiny-gpt2", "--out", str(tmp_path), "--name-mask-share", "1.5")
    assert result.exit_code != 0
    assert "name_mask_share: expected a number in [0, 1], got 1.5" in result.output


@pytest.mark.parametrize("option", ["--epochs", "--d-ff", "--threads"])
def test_zoo_train_refuses_bad_sizes(tmp_path, option):
    result = run("zoo", "train", "tiny-gpt2", "--out", str(tmp_path), option, "0")
    assert result.exit_code != 0
    field = {"--epochs": "epochs", "--d-ff": "d_ff", "--threads": "num_threads"}[option]
    assert f"{field}: expected a positive integer, got 0" in result.output


EDIT_ARGS = ["edit", "--prompt", "{} lives in", "--subject", "Wim Dunmont", "--target", " Lisbon"]


def test_an_easyedit_file_chooses_method_and_model_unless_the_options_do(tmp_path, monkeypatch):
    import kedit.cli as cli

    chosen = []
    monkeypatch.setattr(
        cli, "_edit_and_show", lambda lm, request, method, hparams: chosen.append((lm, method))
    )
    monkeypatch.setattr("kedit.load", lambda model: model)
    easyedit = tmp_path / "memit.yaml"
    easyedit.write_text('alg_name: "MEMIT"\nmodel_name: "tiny-llama"\nlayers: [5]\n')
    assert run(*EDIT_ARGS, "--hparams-file", str(easyedit)).exit_code == 0
    assert run(*EDIT_ARGS, "--hparams-file", str(easyedit), "-m", "tiny-gpt2").exit_code == 0
    assert chosen == [("tiny-llama", "memit"), ("tiny-gpt2", "memit")]


def test_an_alg_name_of_another_method_is_refused_before_anything_is_printed(tmp_path):
    easyedit = tmp_path / "memit.yaml"
    easyedit.write_text('alg_name: "MEMIT"\nlayers: [5]\n')
    result = run(*EDIT_ARGS, "--method", "rome", "--hparams-file", str(easyedit))
    output = " ".join(result.output.split())
    assert result.exit_code == 2
    assert "alg_name: 'MEMIT' is EasyEdit's name of method 'memit'" in output
    assert "but these hyper-parameters are for 'rome'" in output
    assert "Before the edit" not in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["-p", "v_lr=abc"], "v_lr"),
        (["-p", "layers=[99]"], "out of range"),
        (["--method", "kn"], "target_true"),
    ],
)
def test_edit_errors_come_before_any_table(args, message):
    result = run(*EDIT_ARGS, *args)
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert "Before the edit" not in result.output


def test_a_target_without_its_leading_space_gets_a_note(monkeypatch):
    import kedit.cli as cli

    monkeypatch.setattr(cli, "_edit_and_show", lambda *args: None)
    monkeypatch.setattr("kedit.load", lambda model: model)
    bare = run("edit", "--prompt", "{} lives in", "--subject", "Wim Dunmont", "--target", "Lisbon")
    assert bare.exit_code == 0 and "expect ' Lisbon'" in " ".join(bare.output.split())
    assert "note:" not in run(*EDIT_ARGS).output


def test_save_to_a_folder_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    def no_load(model):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("kedit.load", no_load)
    result = run(*EDIT_ARGS, "--save", str(tmp_path))
    assert result.exit_code == 2 and "is a folder" in " ".join(result.output.split())


def test_bench_takes_the_method_from_an_easyedit_file(tmp_path):
    easyedit = tmp_path / "ft.yaml"
    easyedit.write_text('alg_name: "FT"\nobjective_optimization: "target_new"\nnum_steps: 5\n')
    out = tmp_path / "o"
    args = ["bench", "--data", KNOWEDIT, "--n", "1", "--seeds", "1", "--out", str(out)]
    result = run(*args, "--hparams-file", str(easyedit))
    assert result.exit_code == 0, result.output
    assert [folder.name for folder in (out / "tiny-gpt2").iterdir()] == ["ft-m"]


def test_bench_protocol_sampling_fills_the_fluency_columns(tmp_path):
    out = tmp_path / "o"
    args = ["bench", "--data", KNOWEDIT, "--n", "1", "--seeds", "1", "--method", "ft-m"]
    result = run(*args, "--protocol", "teacher_forced", "--protocol", "sampling", "--out", str(out))
    assert result.exit_code == 0, result.output
    folder = out / "tiny-gpt2" / "ft-m" / "tinyworld_knowedit" / "independent" / "seed-0"
    summary = json.loads((folder / "summary.json").read_text())
    fluency = summary["metrics"]["post"]["sampling"]["fluency"]
    row = next(line for line in (out / "report.md").read_text().splitlines() if "/ ft-m /" in line)
    assert row.rstrip(" |").endswith(f"{fluency:.3f}") and fluency > 0


def test_bench_format_option_is_checked_and_used(tmp_path):
    args = ["bench", "--data", KNOWEDIT, "--n", "1", "--seeds", "1", "--method", "ft-m"]
    refused = run(*args, "--format", "zsre-v9", "--out", str(tmp_path / "bad"))
    output = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "knowedit" in output
    assert "--format: unknown format 'zsre-v9'" in output
    assert not (tmp_path / "bad").exists()
    wrong = run(*args, "--format", "wikibigedit", "--out", str(tmp_path / "w"))
    assert wrong.exit_code == 2 and "update: missing" in " ".join(wrong.output.split())
    result = run(*args, "--format", "knowedit", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output


def test_bench_resumes_with_the_data_given_by_another_path_or_from_another_folder(
    tmp_path, monkeypatch
):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(KNOWEDIT, data / "cases.json")
    out = tmp_path / "run"
    args = ["--method", "ft-m", "--n", "2", "--seeds", "1", "--out", str(out), "-p", "steps=3"]
    monkeypatch.chdir(tmp_path)
    assert run("bench", "--data", "data/cases.json", *args).exit_code == 0
    cases = out / "tiny-gpt2" / "ft-m" / "cases" / "independent" / "seed-0" / "cases.jsonl"
    first, second = cases.read_text().splitlines()
    cases.write_text(first + "\n")  # as if interrupted after the first case
    monkeypatch.chdir(data)
    resumed = run("bench", "--data", "cases.json", *args)
    assert resumed.exit_code == 0, resumed.output
    lines = cases.read_text().splitlines()
    assert lines[0] == first and len(lines) == 2
    assert json.loads(lines[1])["case_id"] == json.loads(second)["case_id"]
    absolute = run("bench", "--data", str(data / "cases.json"), *args)
    assert absolute.exit_code == 0, absolute.output
    assert cases.read_text().splitlines() == lines
    records = json.loads((data / "cases.json").read_text())
    records[0]["target_new"] = "Quillmark"
    (data / "cases.json").write_text(json.dumps(records))
    changed = run("bench", "--data", "cases.json", *args)
    output = " ".join(changed.output.split())
    assert changed.exit_code == 2 and "other settings (data_digest)" in output
    title = (out / "report.md").read_text().splitlines()[0]
    expected = "model tiny-gpt2; data cases.json; mode independent; 1 seed(s)"
    assert title == f"# Benchmark of ft-m: {expected}"


def test_bench_progress_counts_cases_and_gives_the_time_left_of_this_run():
    import io

    from rich.console import Console

    from kedit.cli import bench_progress

    now = [0.0]
    console = Console(file=io.StringIO(), width=200, force_terminal=True, color_system=None)
    bar = bench_progress(console, get_time=lambda: now[0])
    task = bar.add_task("tiny-gpt2 rome", total=None)
    bar.reset(task, total=10, completed=4)  # four cases done by an earlier run
    for now[0] in (100.0, 110.0, 120.0):
        bar.advance(task)
    console.print(bar.make_tasks_table(bar.tasks))
    shown = console.file.getvalue()
    # 7 of 10 done; this run's speed is 2 cases in 20 s after its first, so 3 left take 30 s.
    assert "7/10 cases" in shown and "ETA 0:00:30" in shown
