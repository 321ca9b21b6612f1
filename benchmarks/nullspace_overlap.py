"""Why AlphaEdit's locality falls over a long sequence of edits on the tiny models: how much of
the keys of unedited people's prompts the edits' update can reach.

AlphaEdit (`kedit.methods.alphaedit`) projects each update onto P, the null space of the corpus
keys' second moment, so that preserved keys keep their outputs. Its update ΔW acts on a key k
only through P k, and (ridge aside) only through the part of P k in the span of the edited
keys' projections P K. For the cases of `sequential.py` (facts of the first --people people,
edited at the model's defaults: layers, fact token, threshold), this prints per edited layer:

- `null_space_dim`: the number of eigenvectors of the second moment in P;
- `edited_share_in_null_space`, `unedited_share_in_null_space`: mean ‖P k‖² / ‖k‖² over the
  edited prompts' keys and over the locality probes' keys that name no edited person: P
  protects a probe only as far as the second is smaller than the first;
- `unedited_share_in_edit_span`, after the first m edits: mean share of ‖P k‖² of those probe
  keys inside the span of the first m edited keys' projections. The share the update can move
  grows with m; where it nears 1, any further edit moves the unedited prompts too.

Prints JSON (and writes it to --out when given).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _keys(lm: Any, layer: int, prompts: list[str], fact_token: str) -> Any:
    """Keys at each prompt's fact token (the prompt's last token for `fact_token: last`)."""

    from kedit.methods._locate import lookup_activations
    from kedit.requests import EditRequest

    # For the last token, the prompt itself serves as the "subject" that lookup_index needs.
    requests = [EditRequest(prompt=prompt, subject=prompt, target_new=" x") for prompt in prompts]
    keys, _ = lookup_activations(lm, requests, [""], fact_token, [layer])
    return keys[layer][:, 0].double()


def _share(vectors: Any, basis: Any) -> float:
    """Mean share of each row's squared norm inside the span of `basis`'s orthonormal columns."""
    inside = (vectors @ basis).norm(dim=1) ** 2
    return (inside / (vectors.norm(dim=1) ** 2)).mean().item()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--edits", type=int, default=500)
    parser.add_argument("--people", type=int, default=250)
    parser.add_argument("--probes", type=int, default=300, help="unedited probes to measure")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200, 300, 400, 500])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import torch

    import kedit
    from kedit.methods._locate import layer_second_moment
    from kedit.methods.registry import resolve_hparams

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tinyworld_cases import distinct_fact_cases

    cases, about = distinct_fact_cases(args.edits, people=args.people)
    edited = {case.subject for case in cases}
    probes = list(
        dict.fromkeys(
            probe.prompt
            for case in cases
            for probe in case.locality
            if not any(subject in probe.prompt for subject in edited)
        )
    )[: args.probes]
    if not probes:
        raise SystemExit("no locality probe names only unedited people; lower --people")
    lm = kedit.load(args.model)
    hparams = resolve_hparams("alphaedit", lm, {})
    layers = []
    for layer in hparams.layers:
        values, vectors = torch.linalg.eigh(layer_second_moment(lm, hparams, layer))
        null = vectors[:, values < hparams.nullspace_threshold * values.max()]
        projection = null @ null.T
        edit_keys = _keys(lm, layer, [c.text for c in cases], hparams.fact_token) @ projection
        probe_keys = _keys(lm, layer, probes, hparams.fact_token)
        whole = _keys(lm, layer, [c.text for c in cases], hparams.fact_token)
        curve = []
        for m in (m for m in args.steps if m <= len(cases)):
            left, singular, _ = torch.linalg.svd(edit_keys[:m].T, full_matrices=False)
            basis = left[:, singular > 1e-6 * singular.max()]
            curve.append(
                {
                    "edits": m,
                    "span_dim": basis.shape[1],
                    "unedited_share_in_edit_span": _share(probe_keys @ projection, basis),
                }
            )
        layers.append(
            {
                "layer": layer,
                "null_space_dim": null.shape[1],
                "key_dim": len(values),
                "edited_share_in_null_space": _share(whole, null),
                "unedited_share_in_null_space": _share(probe_keys, null),
                "curve": curve,
            }
        )
    report = {
        "benchmark": "nullspace_overlap",
        "model": args.model,
        "hparams": {
            "layers": hparams.layers,
            "fact_token": hparams.fact_token,
            "nullspace_threshold": hparams.nullspace_threshold,
        },
        "cases": about,
        "unedited_probes": len(probes),
        "layers": layers,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
