"""The logit lens (nostalgebraist, 2020) and the tuned lens (Belrose et al., 2023).

The logit lens reads the residual stream after each block through the model's own final norm
and unembedding, as if the remaining blocks were skipped: the rank and probability of the
target at each layer and position show where the answer appears. The tuned lens first maps
each layer's residual by a learned affine translator, h ↦ h + A_l h + b_l (A_l, b_l zero at
the start), trained to minimise KL(final distribution ‖ lens distribution) over a corpus
(the model's default statistics corpus: tinyworld for the bundled models).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kedit.analysis._common import Result, new_figure, rounded, save_figure
from kedit.hooks import capture
from kedit.lm import LM
from kedit.requests import fill_subject

TOKENS_PER_STEP = 512


@dataclass
class TunedLens:
    """One affine translator per block output: `weights[l]` (width × width), `biases[l]`."""

    weights: torch.Tensor
    biases: torch.Tensor
    corpus: str
    final_kl: list[float]

    def translate(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.weights[layer].to(hidden)
        return hidden + hidden @ weight + self.biases[layer].to(hidden)


def _block_outputs(lm: LM, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The residual stream entering the first block and after every block:
    (layers + 1) × batch × seq × width."""
    layout = lm.layout
    blocks = [layout.block(layer) for layer in range(lm.n_layers)]
    with capture(lm.model, blocks[:1], "input") as entering, capture(lm.model, blocks) as leaving:
        lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    return torch.stack([entering[blocks[0]], *(leaving[name] for name in blocks)])


