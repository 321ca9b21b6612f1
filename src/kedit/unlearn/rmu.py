"""RMU, Representation Misdirection for Unlearning (Li et al., 2024, "The WMDP Benchmark", §5):
at one block ℓ, steer the forget set's activations towards a fixed random direction, so that
the blocks above read noise where the forgotten knowledge was, and hold the retain set's
activations where the model before unlearning had them,

    L = E_F [ ‖h_θ(x) − c·u‖² ] + α · E_R [ ‖h_θ(x) − h_ref(x)‖² ]

h the residual stream after block ℓ, the last of `layers`, at an item's tokens, u a random unit
vector with entries drawn uniformly from [0, 1) before normalising (fixed by the seed), c the
steering coefficient and α the retain weight. Each squared distance is averaged over the tokens
and the hidden units (a mean squared error, as the authors' code computes it, which is the scale
their α = 1200 and c = 6.5 for Zephyr-7B refer to). Only the MLP output projections of `layers`
train: for Zephyr-7B the paper's blocks 5, 6 and 7, steered at 7. The forward pass stops after
block ℓ, so a step costs ℓ + 1 blocks, not the whole model.

`tokens` picks the positions: `all` (the paper's: every token of the text, not the tokenizer's
start tokens such as LLaMA's BOS) or `answer` (those that predict the answer's tokens), which
leaves a question's own tokens, and so the other facts asked about the same subject, to the
retain term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kedit.data.unlearn_items import UnlearnItem
from kedit.lm import LM
from kedit.methods._rows import TargetBatch
from kedit.methods.registry import hp
from kedit.unlearn._train import FORGET, RETAIN, Step, block_output, run_unlearning
from kedit.unlearn.registry import UnlearnHyperParams, UnlearnResult, register_unlearning

TOKENS = ("all", "answer")


@dataclass
class RMUHyperParams(UnlearnHyperParams):
    layers: list[int] = hp(
        [5, 6, 7], "Blocks whose MLP output projection trains; the last is ℓ, the steered one."
    )
    steering: float = hp(6.5, "c: the forget activations are pushed towards c·u (Zephyr-7B's).")
    retain_weight: float = hp(1200.0, "α: weight of the retain activations' squared error.")
    lr: float = hp(5e-5, "Adam learning rate (the paper's).")
    tokens: str = hp("all", "Positions whose activations count: 'all' or 'answer'.")

    def validate(self) -> None:
        super().validate()
        if not self.steering > 0:
            raise ValueError(f"steering: expected a positive number, got {self.steering!r}")
        if self.tokens not in TOKENS:
            raise ValueError(f"tokens: expected one of {list(TOKENS)}, got {self.tokens!r}")


def counted(
    hidden: torch.Tensor, batch: TargetBatch, tokens: str, skip: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The activations `[rows, positions, width]` at the positions `tokens` picks and which of
    them count (`[rows, positions]`): never padding, nor with `all` the first `skip` positions
    (the tokenizer's start tokens, whose activations are the same whatever the text, so that
    the forget term would push what the retain term holds)."""
    if tokens == "all":
        mask = batch.mask.bool().to(hidden.device)
        mask[:, :skip] = False
        return hidden, mask
    rows = torch.arange(len(batch.ids), device=hidden.device)[:, None]
    return hidden[rows, batch.positions.to(hidden.device)], batch.valid.to(hidden.device)


def masked_mse(values: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The squared error averaged over the positions `mask` counts and the hidden units."""
    squared = (values - targets).pow(2).mean(-1)
    return (squared * mask).sum() / mask.sum()


def steering_vector(width: int, steering: float, seed: int) -> torch.Tensor:
    """c·u: u with entries uniform in [0, 1), normalised to unit length, from `seed` alone."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.rand(width, generator=generator)
    return steering * direction / direction.norm()


def rmu_loss(block: str, hparams: RMUHyperParams, skip: int = 0):
    """L of the module docstring at `block`; `skip` start tokens never count."""

    def loss(step: Step) -> torch.Tensor:
        batch = step.batch(FORGET)
        hidden, mask = counted(step.activations(FORGET, block), batch, hparams.tokens, skip)
        control = steering_vector(hidden.shape[-1], hparams.steering, hparams.seed)
        value = masked_mse(hidden, control.to(hidden.device), mask)
        if hparams.retain_weight and step.batches.get(RETAIN) is not None:
            batch = step.batch(RETAIN)
            hidden, mask = counted(step.activations(RETAIN, block), batch, hparams.tokens, skip)
            value = value + hparams.retain_weight * masked_mse(hidden, step.reference(RETAIN), mask)
        return value

    return loss


@register_unlearning(
    "rmu", RMUHyperParams, "Steer forget activations to a random direction (RMU)", needs_retain=True
)
def rmu(
    lm: LM,
    forget: list[UnlearnItem],
    retain: list[UnlearnItem],
    hparams: RMUHyperParams,
    progress: bool = False,
) -> UnlearnResult:
    modules = [lm.layout.mlp_out_name(lm.check_layer(x)) for x in hparams.layers]
    layer = max(hparams.layers)
    block = lm.layout.block(layer)

    skip = len(lm.start_ids)

    def retain_reference(model: nn.Module, batch: TargetBatch) -> torch.Tensor:
        return counted(block_output(model, batch, block), batch, hparams.tokens, skip)[0]

    return run_unlearning(
        lm,
        "rmu",
        forget,
        retain,
        hparams,
        rmu_loss(block, hparams, skip),
        references={RETAIN: retain_reference},
        modules=modules,
        progress=progress,
        info={"layer": layer, "steering": hparams.steering},
    )
