"""The top-level functions: load a model, edit it, evaluate an edit, apply a saved edit."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from kedit.data.unlearn_items import as_items, item_pairs
from kedit.edits import Edit, apply_edit_file, compute_in_sequence
from kedit.lm import LM, load, require_lm
from kedit.methods._editor_train import split_by_subject, tinyworld_edits, train_any
from kedit.methods.registry import (
    HyperParams,
    MethodSpec,
    MethodState,
    check_targets,
    get_method,
    list_methods,
    resolve_hparams,
)
from kedit.requests import EditRequest, as_requests
from kedit.stats import recording_use
from kedit.unlearn.registry import (
    UnlearnHyperParams,
    get_unlearning_method,
    resolve_unlearning_hparams,
)

__all__ = ["apply", "edit", "edit_each", "list_methods", "load", "train_editor", "unlearn"]


def edit(
    lm: LM,
    requests: EditRequest | Iterable[EditRequest],
    method: str = "rome",
    hparams: dict[str, Any] | HyperParams | None = None,
    batch_size: int | None = None,
    state: MethodState | None = None,
    editor: Any = None,
) -> Edit:
    """Edit `lm` in place so that each request's prompt continues with its `target_new`.

    `hparams` overrides the method's defaults for this model (EasyEdit key names are accepted).
    Batchable methods edit up to `batch_size` requests per update (all at once by default);
    the others edit one request after another. Stateful methods (AlphaEdit) read and update
    `state`, what they remember of earlier edits (a fresh one when None; `kedit.Session` holds
    one for you). Returns an applied `Edit`; if the method fails, the model and `state` are left
    exactly as they were. The edit's `info["statistics"]` records the second-moment statistics
    it used (layer, corpus, documents, tokens, length cap, dtype, cache file). Methods that edit
    with a trained editor (MEND, MALMEN, SERAC) take it as `editor` (what `train_editor`
    returned, or its folder; the hyper-parameter `editor` says the same).
    """
    require_lm(lm)
    items = as_requests(requests)
    spec = get_method(method)
    check_targets(spec, items)
    if editor is not None:
        hparams = with_editor(spec, hparams, editor)
    params = resolve_hparams(spec.name, lm, hparams)
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if batch_size is not None and not spec.batchable and batch_size > 1:
        raise ValueError(f"batch_size: method {spec.name!r} edits one request at a time")
    if spec.state is None:
        if state is not None:
            raise ValueError(f"state: method {spec.name!r} keeps no state between edits; pass None")
    elif state is None:
        state = spec.state()
    elif not isinstance(state, spec.state):
        raise ValueError(
            f"state: method {spec.name!r} expects a state of type {spec.state.__name__}, "
            f"got {type(state).__name__}"
        )
    size = batch_size or len(items)
    chunks = [items[start : start + size] for start in range(0, len(items), size)]
    infos: list[dict[str, Any]] = []

    def compute(chunk: list[EditRequest]) -> list:
        result = spec.fn(lm, chunk, params) if state is None else spec.fn(lm, chunk, params, state)
        infos.append(result.info)
        return result.deltas

    with (
        recording_use() as statistics,
        nullcontext() if state is None else state.rollback_on_error(),
    ):
        deltas = compute_in_sequence(lm.model, chunks, compute)
        info = infos[0] if len(infos) == 1 else {"batches": infos}
        info = {**info, "statistics": statistics} if statistics else info
        return Edit(lm, spec.name, params.to_dict(), items, deltas, info).apply()


def with_editor(spec: MethodSpec, hparams: Any, editor: Any) -> Any:
    """`hparams` with `editor` (a trained editor with a `.path`, or a folder) as its editor."""
    if "editor" not in spec.hparams.field_help():
        raise ValueError(f"editor: method {spec.name!r} edits without a trained editor")
    folder = getattr(editor, "path", editor)
    if not isinstance(folder, (str, Path)):
        raise ValueError(f"editor: expected a trained editor or its folder, got {editor!r}")
    if isinstance(hparams, HyperParams):
        return dataclasses.replace(hparams, editor=str(folder))
    return {**(hparams or {}), "editor": str(folder)}


def train_editor(
    lm: LM,
    method: str = "mend",
    train: Iterable[EditRequest] | None = None,
    val: Iterable[EditRequest] | None = None,
    out: str | Path | None = None,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> Any:
    """Train the editor of `method` (mend, malmen, serac) for `lm` on the edit requests `train`
    (None: tinyworld's training edits, `kedit.zoo.edit_split`), validated on `val` (None: the
    requests of the last tenth of `train`'s subjects, which are then left out of training).

    The editor is written to the folder `out` (default: the editor cache, where `kedit.edit`
    finds it for this model) with checkpoints on the way: a call with the same folder, model,
    data and settings resumes an interrupted training, or returns the finished editor. Pass the
    result to `kedit.edit(..., editor=...)`. `settings` override the training's defaults
    (`kedit train --help`).
    """
    require_lm(lm)
    train = tinyworld_edits() if train is None else list(train)
    if val is None:
        train, val = split_by_subject(train)
    return train_any(lm, get_method(method).name, list(train), list(val), out, settings, progress)


def edit_each(
    lm: LM,
    requests: EditRequest | Iterable[EditRequest],
    method: str = "rome",
    hparams: dict[str, Any] | HyperParams | None = None,
    group: int = 32,
) -> Iterator[Edit]:
    """For each request, the edit that `kedit.edit(lm, request, ...)` would make on `lm` as it is
    now, yielded NOT applied: apply it, use it, undo it before taking the next.

    This is what an independent-editing benchmark does, and methods that can (ROME, r-ROME)
    compute `group` requests' edits in one batch, which is several times faster than one by
    one. Taking the next edit while the last one is still applied raises an error, since the
    next group would be computed on an edited model.
    """
    require_lm(lm)
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"group: expected a positive integer, got {group!r}")
    items = as_requests(requests)
    spec = get_method(method)
    check_targets(spec, items)
    if spec.state is not None:
        raise ValueError(f"method: {spec.name!r} keeps state between edits; use kedit.edit")
    params = resolve_hparams(spec.name, lm, hparams)
    last: Edit | None = None
    results: list = []
    for index, request in enumerate(items):
        if last is not None and last.applied:
            raise RuntimeError("edit_each: undo the last edit before taking the next one")
        if index % group == 0:
            chunk = items[index : index + group]
            with recording_use() as statistics:
                if spec.each is not None:
                    results = spec.each(lm, chunk, params)
                else:
                    results = [spec.fn(lm, [one], params) for one in chunk]
        result = results[index % group]
        info = {**result.info, "statistics": statistics} if statistics else result.info
        last = Edit(lm, spec.name, params.to_dict(), [request], result.deltas, info)
        yield last


def apply(lm: LM, path: str | Path) -> Edit:
    """Re-apply an edit saved with `Edit.save` to `lm` (same model, checked by fingerprint)."""
    list_methods()  # registers the methods' adaptor kinds, which rebuild saved adaptors
    return apply_edit_file(lm, path)


def unlearn(
    lm: LM,
    forget: Iterable[Any],
    retain: Iterable[Any] | None = None,
    method: str = "grad_diff",
    hparams: dict[str, Any] | UnlearnHyperParams | None = None,
    progress: bool = False,
) -> Edit:
    """Make `lm` forget the `forget` items (prompt, answer pairs or `UnlearnItem`s), keeping the
    `retain` items where the method uses them; returns the applied `Edit`, a weight delta that
    undoes bit-exactly, saves and re-applies like any edit. `hparams` overrides the method's
    defaults for this model (its dataclass, then the model table). If the method fails the
    model is left exactly as it was. `info` records the method's curve (forget and retain token
    accuracy along the steps), the trained weights and, for MemFlex, the localisation.
    """
    require_lm(lm)
    spec = get_unlearning_method(method)
    params = resolve_unlearning_hparams(spec, lm, hparams)
    forget_items = as_items(forget, "forget")
    retain_items = [] if retain is None else as_items(retain, "retain")
    if spec.needs_retain and not retain_items:
        raise ValueError(f"retain: method {spec.name!r} trains on a retain set; give one")
    started, cpu_started = time.perf_counter(), time.process_time()
    result = spec.fn(lm, forget_items, retain_items, params, progress)
    timing = {  # the whole method, MemFlex's localisation included
        "seconds": round(time.perf_counter() - started, 3),
        "cpu_seconds": round(time.process_time() - cpu_started, 3),
    }
    digest = hashlib.sha256(json.dumps(item_pairs(forget_items)).encode()).hexdigest()[:16]
    sizes = {"forget_items": len(forget_items), "retain_items": len(retain_items)}
    info = {"unlearning": {**sizes, "forget_digest": digest}, **result.info, **timing}
    return Edit(lm, spec.name, params.to_dict(), [], result.deltas, info).apply()
