"""Facts for the mechanism analyses (`kedit.analysis`): a prompt with a subject and its answer.

Three sources read into `Fact`s:

- the LRE relation files that Knowledge Circuits uses (one relation per JSON object: `name`,
  `prompt_templates`, `prompt_templates_zs`, `properties`, `samples: [{subject, object}]`),
  one fact per template and sample as Knowledge Circuits builds them (`template.format(subject)`
  followed by a space and the object), a file or a folder of such files;
- any benchmark file `load_requests` reads (CounterFact, KnowEdit, ZsRE, ...): the request's
  prompt, subject and true answer (`target_true`);
- JSON/JSONL records `{prompt, subject, answer}` (`answer` optional: the analyses then follow
  the model's own prediction, as ROME's causal tracing does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedit.data._common import Loaded, Record, check_n, collect, read_json, with_space
from kedit.requests import SUBJECT_SLOT, SubjectPrompt

LRE_KEYS = {"name", "prompt_templates", "prompt_templates_zs", "samples", "properties"}
LRE_OPTIONAL_KEYS = {"domain", "range"}  # accepted by Knowledge Circuits' loader as well
TEMPLATE_SETS = ("prompt_templates", "prompt_templates_zs")


@dataclass(frozen=True)
class Fact(SubjectPrompt):
    """`prompt` (with `{}` for the subject, or containing it) continued by `answer`.

    `answer` carries the leading space a tokenizer expects (" Paris"); None means "whatever
    the model predicts". `relation` names the relation the fact came from, where known.
    """

    prompt: str
    subject: str
    answer: str | None = None
    relation: str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "subject"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
        if self.answer is not None and (not isinstance(self.answer, str) or not self.answer):
            raise ValueError(f"answer: expected a non-empty string or None, got {self.answer!r}")
        if SUBJECT_SLOT not in self.prompt and self.subject not in self.prompt:
            raise ValueError(
                f"prompt: {self.prompt!r} contains neither '{{}}' nor the subject {self.subject!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.template,
            "subject": self.subject,
            "answer": self.answer,
            "relation": self.relation,
        }


def is_lre_relation(data: Any) -> bool:
    """Whether parsed JSON is one LRE relation (a dict with `samples` and `prompt_templates`)."""
    return isinstance(data, dict) and {"samples", "prompt_templates"} <= data.keys()


def lre_facts(
    data: Any,
    source: str = "<relation>",
    templates: str = "prompt_templates",
    n: int | None = None,
    add_space: bool = True,
) -> Loaded:
    """The facts of one parsed LRE relation: every template of `templates` ("prompt_templates"
    or "prompt_templates_zs") with every sample, template by template as Knowledge Circuits
    builds them; `n` keeps the first n facts."""
    check_n(n)
    if templates not in TEMPLATE_SETS:
        raise ValueError(f"templates: expected one of {TEMPLATE_SETS}, got {templates!r}")
    relation = Record(source, 0, data, label="relation")
    unknown = sorted(set(data) - LRE_KEYS - LRE_OPTIONAL_KEYS)
    if unknown:
        raise relation.error(
            unknown[0], f"not a field of an LRE relation (expected {sorted(LRE_KEYS)})"
        )
    name = relation.get("name")
    prompts = relation.strings(templates)
    if not prompts:
        raise relation.error(templates, "expected at least one template")
    for index, prompt in enumerate(prompts):
        if prompt.count(SUBJECT_SLOT) != 1:
            raise relation.error(f"{templates}[{index}]", f"expected one '{{}}', got {prompt!r}")
    samples = relation.get("samples", list)

    def parse(sample: Record) -> list[Fact]:
        subject, answer = sample.get("subject"), sample.get("object")
        return [Fact(p, subject, with_space(answer, add_space), name) for p in prompts]

    facts = collect(samples, f"{source}: samples", "lre", parse, flatten=True)
    # Template by template, as Knowledge Circuits orders its sentences.
    ordered = [fact for prompt in prompts for fact in facts if fact.prompt == prompt]
    return Loaded(ordered[:n] if n else ordered, format="lre", source=source)


def record_facts(records: Any, source: str, n: int | None = None, add_space: bool = True) -> Loaded:
    """Facts from `{prompt, subject, answer}` records (`answer` optional)."""

    def parse(record: Record) -> Fact:
        answer = record.get("answer", default=None)
        return Fact(
            record.get("prompt"),
            record.get("subject"),
            None if answer is None else with_space(answer, add_space),
            record.get("relation", default=None),
        )

    return collect(records, source, "facts", parse, n)


def load_facts(
    path: str | Path, n: int | None = None, templates: str = "prompt_templates"
) -> Loaded:
    """Facts from an LRE relation file, a folder of them (searched recursively, files in
    name order), a `{prompt, subject, answer}` JSON/JSONL file, or any benchmark file
    `load_requests` reads (prompt, subject and `target_true` of each request)."""
    from kedit.data import load_requests

    check_n(n)
    folder = Path(path).expanduser()
    if folder.is_dir():
        files = sorted(folder.rglob("*.json"))
        if not files:
            raise FileNotFoundError(f"data: folder {str(folder)!r} holds no .json relation files")
        facts = [fact for file in files for fact in load_facts(file, templates=templates)]
        return Loaded(facts[:n] if n else facts, format="lre", source=str(folder))
    source, data = read_json(path)
    if is_lre_relation(data):
        return lre_facts(data, source, templates, n)
    records = data if isinstance(data, list) else None
    if records and isinstance(records[0], dict) and {"prompt", "subject"} <= records[0].keys():
        if "target_new" not in records[0] and "requested_rewrite" not in records[0]:
            return record_facts(records, source, n)
    requests = load_requests(path, n=n)
    facts = []
    for index, request in enumerate(requests):
        if request.target_true is None:
            raise ValueError(
                f"{source}: record {index}: target_true: missing; a fact needs its true answer"
            )
        facts.append(Fact(request.template, request.subject, request.target_true))
    return Loaded(facts, format=requests.format, source=source)
