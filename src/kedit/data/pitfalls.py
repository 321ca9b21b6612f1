"""ConflictEdit and RoundEdit (Li et al., 2024, "Unveiling the Pitfalls of Knowledge Editing
for Large Language Models"): pairs of edits whose facts clash, and edits that are undone.

ConflictEdit (`reverse_edit.json`, `composite_edit.json`, `coverage_edit.json`), format name
"conflictedit": each record has `type` ("reverse", "composite" or "coverage"), `rule` (e.g.
"P800>P170"; absent for coverage), `triples` (the facts the rule ties together, each
{`relation` {`id`, `prompt` with "{}", `query`, `label`}, `subject` {`id`, `label`}, `object`
{`id`, `label`}}), `prerequisites` (indices into `triples` of the tied facts: the composite
rule's premise that no edit touches) and `edits`: two edits made one after the other, each a
triple plus `new_object` (the second edit of a composite record also has `true_object`, the
object the rule implies once the first edit is in).

RoundEdit (`easy.json`, `hard.json`), format name "roundedit": `type` ("1-N@<relation id>",
a relation with N true objects for the subject), `edit` {`relation`, `subject`, `object` (one
of the true objects), `new_object` (the object the round trip passes through)} and
`true_objects` (a list of {`id`, `label`}, `object` among them). The round trip edits `object`
to `new_object` and back.

Facts are scored with their relation's prompt and its paraphrases, which both benchmarks keep
in a separate file: a JSON object from relation id to templates with "{}" (`conflict_prompts.json`,
`round_prompts.json`). Pass it as `prompts` (a path or the mapping); otherwise it is the file of
that name beside the data file, or the one file there whose name ends so
(`tinyworld_conflict_prompts.json`). Relations it lacks are scored on their prompt alone.

`load_conflictedit` and `load_roundedit` return the cases; `load_requests` reads both formats
as the cases' EditRequests (every edit of a ConflictEdit case; the first edit of a round trip).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from kedit.data._common import Loaded, Record, collect, read_json, read_records
from kedit.data._common import with_space as spaced
from kedit.requests import SUBJECT_SLOT, EditRequest, fill_subject

log = logging.getLogger("kedit.data")

CONFLICT_KINDS = ("reverse", "composite", "coverage")
PROMPT_FILES = {"conflictedit": "conflict_prompts.json", "roundedit": "round_prompts.json"}
Prompts = dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class Fact:
    """A (subject, relation, object) triple and the templates that ask it: the relation's
    prompt first, then its paraphrases, each with "{}". `object` is an answer as scored (with
    the leading space a tokenizer expects)."""

    relation_id: str
    templates: tuple[str, ...]
    subject: str
    object: str

    @property
    def prompts(self) -> tuple[str, ...]:
        """The templates filled with the subject."""
        return tuple(fill_subject(t, self.subject) for t in self.templates)

    def request(self, target_new: str, case_id: str) -> EditRequest:
        """The edit of this fact's object to `target_new`, its paraphrases as rephrase prompts."""
        return EditRequest(
            prompt=self.templates[0],
            subject=self.subject,
            target_new=target_new,
            target_true=self.object,
            rephrase=self.templates[1:],
            case_id=case_id,
            extra={"relation_id": self.relation_id},
        )


@dataclass(frozen=True)
class ConflictCase:
    """One ConflictEdit record: two edits made one after the other (`edits`, the facts as they
    were, and `new_objects`), and the facts a logical `rule` ties them to (`triples`, of which
    `prerequisites` are the tied facts)."""

    case_id: str
    kind: str
    rule: str | None
    triples: tuple[Fact, ...]
    prerequisites: tuple[int, ...]
    edits: tuple[Fact, Fact]
    new_objects: tuple[str, str]
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def requests(self) -> tuple[EditRequest, EditRequest]:
        """The two edits, in order; case ids "<case>/0" and "<case>/1"."""
        first, second = (
            fact.request(new, f"{self.case_id}/{k}")
            for k, (fact, new) in enumerate(zip(self.edits, self.new_objects, strict=True))
        )
        return first, second


