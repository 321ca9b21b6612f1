"""CounterFact (Meng et al., 2022) in its two file formats.

ROME/MEMIT format (`counterfact.json`), format name "counterfact": `case_id`,
`requested_rewrite` {`prompt` with "{}", `subject`, `target_new` {`str`}, `target_true`
{`str`}, `relation_id`}, `paraphrase_prompts` (should give target_new), `neighborhood_prompts`
(other subjects; should keep target_true), and fields used elsewhere (`generation_prompts`,
`attribute_prompts`, ...), which are kept in `extra`.

EasyEdit's flat format (`counterfact-edit.json`), format name "counterfact-easyedit":
`case_id`, `prompt` (containing the subject), `subject`, `target_new`, `ground_truth`,
`rephrase_prompt`, `locality_prompt`, `locality_ground_truth`.
"""

from __future__ import annotations

from kedit.data._common import Record, records_reader, with_space
from kedit.requests import EditRequest

USED = {"case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts"}
FLAT_USED = {
    "case_id",
    "prompt",
    "subject",
    "target_new",
    "ground_truth",
    "rephrase_prompt",
    "locality_prompt",
    "locality_ground_truth",
}


def _request(record: Record, add_space: bool) -> EditRequest:
    target_true = with_space(record.get("requested_rewrite.target_true.str"), add_space)
    extra = record.other_fields(USED)
    relation = record.get("requested_rewrite.relation_id", str, default=None)
    if relation is not None:
        extra["relation_id"] = relation
    return record.request(
        prompt=record.get("requested_rewrite.prompt"),
        subject=record.get("requested_rewrite.subject"),
        target_new=with_space(record.get("requested_rewrite.target_new.str"), add_space),
        target_true=target_true,
        rephrase=record.strings("paraphrase_prompts"),
        locality=[(p, target_true) for p in record.strings("neighborhood_prompts")],
        case_id=record.get("case_id", (int, str), default=None),
        extra=extra,
    )


counterfact_requests = records_reader(
    "counterfact",
    _request,
    "EditRequests from parsed ROME-format CounterFact records; `source` names them in errors.",
)


def _flat_request(record: Record, add_space: bool) -> EditRequest:
    locality = []
    if record.has("locality_prompt"):
        answer = with_space(record.get("locality_ground_truth"), add_space)
        locality.append((record.get("locality_prompt"), answer))
    truth = record.get("ground_truth", str, default=None)
    extra = record.other_fields(FLAT_USED)
    return record.request(
        prompt=record.get("prompt"),
        subject=record.get("subject"),
        target_new=with_space(record.get("target_new"), add_space),
        target_true=None if truth is None else with_space(truth, add_space),
        rephrase=record.strings("rephrase_prompt"),
        locality=locality,
        case_id=record.get("case_id", (int, str), default=None),
        extra=extra,
    )


easyedit_counterfact_requests = records_reader(
    "counterfact-easyedit",
    _flat_request,
    "EditRequests from parsed records of EasyEdit's flat CounterFact format.",
)
