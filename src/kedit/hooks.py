"""Capture and replace module inputs and outputs; stop a forward pass early.

All hooks are context managers that remove themselves on exit, also on an exception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

PER_LAYER_CONFIG = ("layer_types",)
"""Config attributes that hold one entry per block, in block order."""


class StopForward(Exception):
    """Raised by a hook to end a forward pass after the module that is needed last."""


def _first_tensor(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class _TokenGrid:
    """The (batch, seq) shape of the model's current forward pass.

    Some families run a module on tokens flattened to (batch * seq, width) (OPT's MLP); the
    hooks hand such activations over as (batch, seq, width) all the same, so that callers index
    every family's activations alike.
    """

    def __init__(self) -> None:
        self.shape: tuple[int, int] | None = None

    def see(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1]):
            if isinstance(value, torch.Tensor) and value.dim() >= 2:
                self.shape = (value.shape[0], value.shape[1])
                return

    def unflatten(self, value: torch.Tensor) -> torch.Tensor:
        shape = self.shape
        if shape is not None and value.dim() == 2 and value.shape[0] == shape[0] * shape[1]:
            return value.reshape(*shape, value.shape[1])
        return value

    def apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], value: torch.Tensor
    ) -> torch.Tensor:
        """`fn` on the (batch, seq, ...) form of `value`, flattened back where `value` was."""
        tokens = self.unflatten(value)
        result = fn(tokens)
        return result if tokens is value else result.reshape(value.shape)


@contextmanager
def _token_grid(model: nn.Module) -> Iterator[_TokenGrid]:
    """A grid that sees each forward pass of `model`, or of its base model (the transformer
    without the LM head) called on its own."""
    grid = _TokenGrid()
    entries = {id(m): m for m in (model, getattr(model, "base_model", model))}
    handles = [m.register_forward_pre_hook(grid.see, with_kwargs=True) for m in entries.values()]
    try:
        yield grid
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture(
    model: nn.Module, names: Iterable[str], what: str = "output", detach: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the input (first positional argument) or output of each named module.

    The dict is filled during the forward pass inside the `with` block; token activations are
    shaped (batch, seq, ...) whatever the family does inside.
    """
    if what not in ("input", "output"):
        raise ValueError(f"what={what!r}: expected 'input' or 'output'")
    store: dict[str, torch.Tensor] = {}

    def keep(name: str, value: torch.Tensor) -> None:
        value = grid.unflatten(value)
        store[name] = value.detach() if detach else value

    def make_hook(name: str) -> Callable:
        if what == "input":
            return lambda module, args, kwargs: keep(name, _first_input(args, kwargs))
        return lambda module, args, output: keep(name, _first_tensor(output))

    handles = []
    with _token_grid(model) as grid:
        try:
            for name in names:
                module = model.get_submodule(name)
                if what == "input":
                    handles.append(
                        module.register_forward_pre_hook(make_hook(name), with_kwargs=True)
                    )
                else:
                    handles.append(module.register_forward_hook(make_hook(name)))
            yield store
        finally:
            for handle in handles:
                handle.remove()


@contextmanager
def replace_output(
    model: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Replace a module's output (the first element where it returns a tuple) by `fn(output)`.

    `fn` sees token activations shaped (batch, seq, ...), as `capture` records them.
    """

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (grid.apply(fn, output[0]), *output[1:])
        return grid.apply(fn, output)

    with _token_grid(model) as grid:
        handle = model.get_submodule(name).register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


@contextmanager
def replace_input(
    model: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Replace a module's first input (positional, or the `hidden_states` keyword).

    `fn` sees token activations shaped (batch, seq, ...), as `capture` records them.
    """

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (grid.apply(fn, args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = grid.apply(fn, kwargs["hidden_states"])
        return args, kwargs

    with _token_grid(model) as grid:
        handle = model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


@contextmanager
def stop_after(model: nn.Module, name: str, before: bool = False) -> Iterator[None]:
    """End the forward pass once module `name` has run (with `before`: as it is about to run,
    its input there, its own work and its hooks' not done); the `with` block swallows that stop.

    Combine with `capture` to collect activations without computing the layers above.
    """

    stop = StopForward(name)

    def hook(*_: Any) -> None:
        raise stop

    module = model.get_submodule(name)
    handle = (
        module.register_forward_pre_hook(hook) if before else module.register_forward_hook(hook)
    )
    try:
        yield
    except StopForward as exc:
        if exc is not stop:  # another stop_after's stop ends that one's block, not this one
            raise
    finally:
        handle.remove()


@contextmanager
def start_at_block(
    model: nn.Module,
    blocks_path: str,
    layer: int,
    hidden: torch.Tensor | Callable[[], torch.Tensor],
) -> Iterator[None]:
    """Run forward passes from block `layer` on, feeding it `hidden` as its input.

    `hidden` may be a function called at each forward pass for the input of that pass, so that
    a loop whose batch changes from pass to pass enters this once.

    The blocks below `layer` are left out of the model for the duration, so work that an edit
    at `layer` cannot change (the residual stream entering it) is computed once, by the caller,
    instead of at every optimisation step. Embeddings still run; their output is discarded.
    """

    def feed(_: torch.Tensor) -> torch.Tensor:
        return hidden() if callable(hidden) else hidden

    if layer == 0:  # nothing to leave out
        with replace_input(model, f"{blocks_path}.0", feed):
            yield
        return
    parent_path, _, attr = blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    blocks = getattr(parent, attr)
    # Per-layer config lists are indexed by position in the block loop (Qwen2's
    # `config.layer_types[i]` picks each block's attention mask): cut them like the blocks.
    # The loop reads its own module's config (a multimodal model's text config sits there).
    configs = {
        id(config): config
        for config in (getattr(model, "config", None), getattr(parent, "config", None))
        if config is not None
    }
    saved = [
        (config, key, getattr(config, key))
        for config in configs.values()
        for key in PER_LAYER_CONFIG
        if isinstance(getattr(config, key, None), list) and len(getattr(config, key)) == len(blocks)
    ]
    try:
        setattr(parent, attr, nn.ModuleList(list(blocks)[layer:]))
        for config, key, value in saved:
            setattr(config, key, value[layer:])
        with replace_input(model, f"{blocks_path}.0", feed):
            yield
    finally:
        setattr(parent, attr, blocks)
        for config, key, value in saved:
            setattr(config, key, value)


@contextmanager
def hooks(*managers: Any) -> Iterator[list[Any]]:
    """Enter several hook context managers at once; yields what each one yields."""
    with ExitStack() as stack:
        yield [stack.enter_context(manager) for manager in managers]
