"""Fine-tuning with random labels (KnowUnDo's `random_label --completely_random`): train the
forget prompts towards answers of random tokens (as many as the true answer has), so that the
true answers lose their probability to noise,

    L = E_F [ NLL(ỹ | x) ] + λ · E_R [ NLL(y | x) ]        (ỹ: random tokens, fixed per item)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from kedit.data.unlearn_items import UnlearnItem
from kedit.lm import LM
from kedit.unlearn._train import FORGET, Step, retain_term, run_unlearning
from kedit.unlearn.registry import UnlearnHyperParams, UnlearnResult, register_unlearning


@dataclass
class RandomLabelHyperParams(UnlearnHyperParams):
    pass


def random_answers(lm: LM, items: list[UnlearnItem], seed: int) -> list[list[int]]:
    """For each item, as many random token ids as its answer has (no special tokens)."""
    special = set(lm.tokenizer.all_special_ids)
    vocabulary = [i for i in range(len(lm.tokenizer)) if i not in special]
    rng = random.Random(f"random-labels-{seed}")
    return [[rng.choice(vocabulary) for _ in lm.encode(item.answer)] for item in items]


def random_label_loss(weight: float):
    def loss(step: Step) -> torch.Tensor:
        return step.nll(FORGET).mean() + retain_term(step, weight)

    return loss


@register_unlearning("random_label", RandomLabelHyperParams, "Fine-tune forget prompts on noise")
def random_label(
    lm: LM,
    forget: list[UnlearnItem],
    retain: list[UnlearnItem],
    hparams: RandomLabelHyperParams,
    progress: bool = False,
) -> UnlearnResult:
    return run_unlearning(
        lm,
        "random_label",
        forget,
        retain,
        hparams,
        random_label_loss(hparams.retain_weight),
        forget_answers=random_answers(lm, forget, hparams.seed),
        progress=progress,
    )
