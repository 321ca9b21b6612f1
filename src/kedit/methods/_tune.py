"""Training MLP output projections on rows of target tokens: what FT and DPO share.

The rows (`kedit.methods._rows`) come in groups that a batch never splits (a DPO request's
chosen and rejected answer); batches hold about `batch_tokens` tokens and their gradients add
up to the whole objective's. The blocks below the first trained layer run once, and so does
that block up to the trained projection where its output adds to the block's
(`kedit.methods._above`); every step runs only the blocks above and unembeds only the scored
positions. A float32 weight trains in place; a lower-precision one as a float32 copy (mixed
precision: the model runs in its own dtype, each step updates the float32 copy with the
model's gradient and writes it back), so that steps smaller than a bfloat16 or float16 weight's
resolution add up. The model is left as it was; the change comes back as dense deltas.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kedit.edits import WeightDelta
from kedit.hooks import stop_after
from kedit.lm import LM
from kedit.methods._above import Above, adds_to_block_output, read_logits
from kedit.methods._locate import capture_start
from kedit.methods._memory import backward_tokens, token_chunks
from kedit.methods._rows import TargetBatch, TargetRow, batch_rows
from kedit.methods._train import float32_masters, frozen, mixed_precision_step


@dataclass
class Scored:
    """One batch's part of a training step, as a method's objective scores it."""

    loss: torch.Tensor  # the batch's share of the objective, with its gradient
    met: torch.Tensor  # per item of the batch (a row, a request): the stopping rule holds
    values: dict[str, torch.Tensor]  # per item, detached: what the method reports at the end


# (logits at `batches[i].reads`, i) -> batch i's part of the step.
Objective = Callable[[torch.Tensor, int], Scored]


@dataclass
class Tuned:
    """The trained projections' change, the steps taken and the last step's `values` (every
    batch's items in order)."""

    deltas: list[WeightDelta]
    steps: int
    values: dict[str, torch.Tensor]


@dataclass
class _Start:
    """Where a batch's training steps start: the first trained block's output less its
    projection's output, and the projection's input (where the projection's output adds to the
    block's: a step adds the trained projection of that input), or the block's input."""

    hidden: torch.Tensor
    keys: torch.Tensor | None = None


class ProjectionTuning:
    """The MLP output projections of `layers`, the batches of `groups` of rows they train on,
    and what the blocks below them give each batch (computed once, here)."""

    def __init__(
        self, lm: LM, layers: list[int], groups: list[list[TargetRow]], batch_tokens: int | None
    ) -> None:
        self.lm = lm
        model, layout = lm.model, lm.layout
        self.layers = sorted(lm.check_layer(layer) for layer in layers)
        self.names = [f"{layout.mlp_out_name(layer)}.weight" for layer in self.layers]
        self.params = [model.get_parameter(name) for name in self.names]
        budget = batch_tokens or backward_tokens(lm, self.layers[0])
        sizes = [sum(len(row.ids) for row in group) for group in groups]
        self.batches = [
            batch_rows(lm, [row for group in chunk for row in group])
            for chunk in token_chunks(groups, sizes, budget)
        ]
        # The first trained projection's output adds to its block's: the steps start above that
        # block, from its output plus the projection's change. Else they run it, from its input.
        first = layout.mlp_out_name(self.layers[0])
        self.projection = model.get_submodule(first)
        self.additive = adds_to_block_output(lm, self.layers[0], first)
        self.above = Above(lm, self.layers[0] + 1 if self.additive else self.layers[0])
        self.starts = []
        for batch in self.batches:
            with self.above.primed(batch.ids, batch.mask):
                self.starts.append(self._run_below(batch))

    @torch.no_grad()
    def _run_below(self, batch: TargetBatch) -> _Start:
        """Run the blocks that the training does not change, once."""
        lm, layer = self.lm, self.layers[0]
        with (
            capture_start(lm, layer, self.additive) as found,
            stop_after(lm.model, lm.layout.block(layer)),
        ):
            lm.model.base_model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
        start = found()
        if not self.additive:
            return _Start(start["hidden"])
        return _Start(start["hidden"] - start["values"], start["keys"])

    def logits(self, index: int) -> torch.Tensor:
        """The logits (float32) at batch `index`'s scored positions, with the current weights."""
        batch, start = self.batches[index], self.starts[index]
        hidden = start.hidden
        if self.additive:
            hidden = hidden + self.projection(start.keys)
        normed = self.above(hidden, batch.ids, batch.mask)
        return read_logits(self.lm, normed, *batch.reads)

    def train(
        self,
        objective: Objective,
        steps: int,
        lr: float,
        weight_decay: float,
        norm_constraint: float | None = None,
    ) -> Tuned:
        """Adam on the sum of the batches' losses for up to `steps` steps, stopping once every
        item of every batch meets the objective's rule; the model is left as it was."""
        params = self.params
        originals = [p.detach().clone() for p in params]
        masters = float32_masters(params)
        optimizer = torch.optim.Adam(masters, lr=lr, weight_decay=weight_decay)
        step, values = 0, {}
        try:
            with frozen(self.lm.model, params):
                for step in range(steps + 1):
                    for p in params:
                        p.grad = None
                    scored = []
                    for index in range(len(self.batches)):
                        scored.append(objective(self.logits(index), index))
                        # The last batch's backward waits for the stopping rule; earlier ones
                        # free their activations now.
                        if index + 1 < len(self.batches) and step < steps:
                            scored[-1].loss.backward()
                    values = {
                        key: torch.cat([s.values[key] for s in scored]) for key in scored[0].values
                    }
                    if step == steps or all(bool(s.met.all()) for s in scored):
                        break
                    scored[-1].loss.backward()
                    mixed_precision_step(params, masters, originals, optimizer, norm_constraint)
            deltas = [
                WeightDelta.from_dense(name, master - original.float())
                for name, master, original in zip(self.names, masters, originals, strict=True)
            ]
        finally:
            with torch.no_grad():
                for p, original in zip(params, originals, strict=True):
                    p.copy_(original)
        return Tuned(deltas, step, values)
