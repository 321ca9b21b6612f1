"""What the adaptor and memory methods share: the modules they sit at (`module_path`, by the
Layout's role) and training towards the edit targets (LoRA, AdaLoRA, GRACE's values, WISE's
side memory, MELO's blocks). Also the steps of other methods that train or take gradients:
freezing the model's other parameters (`frozen`), float32 master copies of trained weights
(`mixed_precision_step`: FT, unlearning) and gradients at module outputs (`output_gradients`:
MEND, MALMEN, UltraEdit).

The training objective is FT-M's (`kedit.methods._rows`): the mean over requests of each one's
mean teacher-forced NLL of its target tokens after its prompt. The model's own parameters are
frozen for the duration; only the given tensors train. The blocks below the first trained layer
run once, since nothing trained can change their output. All requests form one batch (the
lifelong methods edit one request or one batch of a stream at a time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from kedit.edits import Adaptor, Change, compute_in_sequence, silenced
from kedit.hooks import capture, hooks, replace_output, start_at_block, stop_after
from kedit.lm import LM
from kedit.methods._rows import (
    TargetBatch,
    TargetRow,
    batch_rows,
    forward_target_nll,
    request_rows,
)
from kedit.methods.registry import HyperParams, MethodResult
from kedit.requests import EditRequest

# The Layout roles an adaptor or memory can sit at, and the Layout's path of each.
ROLES = {"mlp_in": "mlp_in_name", "mlp_out": "mlp_out_name", "attn_out": "attn_out_name"}


def check_site(layers: list[int], module: str, holder: str) -> None:
    """Refuse a memory or adaptor site other than one layer's module of a known role."""
    if len(layers) != 1:
        raise ValueError(f"layers: {holder} sits at one layer, got {layers!r}")
    if module not in ROLES:
        raise ValueError(f"module: expected one of {', '.join(ROLES)}, got {module!r}")


def check_positive(hparams: object, integers: tuple[str, ...], numbers: tuple[str, ...]) -> None:
    """Refuse hyper-parameters `integers` below 1 and `numbers` not above 0, by name."""
    for name in integers:
        if getattr(hparams, name) < 1:
            raise ValueError(f"{name}: expected a positive integer, got {getattr(hparams, name)!r}")
    for name in numbers:
        if not getattr(hparams, name) > 0:
            raise ValueError(f"{name}: expected a positive number, got {getattr(hparams, name)!r}")


def module_path(lm: LM, role: str, layer: int) -> str:
    """The path of the module playing `role` (one of ROLES) in block `layer`."""
    if role not in ROLES:
        raise ValueError(f"module: expected one of {', '.join(ROLES)}, got {role!r}")
    return getattr(lm.layout, ROLES[role])(lm.check_layer(layer))


# A request's row: its token ids, the positions that score its target, the target's ids.
Row = tuple[list[int], list[int], list[int]]


def request_row(lm: LM, request: EditRequest) -> Row:
    """The row that trains a request: its prompt and target (but the target's last token), the
    positions predicting the target tokens, and the target's ids (one target: the methods that
    train rows take no extra targets)."""
    row = request_rows(lm, request, last_token=False, n_requests=1)[0]
    return row.ids, row.positions, row.targets


def module_inputs(
    lm: LM, path: str, rows: list[list[int]], positions: list[list[int]]
) -> torch.Tensor:
    """The inputs of module `path` at the given positions of each row of token ids, one after
    the other (`[m, in]`, float32). The pass ends there: neither the module, nor what is
    attached to it (a memory, whose routing reads every shard), nor the layers above run."""
    ids, mask = lm.pad(rows)
    with torch.no_grad(), capture(lm.model, [path], "input") as seen:
        with stop_after(lm.model, path, before=True):
            lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    picked = [seen[path][row, torch.tensor(where)] for row, where in enumerate(positions)]
    return torch.cat(picked).float()


@dataclass
class Trained:
    """How training went: the optimisation steps taken and the worst request's target NLL at
    the end."""

    steps: int
    nll: float


@contextmanager
def frozen(model: nn.Module, trained: list[torch.Tensor]) -> Iterator[None]:
    """The model's parameters but `trained` take no gradient inside the block (as they did
    afterwards)."""
    keep = {id(p) for p in trained}
    thawed = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
    for p in thawed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in thawed:
            p.requires_grad_(True)


