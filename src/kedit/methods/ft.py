"""Fine-tuning baselines: FT-L (Zhu et al., 2020, as in ROME's baseline) and FT-M (EasyEdit).

Both train one layer's MLP output projection on the edit prompts.
- FT-L: every target token is scored at the last prompt token (the prompt's next-token
  distribution should hold the target's tokens); an optional L∞ norm constraint keeps each
  weight within ε of its original value.
- FT-M: the target tokens are scored teacher-forced after the prompt, the prompt masked out.
The blocks below the edited layer run once; training stops once every target is reached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kedit.edits import WeightDelta
from kedit.hooks import capture, start_at_block, stop_after
from kedit.lm import LM
from kedit.methods.registry import HyperParams, MethodResult, hp, register
from kedit.requests import EditRequest


@dataclass
class FTHyperParams(HyperParams):
    layers: list[int] = hp([5], "Layers whose MLP output projection is trained.")
    lr: float = hp(5e-4, "Adam learning rate.")
    steps: int = hp(25, "Maximum optimisation steps.")
    weight_decay: float = hp(0.0, "Adam weight decay.")
    norm_constraint: float | None = hp(None, "Keep each weight within this of its original value.")
    stop_nll: float = hp(0.05, "Stop once every request's mean target NLL is below this.")

    ALIASES = {"num_steps": "steps"}
    # EasyEdit's FT files carry `kl_factor`, which its FT does not read either.
    IGNORED = HyperParams.IGNORED | {"batch_size", "objective_optimization", "kl_factor"}

    def validate(self) -> None:
        if not self.layers:
            raise ValueError("layers: expected at least one layer, got []")
        if self.steps < 1:
            raise ValueError(f"steps: expected a positive integer, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")
        if self.norm_constraint is not None and not self.norm_constraint > 0:
            raise ValueError(
                f"norm_constraint: expected a positive number or None, got {self.norm_constraint!r}"
            )


def _batch(lm: LM, requests: list[EditRequest], last_token: bool):
    """Token ids, and for each row the positions and ids of the target tokens to score."""
    rows, positions, targets = [], [], []
    for request in requests:
        prompt_ids, target_ids = lm.encode_prompt(request.text), lm.encode(request.target_new)
        if last_token:
            rows.append(prompt_ids)
            positions.append([len(prompt_ids) - 1] * len(target_ids))
        else:
            rows.append(prompt_ids + target_ids[:-1])
            positions.append(list(range(len(prompt_ids) - 1, len(rows[-1]))))
        targets.append(target_ids)
    ids, mask = lm.pad(rows)
    width = max(len(t) for t in targets)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    tgt = torch.zeros((len(rows), width), dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, (p, t) in enumerate(zip(positions, targets, strict=True)):
        pos[row, : len(p)], tgt[row, : len(t)], valid[row, : len(t)] = (
            torch.tensor(p),
            torch.tensor(t),
            True,
        )
    return ids, mask, pos.to(lm.device), tgt.to(lm.device), valid.to(lm.device)


def fine_tune(
    lm: LM, requests: list[EditRequest], hparams: FTHyperParams, last_token: bool
) -> MethodResult:
    """Train the chosen projections; return their change as dense deltas (model unchanged)."""
    model, layout = lm.model, lm.layout
    layers = sorted(lm.check_layer(layer) for layer in hparams.layers)
    names = [f"{layout.mlp_out_name(layer)}.weight" for layer in layers]
    params = [model.get_parameter(name) for name in names]
    originals = [p.detach().clone() for p in params]
    ids, mask, positions, targets, valid = _batch(lm, requests, last_token)
    rows = torch.arange(len(requests), device=lm.device)[:, None]

    first_block = layout.block(layers[0])
    with torch.no_grad(), capture(model, [first_block], "input") as seen:
        with stop_after(model, first_block):
            model(input_ids=ids, attention_mask=mask, use_cache=False)

    trainable = {id(p) for p in params}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in trainable]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(params, lr=hparams.lr, weight_decay=hparams.weight_decay)
    step = 0
    try:
        with start_at_block(model, layout.blocks, layers[0], seen[first_block]):
            for step in range(hparams.steps + 1):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                logp = torch.log_softmax(logits[rows, positions].float(), dim=-1)
                token_logp = logp.gather(2, targets[..., None]).squeeze(-1) * valid
                nll = -token_logp.sum(1) / valid.sum(1)
                if step == hparams.steps or float(nll.detach().max()) < hparams.stop_nll:
                    break
                optimizer.zero_grad()
                nll.mean().backward()
                optimizer.step()
                if hparams.norm_constraint is not None:
                    with torch.no_grad():
                        for p, original in zip(params, originals, strict=True):
                            eps = hparams.norm_constraint
                            p.copy_(torch.clamp(p, original - eps, original + eps))
        deltas = [
            WeightDelta.from_dense(name, p.detach().float() - original.float())
            for name, p, original in zip(names, params, originals, strict=True)
        ]
    finally:
        for p in frozen:
            p.requires_grad_(True)
        with torch.no_grad():
            for p, original in zip(params, originals, strict=True):
                p.copy_(original)
    return MethodResult(deltas, {"steps": step, "final_nll": float(nll.detach().max())})


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
