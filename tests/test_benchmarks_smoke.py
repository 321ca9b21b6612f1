"""Smoke tests of benchmarks/batch_scale.py, sequential.py, lifelong.py, speed.py,
device_check.py, solve_scale.py, subject_swap.py, nullspace_overlap.py, floor.py and
key_rank.py on tiny settings (mostly FT-M, which needs no statistics); timings are not checked."""

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import batch_scale  # noqa: E402
import device_check  # noqa: E402
import floor  # noqa: E402
import key_rank  # noqa: E402
import lifelong  # noqa: E402
import sequential  # noqa: E402
import solve_scale  # noqa: E402
import speed  # noqa: E402
from tinyworld_cases import distinct_fact_cases  # noqa: E402


def test_cases_past_the_bundled_benchmark_are_other_facts_of_the_same_people():
    from kedit.data import load_requests
    from kedit.zoo import benchmark_path

    cases, about = distinct_fact_cases(330)
    bundled = load_requests(benchmark_path("knowedit"))
    assert [c.prompt for c in cases[:320]] == [r.prompt for r in bundled]
    assert about["distinct_facts"] == 330 and about["distinct_subjects"] == 320
    assert {c.subject for c in cases[320:]} <= {c.subject for c in cases[:320]}


def test_cases_of_fewer_people_take_every_fact_of_each():
    cases, about = distinct_fact_cases(20, people=5)
    assert about["distinct_subjects"] == 5 and about["distinct_facts"] == 20
    assert [c.subject for c in cases[:5]] == [c.subject for c in distinct_fact_cases(5)[0]]


def test_batch_scale_one_run_reports_time_memory_and_quality():
    result = batch_scale.main(["--one", "--methods", "ft-m", "--sizes", "2"])
    assert result["batch"] == 2 and result["cases"]["cases"] == 2
    assert result["edit_seconds"] > 0 and result["peak_rss_mb"] > 0
    assert 0 <= result["teacher_forced"]["reliability"] <= 1


def test_sequential_writes_a_curve_json_and_plots(tmp_path):
    argv = ["--methods", "ft-m", "--edits", "4", "--checkpoint-every", "2"]
    report = sequential.main([*argv, "--heldout-n", "10", "--out", str(tmp_path)])
    (result,) = report["results"]
    assert [point["edits"] for point in result["curve"]] == [2, 4]
    assert all(point["heldout_perplexity"] > 1 for point in result["curve"])
    assert all(0 < point["heldout_untouched_texts"] <= 10 for point in result["curve"])
    assert all(point["heldout_perplexity_untouched"] > 1 for point in result["curve"])
    assert json.loads((tmp_path / "tiny-gpt2.json").read_text()) == report
    assert (tmp_path / "tiny-gpt2.png").is_file() and (tmp_path / "tiny-gpt2-ft-m.png").is_file()
    again = sequential.main([*argv, "--heldout-n", "10", "--out", str(tmp_path)])
    assert result["cases_done_before"] == 0 and again["results"][0]["cases_done_before"] == 4
    assert again["results"][0]["curve"] == result["curve"]

    # other hyper-parameters: recorded, and run in a folder of their own (no resume clash)
    tuned = sequential.main([*argv, "--heldout-n", "10", "--out", str(tmp_path), "--hparams",
                             '{"steps": 3}'])  # fmt: skip
    assert tuned["results"][0]["hparams"] == {"steps": 3}
    assert len(list((tmp_path / "runs" / "tiny-gpt2").iterdir())) == 2


def test_speed_times_one_method_with_its_overrides():
    result = speed.measure("tiny-gpt2", "ft-m", 2, {"steps": 3}, repeat=3)
    assert (result["method"], result["edits"], result["hparams"]) == ("ft-m", 2, {"steps": 3})
    rounds = result["round_medians"]
    assert len(rounds) == 3 and all(t > 0 for t in rounds)
    assert result["median_seconds"] == sorted(rounds)[1]


def test_solve_scale_gives_the_direct_solution_through_the_factor():
    rows = solve_scale.main(["--widths", "64", "--facts", "1", "3", "--repeats", "1"])
    assert [(row["width"], row["facts"]) for row in rows] == [(64, 1), (64, 3)]
    assert all(row["max_relative_difference"] < 1e-10 for row in rows)


def test_device_check_reports_outcome_and_bit_exact_round_trips():
    rows = device_check.check("tiny-gpt2", "cpu", n=1, batch=2, methods=["ft-m", "kn"])
    assert [row["what"] for row in rows] == [
        "stats 3 layers, 2000 docs", "ft-m single", "ft-m batch", "kn single",
    ]  # fmt: skip
    assert all(
        row.get("undo_and_reapply_bit_exact", row.get("undo_bit_exact", True)) for row in rows
    )
    assert rows[1]["reliability"] == 1.0 and rows[0]["seconds"] > 0


