"""Gradient ascent (Jang et al., 2023; KnowUnDo's `gradient_ascent`): make the forget set's
answers unlikely by ascending their negative log-likelihood,

    L = − E_(x,y)∈F [ NLL(y | x) ]        (NLL: mean over the answer tokens)

Nothing holds the rest of the model in place, so it also erases what should stay (KnowUnDo's
finding); the retain set, when given, is only measured along the way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kedit.data.unlearn_items import UnlearnItem
from kedit.lm import LM
from kedit.unlearn._train import FORGET, Step, run_unlearning
from kedit.unlearn.registry import UnlearnHyperParams, UnlearnResult, register_unlearning


@dataclass
class GAHyperParams(UnlearnHyperParams):
    pass


def ga_loss(step: Step) -> torch.Tensor:
    return -step.nll(FORGET).mean()


@register_unlearning("ga", GAHyperParams, "Gradient ascent on the forget set")
def ga(
    lm: LM,
    forget: list[UnlearnItem],
    retain: list[UnlearnItem],
    hparams: GAHyperParams,
    progress: bool = False,
) -> UnlearnResult:
    return run_unlearning(lm, "ga", forget, retain, hparams, ga_loss, progress=progress)
