"""WikiBigEdit (Thede et al., 2025): real-world Wikidata edits for lifelong editing.

Each record (the hub dataset `lukasthede/WikiBigEdit`, or a local JSON file of its rows):
`subject`, `update` (the question; the prompt), `ans` (the new answer), `rephrase` (a
paraphrase), `personas` (the question asked in a persona's voice; answered with `ans`),
`mhop` and `mhop_ans` (an optional multi-hop question and its answer), `loc` and `loc_ans`
(an unrelated question and its answer), optional `ground_truth`; other fields are kept in
`extra`. Probe kinds follow EasyEdit's script: portability "personas" and "mhop", locality
"locality".
"""

from __future__ import annotations

from kedit.data._common import Record, records_reader, with_space
from kedit.requests import EditRequest

USED = {
    "subject",
    "update",
    "ans",
    "rephrase",
    "personas",
    "mhop",
    "mhop_ans",
    "loc",
    "loc_ans",
    "ground_truth",
}


def _pairs(
    record: Record, kind: str, prompt_field: str, answer_field: str, add_space: bool
) -> list[tuple[str, str, str]]:
    """(kind, prompt, answer) for each prompt in an optional field; the answer field is
    required when there is a prompt."""
    prompts = record.strings(prompt_field)
    answer = record.get(answer_field, str, default=None)
    if prompts and answer is None:
        raise record.error(answer_field, f"missing, though {prompt_field} asks a question")
    return [(kind, prompt, with_space(answer, add_space)) for prompt in prompts]


def _request(record: Record, add_space: bool) -> EditRequest:
    portability = _pairs(record, "personas", "personas", "ans", add_space)
    portability += _pairs(record, "mhop", "mhop", "mhop_ans", add_space)
    locality = _pairs(record, "locality", "loc", "loc_ans", add_space)
    truth = record.get("ground_truth", str, default=None)
    extra = record.other_fields(USED)
    extra.update(
        portability_kinds=[kind for kind, _, _ in portability],
        locality_kinds=[kind for kind, _, _ in locality],
    )
    return record.request(
        prompt=record.get("update"),
        subject=record.get("subject"),
        target_new=with_space(record.get("ans"), add_space),
        target_true=None if truth is None else with_space(truth, add_space),
        rephrase=record.strings("rephrase"),
        locality=[(prompt, answer) for _, prompt, answer in locality],
        portability=[(prompt, answer) for _, prompt, answer in portability],
        extra=extra,
    )


wikibigedit_requests = records_reader(
    "wikibigedit",
    _request,
    "EditRequests from parsed WikiBigEdit records; `source` names them in errors.",
)
