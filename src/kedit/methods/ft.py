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

import math
from dataclasses import dataclass

import torch

from kedit.edits import WeightDelta
from kedit.hooks import capture, stop_after
from kedit.lm import LM
from kedit.methods._above import Above, adds_to_block_output, read_logits
from kedit.methods._memory import backward_tokens, token_chunks
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
class _Row:
    """One target of one request: token ids, the positions that score the target, the target's
    ids, the row's weight in the loss and the NLL floor of its request's targets (log k)."""

    ids: list[int]
    positions: list[int]
    targets: list[int]
    weight: float
    floor: float


@dataclass
class _Batch:
    """Token ids of some rows, and for each row the positions and ids of the target tokens to
    score, its weight in the loss and its NLL floor."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    valid: torch.Tensor
    weights: torch.Tensor
    floors: torch.Tensor

    @property
    def reads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(rows, positions)` of every scored position, row by row."""
        rows = torch.arange(len(self.ids), device=self.positions.device)
        return rows.repeat_interleave(self.positions.shape[1]), self.positions.flatten()


def _rows(lm: LM, request: EditRequest, last_token: bool, n_requests: int) -> list[_Row]:
    """A request's rows, one per target; the weights make the loss the mean over requests of
    each request's mean over its targets."""
    prompt_ids = lm.encode_prompt(request.text)
    count = len(request.targets)
    rows = []
    for target in request.targets:
        target_ids = lm.encode(target)
        if last_token:
            ids, positions = prompt_ids, [len(prompt_ids) - 1] * len(target_ids)
        else:
            ids = prompt_ids + target_ids[:-1]
            positions = list(range(len(prompt_ids) - 1, len(ids)))
        rows.append(_Row(ids, positions, target_ids, 1 / (n_requests * count), math.log(count)))
    return rows


