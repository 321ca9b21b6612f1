"""MALMEN: Massive Language Model Editing Network (Tan et al., 2024).

MEND's hypernetwork (`kedit.methods._editor.FactorNet`) turns each token's gradient factors
(u_t, δ_t) at an edited layer into a value difference d_t = −α_ℓ δ̃_t (δ̃_t taken back to the
gradient's units, so that the untrained network gives d_t = −α_ℓ δ_t, a gradient step on the
layer's output, and a token the loss does not reach asks for no change); MALMEN then aggregates
them over the whole batch of edits by least squares instead of summing them: the change S of
the layer's weight that best maps every key u_t to its d_t, with a ridge λ_ℓ (learned),

    S* = argmin_S Σ_t ‖S u_t − d_t‖² + λ_ℓ ‖S‖²_F = D Uᵀ (U Uᵀ + λ_ℓ I)⁻¹ = D (UᵀU + λ_ℓ I)⁻¹ Uᵀ,

with U = [u_1 … u_n] and D = [d_1 … d_n] (the normal equations; kedit solves the n × n system,
so the change is stored as factors of rank n). λ_ℓ is relative to the mean ‖u_t‖² of the batch.
Training (`kedit train malmen`) edits whole batches at once, so that the network learns values
that survive the aggregation; a batch of many edits is one solve per layer.
"""

from __future__ import annotations

import torch

from kedit.lm import LM
from kedit.methods._editor import FactorNet, Factors, LowRank, find_editor, pad_groups
from kedit.methods.mend import EditorHyperParams, edit_with
from kedit.methods.registry import MethodResult, register
from kedit.requests import EditRequest


def malmen_change(net: FactorNet, factors: Factors, groups: torch.Tensor, n_groups: int) -> LowRank:
    """Each group's least-squares change D (UᵀU + λI)⁻¹ Uᵀ over its tokens."""
    left, right = [], []
    for index, (keys, grads) in enumerate(zip(factors.keys, factors.grads, strict=True)):
        _, grads_t = net(index, keys, grads)
        values = -net.lr(index) * net.in_gradient_units(index, grads_t)
        lefts, rights = [], []
        for g in range(n_groups):
            member = groups == g
            u, d = keys[member], values[member]
            gram = u @ u.T
            ridge = net.ridge(index) * gram.diagonal().mean()
            eye = torch.eye(len(u), dtype=u.dtype, device=u.device)
            lefts.append(d.T)
            rights.append(torch.linalg.solve(gram + ridge * eye, u))
        left.append(pad_groups(lefts, 1))
        right.append(pad_groups(rights, 0))
    return LowRank(left, right)


@register(
    "malmen",
    EditorHyperParams,
    "A trained hypernetwork, its values aggregated by least squares (MALMEN)",
    True,
)
def malmen(lm: LM, requests: list[EditRequest], hparams: EditorHyperParams) -> MethodResult:
    return edit_with(lm, requests, find_editor("malmen", lm, hparams.editor), malmen_change)
