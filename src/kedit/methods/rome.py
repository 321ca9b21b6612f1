"""ROME (Meng et al., 2022) and r-ROME (Gupta et al., 2024): rank-one MLP edits.

A fact is written by a rank-one change of one MLP output projection W (out × in) so that
the key k of the subject's last token maps to a value v that makes the target likely:

    ΔW = (v - W k) uᵀ / (uᵀ k),   u = C⁻¹ k*                                  (ROME Eq. 2)

with C = E[k kᵀ] over a corpus (covariance adjustment; C = I when off) and k* the key averaged
over context prefixes. ROME's reference implementation puts the key of the bare prompt (k₀) in
the denominator and in W k, while u uses k*: `rome` keeps that, so it maps k₀ to v. r-ROME
uses k* in both places, so it maps k* to v, which keeps sequential edits stable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kedit.edits import WeightDelta, compute_in_sequence
from kedit.lm import LM
from kedit.methods._locate import (
    LocateHyperParams,
    ValueResult,
    as_param_factors,
    context_prefixes,
    inverse_second_moment,
    mlp_out_param,
    optimize_value,
    optimize_values,
)
from kedit.methods.registry import MethodResult, hp, register
from kedit.requests import EditRequest


@dataclass
class ROMEHyperParams(LocateHyperParams):
    layers: list[int] = hp([5], "The one layer whose MLP output projection is edited.")
    mom2_adjustment: bool = hp(True, "Use C⁻¹k* (covariance adjustment) instead of k*.")

    IGNORED = LocateHyperParams.IGNORED | {"mom2_update_weight"}

    def validate(self) -> None:
        super().validate()
        if len(self.layers) != 1:
            raise ValueError(f"layers: ROME edits exactly one layer, got {self.layers!r}")


@dataclass
class RankOneUpdate:
    """ΔW = left ⊗ right (out × in); `key` is the key that the edited W maps to `value`."""

    left: torch.Tensor
    right: torch.Tensor
    key: torch.Tensor
    k_star: torch.Tensor
    value: torch.Tensor
    steps: int
    target_nll: float


def rank_one_update(
    delta: torch.Tensor,
    key: torch.Tensor,
    k_star: torch.Tensor,
    inverse_moment: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(left, right)` with (W + left ⊗ right) key = W key + delta, right = C⁻¹k* / (·ᵀ key)."""
    direction = k_star.double() if inverse_moment is None else inverse_moment @ k_star.double()
    right = direction / (direction @ key.double())
    return delta.double(), right


def compute_rank_one(
    lm: LM,
    request: EditRequest,
    hparams: ROMEHyperParams,
    corrected: bool,
    found: ValueResult | None = None,
) -> RankOneUpdate:
    """The ROME (corrected=False) or r-ROME (corrected=True) update for one request; `found` is
    its value optimisation when already done (on the model as it is now, with the keys of the
    edited layer)."""
    layer = lm.check_layer(hparams.layers[0])
    site = lm.layout.mlp_out_name(layer)
    if found is None:
        prefixes = context_prefixes(lm, hparams)
        found = optimize_value(lm, request, layer, prefixes, hparams, site, key_layers=[layer])
    keys = found.keys[layer]  # one per prefix; the first after the bare prompt
    k_star = keys.mean(dim=0)
    inverse = inverse_second_moment(lm, hparams, layer) if hparams.mom2_adjustment else None
    if corrected:
        module = lm.model.get_submodule(site)
        key = k_star
        with torch.no_grad():
            start = module(k_star.to(module.weight.dtype)[None])[0].float()
    else:
        key, start = keys[0], found.initial_output
    left, right = rank_one_update(found.delta, key, k_star, inverse)
    return RankOneUpdate(
        left, right, key, k_star, start + found.delta, found.steps, found.target_nll
    )


def _rank_one_deltas(lm: LM, hparams: ROMEHyperParams, update: RankOneUpdate) -> list[WeightDelta]:
    param = mlp_out_param(lm, hparams.layers[0])
    return [WeightDelta.low_rank(param, *as_param_factors(lm, update.left, update.right))]


def _edit(
    lm: LM, requests: list[EditRequest], hparams: ROMEHyperParams, corrected: bool
) -> MethodResult:
    """Edits one request after another, each on the model as the previous ones left it."""
    steps: list[int] = []

    def compute(request: EditRequest) -> list[WeightDelta]:
        update = compute_rank_one(lm, request, hparams, corrected)
        steps.append(update.steps)
        return _rank_one_deltas(lm, hparams, update)

    return MethodResult(compute_in_sequence(lm.model, requests, compute), {"value_steps": steps})


def _each(
    lm: LM, requests: list[EditRequest], hparams: ROMEHyperParams, corrected: bool
) -> list[MethodResult]:
    """Each request's own edit of the model as it is now, the value optimisations batched."""
    layer = lm.check_layer(hparams.layers[0])
    prefixes = context_prefixes(lm, hparams)
    site = lm.layout.mlp_out_name(layer)
    results = []
    found_all = optimize_values(lm, requests, layer, prefixes, hparams, [site], key_layers=[layer])
    for request, found in zip(requests, found_all, strict=True):
        update = compute_rank_one(lm, request, hparams, corrected, found[0])
        deltas = _rank_one_deltas(lm, hparams, update)
        results.append(MethodResult(deltas, {"value_steps": [update.steps]}))
    return results


@register(
    "rome",
    ROMEHyperParams,
    "Rank-one model editing (Meng et al., 2022)",
    each=lambda lm, requests, hparams: _each(lm, requests, hparams, corrected=False),
)
def rome(lm: LM, requests: list[EditRequest], hparams: ROMEHyperParams) -> MethodResult:
    return _edit(lm, requests, hparams, corrected=False)


@register(
    "r-rome",
    ROMEHyperParams,
    "ROME with the key mismatch corrected (Gupta et al., 2024)",
    defaults="rome",
    each=lambda lm, requests, hparams: _each(lm, requests, hparams, corrected=True),
)
def r_rome(lm: LM, requests: list[EditRequest], hparams: ROMEHyperParams) -> MethodResult:
    return _edit(lm, requests, hparams, corrected=True)
