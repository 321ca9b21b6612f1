"""How many directions the people's keys span at an edit layer; prints JSON.

The key of a person at layer L is the input of block L's MLP output projection at the last
token of the person's name (ROME's and MEMIT's key), in "{} lives in" prompts of every
tinyworld person. Reported: the number of singular directions of the centred keys that hold
90% and 99% of their variance, and the mean and largest |cosine| between two people's centred
keys. A batch or a sequence of edits that must change some people's values and keep the others'
needs their keys to be apart; when the edited people outnumber the directions the keys span,
no linear update of the projection can do both.

    python benchmarks/key_rank.py --model tiny-chat --layer 2
"""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> dict:
    import torch

    import kedit
    from kedit.analysis import tinyworld_facts
    from kedit.methods._locate import lookup_activations
    from kedit.requests import EditRequest

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny-chat", help="bundled name or a local folder")
    parser.add_argument("--layer", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lm = kedit.load(args.model)
    requests = [
        EditRequest(prompt=fact.prompt, subject=fact.subject, target_new=fact.answer)
        for fact in tinyworld_facts("lives_in", 0)
    ]
    # ROME's own lookup: no context prefix, the subject's last token
    found, _ = lookup_activations(lm, requests, [""], "subject_last", [args.layer])
    keys = found[args.layer][:, 0].cpu()
    centred = keys - keys.mean(0)
    energy = torch.linalg.svdvals(centred) ** 2
    share = energy.cumsum(0) / energy.sum()
    unit = torch.nn.functional.normalize(centred, dim=1)
    cosines = (unit @ unit.T)[~torch.eye(len(unit), dtype=torch.bool)]
    report = {
        "benchmark": "key_rank",
        "model": args.model,
        "layer": args.layer,
        "people": len(keys),
        "key_width": centred.shape[1],
        "directions_90": int((share < 0.9).sum()) + 1,
        "directions_99": int((share < 0.99).sum()) + 1,
        "mean_abs_cosine": round(float(cosines.abs().mean()), 4),
        "max_cosine": round(float(cosines.max()), 4),
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
