"""Loading unlearning data: a file in one of three formats, or a benchmark's forget and retain
splits named as `knowundo:CONFIG` or `tofu:SPLIT`.

Formats ("plain", "tofu", "knowundo") are told from a file's first record unless given. Files
may hold a JSON array or one JSON object per line, whatever their suffix (TOFU's `.json` files
are JSON lines). A benchmark spec reads from `root` (a local copy of the hub dataset's files)
when given, else from the hub, which only happens because the spec named it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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
from kedit.data.knowundo import CONFIGS, knowundo_items
from kedit.data.tofu import FORGET_SPLITS, tofu_items
from kedit.data.unlearn_items import plain_items

UNLEARN_FORMATS = {"plain": plain_items, "tofu": tofu_items, "knowundo": knowundo_items}
HUB_IDS = {"knowundo": "zjunlp/KnowUnDo", "tofu": "locuslab/TOFU"}


def read_records_file(path: str | Path) -> tuple[str, Any]:
    """A file's name and content: one JSON document, or JSON lines (one object per line)."""
    try:
        return read_json(path)
    except ValueError as error:
        text = Path(path).expanduser().read_text(encoding="utf-8")
        try:
            return str(path), [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise error from None


def detect_unlearn_format(data: Any, source: str = "<records>") -> str:
    """The unlearning format of a file's content, from its first record."""
    records = as_list(data, source)
    if not records:
        raise ValueError(f"{source}: holds no records (an empty list)")
    first = records[0]
    if isinstance(first, dict):
        if "train" in first or {"text", "labels"} <= first.keys():
            return "knowundo"
        if {"question", "answer"} <= first.keys():
            return "tofu"
        if {"prompt", "answer"} <= first.keys():
            return "plain"
    raise ValueError(
        f"{source}: cannot tell the unlearning format from its first record ({first!r:.80}); "
        f"expected `prompt`/`answer` (plain), `question`/`answer` (tofu) or `text`/`labels` "
        f"rows (knowundo), or pass format= one of {list(UNLEARN_FORMATS)}"
    )


def load_unlearning(
    path: str | Path,
    format: str | None = None,
    n: int | None = None,
    add_space: bool = True,
    skip_bad: bool = False,
    split: str | None = None,
    name: str | None = None,
    **options: Any,
) -> Loaded:
    """Unlearning items (`UnlearnItem`) from a local file, or from a hub dataset id (its config
    `name` and `split`) when `path` is no file. `n` keeps the first n items; `add_space`
    prefixes a space to answers that lack one; `skip_bad` skips malformed records (listed in
    `.skipped`). Other `options` go to the format's parser (KnowUnDo: `part`, `separator`)."""
    if format is not None and format not in UNLEARN_FORMATS:
        raise ValueError(
            f"format: unknown format {format!r}; expected one of {list(UNLEARN_FORMATS)}"
        )
    local = Path(path).expanduser()
    if isinstance(path, str) and not local.exists() and HUB_ID.fullmatch(path):
        source, data = read_hub(path, split, name)
    elif split is not None or name is not None:
        raise ValueError(f"split, name: only for Hugging Face hub datasets, got a file {path}")
    else:
        source, data = read_records_file(path)
    chosen = format or detect_unlearn_format(data, source)
    parse = UNLEARN_FORMATS[chosen]
    return parse_with_options(parse, chosen, data, source, n, add_space, skip_bad, options)


@dataclass
class UnlearningData:
    """A benchmark's forget set and the retain set that goes with it."""

    forget: Loaded
    retain: Loaded


def _split_file(root: Path, stem: str) -> Path:
    """`root/stem.json` or `root/stem.jsonl`, whichever exists."""
    for suffix in (".json", ".jsonl"):
        if (root / f"{stem}{suffix}").is_file():
            return root / f"{stem}{suffix}"
    raise FileNotFoundError(f"root: {str(root)!r} has no {stem}.json or {stem}.jsonl")


def load_unlearning_benchmark(
    spec: str, root: str | Path | None = None, n: int | None = None
) -> UnlearningData:
    """The forget and retain sets a spec names: `knowundo:copyright` or `knowundo:privacy`
    (splits unlearn and retention, their `train` rows) or `tofu:forget01|05|10` (with
    retain99|95|90; the forget set's `_perturbed` file where present, for the truth ratio).

    With `root`, the files are read from that folder, laid out as on the hub
    (`root/privacy/unlearn.json`, `root/forget01.json`); without it, from the hub.
    """
    kind, sep, which = spec.partition(":")
    if not sep or kind not in HUB_IDS:
        raise ValueError(f"data: expected knowundo:CONFIG or tofu:SPLIT, got {spec!r}")
    if kind == "knowundo":
        if which not in CONFIGS:
            raise ValueError(f"data: KnowUnDo has configs {list(CONFIGS)}, got {which!r}")
        stems = {"forget": f"{which}/unlearn", "retain": f"{which}/retention"}
    else:
        if which not in FORGET_SPLITS:
            raise ValueError(f"data: TOFU's forget splits are {list(FORGET_SPLITS)}, got {which!r}")
        perturbed = f"{which}_perturbed"
        has_perturbed = root is None or any(
            (Path(root) / f"{perturbed}{suffix}").is_file() for suffix in (".json", ".jsonl")
        )
        stems = {"forget": perturbed if has_perturbed else which, "retain": FORGET_SPLITS[which]}
    sets = {}
    for role, stem in stems.items():
        if root is not None:
            sets[role] = load_unlearning(_split_file(Path(root), stem), format=kind, n=n)
        elif kind == "knowundo":
            config, split = stem.split("/")
            sets[role] = load_unlearning(HUB_IDS[kind], kind, n, split=split, name=config)
        else:
            sets[role] = load_unlearning(HUB_IDS[kind], kind, n, split="train", name=stem)
    return UnlearningData(**sets)
