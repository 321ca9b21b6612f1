"""Where to edit: the layer(s) whose MLP output at the subject's last token carries the fact.

ROME edits the layer where the average indirect effect (AIE) of restoring the MLP output at
the last subject token peaks over facts the model knows (Meng et al., 2022, §2-3); MEMIT
spreads its update over the critical window around that peak (Meng et al., 2023, §4). `locate`
measures that curve; `auto_layers` is what `layers: auto` in a locate-then-edit method's
hyper-parameters resolves to (cached per model).

Facts default to those the model was trained on where it is a zoo model (tinyworld's "lives
in" facts), otherwise a bundled list of well-known world facts; in both cases only the facts
the model gets right are traced.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from kedit.analysis._common import (
    Result,
    as_facts,
    known_facts,
    new_figure,
    rounded,
    save_figure,
    tinyworld_facts,
)
from kedit.analysis.trace import TOKEN_CLASSES, AverageTrace, trace_facts
from kedit.data.facts import Fact
from kedit.lm import LM

logger = logging.getLogger("kedit")
LAST_SUBJECT = "last subject token"
WINDOW_SHARE = 0.5  # MEMIT's window: the layers around the peak with at least this share of it
DEFAULT_FACTS = 50


def world_facts() -> list[Fact]:
    """The bundled well-known facts ("Paris is the capital of" → " France", ...), for models
    not trained on tinyworld."""
    text = resources.files("kedit").joinpath("analysis/data/world_facts.json").read_text()
    return [Fact(**record) for record in json.loads(text)]


def default_facts(lm: LM) -> tuple[str, list[Fact]]:
    """(name, facts) to locate on by default: tinyworld's "lives in" facts for a zoo model,
    the bundled world facts otherwise."""
    if lm.recipe:
        return "tinyworld lives_in", tinyworld_facts("lives_in", 0)
    return "kedit world facts", world_facts()


@dataclass
class Located(Result):
    """The MLP output's average indirect effect at the last subject token per layer, and the
    layers it suggests: `rome` (the peak) and `memit` (the window around it)."""

    effect: torch.Tensor
    rome: list[int]
    memit: list[int]
    facts: str
    n_facts: int
    average: AverageTrace
    name = "locate"

    def to_json(self) -> dict[str, Any]:
        return {
            "facts": self.facts,
            "n_facts": self.n_facts,
            "mlp_aie_last_subject_token": rounded(self.effect),
            "rome_layers": self.rome,
            "memit_layers": self.memit,
            "window_share": WINDOW_SHARE,
            "average_trace": self.average.to_json(),
        }

    def plot(self, path: str | Path | None = None) -> Any:
        figure = new_figure(5.5, 3.5)
        ax = figure.subplots()
        layers = range(len(self.effect))
        ax.bar(layers, self.effect.numpy(), color="#48a868")
        for layer in self.memit:
            ax.bar(layer, float(self.effect[layer]), color="#2f6e44")
        ax.set_xticks(list(layers))
        ax.set_xlabel("layer")
        ax.set_ylabel("AIE of the MLP at the last subject token")
        ax.set_title(
            f"ROME layer {self.rome[0]}, MEMIT layers {self.memit} ({self.n_facts} facts)",
            fontsize=10,
        )
        return save_figure(figure, path)


def critical_window(effect: torch.Tensor, share: float = WINDOW_SHARE) -> list[int]:
    """The contiguous layers around the peak whose effect is at least `share` of the peak's."""
    peak = int(effect.argmax())
    floor = share * float(effect[peak])
    low, high = peak, peak
    while low > 0 and float(effect[low - 1]) >= floor:
        low -= 1
    while high < len(effect) - 1 and float(effect[high + 1]) >= floor:
        high += 1
    return list(range(low, high + 1))


def locate(
    lm: LM,
    facts: Any = None,
    n: int = DEFAULT_FACTS,
    samples: int = 10,
    noise: float = 3.0,
    window: int = 1,
    on_fact: Any = None,
) -> Located:
    """Trace the MLP outputs of the first `n` known facts (default: `default_facts`) and
    suggest edit layers from their average indirect effect at the last subject token.

    Each MLP is restored alone by default (`window` 1), so that the effect of a layer is its
    own; ROME's figures restore a window of layers, which smooths the curve but credits a
    layer with its neighbours' effect."""
    name, candidates = default_facts(lm) if facts is None else ("given facts", as_facts(facts))
    known = known_facts(lm, candidates, n)
    if not known:
        raise ValueError(
            f"facts: {lm.name} knows none of the {len(candidates)} {name} facts (its top "
            "prediction is never the answer); give facts it knows"
        )
    average = trace_facts(
        lm, known, kinds=("mlp",), samples=samples, noise=noise, window=window, on_fact=on_fact
    )
    effect = average.indirect_effect("mlp")[TOKEN_CLASSES.index(LAST_SUBJECT)].nan_to_num(0.0)
    return Located(
        effect=effect,
        rome=[int(effect.argmax())],
        memit=critical_window(effect),
        facts=name,
        n_facts=average.n_facts,
        average=average,
    )


def auto_layers(lm: LM, single: bool) -> list[int]:
    """The layers `layers: auto` stands for: the located peak (`single`, for one-layer methods
    such as ROME) or MEMIT's window; traced once per model and kept on the `LM`."""
    key = ("located_layers",)
    if key not in lm.cache:
        located = locate(lm)
        lm.cache[key] = located
        logger.warning(
            "kedit: layers: auto on %s: MLP effect at the last subject token peaks at layer %d "
            "(window %s; %d %s facts traced)",
            lm.name,
            located.rome[0],
            located.memit,
            located.n_facts,
            located.facts,
        )
    located = lm.cache[key]
    return list(located.rome if single else located.memit)
