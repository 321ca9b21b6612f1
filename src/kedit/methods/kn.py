"""Knowledge neurons (Dai et al., 2022, "Knowledge Neurons in Pretrained Transformers").

An FFN is a key-value memory: the intermediate activation w_i of neuron i (the input
of the MLP output projection) weighs value vector i, the i-th column of that projection in
(out, in) orientation. A neuron's attribution to the answer y* of prompt x is the integrated
gradient of P_x(ŵ) = p(y* | x, w = ŵ) along the straight path from 0 to the activation w̄:

    Attr(w_i) = w̄_i ∫₀¹ ∂P_x(α w̄) / ∂w_i dα                                    (Eq. 3-4)
             ≈ w̄_i / m Σ_{k=1..m} ∂P_x(k/m · w̄) / ∂w_i                             (Eq. 5)

The attribution itself (`kedit.analysis.neurons.neuron_attributions`) is shared with the
mechanism analyses. Knowledge neurons are those above t times the prompt's largest
attribution, refined by keeping those shared by at least a fraction p of several prompts of
the fact (§3.3).

Updating a fact ⟨s, r, o⟩ → ⟨s, r, o'⟩ (§5.1) changes each located neuron's value vector:
v_i ← v_i − λ₁ e(o) + λ₂ e(o'), with e the word embeddings of the answers' first tokens. The
paper's model ties its input and output embeddings; for untied models kedit uses the output
embeddings (the unembedding rows) by default, which is what moves the prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kedit.analysis.neurons import neuron_attributions
from kedit.edits import WeightDelta, compute_in_sequence
from kedit.lm import LM
from kedit.methods._locate import as_param_factors, mlp_out_param
from kedit.methods.registry import HyperParams, MethodResult, hp, register
from kedit.requests import EditRequest

EMBEDDINGS = ("input", "output")
SHARE_STEP = 0.05


@dataclass
class KNHyperParams(HyperParams):
    layers: list[int] | None = hp(None, "Layers whose MLP neurons are attributed (None: all).")
    steps: int = hp(20, "Riemann steps m of the integrated gradients.")
    threshold: float = hp(0.2, "t: keep neurons above this fraction of the largest attribution.")
    use_rephrases: bool = hp(
        False, "Attribute on the rephrases too; keep neurons shared by a fraction p of prompts."
    )
    share_threshold: float = hp(0.5, "p: fraction of the prompts a neuron must be found in.")
    neuron_range: list[int] = hp(
        [2, 5], "Move p by 0.05 until this many neurons remain; never keep more than the maximum."
    )
    erase_scale: float = hp(1.0, "λ₁: multiple of the old answer's embedding subtracted.")
    update_scale: float = hp(8.0, "λ₂: multiple of the new answer's embedding added.")
    embedding: str = hp(
        "output",
        "Answer embeddings: 'output' (unembedding rows; equal to tied word embeddings) or 'input'.",
    )

    ALIASES = {"adaptive_threshold": "threshold", "p": "share_threshold", "refine": "use_rephrases"}

    def validate(self) -> None:
        if self.layers is not None and not self.layers:
            raise ValueError("layers: expected at least one layer or None, got []")
        if self.steps < 1:
            raise ValueError(f"steps: expected a positive integer, got {self.steps!r}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold: expected a number in [0, 1], got {self.threshold!r}")
        if not 0 < self.share_threshold <= 1:
            raise ValueError(
                f"share_threshold: expected a number in (0, 1], got {self.share_threshold!r}"
            )
        if len(self.neuron_range) != 2 or not 1 <= self.neuron_range[0] <= self.neuron_range[1]:
            raise ValueError(
                f"neuron_range: expected [min, max] with 1 <= min <= max, got {self.neuron_range!r}"
            )
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding: expected one of {EMBEDDINGS}, got {self.embedding!r}")


def knowledge_neurons(
    lm: LM, prompts: list[str], answer: str, hparams: KNHyperParams
) -> list[tuple[int, int]]:
    """`(layer, neuron)` pairs that express `answer` after `prompts`, most attributed first.

    Per prompt, neurons above `threshold` times its largest attribution; with several prompts,
    those found in at least a fraction p of them, p moved by 0.05 from `share_threshold` until
    the count is within `neuron_range` (§3.3). At most `neuron_range[1]` are kept.
    """
    layers = list(range(lm.n_layers)) if hparams.layers is None else hparams.layers
    scores = torch.stack(
        [neuron_attributions(lm, prompt, answer, layers, hparams.steps) for prompt in prompts]
    )
    peaks = scores.flatten(1).amax(dim=1).clamp(min=0)
    found = (scores > hparams.threshold * peaks[:, None, None]).float().mean(dim=0)
    low, high = hparams.neuron_range
    share = hparams.share_threshold
    kept = found >= share
    while len(prompts) > 1 and kept.sum() > high and share < 1:
        share = min(1.0, share + SHARE_STEP)
        kept = found >= share
    while len(prompts) > 1 and kept.sum() < low and share > SHARE_STEP:
        share -= SHARE_STEP
        kept = found >= share
    total = scores.sum(dim=0)
    chosen = kept.nonzero().tolist()
    chosen.sort(key=lambda pair: -float(total[pair[0], pair[1]]))
    return [(layers[row], index) for row, index in chosen[:high]]


def _first_token(lm: LM, field_name: str, text: str) -> int:
    ids = lm.encode(text)
    if not ids:
        raise ValueError(f"{field_name}: {text!r} has no tokens")
    return ids[0]


def value_vector_deltas(
    lm: LM, neurons: list[tuple[int, int]], old: str, new: str, hparams: KNHyperParams
) -> list[WeightDelta]:
    """Rank-one deltas, one per layer, adding λ₂ e(new) − λ₁ e(old) to the value vectors of
    `neurons` (columns of the MLP output projection in (out, in) orientation)."""
    path = lm.layout.embed if hparams.embedding == "input" else lm.layout.unembed
    table = lm.model.get_submodule(path).weight.detach().float()
    direction = (
        hparams.update_scale * table[_first_token(lm, "target_new", new)]
        - hparams.erase_scale * table[_first_token(lm, "target_true", old)]
    )
    deltas = []
    for layer in sorted({layer for layer, _ in neurons}):
        weight = lm.model.get_parameter(mlp_out_param(lm, layer))
        width = lm.layout.in_out(weight)[0]
        selected = torch.zeros(width, device=direction.device)
        selected[[index for at, index in neurons if at == layer]] = 1.0
        factors = as_param_factors(lm, direction, selected)
        deltas.append(WeightDelta.low_rank(mlp_out_param(lm, layer), *factors))
    return deltas


@register("kn", KNHyperParams, "Knowledge neurons (Dai et al., 2022)")
def kn(lm: LM, requests: list[EditRequest], hparams: KNHyperParams) -> MethodResult:
    for index, request in enumerate(requests):
        if request.target_true is None:
            raise ValueError(
                f"requests[{index}].target_true: KN locates the neurons of the old answer, "
                "so every request needs target_true"
            )
    if hparams.layers is not None:
        for layer in hparams.layers:
            lm.check_layer(layer)
    located: list[list[list[int]]] = []

    def compute(request: EditRequest) -> list[WeightDelta]:
        prompts = [request.text, *request.rephrase] if hparams.use_rephrases else [request.text]
        neurons = knowledge_neurons(lm, prompts, request.target_true, hparams)
        located.append([[layer, index] for layer, index in neurons])
        return value_vector_deltas(lm, neurons, request.target_true, request.target_new, hparams)

    return MethodResult(compute_in_sequence(lm.model, requests, compute), {"neurons": located})
