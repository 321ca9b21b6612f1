"""Fine-tuning baselines: FT-L (Zhu et al., 2020, as in ROME's baseline) and FT-M (EasyEdit).

Both train one layer's MLP output projection on the edit prompts.
- FT-L: every target token is scored at the last prompt token (the prompt's next-token
  distribution should hold the target's tokens); an optional L∞ norm constraint keeps each
  weight within ε of its original value.
- FT-M: the target tokens are scored teacher-forced after the prompt, the prompt masked out.
The blocks below the edited layer run once, and so does the edited block up to the trained
projection where its output adds to the block's (`kedit.methods._tune`, which DPO shares);
logits are computed only where a target token is scored; training stops once every target is
reached. A request with `extra_targets` (Multi-Label Edit) trains towards all its targets, its
loss the mean over them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kedit.lm import LM
from kedit.methods._rows import target_nll, target_rows
from kedit.methods._tune import ProjectionTuning, Scored
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


def fine_tune(
    lm: LM, requests: list[EditRequest], hparams: FTHyperParams, last_token: bool
) -> MethodResult:
    """Train the chosen projections (`kedit.methods._tune`); return their change as dense
    deltas (model unchanged).

    The loss is the mean over requests of each one's mean target NLL (a Multi-Label Edit's: the
    mean over its targets). Requests run in batches of about `batch_tokens` tokens whose
    gradients add up to the whole batch's.
    """
    rows = target_rows(lm, requests, last_token)
    tuning = ProjectionTuning(lm, hparams.layers, [[row] for row in rows], hparams.batch_tokens)

    def objective(logits: torch.Tensor, index: int) -> Scored:
        batch = tuning.batches[index]
        nll = target_nll(logits, batch)
        excess = nll.detach() - batch.floors.to(nll.device)  # a NaN never meets the rule
        loss = (nll * batch.weights.to(nll.device)).sum()
        return Scored(loss, excess < hparams.stop_nll, {"excess": excess})

    tuned = tuning.train(
        objective, hparams.steps, hparams.lr, hparams.weight_decay, hparams.norm_constraint
    )
    return MethodResult(
        tuned.deltas, {"steps": tuned.steps, "final_nll": float(tuned.values["excess"].max())}
    )


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
