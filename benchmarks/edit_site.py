"""Where a model holds a person's facts: causal traces, and ROME at each layer; prints JSON.

Causal trace (Meng et al., 2022, section 2.1): the name's token embeddings are corrupted with
Gaussian noise (3x the embeddings' standard deviation); then one state is restored from the
clean run, and the probability of the true answer measured. Restored states: the residual
stream entering block l at the subject's last token and at the prompt's last token, and the MLP
output of block l at the subject's last token. An edit of block l's MLP at the subject's last
token can work where the states there still carry the answer (a high restored probability).

Edits (`--methods`, ROME by default): of the first `--cases` tinyworld cases at each of
`--layers` (or each set of `--layer-sets`), independently or in batches of `--batch-size`,
teacher-forced (rel / gen / loc / portability).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from typing import Any

# The bundled tiny models' ROME settings (hparams/rome.yaml), but the layer.
ROME_SETTINGS = {
    "v_lr": 1.5,
    "v_first_step": 0.5,
    "v_steps": 60,
    "v_stop_nll": 0.2,
    "clamp_norm_factor": 50.0,
}


def _trace_prompts(lm: Any, world: Any, n: int) -> list[tuple[list[int], int, int, int]]:
    """(prompt ids, subject's first and last token index, answer id) of `n` lives_in facts the
    model answers correctly."""
    import torch

    found = []
    for person in world.people:
        if len(found) == n:
            break
        template = world.templates(person, "lives_in", "train")[0]
        prefix, _ = template.split("{}")
        start = len(lm.encode(prefix.rstrip())) if prefix else 0
        ids = lm.encode(template.format(person))
        end = len(lm.encode((prefix + person).rstrip()))
        answer = lm.encode(world.answer(person, "lives_in"))[0]
        with torch.no_grad():
            logits = lm.model(torch.tensor([ids], device=lm.device)).logits
        if int(logits[0, -1].argmax()) == answer:
            found.append((ids, start, end - 1, answer))
    return found


def _trace_one(
    lm: Any, embedding: str, ids: list[int], span: tuple[int, int], answer: int, noise: Any
) -> dict[str, Any]:
    """P(answer) of one prompt: clean, corrupted, and restored at each site and layer."""
    import torch

    from kedit.hooks import capture, hooks, replace_input, replace_output

    model, layout = lm.model, lm.layout
    n_layers = layout.n_layers(model)
    blocks = [layout.block(layer) for layer in range(n_layers)]
    mlps = [layout.mlp_name(layer) for layer in range(n_layers)]
    x = torch.tensor([ids], device=lm.device)
    start, last = span

    def corrupt(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        h[0, start : last + 1] += noise.to(h)
        return h

    def prob(*patches: Any) -> float:
        with hooks(*patches):
            return model(x).logits[0, -1].softmax(-1)[answer].item()

    with capture(model, blocks, "input") as hidden, capture(model, mlps, "output") as mlp:
        clean = prob()
    out: dict[str, Any] = {
        "clean": clean,
        "corrupted": prob(replace_output(model, embedding, corrupt)),
    }
    for key, sites, states, position, replace in (
        ("subject_last", blocks, hidden, last, replace_input),
        ("prompt_last", blocks, hidden, len(ids) - 1, replace_input),
        ("mlp_subject_last", mlps, mlp, last, replace_output),
    ):
        out[key] = []
        for site in sites:

            def restore(
                h: torch.Tensor, clean: torch.Tensor = states[site], at: int = position
            ) -> torch.Tensor:
                h = h.clone()
                h[0, at] = clean[0, at].to(h)
                return h

            patch = replace(model, site, restore)
            out[key].append(prob(replace_output(model, embedding, corrupt), patch))
    return out


def causal_trace(lm: Any, world: Any, n: int, seed: int = 0) -> dict[str, Any]:
    """Mean P(answer) over `n` prompts: clean, corrupted, and with one state restored."""
    import torch

    model = lm.model
    embed = model.get_input_embeddings()
    embedding = next(name for name, module in model.named_modules() if module is embed)
    noise_scale = 3 * float(embed.weight.std())
    gen = torch.Generator().manual_seed(seed)
    runs = []
    with torch.no_grad():
        for ids, start, last, answer in _trace_prompts(lm, world, n):
            noise = torch.randn(last + 1 - start, embed.weight.shape[1], generator=gen)
            runs.append(_trace_one(lm, embedding, ids, (start, last), answer, noise * noise_scale))
    count = max(len(runs), 1)

    def mean(key: str) -> Any:
        if isinstance(runs[0][key], list):
            return [
                round(sum(r[key][i] for r in runs) / count, 4) for i in range(len(runs[0][key]))
            ]
        return round(sum(r[key] for r in runs) / count, 4)

    return {
        "prompts": len(runs),
        "noise_scale": round(noise_scale, 4),
        **{key: mean(key) for key in runs[0]},
    }


def edits_by_layer(
    lm: Any,
    layer_sets: list[list[int]],
    cases: int,
    methods: list[str],
    extra: dict[str, Any],
    batch_size: int = 1,
) -> list[dict[str, Any]]:
    """Teacher-forced quality of each method editing each set of layers: independent edits, or
    batches of `batch_size`."""
    from kedit.bench.runs import BenchConfig, run_bench
    from kedit.data import load_requests
    from kedit.zoo import benchmark_path

    requests = load_requests(benchmark_path("knowedit"), n=cases)
    rows = []
    for method in methods:
        for layers in layer_sets:
            hparams = {**ROME_SETTINGS, "layers": layers, **extra}
            config = BenchConfig(
                method=method,
                mode="batch" if batch_size > 1 else "independent",
                batch_size=batch_size,
                hparams=hparams,
                data="tinyworld_knowedit.json",
            )
            with tempfile.TemporaryDirectory() as folder:
                summary = run_bench(lm, requests, config, folder)
            post = summary["metrics"]["post"]["teacher_forced"]
            rows.append(
                {
                    "method": method,
                    "layers": layers,
                    "cases": len(requests),
                    "batch_size": batch_size,
                    "hparams": hparams,
                    **{k: round(v, 4) for k, v in post.items()},
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    import kedit
    from kedit.zoo import build_world

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-chat", help="bundled name or a local folder")
    parser.add_argument("--trace", type=int, default=60, help="prompts traced (0: no trace)")
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--layers", type=int, nargs="*", default=[], help="one layer per edit")
    parser.add_argument("--layer-sets", type=json.loads, default=[], help='e.g. "[[2, 3]]"')
    parser.add_argument("--batch-size", type=int, default=1, help=">1: batch edits")
    parser.add_argument("--methods", nargs="+", default=["rome"])
    parser.add_argument("--hparams", type=json.loads, default={}, help="JSON overrides")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lm = kedit.load(args.model)
    report: dict[str, Any] = {"benchmark": "edit_site", "model": args.model}
    if args.trace:
        report["causal_trace"] = causal_trace(lm, build_world(), args.trace)
        print(json.dumps(report["causal_trace"]), flush=True)
    layer_sets = [[layer] for layer in args.layers] + args.layer_sets
    if layer_sets:
        report["edits"] = edits_by_layer(
            lm, layer_sets, args.cases, args.methods, args.hparams, args.batch_size
        )
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
