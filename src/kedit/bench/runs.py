"""Benchmark loops: independent, batch and sequential editing, streamed to JSONL.

- `independent`: every case is edited on the unedited model, evaluated, and undone.
- `batch`: cases are edited `batch_size` at a time, evaluated, and undone.
- `sequential`: edits (of `batch_size` cases each) pile up on one model. With the `after-each`
  schedule each edit's cases are evaluated right after it is applied; with `after-all` every
  case is evaluated after the last edit. Every `checkpoint_every` edits all cases edited so far
  are re-evaluated and a held-out perplexity is measured, to see collapse as it happens.

The unedited model's scores ("pre") do not depend on any edit, so they are measured once for
all cases, in batches. With `exclude_edited_locality` (the default), a locality probe that names
a subject edited on the model at evaluation time (its batch's, or in a sequential run every
edit's so far) is left out and counted: each case records `locality_excluded`, the summary
their sum. Each case's result is appended to `cases.jsonl` as soon as it is known;
an interrupted run resumes where it stopped (a sequential run re-applies its saved edits).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from statistics import median
from typing import Any

from kedit.api import apply as apply_edit
from kedit.api import edit as edit_model
from kedit.api import edit_each
from kedit.eval.protocols import PROTOCOLS, SAMPLING, pooled_perplexity, text_nll
from kedit.eval.runner import Raw, assemble, measure, summarize, with_contexts
from kedit.lm import LM
from kedit.methods.registry import HyperParams, get_method, resolve_hparams
from kedit.pitfalls.metrics import summarize as summarize_pitfalls
from kedit.requests import EditRequest
from kedit.session import Session

CASES_FILE = "cases.jsonl"
CHECKPOINTS_FILE = "checkpoints.jsonl"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
EDITS_DIR = "edits"
STATE_FILE = "session-state.pt"
MODES = ("independent", "batch", "sequential")
SCHEDULES = ("after-each", "after-all")
# How the user named the model and the data: recorded, not compared when a run resumes or
# shards merge, since `model_fingerprint` and `data_digest` identify them whatever the path.
NAMES = ("model", "data")


def scoring_protocols(protocols: list[str]) -> list[str]:
    """The protocols that score probes; `sampling` (fluency) is measured beside them."""
    return [p for p in protocols if p != SAMPLING]


@dataclass
class BenchConfig:
    """Everything that determines a benchmark run; stored in `config.json` beside the results."""

    method: str
    mode: str = "independent"
    batch_size: int = 1
    schedule: str = "after-each"
    checkpoint_every: int = 0
    protocols: list[str] = field(default_factory=lambda: ["teacher_forced"])
    hparams: dict[str, Any] = field(default_factory=dict)
    contexts: int = 3
    seed: int = 0
    data: str = ""
    shard: str = "0/1"
    exclude_edited_locality: bool = True

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {self.batch_size!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ValueError(
                f"checkpoint_every: expected an integer >= 0, got {self.checkpoint_every!r}"
            )
        if self.mode == "sequential" and self.shard != "0/1":
            raise ValueError(
                f"shard: a sequential run's edits build on each other, so it cannot be split "
                f"into shards; got {self.shard!r}"
            )
        if self.mode == "independent" and self.batch_size != 1:
            raise ValueError("batch_size: independent mode edits one case at a time; use batch")
        if not self.protocols or any(p not in (*PROTOCOLS, SAMPLING) for p in self.protocols):
            raise ValueError(
                f"protocols: expected some of {', '.join(PROTOCOLS)} and optionally {SAMPLING} "
                f"(fluency of sampled text), got {self.protocols!r}"
            )
        if not scoring_protocols(self.protocols):
            raise ValueError(
                f"protocols: {SAMPLING} only adds fluency; give one of {', '.join(PROTOCOLS)} too"
            )
        if not isinstance(self.contexts, int) or self.contexts < 0:
            raise ValueError(f"contexts: expected an integer >= 0, got {self.contexts!r}")
        self.shard_index()

    def shard_index(self) -> tuple[int, int]:
        """`(i, n)` of a shard written "i/n": this run takes cases i, i+n, i+2n, ..."""
        index, _, count = self.shard.partition("/")
        try:
            i, n = int(index), int(count)
        except ValueError:
            i, n = -1, 0
        if not 0 <= i < n:
            raise ValueError(f"shard: expected 'i/n' with 0 <= i < n, got {self.shard!r}")
        return i, n

    def seeded_hparams(self) -> dict[str, Any]:
        """The user's hparams, with the context-prefix seed following the run's seed."""
        fields = get_method(self.method).hparams.field_help()
        if "prefix_seed" in fields and "prefix_seed" not in self.hparams:
            return {**self.hparams, "prefix_seed": self.seed}
        return dict(self.hparams)


def select_cases(requests: list[EditRequest], config: BenchConfig) -> list[EditRequest]:
    """This shard's cases; a sequential run takes them in an order shuffled by the seed."""
    index, count = config.shard_index()
    cases = [
        r if r.case_id is not None else replace(r, case_id=str(i)) for i, r in enumerate(requests)
    ][index::count]
    if config.mode == "sequential":
        random.Random(config.seed).shuffle(cases)
    return cases


