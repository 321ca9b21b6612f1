"""Does the layer `kedit locate` (and `layers: auto`) picks edit as well as the tuned one?
Prints JSON.

Locates the ROME layer by causal tracing (the MLP's average indirect effect at the last
subject token over 50 known facts), then runs ROME on the first `--n` cases of the bundled
tinyworld benchmark at the located layer, at the model table's default layer and, with
`--all-layers`, at every layer; reports Reliability, Generalization and their product
(teacher-forced protocol) and the ratio located / default (issue 17's target on tiny-chat:
at least 0.97). Per-case results go to runs/locate/<model>/rome-layer-<L>/ and resume.

    python benchmarks/locate_quality.py --model tiny-gpt2 --all-layers
    python benchmarks/locate_quality.py --model tiny-chat          # awaits tiny-chat (issue 16)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    import torch

    import kedit
    from kedit.analysis import locate
    from kedit.bench.plan import model_folder_name
    from kedit.bench.runs import BenchConfig, run_bench
    from kedit.data import load_requests
    from kedit.methods.registry import resolve_hparams
    from kedit.zoo import benchmark_path

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--all-layers", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/locate"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    lm = kedit.load(args.model)
    started = time.perf_counter()
    located = locate(lm)
    locate_seconds = time.perf_counter() - started
    default = resolve_hparams("rome", lm).layers[0]
    layers = sorted(
        {located.rome[0], default} | (set(range(lm.n_layers)) if args.all_layers else set())
    )
    data = benchmark_path("knowedit")
    requests = load_requests(data, n=args.n)
    quality = {}
    for layer in layers:
        config = BenchConfig(method="rome", data=data.name, hparams={"layers": [layer]})
        folder = args.out / model_folder_name(args.model) / f"rome-layer-{layer}"
        post = run_bench(lm, requests, config, folder)["metrics"]["post"]["teacher_forced"]
        quality[layer] = {
            "reliability": round(post["reliability"], 4),
            "generalization": round(post["generalization"], 4),
            "product": round(post["reliability"] * post["generalization"], 4),
            "locality": round(post["locality"], 4),
        }
    ratio = quality[located.rome[0]]["product"] / quality[default]["product"]
    print(
        json.dumps(
            {
                "benchmark": "locate_quality",
                "model": args.model,
                "cases": len(requests),
                "protocol": "teacher_forced",
                "located": {
                    "rome": located.rome,
                    "memit": located.memit,
                    "facts": located.facts,
                    "n_facts": located.n_facts,
                    "mlp_aie_last_subject_token": [round(v, 4) for v in located.effect.tolist()],
                    "seconds": round(locate_seconds, 2),
                },
                "default_layer": default,
                "rome_by_layer": quality,
                "located_over_default": round(ratio, 4),
                "target": 0.97,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
