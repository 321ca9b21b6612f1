"""zsRE question answering edits (Levy et al., 2017), as split by MEND (Mitchell et al., 2022).

MEND's files (`zsre_mend_eval.json`, and EasyEdit's `zsre_mend_eval_portability_gpt4.json`),
format name "zsre". Each record: `subject`, `src` (the question; the prompt), `alt` (the new
answer), `answers` (the original answers; the first is target_true, all are kept in
`extra["target_true_aliases"]`), `rephrase` (a paraphrased question), `loc` (an unrelated
Natural Questions prompt, written "nq question: ...") with its answer `loc_ans`, optional
`portability` {`New Question`, `New Answer`}, and `pred`, `cond`, ... kept in `extra`. The
locality prompt is used as written, "nq question: " included, as EasyEdit evaluates it.

Records written in the KnowEdit ZsRE layout (`ZsRE-test-all.json`: `prompt`, `target_new`,
...) are read as the "knowedit" format reads them.
"""

from __future__ import annotations

from kedit.data._common import Record, records_reader, with_space
from kedit.data.knowedit import knowedit_request
from kedit.requests import EditRequest

USED = {"subject", "src", "alt", "answers", "rephrase", "loc", "loc_ans", "portability"}
PORTABILITY_KIND = "one_hop"
LOCALITY_KIND = "neighborhood"


def _portability(record: Record, add_space: bool) -> list[tuple[str, str]]:
    """The `New Question` / `New Answer` pairs of the optional `portability` object."""
    if not record.has("portability"):
        return []
    questions = record.strings("portability.New Question")
    answers = record.strings("portability.New Answer")
    if not questions or len(questions) != len(answers):
        raise record.error(
            "portability",
            f"expected as many 'New Answer's as 'New Question's (at least one), got "
            f"{len(questions)} question(s) and {len(answers)} answer(s)",
        )
    return [(q, with_space(a, add_space)) for q, a in zip(questions, answers, strict=True)]


def _mend_request(record: Record, add_space: bool) -> EditRequest:
    truths = record.aliases("answers", record.get("answers", (list, str)))
    locality = [(record.get("loc"), with_space(record.get("loc_ans"), add_space))]
    portability = _portability(record, add_space)
    extra = record.other_fields(USED)
    extra.update(
        target_true_aliases=truths,
        locality_kinds=[LOCALITY_KIND],
        portability_kinds=[PORTABILITY_KIND] * len(portability),
    )
    return record.request(
        prompt=record.get("src"),
        subject=record.get("subject"),
        target_new=with_space(record.get("alt"), add_space),
        target_true=with_space(truths[0], add_space),
        rephrase=record.strings("rephrase"),
        locality=locality,
        portability=portability,
        extra=extra,
    )


def _request(record: Record, add_space: bool) -> EditRequest:
    if record.has("src") or not record.has("prompt"):
        return _mend_request(record, add_space)
    return knowedit_request(record, add_space)


zsre_requests = records_reader(
    "zsre",
    _request,
    "EditRequests from parsed zsRE records (MEND's split, or KnowEdit's ZsRE file).",
)
