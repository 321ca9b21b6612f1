"""MEND trained on PersonalityEdit opinions, as the PersonalityEdit paper trains it; prints JSON.

The bundled MEND editors are trained on fact edits. This trains one on the opinion edits of
the training topics of a PersonalityEdit file (every case whose index is not a multiple of
`--heldout-every` shifted by one: with 5, cases 4, 9, 14, ... are held out), a case's requests
being its target-trait texts as replies to "What do you think of {topic}?" (what the
evaluation edits with), each with a locality probe: an opinion text about another training
topic. It then measures, on the held-out topics only, MEND with that editor, MEND with the
bundled fact-trained editor and FT-M beside them (ES, DD, Acc, TPEI; `kedit.eval.personality`).
The editor is kept in `--editor-dir` and resumed or reused from there.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from statistics import median
from typing import Any

from behaviour_runs import emit, timed_edits
from personality import METHODS, personality_parser, personality_setup


def split_cases(cases: list[Any], heldout_every: int) -> tuple[list[Any], list[Any]]:
    """(training cases, held-out cases): every `heldout_every`-th case, from the last of the
    first `heldout_every`, is held out."""
    heldout = [case for i, case in enumerate(cases) if i % heldout_every == heldout_every - 1]
    train = [case for i, case in enumerate(cases) if i % heldout_every != heldout_every - 1]
    return train, heldout


def opinion_requests(run: Any, cases: list[Any]) -> list[Any]:
    """Each case's requests (its target-trait texts as replies to its question), each with one
    locality probe: the next case's text of the next trait in turn, as a reply to its question."""
    from kedit.data.personalityedit import TRAITS

    requests = []
    for index, case in enumerate(cases):
        other = cases[(index + 1) % len(cases)]
        for k, request in enumerate(case.requests(run.prompt(case))):
            texts = other.texts[TRAITS[k % len(TRAITS)]]
            probe = (run.prompt(other), " " + texts[k % len(texts)])
            requests.append(dataclasses.replace(request, locality=(probe,)))
    return requests


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import kedit
    from kedit.eval.personality import PersonalityRun, evaluate_personality

    parser = personality_parser(__doc__)
    parser.add_argument("--heldout-every", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300, help="MEND training steps")
    parser.add_argument("--editor-dir", type=Path, default=Path("runs/mend-personality"))
    args = parser.parse_args(argv)
    if args.heldout_every < 2:
        parser.error(f"--heldout-every: expected 2 or more, got {args.heldout_every}")
    lm, judge, cases = personality_setup(args)
    train_cases, heldout = split_cases(cases, args.heldout_every)
    run = PersonalityRun(lm, judge, n_other=args.n_other)
    requests = opinion_requests(run, train_cases)
    editor = kedit.train_editor(
        lm, "mend", requests, out=args.editor_dir, settings={"steps": args.steps}, progress=False
    )
    report: dict[str, Any] = {
        "model": args.model,
        "data": args.data,
        "train_topics": len(train_cases),
        "train_requests": len(requests),
        "heldout_topics": [case.topic for case in heldout],
        "editor": {"folder": str(args.editor_dir), "steps": args.steps},
        "judge": judge.name,
        "runs": {},
    }
    pre = evaluate_personality(lm, heldout, judge, n_other=args.n_other)
    report["pre"] = pre["summary"]["pre"]
    runs = {
        "mend (trained on opinions)": ("mend", {"editor": str(editor.path)}),
        "mend (bundled, trained on facts)": ("mend", METHODS["mend"]),
        "ft-m": ("ft-m", METHODS["ft-m"]),
    }
    for name, (method, hparams) in runs.items():
        seconds: list[float] = []
        make_edit = timed_edits(lm, method, hparams, seconds)
        result = evaluate_personality(lm, heldout, judge, make_edit, n_other=args.n_other)
        report["runs"][name] = {
            "post": result["summary"]["post"],
            "edit_seconds_median": round(median(seconds), 4),
        }
    return emit(report, args.out)


if __name__ == "__main__":
    main()
