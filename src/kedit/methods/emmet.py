"""EMMET (Gupta et al., 2024, "A Unified Framework for Model Editing"): a batch of facts written
into one MLP output projection W under equality constraints.

Where MEMIT asks W to map the batch's keys near their values in the least-squares sense, EMMET
asks for an exact map, (W + ΔW) k_i = v_i for every fact i, while moving the preserved keys'
outputs as little as possible (‖ΔW K₀‖², i.e. weighted by C = E[k kᵀ]). Its closed form,
ROME's rank-one update generalised to a batch, is (EMMET's batched solution, column-per-fact)

    ΔW = (V − W K) (Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹

Keys k_i are averaged over context prefixes and values v_i = W k_i + δ_i come from ROME's value
optimisation at the MLP output (`optimize_values`), so V − W K is the batch of deltas. In the
row-per-fact notation of MEMIT (K: n × in, D: n × out) ΔW = Dᵀ (K C⁻¹ Kᵀ)⁻¹ K C⁻¹, stored as
those two factors. Two facts with (nearly) the same key and different values cannot both hold;
`ridge` then adds ρ · mean(diag(K C⁻¹ Kᵀ)) to the diagonal and the constraints hold only
approximately.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kedit.edits import WeightDelta
from kedit.lm import LM
from kedit.methods._locate import (
    LocateHyperParams,
    as_param_factors,
    context_prefixes,
    inverse_second_moment,
    mlp_out_param,
    optimize_values,
)
from kedit.methods.registry import MethodResult, hp, register
from kedit.requests import EditRequest

MAX_CONDITION = 1e12


@dataclass
class EMMETHyperParams(LocateHyperParams):
    layers: list[int] = hp([5], "The one layer whose MLP output projection is edited.")
    ridge: float = hp(0.1, "ρ: relative ridge on Kᵀ C⁻¹ K for ill-conditioned batches (0: exact).")

    IGNORED = LocateHyperParams.IGNORED | {"mom2_update_weight"}

    def validate(self) -> None:
        super().validate()
        if len(self.layers) != 1:
            raise ValueError(f"layers: EMMET edits exactly one layer, got {self.layers!r}")
        if not self.ridge >= 0:
            raise ValueError(f"ridge: expected a number >= 0, got {self.ridge!r}")


@dataclass
class EMMETUpdate:
    """ΔW = left @ right (out × in); the edited W maps row i of `keys` to row i of `values`."""

    left: torch.Tensor
    right: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    steps: list[int]


def equality_constrained_factor(
    keys: torch.Tensor, inverse_moment: torch.Tensor, ridge: float = 0.0
) -> torch.Tensor:
    """`right` (n × in) with ΔW = Dᵀ @ right = Dᵀ (K C⁻¹ Kᵀ + ρ̄ I)⁻¹ K C⁻¹ for any deltas D.

    Rows of `keys` (n × in) are facts; ρ̄ = ρ · mean(diag(K C⁻¹ Kᵀ)). With ρ = 0,
    right @ Kᵀ = I, so (W + ΔW) k_i = W k_i + d_i for every i. A (nearly) singular K C⁻¹ Kᵀ
    raises (before any weight changes).
    """
    keys = keys.double()
    weighted = keys @ inverse_moment
    system = weighted @ keys.T
    system = system + ridge * system.diagonal().mean() * torch.eye(
        len(keys), dtype=torch.float64, device=system.device
    )
    condition = float(torch.linalg.cond(system))
    if not condition < MAX_CONDITION:
        raise ValueError(
            f"ridge: the batch's keys are (nearly) linearly dependent (condition number "
            f"{condition:.3g} of Kᵀ C⁻¹ K), so the equality constraints cannot all hold; "
            f"set ridge > 0 (e.g. 1e-3), got ridge={ridge!r}"
        )
    return torch.linalg.solve(system, weighted)


def compute_emmet(lm: LM, requests: list[EditRequest], hparams: EMMETHyperParams) -> EMMETUpdate:
    """The EMMET update of one batch on the model as it is now."""
    layer = lm.check_layer(hparams.layers[0])
    prefixes = context_prefixes(lm, hparams)
    site = lm.layout.mlp_out_name(layer)
    found = [
        f[0]
        for f in optimize_values(lm, requests, layer, prefixes, hparams, [site], key_layers=[layer])
    ]
    keys = torch.stack([f.keys[layer].mean(dim=0) for f in found]).double()
    right = equality_constrained_factor(
        keys, inverse_second_moment(lm, hparams, layer), hparams.ridge
    )
    deltas = torch.stack([f.delta.double() for f in found])
    module = lm.model.get_submodule(site)
    with torch.no_grad():
        start = module(keys.to(module.weight.dtype)).double()
    return EMMETUpdate(deltas.T, right, keys, start + deltas, [f.steps for f in found])


@register(
    "emmet",
    EMMETHyperParams,
    "Batched equality-constrained rank-one updates (Gupta et al., 2024)",
    True,
)
def emmet(lm: LM, requests: list[EditRequest], hparams: EMMETHyperParams) -> MethodResult:
    update = compute_emmet(lm, requests, hparams)
    param = mlp_out_param(lm, hparams.layers[0])
    delta = WeightDelta.low_rank(param, *as_param_factors(lm, update.left, update.right))
    return MethodResult([delta], {"value_steps": update.steps})
