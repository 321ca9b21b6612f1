"""KnowUnDo (Tian et al., 2024): copyrighted content and user privacy to unlearn or retain.

The benchmark has two configs, `copyright` and `privacy`, each with the splits `unlearn` (what
must go) and `retention` (what must stay, often about the same subjects). Each split's file
(`copyright/unlearn.json` on the hub, ...) is a JSON list holding ONE object whose `train` and
`val` are lists of `{"text", "labels"}` rows. KnowUnDo's own code joins a row as
`text + "\\n\\n" + labels` and trains and scores on the `"\\n\\n" + labels` tokens only, so an
item's prompt is `text` and its answer `"\\n\\n" + labels`. A plain list of rows is read too.
"""

from __future__ import annotations

from typing import Any

from kedit.data._common import Loaded, Record, as_list, collect
from kedit.data.unlearn_items import UnlearnItem

CONFIGS = ("copyright", "privacy")
SPLITS = ("unlearn", "retention")
PARTS = ("train", "val", "all")
SEPARATOR = "\n\n"


def knowundo_rows(data: Any, source: str, part: str) -> list[Any]:
    """The `{"text", "labels"}` rows of a split file: its `train` rows, its `val` rows or both."""
    if part not in PARTS:
        raise ValueError(f"part: expected one of {list(PARTS)}, got {part!r}")
    records = as_list(data, source)
    if len(records) == 1 and isinstance(records[0], dict) and "train" in records[0]:
        holder = Record(source, 0, records[0])
        chosen = ("train", "val") if part == "all" else (part,)
        return [row for key in chosen for row in holder.get(key, list, default=[])]
    if part != "train":
        raise ValueError(
            f"part: {source} is a plain list of rows without train/val parts; use part 'train'"
        )
    return records


def knowundo_items(
    data: Any,
    source: str = "<records>",
    n: int | None = None,
    add_space: bool = True,
    skip_bad: bool = False,
    part: str = "train",
    separator: str = SEPARATOR,
) -> Loaded:
    """Unlearning items of a KnowUnDo split file (`part`: its "train" rows, "val" rows or "all");
    `separator` joins text and labels as KnowUnDo's code does (`add_space` is not used: the
    separator comes first)."""

    def parse(record: Record) -> UnlearnItem:
        return UnlearnItem(record.get("text"), separator + record.get("labels"))

    rows = knowundo_rows(data, source, part)
    return collect(rows, source, "knowundo", parse, n, skip_bad)
