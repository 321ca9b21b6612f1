"""Edits are values: what a method changed, undone bit-exactly, saved and re-applied."""

from __future__ import annotations

import hashlib
import json
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from kedit.lm import LM, require_lm
from kedit.requests import EditRequest

# Version 2 added the digest of the tensors and metadata (`DIGEST_KEY`); version 1 had none.
FORMAT_VERSION = 2
DIGEST_KEY = "kedit_sha256"


class ModelMismatchError(ValueError):
    """An edit file was made on another model than the one it is applied to."""


class UndoOrderError(RuntimeError):
    """An edit was to be undone while later applied edits change some of the same parameters."""


@dataclass
class WeightDelta:
    """An additive change to one parameter, in the parameter's own shape.

    Dense (`dense`), or low-rank as `left @ right` (a rank-one ROME edit stores two vectors).
    """

    param: str
    dense: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.dense is None) == (self.left is None or self.right is None):
            raise ValueError(f"WeightDelta({self.param}): give either dense or left and right")

    @classmethod
    def low_rank(cls, param: str, left: torch.Tensor, right: torch.Tensor) -> WeightDelta:
        left = left.unsqueeze(1) if left.dim() == 1 else left
        right = right.unsqueeze(0) if right.dim() == 1 else right
        return cls(param, left=left.detach().float().cpu(), right=right.detach().float().cpu())

    @classmethod
    def from_dense(cls, param: str, dense: torch.Tensor) -> WeightDelta:
        return cls(param, dense=dense.detach().float().cpu())

    @property
    def rank(self) -> int | None:
        return None if self.left is None else self.left.shape[1]

    def tensor(self, device: torch.device | None = None) -> torch.Tensor:
        if self.dense is not None:
            return self.dense.to(device)
        return self.left.to(device) @ self.right.to(device)

    def is_finite(self) -> bool:
        parts = [self.dense] if self.dense is not None else [self.left, self.right]
        return all(all_finite(p) for p in parts)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite. A finite sum says so at once (an inf or NaN entry makes
    the sum inf or NaN, and a sum is several times faster than `isfinite`); only a sum that is
    not finite needs the entry-by-entry check (it may have overflowed)."""
    return bool(tensor.sum().isfinite()) or bool(torch.isfinite(tensor).all())


def _parameter(model: nn.Module, name: str) -> nn.Parameter:
    try:
        return model.get_parameter(name)
    except AttributeError as exc:
        raise ValueError(f"param: the model has no parameter {name!r}") from exc


# A parameter's content version: its in-place version counter, except after a bit-exact
# restore (an undo, the end of `compute_in_sequence`, a failed apply), where it is the version
# whose content came back. Work cached on the weights (`weights_version`) then stays valid
# across an edit and its undo, while any other in-place write makes a version never seen before.
_RESTORED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> {version: content version}
_SAVED_AT: WeakIdKeyDictionary = WeakIdKeyDictionary()  # saved copy -> its content version


def content_version(param: torch.Tensor) -> int:
    """The version of a parameter's content (see `_RESTORED`)."""
    version = param._version
    return _RESTORED.get(param, {}).get(version, version)


