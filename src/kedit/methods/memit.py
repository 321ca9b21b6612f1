"""MEMIT (Meng et al., 2023): many facts at once, spread over several MLP layers.

For each fact i a target residual z_i at the last edited layer L is found by gradient steps
(the ROME value optimisation, with the delta added to block L's output). Then, layer by layer
from the lowest, each layer l takes its share of what is still missing,

    R = (Z - H_L) / (number of layers left)                                  (MEMIT Eq. 14-15)
    ΔW_l = R Kᵀ (λ C + K Kᵀ)⁻¹                                              (MEMIT Eq. 14)

with K the facts' keys at layer l (averaged over context prefixes), H_L the current residuals at
layer L (both measured after the layers below l were updated), C = E[k kᵀ] of the unedited
model (every layer's C is fetched before the first update) and λ = mom2_update_weight. ΔW is
stored as the rank-n product Rᵀ-by-(solved keys), so a batch of n edits saves as 2·n vectors
per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from kedit.lm import LM
from kedit.methods._spread import (
    SpreadHyperParams,
    least_squares_solver,
    memit_targets,
    spread_over_layers,
)
from kedit.methods.registry import MethodResult, register
from kedit.requests import EditRequest


@dataclass
class MEMITHyperParams(SpreadHyperParams):
    """MEMIT's hyper-parameters: the value optimisation's and the spread's."""


@register(
    "memit", MEMITHyperParams, "Mass-editing memory in a transformer (Meng et al., 2023)", True
)
def memit(lm: LM, requests: list[EditRequest], hparams: MEMITHyperParams) -> MethodResult:
    layers = sorted(lm.check_layer(layer) for layer in hparams.layers)
    solve = least_squares_solver(lm, hparams, layers, len(requests))  # Eq. 14, C unedited
    targets = memit_targets(lm, requests, hparams)  # z_i at layer L
    deltas = spread_over_layers(lm, requests, hparams, targets, solve)  # Alg. 1
    return MethodResult(deltas, {"value_steps": targets.steps})
