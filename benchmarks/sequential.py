"""Sequential editing curves: reliability, generalization, locality (teacher-forced) and
held-out perplexity against the number of edits applied to one model; writes JSON and PNG plots
to --out and prints the JSON.

Each method runs `kedit.bench.runs.run_bench` in mode "sequential" (edits pile up on one model,
each computed on the model the earlier ones left), schedule "after-each" (each batch evaluated
right after it is applied: the "immediate" numbers), and a checkpoint every --checkpoint-every
edits that re-evaluates every case edited so far and the held-out perplexity: the curve.
MEMIT and AlphaEdit (and EMMET, PMET) edit --batch cases per step; the others (R-ROME, FT-M)
one at a time.
Runs resume from <out>/runs/<model>/<method>-e<edits>-b<batch>/ if interrupted.

Cases (see tinyworld_cases.py): facts of the first --people people of the bundled tinyworld
benchmark (default 250 of 320): first one fact of each (in an order shuffled by --seed), then a
second fact of each, and so on, up to four facts per person. Past --people edits a curve
therefore also shows two facts of one person interfering (they share the subject's key), not
only accumulation. The people never edited keep the locality probes that name them measurable
(probes naming an edited person are left out, see `kedit.bench.runs`).

Held-out perplexity is measured on --heldout-n sentences drawn (with --seed) from the tinyworld
corpus sentences (`kedit.eval.runner.context_sentences`, the sentences of the corpus the
statistics are computed on); they are not probes of any case, though some state facts that
later edits change: a working edit makes those less likely. Each checkpoint therefore also gives
the perplexity over the sentences that name none of the subjects edited so far
(`heldout_perplexity_untouched`, with their number and their unedited perplexity), which only
collapse moves. Names are matched as written, so a sentence naming an edited person by an alias
still counts as untouched.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from hparams_option import add_hparams_option, hparams_folder

METHODS = ["r-rome", "memit", "alphaedit", "ft-m"]
METRICS = ["reliability", "generalization", "locality"]
BATCHED = {"memit", "alphaedit", "emmet", "pmet"}  # edited --batch cases per step


def in_bench_order(cases: list, config: Any) -> tuple[list, bool]:
    """`cases` arranged so that run_bench's seeded shuffle (`select_cases`) restores their
    order; returns them and whether that was checked to hold."""
    from kedit.bench.runs import select_cases

    order = list(range(len(cases)))
    random.Random(config.seed).shuffle(order)  # the permutation select_cases applies
    arranged = [None] * len(cases)
    for position, index in enumerate(order):
        arranged[index] = cases[position]
    held = [r.case_id for r in select_cases(arranged, config)] == [r.case_id for r in cases]
    return (arranged if held else cases), held


# Held-out perplexity over the texts that name no subject edited so far, before and after.
UNTOUCHED = (
    "heldout_untouched_texts",
    "heldout_perplexity_untouched",
    "heldout_perplexity_untouched_unedited",
)


def run_method(
    lm: Any, method: str, cases: list, heldout: list[str], args: Any, batch: int | None = None
) -> dict:
    """One sequential run of `method` over `cases` (`batch` cases per step; by default --batch
    for the batched methods, else one); its curve and summary."""
    from kedit.bench.plan import model_folder_name
    from kedit.bench.report import plot_curves
    from kedit.bench.runs import BenchConfig, run_bench
    from kedit.methods.registry import get_method

    if batch is None:
        batch = args.batch if get_method(method).name in BATCHED else 1
    if args.checkpoint_every % batch:
        raise SystemExit(f"--checkpoint-every {args.checkpoint_every} is not a multiple of {batch}")
    config = BenchConfig(
        method=method,
        mode="sequential",
        batch_size=batch,
        schedule="after-each",
        checkpoint_every=args.checkpoint_every // batch,
        seed=args.seed,
        hparams=args.hparams,
        data="tinyworld distinct facts (benchmarks/tinyworld_cases.py)",
    )
    ordered, order_kept = in_bench_order(cases, config)
    folder = hparams_folder(
        args.out / "runs" / model_folder_name(lm.name) / f"{method}-e{len(cases)}-b{batch}",
        args.hparams,
    )

    seen: set[str] = set()

    def progress(record: dict) -> None:
        before = len(seen)
        seen.add(record["case_id"])
        if len(seen) > before and len(seen) % args.checkpoint_every == 0:
            print(f"{method}: {len(seen)} edits", file=sys.stderr, flush=True)

    done_file = folder / "cases.jsonl"
    resumed = len(done_file.read_text().splitlines()) if done_file.exists() else 0
    started = time.perf_counter()
    summary = run_bench(lm, ordered, config, folder, on_case=progress, heldout_texts=heldout)
    seconds = time.perf_counter() - started
    checkpoints = summary.get("checkpoints", [])
    curve = []
    for point in checkpoints:
        post = point.get("post", {}).get("teacher_forced", {})
        curve.append(
            {
                "edits": point["cases"],
                **{name: round(value, 4) for name, value in post.items()},
                "heldout_perplexity": round(point["heldout_perplexity"], 4),
                **{
                    name: round(point[name], 4) for name in UNTOUCHED if point.get(name) is not None
                },
            }
        )
    if checkpoints:
        plot = args.out / f"{model_folder_name(lm.name)}-{method}.png"
        plot_curves(relabel(checkpoints), "teacher_forced", plot, f"{lm.name} {method}")
    immediate = summary["metrics"]["post"]["teacher_forced"]
    return {
        "method": method,
        "hparams": args.hparams,
        "batch": batch,
        "edits": len(cases),
        "checkpoint_every_edits": args.checkpoint_every,
        "order": "rounds kept in order, each shuffled by --seed"
        if order_kept
        else "shuffled by run_bench (rounds mixed)",
        "heldout_perplexity_unedited": round(checkpoints[0]["heldout_perplexity_unedited"], 4)
        if checkpoints
        else None,
        "curve": curve,
        "immediate": {name: round(value, 4) for name, value in immediate.items()},
        "edit_seconds_median_per_step": round(summary["edit_seconds_median"], 4),
        "wall_seconds": round(seconds, 1),  # of this invocation: a resumed run's is shorter
        "cases_done_before": resumed,
        "folder": str(folder),
    }


def relabel(checkpoints: list[dict]) -> list[dict]:
    """Checkpoints with "edits" counting cases, not edit steps (for plot_curves' x axis)."""
    return [{**point, "edits": point["cases"]} for point in checkpoints]


def plot_comparison(results: list[dict], path: Path, title: str) -> Path:
    """One panel per metric and one for held-out perplexity, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS) + 1, figsize=(4 * (len(METRICS) + 1), 3.6))
    for result in results:
        label = f"{result['method']} (batch {result['batch']})"
        edits = [point["edits"] for point in result["curve"]]
        for axis, metric in zip(axes, METRICS, strict=False):
            axis.plot(edits, [p.get(metric) for p in result["curve"]], marker=".", label=label)
        (line,) = axes[-1].plot(
            edits, [p["heldout_perplexity"] for p in result["curve"]], marker="."
        )
        untouched = [p.get("heldout_perplexity_untouched") for p in result["curve"]]
        if any(value is not None for value in untouched):
            axes[-1].plot(edits, untouched, ls=":", color=line.get_color())
            before = [p.get("heldout_perplexity_untouched_unedited") for p in result["curve"]]
            axes[-1].plot(edits, before, ls="-.", color=line.get_color(), alpha=0.5)
    for axis, metric in zip(axes, METRICS, strict=False):
        axis.set_title(f"{metric} (teacher-forced)")
        axis.set_ylim(0, 1.05)
    unedited = next((r["heldout_perplexity_unedited"] for r in results if r["curve"]), None)
    if unedited:
        axes[-1].axhline(unedited, ls="--", color="gray", label="unedited")
    axes[-1].set_yscale("log")
    axes[-1].set_title("held-out perplexity\n(dotted: untouched texts, dash-dot: unedited)")
    for axis in axes:
        axis.set_xlabel("edits")
    axes[0].legend(fontsize="small")
    axes[-1].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--edits", type=int, default=1000, help="edits per method (<= 1280)")
    parser.add_argument("--batch", type=int, default=50, help="cases per MEMIT/AlphaEdit step")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="in edits (cases)")
    parser.add_argument("--heldout-n", type=int, default=200, help="held-out sentences")
    parser.add_argument(
        "--people", type=int, default=250,
        help="edit facts of the first P people only (0: all 320), so that locality probes about "
        "the others stay measurable; 1000 edits = 250 people x 4 facts",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    add_hparams_option(parser)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sequential"))
    args = parser.parse_args(argv)
    if args.edits < 1 or args.batch < 1 or args.checkpoint_every < 1:
        parser.error("--edits, --batch and --checkpoint-every must be positive")

    import kedit
    from kedit.bench.plan import heldout_texts, model_folder_name

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tinyworld_cases import distinct_fact_cases

    args.out.mkdir(parents=True, exist_ok=True)
    cases, about = distinct_fact_cases(
        args.edits, shuffle_seed=args.seed, people=args.people or None
    )
    heldout = heldout_texts(args.heldout_n, args.seed)
    lm = kedit.load(args.model)
    results = [run_method(lm, method, cases, heldout, args) for method in args.methods]
    report = {
        "benchmark": "sequential",
        "model": args.model,
        "protocol": "teacher_forced; curve: post-edit means over every case edited so far, at "
        "each checkpoint; immediate: each batch right after it was applied",
        "cases": about,
        "heldout": f"{len(heldout)} tinyworld corpus sentences drawn with seed {args.seed}",
        "results": results,
    }
    # A model given as a folder is named by the folder, so that nothing is written outside --out.
    (args.out / f"{model_folder_name(args.model)}.json").write_text(json.dumps(report, indent=2))
    if any(r["curve"] for r in results):
        title = f"sequential editing, {args.model}"
        plot_comparison(results, args.out / f"{model_folder_name(args.model)}.png", title)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
