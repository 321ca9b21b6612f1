"""Rows of target tokens, their batches and their teacher-forced NLL: the objective that FT,
the adaptor and memory methods, the gradient editors, UltraEdit and unlearning share.

A row is one target of one request: the token ids the model reads, the positions whose next
token is a target token, and the target's ids. FT-L scores every target token at the prompt's
last token; everything else scores them teacher-forced after the prompt. A batch pads its rows
and records, per row, its weight in the loss and the NLL floor of its request (log k for a
request with k targets, whose targets each get about an equal share).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from kedit.lm import LM
from kedit.requests import EditRequest


@dataclass
class TargetRow:
    """One target of one request: token ids, the positions that score the target, the target's
    ids, the row's weight in the loss and the NLL floor of its request's targets (log k)."""

    ids: list[int]
    positions: list[int]
    targets: list[int]
    weight: float
    floor: float


@dataclass
class TargetBatch:
    """Token ids of some rows, and for each row the positions and ids of the target tokens to
    score, its weight in the loss and its NLL floor."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    valid: torch.Tensor
    weights: torch.Tensor
    floors: torch.Tensor

    @cached_property
    def reads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(rows, positions)` of every scored position, row by row (built once: the training
        loops read them at every step)."""
        rows = torch.arange(len(self.ids), device=self.positions.device)
        return rows.repeat_interleave(self.positions.shape[1]), self.positions.flatten()

    @cached_property
    def read_targets(self) -> torch.Tensor:
        """The target token at each of `reads`."""
        return self.targets.flatten()

    @cached_property
    def token_shares(self) -> torch.Tensor:
        """Each target token's share of its row's mean (0 at padding)."""
        return self.valid / self.valid.sum(1, keepdim=True)


def request_rows(
    lm: LM, request: EditRequest, last_token: bool, n_requests: int
) -> list[TargetRow]:
    """A request's rows, one per target; the weights make the loss the mean over `n_requests`
    requests of each request's mean over its targets."""
    prompt_ids = lm.encode_prompt(request.text)
    count = len(request.targets)
    return [
        target_row(lm, prompt_ids, target, last_token, 1 / (n_requests * count), math.log(count))
        for target in request.targets
    ]


def target_row(
    lm: LM, prompt_ids: list[int], target: str, last_token: bool, weight: float, floor: float
) -> TargetRow:
    """The row that scores `target` after the prompt: teacher-forced (the prompt and the target
    but its last token), or with `last_token` every target token at the prompt's last token."""
    target_ids = lm.encode(target)
    if last_token:
        return TargetRow(
            prompt_ids, [len(prompt_ids) - 1] * len(target_ids), target_ids, weight, floor
        )
    ids = prompt_ids + target_ids[:-1]
    return TargetRow(ids, list(range(len(prompt_ids) - 1, len(ids))), target_ids, weight, floor)


def target_rows(lm: LM, requests: list[EditRequest], last_token: bool = False) -> list[TargetRow]:
    """The rows of all the requests, one per target of each."""
    return [row for r in requests for row in request_rows(lm, r, last_token, len(requests))]


def batch_rows(lm: LM, rows: list[TargetRow]) -> TargetBatch:
    """The batch of some rows."""
    ids, mask = lm.pad([row.ids for row in rows])
    width = max(len(row.targets) for row in rows)

    def padded(values: list[list[int]]) -> list[list[int]]:
        return [v + [0] * (width - len(v)) for v in values]

    device = lm.device
    return TargetBatch(
        ids,
        mask,
        torch.tensor(padded([row.positions for row in rows]), device=device),
        torch.tensor(padded([row.targets for row in rows]), device=device),
        torch.tensor(padded([[1] * len(row.targets) for row in rows]), device=device).bool(),
        torch.tensor([row.weight for row in rows], device=device),
        torch.tensor([row.floor for row in rows], device=device),
    )


def target_batch(lm: LM, requests: list[EditRequest], last_token: bool = False) -> TargetBatch:
    """The batch of the requests' rows, one per target, each scoring the target's tokens."""
    return batch_rows(lm, target_rows(lm, requests, last_token))


def token_logp(logits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """Each target token's log-probability `[rows, width]` (0 at padding), from the logits at
    `batch.reads`."""
    return target_logp(torch.log_softmax(logits, dim=-1), batch)


def target_logp(logprobs: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """Each target token's log-probability `[rows, width]` (0 at padding), picked from the
    log-probabilities at `batch.reads`: flat `[reads, vocab]` or `[rows, width, vocab]`."""
    flat = logprobs.reshape(-1, logprobs.shape[-1])
    picked = flat.gather(1, batch.read_targets.to(flat.device)[:, None]).view(batch.valid.shape)
    return picked * batch.valid.to(flat.device)


def target_nll(logits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """Each row's mean target-token NLL, from the logits at `batch.reads`."""
    return -(token_logp(logits, batch) * batch.token_shares.to(logits.device)).sum(1)


def forward_target_nll(model: torch.nn.Module, batch: TargetBatch) -> torch.Tensor:
    """Each row of `batch`'s mean target-token NLL, from a full forward pass of `model`."""
    logits = model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits
    return target_nll(logits[batch.reads].float(), batch)
