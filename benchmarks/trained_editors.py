"""Trained editors (MEND, MALMEN, SERAC) beside ROME and FT-M on the tinyworld benchmark; prints
JSON.

For each model: the editors' training time (`--train`: trained here, one thread, into
`--out/editors`, timed; else the bundled editors, with the training time their metadata
records), the median time of one edit, and quality of independent edits on the first `--n`
cases (teacher-forced, post-edit); MALMEN also edits the cases in batches of `--batch`. Per-case
results go to `--out/<model>/<method>` and resume if interrupted.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

MODELS = ["tiny-gpt2"]
EDITORS = ["mend", "malmen", "serac"]
BASELINES = ["rome", "ft-m"]


def main() -> None:
    import torch

    import kedit
    from kedit.bench.plan import model_folder_name
    from kedit.bench.runs import BenchConfig, run_bench
    from kedit.data import load_requests
    from kedit.methods._editor import BUNDLED_EDITORS
    from kedit.zoo import benchmark_path

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--editors", nargs="*", default=EDITORS)
    parser.add_argument("--baselines", nargs="*", default=BASELINES)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch", type=int, default=100, help="MALMEN's batch of edits.")
    parser.add_argument("--train", action="store_true", help="Train the editors here, timed.")
    parser.add_argument("--out", type=Path, default=Path("runs/trained_editors"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = benchmark_path("knowedit")
    requests = load_requests(data, n=args.n)
    results = []

    def bench(lm, method, hparams, mode="independent", batch_size=1) -> dict:
        config = BenchConfig(
            method=method, mode=mode, batch_size=batch_size, data=data.name, hparams=hparams
        )
        name = method if mode == "independent" else f"{method}-batch{batch_size}"
        folder = args.out / model_folder_name(lm.name) / name
        summary = run_bench(lm, requests, config, folder)
        post = summary["metrics"]["post"]["teacher_forced"]
        return {
            "cases": len(requests),
            "mode": mode,
            "batch_size": batch_size,
            "protocol": "teacher_forced",
            **{key: round(value, 4) for key, value in post.items()},
            "edit_seconds_median": round(summary["edit_seconds_median"], 4),
        }

    for model in args.models:
        lm = kedit.load(model)
        for method in args.editors:
            folder = args.out / "editors" / f"{method}-{model}"
            if args.train:
                started = time.perf_counter()
                kedit.train_editor(lm, method, out=folder, progress=False)
                trained = {"train_seconds": round(time.perf_counter() - started, 1)}
            else:
                folder = BUNDLED_EDITORS / f"{method}-{model}"
                trained = {"train_seconds": _recorded_seconds(folder)}
            hparams = {"editor": str(folder)}
            rows = [bench(lm, method, hparams)]
            if method == "malmen":
                rows.append(bench(lm, method, hparams, "batch", args.batch))
            for row in rows:
                results.append({"model": model, "method": method, **trained, **row})
                print(json.dumps(results[-1]), flush=True)
        for method in args.baselines:
            results.append({"model": model, "method": method, **bench(lm, method, {})})
            print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"benchmark": "trained_editors", "results": results}, indent=2))


def _recorded_seconds(folder: Path) -> float | None:
    """The training time an editor's metadata records (None where it records none)."""
    from safetensors import safe_open

    from kedit.methods._editor import EDITOR_FILE
    from kedit.methods.serac import META_FILE

    if (folder / EDITOR_FILE).is_file():
        with safe_open(str(folder / EDITOR_FILE), "pt") as handle:
            return json.loads(handle.metadata()["kedit"]).get("seconds")
    if (folder / META_FILE).is_file():
        return json.loads((folder / META_FILE).read_text()).get("seconds")
    return None


if __name__ == "__main__":
    main()
