"""Reports as the field prints them: spread over seeds, KnowEdit and CounterFact tables, plots.

Every table names the protocol of its numbers; numbers of different protocols never share a
column.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from statistics import mean
from typing import Any

# (column title, stage, protocol, metric) of the two tables the field prints.
KNOWEDIT_COLUMNS = [
    ("Edit Succ.", "post", "teacher_forced", "reliability"),
    ("Robustness", "post", "teacher_forced", "robustness"),
    ("Generalization", "post", "teacher_forced", "generalization"),
    ("Portability", "post", "teacher_forced", "portability"),
    ("Locality", "post", "teacher_forced", "locality"),
    ("Fluency", "post", "sampling", "fluency"),
]
COUNTERFACT_COLUMNS = [
    ("Efficacy Score", "post", "probability", "reliability"),
    ("Paraphrase Score", "post", "probability", "generalization"),
    ("Neighborhood Score", "post", "probability", "locality"),
    ("Generation Entropy", "post", "sampling", "fluency"),
]
# The pitfalls tables (Li et al., 2024): (title, "pitfalls", ConflictEdit kind or RoundEdit
# variant, metric); the paper's column order.
CONFLICT_COLUMNS = [
    ("Succ", "pitfalls", "coverage", "success"),
    ("CS", "pitfalls", "coverage", "conflict_score"),
    ("CM", "pitfalls", "coverage", "conflict_magnitude"),
    ("CS", "pitfalls", "reverse", "conflict_score"),
    ("CM", "pitfalls", "reverse", "conflict_magnitude"),
    ("CS", "pitfalls", "composite", "conflict_score"),
    ("CM", "pitfalls", "composite", "conflict_magnitude"),
    ("TFD", "pitfalls", "composite", "tied_fact_damage"),
]
ROUND_COLUMNS = [
    (name, "pitfalls", variant, metric)
    for variant in ("single", "multi_label", "multi_label_batch")
    for name, metric in (
        ("Succ", "success"),
        ("D", "distortion"),
        ("IR", "ignore_rate"),
        ("FR", "failure_rate"),
    )
]
PITFALLS_TABLES = (
    ("Pitfalls: knowledge conflict (ConflictEdit)", "conflict", CONFLICT_COLUMNS),
    (
        "Pitfalls: knowledge distortion (RoundEdit)",
        "distortion",
        ROUND_COLUMNS,
    ),
)
PITFALLS_NOTE = (
    "Protocol `probability`: a fact's probability is exp(-mean token NLL) of its object, averaged"
    " over the edit prompt and its paraphrases. CS: share of cases where the fact the second edit"
    " implies beats the one the first edit wrote (higher: the conflict resolved); CM: relative"
    " drop of the first edit's fact; TFD: relative drop of the tied fact; D: Jensen-Shannon"
    " divergence (nats) of the true objects' distribution before and after the round trip; IR:"
    " share of the other true objects that lost probability; FR: share of cases with IR > 0.5."
    " single: the round trip's second edit towards the object; multi_label: Multi-Label Edit,"
    " one request with every true object as a target; multi_label_batch: one request per true"
    " object, in one batch, as the authors' code makes MLE. See docs/pitfalls.md.\n"
)


def spread(summaries: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Mean, min and max over runs (seeds) of each (stage, protocol, metric) mean, and of each
    (pitfalls, group, metric) mean of a pitfalls run.

    Takes `summarize` outputs (or bench summaries' "metrics"); returns the same nesting with
    `{"mean", "min", "max", "n"}` leaves.
    """
    runs = [s.get("metrics", s) for s in summaries]
    if not runs:
        raise ValueError("summaries: expected at least one run to aggregate, got none")
    values: dict[tuple[str, str, str], list[float]] = {}
    for run in runs:
        for stage in ("pre", "post", "pitfalls"):
            for protocol, metrics in (run.get(stage) or {}).items():
                for metric, value in metrics.items():
                    values.setdefault((stage, protocol, metric), []).append(value)
    out: dict[str, Any] = {"n_runs": len(runs)}
    for (stage, protocol, metric), found in values.items():
        leaf = {"mean": mean(found), "min": min(found), "max": max(found), "n": len(found)}
        out.setdefault(stage, {}).setdefault(protocol, {})[metric] = leaf
    return out


