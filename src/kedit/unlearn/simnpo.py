"""SimNPO (Fan et al., 2024): NPO without the reference model, its log-ratio replaced by the
length-normalised answer log-probability and a margin γ,

    L_SimNPO = −(2/β) · E_F [ log σ( −(β / |y|) · log π_θ(y|x) − γ ) ]                (eq. 4)

plus the retain NLL where a retain set is given (+ λ · E_R[NLL]).
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
class SimNPOHyperParams(UnlearnHyperParams):
    beta: float = hp(2.5, "β: inverse temperature (the paper's TOFU setting).")
    gamma: float = hp(0.0, "γ: reward margin.")
    retain_weight: float = hp(1.0, "λ: weight of the retain NLL where a retain set is given.")

    def validate(self) -> None:
        super().validate()
        if not self.beta > 0:
            raise ValueError(f"beta: expected a positive number, got {self.beta!r}")


def simnpo_loss(beta: float, gamma: float, weight: float):
    def loss(step: Step) -> torch.Tensor:
        normalised = step.logp_sum(FORGET) / step.lengths(FORGET)
        forget = -(2 / beta) * F.logsigmoid(-beta * normalised - gamma).mean()
        return forget + retain_term(step, weight)

    return loss


@register_unlearning("simnpo", SimNPOHyperParams, "Reference-free, length-normalised NPO")
def simnpo(
    lm: LM,
    forget: list[UnlearnItem],
    retain: list[UnlearnItem],
    hparams: SimNPOHyperParams,
    progress: bool = False,
) -> UnlearnResult:
    loss = simnpo_loss(hparams.beta, hparams.gamma, hparams.retain_weight)
    return run_unlearning(lm, "simnpo", forget, retain, hparams, loss, progress=progress)
