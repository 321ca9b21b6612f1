"""Knowledge evolution: when each fact becomes known during training, and where it is read.

Given the checkpoints of one training run (model folders, in training order), each is asked
the same facts: which it knows (its top prediction is the answer), and the causal trace of the
facts it knows, summarised as the layer where the MLP's average indirect effect at the last
subject token peaks (the site ROME would edit at that point of training).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kedit.analysis._common import Result, as_facts, known_facts, new_figure, rounded, save_figure
from kedit.analysis.locate import LAST_SUBJECT, default_facts
from kedit.analysis.trace import TOKEN_CLASSES, trace_facts
from kedit.lm import LM, load


@dataclass
class Evolution(Result):
    """Per checkpoint: the share of the facts known, the MLP's average indirect effect at the
    last subject token per layer (empty where no fact is known) and its peak layer; per fact,
    the first checkpoint from which it stays known."""

    checkpoints: list[str]
    facts: list[str]
    known: list[list[bool]]
    effects: list[list[float]]
    name = "evolution"

    @property
    def known_share(self) -> list[float]:
        return [sum(row) / len(row) for row in self.known]

    @property
    def peak_layers(self) -> list[int | None]:
        return [max(range(len(e)), key=e.__getitem__) if e else None for e in self.effects]

    def first_known(self) -> dict[str, int | None]:
        """Per fact, the first checkpoint index from which every later checkpoint knows it."""
        out = {}
        for column, fact in enumerate(self.facts):
            since = None
            for index, row in enumerate(self.known):
                if row[column] and since is None:
                    since = index
                elif not row[column]:
                    since = None
            out[fact] = since
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoints": self.checkpoints,
            "known_share": self.known_share,
            "mlp_aie_last_subject_token": [rounded(e) for e in self.effects],
            "peak_layers": self.peak_layers,
            "first_known": self.first_known(),
        }

    def plot(self, path: str | Path | None = None) -> Any:
        figure = new_figure(9.0, 3.6)
        share, heat = figure.subplots(1, 2)
        steps = range(len(self.checkpoints))
        share.plot(steps, self.known_share, marker="o")
        share.set_xlabel("checkpoint")
        share.set_ylabel("facts known")
        share.set_ylim(0, 1.02)
        width = max((len(e) for e in self.effects), default=0)
        grid = torch.full((len(self.effects), max(width, 1)), float("nan"))
        for row, effect in enumerate(self.effects):
            grid[row, : len(effect)] = torch.tensor(effect)
        image = heat.pcolormesh(grid.numpy(), cmap="Greens")
        heat.invert_yaxis()
        heat.set_xlabel("layer")
        heat.set_ylabel("checkpoint")
        heat.set_title("MLP AIE at the last subject token", fontsize=10)
        for row, layer in enumerate(self.peak_layers):
            if layer is not None:
                heat.plot(layer + 0.5, row + 0.5, "k*")
        figure.colorbar(image, ax=heat)
        return save_figure(figure, path)


def evolution(
    checkpoints: Sequence[str | Path | LM],
    facts: Any = None,
    n: int = 50,
    samples: int = 10,
    window: int = 1,
) -> Evolution:
    """Follow the first `n` facts (default: those `locate` uses for the last checkpoint)
    through `checkpoints` (model folders or loaded `LM`s, in training order)."""
    if not checkpoints:
        raise ValueError("checkpoints: expected at least one model folder")
    models = [item if isinstance(item, LM) else None for item in checkpoints]
    names = [item.name if isinstance(item, LM) else str(item) for item in checkpoints]

    def model_at(index: int) -> LM:
        return models[index] if models[index] is not None else load(names[index])

    if facts is None:
        facts = default_facts(model_at(len(checkpoints) - 1))[1]
    chosen = as_facts(facts)[:n]
    labels = [fact.text + (fact.answer or "") for fact in chosen]
    known_rows, effects = [], []
    for index in range(len(checkpoints)):
        lm = model_at(index)
        known = set(known_facts(lm, chosen))
        known_rows.append([fact in known for fact in chosen])
        traced = [fact for fact in chosen if fact in known]
        if traced:
            average = trace_facts(lm, traced, kinds=("mlp",), samples=samples, window=window)
            row = average.indirect_effect("mlp")[TOKEN_CLASSES.index(LAST_SUBJECT)]
            effects.append(row.nan_to_num(0.0).tolist())
        else:
            effects.append([])
    return Evolution(names, labels, known_rows, effects)
