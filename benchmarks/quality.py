"""Quality per method on the tinyworld benchmark and the bundled models; prints JSON.

Independent editing (edit, evaluate, undo, per case) under the teacher-forced protocol;
per-case results go to runs/quality/<model>/<method>/ (with a `-h<hash>` suffix under
`--hparams`) and resume if interrupted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hparams_option import add_hparams_option, hparams_folder

METHODS = ["rome", "r-rome", "ft-m", "ft-l"]
MODELS = ["tiny-gpt2", "tiny-llama", "tiny-gpt2-wide"]


def main() -> None:
    import kedit
    from kedit.bench.plan import model_folder_name
    from kedit.bench.runs import BenchConfig, run_bench
    from kedit.data import load_requests
    from kedit.zoo import benchmark_path

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    add_hparams_option(parser)
    args = parser.parse_args()
    data = benchmark_path("knowedit")
    requests = load_requests(data, n=args.n)
    results = []
    for model in args.models:
        lm = kedit.load(model)
        for method in args.methods:
            config = BenchConfig(method=method, data=data.name, hparams=args.hparams)
            folder = hparams_folder(args.out / model_folder_name(model) / method, args.hparams)
            summary = run_bench(lm, requests, config, folder)
            post = summary["metrics"]["post"]["teacher_forced"]
            results.append(
                {
                    "model": model,
                    "method": method,
                    "cases": len(requests),
                    "protocol": "teacher_forced",
                    "hparams": args.hparams,
                    **{name: round(value, 4) for name, value in post.items()},
                    "edit_seconds_median": round(summary["edit_seconds_median"], 4),
                }
            )
            print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"benchmark": "quality", "results": results}, indent=2))


if __name__ == "__main__":
    main()
