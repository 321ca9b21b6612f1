"""Every unlearning method on the tinyworld forget task, scored against the exact retrain
baseline; prints JSON and writes, per forget share, results.json, table.md and curves.png.

For `share` of the world's people, their home city and employer are forgotten; their country,
profession and language (in-domain) and every fact of other people must stay, and so must the
general text (`kedit.zoo.forget_task`). The baseline is the model retrained from its recipe
without the forgotten facts' sentences (`kedit zoo retrain-without`): it is read from
`--baseline-dir/<model>-<share>` and trained there first with `--retrain` (the time of the
original training: tiny-gpt2 about 18 min at one thread). Several `--baseline-dir`s (other
seeds, other machines) score every run against each, and the table gives the lowest and highest
forget quality. `--rescore` scores the runs of an earlier results.json against the baselines
there now. Timings are at one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

METHODS = ["ga", "grad_diff", "ga_kl", "random_label", "npo", "simnpo", "memflex", "rmu"]
BASELINE_RUN = "retrain (exact baseline)"


def run_methods(lm, args, forget, train_retain, sets, baseline, share, out) -> list:
    """Each method's unlearning, scored and undone: (method, result) pairs; writes the curves."""
    import kedit
    from kedit.bench.unlearning import plot_curves

    runs, curves = [], {}
    for method in args.methods:
        edit = kedit.unlearn(
            lm, forget["forget"], train_retain, method, hparams=args.hparams.get(method)
        )
        result = kedit.evaluate_unlearning(lm, **sets, baseline=baseline)
        edit.undo()
        result.update(
            steps=edit.info["steps"],
            seconds=edit.info["seconds"],
            cpu_seconds=edit.info["cpu_seconds"],
            hparams=edit.hparams,
            trained=edit.info["modules"],
        )
        curves[method] = edit.info["curve"]
        runs.append((method, result))
        progress = {"share": share, "method": method, "steps": result["steps"]}
        print(json.dumps({**progress, "seconds": result["seconds"]}), flush=True)
    plot_curves(curves, out / "curves.png")
    return runs


def main() -> None:
    import torch

    import kedit
    from kedit.bench.unlearning import unlearning_markdown
    from kedit.data.unlearn_items import UnlearnItem
    from kedit.unlearn.evaluate import compare_with_baseline
    from kedit.zoo import ZOO_META, build_world, model_info
    from kedit.zoo.forget_task import build_forget_task, perturbed_answers
    from kedit.zoo.retrain import RETRAIN_KEY, retrain_without

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--shares", nargs="+", type=float, default=[0.01, 0.05])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument(
        "--hparams",
        type=json.loads,
        default={},
        help='JSON {"method": {"key": value}} overriding the defaults',
    )
    parser.add_argument(
        "--baseline-dir",
        type=Path,
        nargs="+",
        default=[Path("runs/retrain")],
        help="where <model>-<share> retrains are; several: score against each (--retrain trains "
        "the first's)",
    )
    parser.add_argument("--retrain", action="store_true", help="train a missing baseline")
    parser.add_argument("--out", type=Path, default=Path("runs/unlearning"))
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="score the runs of --out's results.json against the baseline (trained since) "
        "instead of running the methods again",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    lm = kedit.load(args.model)
    meta = model_info(args.model)
    world = build_world(meta["world_seed"], meta["n_people"])
    summary = []
    for share in args.shares:
        task = build_forget_task(world, share)

        def items(facts: list) -> list[UnlearnItem]:
            return [UnlearnItem(f.prompt, f.answer, perturbed_answers(world, f)) for f in facts]

        forget = {"forget": items(task.forget), "forget_paraphrase": items(task.forget_paraphrase)}
        retain = {"in_domain": items(task.in_domain), "other_people": items(task.other_people)}
        train_retain = items(task.retain)
        sets = dict(forget=forget, retain=retain, general=task.general)
        out = args.out / f"{args.model}-{share:g}"
        out.mkdir(parents=True, exist_ok=True)
        baselines = []
        for index, where in enumerate(args.baseline_dir):
            folder = where / f"{args.model}-{share:g}"
            found = folder / ZOO_META
            if (args.retrain and index == 0) or found.is_file():
                pairs = [item.pair for item in forget["forget"]]
                made = json.loads(found.read_text()).get(RETRAIN_KEY, {}) if found.is_file() else {}
                seed = made.get("seed")  # a retrain there may be of another seed
                folder = retrain_without(args.model, pairs, folder, args.retrain, seed=seed)
                trained = json.loads((folder / ZOO_META).read_text())
                scored = kedit.evaluate_unlearning(kedit.load(str(folder)), **sets)
                scored["seconds"] = trained["train_time_s"]
                baselines.append(scored)
            elif args.rescore:
                raise SystemExit(f"--rescore: no baseline in {folder}")
        baseline = baselines or None
        if args.rescore:
            earlier = json.loads((out / "results.json").read_text())["runs"]
            runs = [(r.pop("run"), r) for r in earlier if not r["run"].startswith(BASELINE_RUN)]
            for _, result in runs:
                compare_with_baseline(result, baseline)
        else:
            runs = [("original", kedit.evaluate_unlearning(lm, **sets, baseline=baseline))]
            runs += run_methods(lm, args, forget, train_retain, sets, baseline, share, out)
        for index, scored in enumerate(baselines):
            label = BASELINE_RUN if len(baselines) == 1 else f"{BASELINE_RUN} {index + 1}"
            runs.insert(1 + index, (label, scored))
        title = (
            f"{args.model}, forget {len(task.people)} people's home city and employer "
            f"({share:.0%}, {len(forget['forget'])} prompts)"
        )
        table = unlearning_markdown(title, runs)
        (out / "table.md").write_text(table)
        record = {
            "model": args.model,
            "share": share,
            "people": list(task.people),
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg()[0],
            "written": time.strftime("%Y-%m-%d %H:%M"),
            "runs": [{"run": label, **result} for label, result in runs],
        }
        (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
        print(table, flush=True)
        summary.append(record)
    compact = [
        {
            "model": record["model"],
            "share": record["share"],
            "runs": {
                run["run"]: {
                    **{
                        f"{name}_acc": round(scores["teacher_forced"]["token_accuracy"], 4)
                        for name, scores in run["sets"].items()
                    },
                    "general_ppl": round(run["general"]["probability"]["perplexity"], 4),
                    "forget_quality": run.get("vs_baseline", {}).get("forget_quality"),
                    "forget_quality_range": run.get("forget_quality_range"),
                    "seconds": run.get("seconds"),
                    "cpu_seconds": run.get("cpu_seconds"),
                }
                for run in record["runs"]
            },
        }
        for record in summary
    ]
    print(json.dumps({"benchmark": "unlearning", "results": compact}, indent=1))


if __name__ == "__main__":
    main()
