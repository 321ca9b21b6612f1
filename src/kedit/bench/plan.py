"""A benchmark plan: models × methods × datasets × modes × seeds, run into one folder.

Each combination runs with `run_bench` into `<out>/<model>/<method>/<dataset>/<mode>/seed-<k>`
(so everything resumes; `<model>` is a local folder's own name, a hub id with `/` as `--`),
then the seeds are aggregated (mean, min, max) into `summary.json`,
a Markdown report with the KnowEdit-style and CounterFact tables, and bar plots.

A plan file is YAML:

    models: [tiny-gpt2, tiny-llama]
    methods: [rome, ft-m]
    datasets: [src/kedit/zoo/data/tinyworld_knowedit.json]
    modes: [independent, {mode: sequential, batch_size: 10, schedule: after-all}]
    protocols: [teacher_forced, probability]
    hparams: {rome: {v_lr: 0.3}}
    n: 100
    seeds: 3
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from kedit.api import load
from kedit.bench.pitfalls import PITFALLS_FORMATS, load_benchmark, run_pitfalls
from kedit.bench.report import (
    COUNTERFACT_COLUMNS,
    KNOWEDIT_COLUMNS,
    checkpoint_markdown,
    markdown,
    pitfalls_markdown,
    plot_bars,
    plot_curves,
    plot_pitfalls,
    spread,
)
from kedit.bench.runs import (
    BenchConfig,
    merge_runs,
    recorded_case_ids,
    run_bench,
    scoring_protocols,
    select_cases,
)
from kedit.data import check_format
from kedit.eval.runner import context_sentences

DEFAULT_SEEDS = 3
MODE_KEYS = {"mode", "batch_size", "schedule", "checkpoint_every"}


@dataclass
class Plan:
    models: list[str]
    methods: list[str]
    datasets: list[str]
    modes: list[dict[str, Any]] = field(default_factory=lambda: [{"mode": "independent"}])
    protocols: list[str] = field(default_factory=lambda: ["teacher_forced"])
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)
    n: int | None = None
    seeds: int = DEFAULT_SEEDS
    contexts: int = 3
    formats: dict[str, str] = field(default_factory=dict)  # dataset -> format, if not detected

    def __post_init__(self) -> None:
        for name in ("models", "methods", "datasets", "modes", "protocols"):
            value = getattr(self, name)
            if isinstance(value, str | dict):
                setattr(self, name, [value])
            elif not isinstance(value, list) or not value:
                raise ValueError(f"{name}: expected a list of at least one entry, got {value!r}")
        if not isinstance(self.hparams, dict):
            raise ValueError(f"hparams: expected a mapping of method to settings: {self.hparams!r}")
        self.modes = [{"mode": m} if isinstance(m, str) else m for m in self.modes]
        for index, mode in enumerate(self.modes):
            if not isinstance(mode, dict) or set(mode) - MODE_KEYS or "mode" not in mode:
                raise ValueError(
                    f"modes[{index}]: expected a mode name or a mapping with 'mode' and some of "
                    f"{sorted(MODE_KEYS - {'mode'})}, got {mode!r}"
                )
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds: expected a positive number of seeds, got {self.seeds!r}")
        if self.n is not None and (not isinstance(self.n, int) or self.n < 1):
            raise ValueError(f"n: expected a positive number of cases, got {self.n!r}")
        folders: dict[str, str] = {}
        for model in self.models:
            other = folders.setdefault(model_folder_name(model), model)
            if other != model:
                raise ValueError(
                    f"models: {other!r} and {model!r} would share the run folder "
                    f"{model_folder_name(model)!r}; give one of them a folder of another name"
                )
        for method in self.hparams:
            if method not in self.methods:
                raise ValueError(f"hparams: {method!r} is not one of the plan's methods")
        if not isinstance(self.formats, dict):
            raise ValueError(f"formats: expected a mapping of dataset to format: {self.formats!r}")
        for dataset, name in self.formats.items():
            if dataset not in self.datasets:
                raise ValueError(f"formats: {dataset!r} is not one of the plan's datasets")
            check_format(name, f"formats[{dataset!r}]")

    def configs(self, shard: str = "0/1") -> list[tuple[str, str, dict[str, Any], BenchConfig]]:
        """`(model, dataset, mode, config)` for every run of the plan, validated."""
        runs = []
        for model in self.models:
            for dataset in self.datasets:
                for method in self.methods:
                    for mode in self.modes:
                        for seed in range(self.seeds):
                            config = BenchConfig(
                                method=method,
                                protocols=list(self.protocols),
                                hparams=dict(self.hparams.get(method, {})),
                                contexts=self.contexts,
                                seed=seed,
                                data=str(dataset),
                                shard=shard,
                                **mode,
                            )
                            config.validate()
                            runs.append((model, dataset, mode, config))
        return runs


def load_plan(path: str | Path) -> Plan:
    """Read a plan from YAML; unknown keys are an error that names them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plan: {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"plan: {str(path)!r} must hold a mapping")
    known = {f.name for f in fields(Plan)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"plan: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    missing = {"models", "methods", "datasets"} - set(data)
    if missing:
        raise ValueError(f"plan: {str(path)!r} lacks the key(s) {sorted(missing)}")
    return Plan(**data)


def mode_label(mode: dict[str, Any]) -> str:
    """The mode's name, with the settings that differ from BenchConfig's defaults
    ("sequential,batch_size=2,schedule=after-all"): a folder name with no character a shell
    would expand."""
    defaults = BenchConfig(method="")
    extra = [
        f"{k}={v}" for k, v in sorted(mode.items()) if k != "mode" and getattr(defaults, k) != v
    ]
    return ",".join([mode["mode"], *extra])


def model_folder_name(model: str) -> str:
    """The folder a model's runs go to under the output folder: a local folder by its own name,
    a bundled name or hub id with `/` as `--`, so that no model string leads outside `out`."""
    path = Path(model)
    if path.is_dir():
        return path.resolve().name
    return model.replace("/", "--")


def heldout_texts(n: int, seed: int) -> list[str]:
    """`n` sentences of the tinyworld corpus drawn with `seed`, for the held-out perplexity of
    sequential runs (drawn, not the first ones: sorted, those all name the same few people)."""
    sentences = list(context_sentences())
    return random.Random(seed).sample(sentences, min(n, len(sentences)))


def run_plan(
    plan: Plan,
    out_dir: str | Path,
    shard: str = "0/1",
    on_case: Callable[[dict[str, Any]], None] | None = None,
    on_run: Callable[[str], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run every combination of the plan; returns the aggregate written to `summary.json`.

    For a progress bar: `on_start(total, done)` is called once, before any work, with the
    number of cases this shard of the plan holds and how many of them earlier runs into
    `out_dir` recorded; then `on_run(label)` before each run and `on_case(record)` after each
    case run now."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {str(out)!r} is a file; give a folder for the run")
    runs = plan.configs(shard)
    data = {d: load_benchmark(d, format=plan.formats.get(d), n=plan.n) for d in plan.datasets}
    for _, dataset, mode, _ in runs:
        if data[dataset].format in PITFALLS_FORMATS and mode["mode"] != "independent":
            raise ValueError(
                f"modes: {dataset!r} is a {data[dataset].format} benchmark, whose cases each "
                f"make their edits on the unedited model; run it in mode independent, not "
                f"{mode_label(mode)!r}"
            )
    folders = [
        out / model_folder_name(model) / config.method / Path(dataset).stem / mode_label(mode)
        for model, dataset, mode, config in runs
    ]
    recorded = [
        recorded_case_ids(folder / f"seed-{config.seed}")
        for folder, (_, _, _, config) in zip(folders, runs, strict=True)
    ]
    if on_start is not None:
        total = sum(len(select_cases(data[dataset], config)) for _, dataset, _, config in runs)
        on_start(total, sum(map(len, recorded)))
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    sequential: list[tuple[str, list[dict[str, Any]]]] = []  # (title, checkpoints) per run
    loaded: dict[str, Any] = {}
    for (model, dataset, mode, config), folder, done in zip(runs, folders, recorded, strict=True):
        if model not in loaded:
            loaded.clear()
            loaded[model] = load(model)
        label = mode_label(mode)
        if on_run is not None:
            on_run(f"{model} {config.method} {Path(dataset).name} {label} seed {config.seed}")
        heldout = heldout_texts(200, config.seed) if config.checkpoint_every else None
        notify = _new_cases_only(on_case, done)
        if data[dataset].format in PITFALLS_FORMATS:
            summary = run_pitfalls(
                loaded[model], data[dataset], config, folder / f"seed-{config.seed}", notify
            )
        else:
            summary = run_bench(
                loaded[model],
                data[dataset],
                config,
                folder / f"seed-{config.seed}",
                on_case=notify,
                heldout_texts=heldout,
            )
        key = (model, config.method, Path(dataset).stem, label)
        if summary.get("checkpoints"):
            curves = folder / f"curves-seed-{config.seed}.png"
            scored = scoring_protocols(plan.protocols)[0]
            plot_curves(summary["checkpoints"], scored, curves, config.method)
            title = f"{' / '.join(key)} / seed {config.seed}: checkpoints"
            sequential.append((title, summary["checkpoints"]))
        groups.setdefault(key, []).append(summary)
    aggregate = {
        "runs": [
            {
                "model": model,
                "method": method,
                "dataset": dataset,
                "mode": mode,
                "seeds": len(summaries),
                "metrics": spread(summaries),
                "edit_seconds_median": [s["edit_seconds_median"] for s in summaries],
            }
            for (model, method, dataset, mode), summaries in groups.items()
        ]
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(aggregate, indent=2))
    rows = [
        (" / ".join(key), summary["metrics"])
        for key, summary in zip(groups, aggregate["runs"], strict=True)
    ]
    title = report_title(
        plan.models,
        plan.methods,
        [Path(dataset).name for dataset in plan.datasets],
        [mode_label(mode) for mode in plan.modes],
        f"{plan.seeds} seed(s)" + ("" if shard == "0/1" else f", shard {shard}"),
    )
    write_report(out, title, rows, plan.protocols, sequential)
    return aggregate


def _new_cases_only(
    on_case: Callable[[dict[str, Any]], None] | None, recorded: set[str]
) -> Callable[[dict[str, Any]], None] | None:
    """`on_case` for the cases not `recorded` by an earlier run (run_bench also passes those)."""
    if on_case is None:
        return None

    def notify(record: dict[str, Any]) -> None:
        if record["case_id"] not in recorded:
            on_case(record)

    return notify


def report_title(
    models: list[str], methods: list[str], datasets: list[str], modes: list[str], detail: str
) -> str:
    """The report's first line: which methods ran on which models, data and modes."""

    def named(one: str, many: str, values: list[str]) -> str:
        return f"{one if len(values) == 1 else many} {', '.join(values)}"

    parts = [
        named("model", "models", models),
        named("data", "data", datasets),
        named("mode", "modes", modes),
        detail,
    ]
    return f"# Benchmark of {', '.join(methods)}: {'; '.join(parts)}"


def write_report(
    out: Path,
    title: str,
    rows: list[tuple[str, dict[str, Any]]],
    protocols: list[str],
    sequential: Iterable[tuple[str, list[dict[str, Any]]]] = (),
) -> None:
    """`report.md` (`title`, the KnowEdit-style and CounterFact tables, then each sequential
    run's checkpoints, then the Pitfalls tables) and one bar plot per protocol, for `rows` of
    (label, metrics); runs of the pitfalls benchmarks go to the Pitfalls tables and plot."""
    scored = scoring_protocols(protocols)[0]
    edits = [(label, metrics) for label, metrics in rows if "pitfalls" not in metrics]
    report = title + "\n"
    if edits:
        report += "\n" + markdown("KnowEdit-style table", edits, KNOWEDIT_COLUMNS)
        report += "\n" + markdown("CounterFact table (ROME's columns)", edits, COUNTERFACT_COLUMNS)
        for protocol in protocols:
            plot_bars(edits, protocol, out / f"bars_{protocol}.png")
    for heading, checkpoints in sequential:
        report += "\n" + checkpoint_markdown(heading, checkpoints, scored)
    report += pitfalls_markdown(rows)
    plot_pitfalls(rows, out)
    (out / "report.md").write_text(report)


def merge_shards(folders: list[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """`merge_runs` of the shards into `out_dir`, with the merged run's report and plots."""
    out = Path(out_dir)
    summary = merge_runs(folders, out)
    mode = mode_label({key: summary[key] for key in MODE_KEYS})
    data = Path(summary["data"])
    label = " / ".join([summary["model"], summary["method"], data.stem, mode])
    detail = f"seed {summary['seed']}, merged from {len(folders)} shards"
    title = report_title([summary["model"]], [summary["method"]], [data.name], [mode], detail)
    write_report(out, title, [(label, summary["metrics"])], summary["protocols"])
    return summary
