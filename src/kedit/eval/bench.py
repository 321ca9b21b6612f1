"""Independent-editing benchmark loop: edit, evaluate, undo, one case at a time.

Each case's result is appended to `cases.jsonl` as soon as it is known, so an interrupted run
resumes where it stopped; `summary.json` is written at the end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

from kedit.api import edit as edit_model
from kedit.eval.runner import evaluate, summarize
from kedit.lm import LM
from kedit.requests import EditRequest

CASES_FILE = "cases.jsonl"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"


def _done_cases(path: Path) -> list[dict[str, Any]]:
    """Complete records of an earlier run; a line cut off by an interruption is dropped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def run_independent(
    lm: LM,
    requests: list[EditRequest],
    method: str,
    out_dir: str | Path,
    hparams: dict[str, Any] | None = None,
    protocols: tuple[str, ...] = ("teacher_forced",),
    data: str = "",
    on_case: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every request as its own edit on the unedited model; returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "mode": "independent",
        "model": lm.name,
        "model_fingerprint": lm.fingerprint,
        "method": method,
        "hparams": hparams or {},
        "protocols": list(protocols),
        "data": data,
        "n_cases": len(requests),
    }
    config_path = out / CONFIG_FILE
    if config_path.exists():
        earlier = json.loads(config_path.read_text())
        if earlier != config:
            changed = sorted(k for k in config if earlier.get(k) != config[k])
            raise ValueError(
                f"out: {str(out)!r} holds a run with other settings ({', '.join(changed)}); "
                "use another folder or delete it"
            )
    config_path.write_text(json.dumps(config, indent=2))
    cases_path = out / CASES_FILE
    records = _done_cases(cases_path)
    done = {r["case_id"] for r in records}
    with cases_path.open("a") as sink:
        for index, request in enumerate(requests):
            case_id = request.case_id if request.case_id is not None else str(index)
            if case_id in done:
                continue
            started = time.perf_counter()
            edit = edit_model(lm, request, method=method, hparams=hparams)
            edited = time.perf_counter()
            result = evaluate(lm, request, edit=edit, protocols=protocols)
            evaluated = time.perf_counter()
            edit.undo()
            record = {
                "case_id": case_id,
                "result": result,
                "edit_seconds": edited - started,
                "eval_seconds": evaluated - edited,
            }
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            records.append(record)
            if on_case is not None:
                on_case(record)
    summary = {
        **config,
        "metrics": summarize([r["result"] for r in records]),
        "edit_seconds_median": median(r["edit_seconds"] for r in records) if records else None,
        "eval_seconds_median": median(r["eval_seconds"] for r in records) if records else None,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary
