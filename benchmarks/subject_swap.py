"""Where a model reads the subject of a fact: swap one person's activations into another's prompt.

For pairs of people (A, B) whose answers differ, the prompt about A is run with the residual
stream at some subject positions replaced, entering block l, by its value in the same prompt
about B (same template, same number of tokens). The share of pairs whose top prediction becomes
B's answer, for l = 0..L (L: entering the final norm), says up to which block the answer still
depends on those positions. An edit of a block's MLP at the subject can only work where later
blocks still read it. Positions: every one where the two prompts differ ("name"), or only the
subject's last token ("last_token"). Pairs: any two people ("random"), or two people whose names
differ only in the last token ("same_but_last"). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import random
from typing import Any

RELATION = "lives_in"


def _pairs(world: Any, lm: Any, same_but_last: bool, n: int, seed: int) -> list[tuple]:
    """Up to `n` (ids of A's prompt, ids of B's prompt, differing positions, B's answer id)."""
    rng = random.Random(seed)
    by_start: dict[tuple, list[str]] = {}
    for person in world.people:
        by_start.setdefault(tuple(lm.encode(person)[:-1]), []).append(person)
    found: list[tuple] = []
    for _ in range(50 * n):
        if len(found) == n:
            break
        a = rng.choice(world.people)
        group = by_start[tuple(lm.encode(a)[:-1])] if same_but_last else world.people
        others = [p for p in group if world.facts[(p, RELATION)] != world.facts[(a, RELATION)]]
        if not others:
            continue
        b = rng.choice(others)
        template = world.templates(a, RELATION, "train")[0]
        ids_a, ids_b = lm.encode(template.format(a)), lm.encode(template.format(b))
        if len(ids_a) != len(ids_b):
            continue
        differ = [i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=True)) if x != y]
        found.append((ids_a, ids_b, differ, lm.encode(world.answer(b, RELATION))[0]))
    return found


def swap_curve(lm: Any, pairs: list[tuple], last_token_only: bool) -> list[float]:
    """Share of pairs answering with B's answer, swapping entering each block and the norm."""
    import torch

    from kedit.hooks import capture, replace_input

    layout = lm.layout
    sites = [layout.block(layer) for layer in range(layout.n_layers(lm.model))]
    sites.append(layout.final_norm)
    hits = [0] * len(sites)
    for ids_a, ids_b, differ, answer_b in pairs:
        positions = differ[-1:] if last_token_only else differ
        with torch.no_grad():
            with capture(lm.model, sites, "input") as seen:
                lm.model(torch.tensor([ids_b], device=lm.device))
            for index, site in enumerate(sites):

                def swap(
                    hidden: torch.Tensor, site: str = site, at: list = positions
                ) -> torch.Tensor:
                    hidden = hidden.clone()
                    hidden[:, at] = seen[site][:, at].to(hidden.dtype)
                    return hidden

                with replace_input(lm.model, site, swap):
                    logits = lm.model(torch.tensor([ids_a], device=lm.device)).logits
                hits[index] += int(logits[0, -1].argmax()) == answer_b
    return [round(hit / max(len(pairs), 1), 3) for hit in hits]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import kedit
    from kedit.zoo import build_world

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-gpt2", help="bundled name or a local folder")
    parser.add_argument("--pairs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    lm = kedit.load(args.model)
    world = build_world()
    report: dict[str, Any] = {
        "benchmark": "subject_swap",
        "model": args.model,
        "relation": RELATION,
        "x": "entering block 0..L-1, then the final norm",
    }
    for kind in ("random", "same_but_last"):
        pairs = _pairs(world, lm, kind == "same_but_last", args.pairs, args.seed)
        report[kind] = {
            "pairs": len(pairs),
            "name": swap_curve(lm, pairs, last_token_only=False),
            "last_token": swap_curve(lm, pairs, last_token_only=True),
        }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
