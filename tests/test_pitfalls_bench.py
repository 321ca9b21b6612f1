"""The pitfalls benchmarks run by `kedit bench`: each case's edits, the probabilities behind its
metrics, resuming, the Pitfalls tables."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kedit.bench.pitfalls import answer_probabilities, load_benchmark, run_pitfalls
from kedit.bench.plan import Plan, merge_shards, run_plan
from kedit.bench.report import pitfalls_markdown, spread
from kedit.bench.runs import BenchConfig
from kedit.cli import app
from kedit.pitfalls.probes import conflict_probes
from kedit.zoo import DATA_DIR

CONFLICT = DATA_DIR / "tinyworld_conflict.json"
HARD = DATA_DIR / "tinyworld_roundedit_hard.json"


def _state(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def _unchanged(lm, before):
    return all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


def test_answer_probabilities_average_exp_minus_nll_over_prompts(tiny_gpt2, mean_target_nll):
    prompts = ["Emil Kelley speaks", "The mother tongue of Emil Kelley is"]
    answers = [" German", " Greek"]
    found = answer_probabilities(tiny_gpt2, [(prompts, answers)])[0]
    for answer, value in zip(answers, found, strict=True):
        nlls = [mean_target_nll(tiny_gpt2, prompt, answer) for prompt in prompts]
        assert value == pytest.approx(sum(math.exp(-x) for x in nlls) / 2, rel=1e-4)


@pytest.fixture(scope="module")
def conflict_run(tiny_gpt2, tmp_path_factory):
    before = _state(tiny_gpt2)
    out = tmp_path_factory.mktemp("conflict")
    cases = load_benchmark(CONFLICT, n=6)
    summary = run_pitfalls(tiny_gpt2, cases, BenchConfig(method="ft-m"), out)
    records = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    return cases, summary, records, out, _unchanged(tiny_gpt2, before)


def test_conflict_metrics_follow_from_the_recorded_probabilities(conflict_run):
    cases, summary, records, _, unchanged = conflict_run
    assert unchanged  # every edit was undone
    assert [r["kind"] for r in records] == ["reverse", "composite", "coverage"] * 2
    for record in records:
        p, m = record["probabilities"], record["metrics"][record["kind"]]
        assert m["conflict_score"] == float(p["new_after_both"] > p["old_after_both"])
        drop = (p["old_after_first"] - p["old_after_both"]) / p["old_after_first"]
        assert m["conflict_magnitude"] == pytest.approx(max(drop, -1.0))
        if record["kind"] == "composite":
            damage = (p["tied_before"] - p["tied_after_both"]) / p["tied_before"]
            assert m["tied_fact_damage"] == pytest.approx(damage)
        if record["kind"] == "coverage":
            assert m["success"] == float(p["new_second_alone"] > p["old_second_alone"])
    means = summary["metrics"]["pitfalls"]
    scores = [r["metrics"]["reverse"]["conflict_score"] for r in records[::3]]
    assert means["reverse"]["conflict_score"] == pytest.approx(sum(scores) / 2)
    assert set(means["composite"]) == {"conflict_score", "conflict_magnitude", "tied_fact_damage"}


def test_the_tied_fact_is_scored_on_the_unedited_model(conflict_run, tiny_gpt2, mean_target_nll):
    cases, _, records, _, _ = conflict_run
    tied = conflict_probes(cases[1]).tied
    nlls = [mean_target_nll(tiny_gpt2, prompt, tied.object) for prompt in tied.prompts]
    expected = sum(math.exp(-x) for x in nlls) / len(nlls)
    assert records[1]["probabilities"]["tied_before"] == pytest.approx(expected, rel=1e-4)


def test_a_pitfalls_run_resumes(conflict_run, tiny_gpt2):
    cases, summary, records, out, _ = conflict_run
    lines = (out / "cases.jsonl").read_text().splitlines()
    (out / "cases.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])
    seen = []
    again = run_pitfalls(tiny_gpt2, cases, BenchConfig(method="ft-m"), out, seen.append)
    assert [r["case_id"] for r in seen] == [r["case_id"] for r in records]
    assert (out / "cases.jsonl").read_text().splitlines()[:4] == lines[:4]
    assert again["metrics"]["n_cases"] == 6


def test_round_trip_metrics_and_variants(tiny_gpt2, tmp_path):
    before = _state(tiny_gpt2)
    cases = load_benchmark(HARD, n=2)
    summary = run_pitfalls(tiny_gpt2, cases, BenchConfig(method="ft-m"), tmp_path / "ft")
    assert _unchanged(tiny_gpt2, before)
    assert set(summary["metrics"]["pitfalls"]) == {"single", "multi_label", "multi_label_batch"}
    record = json.loads((tmp_path / "ft" / "cases.jsonl").read_text().splitlines()[0])
    p, objects = record["probabilities"], record["objects"]
    start = [v / sum(p["before"]) for v in p["before"]]
    for variant, metrics in record["metrics"].items():
        after = p[variant][:objects]
        end = [v / sum(after) for v in after]
        middle = [(a + b) / 2 for a, b in zip(start, end, strict=True)]

        def kl(x, middle=middle):
            return sum(a * math.log(a / m) for a, m in zip(x, middle, strict=True) if a > 0)

        assert metrics["distortion"] == pytest.approx((kl(start) + kl(end)) / 2)
        fell = [b > a for b, a in zip(p["before"][1:], after[1:], strict=True)]
        assert metrics["ignore_rate"] == pytest.approx(sum(fell) / len(fell))
        first = float(p["after_first"][-1] > p["after_first"][0])
        second = float(p[variant][0] > p[variant][-1])
        assert metrics["success"] == (first + second) / 2
    kn = run_pitfalls(tiny_gpt2, cases[:1], BenchConfig(method="kn"), tmp_path / "kn")
    assert set(kn["metrics"]["pitfalls"]) == {"single"}  # KN takes one target, one request
    assert _unchanged(tiny_gpt2, before)


def test_pitfalls_runs_are_independent_only(tiny_gpt2, tmp_path):
    cases = load_benchmark(CONFLICT, n=3)
    with pytest.raises(ValueError, match="mode 'independent'"):
        run_pitfalls(tiny_gpt2, cases, BenchConfig(method="ft-m", mode="sequential"), tmp_path)
    plan = Plan(
        models=["tiny-gpt2"], methods=["ft-m"], datasets=[str(CONFLICT)], modes=["batch"], n=3
    )
    with pytest.raises(ValueError, match="run it in mode independent"):
        run_plan(plan, tmp_path / "plan")
    assert not (tmp_path / "plan").exists()


def test_shards_of_a_pitfalls_run_merge(tiny_gpt2, tmp_path):
    cases = load_benchmark(CONFLICT, n=4)
    folders = []
    for shard in ("0/2", "1/2"):
        folder = tmp_path / shard.replace("/", "-")
        run_pitfalls(tiny_gpt2, cases, BenchConfig(method="ft-m", shard=shard), folder)
        folders.append(folder)
    merged = merge_shards(folders, tmp_path / "merged")
    assert merged["metrics"]["n_cases"] == 4
    assert "CS (reverse)" in (tmp_path / "merged" / "report.md").read_text()


def test_pitfalls_tables_name_their_groups():
    rows = [
        ("m / rome / conflict", spread([{"pitfalls": {"reverse": {"conflict_score": 0.25}}}])),
        ("m / rome / hard", spread([{"pitfalls": {"single": {"distortion": 0.5}}}] * 2)),
        ("m / rome / cf", spread([{"post": {"probability": {"reliability": 1.0}}}])),
    ]
    text = pitfalls_markdown(rows)
    assert "| run | Succ (coverage) | CS (coverage) |" in text
    assert "| m / rome / conflict | – | – | – | 0.250 |" in text
    assert "| m / rome / hard | – | 0.500 [0.500, 0.500] |" in text
    assert "m / rome / cf" not in text
    assert pitfalls_markdown(rows[2:]) == ""


def test_kedit_bench_on_a_conflictedit_file(tmp_path):
    out = tmp_path / "c"
    args = ["--data", str(CONFLICT), "--method", "ft-m", "--n", "3", "--seeds", "1"]
    result = CliRunner().invoke(app, ["bench", *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert "### Pitfalls: knowledge conflict (ConflictEdit)" in report
    assert "KnowEdit-style table" not in report
    assert (out / "pitfalls_conflict.png").is_file()
    assert "conflict_score" in result.output


def test_the_pitfalls_benchmark_script_writes_json_report_and_plots(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import pitfalls  # benchmarks/pitfalls.py

    argv = ["--methods", "ft-m", "kn", "--n-conflict", "3", "--n-round", "1"]
    output = pitfalls.main([*argv, "--out", str(tmp_path), "--runs", str(tmp_path / "runs")])
    ft, kn = output["results"]
    assert ft["conflict"]["cases"] == 3 and set(ft["hard"]) >= {"single", "multi_label"}
    assert set(kn["easy"]) == {"cases", "single"}
    assert json.loads((tmp_path / "tiny-gpt2.json").read_text()) == output
    report = (tmp_path / "report.md").read_text()
    assert "tiny-gpt2 / kn / hard" in report and (tmp_path / "pitfalls_distortion.png").is_file()
