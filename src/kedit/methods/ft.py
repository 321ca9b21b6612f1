"""Fine-tuning baselines: FT-L (Zhu et al., 2020, as in ROME's baseline) and FT-M (EasyEdit).

Both train one layer's MLP output projection on the edit prompts.
- FT-L: every target token is scored at the last prompt token (the prompt's next-token
  distribution should hold the target's tokens); an optional L∞ norm constraint keeps each
  weight within ε of its original value.
- FT-M: the target tokens are scored teacher-forced after the prompt, the prompt masked out.
The blocks below the edited layer run once, and so does the edited block up to the trained
projection where its output adds to the block's (`kedit.methods._above`); logits are computed
only where a target token is scored; training stops once every target is reached. A request
with `extra_targets` (Multi-Label Edit) trains towards all its targets, its loss the mean over
them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kedit.edits import WeightDelta
from kedit.hooks import stop_after
from kedit.lm import LM
from kedit.methods._above import Above, adds_to_block_output, read_logits
from kedit.methods._locate import capture_start
from kedit.methods._memory import backward_tokens, token_chunks
from kedit.methods._rows import TargetBatch, batch_rows, target_nll, target_rows
from kedit.methods._train import float32_masters, frozen, mixed_precision_step
from kedit.methods.registry import HyperParams, MethodResult, hp, register
from kedit.requests import EditRequest


@dataclass
class FTHyperParams(HyperParams):
    layers: list[int] = hp([5], "Layers whose MLP output projection is trained.")
    lr: float = hp(5e-4, "Adam learning rate.")
    steps: int = hp(25, "Maximum optimisation steps.")
    weight_decay: float = hp(0.0, "Adam weight decay.")
    norm_constraint: float | None = hp(None, "Keep each weight within this of its original value.")
    stop_nll: float = hp(
        0.05,
        "Stop once every request's mean target NLL is below this (for a request with k targets,"
        " a Multi-Label Edit: below this + log k, each target near an equal share).",
    )
    batch_tokens: int | None = hp(
        None,
        "Token budget of one forward and backward pass; more requests accumulate gradients over"
        " several (None: what fits the device, at most 4096; kedit.methods._memory).",
    )

    MULTI_LABEL = True
    ALIASES = {"num_steps": "steps"}
    # EasyEdit's FT files carry `kl_factor`, which its FT does not read either.
    IGNORED = HyperParams.IGNORED | {"batch_size", "objective_optimization", "kl_factor"}

    def validate(self) -> None:
        if not self.layers:
            raise ValueError("layers: expected at least one layer, got []")
        if self.steps < 1:
            raise ValueError(f"steps: expected a positive integer, got {self.steps!r}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise ValueError(
                f"batch_tokens: expected a positive integer or None, got {self.batch_tokens!r}"
            )
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")
        if self.norm_constraint is not None and not self.norm_constraint > 0:
            raise ValueError(
                f"norm_constraint: expected a positive number or None, got {self.norm_constraint!r}"
            )


@dataclass
class _Start:
    """Where a batch's training steps start: the first trained block's output less its
    projection's output, and the projection's input (where the projection's output adds to the
    block's: a step adds the trained projection of that input), or the block's input."""

    hidden: torch.Tensor
    keys: torch.Tensor | None = None


@torch.no_grad()
def _run_below(lm: LM, batch: TargetBatch, layer: int, additive: bool) -> _Start:
    """Run the blocks that the training does not change, once."""
    model = lm.model
    with capture_start(lm, layer, additive) as found, stop_after(model, lm.layout.block(layer)):
        model.base_model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
    start = found()
    if not additive:
        return _Start(start["hidden"])
    return _Start(start["hidden"] - start["values"], start["keys"])


def fine_tune(
    lm: LM, requests: list[EditRequest], hparams: FTHyperParams, last_token: bool
) -> MethodResult:
    """Train the chosen projections; return their change as dense deltas (model unchanged).

    The loss is the mean over requests of each one's mean target NLL (a Multi-Label Edit's: the
    mean over its targets). A float32 weight trains in place; a lower-precision one as a float32
    copy (mixed precision: the model runs in its own dtype, each step updates the float32 copy
    with the model's gradient and writes it back), so that steps smaller than a bfloat16 or
    float16 weight's resolution add up. Requests run in batches of about `batch_tokens` tokens
    whose gradients add up to the whole batch's.
    """
    model, layout = lm.model, lm.layout
    layers = sorted(lm.check_layer(layer) for layer in hparams.layers)
    names = [f"{layout.mlp_out_name(layer)}.weight" for layer in layers]
    params = [model.get_parameter(name) for name in names]
    originals = [p.detach().clone() for p in params]
    masters = float32_masters(params)
    budget = hparams.batch_tokens or backward_tokens(lm, layers[0])
    rows = target_rows(lm, requests, last_token)
    chunks = list(token_chunks(rows, [len(row.ids) for row in rows], budget))
    batches = [batch_rows(lm, chunk) for chunk in chunks]

    # The first trained projection's output adds to its block's: the steps start above that
    # block, from its output plus the projection's change. Else they run it, from its input.
    projection = model.get_submodule(layout.mlp_out_name(layers[0]))
    additive = adds_to_block_output(lm, layers[0], layout.mlp_out_name(layers[0]))
    above = Above(lm, layers[0] + 1 if additive else layers[0])
    starts = []
    for batch in batches:
        with above.primed(batch.ids, batch.mask):
            starts.append(_run_below(lm, batch, layers[0], additive))

    optimizer = torch.optim.Adam(masters, lr=hparams.lr, weight_decay=hparams.weight_decay)
    step, worst = 0, float("nan")
    try:
        with frozen(model, params):
            for step in range(hparams.steps + 1):
                for p in params:
                    p.grad = None
                maxima, last = [], None
                for index, batch in enumerate(batches):
                    start = starts[index]
                    hidden = start.hidden
                    if additive:
                        hidden = hidden + projection(start.keys)
                    normed = above(hidden, batch.ids, batch.mask)
                    nll = target_nll(read_logits(lm, normed, *batch.reads), batch)
                    maxima.append((nll.detach() - batch.floors.to(nll.device)).max())
                    last = (nll * batch.weights.to(nll.device)).sum()
                    # The last batch's backward waits for the stopping rule; earlier ones free
                    # their activations now.
                    if index + 1 < len(batches) and step < hparams.steps:
                        last.backward()
                worst = float(torch.stack(maxima).max())  # a NaN stays NaN: it never stops
                if step == hparams.steps or worst < hparams.stop_nll:
                    break
                last.backward()
                mixed_precision_step(params, masters, originals, optimizer, hparams.norm_constraint)
        deltas = [
            WeightDelta.from_dense(name, master - original.float())
            for name, master, original in zip(names, masters, originals, strict=True)
        ]
    finally:
        with torch.no_grad():
            for p, original in zip(params, originals, strict=True):
                p.copy_(original)
    return MethodResult(deltas, {"steps": step, "final_nll": worst})


@register(
    "ft-l", FTHyperParams, "Fine-tune one MLP projection, last prompt token (FT-L)", True, "ft"
)
def ft_l(lm: LM, requests: list[EditRequest], hparams: FTHyperParams) -> MethodResult:
    return fine_tune(lm, requests, hparams, last_token=True)


@register(
    "ft-m", FTHyperParams, "Fine-tune one MLP projection, masked target tokens (FT-M)", True, "ft"
)
def ft_m(lm: LM, requests: list[EditRequest], hparams: FTHyperParams) -> MethodResult:
    return fine_tune(lm, requests, hparams, last_token=False)