def data_digest(requests: list[EditRequest]) -> str:
    """sha256 of the cases as loaded: the same data whatever path or folder it was read from."""
    return records_digest([r.to_dict() for r in requests])


def records_digest(records: list[dict[str, Any]]) -> str:
    """sha256 of records (cases as dicts), independent of key order."""
    text = json.dumps(records, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _complete_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file up to the first line an interruption cut off."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete records of an earlier run; a line cut off by an interruption is dropped."""
    records = _complete_records(path)
    if path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def recorded_case_ids(out_dir: str | Path) -> set[str]:
    """Ids of the cases a run into `out_dir` has recorded so far (the folder is left as it is)."""
    return {record["case_id"] for record in _complete_records(Path(out_dir) / CASES_FILE)}


def _pick(raw: Raw, indices: list[int]) -> Raw:
    return {protocol: [per_request[i] for i in indices] for protocol, per_request in raw.items()}


class _Run:
    """State of one benchmark run: its folder, the pre scores, and the records so far."""

    def __init__(self, lm: LM, requests: list[EditRequest], config: BenchConfig, out: Path):
        self.lm, self.config, self.out = lm, config, out
        self.requests = with_contexts(requests, config.contexts, config.seed)
        self.ids = [r.case_id for r in requests]
        self.cases = _read_jsonl(out / CASES_FILE)
        self.checkpoints = _read_jsonl(out / CHECKPOINTS_FILE)
        self.done = {r["case_id"] for r in self.cases}
        self._pre: Raw | None = None

    def measure(self, indices: list[int]) -> Raw:
        c = self.config
        requests = [self.requests[i] for i in indices]
        protocols, fluency = scoring_protocols(c.protocols), SAMPLING in c.protocols
        return measure(self.lm, requests, protocols, fluency=fluency, seed=c.seed)

    def pre(self, indices: list[int]) -> Raw:
        if self._pre is None:
            self._pre = self.measure(list(range(len(self.requests))))
        return _pick(self._pre, indices)

    def edited(self, indices: list[int]) -> set[str] | None:
        """Subjects of the cases `indices` edited on the model, for `assemble` (None: keep every
        locality probe)."""
        if not self.config.exclude_edited_locality:
            return None
        return {self.requests[i].subject for i in indices}

    def record(
        self, indices: list[int], post: Raw, extra: dict[str, Any], edited: list[int]
    ) -> list[dict[str, Any]]:
        """Write the results of cases `indices` measured (`post`) with cases `edited` edited."""
        results = assemble(
            [self.requests[i] for i in indices], self.pre(indices), post, self.edited(edited)
        )
        records = []
        with (self.out / CASES_FILE).open("a") as sink:
            for index, result in zip(indices, results, strict=True):
                record = {"case_id": self.ids[index], "result": result, **extra}
                sink.write(json.dumps(record) + "\n")
                records.append(record)
        self.cases.extend(records)
        self.done.update(r["case_id"] for r in records)
        return records


def run_bench(
    lm: LM,
    requests: list[EditRequest],
    config: BenchConfig,
    out_dir: str | Path,
    on_case: Callable[[dict[str, Any]], None] | None = None,
    heldout_texts: list[str] | None = None,
) -> dict[str, Any]:
    """Run a benchmark into `out_dir` (resuming what is there); returns the summary.

    Everything is checked (method, hyper-parameters, settings) before anything is written, so
    a run refused for bad input leaves `out_dir` as it was."""
    config.validate()
    if not requests:
        raise ValueError("requests: the benchmark has no cases")
    spec = get_method(config.method)
    params = resolve_hparams(spec.name, lm, config.seeded_hparams())
    if config.batch_size > 1 and not spec.batchable:
        raise ValueError(
            f"batch_size: method {spec.name!r} edits one request at a time; use batch size 1"
        )
    out = Path(out_dir)
    header = open_run(lm, config, params, len(requests), data_digest(requests), out)
    run = _Run(lm, select_cases(requests, config), config, out)
    notify = on_case or (lambda record: None)
    for record in run.cases:
        notify(record)
    chunks = [
        list(range(start, min(start + config.batch_size, len(run.requests))))
        for start in range(0, len(run.requests), config.batch_size)
    ]
    if config.mode == "sequential":
        _sequential(run, chunks, notify, heldout_texts)
    else:
        _independent(run, chunks, notify)
    metrics = summarize([r["result"] for r in run.cases])
    return write_summary(out, header, run.cases, metrics, run.checkpoints)


def open_run(
    lm: LM, config: BenchConfig, params: HyperParams, n_cases: int, digest: str, out: Path
) -> dict[str, Any]:
    """Write the run's `config.json` into `out` and return it; a folder that holds a run with
    other settings is refused, so a resumed run goes on under the settings it started with."""
    out.mkdir(parents=True, exist_ok=True)
    header = {"model": lm.name, "model_fingerprint": lm.fingerprint, "n_cases": n_cases}
    header.update(asdict(config))
    header["data_digest"] = digest
    # What the method ran with (its defaults for this model, then the overrides), as JSON reads
    # it back: a resume under other defaults (a new kedit version, an edited YAML) is refused.
    header["effective_hparams"] = json.loads(json.dumps(params.to_dict(), default=str))
    config_path = out / CONFIG_FILE
    if config_path.exists():
        earlier = json.loads(config_path.read_text())
        changed = sorted(k for k in header if k not in NAMES and earlier.get(k) != header[k])
        if changed:
            raise ValueError(
                f"out: {str(out)!r} holds a run with other settings ({', '.join(changed)}); "
                "use another folder or delete it"
            )
    config_path.write_text(json.dumps(header, indent=2))
    return header


def write_summary(
    out: Path,
    header: dict[str, Any],
    cases: list[dict],
    metrics: dict[str, Any],
    checkpoints: list[dict] | None = None,
) -> dict[str, Any]:
    """Write `summary.json`: the header, the `metrics` over `cases` and the median edit and
    evaluation times per case."""
    summary = {
        **header,
        "metrics": metrics,
        "edit_seconds_median": median(r["edit_seconds"] for r in cases),
        "eval_seconds_median": median(r["eval_seconds"] for r in cases),
    }
    if checkpoints:
        summary["checkpoints"] = checkpoints
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def _independent(run: _Run, chunks: list[list[int]], notify: Callable) -> None:
    config = run.config
    if config.batch_size == 1:
        _one_by_one(run, notify)
        return
    for chunk in chunks:
        todo = [i for i in chunk if run.ids[i] not in run.done]
        if not todo:
            continue
        run.pre(todo)
        started = time.perf_counter()
        requests = [run.requests[i] for i in todo]
        edit = edit_model(run.lm, requests, method=config.method, hparams=config.seeded_hparams())
        edited = time.perf_counter()
        try:
            post = run.measure(todo)
        finally:
            edit.undo()
        timing = {"edit_seconds": edited - started, "eval_seconds": time.perf_counter() - edited}
        for record in run.record(todo, post, timing, edited=todo):
            notify(record)


def _one_by_one(run: _Run, notify: Callable, group: int = 32) -> None:
    """Independent single-request edits, computed `group` at a time by `kedit.edit_each` (each
    on the unedited model); a case's edit time is its share of its group's."""
    config = run.config
    todo = [i for i in range(len(run.requests)) if run.ids[i] not in run.done]
    run.pre([])  # the pre scores are those of the unedited model: measure them before editing
    for start in range(0, len(todo), group):
        indices = todo[start : start + group]
        started = time.perf_counter()
        requests = [run.requests[i] for i in indices]
        edits = list(edit_each(run.lm, requests, config.method, config.seeded_hparams(), group))
        share = (time.perf_counter() - started) / len(indices)
        for index, edit in zip(indices, edits, strict=True):
            started = time.perf_counter()
            edit.apply()
            edited = time.perf_counter()
            try:
                post = run.measure([index])
            finally:
                edit.undo()
            timing = {
                "edit_seconds": share + edited - started,
                "eval_seconds": time.perf_counter() - edited,
            }
            for record in run.record([index], post, timing, edited=[index]):
                notify(record)


def _sequential(
    run: _Run, chunks: list[list[int]], notify: Callable, heldout: list[str] | None
) -> None:
    config = run.config
    edits_dir = run.out / EDITS_DIR
    edits_dir.mkdir(exist_ok=True)
    session = Session(run.lm, config.method, config.seeded_hparams())
    heldout = heldout or []
    base_scores = text_nll(run.lm, heldout) if heldout else []
    applied: list[int] = []
    edit_seconds: dict[int, float] = {}
    run.pre([])  # the pre scores are those of the unedited model: measure them before editing
    state_path = edits_dir / STATE_FILE
    resumed = session.load_state(state_path) if state_path.exists() else 0
    try:
        for step, chunk in enumerate(chunks):
            path = edits_dir / f"{step:06d}.kedit"
            started = time.perf_counter()
            if step < resumed:
                session.adopt(apply_edit(run.lm, path))
            else:
                session.edit([run.requests[i] for i in chunk]).save(path)
                session.save_state(state_path)
            edited = time.perf_counter()
            applied.extend(chunk)
            edit_seconds.update((i, edited - started) for i in chunk)
            if config.schedule == "after-each" and any(run.ids[i] not in run.done for i in chunk):
                post = run.measure(chunk)
                timing = {
                    "edit_seconds": edited - started,
                    "eval_seconds": time.perf_counter() - edited,
                    "edits_applied": step + 1,
                }
                for record in run.record(chunk, post, timing, edited=applied):
                    notify(record)
            at_checkpoint = config.checkpoint_every and (step + 1) % config.checkpoint_every == 0
            if at_checkpoint and len(run.checkpoints) < (step + 1) // config.checkpoint_every:
                _checkpoint(run, applied, step + 1, heldout, base_scores)
        if config.schedule == "after-all":
            todo = [i for i in applied if run.ids[i] not in run.done]
            if todo:
                started = time.perf_counter()
                post = run.measure(todo)
                seconds = (time.perf_counter() - started) / len(todo)
                for index in todo:
                    timing = {"edit_seconds": edit_seconds[index], "eval_seconds": seconds}
                    picked = _pick(post, [todo.index(index)])
                    for record in run.record([index], picked, timing, edited=applied):
                        notify(record)
    finally:
        session.undo()


def _checkpoint(
    run: _Run,
    applied: list[int],
    edits: int,
    heldout: list[str],
    base_scores: list[tuple[float, int]],
) -> None:
    """Re-evaluate every case applied so far and the held-out perplexity, on all held-out
    texts and on those that name none of the edited subjects ("untouched"): a text that
    states a fact an edit changed gets less likely when the edit works, which is not
    collapse."""
    cases = [run.requests[i] for i in applied]
    results = assemble(cases, run.pre(applied), run.measure(applied), run.edited(applied))
    point: dict[str, Any] = {"edits": edits, "cases": len(applied), **summarize(results)}
    if heldout:
        scores = text_nll(run.lm, heldout)
        subjects = {request.subject for request in cases}
        untouched = [i for i, text in enumerate(heldout) if not any(s in text for s in subjects)]
        point["heldout_perplexity"] = pooled_perplexity(scores)
        point["heldout_perplexity_unedited"] = pooled_perplexity(base_scores)
        point["heldout_untouched_texts"] = len(untouched)
        if untouched:
            point["heldout_perplexity_untouched"] = pooled_perplexity(
                [scores[i] for i in untouched]
            )
            point["heldout_perplexity_untouched_unedited"] = pooled_perplexity(
                [base_scores[i] for i in untouched]
            )
    with (run.out / CHECKPOINTS_FILE).open("a") as sink:
        sink.write(json.dumps(point) + "\n")
    run.checkpoints.append(point)


def merge_runs(folders: list[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Combine the shards of one benchmark (same settings but the shard) into `out_dir`."""
    if not folders:
        raise ValueError("folders: expected the output folders of the shards to merge")
    configs, shards, records = [], [], {}
    for folder in map(Path, folders):
        path = folder / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(folder)!r} is not a benchmark run folder (one that holds {CONFIG_FILE}: "
                "with `kedit bench --out O` that is O/<model>/<method>/<dataset>/<mode>/seed-<k>)"
            )
        config = json.loads(path.read_text())
        if config.get("mode") == "sequential":
            raise ValueError(
                f"{str(folder)!r} is a sequential run: its edits build on each other, so it is "
                "never split into shards and there is nothing to merge"
            )
        shards.append(config.pop("shard"))
        configs.append(config)
        for record in _read_jsonl(folder / CASES_FILE):
            records.setdefault(record["case_id"], record)
    differing = sorted(
        {
            k
            for config in configs
            for k in config
            if k not in NAMES and config.get(k) != configs[0].get(k)
        }
    )
    if differing:
        raise ValueError(f"folders: the shards were run with different {', '.join(differing)}")
    count = BenchConfig(method="", shard=shards[0]).shard_index()[1]
    expected = [f"{index}/{count}" for index in range(count)]
    if sorted(shards) != sorted(expected):
        raise ValueError(
            f"folders: expected the shards {', '.join(expected)} once each, got {', '.join(shards)}"
        )
    if len(records) != configs[0]["n_cases"]:
        raise ValueError(
            f"folders: the shards hold {len(records)} of the {configs[0]['n_cases']} cases; "
            "finish them first (re-running a shard resumes it)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = {**configs[0], "shard": "merged", "merged_from": [str(f) for f in folders]}
    (out / CONFIG_FILE).write_text(json.dumps(header, indent=2))
    cases = list(records.values())
    (out / CASES_FILE).write_text("".join(json.dumps(r) + "\n" for r in cases))
    if cases and "metrics" in cases[0]:  # a pitfalls run's records (kedit.bench.pitfalls)
        return write_summary(out, header, cases, summarize_pitfalls(cases))
    return write_summary(out, header, cases, summarize([r["result"] for r in cases]))
