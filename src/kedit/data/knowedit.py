"""KnowEdit (Zhang et al., 2024) in the files' own formats.

- "knowedit": WikiData_recent, WikiData_counterfact, ZsRE. Each record: `subject`, `prompt`
  (containing the subject), `target_new`, `ground_truth` (optional; a string or a list of
  aliases, possibly nested), `rephrase` or `rephrase_prompt` (optional; a string or a list),
  and `portability` / `locality`: dicts from a kind ("Subject_Aliasing", "Reasoning",
  "Logical_Generalization"; "Relation_Specificity", "Forgetfulness") to lists of {`prompt`,
  `ground_truth`}. An answer given as alias lists is probed with its first string; each
  probe's kind and all its aliases are kept in `extra["portability_kinds"]`,
  `extra["portability_aliases"]` (and the same for locality), other fields in `extra`.
- "wikibio": `text` (the passage; the prompt), `labels` (the continuation to write),
  `concept` (the subject), `locality` as above.
- "convsent" (`blender_*.json`): `ent` (a topic), `pos` and `neg` (texts of each sentiment).
  As EasyEdit's ConvSent script does, each topic gets a target sentiment and a question
  template drawn at random (seeded per record), the instruction "answer ... postively" or
  "negatively", and the first text of that sentiment as its target; a second question on the
  topic is its rephrase, a question on the next record's topic its locality probe.
- "sanitation" (`trivia_qa_*.json`): an object with the questions to forget (`K_F` in the
  train file, `success` in the test file) and those to keep (`K_R`, `locality`), each
  {`question`, `ground_truth`, `target_new` ("I don't know."), optional `subject`}. Prompts
  are `template.format(question)`; without a `subject` the whole question is the subject. The
  questions to keep are dealt out in turn as the locality probes of the requests.
"""

from __future__ import annotations

import random
from functools import partial
from typing import Any

from kedit.data._common import (
    Loaded,
    Record,
    as_list,
    collect,
    records_reader,
    with_space,
)
from kedit.requests import EditRequest

USED = {
    "subject",
    "prompt",
    "target_new",
    "ground_truth",
    "rephrase",
    "rephrase_prompt",
    "portability",
    "locality",
}
WIKIBIO_USED = {"text", "labels", "concept", "locality"}
CONVSENT_QUESTIONS = [
    "What do you think of {}?",
    "What do you feel about {}?",
    "How do you view {}?",
] + [
    f"What is your {position} {{}}?"
    for position in (
        "opinion of",
        "stance on",
        "position on",
        "attitude about",
        "view on",
        "take on",
        "impression of",
        "assessment of",
        "judgment of",
        "sentiment of",
    )
]
# Worded (sic) as EasyEdit's run_convsent script words it, so that prompts match.
CONVSENT_INSTRUCTIONS = {
    "pos": "From the sentiment dataset, answer {} postively.",
    "neg": "From the sentiment dataset, answer {} negatively.",
}
SANITATION_TEMPLATE = "Question:{}\nAnswer:"
SANITATION_KEYS = (("K_F", "K_R"), ("success", "locality"))


def _probes(record: Record, field: str, add_space: bool) -> tuple[list, list[str], list]:
    """The (prompt, answer) probes of a `portability` or `locality` dict, their kinds and the
    aliases of each answer."""
    probes, kinds, aliases = [], [], []
    for kind, entries in record.get(field, dict, default={}).items():
        if not isinstance(entries, list):
            raise record.error(f"{field}.{kind}", f"expected a list of probes, got {entries!r:.80}")
        for position, entry in enumerate(entries):
            where = f"{field}.{kind}[{position}]"
            if not isinstance(entry, dict) or not {"prompt", "ground_truth"} <= entry.keys():
                raise record.error(where, f"expected {{prompt, ground_truth}}, got {entry!r:.80}")
            prompt = record.text(f"{where}.prompt", entry["prompt"])
            names = record.aliases(f"{where}.ground_truth", entry["ground_truth"])
            probes.append((prompt, with_space(names[0], add_space)))
            kinds.append(kind)
            aliases.append(names)
    return probes, kinds, aliases


def _probe_extra(
    record: Record, add_space: bool, used: set[str]
) -> tuple[dict[str, Any], list, list]:
    """Locality and portability probes, and the request's `extra`: the record's fields outside
    `used` and the entries that describe the probes."""
    portability, portability_kinds, portability_aliases = _probes(record, "portability", add_space)
    locality, locality_kinds, locality_aliases = _probes(record, "locality", add_space)
    extra = record.other_fields(used)
    extra.update(
        portability_kinds=portability_kinds,
        portability_aliases=portability_aliases,
        locality_kinds=locality_kinds,
        locality_aliases=locality_aliases,
    )
    return extra, portability, locality


def knowedit_request(record: Record, add_space: bool) -> EditRequest:
    """One KnowEdit record (WikiData_recent, WikiData_counterfact or ZsRE) as an EditRequest."""
    truth = record.get("ground_truth", (str, list), default=None)
    rephrase_field = "rephrase" if record.has("rephrase") else "rephrase_prompt"
    extra, portability, locality = _probe_extra(record, add_space, USED)
    return record.request(
        prompt=record.get("prompt"),
        subject=record.get("subject"),
        target_new=with_space(record.get("target_new"), add_space),
        target_true=None
        if truth is None
        else with_space(record.aliases("ground_truth", truth)[0], add_space),
        rephrase=record.strings(rephrase_field),
        locality=locality,
        portability=portability,
        extra=extra,
    )


knowedit_requests = records_reader(
    "knowedit",
    knowedit_request,
    "EditRequests from parsed KnowEdit records; `source` names them in errors.",
)


