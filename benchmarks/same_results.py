"""Records what the editing methods compute on fixed edits, or checks a recording.

A refactor of the shared machinery (`kedit.methods._locate`, `_spread`) must not change what
the methods compute. `--save FILE` records, for 8 bundled-benchmark requests on tiny-gpt2 and
tiny-llama, each case's steps (value steps; FT's steps; KN's neurons) and edited weights: ROME,
r-ROME, MEMIT, EMMET, PMET, AlphaEdit, FT-L and KN at their defaults, ROME and MEMIT under the
other stopping rules, without a first step and with a token budget that splits the batch, FT-M
with a norm constraint and weight decay. `--compare FILE` recomputes them with the code on the
path and prints JSON: per case whether the steps are equal, the largest absolute difference
of the edited weights (0.0 = bit-exact) and the largest difference relative to the edit's own
change of the weights (‖after − before‖ / ‖before − unedited‖, the worst parameter).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

CASES: list[tuple[str, dict[str, Any], str]] = [
    ("rome", {}, "sequence"),
    ("r-rome", {}, "sequence"),
    ("rome", {}, "each"),
    ("memit", {}, "batch"),
    ("emmet", {}, "batch"),
    ("pmet", {}, "batch"),
    ("alphaedit", {}, "batch"),
    ("rome", {"v_stop": "most_probable"}, "each"),
    ("rome", {"v_patience": 2, "v_stop_nll": 0.001}, "each"),
    ("rome", {"v_first_step": 0.0}, "each"),
    ("memit", {"v_batch_tokens": 300}, "batch"),
    ("memit", {"v_stop": "most_probable", "v_patience": 3}, "batch"),
    ("ft-l", {}, "batch"),
    ("ft-m", {"norm_constraint": 0.002, "weight_decay": 0.01}, "batch"),
    ("kn", {}, "sequence"),
]
MODELS = ["tiny-gpt2", "tiny-llama"]


def record(n: int) -> dict[str, Any]:
    """Per case name: its value steps and its edited weights (CPU tensors)."""
    import torch

    import kedit
    from kedit.data import load_requests
    from kedit.zoo import benchmark_path

    torch.set_num_threads(1)
    requests = load_requests(benchmark_path("knowedit"), n=n)
    out: dict[str, Any] = {}
    for model in MODELS:
        lm = kedit.load(model)
        for method, hparams, mode in CASES:
            name = f"{model}/{method}/{mode}/{json.dumps(hparams, sort_keys=True)}"
            if mode == "each":
                edits = list(_each_applied(kedit, lm, requests, method, hparams))
                steps = [e[0] for e in edits]
                weights = {f"{i}:{k}": v for i, e in enumerate(edits) for k, v in e[1].items()}
            else:
                edit = kedit.edit(lm, requests, method=method, hparams=hparams)
                info = edit.info
                steps = info.get("value_steps", info.get("steps", info.get("neurons")))
                weights = _touched(lm, edit)
                edit.undo()
            unedited = {key: _unedited(lm, key) for key in weights}
            out[name] = {"steps": steps, "weights": weights, "unedited": unedited}
    return out


def _unedited(lm, key: str) -> Any:
    """The unedited value of the parameter that `key` ('name' or 'index:name') names."""
    return lm.model.get_parameter(key.split(":")[-1]).detach().clone()


def _each_applied(kedit, lm, requests, method, hparams):
    for edit in kedit.edit_each(lm, requests, method=method, hparams=hparams):
        edit.apply()
        yield edit.info["value_steps"], _touched(lm, edit)
        edit.undo()


def _touched(lm, edit) -> dict[str, Any]:
    names = {delta.param for delta in edit.deltas}
    return {name: lm.model.get_parameter(name).detach().clone() for name in sorted(names)}


def compare(saved: dict[str, Any], now: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, before in saved.items():
        after = now[name]
        diffs, relative = [], []
        for key, value in before["weights"].items():
            diff = value.double() - after["weights"][key].double()
            change = value.double() - after["unedited"][key].double()
            diffs.append(float(diff.abs().max()))
            relative.append(float(diff.norm() / change.norm()))
        rows.append(
            {
                "case": name,
                "same_steps": before["steps"] == after["steps"],
                "steps": after["steps"],
                "same_params": sorted(before["weights"]) == sorted(after["weights"]),
                "max_abs_weight_diff": max(diffs),
                "max_relative_weight_diff": max(relative),
            }
        )
    return rows


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--save", help="record the results to this file")
    action.add_argument("--compare", help="recompute and compare with this recording")
    parser.add_argument("--n", type=int, default=8, help="requests per case")
    args = parser.parse_args()
    now = record(args.n)
    if args.save:
        torch.save(now, args.save)
        print(json.dumps({"saved": args.save, "cases": len(now)}))
        return
    rows = compare(torch.load(args.compare), now)
    exact = all(
        r["same_steps"] and r["same_params"] and r["max_abs_weight_diff"] == 0 for r in rows
    )
    print(json.dumps({"benchmark": "same_results", "bit_exact": exact, "cases": rows}, indent=2))


if __name__ == "__main__":
    main()