def float32_masters(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors an optimiser steps for `params`: a float32 parameter itself, else a float32
    copy (`mixed_precision_step` writes it back). The caller keeps the originals to restore."""
    return [p if p.dtype == torch.float32 else p.detach().float().clone() for p in params]


@torch.no_grad()
def mixed_precision_step(
    params: list[torch.Tensor],
    masters: list[torch.Tensor],
    originals: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    norm_constraint: float | None,
) -> None:
    """One optimiser step on the float32 copies `masters` of `params` with the model's
    gradients, each copy kept within `norm_constraint` of its original weight, then written back
    in the model's dtype (so that steps below a bfloat16 weight's resolution add up)."""
    for p, master in zip(params, masters, strict=True):
        if master is not p:
            master.grad = p.grad.float()
    optimizer.step()
    for p, master, original in zip(params, masters, originals, strict=True):
        if norm_constraint is not None:
            low, high = original.float() - norm_constraint, original.float() + norm_constraint
            master.copy_(torch.clamp(master, low, high))
        if master is not p:
            p.copy_(master)


def output_gradients(
    lm: LM, batch: TargetBatch, paths: list[str], loss: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The inputs of the modules at `paths` on `batch`, and the gradients with respect to their
    outputs of `loss(nll)` (nll: each row's mean target NLL), all `[rows, seq, ...]`: one
    forward and one backward pass; the model's parameters take no gradient."""
    model = lm.model
    probes: dict[str, torch.Tensor] = {}

    def probe(path: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def add(output: torch.Tensor) -> torch.Tensor:
            # A zero that takes the gradient: d loss / d probe = d loss / d output.
            probes[path] = torch.zeros_like(output, requires_grad=True)
            return output + probes[path]

        return add

    probing = hooks(*(replace_output(model, path, probe(path)) for path in paths))
    with torch.enable_grad(), frozen(model, []), capture(model, paths, "input") as inputs, probing:
        value = loss(forward_target_nll(model, batch))
        grads = torch.autograd.grad(value, [probes[path] for path in paths])
    return inputs, list(grads)


def block_input(lm: LM, ids: torch.Tensor, mask: torch.Tensor, layer: int) -> torch.Tensor:
    """The residual stream entering block `layer` (the blocks above it do not run)."""
    block = lm.layout.block(layer)
    with torch.no_grad(), capture(lm.model, [block], "input") as seen:
        with stop_after(lm.model, block):
            lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    return seen[block]


def train_to_targets(
    lm: LM,
    requests: list[EditRequest],
    params: list[torch.Tensor],
    first_layer: int,
    steps: int,
    lr: float,
    stop_nll: float,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[int], None] | None = None,
    min_steps: int = 0,
    until: Callable[[], bool] | None = None,
    optimizer: str = "adam",
    replayed: Sequence[Row] = (),
) -> Trained:
    """Adam (or, with `optimizer="sgd"`, plain gradient descent) on `params` (leaf tensors that
    the model's forward pass uses, through adaptors or hooks, at block `first_layer` or above)
    until every request's target NLL is below `stop_nll` (not before `min_steps`) or `steps`
    steps are taken.

    `extra_loss()` is added to the objective after each forward pass (a method's regulariser);
    `after_step(step)` runs after each optimiser step, while the gradients are still there;
    `until()`, where given, must hold too for an early stop. `replayed` rows (earlier edits, as
    `request_row` gives them) train beside the requests, under the same stopping rule.
    """
    model = lm.model
    rows = [request_row(lm, request) for request in requests] + list(replayed)
    batch = batch_rows(lm, [TargetRow(*row, weight=1 / len(rows), floor=0.0) for row in rows])
    hidden = block_input(lm, batch.ids, batch.mask, first_layer)
    optimizer = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(params, lr=lr)
    step, worst = 0, float("nan")
    with frozen(model, params), start_at_block(model, lm.layout.blocks, first_layer, hidden):
        for step in range(steps + 1):
            nll = forward_target_nll(model, batch)
            worst = float(nll.detach().max())  # a NaN never meets the stopping rule
            done = step >= min_steps and worst < stop_nll and (until is None or until())
            if step == steps or done:
                break
            loss = nll.mean() if extra_loss is None else nll.mean() + extra_loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(step)
    return Trained(step, worst)


class MemoryTraining(Protocol):
    """The hyper-parameters a memory method trains its memory's next state with."""

    layers: list[int]  # the one layer whose module holds the memory
    steps: int
    lr: float
    stop_nll: float


def train_at_module(
    lm: LM,
    request: EditRequest,
    params: list[torch.Tensor],
    hparams: MemoryTraining,
    path: str,
    output: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    memory: Adaptor | None = None,
    **options: Any,
) -> Trained:
    """`train_to_targets` on one request while module `path` gives `output(inputs, output)`
    (from its input and its own output, as an adaptor's `adapt`) and `memory`, where given, is
    silenced: how a memory method trains its memory's next state in the memory's place.
    `options` are `train_to_targets`'s."""
    with silenced(memory), capture(lm.model, [path], "input") as captured:
        with replace_output(lm.model, path, lambda out: output(captured[path], out)):
            return train_to_targets(
                lm,
                [request],
                params,
                hparams.layers[0],
                hparams.steps,
                hparams.lr,
                hparams.stop_nll,
                **options,
            )


def memory_tensors(
    memory: Adaptor | None, empty: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A memory's buffers named as in `empty`, copied to the CPU; `empty`'s where there is no
    memory yet, or the memory lacks the buffer (made before the method kept it)."""
    if memory is None:
        return empty
    held = {name: getattr(memory, name, None) for name in empty}
    return {
        name: empty[name] if value is None else value.cpu().clone() for name, value in held.items()
    }


EditOne = Callable[[LM, EditRequest, HyperParams], tuple[list[Change], dict]]


def edit_one_by_one(
    lm: LM, requests: list[EditRequest], hparams: HyperParams, edit_one: EditOne
) -> MethodResult:
    """A memory method's edit of `requests`: each request's changes computed by `edit_one` on the
    model as the earlier ones left it; the info of the one request, or of each under
    "requests"."""
    records: list[dict] = []

    def compute(request: EditRequest) -> list[Change]:
        changes, info = edit_one(lm, request, hparams)
        records.append(info)
        return changes

    changes = compute_in_sequence(lm.model, requests, compute)
    return MethodResult(changes, records[0] if len(records) == 1 else {"requests": records})
