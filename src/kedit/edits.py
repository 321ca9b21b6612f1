"""Edits are values: what a method changed, undone bit-exactly, saved and re-applied.

An `Edit` is a list of changes of four kinds:

- `WeightDelta`: an additive change of one parameter, dense or low-rank (ROME, MEMIT, FT, ...).
- `AdaptorDelta`: an `Adaptor` attached to one of the model's modules, its host, whose output
  it adapts (a LoRA adaptor); undone by detaching it, which leaves the host as it was.
- `MemoryDelta`: entries added to, or rows changed in, a memory adaptor attached to a host
  (GRACE's codebook, WISE's side memory and router, MELO's blocks and keys). The first edit of a
  memory attaches it; later edits grow it, so it grows over a session and shrinks back, edit by
  edit, as they are undone.
- `ContextDelta`: a transform of every prompt the evaluation scores (the text in-context
  editing puts before it); the model's modules are not touched.

Adaptors are attached, not wrapped around their host: the host keeps its name, its parameters
and their names (a weight edit of the same layer still finds them), the adaptor's tensors show
in the model's state_dict under `<host>.kedit_<n>.` while it is attached, and detaching it
leaves the model's own state_dict as before, bit for bit, with no wrapper left.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from kedit.lm import LM, require_lm
from kedit.requests import EditRequest

# Version 2 added the digest of the tensors and metadata (`DIGEST_KEY`); version 1 had none.
# Version 3 added adaptor, memory and context changes beside weight deltas.
FORMAT_VERSION = 3
DIGEST_KEY = "kedit_sha256"
ADAPTOR_PREFIX = "kedit_"  # attached adaptors are the host's submodules kedit_0, kedit_1, ...

Restore = Callable[[], None]


class ModelMismatchError(ValueError):
    """An edit file was made on another model than the one it is applied to."""


class UndoOrderError(RuntimeError):
    """An edit was to be undone while later applied edits change some of the same parameters."""


def _json_config(config: dict[str, Any]) -> dict[str, Any]:
    """`config` as JSON reads it back, so that a saved and re-read config compares equal."""
    try:
        return json.loads(json.dumps(config))
    except TypeError as exc:
        raise ValueError(f"config: expected JSON values only, got {config!r}") from exc


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite. A finite sum says so at once (an inf or NaN entry makes
    the sum inf or NaN, and a sum is several times faster than `isfinite`); only a sum that is
    not finite needs the entry-by-entry check (it may have overflowed)."""
    return bool(tensor.sum().isfinite()) or bool(torch.isfinite(tensor).all())


def _finite(tensors: Iterable[torch.Tensor]) -> bool:
    return all(all_finite(t) for t in tensors if t.is_floating_point())


