"""DINM, Detoxifying with Intraoperative Neural Monitoring (Wang et al., 2024, "Detoxifying Large
Language Models via Knowledge Editing", §3).

Per request (an adversarial prompt X, its safe answer Y_safe as `target_new` and unsafe answer
Y_unsafe as `target_true`, and a knowledge-constraint probe (q_c, a_c) as its first locality
probe):

1. Locate the toxic layer: the layer l whose hidden states at the answer positions differ most
   between [X; Y_safe] and [X; Y_unsafe], l = argmax_l ‖h̄_l(safe) − h̄_l(unsafe)‖₂, h̄ the mean
   over each answer's own positions (padding never enters; the answers differ in length).
   Without `target_true`, the model's own greedy continuation of X stands in for Y_unsafe.
2. Tune only that layer's MLP output projection W (the paper's W_V^l) with Adam on
   L = −log P_W(Y_safe | X) + kl_factor · KL(P_W₀(·| q_c, a_c) ‖ P_W(·| q_c, a_c)),
   the KL taken over the vocabulary at each position that predicts a token of a_c
   (teacher-forced) and averaged over them. P_W₀ is computed once; P_W is computed with
   gradients, so the constraint acts on W (EasyEdit computes both under no_grad, where the
   term is a constant and never acts).

The located layers are recorded in the Edit's info (`toxic_layers`, one per request, and per
request under `requests` the distances per layer and what the optimisation reached).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kedit.edits import WeightDelta, compute_in_sequence
from kedit.hooks import capture, start_at_block, stop_after
from kedit.lm import LM
from kedit.methods._train import float32_masters, frozen, mixed_precision_step
from kedit.methods.registry import HyperParams, MethodResult, hp, register
from kedit.requests import EditRequest


@dataclass
class DINMHyperParams(HyperParams):
    layers: list[int] = hp([], "Layer to tune; empty: locate the toxic layer per request.")
    lr: float = hp(5e-4, "Adam learning rate.")
    steps: int = hp(10, "Maximum optimisation steps.")
    kl_factor: float = hp(0.1, "Weight of the KL term on the knowledge-constraint answer.")
    stop_nll: float = hp(0.0, "Stop once the safe answer's mean NLL is below this (0: never).")
    weight_decay: float = hp(0.0, "Adam weight decay.")

    ALIASES = {"num_steps": "steps"}
    IGNORED = HyperParams.IGNORED | {
        "batch_size",
        "max_output_length",
        "norm_constraint",
        "suffix_system_prompt",
        "model_class",
        "tokenizer_class",
        "tokenizer_name",
        "objective_optimization",
    }

    def validate(self) -> None:
        if len(self.layers) > 1:
            raise ValueError(f"layers: DINM tunes one layer; give at most one, got {self.layers}")
        if self.steps < 1:
            raise ValueError(f"steps: expected a positive integer, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")
        if self.kl_factor < 0:
            raise ValueError(f"kl_factor: expected a number >= 0, got {self.kl_factor!r}")
        if self.stop_nll < 0:
            raise ValueError(f"stop_nll: expected a number >= 0, got {self.stop_nll!r}")


@dataclass
class Answer:
    """Rows of token ids and, per row, the positions that predict the answer and its ids."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: list[list[int]]
    targets: list[list[int]]


def teacher_forced(lm: LM, pairs: list[tuple[str, str]]) -> Answer:
    """[prompt; answer] rows, right-padded, with the positions predicting each answer token."""
    rows, positions, targets = [], [], []
    for prompt, answer in pairs:
        prompt_ids, answer_ids = lm.encode_prompt(prompt), lm.encode(answer)
        if not answer_ids:
            raise ValueError(f"answer: {answer!r} has no tokens")
        rows.append(prompt_ids + answer_ids)
        positions.append(list(range(len(prompt_ids) - 1, len(rows[-1]) - 1)))
        targets.append(answer_ids)
    ids, mask = lm.pad(rows)
    return Answer(ids, mask, positions, targets)


@torch.no_grad()
def greedy_answer(lm: LM, prompt: str, n_tokens: int) -> str:
    """The model's own greedy continuation of `prompt`, `n_tokens` long."""
    ids = torch.tensor([lm.encode_prompt(prompt)], device=lm.device)
    for _ in range(n_tokens):
        token = lm.model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return lm.tokenizer.decode(ids[0, -n_tokens:].tolist())


@torch.no_grad()
def locate_toxic_layer(lm: LM, prompt: str, safe: str, unsafe: str) -> tuple[int, list[float]]:
    """The layer whose block output, averaged over each answer's positions, differs most (L2)
    between the safe and the unsafe answer after `prompt`; and every layer's distance."""
    batch = teacher_forced(lm, [(prompt, safe), (prompt, unsafe)])
    names = [lm.layout.block(layer) for layer in range(lm.n_layers)]
    with capture(lm.model, names, "output") as seen:
        lm.model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
    distances = []
    for name in names:
        means = [
            seen[name][row, [p + 1 for p in batch.positions[row]]].float().mean(0)
            for row in range(2)
        ]
        distances.append(float((means[0] - means[1]).norm()))
    return max(range(len(distances)), key=distances.__getitem__), distances


