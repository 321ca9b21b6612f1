"""MQuAKE (Zhong et al., 2023): multi-hop questions whose answers change after several edits.

Each record (`MQuAKE-CF-3k.json`, `MQuAKE-T.json`): `case_id`, `requested_rewrite` (a list of
edits, each {`prompt` with "{}", `subject`, `target_new` {`str`}, `target_true` {`str`},
`question`, `relation_id`}), `questions` (multi-hop questions; a case counts as answered when
any one of them is), `new_answer` and `new_answer_alias` (the answer once every edit is in),
`answer` and `answer_alias` (before), and `single_hops`, `new_single_hops`, `orig`, kept in
`extra`.

A case is a `MultiHopCase`: its edits as EditRequests (`case_id` "<case>/<k>"; the edit's
`question` as rephrase; the multi-hop questions, answered with `new_answer`, as portability
probes) plus the questions and answers. Portability of a case with several edits holds only
once all of them are applied: evaluate such cases with every edit of the case together.
`load_requests` returns the requests of all cases in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kedit.data._common import Loaded, Record, read_records, records_reader, with_space
from kedit.requests import EditRequest

USED = {"case_id", "requested_rewrite", "questions", "new_answer", "new_answer_alias"}
PORTABILITY_KIND = "multi_hop"


@dataclass(frozen=True)
class MultiHopCase:
    """One MQuAKE case: edits to apply together, and questions whose answer they change.

    `new_answers` are the answers accepted once every edit is applied (`new_answer` first, then
    its aliases); `answers` those accepted before.
    """

    case_id: str | None
    requests: tuple[EditRequest, ...]
    questions: tuple[str, ...]
    new_answers: tuple[str, ...]
    answers: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def _names(record: Record, main: str, alias: str) -> tuple[str, ...]:
    """An answer and its aliases, de-duplicated, the answer first."""
    names = [record.get(main), *record.strings(alias)]
    return tuple(dict.fromkeys(names))


def _case(record: Record, add_space: bool) -> MultiHopCase:
    rewrites = record.get("requested_rewrite", list)
    if not rewrites:
        raise record.error("requested_rewrite", "expected at least one edit, got []")
    questions = tuple(record.strings("questions"))
    if not questions:
        raise record.error("questions", "expected at least one multi-hop question")
    new_answers = _names(record, "new_answer", "new_answer_alias")
    answers = _names(record, "answer", "answer_alias") if record.has("answer") else ()
    case_id = record.get("case_id", (int, str), default=None)
    portability = [(q, with_space(new_answers[0], add_space)) for q in questions]
    requests = []
    for k in range(len(rewrites)):
        at = f"requested_rewrite[{k}]"
        record.get(at, dict)
        relation = record.get(f"{at}.relation_id", str, default=None)
        requests.append(
            record.request(
                prompt=record.get(f"{at}.prompt"),
                subject=record.get(f"{at}.subject"),
                target_new=with_space(record.get(f"{at}.target_new.str"), add_space),
                target_true=with_space(record.get(f"{at}.target_true.str"), add_space),
                rephrase=record.strings(f"{at}.question"),
                portability=portability,
                case_id=None if case_id is None else f"{case_id}/{k}",
                extra={
                    "mquake_case_id": case_id,
                    "relation_id": relation,
                    "case_edits": len(rewrites),
                    "portability_kinds": [PORTABILITY_KIND] * len(portability),
                    "portability_aliases": [list(new_answers)] * len(portability),
                },
            )
        )
    extra = record.other_fields(USED)
    return MultiHopCase(
        case_id=None if case_id is None else str(case_id),
        requests=tuple(requests),
        questions=questions,
        new_answers=new_answers,
        answers=answers,
        extra=extra,
    )


def _case_requests(record: Record, add_space: bool) -> tuple[EditRequest, ...]:
    return _case(record, add_space).requests


mquake_cases = records_reader(
    "mquake", _case, "MultiHopCases from parsed MQuAKE records; `n` counts cases."
)
mquake_requests = records_reader(
    "mquake",
    _case_requests,
    "The EditRequests of the first `n` MQuAKE cases, case after case.",
    flatten=True,
)


def load_mquake(
    path: str | Path, n: int | None = None, add_space: bool = True, skip_bad: bool = False
) -> Loaded:
    """Load a local MQuAKE JSON file as MultiHopCases."""
    source, records = read_records(path)
    return mquake_cases(records, source=source, n=n, add_space=add_space, skip_bad=skip_bad)
