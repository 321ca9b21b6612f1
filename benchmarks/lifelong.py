"""Lifelong editing: every lifelong method (GRACE, WISE, MELO, UltraEdit, LoRA) beside ROME
(r-ROME), MEMIT, AlphaEdit and FT-M on one sequence of tinyworld edits; one table, one plot.

Each method edits the same sequence (`tinyworld_cases.distinct_fact_cases`, as sequential.py:
one fact of each of --people people, then a second fact of each, ...) on one model, in batches
of one (GRACE, WISE, MELO, LoRA, r-ROME, FT-M) or of --batch (UltraEdit, MEMIT, AlphaEdit), at
each method's defaults for the model. Every --checkpoint-every edits all cases edited so far
are scored again (reliability, generalization, locality, teacher-forced) with the held-out
perplexity (sequential.py's `run_method`, whose runs resume). Beside the curve each method
gets its edit throughput (edits per second of editing, evaluation excluded) and the memory its
edits add: the bytes of the adaptors and memories attached to the model after the last edit
(weight-editing methods add none: their deltas are written into the weights), and the bytes of
its saved edit files.

The issue's run is `--edits 1000 --checkpoint-every 100` (the targets are read after 1000
edits); the default is a shorter run that a shared 2-core machine finishes in minutes. Writes
<out>/<model>.json and <out>/<model>.png and prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hparams_option import add_hparams_option

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sequential  # noqa: E402

LIFELONG = ["grace", "wise", "melo", "ultraedit", "lora"]
BASELINES = ["r-rome", "memit", "alphaedit", "ft-m"]
BATCHED = {"ultraedit", "memit", "alphaedit"}  # edited --batch cases per step


def edit_seconds(folder: Path) -> float:
    """The seconds spent editing in a run folder's cases (each step's once)."""
    steps: dict[int, float] = {}
    for line in (folder / "cases.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps[record["edits_applied"]] = record["edit_seconds"]
    return sum(steps.values())


def added_bytes(folder: Path) -> dict[str, int]:
    """What a run's edits add to the model (adaptor and memory tensors: every adaptor's, and
    the rows memories append) and the bytes of its edit files."""
    from kedit.edits import AdaptorDelta, MemoryDelta, read_edit_file

    attached = files = 0
    for path in sorted((folder / "edits").glob("*.kedit")):
        files += path.stat().st_size
        for change in read_edit_file(path)[1]:
            if isinstance(change, AdaptorDelta):
                tensors = change.tensors.values()
            elif isinstance(change, MemoryDelta):
                tensors = change.appended.values()
            else:
                continue
            attached += sum(t.numel() * t.element_size() for t in tensors)
    return {"attached_bytes": attached, "edit_file_bytes": files}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--methods", nargs="+", default=LIFELONG + BASELINES)
    parser.add_argument("--edits", type=int, default=200, help="edits per method (<= 1280)")
    parser.add_argument(
        "--batch", type=int, default=100, help="cases per step of " + ", ".join(sorted(BATCHED))
    )
    parser.add_argument("--checkpoint-every", type=int, default=100, help="in edits (cases)")
    parser.add_argument("--heldout-n", type=int, default=100, help="held-out sentences")
    parser.add_argument("--people", type=int, default=250, help="as in sequential.py")
    parser.add_argument("--seed", type=int, default=0)
    add_hparams_option(parser)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lifelong"))
    args = parser.parse_args(argv)
    if args.edits < 1 or args.batch < 1 or args.checkpoint_every < 1:
        parser.error("--edits, --batch and --checkpoint-every must be positive")

    from tinyworld_cases import distinct_fact_cases

    import kedit
    from kedit.bench.plan import heldout_texts, model_folder_name

    args.out.mkdir(parents=True, exist_ok=True)
    cases, about = distinct_fact_cases(
        args.edits, shuffle_seed=args.seed, people=args.people or None
    )
    heldout = heldout_texts(args.heldout_n, args.seed)
    lm = kedit.load(args.model)
    results = []
    for method in args.methods:
        batch = args.batch if method in BATCHED else 1
        result = sequential.run_method(lm, method, cases, heldout, args, batch=batch)
        folder = Path(result["folder"])
        seconds = edit_seconds(folder)
        result["edits_per_second"] = round(len(cases) / seconds, 2)
        result["edit_seconds_per_edit"] = round(seconds / len(cases), 4)
        result.update(added_bytes(folder))
        results.append(result)
        print(f"{method}: done", file=sys.stderr, flush=True)
    report = {
        "benchmark": "lifelong",
        "model": args.model,
        "protocol": "teacher_forced; curve: post-edit means over every case edited so far, at "
        "each checkpoint; immediate: each batch right after it was applied",
        "cases": about,
        "heldout": f"{len(heldout)} tinyworld corpus sentences drawn with seed {args.seed}",
        "results": results,
    }
    name = model_folder_name(args.model)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
    if any(r["curve"] for r in results):
        title = f"lifelong editing, {args.model}, {len(cases)} edits"
        sequential.plot_comparison(results, args.out / f"{name}.png", title)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