@dataclass(frozen=True)
class RoundCase:
    """One RoundEdit record: `fact`'s object is edited to `new_object` and back; the subject
    has several `true_objects` under the relation, `fact.object` first."""

    case_id: str
    kind: str
    fact: Fact
    new_object: str
    true_objects: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def edit(self) -> EditRequest:
        """The first edit of the round trip: the object to `new_object`."""
        return self.fact.request(self.new_object, f"{self.case_id}/0")

    @property
    def back(self) -> EditRequest:
        """The second edit: `new_object` back to the object."""
        passed = replace(self.fact, object=self.new_object)
        return passed.request(self.fact.object, f"{self.case_id}/1")


def read_prompts(prompts: str | Path | dict[str, Any], source: str = "prompts") -> Prompts:
    """A paraphrase file's (or mapping's) templates per relation id, each checked to hold one
    "{}"."""
    if not isinstance(prompts, dict):
        source, prompts = read_json(prompts)
        if not isinstance(prompts, dict):
            raise ValueError(
                f"{source}: expected a JSON object from relation id to a list of templates, "
                f"got {type(prompts).__name__}"
            )
    out: Prompts = {}
    for relation, templates in prompts.items():
        where = f"{source}: {relation}"
        if not isinstance(templates, list):
            raise ValueError(f"{where}: expected a list of templates, got {templates!r:.80}")
        for index, template in enumerate(templates):
            if not isinstance(template, str) or template.count(SUBJECT_SLOT) != 1:
                raise ValueError(
                    f"{where}[{index}]: expected a template with one '{{}}', got {template!r:.80}"
                )
        out[str(relation)] = tuple(templates)
    return out


def find_prompts(source: str, format: str) -> Path | None:
    """The paraphrase file beside a data file: `conflict_prompts.json` / `round_prompts.json`,
    or the one file whose name ends so; None when there is none."""
    name = PROMPT_FILES[format]
    if not Path(source).is_file():
        return None
    folder = Path(source).parent
    if (folder / name).is_file():
        return folder / name
    found = sorted(folder.glob(f"*{name}"))
    if len(found) > 1:
        raise ValueError(
            f"{source}: several paraphrase files beside it ({', '.join(p.name for p in found)});"
            " pass the one to use as prompts="
        )
    return found[0] if found else None


def _prompts(source: str, format: str, prompts: str | Path | dict | None) -> Prompts:
    if prompts is not None:
        return read_prompts(prompts)
    path = find_prompts(source, format)
    if path is None:
        log.warning(
            "%s: no %s beside it; every fact is scored on its relation's prompt alone",
            source,
            PROMPT_FILES[format],
        )
        return {}
    return read_prompts(path)


def _fact(
    record: Record, path: str, prompts: Prompts, add_space: bool, object_key: str = "object"
) -> Fact:
    relation = record.get(f"{path}.relation.id")
    prompt = record.get(f"{path}.relation.prompt")
    if prompt.count(SUBJECT_SLOT) != 1:
        raise record.error(f"{path}.relation.prompt", f"expected one '{{}}', got {prompt!r:.80}")
    paraphrases = tuple(t for t in prompts.get(relation, ()) if t != prompt)
    return Fact(
        relation_id=relation,
        templates=(prompt, *paraphrases),
        subject=record.get(f"{path}.subject.label"),
        object=spaced(record.get(f"{path}.{object_key}.label"), add_space),
    )


def _case_id(record: Record) -> str:
    return str(record.get("case_id", (int, str), default=record.index))


