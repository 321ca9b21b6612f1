"""Time and peak memory of one batch edit of 10, 100 and 1000 facts (MEMIT, AlphaEdit, EMMET)
on a bundled model, and the batch's teacher-forced quality; prints JSON.

Each (method, batch size) runs in its own process, so that its peak memory is its own. What does
not depend on the batch (second moments of the edited layers, computed or read from the stats
cache; context prefixes; AlphaEdit's null-space projections; EMMET's inverse moment) is made by
an untimed warm-up edit of one case, undone, before the timed edit.

Cases: batches up to 320 take the first cases of the bundled tinyworld benchmark (one fact of
each of 320 people); larger batches add other facts of the same people (see
tinyworld_cases.py), so from 321 on a batch holds two or more facts of one person, which share
the subject's key. The JSON says so in "cases".

Memory (MiB, from /proc/self/status and getrusage): `model_rss_mb` after loading the model;
`ready_rss_mb` after the warm-up; `edit_peak_rss_mb` the peak during the timed edit alone (the
kernel's peak counter is reset just before it, where /proc/self/clear_refs allows); `peak_rss_mb`
the process's ru_maxrss at the end of the edit (loading, statistics and warm-up included).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

METHODS = ["memit", "alphaedit", "emmet"]
SIZES = [10, 100, 1000]
VALUE_FUNCTIONS = ("optimize_value", "optimize_values")


def status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB; None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@contextmanager
def value_timer() -> Iterator[dict[str, float]]:
    """Time spent in the value optimisation (`optimize_value(s)` wherever a method module
    imported it); nested calls count once. Yields {"seconds": ..., "calls": ...}."""
    from kedit.methods.registry import list_methods

    list_methods()  # imports every method module

    spent = {"seconds": 0.0, "calls": 0}
    depth = [0]
    patched = []

    def wrap(function):
        def timed(*args, **kwargs):
            depth[0] += 1
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    spent["seconds"] += time.perf_counter() - started
                    spent["calls"] += 1

        return timed

    for name, module in list(sys.modules.items()):
        if not name.startswith("kedit.methods"):
            continue
        for attr in VALUE_FUNCTIONS:
            function = getattr(module, attr, None)
            if callable(function):
                patched.append((module, attr, function))
                setattr(module, attr, wrap(function))
    try:
        yield spent
    finally:
        for module, attr, function in patched:
            setattr(module, attr, function)


def batch_cases(size: int) -> tuple[list, dict[str, Any]]:
    """The first `size` cases: bundled benchmark first, then other facts of the same people."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tinyworld_cases import distinct_fact_cases

    return distinct_fact_cases(size)


def measure(model: str, method: str, size: int) -> dict[str, Any]:
    """One timed batch edit of `size` cases, in this process; then its evaluation."""
    import torch

    import kedit
    from kedit.eval.runner import summarize

    requests, cases = batch_cases(size)
    lm = kedit.load(model)
    model_rss = status_mb("VmRSS")
    warm = time.perf_counter()
    kedit.edit(lm, requests[:1], method=method).undo()
    warm_seconds = time.perf_counter() - warm
    ready_rss = status_mb("VmRSS")
    peak_reset = reset_peak()
    with value_timer() as value:
        started, started_cpu = time.perf_counter(), time.process_time()
        edit = kedit.edit(lm, requests, method=method)
        seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - started_cpu
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    edit_peak = status_mb("VmHWM") if peak_reset else None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    steps = edit.info.get("value_steps")
    evaluated = time.perf_counter()
    post = summarize(kedit.evaluate(lm, requests, edit=edit))["post"]["teacher_forced"]
    eval_seconds = time.perf_counter() - evaluated
    edit.undo()

    def minus(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(a - b, 1)

    return {
        "model": model,
        "method": method,
        "batch": size,
        "layers": edit.hparams.get("layers"),
        "edit_seconds": round(seconds, 3),
        "edit_cpu_seconds": round(cpu_seconds, 3),
        "value_seconds": round(value["seconds"], 3) if value["calls"] else None,
        "rest_seconds": round(seconds - value["seconds"], 3) if value["calls"] else None,
        "value_steps_mean": round(sum(steps) / len(steps), 2) if steps else None,
        "value_steps_total": sum(steps) if steps else None,
        "warmup_seconds": round(warm_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "model_rss_mb": round(model_rss, 1) if model_rss else None,
        "ready_rss_mb": round(ready_rss, 1) if ready_rss else None,
        "edit_peak_rss_mb": round(edit_peak, 1) if edit_peak else None,
        "edit_peak_above_model_mb": minus(edit_peak, model_rss),
        "edit_peak_above_ready_mb": minus(edit_peak, ready_rss),
        "peak_rss_mb": round(peak, 1),
        "peak_above_model_mb": minus(peak, model_rss),
        "teacher_forced": {name: round(value, 4) for name, value in post.items()},
        "cases": cases,
        "threads": torch.get_num_threads(),
        "load_average_1min": load,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--sizes", nargs="+", type=int, default=SIZES, help="edits per batch")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        result = measure(args.model, args.methods[0], args.sizes[0])
        print(json.dumps(result))
        return result
    results = []
    for method in args.methods:
        for size in args.sizes:
            command = [sys.executable, __file__, "--one", "--model", args.model]
            command += ["--methods", method, "--sizes", str(size)]
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(out.stderr)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    report = {
        "benchmark": "batch_scale",
        "statistics": "second moments of the edited layers (and every other edit-independent "
        "cache: context prefixes, null-space projections, inverse moments) were computed or read "
        "from the stats cache by an untimed warm-up edit of one case, undone, before timing",
        "timing": "edit_seconds: one kedit.edit call with the whole batch (edit_cpu_seconds: its "
        "CPU time, steadier on a loaded machine); value_seconds: time "
        "in the value optimisation (optimize_value/optimize_values); rest_seconds: the rest "
        "(keys, residuals, solves)",
        "protocol": "teacher_forced post-edit means over the batch's cases (kedit.evaluate)",
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
