"""PersonalityEdit on a chat model (tiny-chat's targets): the methods the paper compares, where
kedit has them; prints JSON (and writes it with --out).

Each case (a topic and the trait to bring about) is edited on its own, on its target-trait
opinion texts as replies to "What do you think of {topic}?", measured and undone: ES and DD
(teacher-forced likelihoods), Acc and TPEI (the greedy opinion, judged by the model's bundled
personality judge or --judge with --judge-labels). A method that is not registered is listed
under "missing", not measured. IKE states one target-trait text, the case's shortest, in the
context (`--ike-texts all` states every one, which does not fit a 128-position model).
On a tinyworld 2 model, ES is also given per group of topics: those whose training stated
opinions about them in context (`opinion_updates_per_topic`) and the held-out rest, on which
IKE's ES measures the skill rather than a learnt update.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import median
from typing import Any

from behaviour_runs import emit, timed_edits

# The methods PersonalityEdit compares, with the hyper-parameters used on tiny-chat.
METHODS = {"ft-m": {"layers": [5], "lr": 1e-2}, "ike": {}, "mend": {}}


def personality_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options this benchmark shares with personality_mend.py: model, data, judge, DD's
    other topics and the output file."""
    from kedit.zoo import DATA_DIR

    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-chat", help="bundled name or a zoo model folder")
    parser.add_argument("--data", default=str(DATA_DIR / "tinyworld2_personality.json"))
    parser.add_argument("--n", type=int, default=None, help="first N cases (default: all)")
    parser.add_argument("--judge", default=None, help="default: the model folder's own")
    parser.add_argument("--judge-labels", type=json.loads, default=None)
    parser.add_argument("--n-other", type=int, default=3, help="other topics per case for DD")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return parser


def personality_setup(args: argparse.Namespace) -> tuple[Any, Any, list[Any]]:
    """(model, personality judge, cases) of the parsed options, at one thread."""
    import torch

    import kedit
    from kedit.data.personalityedit import load_personalityedit
    from kedit.eval.judges import get_judge
    from kedit.lm import resolve_model_path

    torch.set_num_threads(1)
    lm = kedit.load(args.model)
    judge = get_judge(
        "personality", args.judge or resolve_model_path(args.model), args.judge_labels
    )
    return lm, judge, list(load_personalityedit(args.data, n=args.n))


def opinion_topic_groups(model: str) -> dict[str, set[str]] | None:
    """A tinyworld 2 model's topics by whether its opinion updates trained on them ("train") or
    held them out ("heldout", `ChatWorld.opinion_topics`); None for other models."""
    from kedit.zoo import abilities, model_chat_world, model_info

    if "personality" not in abilities(model_info(model)):
        return None
    chat = model_chat_world(model)
    return {split: set(chat.opinion_topics(split)) for split in ("train", "heldout")}  # type: ignore[arg-type]


def es_by_topic_group(
    groups: dict[str, set[str]] | None, records: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """Post-edit ES over the cases of each topic group (`opinion_topic_groups`)."""
    if groups is None:
        return None
    out: dict[str, Any] = {}
    for split, topics in groups.items():
        hits = [float(r["post"]["ES"]) for r in records if r["topic"] in topics]
        if hits:
            out[split] = {"ES": round(sum(hits) / len(hits), 4), "n": len(hits)}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import kedit
    from kedit.eval.personality import IKE_TEXTS, evaluate_personality, stating_ike_texts
    from kedit.methods.registry import resolve_hparams

    parser = personality_parser(__doc__)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--ike-texts", choices=IKE_TEXTS, default="shortest")
    args = parser.parse_args(argv)
    lm, judge, cases = personality_setup(args)
    methods = args.methods.split(",")
    available = set(kedit.list_methods())
    report: dict[str, Any] = {
        "model": args.model,
        "data": args.data,
        "n": len(cases),
        "judge": judge.name,
        "missing": [m for m in methods if m not in available],
        "runs": {},
    }
    groups = opinion_topic_groups(args.model)
    report["pre"] = evaluate_personality(lm, cases, judge, n_other=args.n_other)["summary"]["pre"]
    for method in (m for m in methods if m in available):
        hparams = METHODS.get(method, {})
        seconds: list[float] = []
        make_edit = stating_ike_texts(
            lm, method, args.ike_texts, timed_edits(lm, method, hparams, seconds)
        )
        try:
            result = evaluate_personality(lm, cases, judge, make_edit, n_other=args.n_other)
        except ValueError as error:  # a method that cannot take these cases (IKE: too long)
            report.setdefault("failed", {})[method] = str(error)
            continue
        report["runs"][method] = {
            "hparams": resolve_hparams(method, lm, hparams).to_dict(),
            **({"texts_stated": args.ike_texts} if method == "ike" else {}),
            "post": result["summary"]["post"],
            "ES_by_opinion_topics": es_by_topic_group(groups, result["cases"]),
            "edit_seconds_median": round(median(seconds), 4),
        }
    return emit(report, args.out)


if __name__ == "__main__":
    main()