def _conflict_case(record: Record, prompts: Prompts, add_space: bool) -> ConflictCase:
    kind = record.get("type")
    if kind not in CONFLICT_KINDS:
        raise record.error("type", f"expected one of {', '.join(CONFLICT_KINDS)}, got {kind!r}")
    triples = record.get("triples", list)
    edits = record.get("edits", list)
    if len(edits) != 2:
        raise record.error("edits", f"expected two edits, got {len(edits)}")
    prerequisites = tuple(record.get("prerequisites", list, default=[]))
    for index in prerequisites:
        if not isinstance(index, int) or not 0 <= index < len(triples):
            raise record.error("prerequisites", f"{index!r} is not an index into triples")
    if kind == "composite" and not prerequisites:
        raise record.error("prerequisites", "a composite case needs its tied fact's index")
    edited = tuple(_fact(record, f"edits[{k}]", prompts, add_space) for k in range(2))
    new = tuple(spaced(record.get(f"edits[{k}].new_object.label"), add_space) for k in range(2))
    extra = {}
    if edits[1].get("true_object") is not None:
        extra["true_object"] = spaced(record.get("edits[1].true_object.label"), add_space)
    return ConflictCase(
        case_id=_case_id(record),
        kind=kind,
        rule=record.get("rule", str, default=None),
        triples=tuple(
            _fact(record, f"triples[{k}]", prompts, add_space) for k in range(len(triples))
        ),
        prerequisites=prerequisites,
        edits=(edited[0], edited[1]),
        new_objects=(new[0], new[1]),
        extra=extra,
    )


def _round_case(record: Record, prompts: Prompts, add_space: bool) -> RoundCase:
    fact = _fact(record, "edit", prompts, add_space)
    true_objects = [
        spaced(record.get(f"true_objects[{k}].label"), add_space)
        for k in range(len(record.get("true_objects", list)))
    ]
    if fact.object not in true_objects:
        raise record.error(
            "edit.object", f"{fact.object.strip()!r} is not among true_objects {true_objects}"
        )
    others = [o for o in dict.fromkeys(true_objects) if o != fact.object]
    if not others:
        raise record.error("true_objects", "expected another true object besides edit.object")
    return RoundCase(
        case_id=_case_id(record),
        kind=record.get("type"),
        fact=fact,
        new_object=spaced(record.get("edit.new_object.label"), add_space),
        true_objects=(fact.object, *others),
    )


def _readers(
    format: str, parse: Callable[..., Any], requests: Callable[[Any], Iterable[EditRequest]]
) -> tuple[Callable[..., Loaded], Callable[..., Loaded], Callable[..., Loaded]]:
    """The format's readers: of parsed records into cases (`parse` reads each record) and into
    their `requests`, and of a file into cases."""

    def cases(
        records: list[Any],
        source: str = "<records>",
        n: int | None = None,
        add_space: bool = True,
        skip_bad: bool = False,
        prompts: str | Path | dict | None = None,
    ) -> Loaded:
        found = _prompts(source, format, prompts)
        one = partial(parse, prompts=found, add_space=add_space)
        return collect(records, source, format, one, n, skip_bad)

    def edit_requests(
        records: list[Any],
        source: str = "<records>",
        n: int | None = None,
        add_space: bool = True,
        skip_bad: bool = False,
        prompts: str | Path | dict | None = None,
    ) -> Loaded:
        loaded = cases(records, source, n, add_space, skip_bad, prompts)
        items = [r for case in loaded for r in requests(case)]
        return Loaded(items, format=format, source=source, skipped=loaded.skipped)

    def load(
        path: str | Path,
        n: int | None = None,
        prompts: str | Path | dict | None = None,
        add_space: bool = True,
        skip_bad: bool = False,
    ) -> Loaded:
        source, records = read_records(path)
        return cases(records, source, n, add_space, skip_bad, prompts)

    load.__doc__ = f"Load a {format} file as its cases (`n`: the first n)."
    return cases, edit_requests, load


conflictedit_cases, conflictedit_requests, load_conflictedit = _readers(
    "conflictedit", _conflict_case, lambda case: case.requests
)
roundedit_cases, roundedit_requests, load_roundedit = _readers(
    "roundedit", _round_case, lambda case: [case.edit]
)