def weights_version(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """The storage address and content version of every parameter: while it stays the same,
    so do the weights (an in-place write changes the version, a tensor put in a parameter's
    place the address)."""
    return tuple((p.data_ptr(), content_version(p)) for p in model.parameters())


def _save(param: torch.Tensor) -> torch.Tensor:
    """A copy of a parameter's value that `_restore` can put back."""
    saved = param.detach().clone()
    _SAVED_AT[saved] = content_version(param)
    return saved


def _restore(param: torch.Tensor, saved: torch.Tensor) -> None:
    """Write a copy made by `_save` back into the parameter, bit-exactly."""
    param.copy_(saved)
    if saved in _SAVED_AT:
        _RESTORED.setdefault(param, {})[param._version] = _SAVED_AT[saved]


def apply_deltas(model: nn.Module, deltas: list[WeightDelta]) -> dict[str, torch.Tensor]:
    """Add the deltas to the model; return the original values of the touched parameters.

    A non-finite delta or result leaves the model exactly as it was and raises.
    """
    originals: dict[str, torch.Tensor] = {}
    for delta in deltas:
        if not delta.is_finite():
            raise FloatingPointError(f"edit produced a non-finite update for {delta.param}")
    try:
        with torch.no_grad():
            for delta in deltas:
                param = _parameter(model, delta.param)
                update = delta.tensor(param.device)
                if update.shape != param.shape:
                    raise ValueError(
                        f"delta for {delta.param} has shape {tuple(update.shape)}, the parameter "
                        f"{tuple(param.shape)}"
                    )
                if delta.param not in originals:
                    originals[delta.param] = _save(param)
                new = (param.float() + update).to(param.dtype)
                if not all_finite(new):
                    raise FloatingPointError(f"edit made {delta.param} non-finite")
                param.copy_(new)
    except BaseException:
        with torch.no_grad():
            for name, value in originals.items():
                _restore(_parameter(model, name), value)
        raise
    return originals


def compute_in_sequence(
    model: nn.Module, items: Iterable[Any], compute: Callable[[Any], list[WeightDelta]]
) -> list[WeightDelta]:
    """Compute deltas item by item, each on the model as the earlier ones left it.

    Every item's deltas but the last's are applied before the next item is computed (nothing
    reads the last's: the caller applies them all); at the end (and on an exception) the model
    is restored bit-exactly. Applying the returned deltas in order reproduces the final weights
    exactly.
    """
    items = list(items)
    deltas: list[WeightDelta] = []
    originals: dict[str, torch.Tensor] = {}
    try:
        for index, item in enumerate(items):
            step = compute(item)
            deltas.extend(step)
            if index + 1 < len(items):
                for name, value in apply_deltas(model, step).items():
                    originals.setdefault(name, value)
    finally:
        with torch.no_grad():
            for name, value in originals.items():
                _restore(_parameter(model, name), value)
    return deltas


@dataclass(eq=False)
class _Applied:
    """An applied edit's entry on its model's stack: the values it overwrote and its name.

    It holds neither the model nor the `Edit`, so an edit dropped by its caller while applied
    keeps its place (and still blocks undoing the edits under it).
    """

    name: str
    originals: dict[str, torch.Tensor]
    on_stack: bool = True


# The edits applied to each model, oldest first; an entry goes when its model does.
_STACKS: weakref.WeakKeyDictionary[nn.Module, list[_Applied]] = weakref.WeakKeyDictionary()


def _undo_order(stack: list[_Applied], index: int) -> list[_Applied]:
    """The entries to undo, top first, so that `stack[index]` can be undone: it and every later
    entry that changes a parameter of one already taken (each must go before the one under it)."""
    taken = [stack[index]]
    params = set(stack[index].originals)
    for entry in stack[index + 1 :]:
        if params & entry.originals.keys():
            taken.append(entry)
            params |= entry.originals.keys()
    return taken[::-1]


class Edit:
    """What one call to `kedit.edit` changed in a model.

    `undo()` restores the original weights bit-exactly; `save(path)` writes a single
    `.kedit` file (safetensors with JSON metadata and a digest) that `kedit.apply` re-applies
    to a fresh load of the same model. The edits applied to one model form a stack: an edit
    under later applied edits that change the same parameters is undone only with them.
    """

    def __init__(
        self,
        lm: LM,
        method: str,
        hparams: dict[str, Any],
        requests: list[EditRequest],
        deltas: list[WeightDelta],
        info: dict[str, Any] | None = None,
    ) -> None:
        self.lm = lm
        self.method = method
        self.hparams = hparams
        self.requests = requests
        self.deltas = deltas
        self.info = info or {}
        self.fingerprint = lm.fingerprint
        self._entry: _Applied | None = None

    @property
    def applied(self) -> bool:
        return self._entry is not None and self._entry.on_stack

    @property
    def name(self) -> str:
        """The method and the (first) fact, as errors name the edit."""
        if not self.requests:
            return f"{self.method} edit"
        first = self.requests[0]
        more = f" and {len(self.requests) - 1} more" if len(self.requests) > 1 else ""
        return f"{self.method} edit of {first.subject!r} -> {first.target_new!r}{more}"

    def apply(self) -> Edit:
        """Write the deltas into the model, on top of its stack of applied edits (done by
        `kedit.edit`; again after `undo`)."""
        if self.applied:
            raise RuntimeError("this edit is already applied")
        entry = _Applied(self.name, apply_deltas(self.lm.model, self.deltas))
        _STACKS.setdefault(self.lm.model, []).append(entry)
        self._entry = entry
        return self

    def undo(self, cascade: bool = False) -> None:
        """Restore every touched parameter to its value before the edit, bit-exactly.

        Edits applied later that change some of the same parameters (and, in turn, the later
        edits of theirs) must be undone first: this raises `UndoOrderError` naming them, or, with
        `cascade=True`, undoes them first, the latest first. Later edits of other parameters
        stay applied.
        """
        if not self.applied:
            raise RuntimeError("this edit is not applied; nothing to undo")
        stack = _STACKS[self.lm.model]
        index = next(i for i in range(len(stack) - 1, -1, -1) if stack[i] is self._entry)
        order = _undo_order(stack, index)
        if len(order) > 1 and not cascade:
            later = "; ".join(
                f"#{stack.index(entry) + 1} {entry.name} ({', '.join(sorted(entry.originals))})"
                for entry in order[-2::-1]
            )
            raise UndoOrderError(
                f"cannot undo {self.name} (#{index + 1} of {len(stack)} edits applied to "
                f"{self.lm.name!r}): edits applied later change the same parameters: {later}. "
                "Undo those first, or call undo(cascade=True) to undo them too"
            )
        with torch.no_grad():
            for entry in order:
                for name, value in entry.originals.items():
                    _restore(_parameter(self.lm.model, name), value)
                entry.on_stack = False
        stack[:] = [entry for entry in stack if entry.on_stack]

    def __enter__(self) -> Edit:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.applied:
            self.undo()

    def __repr__(self) -> str:
        state = "applied" if self.applied else "undone"
        return f"Edit({self.method}, {len(self.requests)} request(s), {state})"

    def metadata(self) -> dict[str, Any]:
        return {
            "format": "kedit-edit",
            "version": FORMAT_VERSION,
            "method": self.method,
            "hparams": self.hparams,
            "model": self.lm.name,
            "model_fingerprint": self.fingerprint,
            "requests": [r.to_dict() for r in self.requests],
            "deltas": [{"param": d.param, "rank": d.rank} for d in self.deltas],
            "info": self.info,
        }

    def save(self, path: str | Path) -> Path:
        """Write the edit to one safetensors file with its metadata as JSON."""
        path = writable_edit_path(path)
        tensors: dict[str, torch.Tensor] = {}
        storages: set[int] = set()

        def own(tensor: torch.Tensor) -> torch.Tensor:
            # safetensors refuses tensors that share memory (KN's deltas share one direction).
            tensor = tensor.contiguous()
            if tensor.untyped_storage().data_ptr() in storages:
                tensor = tensor.clone()
            storages.add(tensor.untyped_storage().data_ptr())
            return tensor

        for index, delta in enumerate(self.deltas):
            if delta.dense is not None:
                tensors[f"{index}.dense"] = own(delta.dense)
            else:
                tensors[f"{index}.left"] = own(delta.left)
                tensors[f"{index}.right"] = own(delta.right)
        meta = json.dumps(self.metadata(), default=str)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"kedit": meta, DIGEST_KEY: _digest(tensors, meta)})
        return path


