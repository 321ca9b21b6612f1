"""Knowledge-neuron attribution (Dai et al., 2022, "Knowledge Neurons in Pretrained
Transformers", §3.1), shared by the `kn` editing method and the mechanism analyses.

An MLP's intermediate activation w_i (the input of its output projection) weighs value
vector i. Neuron i's attribution to the answer y* of prompt x is the integrated gradient of
P_x(ŵ) = p(y* | x, w = ŵ) along the straight path from 0 to the activation w̄:

    Attr(w_i) = w̄_i ∫₀¹ ∂P_x(α w̄) / ∂w_i dα                                    (Eq. 3-4)
             ≈ w̄_i / m Σ_{k=1..m} ∂P_x(k/m · w̄) / ∂w_i                             (Eq. 5)

The whole layer's activation vector is scaled along the path (as the authors' implementation
does), at the position that predicts the answer; the m points form one batch per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kedit.analysis._common import Result, as_fact, new_figure, save_figure
from kedit.hooks import capture, replace_input, start_at_block, stop_after
from kedit.lm import LM


def neuron_attributions(
    lm: LM, prompt: str, answer: str, layers: list[int] | None = None, steps: int = 20
) -> torch.Tensor:
    """Integrated-gradient attribution (Eq. 5) of every MLP intermediate neuron of `layers` (all
    by default) to P(`answer` | `prompt`): a (len(layers) × neurons) tensor, rows in the order
    of `layers`. A multi-token answer averages its tokens' attributions, each token scored
    teacher-forced at the position that predicts it.
    """
    for name, text in (("prompt", prompt), ("answer", answer)):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{name}: expected a non-empty string, got {text!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps!r}")
    layers = list(range(lm.n_layers)) if layers is None else [lm.check_layer(i) for i in layers]
    if not layers:
        raise ValueError("layers: expected at least one layer, got []")
    model, layout = lm.model, lm.layout
    unembed = model.get_submodule(layout.unembed)
    prompt_ids, answer_ids = lm.encode_prompt(prompt), lm.encode(answer)
    rows = [prompt_ids + answer_ids[:j] for j in range(len(answer_ids))]
    ids, mask = lm.pad(rows)
    positions = torch.tensor([len(row) - 1 for row in rows], device=lm.device)
    n_tokens = len(rows)

    blocks = [layout.block(i) for i in layers]
    projections = [layout.mlp_out_name(i) for i in layers]
    with torch.no_grad(), capture(model, blocks, "input") as hidden:
        with capture(model, projections, "input") as acts:
            with stop_after(model, layout.block(max(layers))):
                model(input_ids=ids, attention_mask=mask, use_cache=False)

    # One row per (answer token, Riemann point k/m), tokens outermost.
    batch = torch.arange(n_tokens * steps, device=lm.device)
    where = positions.repeat_interleave(steps)
    alphas = (torch.arange(1, steps + 1, device=lm.device) / steps).repeat(n_tokens)
    targets = torch.tensor(answer_ids, device=lm.device).repeat_interleave(steps)
    batch_ids, batch_mask = ids.repeat_interleave(steps, 0), mask.repeat_interleave(steps, 0)
    scores = []
    for layer, block, projection in zip(layers, blocks, projections, strict=True):
        device = acts[projection].device  # the layer's, on a model split over devices
        base = acts[projection][torch.arange(n_tokens, device=device), positions.to(device)]
        base = base.float()
        scaled = alphas.to(device)[:, None] * base.repeat_interleave(steps, 0)
        scaled.requires_grad_()

        def set_activation(value: torch.Tensor, scaled: torch.Tensor = scaled) -> torch.Tensor:
            value = value.clone()
            at = (batch.to(value.device), where.to(value.device))
            value[at] = scaled.to(value.device, value.dtype)
            return value

        start = hidden[block].repeat_interleave(steps, 0)
        # Only the scored positions are unembedded (the full logits would be rows × seq × vocab).
        with torch.enable_grad():
            with (
                replace_input(model, projection, set_activation),
                capture(model, [layout.final_norm], detach=False) as normed,
                start_at_block(model, layout.blocks, layer, start),
                stop_after(model, layout.final_norm),
            ):
                model(input_ids=batch_ids, attention_mask=batch_mask, use_cache=False)
            final = normed[layout.final_norm]
            logits = unembed(final[batch.to(final.device), where.to(final.device)])
            probs = torch.softmax(logits.float(), dim=-1)
            picked = probs[batch.to(probs.device), targets.to(probs.device)]
            (grads,) = torch.autograd.grad(picked.sum(), scaled)
        riemann = grads.view(n_tokens, steps, -1).mean(dim=1)
        scores.append((base * riemann).mean(dim=0).to(lm.device))
    return torch.stack(scores).detach()


@dataclass
class NeuronAttribution(Result):
    """Integrated-gradient attribution of every MLP neuron of `layers` to an answer."""

    prompt: str
    answer: str
    layers: list[int]
    scores: torch.Tensor
    steps: int
    name = "neurons"

    def top(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The k most attributed neurons as (layer, neuron, attribution)."""
        values, flat = self.scores.flatten().topk(min(k, self.scores.numel()))
        width = self.scores.shape[1]
        return [
            (self.layers[int(i) // width], int(i) % width, float(v))
            for v, i in zip(values, flat, strict=True)
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "answer": self.answer,
            "steps": self.steps,
            "layers": self.layers,
            "layer_totals": [float(v) for v in self.scores.clamp(min=0).sum(dim=1)],
            "top": [
                {"layer": layer, "neuron": neuron, "attribution": value}
                for layer, neuron, value in self.top(20)
            ],
        }

    def plot(self, path: str | Path | None = None) -> Any:
        """Per layer, the summed positive attribution and the largest single neuron's."""
        figure = new_figure(6.0, 3.5)
        ax = figure.subplots()
        positions = range(len(self.layers))
        ax.bar(positions, self.scores.clamp(min=0).sum(dim=1).numpy(), label="sum over neurons")
        ax.plot(positions, self.scores.amax(dim=1).numpy(), "o-", color="black", label="top neuron")
        ax.set_xticks(list(positions), self.layers)
        ax.set_xlabel("layer")
        ax.set_ylabel("integrated-gradient attribution")
        ax.set_title(f"knowledge neurons for {self.answer.strip()!r}", fontsize=10)
        ax.legend()
        return save_figure(figure, path)


def neurons(
    lm: LM, fact: Any, layers: list[int] | None = None, steps: int = 20
) -> NeuronAttribution:
    """`neuron_attributions` of a fact (a `Fact`, `EditRequest` or dict with an answer), as a
    result object."""
    item = as_fact(fact)
    if item.answer is None:
        raise ValueError("answer: knowledge-neuron attribution needs the fact's answer")
    scores = neuron_attributions(lm, item.text, item.answer, layers, steps)
    chosen = list(range(lm.n_layers)) if layers is None else list(layers)
    return NeuronAttribution(item.text, item.answer, chosen, scores.cpu(), steps)