def test_subject_swap_curves_start_at_the_other_persons_answer_and_end_at_none():
    import subject_swap

    report = subject_swap.main(["--pairs", "4"])
    for kind in ("random", "same_but_last"):
        curves = report[kind]
        assert curves["pairs"] == 4
        # Swapping every differing position before block 0 runs B's own prompt (the model
        # knows B's training fact); after the last block the prediction cannot see them.
        assert curves["name"][0] == 1.0 and curves["name"][-1] == 0.0
        assert curves["last_token"][-1] == 0.0
    assert report["same_but_last"]["last_token"] == report["same_but_last"]["name"]


def test_nullspace_overlap_reports_shares_per_layer(tmp_path):
    import nullspace_overlap

    argv = ["--edits", "12", "--people", "6", "--probes", "5", "--steps", "4", "12"]
    report = nullspace_overlap.main([*argv, "--out", str(tmp_path / "o.json")])
    assert report["unedited_probes"] == 5
    assert [layer["layer"] for layer in report["layers"]] == report["hparams"]["layers"]
    for layer in report["layers"]:
        assert 0 < layer["null_space_dim"] <= layer["key_dim"]
        assert 0 <= layer["edited_share_in_null_space"] <= 1
        shares = [point["unedited_share_in_edit_span"] for point in layer["curve"]]
        assert [point["edits"] for point in layer["curve"]] == [4, 12]
        assert 0 <= shares[0] <= shares[1] <= 1 + 1e-9  # a larger span holds more of each key
    assert json.loads((tmp_path / "o.json").read_text()) == report


def test_sequential_on_a_model_folder_writes_only_under_out(tmp_path):
    import shutil

    from kedit.zoo import model_path

    folder = tmp_path / "models" / "copy"
    shutil.copytree(model_path("tiny-gpt2"), folder)
    before = sorted(p.name for p in folder.iterdir())
    argv = ["--methods", "ft-m", "--edits", "2", "--checkpoint-every", "2", "--heldout-n", "5"]
    sequential.main([*argv, "--model", str(folder), "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in folder.iterdir()) == before
    assert (tmp_path / "out" / "copy.json").is_file()
    assert (tmp_path / "out" / "runs" / "copy").is_dir()


def test_the_plain_torch_floor_takes_kedits_steps_and_edits_the_weights_alike():
    """floor.py writes each edit out in plain torch (GPT-2): an implementation of its own,
    which must agree with kedit step for step and on the edited weights."""
    without_statistics = '{"mom2_adjustment": false}'  # collecting them takes long here
    rome = floor.main(["--methods", "rome", "--n", "2", "--hparams", without_statistics])
    ft_m = floor.main(["--methods", "ft-m", "--n", "2"])
    for result in rome["results"] + ft_m["results"]:
        assert result["same_steps"] == 2, result
        assert result["max_relative_weight_diff"] < 1e-4, result
        assert result["kedit_median_s"] > 0 and result["floor_median_s"] > 0


def test_lifelong_reports_throughput_and_the_memory_edits_attach(tmp_path):
    argv = ["--methods", "grace", "ultraedit", "--edits", "4", "--batch", "2"]
    argv += ["--checkpoint-every", "2", "--heldout-n", "5", "--out", str(tmp_path)]
    grace, ultraedit = lifelong.main(argv)["results"]
    assert (grace["batch"], ultraedit["batch"]) == (1, 2)
    assert [point["edits"] for point in grace["curve"]] == [2, 4]
    assert grace["edits_per_second"] > 0 and ultraedit["edits_per_second"] > 0
    # GRACE adds one codebook entry per new fact at tiny-gpt2's layer-5 MLP output projection:
    # a key of its 512 inputs, a value of its 128 outputs and a radius (float32), a label (int64)
    assert grace["attached_bytes"] == 4 * ((512 + 128 + 1) * 4 + 8)
    assert ultraedit["attached_bytes"] == 0  # its updates are written into the weights
    assert (tmp_path / "tiny-gpt2.json").is_file() and (tmp_path / "tiny-gpt2.png").is_file()


def test_key_rank_counts_the_directions_the_people_s_keys_span():
    import numpy
    import torch

    import kedit
    from kedit.analysis import tinyworld_facts
    from kedit.analysis._common import tokenize_facts
    from kedit.hooks import capture

    report = key_rank.main(["--model", "tiny-gpt2", "--layer", "0"])
    assert (report["people"], report["key_width"]) == (320, 512)
    # the same keys read another way: each prompt alone, the projection's input at the
    # subject span's last token, and the directions counted with numpy
    lm = kedit.load("tiny-gpt2")
    site, keys = lm.layout.mlp_out_name(0), []
    for item in tokenize_facts(lm, tinyworld_facts("lives_in", 0)):
        with torch.no_grad(), capture(lm.model, [site], "input") as seen:
            lm.model(input_ids=torch.tensor([item.ids]))
        keys.append(seen[site][0, item.subject[1] - 1].double().numpy())
    centred = numpy.array(keys) - numpy.mean(keys, axis=0)
    energy = numpy.linalg.svd(centred, compute_uv=False) ** 2
    share = numpy.cumsum(energy) / energy.sum()
    assert report["directions_90"] == int(numpy.searchsorted(share, 0.9)) + 1
    assert report["directions_99"] == int(numpy.searchsorted(share, 0.99)) + 1
    assert 1 <= report["directions_90"] < report["directions_99"] <= 319