def _read_out(lm: LM, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of residual vectors through the final norm and the unembedding."""
    norm = lm.model.get_submodule(lm.layout.final_norm)
    unembed = lm.model.get_submodule(lm.layout.unembed)
    return unembed(norm(hidden)).float()


def train_tuned_lens(
    lm: LM,
    corpus: str | None = None,
    n_docs: int = 512,
    steps: int = 100,
    lr: float = 3e-3,
    max_length: int = 64,
    seed: int = 0,
) -> TunedLens:
    """Train a tuned lens on `n_docs` documents of `corpus` (the model's default corpus when
    None); cached on the `LM` per settings. The block outputs are computed once; only the
    translators train (Adam, full batch of token vectors sampled per step)."""
    from kedit.stats import default_corpus, open_corpus

    key = ("tuned_lens", corpus, n_docs, steps, lr, max_length, seed)
    if key in lm.cache:
        return lm.cache[key]
    for name, value in (("n_docs", n_docs), ("steps", steps), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    source = open_corpus(default_corpus(lm) if corpus is None else corpus, n_docs)
    docs = source.load()
    hidden, targets = [], []
    with torch.no_grad():
        for begin in range(0, len(docs), 32):
            sequences = [lm.encode_prompt(doc)[:max_length] for doc in docs[begin : begin + 32]]
            sequences = [s for s in sequences if s]
            ids, mask = lm.pad(sequences)
            states = _block_outputs(lm, ids, mask)
            keep = mask.bool()
            hidden.append(states[:-1][:, keep].float().cpu())
            targets.append(torch.log_softmax(_read_out(lm, states[-1][keep]), -1).cpu())
    hidden_all, log_final = torch.cat(hidden, dim=1), torch.cat(targets)
    layers, width = hidden_all.shape[0], hidden_all.shape[-1]
    weights = torch.zeros(layers, width, width, requires_grad=True)
    biases = torch.zeros(layers, width, requires_grad=True)
    optimizer = torch.optim.Adam([weights, biases], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    norm = lm.model.get_submodule(lm.layout.final_norm)
    unembed = lm.model.get_submodule(lm.layout.unembed)
    sample = min(TOKENS_PER_STEP, log_final.shape[0])
    kl = torch.zeros(layers)
    for _ in range(steps):
        rows = torch.randperm(log_final.shape[0], generator=generator)[:sample]
        h = hidden_all[:, rows]
        translated = h + torch.einsum("lnd,lde->lne", h, weights) + biases[:, None]
        dtype = next(norm.parameters(), weights).dtype
        logits = unembed(norm(translated.to(lm.device, dtype))).float().cpu()
        target = log_final[rows]
        kl = (target.exp() * (target - torch.log_softmax(logits, -1))).sum(-1).mean(-1)
        # Gradients of the translators only: the model's parameters keep no .grad.
        weights.grad, biases.grad = torch.autograd.grad(kl.sum(), [weights, biases])
        optimizer.step()
    lens = TunedLens(weights.detach(), biases.detach(), source.id, kl.detach().tolist())
    lm.cache[key] = lens
    return lens


@dataclass
class LensResult(Result):
    """Rank (0 = top) and probability of the target's first token after each layer (row 0:
    the input embeddings, row l + 1: after block l) at each position of the prompt, and the
    top token at the last position per layer."""

    tokens: list[str]
    target: str
    ranks: torch.Tensor
    probabilities: torch.Tensor
    top_tokens: list[str]
    tuned: bool
    name = "lens"

    def first_layer(self, rank: int = 0) -> int | None:
        """The first row at whose last position the target ranks `rank` or better."""
        hits = (self.ranks[:, -1] <= rank).nonzero()
        return int(hits[0]) if len(hits) else None

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "target": self.target,
            "lens": "tuned" if self.tuned else "logit",
            "rows": ["embeddings", *[f"block {i}" for i in range(len(self.ranks) - 1)]],
            "ranks": self.ranks.tolist(),
            "probabilities": rounded(self.probabilities),
            "top_tokens_last_position": self.top_tokens,
            "first_top1_row": self.first_layer(0),
        }

    def plot(self, path: str | Path | None = None) -> Any:
        """Heatmap of the target's probability (layers × positions) and its rank at the last
        position by layer."""
        figure = new_figure(10.0, 0.35 * len(self.ranks) + 2.0)
        heat, line = figure.subplots(1, 2, width_ratios=[3, 2])
        image = heat.pcolormesh(self.probabilities.numpy(), cmap="viridis", vmin=0, vmax=1)
        heat.set_xticks([0.5 + i for i in range(len(self.tokens))], self.tokens, rotation=60)
        rows = ["emb", *[str(i) for i in range(len(self.ranks) - 1)]]
        heat.set_yticks([0.5 + i for i in range(len(rows))], rows)
        heat.set_ylabel("after block")
        lens = "tuned lens" if self.tuned else "logit lens"
        heat.set_title(f"{lens}: p({self.target.strip()})", fontsize=10)
        figure.colorbar(image, ax=heat)
        line.plot(range(len(rows)), (self.ranks[:, -1] + 1).numpy(), marker="o")
        line.set_yscale("log")
        line.set_xticks(range(len(rows)), rows)
        line.set_xlabel("after block")
        line.set_ylabel("rank at the last token (1 = top)")
        for x, token in enumerate(self.top_tokens):
            line.annotate(repr(token), (x, 1), fontsize=6, rotation=60)
        return save_figure(figure, path)


@torch.no_grad()
def lens(
    lm: LM,
    prompt: str,
    target: str | None = None,
    subject: str | None = None,
    tuned: TunedLens | bool = False,
) -> LensResult:
    """The logit lens (or, with `tuned`, a `TunedLens` or True to train one on the model's
    corpus) of `prompt` (with `{}` filled by `subject` where given) for `target` (default:
    the model's prediction)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt: expected a non-empty string, got {prompt!r}")
    text = fill_subject(prompt, subject) if subject is not None else prompt
    if "{}" in text:
        raise ValueError(f"subject: prompt {prompt!r} has a '{{}}' slot; give the subject")
    ids = torch.tensor([lm.encode_prompt(text)], device=lm.device)
    states = _block_outputs(lm, ids)[:, 0]
    if tuned is True:
        tuned = train_tuned_lens(lm)
    if isinstance(tuned, TunedLens):
        states = torch.stack(
            [tuned.translate(i, state) for i, state in enumerate(states[:-1])] + [states[-1]]
        )
    logits = _read_out(lm, states)
    if target is None:
        target_id = int(logits[-1, -1].argmax())
    else:
        target_ids = lm.encode(target)
        if not target_ids:
            raise ValueError(f"target: {target!r} has no tokens")
        target_id = target_ids[0]
    probs = torch.softmax(logits, dim=-1)
    ranks = (logits > logits[..., target_id : target_id + 1]).sum(-1)
    top = logits[:, -1].argmax(-1).tolist()
    return LensResult(
        tokens=[lm.tokenizer.decode([i]) for i in ids[0].tolist()],
        target=lm.tokenizer.decode([target_id]),
        ranks=ranks.cpu(),
        probabilities=probs[..., target_id].cpu(),
        top_tokens=[lm.tokenizer.decode([i]) for i in top],
        tuned=isinstance(tuned, TunedLens),
    )
