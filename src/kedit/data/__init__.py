"""Benchmark loaders: one module per file format, each returning `list[EditRequest]`.

`load_requests` reads a local JSON file, tells its format from the first record and
dispatches; the helpers below are what the format modules share.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kedit.requests import EditRequest

__all__ = ["FORMATS", "load_requests"]

FORMATS = ("counterfact", "knowedit")
_MISSING = object()


def read_records(path: str | Path) -> tuple[str, list[Any]]:
    """The file's name (for error messages) and its top-level JSON list."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {str(path)!r} does not exist")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a valid JSON file: {exc}") from exc
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return str(path), records


def limit(records: list[Any], n: int | None) -> list[Any]:
    """The first `n` records (all with `n=None`)."""
    if n is None:
        return records
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive integer or None, got {n!r}")
    return records[:n]


def with_space(text: str, add_space: bool) -> str:
    """Prefix a space unless the text starts with whitespace, as the benchmarks' own code does."""
    return text if not add_space or text[:1].isspace() else " " + text


class Record:
    """One record of a benchmark file; its errors name the file, the record and the field."""

    def __init__(self, source: str, index: int, data: Any) -> None:
        self.source, self.index, self.data = source, index, data
        if not isinstance(data, dict):
            raise self.error("record", f"expected a JSON object, got {type(data).__name__}")

    def error(self, field: str, problem: str) -> ValueError:
        return ValueError(f"{self.source}: record {self.index}: {field}: {problem}")

    def get(self, path: str, kind: type | tuple[type, ...] = str, default: Any = _MISSING) -> Any:
        """The value at a dotted path; a missing field is an error unless `default` is given."""
        value = self.data
        for key in path.split("."):
            if not isinstance(value, dict) or key not in value:
                if default is _MISSING:
                    raise self.error(path, "missing")
                return default
            value = value[key]
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

    def request(self, **fields: Any) -> EditRequest:
        """Build the EditRequest, naming this record in any error it raises."""
        try:
            return EditRequest(**fields)
        except ValueError as exc:
            raise ValueError(f"{self.source}: record {self.index}: {exc}") from exc


def detect_format(records: list[Any], source: str) -> str:
    """Tell a benchmark format from the first record's fields."""
    first = records[0] if records else None
    if isinstance(first, dict) and "requested_rewrite" in first:
        return "counterfact"
    if isinstance(first, dict) and {"prompt", "target_new"} <= first.keys():
        return "knowedit"
    raise ValueError(
        f"{source}: cannot tell the benchmark format from its first record; pass format= "
        f"one of {list(FORMATS)}"
    )


def load_requests(
    path: str | Path, format: str | None = None, n: int | None = None, add_space: bool = True
) -> list[EditRequest]:
    """Load a local benchmark file (format detected by content unless given) as EditRequests.

    `n` keeps the first n records; `add_space` prefixes a space to targets and answers that
    lack one.
    """
    # Imported here: the format modules import this package's helpers.
    from kedit.data.counterfact import counterfact_requests
    from kedit.data.knowedit import knowedit_requests

    parsers = {"counterfact": counterfact_requests, "knowedit": knowedit_requests}
    if format is not None and format not in parsers:
        raise ValueError(f"format: unknown format {format!r}; expected one of {list(FORMATS)}")
    source, records = read_records(path)
    parse = parsers[format or detect_format(records, source)]
    return parse(records, source=source, n=n, add_space=add_space)
