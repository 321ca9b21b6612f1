"""Causal tracing (Meng et al., 2022, "Locating and Editing Factual Associations in GPT", §2).

Three runs of a prompt that names a subject: the clean run; corrupted runs, where Gaussian
noise of a few times the embeddings' standard deviation is added to the subject's token
embeddings (seeded, `samples` draws); and corrupted-with-restoration runs, where one state of
the clean run is put back: the hidden state after a block, or (over a window of layers
around it) the MLP's or the attention's output, at one token. With P the probability of the
answer's first token at the prompt's end (averaged over the noise draws):

    total effect     TE  = P(clean) − P(corrupted)
    indirect effect  IE  = P(corrupted, state restored) − P(corrupted)

Averaged over many facts by token class (first / middle / last subject token, first
subsequent token, further tokens, last token), the IE of MLP outputs at the last subject token
is ROME's "early site", where it edits. As in ROME's reference code, the noise is drawn once
(`numpy.random.RandomState(seed)`) and shared by every restoration of a prompt; all
restorations of a prompt run in as few batched forward passes as `batch_size` allows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy
import torch

from kedit.analysis._common import (
    Result,
    TokenizedFact,
    as_facts,
    new_figure,
    rounded,
    save_figure,
    tokenize_facts,
)
from kedit.data.facts import Fact
from kedit.hooks import capture, hooks, replace_output
from kedit.lm import LM

KINDS = ("hidden", "mlp", "attn")
KIND_TITLES = {"hidden": "hidden state", "mlp": "MLP output", "attn": "attention output"}
KIND_COLOURS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
TOKEN_CLASSES = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)
ROME_SEED = 1  # ROME's reference code draws its noise from numpy.random.RandomState(1)
ROME_WINDOW_LAYERS = 10  # ROME's window on GPT-2 XL's 48 layers


def default_window(n_layers: int) -> int:
    """ROME's window of 10 of GPT-2 XL's 48 layers, scaled to the model's depth (at least 2)."""
    return max(2, round(ROME_WINDOW_LAYERS * n_layers / 48))


def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """The layers restored for a window centred on `layer`, as ROME's code takes them:
    from layer − ⌊w/2⌋ up to (not including) layer + ⌈w/2⌉, within the model."""
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


@torch.no_grad()
def embedding_std(lm: LM, subjects: Iterable[str]) -> float:
    """Standard deviation of the token embeddings of the subjects (each tokenized on its own),
    the unit of the tracing noise."""
    ids = [i for subject in subjects for i in lm.encode(subject)]
    if not ids:
        raise ValueError("subjects: expected at least one subject with tokens")
    embed = lm.model.get_submodule(lm.layout.embed)
    return float(embed(torch.tensor([ids], device=lm.device)).float().std())


def _check_options(kinds: Sequence[str], samples: int, window: int, noise: float) -> None:
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds: expected some of {KINDS}, got {list(kinds)!r}")
    for name, value in (("samples", samples), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if not isinstance(noise, int | float) or not noise > 0:
        raise ValueError(f"noise: expected a positive number, got {noise!r}")


@dataclass(kw_only=True)
class _Effects(Result):
    """What a trace and an average of traces share: P(answer) clean (`high_score`) and
    corrupted (`low_score`), the grids of P with one state restored per kind, and how."""

    high_score: float
    low_score: float
    scores: dict[str, torch.Tensor]
    window: int
    samples: int
    noise_std: float

    @property
    def total_effect(self) -> float:
        return self.high_score - self.low_score

    def indirect_effect(self, kind: str) -> torch.Tensor:
        return self.scores[kind] - self.low_score

    def _effects_json(self) -> dict[str, Any]:
        """The scores and settings a trace and an average both write."""
        return {
            "high_score": self.high_score,
            "low_score": self.low_score,
            "total_effect": self.total_effect,
            "window": self.window,
            "samples": self.samples,
            "noise_std": self.noise_std,
        }


@dataclass(kw_only=True)
class CausalTrace(_Effects):
    """The causal trace of one prompt: for each kind, P(answer) with one state restored,
    a (tokens × layers) grid; `indirect_effect(kind)` subtracts the corrupted run's P."""

    tokens: list[str]
    subject: tuple[int, int]
    answer: str
    correct_prediction: bool
    name = "trace"

    def peak(self, kind: str) -> tuple[int, int, float]:
        """(token, layer, indirect effect) of the largest indirect effect of a kind."""
        effect = self.indirect_effect(kind)
        token, layer = divmod(int(effect.argmax()), effect.shape[1])
        return token, layer, float(effect[token, layer])

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "subject_range": list(self.subject),
            "answer": self.answer,
            "correct_prediction": self.correct_prediction,
            **self._effects_json(),
            "scores": {kind: rounded(value) for kind, value in self.scores.items()},
            "peaks": {
                kind: dict(zip(("token", "layer", "indirect_effect"), self.peak(kind), strict=True))
                for kind in self.scores
            },
        }

    def plot(self, path: str | Path | None = None) -> Any:
        """ROME's Figure 1: one heatmap per kind, tokens down (subject tokens starred), layers
        across, coloured from P(corrupted) up."""
        figure = new_figure(4.2 * len(self.scores), 0.35 * len(self.tokens) + 1.6)
        draw_heatmaps(figure, figure.subplots(1, len(self.scores), squeeze=False)[0], self)
        return save_figure(figure, path)


