"""Throughput of second-moment statistics on a bundled model; prints JSON.

1. Early stop: tokens/s of `second_moments` at a middle layer (fresh cache, so the corpus is
   tokenised and the statistic computed each time) against tokens/s of full forward passes
   (tokenisation included) over the same token batches. The ratio is stats / full, from the
   best of the interleaved repeats, by wall time and by CPU time (steadier on a shared
   machine; the in-process runs use the threads torch is given, e.g. OMP_NUM_THREADS=1).
2. Processes: collection time (best of the repeats) of `kedit stats collect` in one process
   against two processes under torchrun (gloo), the machine's cores split between them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def early_stop(model: str, layer: int | None, n: int, repeats: int) -> dict:
    import torch

    import kedit
    from kedit.stats import (
        DEFAULT_BATCH_TOKENS,
        list_cached,
        open_corpus,
        second_moments,
        token_batches,
        tokenize_sorted,
    )

    lm = kedit.load(model)
    layer = (lm.n_layers - 1) // 2 if layer is None else layer  # its block ends halfway
    source = open_corpus("tinyworld", n)

    def collect(dtype: str) -> dict:
        with tempfile.TemporaryDirectory(prefix="kedit-stats-speed-") as cache:
            os.environ["KEDIT_CACHE"] = cache
            second_moments(lm, [layer], n_samples=n, dtype=dtype, progress=False)
            (entry,) = list_cached()
            return entry

    cap = collect("float64")["max_length"]  # also the warm-up

    @torch.no_grad()
    def full_forward() -> int:
        encoded = tokenize_sorted(lm, source.load(), cap)
        lengths = [len(ids) for ids in encoded]
        for begin, end in token_batches(lengths, 0, DEFAULT_BATCH_TOKENS):
            ids, mask = lm.pad(encoded[begin:end])
            lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
        return sum(lengths)

    runs = {
        "full_forward": full_forward,
        "stats_float64": lambda: collect("float64")["tokens"],
        "stats_float32": lambda: collect("float32")["tokens"],
    }
    wall: dict[str, float] = dict.fromkeys(runs, float("inf"))
    cpu = dict(wall)
    tokens = 0
    for _ in range(repeats):  # interleaved, so that load on a shared machine hits all alike
        for name, run in runs.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            tokens = run()
            wall[name] = min(wall[name], time.perf_counter() - started)
            cpu[name] = min(cpu[name], time.process_time() - started_cpu)
    per_s = {name: tokens / seconds for name, seconds in wall.items()}
    per_cpu_s = {name: tokens / seconds for name, seconds in cpu.items()}
    return {
        "model": model,
        "layer": layer,
        "n_layers": lm.n_layers,
        "documents": source.n_samples,
        "max_length": cap,
        "tokens": tokens,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "tokens_per_s": per_s,
        "tokens_per_cpu_s": per_cpu_s,
        "ratio_float64": per_s["stats_float64"] / per_s["full_forward"],
        "ratio_float32": per_s["stats_float32"] / per_s["full_forward"],
        "cpu_ratio_float64": per_cpu_s["stats_float64"] / per_cpu_s["full_forward"],
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def collect_seconds(model: str, layer: int, n: int, processes: int, repeats: int) -> dict:
    """Best wall time of `kedit stats collect` runs and of the collection time they report."""
    kedit_script = str(Path(sys.executable).parent / "kedit")
    command = [kedit_script, "stats", "collect", "--model", model, "--layers", str(layer)]
    command += ["--n-samples", str(n), "--checkpoint-every", "0"]
    if processes > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1"]
        launch += ["--nproc_per_node", str(processes), "--master_addr", "127.0.0.1"]
        command = [*launch, "--master_port", str(free_port()), *command]
    threads = max(1, (os.cpu_count() or 1) // processes)
    collected, walls = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="kedit-stats-speed-") as cache:
            env = {**os.environ, "KEDIT_CACHE": cache, "OMP_NUM_THREADS": str(threads)}
            started = time.perf_counter()
            out = subprocess.run(command, env=env, capture_output=True, text=True)
            walls.append(time.perf_counter() - started)
        if out.returncode != 0:
            raise SystemExit(out.stdout + out.stderr)
        collected.append(float(re.search(r"done in ([\d.]+) s", out.stdout).group(1)))
    return {
        "processes": processes,
        "threads_per_process": threads,
        "collect_seconds": min(collected),
        "wall_seconds": min(walls),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--layer", type=int, default=None, help="default: (layers - 1) // 2")
    parser.add_argument("--n", type=int, default=2000, help="documents of the tinyworld corpus")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    speed = early_stop(args.model, args.layer, args.n, args.repeats)
    runs = [
        collect_seconds(args.model, speed["layer"], args.n, count, args.repeats) for count in (1, 2)
    ]
    result = {
        "benchmark": "stats_speed",
        "early_stop": speed,
        "processes": runs,
        "two_process_speedup": runs[0]["collect_seconds"] / runs[1]["collect_seconds"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