def _cell(metrics: dict[str, Any], stage: str, protocol: str, metric: str) -> str:
    value = metrics.get(stage, {}).get(protocol, {}).get(metric)
    if value is None:
        return "–"
    if isinstance(value, dict):
        if value["n"] > 1:
            return f"{value['mean']:.3f} [{value['min']:.3f}, {value['max']:.3f}]"
        value = value["mean"]
    return f"{value:.3f}"


def table(
    rows: list[tuple[str, dict[str, Any]]], columns: list[tuple[str, str, str, str]]
) -> list[list[str]]:
    """Rows of cells: a label, then each column's number (mean [min, max] over seeds)."""
    return [[label, *(_cell(metrics, *spec[1:]) for spec in columns)] for label, metrics in rows]


def markdown(
    title: str, rows: list[tuple[str, dict[str, Any]]], columns: list[tuple[str, str, str, str]]
) -> str:
    """A Markdown table whose header names each column's protocol."""
    header = ["run", *(f"{name} ({protocol})" for name, _, protocol, _ in columns)]
    return _markdown_table(title, header, table(rows, columns))


def _markdown_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(["---"] * len(header)) + "|")
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


CHECKPOINT_METRICS = ("reliability", "generalization", "locality")


def checkpoint_markdown(title: str, checkpoints: list[dict[str, Any]], protocol: str) -> str:
    """A sequential run's checkpoints as a Markdown table: post-edit metrics of every case
    edited so far and the held-out perplexity, on all texts and on those that name no edited
    subject, each beside its unedited value."""

    def number(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    header = [
        "edit steps",
        "cases",
        *(f"{metric} ({protocol})" for metric in CHECKPOINT_METRICS),
        "held-out ppl (unedited)",
        "untouched texts: ppl (unedited, count)",
    ]
    rows = []
    for point in checkpoints:
        post = point.get("post", {}).get(protocol, {})
        cells = [str(point["edits"]), str(point.get("cases", "–"))]
        cells += [number(post.get(metric)) for metric in CHECKPOINT_METRICS]
        cells.append(
            f"{number(point.get('heldout_perplexity'))}"
            f" ({number(point.get('heldout_perplexity_unedited'))})"
        )
        cells.append(
            f"{number(point.get('heldout_perplexity_untouched'))}"
            f" ({number(point.get('heldout_perplexity_untouched_unedited'))},"
            f" {point.get('heldout_untouched_texts', 0)})"
        )
        rows.append(cells)
    return _markdown_table(title, header, rows)


def bars_top(values: list[float]) -> float:
    """The bar plot's upper limit: just above 1 for rates, above the tallest bar for metrics
    that are not (fluency is an entropy in bits)."""
    tallest = max(values, default=0.0)
    return 1.05 if tallest <= 1 else 1.1 * tallest


def pitfalls_markdown(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """The Pitfalls tables of the runs among `rows` that have their numbers ("" if none)."""
    text = ""
    for title, _, columns in PITFALLS_TABLES:
        found = [(label, run) for label, run in rows if _has_columns(run, columns)]
        if found:
            text += "\n" + markdown(title, found, columns) + "\n" + PITFALLS_NOTE
    return text


def plot_pitfalls(rows: list[tuple[str, dict[str, Any]]], out_dir: str | Path) -> list[Path]:
    """`pitfalls_conflict.png` and `pitfalls_distortion.png`, for the tables that have runs
    among `rows`: one panel per column of the table, one bar per run, all on one scale; error
    bars show the min-max spread over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for title, name, columns in PITFALLS_TABLES:
        found = [(label, run) for label, run in rows if _has_columns(run, columns)]
        if not found:
            continue
        across = 4
        down = -(-len(columns) // across)
        fig, axes = plt.subplots(
            down, across, figsize=(3 * across + 2, (0.25 * len(found) + 1) * down), squeeze=False
        )
        for ax, (column, *spec) in zip(axes.flat, columns, strict=False):
            bars = [_bar(run, *spec) for _, run in found]
            values = [value for value, _, _ in bars]
            spreads = [[low for _, low, _ in bars], [high for _, _, high in bars]]
            ax.barh(range(len(found)), values, xerr=spreads, capsize=2)
            # Every pitfalls metric is at most 1 (CM can be negative): one scale for all panels.
            ax.set_xlim(min([0.0, *(v - low for v, low, _ in bars)]) * 1.05, 1.05)
            ax.set_yticks(range(len(found)), [label for label, _ in found])
            ax.invert_yaxis()
            ax.set_title(f"{column} ({spec[1]})", fontsize="small")
            if not ax.get_subplotspec().is_first_col():
                ax.set_yticklabels([])
        for ax in list(axes.flat)[len(columns) :]:
            ax.set_visible(False)
        fig.suptitle(title)
        fig.tight_layout()
        path = Path(out_dir) / f"pitfalls_{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _has_columns(run: dict[str, Any], columns: list[tuple[str, str, str, str]]) -> bool:
    return any(_cell(run, *spec[1:]) != "–" for spec in columns)


def _bar(run: dict[str, Any], stage: str, protocol: str, metric: str) -> tuple[float, ...]:
    """A run's mean of one metric (0 where missing) and the distances down to its minimum and
    up to its maximum over seeds."""
    leaf = run.get(stage, {}).get(protocol, {}).get(metric)
    leaf = leaf if isinstance(leaf, dict) else {"mean": leaf, "min": leaf, "max": leaf}
    value = leaf["mean"] if leaf["mean"] is not None else 0.0
    low = value - (leaf["min"] if leaf["min"] is not None else value)
    high = (leaf["max"] if leaf["max"] is not None else value) - value
    return value, low, high


def plot_bars(rows: list[tuple[str, dict[str, Any]]], protocol: str, path: str | Path) -> Path:
    """One bar group per run, one bar per post-edit metric of `protocol`; error bars show the
    min-max spread over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({m for _, run in rows for m in run.get("post", {}).get(protocol, {})})
    metrics = [m for m in metrics if not m.endswith("_nll")]
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(rows) * max(1, len(metrics)) / 3), 4))
    width = 0.8 / max(1, len(metrics))
    tops = [0.0]
    for k, metric in enumerate(metrics):
        bars = [_bar(run, "post", protocol, metric) for _, run in rows]
        heights = [value for value, _, _ in bars]
        lows, highs = [low for _, low, _ in bars], [high for _, _, high in bars]
        tops.extend(height + high for height, high in zip(heights, highs, strict=True))
        positions = [i + k * width for i in range(len(rows))]
        ax.bar(positions, heights, width, yerr=[lows, highs], label=metric, capsize=2)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [label for label, _ in rows])
    ax.set_ylim(0, bars_top(tops))
    ax.set_title(f"post-edit metrics ({protocol})")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(
    checkpoints: list[dict[str, Any]], protocol: str, path: str | Path, title: str = ""
) -> Path:
    """Sequential editing: each post-edit metric and held-out perplexity vs number of edits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edits = [point["edits"] for point in checkpoints]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = sorted({m for p in checkpoints for m in p.get("post", {}).get(protocol, {})})
    for metric in (m for m in names if not m.endswith("_nll")):
        left.plot(edits, [p["post"][protocol].get(metric) for p in checkpoints], label=metric)
    left.set_xlabel("edits")
    left.set_ylim(0, 1.05)
    left.set_title(f"{title} ({protocol})")
    left.legend(fontsize="small")
    if any("heldout_perplexity" in p for p in checkpoints):
        right.plot(edits, [p.get("heldout_perplexity") for p in checkpoints], label="edited")
        right.axhline(checkpoints[0].get("heldout_perplexity_unedited"), ls="--", label="unedited")
        if any("heldout_perplexity_untouched" in p for p in checkpoints):
            (line,) = right.plot(
                edits,
                [p.get("heldout_perplexity_untouched") for p in checkpoints],
                label="edited, texts naming no edited subject",
            )
            right.plot(
                edits,
                [p.get("heldout_perplexity_untouched_unedited") for p in checkpoints],
                ls="--",
                color=line.get_color(),
                label="unedited, the same texts",
            )
        right.set_yscale("log")
        right.legend(fontsize="small")
    right.set_xlabel("edits")
    right.set_title("held-out perplexity")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
