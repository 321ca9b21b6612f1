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
from kedit.lm import LM
from kedit.methods._above import adds_to_block_output
from kedit.methods._locate import (
    BlockInput,
    LocateHyperParams,
    as_param_factors,
    context_prefixes,
    layer_second_moment,
    lookup_activations,
    lookup_from_block,
    mlp_out_param,
    optimize_values,
    second_moment_cholesky,
)
from kedit.methods.registry import hp
from kedit.requests import EditRequest

# Up to this size the lowest edited block's input is kept from the value pass for the higher
# layers' lookups; a larger batch runs the whole model again for each (less memory, more time).
BLOCK_INPUT_BYTES = 2**30

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


@dataclass
class Targets:
    """What the spread starts from, per request (rows, float64, from the unedited model): the
    target output z_i of the measured site at the top edited layer, the site's unedited output
    there (after the bare prompt), and the lowest edited layer's keys averaged over the context
    prefixes; and the value optimisation's steps. With more than one edited layer, also each
    request's `BlockInput` at the lowest edited block (above it, where its update adds to its
    output), where the lookups of the higher layers start."""

    values: torch.Tensor
    current: torch.Tensor
    keys: torch.Tensor
    steps: list[int]
    block_inputs: list[BlockInput] | None = None


def value_targets(
    lm: LM, requests: list[EditRequest], hparams: LocateHyperParams, sites: list[str]
) -> Targets:
    """The `Targets` of the last of `sites` (modules of the top edited layer, optimised jointly
    by the value optimisation; the others' deltas are dropped)."""
    layers = sorted(lm.check_layer(layer) for layer in hparams.layers)
    prefixes = context_prefixes(lm, hparams)
    resume = len(layers) > 1 and _block_input_bytes(lm, requests, prefixes) <= BLOCK_INPUT_BYTES
    found = optimize_values(
        lm,
        requests,
        layers[-1],
        prefixes,
        hparams,
        sites,
        key_layers=[layers[0]],
        input_of=layers[0] if resume else None,
    )
    measured = [f[-1] for f in found]
    current = torch.stack([f.initial_output for f in measured]).double()
    return Targets(
        values=current + torch.stack([f.delta for f in measured]).double(),
        current=current,
        keys=torch.stack([f.keys[layers[0]].mean(dim=0) for f in measured]).double(),
        steps=[f.steps for f in measured],
        block_inputs=[f.block_input for f in measured] if resume else None,
    )


def _block_input_bytes(lm: LM, requests: list[EditRequest], prefixes: list[str]) -> int:
    """About what the lowest edited block's `BlockInput` over every request's prefixed prompts
    takes at most (the longest prefix's length for each; its output, its MLP output
    projection's input and output)."""
    tokens = sum(len(lm.encode_prompt(prefixes[-1] + request.text)) for request in requests)
    projection = lm.model.get_submodule(lm.layout.mlp_out_name(0)).weight
    keys, hidden = lm.layout.in_out(projection)
    return tokens * len(prefixes) * (2 * hidden + keys) * projection.element_size()


def memit_targets(lm: LM, requests: list[EditRequest], hparams: LocateHyperParams) -> Targets:
    """The `Targets` of the residual stream: the top edited block's output."""
    top = max(lm.check_layer(layer) for layer in hparams.layers)
    return value_targets(lm, requests, hparams, [lm.layout.block(top)])


def spread_over_layers(
    lm: LM,
    requests: list[EditRequest],
    hparams: LocateHyperParams,
    targets: Targets,
    solve: Solver,
    site: str | None = None,
    divisor: Callable[[int], float] = float,
) -> list[WeightDelta]:
    """Distribute the residual change over the layers, lowest first (MEMIT Alg. 1).

    `targets` are outputs of module `site` of the last edited layer (by default that block's
    output, the residual stream) at the edited tokens. Each layer takes what is still missing
    there divided by `divisor(number of layers left)` (MEMIT: the number itself).
    `solve(layer, residuals, keys)` returns the `(left, right)` factors of one layer's update;
    the next layer's keys and residuals are measured with each layer's update in place (the
    lowest layer's come with the targets, from the unedited model; the others' from the
    `BlockInput` the targets carry, passed on from lookup to lookup so that each starts above
    the block edited last, as no block below it has changed since, and adds that block's
    update to its projection's output there).
    """
    layers = sorted(lm.check_layer(layer) for layer in hparams.layers)
    prefixes = context_prefixes(lm, hparams)
    site = site or lm.layout.block(layers[-1])
    inputs = targets.block_inputs
    # Each lookup starts above the block edited last where every edited projection's output
    # adds to its block's: the deltas so far reach it only through that projection's change,
    # added there, and none is written into the model. Else they are written (in sequence).
    chained = inputs is not None and all(
        adds_to_block_output(lm, layer, lm.layout.mlp_out_name(layer)) for layer in layers[:-1]
    )
    made: list[WeightDelta] = []

    def compute(index: int) -> list[WeightDelta]:
        nonlocal inputs
        layer = layers[index]
        if index == 0:
            keys, current = targets.keys, targets.current
        else:
            if inputs is not None:
                # The next lookup starts above this layer's block where its update adds to
                # the block's output, from what this lookup passes there.
                keep = index + 1 < len(layers) and adds_to_block_output(
                    lm, layer, lm.layout.mlp_out_name(layer)
                )
                seen, outputs, after = lookup_from_block(
                    lm,
                    inputs,
                    [layer],
                    [site],
                    layer if keep else None,
                    made[-1] if chained else None,
                )
                inputs = after or inputs
            else:
                seen, outputs = lookup_activations(
                    lm, requests, prefixes, hparams.fact_token, [layer], [site]
                )
            keys, current = seen[layer].mean(dim=1).double(), outputs[site][:, 0].double()
        residuals = (targets.values.to(current.device) - current) / divisor(len(layers) - index)
        left, right = solve(layer, residuals, keys)
        made.append(
            WeightDelta.low_rank(mlp_out_param(lm, layer), *as_param_factors(lm, left, right))
        )
        return made[-1:]

    if chained:
        for index in range(len(layers)):
            compute(index)
        return made
    return compute_in_sequence(lm.model, range(len(layers)), compute)
