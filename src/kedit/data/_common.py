"""What the benchmark loaders share: reading files, field access with precise errors, and the
loop that turns records into requests (with `n` and `skip_bad`)."""

from __future__ import annotations

import inspect
import json
import logging
import re
from collections.abc import Callable, Collection, Iterable
from functools import partial
from pathlib import Path
from typing import Any

from kedit.requests import EditRequest

log = logging.getLogger("kedit.data")
_MISSING = object()
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
PATH_STEP = re.compile(r"\[\d+\]|[^.\[\]]+")
# What every format's parser takes; any other keyword is an option of that format alone.
COMMON_OPTIONS = {"records", "data", "source", "n", "add_space", "skip_bad"}


class Loaded(list):
    """The items loaded from one benchmark file: a plain list, plus where they came from and
    the records skipped as malformed (`skip_bad=True`), each as the error message naming
    the file, the record and the field."""

    def __init__(
        self, items: Iterable[Any] = (), *, format: str, source: str, skipped: Iterable[str] = ()
    ) -> None:
        super().__init__(items)
        self.format = format
        self.source = source
        self.skipped = list(skipped)


def read_json(path: str | Path) -> tuple[str, Any]:
    """The file's name (for error messages) and its parsed content; `.jsonl` files give a list
    of their lines' objects."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return str(path), [json.loads(line) for line in text.splitlines() if line.strip()]
        return str(path), json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a valid JSON file: {exc}") from exc


def read_records(path: str | Path) -> tuple[str, list[Any]]:
    """The file's name (for error messages) and its top-level JSON list."""
    source, data = read_json(path)
    return source, as_list(data, source)


def as_list(data: Any, source: str) -> list[Any]:
    if not isinstance(data, list):
        raise ValueError(f"{source}: expected a JSON list of records, got {type(data).__name__}")
    return data


def read_hub(
    dataset_id: str, split: str | None, name: str | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """Rows of a Hugging Face hub dataset (of its config `name`, where it has several), read
    with the optional `datasets` package."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            f"{dataset_id!r} is not a local file; reading it as a Hugging Face hub dataset needs "
            "the `datasets` package (pip install datasets), or download the file and pass its path"
        ) from exc
    try:
        rows = datasets.load_dataset(dataset_id, name, split=split or "train")
    except Exception as exc:  # the hub client raises many kinds; all mean "not readable now"
        raise ValueError(
            f"{dataset_id}: could not read the Hugging Face hub dataset (split "
            f"{split or 'train'!r}): {type(exc).__name__}: {exc}; pass a local file instead"
        ) from exc
    config = f"/{name}" if name else ""
    return f"hf://{dataset_id}{config}[{split or 'train'}]", [dict(row) for row in rows]


def check_n(n: int | None) -> int | None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n: expected a positive integer or None, got {n!r}")
    return n


def with_space(text: str, add_space: bool) -> str:
    """Prefix a space unless the text starts with whitespace, as the benchmarks' own code does."""
    return text if not add_space or text[:1].isspace() else " " + text


def flatten_strings(value: Any) -> list[Any]:
    """The leaves of a string or a (nested) list, in order (KnowEdit's alias lists)."""
    if isinstance(value, list):
        return [leaf for item in value for leaf in flatten_strings(item)]
    return [value]


class Record:
    """One record of a benchmark file; its errors name the file, the record and the field.

    A field that is missing or JSON `null` counts as absent: an error unless a default is given.
    """

    def __init__(self, source: str, index: int, data: Any, label: str = "record") -> None:
        self.source, self.index, self.data, self.label = source, index, data, label
        if not isinstance(data, dict):
            raise self.error("record", f"expected a JSON object, got {type(data).__name__}")

    def error(self, field: str, problem: str) -> ValueError:
        return ValueError(f"{self.source}: {self.label} {self.index}: {field}: {problem}")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, path: str, kind: type | tuple[type, ...] = str, default: Any = _MISSING) -> Any:
        """The value at a path such as `a.b[2].c`; a missing field is an error unless `default`
        is given."""
        value = self.data
        for key in PATH_STEP.findall(path):
            if key.startswith("["):
                position = int(key[1:-1])
                found = isinstance(value, list) and position < len(value)
                value = value[position] if found else None
            else:
                value = value.get(key) if isinstance(value, dict) else None
            if value is None:
                if default is _MISSING:
                    raise self.error(path, "missing")
                return default
        if not isinstance(value, kind) or isinstance(value, bool):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise self.error(path, f"expected {names}, got {value!r:.80}")
        return self.text(path, value) if isinstance(value, str) else value

    def text(self, path: str, value: Any) -> str:
        """`value` if it is a non-empty string, else an error naming `path`."""
        if not isinstance(value, str) or not value.strip():
            raise self.error(path, f"expected a non-empty string, got {value!r:.80}")
        return value

    def strings(self, path: str) -> list[str]:
        """An optional list of non-empty strings (a single string counts as a list of one)."""
        value = self.get(path, (list, str), default=[])
        items = [value] if isinstance(value, str) else value
        return [self.text(f"{path}[{position}]", item) for position, item in enumerate(items)]

    def aliases(self, path: str, value: Any) -> list[str]:
        """An answer given as a string or a (nested) list of aliases: its strings, first first."""
        leaves = flatten_strings(value)
        if not leaves:
            raise self.error(path, f"expected an answer or a list of aliases, got {value!r:.80}")
        return list(dict.fromkeys(self.text(path, leaf) for leaf in leaves))

    def other_fields(self, used: Collection[str]) -> dict[str, Any]:
        """The record's fields outside `used`: what a request keeps of it as `extra`."""
        return {key: value for key, value in self.data.items() if key not in used}

    def request(self, **fields: Any) -> EditRequest:
        """Build the EditRequest, naming this record in any error it raises."""
        try:
            return EditRequest(**fields)
        except ValueError as exc:
            raise ValueError(f"{self.source}: {self.label} {self.index}: {exc}") from exc


