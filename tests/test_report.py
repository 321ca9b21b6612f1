import json

import pytest

from kedit.bench.plan import Plan, load_plan, mode_label, report_title, run_plan
from kedit.bench.report import (
    KNOWEDIT_COLUMNS,
    bars_top,
    checkpoint_markdown,
    markdown,
    plot_bars,
    plot_curves,
    spread,
)


def _summary(reliability, locality):
    return {
        "n_cases": 2,
        "post": {"teacher_forced": {"reliability": reliability, "locality": locality}},
    }


def test_spread_reports_mean_min_max_per_protocol_metric():
    result = spread([_summary(1.0, 0.9), _summary(0.8, 0.7), _summary(0.9, 0.8)])
    leaf = result["post"]["teacher_forced"]["reliability"]
    assert leaf["mean"] == pytest.approx(0.9)
    assert (leaf["min"], leaf["max"], leaf["n"]) == (0.8, 1.0, 3)
    with pytest.raises(ValueError, match="at least one run"):
        spread([])


def test_markdown_names_protocols_and_marks_missing_metrics():
    text = markdown(
        "t", [("rome", spread([_summary(1.0, 0.5), _summary(0.5, 0.5)]))], KNOWEDIT_COLUMNS
    )
    assert "Edit Succ. (teacher_forced)" in text and "Fluency (sampling)" in text
    assert "0.750 [0.500, 1.000]" in text
    assert "–" in text


def test_plots_are_written(tmp_path):
    rows = [("a", spread([_summary(1.0, 0.9)])), ("b", spread([_summary(0.5, 0.6)]))]
    assert plot_bars(rows, "teacher_forced", tmp_path / "bars.png").stat().st_size > 0
    points = [
        {
            "edits": k,
            "post": {"teacher_forced": {"reliability": 1 - k / 10}},
            "heldout_perplexity": 2.0 + k,
            "heldout_perplexity_unedited": 2.0,
        }
        for k in (1, 2, 3)
    ]
    assert plot_curves(points, "teacher_forced", tmp_path / "c.png").stat().st_size > 0


def test_plan_validation_names_fields(tmp_path):
    with pytest.raises(ValueError, match="seeds"):
        Plan(models=["m"], methods=["rome"], datasets=["d"], seeds=0)
    with pytest.raises(ValueError, match=r"modes\[0\]"):
        Plan(models=["m"], methods=["rome"], datasets=["d"], modes=[{"batch_size": 3}])
    with pytest.raises(ValueError, match="hparams"):
        Plan(models=["m"], methods=["rome"], datasets=["d"], hparams={"memit": {}})
    with pytest.raises(ValueError, match="formats: 'e' is not one of the plan's datasets"):
        Plan(models=["m"], methods=["rome"], datasets=["d"], formats={"e": "zsre"})
    with pytest.raises(ValueError, match=r"formats\['d'\]: unknown format 'zsre2'"):
        Plan(models=["m"], methods=["rome"], datasets=["d"], formats={"d": "zsre2"})
    path = tmp_path / "plan.yaml"
    path.write_text("models: [m]\nmethods: [rome]\ndatasets: [d]\ncolour: red\n")
    with pytest.raises(ValueError, match="colour"):
        load_plan(path)
    path.write_text("methods: [rome]\ndatasets: [d]\n")
    with pytest.raises(ValueError, match=r"lacks the key\(s\) \['models'\]"):
        load_plan(path)
    with pytest.raises(ValueError, match="models: expected a list"):
        Plan(models=3, methods=["rome"], datasets=["d"])
    for folder in (tmp_path / "a" / "m", tmp_path / "b" / "m"):
        folder.mkdir(parents=True)
    with pytest.raises(ValueError, match="would share the run folder 'm'"):
        Plan(models=[str(tmp_path / d / "m") for d in "ab"], methods=["rome"], datasets=["d"])
    path.write_text("models: m\nmethods: [rome, ft-m]\ndatasets: [d]\nmodes: independent\n")
    plan = load_plan(path)
    assert plan.modes == [{"mode": "independent"}]
    assert len(plan.configs()) == 2 * 3
    with pytest.raises(ValueError, match="shard"):
        plan.configs("2/2")


def test_checkpoint_table_gives_each_perplexity_beside_its_unedited_value():
    points = [
        {
            "edits": 1,
            "cases": 50,
            "post": {"teacher_forced": {"reliability": 0.8, "locality": 0.5}},
            "heldout_perplexity": 5.0,
            "heldout_perplexity_unedited": 4.0,
            "heldout_untouched_texts": 12,
            "heldout_perplexity_untouched": 6.5,
            "heldout_perplexity_untouched_unedited": 6.0,
        },
        {"edits": 2, "post": {"teacher_forced": {"reliability": 0.7}}},
    ]
    lines = checkpoint_markdown("run", points, "teacher_forced").splitlines()
    assert lines[0] == "### run"
    assert "reliability (teacher_forced)" in lines[2]
    assert lines[4] == "| 1 | 50 | 0.800 | – | 0.500 | 5.000 (4.000) | 6.500 (6.000, 12) |"
    assert lines[5] == "| 2 | – | 0.700 | – | – | – (–) | – (–, 0) |"


def test_run_folders_are_named_without_shell_patterns():
    assert mode_label({"mode": "independent"}) == "independent"
    label = mode_label({"mode": "sequential", "batch_size": 2, "schedule": "after-all"})
    assert label == "sequential,batch_size=2,schedule=after-all"
    assert not set(label) & set("[]*?{}()$ '\"\\;&|<>")


def test_bars_of_rates_end_above_one_and_other_metrics_above_the_tallest():
    assert bars_top([0.2, 1.0]) == 1.05
    assert bars_top([0.5, 4.2]) == pytest.approx(4.62)
    assert bars_top([]) == 1.05


def test_the_report_title_names_methods_models_data_and_modes():
    title = report_title(
        ["tiny-gpt2", "tiny-llama"], ["rome", "memit"], ["zsre.json"], ["independent"], "3 seed(s)"
    )
    assert title == (
        "# Benchmark of rome, memit: models tiny-gpt2, tiny-llama; data zsre.json; "
        "mode independent; 3 seed(s)"
    )
    one = report_title(["m"], ["ft-m"], ["a", "b"], ["batch", "sequential"], "1 seed")
    assert one == "# Benchmark of ft-m: model m; data a, b; modes batch, sequential; 1 seed"


def test_run_plan_tells_the_cases_of_all_runs_then_only_the_cases_it_runs(tmp_path):
    from kedit.zoo import DATA_DIR

    plan = Plan(
        models=["tiny-gpt2"],
        methods=["ft-m"],
        datasets=[str(DATA_DIR / "tinyworld_knowedit.json")],
        hparams={"ft-m": {"steps": 2}},
        n=3,
        seeds=2,
    )

    def progress():
        """Run the plan; what it told: (total, done) first, then each case's id."""
        events = []
        run_plan(
            plan,
            tmp_path,
            on_start=lambda total, done: events.append((total, done)),
            on_case=lambda record: events.append(record["case_id"]),
        )
        return events[0], sorted(events[1:])

    assert progress() == ((6, 0), sorted(["0", "1", "2"] * 2))
    cases = tmp_path / "tiny-gpt2" / "ft-m" / "tinyworld_knowedit" / "independent" / "seed-1"
    kept = (cases / "cases.jsonl").read_text().splitlines()[0]
    (cases / "cases.jsonl").write_text(kept + "\n")  # as if interrupted after one case
    left = sorted({"0", "1", "2"} - {json.loads(kept)["case_id"]})
    assert progress() == ((6, 4), left)