def kl_from_original(
    logits: torch.Tensor, original_logp: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """KL(P₀ ‖ P) = Σ_v P₀(v)·(log P₀(v) − log P(v)) at each of N positions, averaged with
    `weights` [N] (Σ w·KL / Σ w); `logits` [N, V] carry the gradient, `original_logp` is log P₀."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    per_position = (original_logp.exp() * (original_logp - logp)).sum(-1)
    return (per_position * weights).sum() / weights.sum()


class Objective:
    """DINM's loss for one request at one layer: NLL of the safe answer after the adversarial
    prompt, and KL to the unedited model on the knowledge-constraint answers.

    The blocks below the layer run once; `terms()` runs the rest with the current weights.
    """

    def __init__(self, lm: LM, request: EditRequest, layer: int) -> None:
        self.lm, self.layer = lm, layer
        pairs = [(request.text, request.target_new)]
        pairs += [(probe.prompt, probe.answer) for probe in request.locality]
        self.batch = teacher_forced(lm, pairs)
        self.rows, self.positions, self.targets, self.weights = self._flat(self.batch)
        block = lm.layout.block(layer)
        with torch.no_grad(), capture(lm.model, [block], "input") as seen:
            with stop_after(lm.model, block):
                lm.model(input_ids=self.batch.ids, attention_mask=self.batch.mask, use_cache=False)
        self.entering = seen[block]
        with torch.no_grad():
            self.original_logp = torch.log_softmax(self._logits()[self.constraint].float(), -1)

    def _flat(self, batch: Answer) -> tuple[torch.Tensor, ...]:
        rows = [row for row, positions in enumerate(batch.positions) for _ in positions]
        device = self.lm.device
        flat = [p for positions in batch.positions for p in positions]
        targets = [t for ids in batch.targets for t in ids]
        # Each constraint probe's positions weigh 1/len, so every probe counts alike.
        weights = [1.0 / len(ids) for ids in batch.targets[1:] for _ in ids]
        return (
            torch.tensor(rows, device=device),
            torch.tensor(flat, device=device),
            torch.tensor(targets, device=device),
            torch.tensor(weights, device=device),
        )

    @property
    def n_answer(self) -> int:
        return len(self.batch.targets[0])

    @property
    def constraint(self) -> slice:
        return slice(self.n_answer, None)

    def _logits(self) -> torch.Tensor:
        """Logits at every scored position [N, V], from the layer on."""
        model, layout = self.lm.model, self.lm.layout
        with start_at_block(model, layout.blocks, self.layer, self.entering):
            logits = model(
                input_ids=self.batch.ids, attention_mask=self.batch.mask, use_cache=False
            ).logits
        return logits[self.rows, self.positions]

    def terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(NLL of the safe answer per token, KL on the constraint answers), with gradients."""
        logits = self._logits()
        answer = logits[: self.n_answer]
        nll = torch.nn.functional.cross_entropy(answer.float(), self.targets[: self.n_answer])
        if self.weights.numel() == 0:
            return nll, logits.new_zeros(())
        return nll, kl_from_original(logits[self.constraint], self.original_logp, self.weights)


def tune_layer(
    lm: LM, request: EditRequest, layer: int, hparams: DINMHyperParams
) -> tuple[WeightDelta, dict]:
    """Train the layer's MLP output projection on the objective; return its change (the model
    is left as it was) and what the optimisation reached."""
    name = f"{lm.layout.mlp_out_name(layer)}.weight"
    weight = lm.model.get_parameter(name)
    original = weight.detach().clone()
    (master,) = float32_masters([weight])  # Adam in float32: its ε underflows in float16
    objective = Objective(lm, request, layer)
    optimizer = torch.optim.Adam([master], lr=hparams.lr, weight_decay=hparams.weight_decay)
    try:
        with frozen(lm.model, [weight]):
            for step in range(hparams.steps + 1):
                nll, kl = objective.terms()
                if step == hparams.steps or float(nll.detach()) < hparams.stop_nll:
                    break
                weight.grad = None
                (nll + hparams.kl_factor * kl).backward()
                mixed_precision_step([weight], [master], [original], optimizer, None)
        delta = WeightDelta.from_dense(name, master - original.float())
    finally:
        with torch.no_grad():
            weight.copy_(original)
    return delta, {"steps": step, "final_nll": float(nll.detach()), "final_kl": float(kl.detach())}


def detoxify(lm: LM, request: EditRequest, hparams: DINMHyperParams) -> tuple[WeightDelta, dict]:
    """One request's update: locate its toxic layer (unless `layers` fixes it), tune it."""
    unsafe = request.target_true
    if unsafe is None:
        unsafe = greedy_answer(lm, request.text, len(lm.encode(request.target_new)))
    located, distances = locate_toxic_layer(lm, request.text, request.target_new, unsafe)
    layer = lm.check_layer(hparams.layers[0]) if hparams.layers else located
    delta, reached = tune_layer(lm, request, layer, hparams)
    info = {
        "toxic_layer": layer,
        "located_layer": located,
        "layer_distances": [round(d, 4) for d in distances],
        "unsafe_from": "target_true" if request.target_true is not None else "greedy",
        **reached,
    }
    return delta, info


@register("dinm", DINMHyperParams, "Detoxify: tune the located toxic layer's MLP (DINM)")
def dinm(lm: LM, requests: list[EditRequest], hparams: DINMHyperParams) -> MethodResult:
    """Each request in turn, on the model as the ones before it left it."""
    infos: list[dict] = []

    def compute(request: EditRequest) -> list[WeightDelta]:
        delta, info = detoxify(lm, request, hparams)
        infos.append(info)
        return [delta]

    deltas = compute_in_sequence(lm.model, requests, compute)
    return MethodResult(
        deltas, {"toxic_layers": [i["toxic_layer"] for i in infos], "requests": infos}
    )
