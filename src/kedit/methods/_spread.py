"""What MEMIT shares with PMET, AlphaEdit and EMMET: target values at the last edited layer,
keys averaged over context prefixes, the least-squares update of one layer (MEMIT Eq. 14), and
the spreading of a residual change over several layers, lowest first (MEMIT Alg. 1).

Notation of MEMIT (Meng et al., 2023) in row-per-fact form: K (n × in) holds the facts' keys at
a layer, R (n × out) the residuals that layer takes, C = E[k kᵀ] the second moment of the
unedited layer's keys and λ = mom2_update_weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kedit.edits import WeightDelta, compute_in_sequence
from kedit.hooks import capture, stop_after
from kedit.lm import LM
from kedit.methods._locate import (
    LocateHyperParams,
    as_param_factors,
    context_prefixes,
    keys_at_lookup,
    layer_second_moment,
    lookup_index,
    mlp_out_param,
    optimize_values,
    second_moment_cholesky,
)
from kedit.methods.registry import hp
from kedit.requests import EditRequest

Solver = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""`solve(layer, residuals, keys)`: the `(left, right)` factors of one layer's update."""


@dataclass
class SpreadHyperParams(LocateHyperParams):
    """The hyper-parameters of an update spread over several layers by least squares (MEMIT's)."""

    layers: list[int] = hp([3, 4, 5, 6, 7, 8], "Layers whose MLP output projections are edited.")
    clamp_norm_factor: float = hp(0.75, "Clamp ‖δ‖ to this multiple of the residual's norm.")
    mom2_update_weight: float = hp(15000.0, "λ: weight of the preserved statistics C.")

    # EasyEdit's MEMIT files carry these; its MEMIT reads neither (C is always used).
    IGNORED = LocateHyperParams.IGNORED | {"mom2_adjustment", "layer_selection"}

    def validate(self) -> None:
        super().validate()
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers: repeated layer in {self.layers!r}")
        if not self.mom2_update_weight >= 0:
            raise ValueError(
                f"mom2_update_weight: expected a number >= 0, got {self.mom2_update_weight!r}"
            )