def records_reader(
    format: str, parse: Callable[..., Any], doc: str, flatten: bool = False
) -> Callable[..., Loaded]:
    """The reader of one format's parsed records: `read(records, source, n, add_space,
    skip_bad)` gives each record, with `add_space`, to `parse` and collects the results."""

    def read(
        records: list[Any],
        source: str = "<records>",
        n: int | None = None,
        add_space: bool = True,
        skip_bad: bool = False,
    ) -> Loaded:
        parse_one = partial(parse, add_space=add_space)
        return collect(records, source, format, parse_one, n, skip_bad, flatten=flatten)

    read.__doc__ = doc
    return read


def collect(
    records: Any,
    source: str,
    format: str,
    parse: Callable[[Record], Any],
    n: int | None = None,
    skip_bad: bool = False,
    flatten: bool = False,
    skipped: Iterable[str] = (),
) -> Loaded:
    """Parse records one by one into a `Loaded` list.

    `parse` gets each record and returns one item (a list of items with `flatten`). `n` stops
    after n good records. A malformed record raises ValueError, or with `skip_bad` is skipped,
    counted in `.skipped` (after the messages already in `skipped`) and reported in one logged
    warning.
    """
    check_n(n)
    items, skipped, good = [], list(skipped), 0
    for index, data in enumerate(as_list(records, source)):
        if n is not None and good == n:
            break
        try:
            parsed = parse(Record(source, index, data))
        except ValueError as exc:
            if not skip_bad:
                raise
            skipped.append(str(exc))
            continue
        good += 1
        if flatten:
            items.extend(parsed)
        else:
            items.append(parsed)
    if skipped:
        log.warning(
            "%s: skipped %d malformed record(s); the first: %s", source, len(skipped), skipped[0]
        )
    return Loaded(items, format=format, source=source, skipped=skipped)


def parse_with_options(
    parse: Callable[..., Loaded],
    format: str,
    data: Any,
    source: str,
    n: int | None,
    add_space: bool,
    skip_bad: bool,
    options: dict[str, Any],
) -> Loaded:
    """`parse` (format `format`'s parser) on the records read from `source`, with the format's
    own `options`; an option the parser does not take is refused, naming the ones it takes."""
    known = set(inspect.signature(parse).parameters) - COMMON_OPTIONS
    for key in options:
        if key not in known:
            raise ValueError(
                f"{key}: not an option of format {format!r}; its options: "
                f"{', '.join(sorted(known)) or 'none'}"
            )
    return parse(data, source=source, n=n, add_space=add_space, skip_bad=skip_bad, **options)