def draw_heatmaps(figure: Any, axes: Sequence[Any], result: CausalTrace, note: str = "") -> None:
    """A trace's heatmaps, one kind per axes; `note` ends each title."""
    labels = [
        token + ("*" if result.subject[0] <= i < result.subject[1] else "")
        for i, token in enumerate(result.tokens)
    ]
    for ax, (kind, grid) in zip(axes, result.scores.items(), strict=True):
        image = ax.pcolormesh(grid.numpy(), cmap=KIND_COLOURS[kind], vmin=result.low_score)
        ax.invert_yaxis()
        ax.set_yticks([0.5 + i for i in range(len(labels))], labels)
        ax.set_xticks([0.5 + i for i in range(grid.shape[1])], range(grid.shape[1]))
        restored = "single restored layer" if kind == "hidden" else f"window of {result.window}"
        ax.set_title(f"restoring the {KIND_TITLES[kind]}{note}", fontsize=9)
        ax.set_xlabel(f"layer ({restored})")
        figure.colorbar(image, ax=ax).set_label(f"p({result.answer.strip()})")


def _restorations(kinds: Sequence[str], n_tokens: int, n_layers: int, window: int) -> list:
    """(kind, token, layers restored) for every cell of every kind's grid, in grid order."""
    cells = []
    for kind in kinds:
        for token in range(n_tokens):
            for layer in range(n_layers):
                layers = [layer] if kind == "hidden" else window_layers(layer, window, n_layers)
                cells.append((kind, token, layers))
    return cells


def _module(lm: LM, kind: str, layer: int) -> str:
    if kind == "hidden":
        return lm.layout.block(layer)
    return lm.layout.mlp_name(layer) if kind == "mlp" else lm.layout.attn_name(layer)


