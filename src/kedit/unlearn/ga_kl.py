"""Gradient ascent with a KL constraint (KnowUnDo's `ascent_plus_kl_divergence`, as in Yao et
al., 2023): ascend on the forget set while the retain set's next-token distributions stay those
of the model before unlearning,

    L = − E_F [ NLL(y | x) ] + λ · E_R [ KL( π_ref(· | x, y<t) ‖ π_θ(· | x, y<t) ) ]

with the KL averaged over the retain answers' tokens (λ = retain_weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kedit.data.unlearn_items import UnlearnItem
from kedit.lm import LM
from kedit.methods.registry import hp
from kedit.unlearn._train import FORGET, RETAIN, Step, run_unlearning
from kedit.unlearn.registry import UnlearnHyperParams, UnlearnResult, register_unlearning


@dataclass
class GAKLHyperParams(UnlearnHyperParams):
    retain_weight: float = hp(1.0, "λ: weight of the KL term on the retain set.")


def retain_kl(step: Step) -> torch.Tensor:
    """KL(π_ref ‖ π_θ) at each retain answer token, averaged over the tokens."""
    reference, current = step.reference(RETAIN), step.logprobs(RETAIN)
    per_token = (reference.exp() * (reference - current)).sum(-1)
    valid = step.batch(RETAIN).valid.to(per_token.device)
    return (per_token * valid).sum() / valid.sum()


def ga_kl_loss(weight: float):
    def loss(step: Step) -> torch.Tensor:
        return -step.nll(FORGET).mean() + weight * retain_kl(step)

    return loss


@register_unlearning(
    "ga_kl", GAKLHyperParams, "Ascent on forget, KL to the original on retain", needs_retain=True
)
def ga_kl(
    lm: LM,
    forget: list[UnlearnItem],
    retain: list[UnlearnItem],
    hparams: GAKLHyperParams,
    progress: bool = False,
) -> UnlearnResult:
    loss = ga_kl_loss(hparams.retain_weight)
    return run_unlearning(
        lm, "ga_kl", forget, retain, hparams, loss, references=[RETAIN], progress=progress
    )
