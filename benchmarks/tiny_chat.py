"""What a tinyworld 2 model can do (tiny-chat's targets); prints JSON.

Teacher-forced: statements with trained and held-out templates, the two-hop question (the
country a person lives in, held-out templates), dialogue questions (trained and held-out
questions), in-context updates on held-out people (a stated counterfactual followed; a stated
fact that does not apply changing an answer the model gives without it). Greedy generation,
judged: replies to harmful questions, plainly (refused?) and under trained and held-out attack
templates (unsafe?), with the judge's agreement with the ground truth where a reply is a canned
one; opinions about every topic (the topic's default trait?) and the belief behind them
(teacher-forced: the default trait's share of the trained opinions' probability mass), the
trait classifier's
accuracy on held-out opinion texts; opinions stated in the context about a topic of each group
(whose updates the recipe trained, held out, made up) and then asked about it or another topic
(the stated trait taken? another topic's default kept?). Judges: the model's bundled ones, or
any Hugging Face classifier with a label map (`--safety-judge NAME --safety-labels
'{"LABEL_0": "safe", ...}'`). Editing targets are measured by
quality.py, batch_scale.py and sequential.py with --model.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    import kedit
    from kedit.eval.judges import get_judge
    from kedit.zoo import model_chat_world, model_folder
    from kedit.zoo.judges import personality_texts
    from kedit.zoo.skills import (
        fact_scores,
        incontext_scores,
        opinion_incontext_scores,
        opinion_prior_scores,
        personality_scores,
        safety_scores,
    )

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-chat", help="bundled name or a zoo model folder")
    parser.add_argument("--incontext", type=int, default=1000, help="in-context cases")
    parser.add_argument("--safety-sample", type=int, default=300, help="cases per attack group")
    parser.add_argument("--safety-judge", default=None, help="default: the model's own")
    parser.add_argument("--safety-labels", type=json.loads, default=None)
    parser.add_argument("--personality-judge", default=None, help="default: the model's own")
    parser.add_argument("--personality-labels", type=json.loads, default=None)
    parser.add_argument("--opinion-updates", type=int, default=200, help="per topic group")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    lm = kedit.load(args.model)
    folder = model_folder(args.model)
    chat = model_chat_world(folder)
    own = str(folder)
    safety = get_judge("safety", args.safety_judge or own, args.safety_labels)
    trait = get_judge("personality", args.personality_judge or own, args.personality_labels)
    model, tokenizer = lm.model, lm.tokenizer
    texts, labels = personality_texts(chat, "heldout")
    classified = trait(texts)
    report = {
        "benchmark": "tiny_chat",
        "model": args.model,
        "protocols": {
            "facts": "teacher_forced",
            "incontext": "teacher_forced",
            "safety": "generation (greedy), judged",
            "personality": "generation (greedy), judged",
        },
        "facts": fact_scores(model, tokenizer, chat),
        "incontext": incontext_scores(model, tokenizer, chat, n=args.incontext),
        "safety": {
            "judge": safety.name,
            **safety_scores(model, tokenizer, chat, safety, sample=args.safety_sample),
        },
        "personality": {
            "judge": trait.name,
            **personality_scores(model, tokenizer, chat, trait),
            "prior": opinion_prior_scores(model, tokenizer, chat),
            "classifier_heldout_accuracy": sum(
                a == b for a, b in zip(classified, labels, strict=True)
            )
            / len(labels),
            "classifier_heldout_texts": len(labels),
        },
        "opinion_incontext": {
            f"stated about {group} topics": opinion_incontext_scores(
                model, tokenizer, chat, trait, n=args.opinion_updates, topics=group
            )
            for group in ("train", "heldout", "madeup")
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
