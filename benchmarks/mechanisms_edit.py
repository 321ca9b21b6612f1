"""Edits seen through mechanisms: the causal trace and the EAP-IG circuit of edited facts
before and after ROME, MEMIT and FT-M; prints JSON and writes the plots.

For the first `--n` cases of the bundled tinyworld benchmark whose prompt is a tinyworld
template (so that other people asked the same way serve as corrupted twins): each method
edits the case, `kedit.analysis.edit_mechanisms` traces the old answer before and the new
answer after (single-layer restorations, window 1) and finds both circuits (EAP-IG, 5
steps, 10% of the edges, 20 twins), the edit is undone. Reported per method: where the MLP
effect peaks before/after (token class, layer), the circuits' overlap and faithfulness, and
the nodes whose attribution changed most, counted over cases.

    python benchmarks/mechanisms_edit.py --model tiny-gpt2 --plots docs/mechanisms
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path


def main() -> None:
    import torch

    import kedit
    from kedit.analysis import edit_mechanisms, tinyworld_facts
    from kedit.analysis.compare import trace_summary
    from kedit.data import load_requests
    from kedit.zoo import benchmark_path, build_world

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--methods", nargs="+", default=["rome", "memit", "ft-m"])
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument(
        "--plots", type=Path, default=None, help="folder for the first case's plots"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    lm = kedit.load(args.model)
    templates = {t for r in build_world().relations.values() for t in r.templates}
    requests = [r for r in load_requests(benchmark_path("knowedit")) if r.template in templates]
    requests = requests[: args.n]
    report = {"benchmark": "mechanisms_edit", "model": args.model, "cases": len(requests)}
    for method in args.methods:
        peaks = collections.Counter()
        changed = collections.Counter()
        overlaps, faithful_before, faithful_after, succeeded = [], [], [], 0
        for index, request in enumerate(requests):
            edit = kedit.edit(lm, request, method=method)
            partners = tinyworld_facts(None, request.template)
            seen = edit_mechanisms(lm, edit, request, method, partners, window=1)
            edit.undo()
            succeeded += seen.trace_after.correct_prediction
            before = trace_summary(seen.trace_before)["mlp"]
            after = trace_summary(seen.trace_after)["mlp"]
            peaks[
                f"{before['token_class']} L{before['layer']} -> "
                f"{after['token_class']} L{after['layer']}"
            ] += 1
            if seen.circuits is not None:
                overlaps.append(seen.circuits.overlap)
                faithful_before.append(seen.circuits.before.evaluation["faithfulness"])
                faithful_after.append(seen.circuits.after.evaluation["faithfulness"])
                for node in seen.circuits.changed_nodes(3):
                    changed[node["node"]] += 1
            if index == 0 and args.plots is not None:
                args.plots.mkdir(parents=True, exist_ok=True)
                seen.plot(args.plots / f"{args.model}-{method}-trace.png")

        def mean(values: list[float]) -> float | None:
            return round(sum(values) / len(values), 4) if values else None

        report[method] = {
            "new_answer_top1_after": f"{succeeded}/{len(requests)}",
            "mlp_peak_before_to_after": dict(peaks.most_common()),
            "circuit_edge_overlap_mean": mean(overlaps),
            "faithfulness_before_mean": mean(faithful_before),
            "faithfulness_after_mean": mean(faithful_after),
            "nodes_most_changed_top3_counts": dict(changed.most_common(8)),
        }
        print(json.dumps({method: report[method]}), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
