"""ROME, MEMIT, AlphaEdit, WISE and UltraEdit timed on randomly initialised models of real
sizes; prints JSON.

Configs: GPT-2 XL (1.5B parameters: 48 layers, width 1600, vocabulary 50257) and a 7B LLaMA
(32 layers, width 4096, MLP 11008, vocabulary 32000), built from their configs with random
weights directly on the device (bfloat16 on a GPU, float32 on the CPU). Random weights make
the edits' quality meaningless but their time honest: every value optimisation runs a fixed
number of steps (the stopping rule is set out of reach: `v_stop_nll` 0 with `v_patience` 0).

Statistics: no corpus pass. C = E[k kᵀ] of every layer is replaced by a random diagonal SPD
matrix with eigenvalues log-uniform in [1e-6, 1] (half of them below AlphaEdit's null-space
threshold of 1e-3 of the largest), in float64 on the layer's device: `kedit.stats`'
`second_moment` and `second_moment_eigh` are patched to return it and its eigendecomposition.
The solves that use C (Cholesky, inverse, null-space projection) treat it as a dense matrix,
so they cost what they cost on real statistics; only the eigendecomposition (once per model,
cached on disk in real use) is not paid.

Per method: the settings of the papers' GPT-2 XL / LLaMA-7B hparams (layers, prefixes
[[5, 10], [10, 10]], λ), the edits and batch size, a warm-up edit (context prefixes, factors
of C: once per model) timed apart, then the timed edits: seconds per edit, value-optimisation
seconds, and peak GPU memory (max allocated) or peak RSS on the CPU. Prompts and targets are
tinyworld's, tokenised by the bundled tiny-gpt2 tokenizer (a random model has no tokenizer).

WISE (single edits, 70 steps: EasyEdit's n_iter; its irrelevant texts from the bundled
tinyworld corpus, so nothing is fetched) and UltraEdit (batches of 100, no steps) run on the 7B
config only, at the layers of EasyEdit's LLaMA-2-7B settings.

`--small` scales both configs down (width, MLP and vocabulary / 8, depth / 4) and the edit
counts, so that a CPU run takes a few minutes; results/scale_real/cpu_small.json is one. On an
H100 (to be run): ``python benchmarks/scale_real.py --device cuda``; the targets are a ROME
edit of the GPT-2 XL config with 20 value steps in <= 0.3 s, and 10,000 MEMIT edits in batches
on the 7B config in < 10 minutes including the value optimisation.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import time
from contextlib import ExitStack
from unittest import mock

PREFIXES = [[5, 10], [10, 10]]  # ROME's and MEMIT's context templates: 10 of 5, 10 of 10 tokens
FIXED_STEPS = {"v_stop_nll": 0.0, "v_patience": 0, "v_stop": "nll"}
WARM_UP_EDITS = 2  # context prefixes and the factors of C: once per model, not timed

CONFIGS = {
    "gpt2-xl": {
        "family": "gpt2",
        "config": {"n_embd": 1600, "n_layer": 48, "n_head": 25, "n_positions": 1024},
        "vocab": 50257,
        # ROME: layer 17 of 48; MEMIT: 13-17; AlphaEdit: 13-17 (their GPT-2 XL hparams).
        "rome_layers": [17],
        "memit_layers": [13, 14, 15, 16, 17],
    },
    "llama-7b": {
        "family": "llama",
        "config": {
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "max_position_embeddings": 2048,
        },
        "vocab": 32000,
        # ROME: layer 5; MEMIT and AlphaEdit: 4-8 (EasyEdit's LLaMA-2-7B hparams); WISE's side
        # memory at layer 27 and UltraEdit's layers 29-30 (kedit's defaults, EasyEdit's 7B ones).
        "rome_layers": [5],
        "memit_layers": [4, 5, 6, 7, 8],
        "wise_layers": [27],
        "ultraedit_layers": [29, 30],
    },
}
# (method, config, edits timed, batch size, value steps): the full plan and the small one.
PLAN = [
    ("rome", "gpt2-xl", 10, 1, 20),
    ("memit", "gpt2-xl", 1000, 1000, 20),
    ("alphaedit", "gpt2-xl", 1000, 100, 20),
    ("rome", "llama-7b", 10, 1, 20),
    ("memit", "llama-7b", 10000, 1000, 20),
    ("alphaedit", "llama-7b", 1000, 100, 20),
    ("wise", "llama-7b", 10, 1, 70),
    ("ultraedit", "llama-7b", 1000, 100, 0),
]
SMALL_PLAN = [
    ("rome", "gpt2-xl", 3, 1, 20),
    ("memit", "gpt2-xl", 8, 8, 20),
    ("alphaedit", "gpt2-xl", 8, 8, 20),
    ("rome", "llama-7b", 3, 1, 20),
    ("memit", "llama-7b", 8, 8, 20),
    ("alphaedit", "llama-7b", 8, 8, 20),
    ("wise", "llama-7b", 3, 1, 70),
    ("ultraedit", "llama-7b", 16, 8, 0),
]


def scaled(spec: dict, small: bool) -> dict:
    """The config (and edited layers) of `spec`; width, MLP and vocabulary / 8 and depth / 4
    when `small`."""
    config = dict(spec["config"])
    if not small:
        return {**spec, "config": config}
    depth_key = "n_layer" if spec["family"] == "gpt2" else "num_hidden_layers"
    depth = config[depth_key]
    config[depth_key] = depth // 4
    for key in ("n_embd", "hidden_size", "intermediate_size"):
        if key in config:
            config[key] //= 8

    def layers(original: list[int]) -> list[int]:
        return sorted({min(depth // 4 - 1, layer // 4) for layer in original})

    memit_layers = layers(spec["memit_layers"])
    if len(memit_layers) == 1 and memit_layers[0] > 0:
        memit_layers = [memit_layers[0] - 1, memit_layers[0]]
    return {
        **spec,
        "config": config,
        "vocab": spec["vocab"] // 8,
        **{key: layers(value) for key, value in spec.items() if key.endswith("_layers")},
        "memit_layers": memit_layers,
    }


def method_hparams(method: str, spec: dict, steps: int) -> dict:
    """The method's settings on `spec`, with a fixed number of optimisation steps (the
    stopping rules set out of reach); WISE's irrelevant texts from the bundled corpus (offline)."""
    if method == "wise":
        return {
            "layers": spec["wise_layers"],
            "steps": steps,
            "stop_nll": 0.0,
            "irrelevant_corpus": "tinyworld",
        }
    if method == "ultraedit":
        return {"layers": spec["ultraedit_layers"]}
    layers = spec["rome_layers"] if method == "rome" else spec["memit_layers"]
    hparams = {"layers": layers, "v_steps": steps, "prefix_lengths": PREFIXES, **FIXED_STEPS}
    if method != "rome":
        hparams["fact_token"] = "subject_last"
    return hparams


