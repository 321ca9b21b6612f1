"""MemFlex (Tian et al., 2024, with KnowUnDo): find where the forget set lives apart from the
retain set, and unlearn there only.

1. Localisation (§4.1). Each forget and retain item is copied `copies` times with its answer
   tokens replaced by random tokens (each with probability `random_share`); g_F and g_R are the
   gradients of each set's mean answer NLL over its copies, for every candidate weight matrix.
   A matrix is kept when the two sets pull it different ways and the forget set pulls it hard:

       cos(g_F, g_R) < τ    and    mean |g_F| > θ

2. Unlearning (§4.2) on the kept matrices only (their weights, or LoRA adapters on them):

       L = − w_F · E_F [ NLL(y | x) ] + w_R · E_R [ NLL(y | x) ]

   with KnowUnDo's factors w_F = 0.4 and w_R = 2.0 (`aux_type grad` in its code).

KnowUnDo localises among the LoRA tensors of a model it first fine-tuned with LoRA; kedit
localises among the weight matrices themselves (there is no fine-tuned adapter to start from),
then trains either them or fresh adapters on them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from kedit.data.unlearn_items import UnlearnItem
from kedit.lm import LM
from kedit.methods._rows import target_logp
from kedit.methods.registry import hp
from kedit.unlearn._train import (
    FORGET,
    RETAIN,
    Step,
    answer_logprobs,
    batches_of,
    encode_row,
    item_rows,
    keep_requires_grad,
    run_unlearning,
    weight_modules,
)
from kedit.unlearn.registry import UnlearnHyperParams, UnlearnResult, register_unlearning


@dataclass
class MemFlexHyperParams(UnlearnHyperParams):
    sim_threshold: float = hp(
        0.92, "τ: keep matrices whose forget/retain gradient cosine is below."
    )
    grad_threshold: float = hp(
        1e-4, "θ: keep matrices whose mean |forget gradient| is above (our measurement)."
    )
    copies: int = hp(3, "Random-label copies of each item for the localisation gradients.")
    random_share: float = hp(0.5, "Chance that an answer token of a copy is a random token.")
    forget_weight: float = hp(0.4, "w_F: weight of the forget set's ascent.")
    retain_weight: float = hp(2.0, "w_R: weight of the retain set's descent.")

    def validate(self) -> None:
        super().validate()
        if self.copies < 1:
            raise ValueError(f"copies: expected a positive integer, got {self.copies!r}")
        if not 0 <= self.random_share <= 1:
            raise ValueError(f"random_share: expected a number in [0, 1], got {self.random_share}")
        if not -1 <= self.sim_threshold <= 1:
            raise ValueError(
                f"sim_threshold: expected a number in [-1, 1], got {self.sim_threshold}"
            )


def randomised_rows(lm: LM, items: list[UnlearnItem], copies: int, share: float, seed: int):
    """`copies` rows per item whose answer tokens are each random with probability `share`."""
    special = set(lm.tokenizer.all_special_ids)
    vocabulary = [i for i in range(len(lm.tokenizer)) if i not in special]
    rng = random.Random(f"memflex-{seed}")
    rows = []
    for item, row in zip(items, item_rows(lm, items, "items"), strict=True):
        for _ in range(copies):
            noisy = [rng.choice(vocabulary) if rng.random() < share else t for t in row.targets]
            rows.append(encode_row(lm, item.prompt, noisy))
    return rows


def set_gradients(
    lm: LM, rows: list, modules: list[str], batch_size: int
) -> dict[str, torch.Tensor]:
    """The gradient of the rows' mean answer NLL for each module's weight (model unchanged)."""
    params = {module: lm.model.get_parameter(f"{module}.weight") for module in modules}
    chosen = {id(p) for p in params.values()}
    with keep_requires_grad(lm.model):
        for p in lm.model.parameters():
            p.requires_grad_(id(p) in chosen)
            p.grad = None
        for batch in batches_of(lm, rows, batch_size, None):
            logp = target_logp(answer_logprobs(lm.model, batch), batch).sum(1)
            nll = -logp / batch.valid.sum(1).to(logp.device)
            (nll.sum() / len(rows)).backward()
        grads = {module: p.grad.detach().float().clone() for module, p in params.items()}
        for p in params.values():
            p.grad = None
    return grads


def locate(
    forget_grads: dict[str, torch.Tensor],
    retain_grads: dict[str, torch.Tensor],
    sim_threshold: float,
    grad_threshold: float,
) -> tuple[list[str], dict[str, dict[str, float]]]:
    """The matrices with cos(g_F, g_R) < τ and mean |g_F| > θ, and every matrix's two values."""
    scores = {}
    for name, forget in forget_grads.items():
        cosine = torch.nn.functional.cosine_similarity(
            forget.flatten(), retain_grads[name].flatten(), dim=0
        )
        scores[name] = {"cosine": float(cosine), "magnitude": float(forget.abs().mean())}
    kept = [
        name
        for name, score in scores.items()
        if score["cosine"] < sim_threshold and score["magnitude"] > grad_threshold
    ]
    return kept, scores


def memflex_loss(forget_weight: float, retain_weight: float):
    def loss(step: Step) -> torch.Tensor:
        return -forget_weight * step.nll(FORGET).mean() + retain_weight * step.nll(RETAIN).mean()

    return loss


@register_unlearning(
    "memflex", MemFlexHyperParams, "Gradient-localised ascent/descent (KnowUnDo)", needs_retain=True
)
def memflex(
    lm: LM,
    forget: list[UnlearnItem],
    retain: list[UnlearnItem],
    hparams: MemFlexHyperParams,
    progress: bool = False,
) -> UnlearnResult:
    candidates = weight_modules(lm, hparams.parts, hparams.layers)
    grads = {
        name: set_gradients(
            lm,
            randomised_rows(lm, items, hparams.copies, hparams.random_share, hparams.seed),
            candidates,
            hparams.batch_size,
        )
        for name, items in ((FORGET, forget), (RETAIN, retain))
    }
    kept, scores = locate(
        grads[FORGET], grads[RETAIN], hparams.sim_threshold, hparams.grad_threshold
    )
    if not kept:
        magnitudes = [s["magnitude"] for s in scores.values()]
        cosines = [s["cosine"] for s in scores.values()]
        raise ValueError(
            f"sim_threshold, grad_threshold: no weight matrix has cosine < "
            f"{hparams.sim_threshold} and mean |g_F| > {hparams.grad_threshold} (cosines "
            f"{min(cosines):.3f}..{max(cosines):.3f}, magnitudes {min(magnitudes):.2e}.."
            f"{max(magnitudes):.2e}); raise τ or lower θ"
        )
    return run_unlearning(
        lm,
        "memflex",
        forget,
        retain,
        hparams,
        memflex_loss(hparams.forget_weight, hparams.retain_weight),
        modules=kept,
        progress=progress,
        info={"located": kept, "localisation": scores},
    )
