"""Reports of unlearning runs: one table row per run (`kedit.evaluate_unlearning` results), and
the forget and retain accuracy curves along the steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedit.eval.protocols import PROBABILITY, TEACHER_FORCED

PROTOCOLS = (
    "acc: mean token accuracy (teacher_forced); general ppl and truth ratio: probability; "
    "utility: TOFU's model utility (probability and generation); forget quality: TOFU's KS-test "
    "p-value against the retrained model (lowest–highest against several)"
)


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _forget_quality(result: dict[str, Any]) -> str:
    """The forget quality, or its lowest and highest against several baselines."""
    spread = result.get("forget_quality_range")
    if spread:
        return f"{spread[0]:.4f}–{spread[1]:.4f}"
    return _number(result.get("vs_baseline", {}).get("forget_quality"), 4)


def unlearning_rows(
    runs: list[tuple[str, dict[str, Any]]],
) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the runs' table: each set's token accuracy (teacher_forced), the
    general perplexity and the forget set's truth ratio (probability), TOFU's model utility,
    forget quality (KS p-value against the retrained baseline), steps, wall and CPU seconds
    (PROTOCOLS says which protocol each column is)."""
    names = list(dict.fromkeys(name for _, result in runs for name in result["sets"]))
    header = ["run", *(f"{name} acc" for name in names)]
    header += ["general ppl", "forget truth ratio", "utility", "forget quality", "steps"]
    header += ["s", "cpu s"]
    rows = []
    for label, result in runs:
        sets = result["sets"]
        first_forget = next((n for n in names if sets.get(n, {}).get("kind") == "forget"), None)
        truth = sets.get(first_forget, {}).get(PROBABILITY, {}).get("truth_ratio")
        row = [label]
        row += [
            _number(sets.get(n, {}).get(TEACHER_FORCED, {}).get("token_accuracy")) for n in names
        ]
        row += [
            _number(result.get("general", {}).get(PROBABILITY, {}).get("perplexity")),
            _number(truth),
            _number(result.get("model_utility")),
            _forget_quality(result),
            str(result.get("steps", "–")),
            _number(result.get("seconds"), 1),
            _number(result.get("cpu_seconds"), 1),
        ]
        rows.append(row)
    return header, rows


def unlearning_markdown(title: str, runs: list[tuple[str, dict[str, Any]]]) -> str:
    """A Markdown table of the runs, with a line saying each column's protocol."""
    header, rows = unlearning_rows(runs)
    lines = [f"### {title}", "", PROTOCOLS, "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, list[dict[str, float]]], path: str | Path) -> Path:
    """Forget (solid) and retain (dashed) token accuracy against the step, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for index, (label, points) in enumerate(curves.items()):
        colour = f"C{index % 10}"
        steps = [p["step"] for p in points]
        axis.plot(steps, [p["forget_acc"] for p in points], color=colour, label=f"{label} forget")
        if all("retain_acc" in p for p in points):
            retain = [p["retain_acc"] for p in points]
            axis.plot(steps, retain, color=colour, linestyle="--", label=f"{label} retain")
    axis.set_xlabel("step")
    axis.set_ylabel("token accuracy (teacher_forced)")
    axis.set_ylim(-0.02, 1.02)
    axis.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
