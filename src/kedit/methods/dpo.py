"""DPO, Direct Preference Optimization (Rafailov et al., 2023, "Direct Preference Optimization:
Your Language Model is Secretly a Reward Model"): the preference-tuning baseline that SafeEdit
(Wang et al., 2024) compares with DINM.

Each request gives a prompt x, the chosen answer y_w (`target_new`, the safe one) and the
rejected answer y_l (`target_true`, required). log π(y|x) is the sum of the answer's
teacher-forced token log-probabilities after the prompt; π_ref is the unedited model, scored
once before tuning. The loss of a batch of requests is the mean over them of (eq. 7)

    −log σ(β·[(log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))]),

β·log(π_θ(y|x)/π_ref(y|x)) being the answer's implicit reward (§5) and the bracket times β the
reward margin. Only the MLP output projections of `layers` train, with Adam, on FT's machinery
(`kedit.methods._tune`: the blocks below the first run once, float32 masters). Training stops
once every request's chosen answer is the teacher-forced argmax at each of its tokens and its
own loss is below `stop_loss` (0: never early), or after `steps` steps. The edit is a dense
`WeightDelta` per projection; its info holds the steps, the final loss (the batch mean) and
each request's reward margin and whether its chosen answer is the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kedit.lm import LM
from kedit.methods._rows import TargetBatch, TargetRow, target_row, token_logp
from kedit.methods._tune import ProjectionTuning, Scored
from kedit.methods.registry import HyperParams, MethodResult, hp, register
from kedit.requests import EditRequest


@dataclass
class DPOHyperParams(HyperParams):
    layers: list[int] = hp([5], "Layers whose MLP output projection is trained.")
    beta: float = hp(0.1, "β: weight of the implicit KL to the unedited model (the paper's 0.1).")
    lr: float = hp(5e-4, "Adam learning rate.")
    steps: int = hp(25, "Maximum optimisation steps.")
    weight_decay: float = hp(0.0, "Adam weight decay.")
    stop_loss: float = hp(
        0.1,
        "Stop once every request's chosen answer is the teacher-forced argmax and its DPO loss is"
        " below this (0: never stop early).",
    )
    batch_tokens: int | None = hp(
        None,
        "Token budget of one forward and backward pass; more requests accumulate gradients over"
        " several (None: what fits the device, at most 4096; kedit.methods._memory).",
    )

    ALIASES = {"num_steps": "steps"}

    def validate(self) -> None:
        if not self.layers:
            raise ValueError("layers: expected at least one layer, got []")
        if self.steps < 1:
            raise ValueError(f"steps: expected a positive integer, got {self.steps!r}")
        for name in ("beta", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        for name in ("weight_decay", "stop_loss"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {getattr(self, name)!r}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise ValueError(
                f"batch_tokens: expected a positive integer or None, got {self.batch_tokens!r}"
            )


def preference_rows(lm: LM, requests: list[EditRequest]) -> list[list[TargetRow]]:
    """Per request, the teacher-forced rows of its chosen and its rejected answer (a group that
    one batch holds: the loss joins them)."""
    groups = []
    for index, request in enumerate(requests):
        if request.target_true is None:
            raise ValueError(
                f"requests[{index}].target_true: DPO needs the rejected answer; the request "
                f"{request.text!r} has none"
            )
        if request.target_true == request.target_new:
            raise ValueError(
                f"requests[{index}].target_true: {request.target_true!r} is also target_new; DPO "
                "needs a rejected answer other than the chosen one"
            )
        prompt = lm.encode_prompt(request.text)
        weight = 1 / len(requests)
        groups.append(
            [
                target_row(lm, prompt, answer, False, weight, 0.0)
                for answer in (request.target_new, request.target_true)
            ]
        )
    return groups


def answer_logp(logits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """log π(y|x) of each request's (chosen, rejected) answer, `[requests, 2]`: the sum of the
    answer's token log-probabilities."""
    return token_logp(logits, batch).sum(1).view(-1, 2)


def chosen_is_argmax(logits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """Whether each request's chosen answer is the argmax at every one of its tokens."""
    predicted = logits.argmax(-1).view(batch.valid.shape)
    hits = (predicted == batch.targets.to(predicted.device)) | ~batch.valid.to(predicted.device)
    return hits.all(1)[0::2]


def dpo_loss(
    policy: torch.Tensor, reference: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each request's DPO loss (eq. 7) and reward margin, from the (chosen, rejected) answers'
    log-probabilities `[requests, 2]` under the tuned and the reference model."""
    rewards = beta * (policy - reference)
    margins = rewards[:, 0] - rewards[:, 1]
    return -torch.nn.functional.logsigmoid(margins), margins


class PreferenceObjective:
    """DPO's objective on the batches of some requests, against the reference log-probabilities
    of the model as it is when this is built (scored here, once, without gradients)."""

    def __init__(self, lm: LM, requests: list[EditRequest], hparams: DPOHyperParams) -> None:
        self.hparams, self.n_requests = hparams, len(requests)
        groups = preference_rows(lm, requests)
        self.tuning = ProjectionTuning(lm, hparams.layers, groups, hparams.batch_tokens)
        with torch.no_grad():
            self.reference = [
                answer_logp(self.tuning.logits(index), batch)
                for index, batch in enumerate(self.tuning.batches)
            ]

    def __call__(self, logits: torch.Tensor, index: int) -> Scored:
        batch = self.tuning.batches[index]
        losses, margins = dpo_loss(
            answer_logp(logits, batch), self.reference[index], self.hparams.beta
        )
        reached = chosen_is_argmax(logits.detach(), batch)
        met = reached & (losses.detach() < self.hparams.stop_loss)  # a NaN never meets it
        values = {"loss": losses.detach(), "margin": margins.detach(), "reached": reached}
        return Scored(losses.sum() / self.n_requests, met, values)


@register(
    "dpo", DPOHyperParams, "Preference-tune MLP projections: chosen over rejected (DPO)", True
)
def dpo(lm: LM, requests: list[EditRequest], hparams: DPOHyperParams) -> MethodResult:
    """All the requests in one update (the loss their mean)."""
    objective = PreferenceObjective(lm, requests, hparams)
    tuned = objective.tuning.train(objective, hparams.steps, hparams.lr, hparams.weight_decay)
    values = tuned.values
    info = {
        "steps": tuned.steps,
        "final_loss": float(values["loss"].mean()),
        "margins": [float(m) for m in values["margin"]],
        "reached": [bool(r) for r in values["reached"]],
    }
    return MethodResult(tuned.deltas, info)