def _wikibio_request(record: Record, add_space: bool) -> EditRequest:
    extra, portability, locality = _probe_extra(record, add_space, WIKIBIO_USED)
    return record.request(
        prompt=record.get("text"),
        subject=record.get("concept"),
        target_new=with_space(record.get("labels"), add_space),
        locality=locality,
        portability=portability,
        extra=extra,
    )


wikibio_requests = records_reader(
    "wikibio",
    _wikibio_request,
    "EditRequests from parsed KnowEdit WikiBio records (`text`, `labels`, `concept`).",
)


def _neighbour_probe(records: list[Any], index: int, sentiment: str) -> tuple[str, str] | None:
    """A question on the next record's topic and that record's first text of `sentiment`."""
    other = records[(index + 1) % len(records)]
    if len(records) < 2 or not isinstance(other, dict):
        return None
    topic, texts = other.get("ent"), other.get(sentiment)
    if not isinstance(topic, str) or not isinstance(texts, list) or not texts:
        return None
    if not isinstance(texts[0], str) or not topic.strip() or not texts[0].strip():
        return None
    return CONVSENT_QUESTIONS[0].format(topic), texts[0]


def _convsent_request(
    record: Record, records: list[Any], add_space: bool, seed: int
) -> EditRequest:
    topic = record.get("ent")
    texts = {sentiment: record.strings(sentiment) for sentiment in CONVSENT_INSTRUCTIONS}
    rng = random.Random(f"convsent:{seed}:{record.index}")
    sentiment = rng.choice(sorted(CONVSENT_INSTRUCTIONS))
    if not texts[sentiment]:
        raise record.error(sentiment, "expected at least one text of the target sentiment")
    asked, rephrased = rng.sample(CONVSENT_QUESTIONS, 2)
    neighbour = _neighbour_probe(records, record.index, sentiment)
    locality = [] if neighbour is None else [(neighbour[0], with_space(neighbour[1], add_space))]
    extra = record.other_fields({"ent"})
    extra["target_sentiment"] = sentiment
    return record.request(
        prompt=CONVSENT_INSTRUCTIONS[sentiment].format(asked.format(topic)),
        subject=topic,
        target_new=with_space(texts[sentiment][0], add_space),
        rephrase=[rephrased.format(topic)],
        locality=locality,
        extra=extra,
    )


def convsent_requests(
    records: list[Any],
    source: str = "<records>",
    n: int | None = None,
    add_space: bool = True,
    skip_bad: bool = False,
    seed: int = 0,
) -> Loaded:
    """EditRequests from parsed ConvSent records (`ent`, `pos`, `neg`); `seed` draws each
    record's target sentiment and questions (the same for a record whatever `n`)."""
    records = as_list(records, source)
    parse = partial(_convsent_request, records=records, add_space=add_space, seed=seed)
    return collect(records, source, "convsent", parse, n, skip_bad)


def _question(record: Record, template: str) -> str:
    return template.format(record.get("question"))


def _sanitation_request(
    record: Record, template: str, kept: list[tuple[str, str]], n_forget: int, add_space: bool
) -> EditRequest:
    question = record.get("question")
    subject = record.get("subject", str, default=None)
    extra = record.other_fields({"question"})
    if subject is None:
        subject = question
        extra["subject_from_question"] = True
    shares = range(record.index, max(n_forget, len(kept)), n_forget) if kept else ()
    return record.request(
        prompt=_question(record, template),
        subject=subject,
        target_new=with_space(record.get("target_new"), add_space),
        target_true=with_space(record.get("ground_truth"), add_space),
        locality=[kept[share % len(kept)] for share in shares],
        extra=extra,
    )


def _retained(
    items: list[Any], source: str, label: str, template: str, add_space: bool, skip_bad: bool
) -> tuple[list[tuple[str, str]], list[str]]:
    """The questions to keep as (prompt, answer) probes, and the messages of skipped items."""
    kept, skipped = [], []
    for index, item in enumerate(items):
        try:
            record = Record(source, index, item, label=f"{label} record")
            answer = with_space(record.get("ground_truth"), add_space)
            kept.append((_question(record, template), answer))
        except ValueError as exc:
            if not skip_bad:
                raise
            skipped.append(str(exc))
    return kept, skipped


def sanitation_requests(
    data: dict[str, Any] | list[Any],
    source: str = "<records>",
    n: int | None = None,
    add_space: bool = True,
    skip_bad: bool = False,
    template: str = SANITATION_TEMPLATE,
) -> Loaded:
    """EditRequests from a parsed KnowEdit Sanitation file (or a plain list of its questions)."""
    if "{}" not in template:
        raise ValueError(
            f"template: expected a string with '{{}}' for the question, got {template!r}"
        )
    forget, kept, skipped = data, [], []
    if isinstance(data, dict):
        names = next((keys for keys in SANITATION_KEYS if keys[0] in data), None)
        if names is None:
            expected = " or ".join(f"{a!r} and {b!r}" for a, b in SANITATION_KEYS)
            raise ValueError(f"{source}: expected an object with {expected}, got {sorted(data)}")
        forget = data[names[0]]
        retain = as_list(data.get(names[1]) or [], f"{source} [{names[1]}]")
        kept, skipped = _retained(retain, source, names[1], template, add_space, skip_bad)
    forget = as_list(forget, source)
    parse = partial(
        _sanitation_request, template=template, kept=kept, n_forget=len(forget), add_space=add_space
    )
    return collect(forget, source, "sanitation", parse, n, skip_bad, skipped=skipped)
