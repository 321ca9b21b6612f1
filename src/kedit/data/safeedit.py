"""SafeEdit (Wang et al., 2024, "Detoxifying Large Language Models via Knowledge Editing"),
format name "safeedit": the records of ``zjunlp/SafeEdit`` (``SafeEdit_test.json``,
``SafeEdit_train.json``, ``three_instances_for_editing.json``) and tinyworld 2's file.

Each record becomes one `EditRequest`, mapped as EasyEdit maps it: `adversarial prompt` (the
attack wrapped around the harmful question) is the prompt, `safe generation` the target and
`unsafe generation` the old answer, the harmful `question` the subject, and the `knowledge
constrain` {prompt, answer} the one locality probe. The rest goes to `extra`: the
`category`, the `attack` and the generalization test's `other_attack` {category, name}, and
`generalization`, the four test inputs keyed by the metric they feed (`DG_onlyQ`: the question
alone; `DG_otherA`: another attack on the same question; `DG_otherQ`: the same attack on
another question; `DG_otherAQ`: both), absent where the record has none
(``three_instances``) or leaves them empty (the train split). `id` is the case id.
"""

from __future__ import annotations

from kedit.data._common import Record, records_reader, with_space
from kedit.requests import EditRequest

# SafeEdit's generalization inputs, by the metric each one feeds.
GENERALIZATION_INPUTS = {
    "DG_onlyQ": "test input of only harmful question",
    "DG_otherA": "test input of other attack prompt input",
    "DG_otherQ": "test input of other question input",
    "DG_otherAQ": "test input of other questions and attack prompts",
}
GENERALIZATION = "generalization test"


OTHER_ATTACK = {"category": "attack_category", "name": "attack_name"}


def _optional_strings(record: Record, keys: dict[str, str]) -> dict[str, str]:
    """The non-empty strings of the generalization test under `keys` (values), renamed to
    their keys; the train split leaves them all empty, three_instances has none."""
    if not record.has(GENERALIZATION):
        return {}
    tests = record.get(GENERALIZATION, dict)
    found = {}
    for ours, key in keys.items():
        value = tests.get(key) or ""
        if not isinstance(value, str):
            raise record.error(f"{GENERALIZATION}.{key}", f"expected a string, got {value!r:.80}")
        if value.strip():
            found[ours] = value
    return found


def _safeedit_request(record: Record, add_space: bool) -> EditRequest:
    prompt, question = record.get("adversarial prompt"), record.get("question")
    if question not in prompt:
        raise record.error("question", f"{question!r:.80} is not part of the adversarial prompt")
    return record.request(
        prompt=prompt,
        subject=question,
        target_new=with_space(record.get("safe generation"), add_space),
        target_true=with_space(record.get("unsafe generation"), add_space),
        locality=[
            (
                record.get("knowledge constrain.prompt"),
                with_space(record.get("knowledge constrain.answer"), add_space),
            )
        ],
        case_id=str(record.get("id", (int, str), default=record.index)),
        extra={
            "category": record.get("unsafety category"),
            "attack": {
                "category": record.get("attack category"),
                "name": record.get("attack name"),
            },
            "other_attack": _optional_strings(record, OTHER_ATTACK),
            "generalization": _optional_strings(record, GENERALIZATION_INPUTS),
        },
    )


safeedit_requests = records_reader(
    "safeedit",
    _safeedit_request,
    "EditRequests from parsed SafeEdit records (adversarial prompt -> safe generation).",
)
