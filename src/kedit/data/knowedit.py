"""KnowEdit / EasyEdit JSON format (Zhang et al., 2024): WikiData_recent,
WikiData_counterfact, ZsRE.

Each record: `subject`, `prompt` (containing the subject), `target_new`, `ground_truth`
(optional; a string or a list of aliases, possibly nested), `rephrase` or
`rephrase_prompt` (optional; a string or a list), and `portability` / `locality`: dicts from
a kind ("Reasoning", "Relation_Specificity", ...) to lists of {`prompt`, `ground_truth`}.
Answers given as alias lists keep their first string; each probe's kind is kept in
`extra["portability_kinds"]` / `extra["locality_kinds"]`, other fields in `extra`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedit.data import Record, limit, read_records, with_space
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


def _answer(record: Record, path: str, value: Any) -> str:
    """The first string of an answer given as a string or a (nested) list of aliases."""
    while isinstance(value, list) and value:
        value = value[0]
    return record.text(path, value)


def _probes(record: Record, field: str, add_space: bool) -> tuple[list[tuple[str, str]], list[str]]:
    """The (prompt, answer) probes of a `portability` or `locality` dict, and their kinds."""
    probes, kinds = [], []
    for kind, entries in record.get(field, dict, default={}).items():
        if not isinstance(entries, list):
            raise record.error(f"{field}.{kind}", f"expected a list of probes, got {entries!r:.80}")
        for position, entry in enumerate(entries):
            where = f"{field}.{kind}[{position}]"
            if not isinstance(entry, dict) or not {"prompt", "ground_truth"} <= entry.keys():
                raise record.error(where, f"expected {{prompt, ground_truth}}, got {entry!r:.80}")
            prompt = record.text(f"{where}.prompt", entry["prompt"])
            answer = _answer(record, f"{where}.ground_truth", entry["ground_truth"])
            probes.append((prompt, with_space(answer, add_space)))
            kinds.append(kind)
    return probes, kinds


def knowedit_requests(
    records: list[Any], source: str = "<records>", n: int | None = None, add_space: bool = True
) -> list[EditRequest]:
    """EditRequests from parsed KnowEdit records; `source` names them in errors."""
    requests = []
    for index, data in enumerate(limit(records, n)):
        record = Record(source, index, data)
        truth = record.get("ground_truth", (str, list), default=None)
        rephrase_field = "rephrase" if "rephrase" in data else "rephrase_prompt"
        portability, portability_kinds = _probes(record, "portability", add_space)
        locality, locality_kinds = _probes(record, "locality", add_space)
        extra = {key: value for key, value in data.items() if key not in USED}
        extra.update(portability_kinds=portability_kinds, locality_kinds=locality_kinds)
        requests.append(
            record.request(
                prompt=record.get("prompt"),
                subject=record.get("subject"),
                target_new=with_space(record.get("target_new"), add_space),
                target_true=None
                if truth is None
                else with_space(_answer(record, "ground_truth", truth), add_space),
                rephrase=record.strings(rephrase_field),
                locality=locality,
                portability=portability,
                extra=extra,
            )
        )
    return requests


def load_knowedit(
    path: str | Path, n: int | None = None, add_space: bool = True
) -> list[EditRequest]:
    """Load a local KnowEdit JSON file (e.g. `recent_test.json`, `test_cf.json`)."""
    source, records = read_records(path)
    return knowedit_requests(records, source=source, n=n, add_space=add_space)
