"""CounterFact in the ROME/MEMIT JSON format (Meng et al., 2022).

Each record: `case_id`, `requested_rewrite` {`prompt` with "{}", `subject`, `target_new`
{`str`}, `target_true` {`str`}}, `paraphrase_prompts` (should give target_new),
`neighborhood_prompts` (other subjects; should keep target_true), and fields used elsewhere
(`generation_prompts`, `attribute_prompts`, ...), which are kept in `extra`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedit.data import Record, limit, read_records, with_space
from kedit.requests import EditRequest

USED = {"case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts"}


def counterfact_requests(
    records: list[Any], source: str = "<records>", n: int | None = None, add_space: bool = True
) -> list[EditRequest]:
    """EditRequests from parsed CounterFact records; `source` names them in errors."""
    requests = []
    for index, data in enumerate(limit(records, n)):
        record = Record(source, index, data)
        target_true = with_space(record.get("requested_rewrite.target_true.str"), add_space)
        extra = {key: value for key, value in data.items() if key not in USED}
        relation = record.get("requested_rewrite.relation_id", str, default=None)
        if relation is not None:
            extra["relation_id"] = relation
        requests.append(
            record.request(
                prompt=record.get("requested_rewrite.prompt"),
                subject=record.get("requested_rewrite.subject"),
                target_new=with_space(record.get("requested_rewrite.target_new.str"), add_space),
                target_true=target_true,
                rephrase=record.strings("paraphrase_prompts"),
                locality=[(p, target_true) for p in record.strings("neighborhood_prompts")],
                case_id=record.get("case_id", (int, str), default=None),
                extra=extra,
            )
        )
    return requests


def load_counterfact(
    path: str | Path, n: int | None = None, add_space: bool = True
) -> list[EditRequest]:
    """Load a local CounterFact JSON file (e.g. `counterfact.json`)."""
    source, records = read_records(path)
    return counterfact_requests(records, source=source, n=n, add_space=add_space)
