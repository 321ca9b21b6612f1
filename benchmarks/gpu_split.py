"""Every editing method on a model split between a GPU and the CPU; prints JSON.

The cross-device paths of a model spread over devices by a device map (the "tensors on
different devices" errors of other editing libraries): each bundled model is loaded twice, on
the CPU and split by `kedit.load(..., device_map=...)` with its embeddings, unembedding and
first half of the blocks on the GPU and the other half and the final norm on the CPU (so a
forward pass crosses devices twice, as on several GPUs). Each method edits the same requests on
both; per method the script records whether it ran, the largest difference of the edited
weights relative to the CPU's (float rounding of another device: around 1e-6), whether the
steps agree, whether undo restored every weight bit-exactly, and the time. It also records
whether evaluation and statistics collection run on the split model.

Needs a CUDA GPU and accelerate: ``python benchmarks/gpu_split.py [--device cuda:0]``;
``--device cpu`` runs the same steps with both halves on the CPU (a dry run of the script).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback
from unittest import mock

METHODS = ["rome", "r-rome", "memit", "emmet", "pmet", "alphaedit", "ft-l", "ft-m", "kn"]


def half_split(lm, first: str, second: str) -> dict[str, str]:
    """A device map: blocks below the middle, embeddings and unembedding on `first`; the other
    blocks and the final norm on `second`."""
    layout, n = lm.layout, lm.n_layers
    device_map = {}
    for name, module in lm.model.named_modules():
        if not name or name.startswith(f"{layout.blocks}."):
            continue
        if (
            next(module.parameters(recurse=False), None) is not None
            or next(module.buffers(recurse=False), None) is not None
        ):
            device_map[name] = second if name == layout.final_norm else first
    for index in range(n):
        device_map[layout.block(index)] = first if index < n // 2 else second
    return device_map


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _weights(lm, names) -> dict:
    return {name: lm.model.get_parameter(name).detach().float().cpu().clone() for name in names}


def _steps(info: dict):
    return info.get("value_steps", info.get("steps", info.get("neurons")))


def _error(error: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(error), error)).strip()[-400:]


def check(model: str, device: str, n: int, dtype: str | None, methods: list[str]) -> list[dict]:
    import torch

    import kedit
    from kedit.data import load_requests
    from kedit.methods.registry import get_method
    from kedit.zoo import benchmark_path

    requests = load_requests(benchmark_path("knowedit"), n=n)
    reference = kedit.load(model, dtype=dtype)
    device_map = half_split(reference, device, "cpu")
    split = kedit.load(model, dtype=dtype, device_map=device_map)
    rows = [{"model": model, "what": "load", "devices": sorted(set(device_map.values()))}]
    print(json.dumps(rows[-1]), flush=True)
    before = {name: value.clone() for name, value in split.model.state_dict().items()}
    for method in methods:
        batch = n if get_method(method).batchable else 1
        expected = kedit.edit(reference, requests, method=method, batch_size=batch)
        names = sorted({d.param for d in expected.deltas})
        wanted = _weights(reference, names)
        expected.undo()
        row = {"model": model, "what": method, "edits": n}
        try:
            _sync(device)
            started = time.perf_counter()
            edit = kedit.edit(split, requests, method=method, batch_size=batch)
            _sync(device)
            row["seconds"] = round(time.perf_counter() - started, 3)
            got = _weights(split, names)
            row["max_relative_weight_diff"] = max(
                float((got[k] - wanted[k]).abs().max() / wanted[k].abs().max()) for k in names
            )
            row["same_steps"] = _steps(edit.info) == _steps(expected.info)
            try:
                kedit.evaluate(split, requests, edit=edit)
                row["evaluate"] = "ok"
            except Exception as error:  # recorded: the script checks, it does not stop
                row["evaluate"] = _error(error)
            edit.undo()
            now = split.model.state_dict()
            row["undo_bit_exact"] = all(torch.equal(before[k], now[k]) for k in before)
            row["ran"] = True
        except Exception as error:
            row.update(ran=False, error=_error(error))
        print(json.dumps(row), flush=True)  # partial results survive a time limit
        rows.append(row)
    row = {"model": model, "what": "stats on the split model, 2 layers, 200 docs"}
    try:
        from kedit.stats import second_moments

        with (
            tempfile.TemporaryDirectory() as tmp,
            mock.patch.dict(os.environ, {"KEDIT_CACHE": tmp}),
        ):
            second_moments(split, [0, split.n_layers - 1], n_samples=200, progress=False)
        row["ran"] = True
    except Exception as error:
        row.update(ran=False, error=_error(error))
    print(json.dumps(row), flush=True)
    rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda:0", help="the GPU that takes the first half")
    parser.add_argument("--models", nargs="+", default=["tiny-gpt2", "tiny-llama"])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--n", type=int, default=4, help="requests per method")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: float32)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_split.py: torch sees no CUDA GPU (--device cpu for a dry run)")
    rows = [
        row
        for model in args.models
        for row in check(model, args.device, args.n, args.dtype, args.methods)
    ]
    print(json.dumps({"benchmark": "gpu_split", "results": rows}, indent=2))


if __name__ == "__main__":
    main()