def build(spec: dict, device: str, dtype):
    """A randomly initialised model of `spec` on `device` in `dtype`, as a kedit LM."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, LlamaConfig

    from kedit.lm import LM
    from kedit.zoo import model_path

    tokenizer = AutoTokenizer.from_pretrained(model_path("tiny-gpt2"))
    eos = tokenizer.eos_token_id
    shared = {"vocab_size": spec["vocab"], "bos_token_id": eos, "eos_token_id": eos}
    if spec["family"] == "gpt2":
        config = GPT2Config(**spec["config"], **shared)
    else:
        config = LlamaConfig(**spec["config"], pad_token_id=eos, **shared)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return LM(model, tokenizer, name=f"random-{spec['family']}")


def random_eigenvalues(lm, layer: int):
    """The diagonal of a layer's random C: log-uniform in [1e-6, 1], seeded by the layer."""
    import torch

    weight = lm.model.get_submodule(lm.layout.mlp_out_name(layer)).weight
    width = weight.shape[0 if lm.layout.conv1d else 1]
    generator = torch.Generator().manual_seed(layer)
    exponents = torch.rand(width, generator=generator, dtype=torch.float64) * -6
    return (10.0**exponents).to(weight.device)


def _patched_statistics(stack: ExitStack) -> None:
    """kedit.stats' second moment and its eigendecomposition replaced by the random C."""
    import torch

    def moment(lm, layer, **_):
        return torch.diag(random_eigenvalues(lm, layer))

    def eigh(lm, layer, **_):
        values, order = torch.sort(random_eigenvalues(lm, layer))
        identity = torch.eye(len(values), dtype=torch.float64, device=values.device)
        return values, identity[:, order]

    stack.enter_context(mock.patch("kedit.methods._locate.second_moment", moment))
    stack.enter_context(mock.patch("kedit.methods.alphaedit.second_moment_eigh", eigh))


