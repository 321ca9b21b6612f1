"""Negative Preference Optimization (Zhang et al., 2024): DPO with only a losing answer, which
bounds the ascent that makes gradient ascent collapse,

    L_NPO = (2/β) · E_F [ log(1 + (π_θ(y|x) / π_ref(y|x))^β) ]                       (eq. 3)
          = −(2/β) · E_F [ log σ(−β · (log π_θ(y|x) − log π_ref(y|x))) ]

with π_ref the model before unlearning and log π(y|x) the answer's summed token log-probability.
As β → 0 its gradient is gradient ascent's, weighted per item by how likely the answer still is
(the paper's Proposition). With a retain set the retain NLL is added (NPO+RT): + λ · E_R[NLL].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kedit.data.unlearn_items import UnlearnItem
from kedit.lm import LM
from kedit.methods.registry import hp
from kedit.unlearn._train import FORGET, Step, retain_term, run_unlearning
from kedit.unlearn.registry import UnlearnHyperParams, UnlearnResult, register_unlearning


@dataclass
class NPOHyperParams(UnlearnHyperParams):
    beta: float = hp(0.1, "β: inverse temperature of the preference loss.")
    retain_weight: float = hp(1.0, "λ: weight of the retain NLL where a retain set is given.")

    def validate(self) -> None:
        super().validate()
        if not self.beta > 0:
            raise ValueError(f"beta: expected a positive number, got {self.beta!r}")


def npo_loss(beta: float, weight: float):
    def loss(step: Step) -> torch.Tensor:
        log_ratio = step.logp_sum(FORGET) - step.reference(FORGET)
        forget = -(2 / beta) * F.logsigmoid(-beta * log_ratio).mean()
        return forget + retain_term(step, weight)

    return loss


@register_unlearning("npo", NPOHyperParams, "Negative preference optimisation (+ retain NLL)")
def npo(
    lm: LM,
    forget: list[UnlearnItem],
    retain: list[UnlearnItem],
    hparams: NPOHyperParams,
    progress: bool = False,
) -> UnlearnResult:
    loss = npo_loss(hparams.beta, hparams.retain_weight)
    return run_unlearning(
        lm, "npo", forget, retain, hparams, loss, references=[FORGET], progress=progress
    )