def _answer_probability(
    lm: LM,
    item: TokenizedFact,
    noise: torch.Tensor,
    clean: dict[str, torch.Tensor],
    cells: list,
    samples: int,
) -> torch.Tensor:
    """P(answer) for the corrupted run with each cell's states restored (an empty list of
    layers: nothing restored), each averaged over the noise draws: one forward pass."""
    rows = len(cells) * samples
    ids = torch.tensor([item.ids], device=lm.device).expand(rows, -1)
    start, end = item.subject
    restore: dict[str, tuple[list[int], list[int]]] = {}
    for index, (kind, token, layers) in enumerate(cells):
        for layer in layers:
            targets = restore.setdefault(_module(lm, kind, layer), ([], []))
            targets[0].extend(range(index * samples, (index + 1) * samples))
            targets[1].extend([token] * samples)

    def add_noise(value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        value[:, start:end] += noise.to(value.device, value.dtype).repeat(len(cells), 1, 1)
        return value

    def restorer(name: str) -> Any:
        row_list, token_list = restore[name]

        def put_back(value: torch.Tensor) -> torch.Tensor:
            value = value.clone()
            at_rows = torch.tensor(row_list, device=value.device)
            at_tokens = torch.tensor(token_list, device=value.device)
            value[at_rows, at_tokens] = clean[name].to(value.device, value.dtype)[at_tokens]
            return value

        return put_back

    managers = [replace_output(lm.model, lm.layout.embed, add_noise)]
    managers += [replace_output(lm.model, name, restorer(name)) for name in restore]
    with hooks(*managers):
        logits = lm.model(input_ids=ids, use_cache=False).logits[:, -1]
    probs = torch.softmax(logits.float(), dim=-1)[:, item.answer_id]
    return probs.view(len(cells), samples).mean(dim=1).cpu()


@torch.no_grad()
def trace_tokenized(
    lm: LM,
    item: TokenizedFact,
    noise_std: float,
    kinds: Sequence[str] = KINDS,
    samples: int = 10,
    window: int | None = None,
    seed: int = ROME_SEED,
    batch_size: int = 512,
) -> CausalTrace:
    """`trace` of a tokenized fact with an absolute noise scale (`noise_std`)."""
    window = default_window(lm.n_layers) if window is None else window
    _check_options(kinds, samples, window, noise_std)
    n_tokens, n_layers = len(item.ids), lm.n_layers
    names = sorted({_module(lm, kind, layer) for kind in kinds for layer in range(n_layers)})
    ids = torch.tensor([item.ids], device=lm.device)
    with capture(lm.model, names) as states:
        logits = lm.model(input_ids=ids, use_cache=False).logits[0, -1]
    clean = {name: value[0] for name, value in states.items()}
    probs = torch.softmax(logits.float(), dim=-1)
    start, end = item.subject
    width = lm.model.get_submodule(lm.layout.embed).weight.shape[1]
    draws = numpy.random.RandomState(seed).randn(samples, end - start, width)
    noise = noise_std * torch.from_numpy(draws)

    cells = [("hidden", 0, [])] + _restorations(kinds, n_tokens, n_layers, window)
    per_pass = max(1, batch_size // samples)
    results = torch.cat(
        [
            _answer_probability(lm, item, noise, clean, cells[i : i + per_pass], samples)
            for i in range(0, len(cells), per_pass)
        ]
    )
    grids = results[1:].view(len(kinds), n_tokens, n_layers)
    return CausalTrace(
        tokens=item.tokens(lm),
        subject=item.subject,
        answer=lm.tokenizer.decode([item.answer_id]),
        correct_prediction=int(probs.argmax()) == item.answer_id,
        high_score=float(probs[item.answer_id]),
        low_score=float(results[0]),
        scores={kind: grids[i] for i, kind in enumerate(kinds)},
        window=window,
        samples=samples,
        noise_std=noise_std,
    )


def trace(
    lm: LM,
    fact: Fact | Any,
    kinds: Sequence[str] = KINDS,
    samples: int = 10,
    noise: float = 3.0,
    noise_std: float | None = None,
    window: int | None = None,
    seed: int = ROME_SEED,
    batch_size: int = 512,
) -> CausalTrace:
    """Causal trace of one fact (a `Fact`, an `EditRequest` or a {prompt, subject, answer}
    dict): P(answer) with each state restored, for each of `kinds` ("hidden", "mlp", "attn").

    The noise is `noise` times the standard deviation of the subject's token embeddings, or
    `noise_std` where given. `window` layers of MLP/attention outputs are restored together
    (default: ROME's 10 of 48 layers, scaled to the model, at least 2). Without an answer the
    model's own top prediction is traced, as ROME does.
    """
    [item] = tokenize_facts(lm, as_facts(fact))
    std = noise * embedding_std(lm, [item.fact.subject]) if noise_std is None else noise_std
    return trace_tokenized(lm, item, std, kinds, samples, window, seed, batch_size)


def token_classes(n_tokens: int, subject: tuple[int, int]) -> dict[str, list[int]]:
    """The token indices of each class, as ROME's averaging takes them (a one-token subject
    is both first and last subject token; an empty class has no indices)."""
    first_e, first_a = subject
    last_e, last_a = first_a - 1, n_tokens - 1
    classes = {
        TOKEN_CLASSES[0]: [first_e],
        TOKEN_CLASSES[1]: list(range(first_e + 1, last_e)),
        TOKEN_CLASSES[2]: [last_e],
        TOKEN_CLASSES[3]: [first_a] if first_a <= last_a else [],
        TOKEN_CLASSES[4]: list(range(first_a + 1, last_a)),
        TOKEN_CLASSES[5]: [last_a],
    }
    return classes


@dataclass(kw_only=True)
class AverageTrace(_Effects):
    """Causal traces averaged over facts by token class: `scores[kind]` is a (classes ×
    layers) grid of mean P(answer) with one state restored; `indirect_effect(kind)` subtracts
    the mean corrupted P (ROME's average indirect effect, AIE)."""

    kinds: list[str]
    n_facts: int
    n_skipped: int
    traces: list[CausalTrace] = field(default_factory=list, repr=False)
    name = "average_trace"

    def peak(self, kind: str, token_class: str) -> tuple[int, float]:
        """(layer, AIE) where a token class's average indirect effect of a kind peaks."""
        row = self.indirect_effect(kind)[TOKEN_CLASSES.index(token_class)]
        return int(row.argmax()), float(row.max())

    def to_json(self) -> dict[str, Any]:
        return {
            "n_facts": self.n_facts,
            "n_skipped_unknown": self.n_skipped,
            **self._effects_json(),
            "token_classes": list(TOKEN_CLASSES),
            "scores": {kind: rounded(value) for kind, value in self.scores.items()},
            "indirect_effect": {kind: rounded(self.indirect_effect(kind)) for kind in self.scores},
            "peaks": {
                kind: {
                    name: dict(zip(("layer", "aie"), self.peak(kind, name), strict=True))
                    for name in TOKEN_CLASSES
                }
                for kind in self.scores
            },
        }

    def plot(self, path: str | Path | None = None) -> Any:
        """Per kind, the average indirect effect by layer, one line per token class (ROME's
        averaged plots), above the class × layer heatmap."""
        figure = new_figure(4.2 * len(self.kinds), 6.0)
        axes = figure.subplots(2, len(self.kinds), squeeze=False)
        for column, kind in enumerate(self.kinds):
            effect = self.indirect_effect(kind)
            lines = axes[0][column]
            for row, label in enumerate(TOKEN_CLASSES):
                if not torch.isnan(effect[row]).all():
                    lines.plot(range(effect.shape[1]), effect[row].numpy(), label=label)
            lines.set_title(f"AIE of the {KIND_TITLES[kind]} ({self.n_facts} facts)", fontsize=10)
            lines.set_xlabel("layer")
            lines.set_ylabel("average indirect effect")
            heat = axes[1][column]
            image = heat.pcolormesh(effect.nan_to_num(0).numpy(), cmap=KIND_COLOURS[kind])
            heat.invert_yaxis()
            heat.set_yticks([0.5 + i for i in range(len(TOKEN_CLASSES))], TOKEN_CLASSES)
            heat.set_xticks([0.5 + i for i in range(effect.shape[1])], range(effect.shape[1]))
            heat.set_xlabel("layer")
            figure.colorbar(image, ax=heat)
        axes[0][0].legend(fontsize=7)
        return save_figure(figure, path)


def average_traces(traces: Sequence[CausalTrace], n_skipped: int = 0) -> AverageTrace:
    """ROME's averaging of traces by token class: each class's rows averaged over all facts
    (the middle and further tokens of a fact each count as a row), minus nothing: the AIE is
    `indirect_effect`, the class average minus the average corrupted P."""
    if not traces:
        raise ValueError("facts: no fact left to average (none known to the model)")
    kinds = list(traces[0].scores)
    n_layers = traces[0].scores[kinds[0]].shape[1]
    scores = {}
    for kind in kinds:
        grid = torch.full((len(TOKEN_CLASSES), n_layers), float("nan"))
        for row, name in enumerate(TOKEN_CLASSES):
            picked = [
                t.scores[kind][token]
                for t in traces
                for token in token_classes(len(t.tokens), t.subject)[name]
            ]
            if picked:
                grid[row] = torch.stack(picked).mean(dim=0)
        scores[kind] = grid
    first = traces[0]
    return AverageTrace(
        kinds=kinds,
        n_facts=len(traces),
        n_skipped=n_skipped,
        high_score=sum(t.high_score for t in traces) / len(traces),
        low_score=sum(t.low_score for t in traces) / len(traces),
        scores=scores,
        window=first.window,
        samples=first.samples,
        noise_std=first.noise_std,
        traces=list(traces),
    )


def trace_facts(
    lm: LM,
    facts: Iterable[Any],
    kinds: Sequence[str] = KINDS,
    samples: int = 10,
    noise: float = 3.0,
    noise_std: float | None = None,
    window: int | None = None,
    seed: int = ROME_SEED,
    batch_size: int = 512,
    known_only: bool = True,
    on_fact: Any = None,
) -> AverageTrace:
    """Trace many facts and average them by token class (`AverageTrace`).

    The noise is `noise` times the standard deviation of all the facts' subject embeddings
    (ROME: 3×), or `noise_std`. With `known_only` (ROME's choice) facts whose top prediction
    is not their answer are skipped and counted. `on_fact()` is called after each fact.
    """
    items = tokenize_facts(lm, as_facts(facts))
    if noise_std is None:
        noise_std = noise * embedding_std(lm, [item.fact.subject for item in items])
    traces, skipped = [], 0
    for item in items:
        result = trace_tokenized(lm, item, noise_std, kinds, samples, window, seed, batch_size)
        if on_fact is not None:
            on_fact()
        if known_only and not result.correct_prediction:
            skipped += 1
            continue
        traces.append(result)
    return average_traces(traces, skipped)
