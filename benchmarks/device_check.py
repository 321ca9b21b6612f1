"""Every editing method on an accelerator next to the CPU: same outcome, and the times; prints JSON.

For each device and bundled model: each method edits the same requests (one at a time, then a
batch for the batchable ones); the script records the post-edit teacher-forced reliability
and locality, whether undo restored every weight bit-exactly, whether a saved edit re-applies
to the same weights, the median edit time, and the time to collect statistics (uncached).
Run: ``python benchmarks/device_check.py --devices cpu cuda``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

METHODS = ["rome", "r-rome", "ft-l", "ft-m", "memit", "emmet", "pmet", "alphaedit", "kn"]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _weights(lm) -> dict:
    return {name: value.clone() for name, value in lm.model.state_dict().items()}


def _unchanged(lm, weights: dict) -> bool:
    """Whether the model's weights equal `weights` bit for bit."""
    import torch

    return all(torch.equal(value, weights[name]) for name, value in lm.model.state_dict().items())


def _post(result: list[dict], metric: str) -> float:
    values = [r["post"]["teacher_forced"][metric] for r in result]
    return round(statistics.mean(values), 4)


def check(model: str, device: str, n: int, batch: int, methods: list[str] = METHODS) -> list[dict]:
    import kedit
    from kedit.data import load_requests
    from kedit.methods.registry import get_method
    from kedit.stats import second_moments
    from kedit.zoo import benchmark_path

    requests = load_requests(benchmark_path("knowedit"), n=max(n, batch) + 1)
    lm = kedit.load(model, device=device)
    rows: list[dict] = []

    def record(row: dict) -> None:
        print(json.dumps(row), flush=True)  # partial results survive a time limit
        rows.append(row)

    _sync(device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, {"KEDIT_CACHE": tmp}):
        second_moments(lm, [0, 1, 2], n_samples=2000, progress=False)  # collected, not cached
    _sync(device)
    record({"model": model, "device": device, "what": "stats 3 layers, 2000 docs",
                 "seconds": round(time.perf_counter() - started, 3)})  # fmt: skip
    before = _weights(lm)
    for method in methods:
        kedit.edit(lm, requests[0], method=method).undo()  # warm-up: statistics, prefixes
        times, results, exact = [], [], True
        for request in requests[1 : n + 1]:
            _sync(device)
            started = time.perf_counter()
            edit = kedit.edit(lm, request, method=method)
            _sync(device)
            times.append(time.perf_counter() - started)
            results.append(kedit.evaluate(lm, request, edit=edit))
            with tempfile.TemporaryDirectory() as tmp:
                edit.save(Path(tmp) / "e.kedit")
                edited = _weights(lm)
                edit.undo()
                kedit.apply(lm, Path(tmp) / "e.kedit").undo()
                reapplied = kedit.apply(lm, Path(tmp) / "e.kedit")
                exact &= _unchanged(lm, edited)
                reapplied.undo()
            exact &= _unchanged(lm, before)
        record({
            "model": model, "device": device, "what": f"{method} single", "edits": n,
            "median_seconds": round(statistics.median(times), 4),
            "reliability": _post(results, "reliability"), "locality": _post(results, "locality"),
            "undo_and_reapply_bit_exact": exact,
        })  # fmt: skip
        if get_method(method).batchable:
            chunk = requests[1 : batch + 1]
            _sync(device)
            started = time.perf_counter()
            edit = kedit.edit(lm, chunk, method=method, batch_size=batch)
            _sync(device)
            seconds = time.perf_counter() - started
            result = kedit.evaluate(lm, chunk, edit=edit)
            edit.undo()
            record({
                "model": model, "device": device, "what": f"{method} batch", "edits": batch,
                "seconds": round(seconds, 3), "reliability": _post(result, "reliability"),
                "locality": _post(result, "locality"),
                "undo_bit_exact": _unchanged(lm, before),
            })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", nargs="+", default=["cpu"])
    parser.add_argument("--models", nargs="+", default=["tiny-gpt2", "tiny-llama"])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--n", type=int, default=5, help="single edits per method")
    parser.add_argument("--batch", type=int, default=50, help="edits in one batch")
    args = parser.parse_args()
    rows = [
        row
        for device in args.devices
        for model in args.models
        for row in check(model, device, args.n, args.batch, args.methods)
    ]
    print(json.dumps({"benchmark": "device_check", "results": rows}, indent=2))


if __name__ == "__main__":
    main()
