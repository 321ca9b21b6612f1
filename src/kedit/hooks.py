"""Capture and replace module inputs and outputs; stop a forward pass early.

All hooks are context managers that remove themselves on exit, also on an exception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass after the module that is needed last."""


def _first_tensor(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def capture(
    model: nn.Module, names: Iterable[str], what: str = "output", detach: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the input (first positional argument) or output of each named module.

    The dict is filled during the forward pass inside the `with` block.
    """
    if what not in ("input", "output"):
        raise ValueError(f"what={what!r}: expected 'input' or 'output'")
    store: dict[str, torch.Tensor] = {}

    def keep(name: str, value: torch.Tensor) -> None:
        store[name] = value.detach() if detach else value

    def make_hook(name: str) -> Callable:
        if what == "input":
            return lambda module, args, kwargs: keep(name, _first_input(args, kwargs))
        return lambda module, args, output: keep(name, _first_tensor(output))

    handles = []
    try:
        for name in names:
            module = model.get_submodule(name)
            if what == "input":
                handles.append(module.register_forward_pre_hook(make_hook(name), with_kwargs=True))
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
    """Replace a module's output (the first element where it returns a tuple) by `fn(output)`."""

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def replace_input(
    model: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Replace a module's first input (positional, or the `hidden_states` keyword)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
        return args, kwargs

    handle = model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def stop_after(model: nn.Module, name: str) -> Iterator[None]:
    """End the forward pass once module `name` has run; the `with` block swallows the stop.

    Combine with `capture` to collect activations without computing the layers above.
    """

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        raise StopForward

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        yield
    except StopForward:
        pass
    finally:
        handle.remove()


@contextmanager
def start_at_block(
    model: nn.Module, blocks_path: str, layer: int, hidden: torch.Tensor
) -> Iterator[None]:
    """Run forward passes from block `layer` on, feeding it `hidden` as its input.

    The blocks below `layer` are left out of the model for the duration, so work that an edit
    at `layer` cannot change (the residual stream entering it) is computed once, by the caller,
    instead of at every optimisation step. Embeddings still run; their output is discarded.
    """
    parent_path, _, attr = blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    blocks = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList(list(blocks)[layer:]))
    try:
        with replace_input(model, f"{blocks_path}.0", lambda _: hidden):
            yield
    finally:
        setattr(parent, attr, blocks)


@contextmanager
def hooks(*managers: Any) -> Iterator[list[Any]]:
    """Enter several hook context managers at once; yields what each one yields."""
    with ExitStack() as stack:
        yield [stack.enter_context(manager) for manager in managers]
