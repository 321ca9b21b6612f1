"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al., 2022).

A trained hypernetwork g (`kedit.methods._editor.FactorNet`, shared by the edited layers) maps
the rank-one factors (u_t, δ_t) of the edit's gradient at each edited layer's MLP output
projection (u_t its input, δ_t the loss's gradient with respect to its output, at token t) to
(ũ_t, δ̃_t), and the layer's weight moves by the transformed gradient (§3.1):

    W̃_ℓ = W_ℓ − α_ℓ Σ_t δ̃_t ũ_tᵀ,

a change of rank at most the number of the edit's tokens, saved as low-rank factors. The edit is
one forward and one backward pass of the model and one pass of g; several requests at once sum
their tokens' terms, as MEND edits a batch. g is trained by `kedit.train_editor(lm, "mend", ...)`
(`kedit train mend`) with the edit loss on each request's prompt and paraphrases and the KL of
the edited model's predictions on unrelated prompts from the model's (eq. 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kedit.edits import WeightDelta
from kedit.lm import LM
from kedit.methods._editor import (
    Editor,
    FactorNet,
    Factors,
    LowRank,
    find_editor,
    gradient_factors,
    pad_groups,
)
from kedit.methods.registry import HyperParams, MethodResult, hp, register
from kedit.requests import EditRequest


@dataclass
class EditorHyperParams(HyperParams):
    editor: str | None = hp(
        None,
        "Folder of the trained editor (`kedit train`); None: the one trained for this model in"
        " the cache, or bundled with a bundled model.",
    )

    # Trained on single-target edits: with the mean NLL over a request's targets, both of two
    # targets reached probability 0.15 in 3 of 40 tinyworld cases (tiny-gpt2's bundled editor).
    MULTI_LABEL = False
    PER_MODEL = False  # the editor was trained for one model and knows its layers

    def validate(self) -> None:
        if self.editor is not None and not self.editor.strip():
            raise ValueError(f"editor: expected a folder or None, got {self.editor!r}")


def mend_change(net: FactorNet, factors: Factors, groups: torch.Tensor, n_groups: int) -> LowRank:
    """Each group's change −α_ℓ Σ_t δ̃_t ũ_tᵀ over its tokens (token t in group `groups[t]`)."""
    left, right = [], []
    for index, (keys, grads) in enumerate(zip(factors.keys, factors.grads, strict=True)):
        keys_t, grads_t = net(index, keys, grads)
        step = -net.lr(index)
        members = [groups == g for g in range(n_groups)]
        left.append(pad_groups([step * grads_t[m].T for m in members], 1))
        right.append(pad_groups([keys_t[m] for m in members], 0))
    return LowRank(left, right)


def weight_deltas(lm: LM, editor: Editor, change: LowRank) -> list[WeightDelta]:
    """The weight deltas of a one-group change, in each parameter's own layout."""
    deltas = []
    for index, layer in enumerate(editor.meta.layers):
        left, right = change.left[index][0], change.right[index][0]
        name = f"{lm.layout.mlp_out_name(layer)}.weight"
        if lm.layout.conv1d:  # the weight maps inputs to outputs as x @ W: W is [in, out]
            deltas.append(WeightDelta.low_rank(name, right.T, left.T))
        else:
            deltas.append(WeightDelta.low_rank(name, left, right))
    return deltas


def edit_with(lm: LM, requests: list[EditRequest], editor: Editor, change_fn) -> MethodResult:
    """The deltas that `change_fn` (MEND's or MALMEN's) makes of the requests' factors."""
    factors = gradient_factors(lm, requests, editor.meta.layers)
    with torch.no_grad():
        change = change_fn(editor.net, factors, torch.zeros_like(factors.owner), 1)
    info = {"editor": str(editor.path), "tokens": int(factors.owner.numel())}
    return MethodResult(weight_deltas(lm, editor, change), info)


@register(
    "mend", EditorHyperParams, "A trained hypernetwork on the gradient's factors (MEND)", True
)
def mend(lm: LM, requests: list[EditRequest], hparams: EditorHyperParams) -> MethodResult:
    return edit_with(lm, requests, find_editor("mend", lm, hparams.editor), mend_change)
