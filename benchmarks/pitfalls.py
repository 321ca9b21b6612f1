"""Knowledge conflict and knowledge distortion (Li et al., 2024) of every method on tinyworld;
prints JSON.

Runs the ConflictEdit cases (reverse, composite and coverage in turn) and the easy and hard
RoundEdit cases of the bundled tinyworld files with each method at its defaults for the model,
one seed, one thread. Per-case results go to `--runs` (an interrupted run resumes);
`<out>/report.md` holds the Pitfalls tables, `<out>/pitfalls_*.png` their bars, and
`<out>/<model>.json` the numbers and each method's time (wall clock and CPU time of this
process, model loading and statistics included).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hparams_option import add_hparams_option, hparams_folder

FIVE = ["rome", "r-rome", "memit", "alphaedit", "ft-m"]
DATASETS = {
    "conflict": "tinyworld_conflict.json",
    "easy": "tinyworld_roundedit_easy.json",
    "hard": "tinyworld_roundedit_hard.json",
}


def main(argv: list[str] | None = None) -> dict:
    import torch

    import kedit
    from kedit.bench.pitfalls import load_benchmark, run_pitfalls
    from kedit.bench.plan import report_title, write_report
    from kedit.bench.report import spread
    from kedit.bench.runs import BenchConfig
    from kedit.zoo import DATA_DIR

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument(
        "--methods", nargs="+", default=None, help="default: the five, then every other one"
    )
    parser.add_argument("--n-conflict", type=int, default=30, help="ConflictEdit cases")
    parser.add_argument("--n-round", type=int, default=16, help="RoundEdit cases per file")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pitfalls"))
    parser.add_argument("--runs", type=Path, default=Path("runs/pitfalls"))
    add_hparams_option(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    methods = args.methods or FIVE + [m for m in kedit.list_methods() if m not in FIVE]
    counts = {"conflict": args.n_conflict, "easy": args.n_round, "hard": args.n_round}
    data = {key: load_benchmark(DATA_DIR / name, n=counts[key]) for key, name in DATASETS.items()}
    started_all = time.perf_counter()
    lm = kedit.load(args.model)
    rows, results = [], []
    for method in methods:
        wall, cpu = time.perf_counter(), time.process_time()
        result = {"model": args.model, "method": method, "hparams": args.hparams}
        for key, cases in data.items():
            config = BenchConfig(method=method, hparams=args.hparams, seed=0, data=DATASETS[key])
            folder = hparams_folder(args.runs / args.model / method / key, args.hparams)
            summary = run_pitfalls(lm, cases, config, folder)
            result[key] = {"cases": len(cases), **summary["metrics"]["pitfalls"]}
            rows.append((f"{args.model} / {method} / {key}", spread([summary])))
        result["seconds"] = round(time.perf_counter() - wall, 1)
        result["cpu_seconds"] = round(time.process_time() - cpu, 1)
        results.append(result)
        print(json.dumps(result), flush=True)
    title = report_title([args.model], methods, list(DATASETS.values()), ["independent"], "seed 0")
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(args.out, title, rows, ["probability"])
    five = [r for r in results if r["method"] in FIVE]
    output = {
        "benchmark": "pitfalls",
        "model": args.model,
        "cases": counts,
        "results": results,
        "seconds_total": round(time.perf_counter() - started_all, 1),
        "seconds_five_methods": round(sum(r["seconds"] for r in five), 1),
        "cpu_seconds_five_methods": round(sum(r["cpu_seconds"] for r in five), 1),
    }
    (args.out / f"{args.model}.json").write_text(json.dumps(output, indent=2) + "\n")
    print(json.dumps(output, indent=2))
    return output


if __name__ == "__main__":
    main()