def _digest(tensors: dict[str, torch.Tensor], meta: str) -> str:
    """sha256 over the metadata text and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(meta.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def writable_edit_path(path: str | Path, name: str = "path") -> Path:
    """`path` as a Path, refused (naming the option or argument `name`) if it is a folder."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name}: {str(path)!r} is a folder; give a file name (e.g. fact.kedit)")
    return path


def read_edit_file(path: str | Path) -> tuple[dict[str, Any], list[WeightDelta]]:
    """The metadata and deltas stored in a `.kedit` file."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"path: {str(path)!r} is a folder; give a .kedit file written by Edit.save"
        )
    if not path.is_file():
        raise FileNotFoundError(f"edit file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:
        raise ValueError(f"{str(path)!r} is not a kedit edit file: {exc}") from exc
    raw = stored.get("kedit")
    if raw is None:
        raise ValueError(f"{str(path)!r} is a safetensors file without kedit metadata")
    if DIGEST_KEY in stored and stored[DIGEST_KEY] != _digest(tensors, raw):
        raise ValueError(
            f"{str(path)!r} is damaged: its tensors or metadata do not match the sha256 digest "
            "stored when it was saved; save the edit again"
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is damaged: its metadata is not JSON ({exc})") from exc
    _check_version(path, meta.get("version"), DIGEST_KEY in stored)
    deltas = []
    for index, info in enumerate(meta["deltas"]):
        if f"{index}.dense" in tensors:
            deltas.append(WeightDelta(info["param"], dense=tensors[f"{index}.dense"]))
        else:
            deltas.append(
                WeightDelta(
                    info["param"], left=tensors[f"{index}.left"], right=tensors[f"{index}.right"]
                )
            )
    return meta, deltas


def _check_version(path: Path, version: Any, has_digest: bool) -> None:
    """Refuse files of an unknown version, and files of version 2 or later without a digest
    (it was removed or damaged). Version 1 files predate the digest: they are accepted with a
    warning, since refusing them would strand saved edits and the sequential runs that resume
    from them, and the file's other checks (model fingerprint, shapes) still hold."""
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r}: edit file version {version!r}; this kedit reads versions "
            f"1..{FORMAT_VERSION}"
        )
    if has_digest:
        return
    if version >= 2:
        raise ValueError(
            f"{str(path)!r} is damaged: version {version} edit files carry a digest of their "
            "tensors and this one has none"
        )
    warnings.warn(
        f"{str(path)!r} was saved without a digest of its tensors (edit file version 1), so "
        "damage to it cannot be detected; apply it and save it again to add one",
        stacklevel=3,
    )


def apply_edit_file(lm: LM, path: str | Path) -> Edit:
    """Re-apply a saved edit to `lm`; refuses a model with another fingerprint."""
    require_lm(lm)
    meta, deltas = read_edit_file(path)
    if meta["model_fingerprint"] != lm.fingerprint:
        raise ModelMismatchError(
            f"{str(path)!r} was made on model {meta['model']!r} (fingerprint "
            f"{meta['model_fingerprint']}), not on {lm.name!r} (fingerprint {lm.fingerprint})"
        )
    requests = [EditRequest.from_dict(r) for r in meta["requests"]]
    edit = Edit(lm, meta["method"], meta["hparams"], requests, deltas, meta.get("info"))
    return edit.apply()
