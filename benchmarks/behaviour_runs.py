"""What benchmarks/safety.py and personality.py share: timed edits and the JSON they print."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def timed_edits(lm: Any, method: str, hparams: dict[str, Any], seconds: list[float]) -> Callable:
    """An edit function for the evaluation loops that appends each edit's seconds."""
    import kedit

    def make_edit(requests: Any) -> Any:
        started = time.perf_counter()
        edit = kedit.edit(lm, requests, method, hparams=hparams)
        seconds.append(time.perf_counter() - started)
        return edit

    return make_edit


def emit(report: dict[str, Any], out: Path | None) -> dict[str, Any]:
    """Print the report as JSON, and write it to `out` where given."""
    print(json.dumps(report, indent=2))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report
