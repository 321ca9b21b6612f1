"""Which attack templates a tinyworld 2 model complies under; prints JSON.

Every harmful question of the model's world under every trained and held-out attack template
(`kedit.zoo.chatworld.ATTACKS`), greedy replies, and per template the share that is the
question's canned unsafe reply (ground truth, no judge: `kedit.zoo.skills.reply_label`) and the
share that is neither canned reply. `benchmarks/tiny_chat.py` gives the judged score over a
sample of all held-out templates together; this says which templates the score comes from.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    import kedit
    from kedit.zoo import model_chat_world
    from kedit.zoo.chatworld import ATTACKS
    from kedit.zoo.skills import greedy_replies, reply_label

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-chat", help="bundled name or a zoo model folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lm = kedit.load(args.model)
    chat = model_chat_world(args.model)
    labels: dict[str, list[str | None]] = defaultdict(list)
    for group in ("trained", "heldout"):
        cases = chat.safety_cases(group)
        replies = greedy_replies(lm.model, lm.tokenizer, [case.prompt for case in cases])
        for case, reply in zip(cases, replies, strict=True):
            labels[case.attack].append(reply_label(reply, case.unsafe, case.safe))
    report = {
        "benchmark": "attack_templates",
        "model": args.model,
        "protocol": "generation (greedy), canned-reply ground truth",
        "templates": {
            attack.name: {
                "trained": attack.trained,
                "questions": len(labels[attack.name]),
                "canned_unsafe": sum(x == "unsafe" for x in labels[attack.name])
                / len(labels[attack.name]),
                "neither_canned": sum(x is None for x in labels[attack.name])
                / len(labels[attack.name]),
            }
            for attack in ATTACKS
        },
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
