"""Benchmark loaders: one module per benchmark, each reading the benchmark's own file format
into `EditRequest`s.

`load_requests` reads a local JSON/JSONL file (or a Hugging Face hub dataset id, with the
optional `datasets` package), tells its format from its content unless `format=` is given,
and returns a `Loaded` list of requests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedit.data._common import (
    HUB_ID,
    Loaded,
    as_list,
    parse_with_options,
    read_hub,
    read_json,
)
from kedit.data.counterfact import counterfact_requests, easyedit_counterfact_requests
from kedit.data.knowedit import (
    SANITATION_KEYS,
    convsent_requests,
    knowedit_requests,
    sanitation_requests,
    wikibio_requests,
)
from kedit.data.mquake import MultiHopCase, load_mquake, mquake_cases, mquake_requests
from kedit.data.pitfalls import (
    ConflictCase,
    RoundCase,
    conflictedit_requests,
    load_conflictedit,
    load_roundedit,
    roundedit_requests,
)
from kedit.data.safeedit import safeedit_requests
from kedit.data.wikibigedit import wikibigedit_requests
from kedit.data.zsre import zsre_requests

__all__ = [
    "FORMATS",
    "ConflictCase",
    "Loaded",
    "MultiHopCase",
    "RoundCase",
    "detect_format",
    "load_conflictedit",
    "load_mquake",
    "load_requests",
    "load_roundedit",
    "mquake_cases",
]

FORMATS = {
    "counterfact": counterfact_requests,
    "counterfact-easyedit": easyedit_counterfact_requests,
    "knowedit": knowedit_requests,
    "wikibio": wikibio_requests,
    "convsent": convsent_requests,
    "sanitation": sanitation_requests,
    "zsre": zsre_requests,
    "mquake": mquake_requests,
    "wikibigedit": wikibigedit_requests,
    "conflictedit": conflictedit_requests,
    "roundedit": roundedit_requests,
    "safeedit": safeedit_requests,
}
# Fields that identify a format by the first record, tried in order (the first match wins).
SIGNATURES = (
    ("safeedit", {"adversarial prompt", "safe generation"}),
    ("conflictedit", {"triples", "edits", "type"}),
    ("roundedit", {"edit", "true_objects"}),
    ("zsre", {"src", "alt"}),
    ("wikibigedit", {"update", "ans"}),
    ("wikibio", {"text", "labels", "concept"}),
    ("convsent", {"ent", "pos", "neg"}),
    ("sanitation", {"question", "target_new"}),
    ("counterfact-easyedit", {"prompt", "target_new", "locality_prompt"}),
    ("knowedit", {"prompt", "target_new"}),
)
DETECT_RECORDS = 20


def _signature(record: Any) -> str | None:
    """The format a record's fields identify, if any."""
    if not isinstance(record, dict):
        return None
    rewrite = record.get("requested_rewrite")
    if isinstance(rewrite, list):
        return "mquake"
    if isinstance(rewrite, dict):
        return "counterfact"
    return next((name for name, fields in SIGNATURES if fields <= record.keys()), None)


def detect_format(data: Any, source: str = "<records>") -> str:
    """Tell a benchmark format from a file's parsed content: the fields of its first record
    that has a known layout (among the first DETECT_RECORDS, so a malformed first record can
    be skipped)."""
    if isinstance(data, dict) and any(keys[0] in data for keys in SANITATION_KEYS):
        return "sanitation"
    records = as_list(data, source)
    if not records:
        raise ValueError(f"{source}: holds no records (an empty list)")
    found = (_signature(record) for record in records[:DETECT_RECORDS])
    name = next((name for name in found if name is not None), None)
    if name is None:
        raise ValueError(
            f"{source}: cannot tell the benchmark format from its first records; pass format= "
            f"(kedit bench --format, a plan's formats) one of {list(FORMATS)}"
        )
    return name


def _read(path: str | Path, split: str | None) -> tuple[str, Any]:
    """A local file's content, or a hub dataset's rows when `path` is a hub id and no file."""
    local = Path(path).expanduser()
    if (
        isinstance(path, str)
        and not local.exists()
        and HUB_ID.fullmatch(path)
        and local.suffix not in {".json", ".jsonl"}
    ):
        return read_hub(path, split)
    if split is not None:
        raise ValueError(f"split: only for Hugging Face hub datasets, got {split!r} for {path}")
    return read_json(path)


def check_format(name: str, field: str = "format") -> None:
    """Refuse a format name that is not one of FORMATS, naming the field it came from."""
    if name not in FORMATS:
        raise ValueError(f"{field}: unknown format {name!r}; expected one of {list(FORMATS)}")


def load_requests(
    path: str | Path,
    format: str | None = None,
    n: int | None = None,
    add_space: bool = True,
    skip_bad: bool = False,
    split: str | None = None,
    **options: Any,
) -> Loaded:
    """Load a benchmark file (format detected from its content unless given) as EditRequests.

    `n` keeps the first n records (cases); `add_space` prefixes a space to targets and answers
    that lack one, as the benchmarks' evaluation code does; `skip_bad` skips malformed records
    instead of raising, and lists them in the result's `.skipped`. `path` may be a Hugging
    Face hub dataset id (read with `split`, "train" by default) when `datasets` is installed.
    Other `options` go to the format's parser (e.g. `seed` for "convsent", `template` for
    "sanitation").
    """
    if format is not None:
        check_format(format)
    source, data = _read(path, split)
    name = format or detect_format(data, source)
    return parse_with_options(FORMATS[name], name, data, source, n, add_space, skip_bad, options)