def _batch(lm: LM, rows: list[_Row]) -> _Batch:
    """The batch of some `_rows`."""
    ids, mask = lm.pad([row.ids for row in rows])
    positions, targets = [row.positions for row in rows], [row.targets for row in rows]
    width = max(len(t) for t in targets)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    tgt = torch.zeros((len(rows), width), dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, (p, t) in enumerate(zip(positions, targets, strict=True)):
        pos[row, : len(p)], tgt[row, : len(t)], valid[row, : len(t)] = (
            torch.tensor(p),
            torch.tensor(t),
            True,
        )
    weights = torch.tensor([row.weight for row in rows], device=lm.device)
    floors = torch.tensor([row.floor for row in rows], device=lm.device)
    return _Batch(
        ids, mask, pos.to(lm.device), tgt.to(lm.device), valid.to(lm.device), weights, floors
    )


def _target_nll(logits: torch.Tensor, batch: _Batch) -> torch.Tensor:
    """Each row's mean target-token NLL, from the logits at `batch.reads`."""
    logp = torch.log_softmax(logits, dim=-1).view(*batch.positions.shape, -1)
    targets, valid = batch.targets.to(logp.device), batch.valid.to(logp.device)
    token_logp = logp.gather(2, targets[..., None]).squeeze(-1) * valid
    return -token_logp.sum(1) / valid.sum(1)


def target_batch(lm: LM, requests: list[EditRequest], last_token: bool = False) -> _Batch:
    """The batch of the requests' rows, one per target, each scoring the target's tokens."""
    return _batch(lm, [row for r in requests for row in _rows(lm, r, last_token, len(requests))])


def forward_target_nll(model: torch.nn.Module, batch: _Batch) -> torch.Tensor:
    """Each row of `batch`'s mean target-token NLL, from a full forward pass of `model`."""
    logits = model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits
    return _target_nll(logits[batch.reads].float(), batch)


@dataclass
class _Start:
    """Where a batch's training steps start: the first trained block's output and its
    projection's input and output (where the projection's output adds to the block's), or the
    block's input."""

    hidden: torch.Tensor
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None


@torch.no_grad()
def _run_below(lm: LM, batch: _Batch, layer: int, additive: bool) -> _Start:
    """Run the blocks that the training does not change, once."""
    model, layout = lm.model, lm.layout
    block, projection = layout.block(layer), layout.mlp_out_name(layer)
    with capture(model, [block], "output" if additive else "input") as seen:
        with capture(model, [projection], "input") as keys, capture(model, [projection]) as values:
            with stop_after(model, block):
                model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
    if not additive:
        return _Start(seen[block])
    return _Start(seen[block], keys[projection], values[projection])


def fine_tune(
    lm: LM, requests: list[EditRequest], hparams: FTHyperParams, last_token: bool
) -> MethodResult:
    """Train the chosen projections; return their change as dense deltas (model unchanged).

    The loss is the mean over requests of each one's mean target NLL (a Multi-Label Edit's: the
    mean over its targets). The weights train as
    float32 copies (mixed precision: the model runs in its own dtype, each step updates the
    float32 copy with the model's gradient and writes it back), so that steps smaller than a
    bfloat16 or float16 weight's resolution add up. Requests run in batches of about
    `batch_tokens` tokens whose gradients add up to the whole batch's.
    """
    model, layout = lm.model, lm.layout
    layers = sorted(lm.check_layer(layer) for layer in hparams.layers)
    names = [f"{layout.mlp_out_name(layer)}.weight" for layer in layers]
    params = [model.get_parameter(name) for name in names]
    originals = [p.detach().clone() for p in params]
    masters = [p.detach().float().clone() for p in params]
    budget = hparams.batch_tokens or backward_tokens(lm, layers[0])
    rows = [row for r in requests for row in _rows(lm, r, last_token, len(requests))]
    chunks = list(token_chunks(rows, [len(row.ids) for row in rows], budget))
    batches = [_batch(lm, chunk) for chunk in chunks]

    # The first trained projection's output adds to its block's: the steps start above that
    # block, from its output plus the projection's change. Else they run it, from its input.
    projection = model.get_submodule(layout.mlp_out_name(layers[0]))
    additive = adds_to_block_output(lm, layers[0], layout.mlp_out_name(layers[0]))
    starts = [_run_below(lm, batch, layers[0], additive) for batch in batches]
    above = Above(lm, layers[0] + 1 if additive else layers[0])

    trainable = {id(p) for p in params}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in trainable]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(masters, lr=hparams.lr, weight_decay=hparams.weight_decay)
    step, worst = 0, float("nan")
    try:
        with above.ready():
            for step in range(hparams.steps + 1):
                for p in params:
                    p.grad = None
                maxima, last = [], None
                for index, batch in enumerate(batches):
                    start = starts[index]
                    hidden = start.hidden
                    if additive:
                        hidden = hidden + (projection(start.keys) - start.values)
                    normed = above(hidden, batch.ids, batch.mask)
                    nll = _target_nll(read_logits(lm, normed, *batch.reads), batch)
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
                _update(params, masters, originals, optimizer, hparams.norm_constraint)
        deltas = [
            WeightDelta.from_dense(name, master - original.float())
            for name, master, original in zip(names, masters, originals, strict=True)
        ]
    finally:
        for p in frozen:
            p.requires_grad_(True)
        with torch.no_grad():
            for p, original in zip(params, originals, strict=True):
                p.copy_(original)
    return MethodResult(deltas, {"steps": step, "final_nll": worst})


@torch.no_grad()
def _update(
    params: list[torch.Tensor],
    masters: list[torch.Tensor],
    originals: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    norm_constraint: float | None,
) -> None:
    """One Adam step on the float32 copies with the model's gradients, each copy kept within
    `norm_constraint` of its original weight, then written back in the model's dtype."""
    for p, master in zip(params, masters, strict=True):
        master.grad = p.grad.float()
    optimizer.step()
    for p, master, original in zip(params, masters, originals, strict=True):
        if norm_constraint is not None:
            low, high = original.float() - norm_constraint, original.float() + norm_constraint
            master.copy_(torch.clamp(master, low, high))
        p.copy_(master)


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
