"""Per-edit median time and peak memory per method on a bundled model; prints JSON.

Each method runs in its own process so that its peak memory is its own. Work that does not
depend on the edit (statistics, context prefixes) is done by a warm-up edit and not timed.
On a machine whose timings drift, `--repeat R` times the same edits R rounds in a row and
reports each round's median and the median of those.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from hparams_option import add_hparams_option

METHODS = ["rome", "r-rome", "ft-m", "ft-l"]


def measure(model: str, method: str, n: int, hparams: dict, repeat: int = 1) -> dict:
    import torch

    import kedit
    from kedit.data import load_requests
    from kedit.zoo import benchmark_path

    torch.set_num_threads(max(1, torch.get_num_threads()))
    requests = load_requests(benchmark_path("knowedit"), n=n + 1)
    lm = kedit.load(model)
    kedit.edit(lm, requests[0], method=method, hparams=hparams).undo()
    rounds: list[list[float]] = []
    for _ in range(repeat):
        rounds.append([])
        for request in requests[1:]:
            started = time.perf_counter()
            edit = kedit.edit(lm, request, method=method, hparams=hparams)
            rounds[-1].append(time.perf_counter() - started)
            edit.undo()
    medians = [statistics.median(times) for times in rounds]
    every = sorted(t for times in rounds for t in times)
    return {
        "model": model,
        "method": method,
        "hparams": hparams,
        "edits": n,
        "median_seconds": statistics.median(medians),
        "round_medians": medians,
        "p90_seconds": every[int(0.9 * (len(every) - 1))],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--n", type=int, default=30, help="timed edits per method")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the same edits")
    add_hparams_option(parser)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat: expected a positive integer, got {args.repeat}")
    if args.one:
        result = measure(args.model, args.methods[0], args.n, args.hparams, args.repeat)
        print(json.dumps(result))
        return
    results = []
    for method in args.methods:
        command = [sys.executable, __file__, "--one", "--model", args.model, "--n", str(args.n)]
        command += ["--repeat", str(args.repeat)]
        command += ["--hparams", json.dumps(args.hparams)]
        out = subprocess.run([*command, "--methods", method], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(out.stderr)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"benchmark": "speed", "results": results}, indent=2))


if __name__ == "__main__":
    main()