def _requests(n: int):
    from kedit.data import load_requests
    from kedit.zoo import benchmark_path

    base = load_requests(benchmark_path("knowedit"))
    return [base[i % len(base)] for i in range(n)]


class _Timer:
    """Seconds spent inside one function, patched in place."""

    def __init__(self, stack: ExitStack, target: str, sync) -> None:
        import importlib

        module_name, _, attribute = target.rpartition(".")
        original = getattr(importlib.import_module(module_name), attribute)
        self.seconds = 0.0

        def timed(*args, **kwargs):
            sync()
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sync()
                self.seconds += time.perf_counter() - started

        stack.enter_context(mock.patch(target, timed))


def run(method: str, name: str, spec: dict, n: int, batch: int, steps: int, device: str) -> dict:
    import torch

    import kedit

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    started = time.perf_counter()
    lm = build(spec, device, dtype)
    sync()
    build_seconds = time.perf_counter() - started
    hparams = method_hparams(method, spec, steps)
    layers = hparams["layers"]
    requests = _requests(n + batch)
    with ExitStack() as stack:
        _patched_statistics(stack)
        values = _Timer(stack, "kedit.methods._locate.optimize_values", sync)
        values_alias = _Timer(stack, "kedit.methods._spread.optimize_values", sync)
        started = time.perf_counter()
        warm_up = requests[: min(batch, WARM_UP_EDITS)]
        kedit.edit(lm, warm_up, method=method, hparams=hparams).undo()
        sync()
        warmup = time.perf_counter() - started
        values.seconds = values_alias.seconds = 0.0
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        timed = requests[batch:]
        for start in range(0, n, batch):
            chunk = timed[start : start + batch]
            sync()
            started = time.perf_counter()
            edit = kedit.edit(lm, chunk, method=method, hparams=hparams, batch_size=batch)
            sync()
            times.append(time.perf_counter() - started)
            steps_taken = edit.info.get("value_steps", [edit.info.get("steps", steps)])
            edit.undo()
    total = sum(times)
    result = {
        "method": method,
        "config": name,
        "model_config": spec["config"],
        "vocab": spec["vocab"],
        "parameters": sum(p.numel() for p in lm.model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(lm.device),
        "layers": layers,
        "edits": n,
        "batch_size": batch,
        "value_steps": steps,
        "value_steps_taken": sorted(set(steps_taken)),
        "prefixes": 1 + sum(count for _, count in PREFIXES) if "prefix_lengths" in hparams else 1,
        "build_seconds": round(build_seconds, 2),
        "warmup_seconds": round(warmup, 3),
        "total_seconds": round(total, 3),
        "seconds_per_edit": round(total / n, 4),
        "median_seconds_per_call": round(statistics.median(times), 4),
        # the locate methods' value optimisation (WISE and UltraEdit have none)
        "value_optimisation_seconds": round(values.seconds + values_alias.seconds, 3),
    }
    if device.startswith("cuda"):
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["gpu"] = torch.cuda.get_device_name()
    else:
        result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        result["load_average"] = round(os.getloadavg()[0], 2)  # other work on the machine
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bfloat16 weights there)")
    parser.add_argument("--small", action="store_true", help="scaled-down configs for a CPU")
    parser.add_argument(
        "--methods", nargs="+", default=["rome", "memit", "alphaedit", "wise", "ultraedit"]
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--edits", type=int, help="edits per method (default: the plan's)")
    parser.add_argument("--batch", type=int, help="batch size of MEMIT/AlphaEdit (plan's)")
    parser.add_argument("--steps", type=int, help="value steps (default: the plan's, 20)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    results = []
    for method, name, n, batch, steps in SMALL_PLAN if args.small else PLAN:
        if method not in args.methods or name not in args.configs:
            continue
        batch = 1 if method in ("rome", "wise") else (args.batch or batch)
        n = args.edits or n
        n = batch * math.ceil(n / batch)
        spec = scaled(CONFIGS[name], args.small)
        result = run(method, name, spec, n, batch, args.steps or steps, args.device)
        print(json.dumps(result), flush=True)  # partial results survive a time limit
        results.append(result)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(json.dumps({"benchmark": "scale_real", "small": args.small, "results": results}))


if __name__ == "__main__":
    main()
