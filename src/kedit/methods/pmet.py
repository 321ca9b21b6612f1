"""PMET (Li et al., 2024, "PMET: Precise Model Editing in a Transformer"): MEMIT with the
attention and FFN hidden states optimised jointly, and only the FFN updated.

A transformer layer's output is h^L = h^{L-1} + a^L + m^L: the attention (MHSA) output a^L,
the FFN output m^L and the residual. MEMIT optimises one delta on h^L and asks the FFNs alone
to produce it, although part of it would have to come through attention. PMET instead adds
two deltas at the subject's last token of the last edited layer L, one to the attention output
projection's output (δ_a) and one to the MLP output projection's output (δ_m), and optimises
them together with MEMIT's loss (target NLL after context prefixes, KL on "{subject} is a",
weight decay and a norm clamp per delta). The attention weights stay unchanged (PMET's
finding: MHSA holds general extraction patterns, not the fact): δ_a is discarded and the FFN
target z_m = m^L + δ_m alone drives the update.

The FFN update is MEMIT's least squares per layer l, lowest first,

    ΔW_l = R_l K_lᵀ (λ C_l + K_l K_lᵀ)⁻¹                                     (MEMIT Eq. 14)

with the residual measured at the FFN output of layer L instead of the residual stream,
R_l = (z_m - m^L) / sqrt(layers left) ("square-root spread": the lower layers take a larger
share than MEMIT's 1/(layers left)), m^L re-measured after the layers below were updated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kedit.lm import LM
from kedit.methods._spread import (
    SpreadHyperParams,
    least_squares_solver,
    spread_over_layers,
    value_targets,
)
from kedit.methods.registry import MethodResult, register
from kedit.requests import EditRequest


@dataclass
class PMETHyperParams(SpreadHyperParams):
    """PMET's hyper-parameters: MEMIT's (the value optimisation's and the spread's)."""

    IGNORED = SpreadHyperParams.IGNORED | {
        "rewrite_module_tmps",
        "layer_selection",
        "mom2_adjustment",
    }


@register(
    "pmet",
    PMETHyperParams,
    "MEMIT with attention and FFN states optimised jointly, FFN updated (Li et al., 2024)",
    True,
)
def pmet(lm: LM, requests: list[EditRequest], hparams: PMETHyperParams) -> MethodResult:
    layers = sorted(lm.check_layer(layer) for layer in hparams.layers)
    solve = least_squares_solver(lm, hparams, layers, len(requests))  # before any layer changes
    top = layers[-1]
    sites = [lm.layout.attn_out_name(top), lm.layout.mlp_out_name(top)]
    targets = value_targets(lm, requests, hparams, sites)  # the FFN's z_m; δ_a is dropped
    deltas = spread_over_layers(
        lm, requests, hparams, targets, solve, site=sites[1], divisor=math.sqrt
    )
    return MethodResult(deltas, {"value_steps": targets.steps})