def least_squares_update(
    residuals: torch.Tensor,
    keys: torch.Tensor,
    moment: torch.Tensor,
    weight: float,
    cholesky: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(left, right)` with ΔW = left @ right solving ΔW (λC + KᵀK) = Rᵀ K (rows of K, R = facts).

    left = Rᵀ (out × n), right = Kᵀ-solved (n × in); MEMIT Eq. 14 in row-per-fact notation,
    solved in float64 on C's device. Given C's lower Cholesky factor (and λ > 0), the n × n
    system of the push-through identity (λC + KᵀK)⁻¹Kᵀ = C⁻¹Kᵀ(λI + K C⁻¹ Kᵀ)⁻¹ is solved
    instead of the in × in one.
    """
    keys, residuals = keys.to(moment.device, torch.float64), residuals.double()
    if cholesky is not None and weight > 0:
        spread = torch.cholesky_solve(keys.T, cholesky)
        gram = keys @ spread
        gram.diagonal().add_(weight)
        return residuals.T, torch.linalg.solve(gram, spread.T)
    system = weight * moment + keys.T @ keys
    right = torch.linalg.solve(system, keys.T).T
    return residuals.T, right


def least_squares_solver(
    lm: LM, hparams: SpreadHyperParams, layers: list[int], n_facts: int
) -> Solver:
    """`solve(layer, residuals, keys)`: MEMIT Eq. 14 with the unedited model's statistics.

    Every layer's C is fetched now, before any layer changes (fetched later, a higher layer's
    statistics would be collected on a model whose lower layers are already updated, and
    cached under the unedited model's name). With fewer facts than key dimensions, C's
    Cholesky factor, kept per model, makes each solve n × n.
    """
    moments = {layer: layer_second_moment(lm, hparams, layer) for layer in layers}
    factors = {
        layer: second_moment_cholesky(lm, hparams, layer)
        for layer in layers
        if n_facts < moments[layer].shape[0] and hparams.mom2_update_weight > 0
    }

    def solve(layer: int, residuals: torch.Tensor, keys: torch.Tensor):
        return least_squares_update(
            residuals, keys, moments[layer], hparams.mom2_update_weight, factors.get(layer)
        )

    return solve


@torch.no_grad()
def residuals_at_lookup(
    lm: LM, layer: int, requests: list[EditRequest], fact_token: str, site: str | None = None
) -> torch.Tensor:
    """Output of module `site` (block `layer` by default) at each request's edited token,
    bare prompt (n × hidden, float64, on the site's device)."""
    ids, mask = lm.pad([lm.encode_prompt(r.text) for r in requests])
    positions = torch.tensor(
        [lookup_index(lm, "", r.text, r.subject, fact_token) for r in requests]
    )
    site = site or lm.layout.block(layer)
    with capture(lm.model, [site]) as seen, stop_after(lm.model, site):
        lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    output = seen[site]
    rows = torch.arange(len(requests), device=output.device)
    return output[rows, positions.to(output.device)].double()


def value_targets(
    lm: LM, requests: list[EditRequest], hparams: LocateHyperParams, layer: int, sites: list[str]
) -> tuple[list[torch.Tensor], list[int]]:
    """Per site (modules of block `layer`, optimised jointly), the target outputs z_i
    (n × hidden, float64); and the optimisation steps taken per request."""
    prefixes = context_prefixes(lm, hparams)
    found = optimize_values(lm, requests, layer, prefixes, hparams, sites)
    targets = [
        torch.stack([f[s].initial_output.double() + f[s].delta.double() for f in found])
        for s in range(len(sites))
    ]
    return targets, [f[0].steps for f in found]


def memit_targets(
    lm: LM, requests: list[EditRequest], hparams: LocateHyperParams, layer: int
) -> tuple[torch.Tensor, list[int]]:
    """Target residuals z_i at block `layer` (n × hidden) and the optimisation steps taken."""
    targets, steps = value_targets(lm, requests, hparams, layer, [lm.layout.block(layer)])
    return targets[0], steps


def mean_keys(
    lm: LM, layer: int, requests: list[EditRequest], prefixes: list[str], fact_token: str
) -> torch.Tensor:
    """Each request's key at `layer`, averaged over the context prefixes (n × in, float64)."""
    return torch.stack(
        [
            keys_at_lookup(lm, layer, prefixes, request, fact_token)[0].mean(dim=0)
            for request in requests
        ]
    ).double()


def spread_over_layers(
    lm: LM,
    requests: list[EditRequest],
    hparams: LocateHyperParams,
    targets: torch.Tensor,
    solve: Solver,
    site: str | None = None,
    divisor: Callable[[int], float] = float,
) -> list[WeightDelta]:
    """Distribute the residual change over the layers, lowest first (MEMIT Alg. 1).

    `targets` are outputs of module `site` of the last edited layer (by default that block's
    output, the residual stream) at the subjects' last tokens. Each layer takes what is still
    missing there divided by `divisor(number of layers left)` (MEMIT: the number itself).
    `solve(layer, residuals, keys)` returns the `(left, right)` factors of one layer's update;
    each layer's update is applied before the next layer's keys and residuals are measured.
    """
    layers = sorted(lm.check_layer(layer) for layer in hparams.layers)
    prefixes = context_prefixes(lm, hparams)

    def compute(index: int) -> list[WeightDelta]:
        layer = layers[index]
        keys = mean_keys(lm, layer, requests, prefixes, hparams.fact_token)
        current = residuals_at_lookup(lm, layers[-1], requests, hparams.fact_token, site)
        residuals = (targets.to(current.device) - current) / divisor(len(layers) - index)
        left, right = solve(layer, residuals, keys)
        return [WeightDelta.low_rank(mlp_out_param(lm, layer), *as_param_factors(lm, left, right))]

    return compute_in_sequence(lm.model, range(len(layers)), compute)
