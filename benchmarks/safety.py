"""SafeEdit on a chat model (tiny-chat's targets): DINM beside FT-L, DPO and DINM without its KL
term; prints JSON (and writes it with --out).

Each case is edited on its own, measured and undone: DS and DG_* (greedy replies judged by the
model's bundled safety judge, or --judge with --judge-labels), fluency, knowledge-constraint
locality (teacher-forced) and tinyworld facts accuracy, before and after; and the seconds per
edit at one thread. By default the first 20 tinyworld SafeEdit cases (on which DINM's tiny-model
defaults were tuned) are skipped and the next 100 measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import median
from typing import Any

from behaviour_runs import emit, timed_edits

RUNS = {
    "dinm": ("dinm", {}),
    # the layer DINM locates per case, trained until the safe answer's NLL is below 0.003
    "dinm-located": ("dinm", {"layers": [], "stop_nll": 0.003}),
    "dinm-no-kl": ("dinm", {"kl_factor": 0.0}),
    "ft-l": ("ft-l", {"layers": [7], "lr": 1e-2}),
    # tuned on cases 0-19 (docs/safety.md#dpo): block 3, as DINM, until the loss is below 0.01
    "dpo": ("dpo", {"layers": [3], "stop_loss": 0.01}),
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    import kedit
    from kedit.data import load_requests
    from kedit.eval.chat import has_chat_template
    from kedit.eval.judges import get_judge
    from kedit.eval.safety import evaluate_safety, tinyworld_fact_probes
    from kedit.lm import resolve_model_path
    from kedit.methods.registry import resolve_hparams
    from kedit.zoo import DATA_DIR

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-chat", help="bundled name or a zoo model folder")
    parser.add_argument("--data", default=str(DATA_DIR / "tinyworld2_safeedit.json"))
    parser.add_argument("--skip", type=int, default=20, help="cases left out (tuned on)")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"some of {', '.join(RUNS)}")
    parser.add_argument("--judge", default=None, help="default: the model folder's own")
    parser.add_argument("--judge-labels", type=json.loads, default=None)
    parser.add_argument("--facts", type=int, default=200, help="tinyworld fact probes")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="bar chart of the runs (PNG)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = args.runs.split(",")
    unknown = [run for run in runs if run not in RUNS]
    if unknown:
        parser.error(f"--runs: unknown {unknown}; known: {', '.join(RUNS)}")
    lm = kedit.load(args.model)
    judge = get_judge("safety", args.judge or resolve_model_path(args.model), args.judge_labels)
    requests = list(load_requests(args.data, format="safeedit"))[args.skip :][: args.n]
    facts = tinyworld_fact_probes(args.facts, dialogue=has_chat_template(lm)) if args.facts else ()
    report: dict[str, Any] = {
        "model": args.model,
        "data": args.data,
        "skip": args.skip,
        "n": len(requests),
        "judge": judge.name,
        "threads": torch.get_num_threads(),
        "runs": {},
    }
    for name in runs:
        method, hparams = RUNS[name]
        seconds: list[float] = []
        make_edit = timed_edits(lm, method, hparams, seconds)
        result = evaluate_safety(
            lm, requests, judge, make_edit, facts=facts, max_new_tokens=args.max_new_tokens
        )
        layers = [n for c in result["cases"] for n in c["edit_info"].get("toxic_layers", [])]
        report["pre"] = result["summary"]["pre"]
        report["runs"][name] = {
            "method": method,
            "hparams": resolve_hparams(method, lm, hparams).to_dict(),
            "post": result["summary"]["post"],
            "edit_seconds_median": round(median(seconds), 4),
            "edit_seconds_max": round(max(seconds), 4),
            "toxic_layers": {str(k): layers.count(k) for k in sorted(set(layers))} or None,
        }
    if args.plot is not None:
        plot(report, args.plot)
    return emit(report, args.out)


def plot(report: dict[str, Any], path: Path) -> None:
    """DS and each DG before the edits and after each run's, as grouped bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["DS", "DG_onlyQ", "DG_otherA", "DG_otherQ", "DG_otherAQ"]
    stages = {"unedited": report["pre"]} | {run: r["post"] for run, r in report["runs"].items()}
    width = 0.8 / len(stages)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for k, (label, metrics) in enumerate(stages.items()):
        values = [metrics[name]["value"] if name in metrics else 0.0 for name in names]
        ax.bar([i + k * width for i in range(len(names))], values, width, label=label)
    ax.set_xticks([i + width * (len(stages) - 1) / 2 for i in range(len(names))], names)
    ax.set_ylabel("% defended")
    ax.set_title(f"SafeEdit on {Path(report['model']).name}, {report['n']} cases")
    ax.set_ylim(0, 120)
    ax.legend(fontsize=8, ncol=len(stages), loc="upper center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
