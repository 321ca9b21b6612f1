"""Gradient difference (Liu et al., 2022; KnowUnDo's `ascent_plus_descent`, OpenUnlearning's
GradDiff): ascend on the forget set, descend on the retain set,

    L = − E_F [ NLL(y | x) ] + λ · E_R [ NLL(y | x) ]        (λ = retain_weight)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kedit.data.unlearn_items import UnlearnItem
from kedit.lm import LM
from kedit.methods.registry import hp
from kedit.unlearn._train import FORGET, Step, retain_term, run_unlearning
from kedit.unlearn.registry import UnlearnHyperParams, UnlearnResult, register_unlearning


@dataclass
class GradDiffHyperParams(UnlearnHyperParams):
    retain_weight: float = hp(1.0, "λ: weight of the retain set's NLL.")


def grad_diff_loss(weight: float):
    def loss(step: Step) -> torch.Tensor:
        return -step.nll(FORGET).mean() + retain_term(step, weight)

    return loss


@register_unlearning(
    "grad_diff", GradDiffHyperParams, "Ascent on forget, descent on retain", needs_retain=True
)
def grad_diff(
    lm: LM,
    forget: list[UnlearnItem],
    retain: list[UnlearnItem],
    hparams: GradDiffHyperParams,
    progress: bool = False,
) -> UnlearnResult:
    loss = grad_diff_loss(hparams.retain_weight)
    return run_unlearning(lm, "grad_diff", forget, retain, hparams, loss, progress=progress)