def _module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise ValueError(f"path: the model has no module {path!r}") from exc


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return torch.device("cpu") if tensor is None else tensor.device


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

    @property
    def targets(self) -> frozenset[str]:
        return frozenset({self.param})

    def tensor(self, device: torch.device | None = None) -> torch.Tensor:
        if self.dense is not None:
            return self.dense.to(device)
        return self.left.to(device) @ self.right.to(device)

    def is_finite(self) -> bool:
        return _finite([self.dense] if self.dense is not None else [self.left, self.right])

    def write(self, model: nn.Module, saved: set[str] | None = None) -> Restore:
        """Add the delta to the parameter; returns what restores its value before. With `saved`
        (the parameters an earlier write of the same batch saved, restored after this one) the
        parameter is saved only once per batch."""
        param = _parameter(model, self.param)
        update = self.tensor(param.device)
        if update.shape != param.shape:
            raise ValueError(
                f"delta for {self.param} has shape {tuple(update.shape)}, the parameter "
                f"{tuple(param.shape)}"
            )
        new = (param.float() + update).to(param.dtype)
        if not all_finite(new):
            raise FloatingPointError(f"edit made {self.param} non-finite")
        if saved is not None and self.param in saved:
            param.copy_(new)
            return lambda: None
        original = _save(param)
        if saved is not None:
            saved.add(self.param)
        param.copy_(new)
        return lambda: _restore(param, original)

    def saved(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """This change's metadata and tensors, as an edit file stores them."""
        meta = {"kind": "weight", "param": self.param, "rank": self.rank}
        if self.dense is not None:
            return meta, {"dense": self.dense}
        return meta, {"left": self.left, "right": self.right}

    @classmethod
    def from_saved(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> WeightDelta:
        return cls(meta["param"], tensors.get("dense"), tensors.get("left"), tensors.get("right"))


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


def weights_version(model: nn.Module) -> tuple:
    """The storage address and content version of every parameter, and the serial number and
    buffers of every attached adaptor: while it stays the same, so does the model's function
    (an in-place write changes a version, a tensor put in a parameter's place the address, and
    an adaptor changes the function without touching a parameter)."""
    params = tuple((p.data_ptr(), content_version(p)) for p in model.parameters())
    adaptors = tuple(
        (
            module.serial,
            tuple(
                (name, b.data_ptr(), b._version, tuple(b.shape))
                for name, b in module._buffers.items()
            ),
        )
        for module in model.modules()
        if isinstance(module, Adaptor)
    )
    return params + adaptors


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


_ADAPTOR_SERIALS = itertools.count()


class Adaptor(nn.Module):
    """A module attached to one of the model's modules (its host): a forward hook passes the
    host's input and output to `adapt`, whose result becomes the host's output.

    Its state is its buffers (the model's state_dict shows them while it is attached; the
    model's `parameters()` never do, so methods that freeze or train the model's parameters do
    not touch them) and its `config` (JSON values). A subclass names its `kind`, is registered
    with `register_adaptor` so that saved edits can rebuild it, and is made empty from its
    config; edits then load or grow its buffers.
    """

    kind: ClassVar[str] = ""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = _json_config(config)
        self.serial = next(_ADAPTOR_SERIALS)  # tells adaptors apart in `weights_version`
        self.silent = False

    def adapt(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The host's new output, from its input and its output (both `[..., width]`)."""
        raise NotImplementedError

    def rows(self, name: str) -> int:
        """The rows (entries along dim 0) of buffer `name`; 0 while it does not exist."""
        buffer = self._buffers.get(name)
        return 0 if buffer is None else buffer.shape[0]

    def set_buffer(self, name: str, value: torch.Tensor | None) -> None:
        """Set (or, with None, remove) buffer `name`."""
        if value is None:
            self._buffers.pop(name, None)
        else:
            self.register_buffer(name, value)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self.silent:
            return output
        inputs = args[0] if args else kwargs["hidden_states"]
        if isinstance(output, tuple):
            return (self.adapt(inputs, output[0]), *output[1:])
        return self.adapt(inputs, output)


_ADAPTORS: dict[str, type[Adaptor]] = {}


def register_adaptor(cls: type[Adaptor]) -> type[Adaptor]:
    """Make an `Adaptor` class known by its `kind`, so that saved edits can rebuild it."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__}: an adaptor class needs a kind")
    _ADAPTORS[cls.kind] = cls
    return cls


def _adaptor_class(kind: str) -> type[Adaptor]:
    if kind not in _ADAPTORS:
        raise ValueError(
            f"adaptor: unknown adaptor kind {kind!r} (known: {', '.join(sorted(_ADAPTORS))}); "
            "import the method that defines it (kedit.apply loads kedit's own methods)"
        )
    return _ADAPTORS[kind]


def attached(host: nn.Module) -> list[Adaptor]:
    """The adaptors attached to a module, in the order they act."""
    return [m for name, m in host.named_children() if name.startswith(ADAPTOR_PREFIX)]


def _attach(host: nn.Module, adaptor: Adaptor) -> Restore:
    """Attach `adaptor` to `host` after those already there; returns its detach."""
    name = f"{ADAPTOR_PREFIX}{len(attached(host))}"
    host.add_module(name, adaptor.to(_device_of(host)))
    handle = host.register_forward_hook(adaptor._hook, with_kwargs=True)

    def detach() -> None:
        handle.remove()
        del host._modules[name]

    return detach


@contextmanager
def silenced(adaptor: Adaptor | None) -> Iterator[None]:
    """Inside the block the adaptor (if any) leaves its host's output as it is: a memory method
    trains the memory's next state in its place."""
    if adaptor is None:
        yield
        return
    adaptor.silent = True
    try:
        yield
    finally:
        adaptor.silent = False


def find_memory(host: nn.Module, kind: str) -> Adaptor | None:
    """The memory adaptor of `kind` attached to `host`, if any (a host has one of each kind)."""
    return next((a for a in attached(host) if a.kind == kind), None)


@dataclass
class AdaptorDelta:
    """An adaptor attached to the module at `path`, built from its kind, config and tensors;
    undone by detaching it. Two adaptor edits of one module act one after the other."""

    path: str
    adaptor: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        self.config = _json_config(self.config)
        if not self.tensors:
            raise ValueError(f"AdaptorDelta({self.path}): an adaptor needs tensors")

    @property
    def targets(self) -> frozenset[str]:
        return frozenset({self.path})

    def is_finite(self) -> bool:
        return _finite(self.tensors.values())

    def write(self, model: nn.Module) -> Restore:
        host = _module(model, self.path)
        adaptor = _adaptor_class(self.adaptor)(self.config)
        for name, value in self.tensors.items():
            adaptor.set_buffer(name, value.clone())
        return _attach(host, adaptor)

    def saved(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        meta = {"kind": "adaptor", "path": self.path, "adaptor": self.adaptor}
        return {**meta, "config": self.config}, dict(self.tensors)

    @classmethod
    def from_saved(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> AdaptorDelta:
        return cls(meta["path"], meta["adaptor"], meta["config"], tensors)


@dataclass
class MemoryDelta:
    """Rows appended to, and rows overwritten in, the buffers of the memory adaptor of kind
    `adaptor` attached to the module at `path`; the memory is attached first where none is.

    `rows_before` holds, for every buffer the change touches, the rows it had when the change
    was computed: applying it elsewhere (a fresh model, a resumed run) checks them, so that
    a memory's edits are applied in the order they were made. `changed` maps a buffer to the
    indices (along dim 0) of the rows it overwrites and their new values.
    """

    path: str
    adaptor: str
    config: dict[str, Any]
    rows_before: dict[str, int]
    appended: dict[str, torch.Tensor] = field(default_factory=dict)
    changed: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.config = _json_config(self.config)
        if not self.appended and not self.changed:
            raise ValueError(f"MemoryDelta({self.path}): it changes nothing")
        missing = (self.appended.keys() | self.changed.keys()) - self.rows_before.keys()
        if missing:
            raise ValueError(f"MemoryDelta({self.path}): rows_before lacks {sorted(missing)}")

    @classmethod
    def to_reach(
        cls,
        path: str,
        adaptor: str,
        config: dict[str, Any],
        memory: Adaptor | None,
        after: dict[str, torch.Tensor],
    ) -> MemoryDelta:
        """The change that takes `memory` (attached at `path`, or None) to the buffers `after`,
        whose rows extend or overwrite its own: the rows that differ, overwritten, and the new
        rows, appended."""
        rows_before = {name: 0 if memory is None else memory.rows(name) for name in after}
        changed, appended = {}, {}
        for name, rows in after.items():
            old = rows_before[name]
            if old:
                before = getattr(memory, name).cpu()
                differ = torch.nonzero((before != rows[:old]).reshape(old, -1).any(1)).flatten()
                if len(differ):
                    changed[name] = (differ, rows[differ])
            if len(rows) > old:
                appended[name] = rows[old:]
        return cls(path, adaptor, config, rows_before, appended, changed)

    @property
    def targets(self) -> frozenset[str]:
        return frozenset({self.path})

    def is_finite(self) -> bool:
        return _finite([*self.appended.values(), *(v for _, v in self.changed.values())])

    def _check(self, memory: Adaptor | None) -> None:
        """Refuse a memory in another state than the one the change was computed on, and rows
        that do not fit it, before anything is written."""
        where = f"memory edit of {self.path!r}"
        if memory is not None and memory.config != self.config:
            raise ValueError(
                f"{where}: the attached {self.adaptor} memory has config {memory.config}, the "
                f"edit was made for {self.config}"
            )
        now = {name: 0 if memory is None else memory.rows(name) for name in self.rows_before}
        if now != self.rows_before:
            found = "none is attached" if memory is None else f"the attached one has {now}"
            raise ValueError(
                f"{where} builds on a {self.adaptor} memory with rows {self.rows_before}, and "
                f"{found}: apply the earlier edits of that memory first, in their order"
            )
        buffers = {} if memory is None else memory._buffers
        for name, rows in self.appended.items():
            if name in buffers and rows.shape[1:] != buffers[name].shape[1:]:
                raise ValueError(f"{where}: rows of {name} shaped {tuple(rows.shape)}")
        for name, (index, values) in self.changed.items():
            fits = name in buffers and len(index) == len(values)
            if not fits or values.shape[1:] != buffers[name].shape[1:]:
                raise ValueError(f"{where}: {name} has no rows {index.tolist()} to overwrite")
            if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < now[name]:
                raise ValueError(f"{where}: {name} has no rows {index.tolist()} to overwrite")

    def write(self, model: nn.Module) -> Restore:
        host = _module(model, self.path)
        memory = find_memory(host, self.adaptor)
        self._check(memory)
        detach: Restore | None = None
        if memory is None:
            memory = _adaptor_class(self.adaptor)(self.config)
            detach = _attach(host, memory)
        device = _device_of(host)
        overwritten = {}
        for name, (index, values) in self.changed.items():
            buffer = memory._buffers[name]
            overwritten[name] = (index.to(device), buffer[index.to(device)].clone())
            buffer[index.to(device)] = values.to(device, buffer.dtype)
        for name, rows in self.appended.items():
            buffer = memory._buffers.get(name)
            rows = rows.to(device)
            memory.set_buffer(name, rows.clone() if buffer is None else torch.cat([buffer, rows]))

        def restore() -> None:
            for name in self.appended:
                kept = self.rows_before[name]
                memory.set_buffer(name, memory._buffers[name][:kept].clone() if kept else None)
            for name, (index, old) in overwritten.items():
                memory._buffers[name][index] = old
            if detach is not None:
                detach()

        return restore

    def saved(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        meta = {
            "kind": "memory",
            "path": self.path,
            "adaptor": self.adaptor,
            "config": self.config,
            "rows_before": self.rows_before,
            "appended": sorted(self.appended),
            "changed": sorted(self.changed),
        }
        tensors = {f"appended.{name}": rows for name, rows in self.appended.items()}
        for name, (index, values) in self.changed.items():
            tensors[f"changed.{name}.index"] = index
            tensors[f"changed.{name}.values"] = values
        return meta, tensors

    @classmethod
    def from_saved(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> MemoryDelta:
        return cls(
            meta["path"],
            meta["adaptor"],
            meta["config"],
            meta["rows_before"],
            {name: tensors[f"appended.{name}"] for name in meta["appended"]},
            {
                name: (tensors[f"changed.{name}.index"], tensors[f"changed.{name}.values"])
                for name in meta["changed"]
            },
        )


PromptTransform = Callable[[str], str]
ContextFactory = Callable[[dict[str, Any], dict[str, torch.Tensor]], PromptTransform]
_CONTEXT_KINDS: dict[str, ContextFactory] = {}
# The prompt transforms of the context changes written to each model, oldest first.
_CONTEXTS: weakref.WeakKeyDictionary[nn.Module, list[PromptTransform]] = weakref.WeakKeyDictionary()


def register_context(kind: str, factory: ContextFactory) -> None:
    """Make a context kind known: `factory(config, tensors)` gives its prompt transform."""
    _CONTEXT_KINDS[kind] = factory


register_context("prefix", lambda config, tensors: lambda prompt: config["text"] + prompt)


def in_context(model: nn.Module, prompt: str) -> str:
    """`prompt` as the model is to read it: with the context of every context change written
    to it (in-context edits) applied, the oldest first; unchanged where there is none."""
    for transform in _CONTEXTS.get(model, ()):
        prompt = transform(prompt)
    return prompt


@dataclass
class ContextDelta:
    """A context that the evaluation protocols put around every prompt they score, built by
    the registered context kind `context` from `config` and `tensors` ("prefix": the text
    `config["text"]` before the prompt). The model's modules are not touched."""

    context: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.config = _json_config(self.config)

    @property
    def targets(self) -> frozenset[str]:
        return frozenset()

    def is_finite(self) -> bool:
        return _finite(self.tensors.values())

    def write(self, model: nn.Module) -> Restore:
        if self.context not in _CONTEXT_KINDS:
            raise ValueError(
                f"context: unknown context kind {self.context!r} (known: "
                f"{', '.join(sorted(_CONTEXT_KINDS))})"
            )
        transform = _CONTEXT_KINDS[self.context](self.config, self.tensors)
        contexts = _CONTEXTS.setdefault(model, [])
        contexts.append(transform)
        return lambda: contexts.remove(transform)

    def saved(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"kind": "context", "context": self.context, "config": self.config}, self.tensors

    @classmethod
    def from_saved(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ContextDelta:
        return cls(meta["context"], meta["config"], tensors)


Change = WeightDelta | AdaptorDelta | MemoryDelta | ContextDelta
DELTA_KINDS: dict[str, type] = {
    "weight": WeightDelta,
    "adaptor": AdaptorDelta,
    "memory": MemoryDelta,
    "context": ContextDelta,
}


def _describe(change: Change) -> str:
    if isinstance(change, ContextDelta):
        return f"the {change.context} context"
    return ", ".join(sorted(target or "the model itself" for target in change.targets))


@dataclass(eq=False)
class Written:
    """What `apply_deltas` wrote: the module paths and parameters it touched, and how to put
    back what was there (`undo`, bit-exact)."""

    targets: frozenset[str]
    restores: list[Restore] = field(default_factory=list)

    def undo(self) -> None:
        with torch.no_grad():
            for restore in reversed(self.restores):
                restore()
        self.restores.clear()


def apply_deltas(model: nn.Module, deltas: list[Change]) -> Written:
    """Write the changes into the model; return what undoes them.

    A non-finite change or result, or any failure, leaves the model exactly as it was and raises.
    """
    for delta in deltas:
        if not delta.is_finite():
            raise FloatingPointError(f"edit produced a non-finite update for {_describe(delta)}")
    written = Written(frozenset(t for d in deltas for t in d.targets))
    saved: set[str] = set()  # each parameter is saved once, by its first delta
    try:
        with torch.no_grad():
            for delta in deltas:
                if isinstance(delta, WeightDelta):
                    written.restores.append(delta.write(model, saved))
                else:
                    written.restores.append(delta.write(model))
    except BaseException:
        written.undo()
        raise
    return written


def compute_in_sequence(
    model: nn.Module, items: Iterable[Any], compute: Callable[[Any], list[Change]]
) -> list[Change]:
    """Compute changes item by item, each on the model as the earlier ones left it.

    Every item's changes but the last's are written before the next item is computed (nothing
    reads the last's: the caller applies them all); at the end (and on an exception) the model
    is restored bit-exactly. Applying the returned changes in order reproduces the final model
    exactly.
    """
    items = list(items)
    deltas: list[Change] = []
    written: list[Written] = []
    try:
        for index, item in enumerate(items):
            step = compute(item)
            deltas.extend(step)
            if index + 1 < len(items):
                written.append(apply_deltas(model, step))
    finally:
        for done in reversed(written):
            done.undo()
    return deltas


def overlap(first: Iterable[str], second: Iterable[str]) -> bool:
    """Whether two sets of parameter names and module paths share something: a name, or a
    module and a parameter or module inside it."""
    return any(
        a == b or a.startswith(b + ".") or b.startswith(a + ".") for a in first for b in second
    )


@dataclass(eq=False)
class _Applied:
    """An applied edit's entry on its model's stack: what undoes it and its name.

    It holds neither the model nor the `Edit`, so an edit dropped by its caller while applied
    keeps its place (and still blocks undoing the edits under it).
    """

    name: str
    written: Written
    on_stack: bool = True


# The edits applied to each model, oldest first; an entry goes when its model does.
_STACKS: weakref.WeakKeyDictionary[nn.Module, list[_Applied]] = weakref.WeakKeyDictionary()


def _undo_order(stack: list[_Applied], index: int) -> list[_Applied]:
    """The entries to undo, top first, so that `stack[index]` can be undone: it and every later
    entry that changes something of one already taken (each must go before the one under it)."""
    taken = [stack[index]]
    touched = set(stack[index].written.targets)
    for entry in stack[index + 1 :]:
        if overlap(touched, entry.written.targets):
            taken.append(entry)
            touched |= entry.written.targets
    return taken[::-1]


class Edit:
    """What one call to `kedit.edit` changed in a model.

    `deltas` are its changes (weight deltas, adaptors, memory entries, contexts). `undo()`
    restores the model bit-exactly; `save(path)` writes a single `.kedit` file (safetensors with
    JSON metadata and a digest) that `kedit.apply` re-applies to a fresh load of the same model.
    The edits applied to one model form a stack: an edit under later applied edits that change
    the same parameters or modules is undone only with them.
    """

    def __init__(
        self,
        lm: LM,
        method: str,
        hparams: dict[str, Any],
        requests: list[EditRequest],
        deltas: list[Change],
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
        """Write the changes into the model, on top of its stack of applied edits (done by
        `kedit.edit`; again after `undo`)."""
        if self.applied:
            raise RuntimeError("this edit is already applied")
        entry = _Applied(self.name, apply_deltas(self.lm.model, self.deltas))
        _STACKS.setdefault(self.lm.model, []).append(entry)
        self._entry = entry
        return self

    def undo(self, cascade: bool = False) -> None:
        """Restore everything the edit changed to its state before the edit, bit-exactly.

        Edits applied later that change some of the same parameters or modules (and, in turn,
        the later edits of theirs) must be undone first: this raises `UndoOrderError` naming
        them, or, with `cascade=True`, undoes them first, the latest first. Later edits of other
        parameters stay applied.
        """
        if not self.applied:
            raise RuntimeError("this edit is not applied; nothing to undo")
        stack = _STACKS[self.lm.model]
        index = next(i for i in range(len(stack) - 1, -1, -1) if stack[i] is self._entry)
        order = _undo_order(stack, index)
        if len(order) > 1 and not cascade:
            later = "; ".join(
                f"#{stack.index(entry) + 1} {entry.name} "
                f"({', '.join(sorted(entry.written.targets))})"
                for entry in order[-2::-1]
            )
            raise UndoOrderError(
                f"cannot undo {self.name} (#{index + 1} of {len(stack)} edits applied to "
                f"{self.lm.name!r}): edits applied later change the same parameters: {later}. "
                "Undo those first, or call undo(cascade=True) to undo them too"
            )
        for entry in order:
            entry.written.undo()
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
            "deltas": [delta.saved()[0] for delta in self.deltas],
            "info": self.info,
        }

    def save(self, path: str | Path) -> Path:
        """Write the edit to one safetensors file with its metadata as JSON."""
        path = writable_edit_path(path)
        tensors: dict[str, torch.Tensor] = {}
        storages: set[int] = set()

        def own(tensor: torch.Tensor) -> torch.Tensor:
            # safetensors refuses tensors that share memory (KN's deltas share one direction).
            tensor = tensor.detach().cpu().contiguous()
            if tensor.untyped_storage().data_ptr() in storages:
                tensor = tensor.clone()
            storages.add(tensor.untyped_storage().data_ptr())
            return tensor

        for index, delta in enumerate(self.deltas):
            for name, tensor in delta.saved()[1].items():
                tensors[f"{index}.{name}"] = own(tensor)
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


def read_edit_file(path: str | Path) -> tuple[dict[str, Any], list[Change]]:
    """The metadata and changes stored in a `.kedit` file."""
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
        prefix = f"{index}."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        kind = info.get("kind", "weight")  # files before version 3 hold weight deltas only
        if kind not in DELTA_KINDS:
            raise ValueError(f"{str(path)!r}: change {index} is of unknown kind {kind!r}")
        deltas.append(DELTA_KINDS[kind].from_saved(info, own))
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
