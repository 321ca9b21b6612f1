"""Wall time of a whole benchmark run: ROME on 300 tinyworld cases (edit, evaluate pre and
post under the teacher-forced protocol, undo), with the per-case split; prints JSON.

The second moments and context prefixes are computed before the clock starts (they are
cached per model and shared by every run), so this measures the run itself. The process's
CPU time is reported beside the wall time: on a shared machine it leaves out the time other
processes held the core.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time


def main() -> None:
    import torch

    import kedit
    from kedit.bench.runs import BenchConfig, run_bench
    from kedit.data import load_requests
    from kedit.zoo import benchmark_path

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--method", default="rome")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = kedit.load(args.model)
    requests = load_requests(benchmark_path("knowedit"), n=args.n)
    kedit.edit(lm, requests[0], method=args.method).undo()  # statistics and prefixes, cached
    config = BenchConfig(method=args.method, protocols=["teacher_forced"])
    with tempfile.TemporaryDirectory() as out:
        started, started_cpu = time.perf_counter(), time.process_time()
        summary = run_bench(lm, requests, config, out)
        total = time.perf_counter() - started
        total_cpu = time.process_time() - started_cpu
        lines = open(f"{out}/cases.jsonl").read().splitlines()
    cases = [json.loads(line) for line in lines]
    edit_seconds = [c["edit_seconds"] for c in cases]
    eval_seconds = [c["eval_seconds"] for c in cases]
    post = summary["metrics"]["post"]["teacher_forced"]
    result = {
        "benchmark": "bench_speed",
        "model": args.model,
        "method": args.method,
        "cases": len(cases),
        "threads": args.threads,
        "total_seconds": round(total, 2),
        "total_cpu_seconds": round(total_cpu, 2),
        "edit_seconds_total": round(sum(edit_seconds), 2),
        "post_eval_seconds_total": round(sum(eval_seconds), 2),
        "pre_eval_and_other_seconds": round(total - sum(edit_seconds) - sum(eval_seconds), 2),
        "edit_seconds_median": round(statistics.median(edit_seconds), 4),
        "eval_seconds_median": round(statistics.median(eval_seconds), 4),
        "reliability": round(post["reliability"], 4),
        "locality": round(post["locality"], 4),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
