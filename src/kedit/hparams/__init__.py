"""Per-model defaults of the editing methods, and where each value comes from.

A method's own defaults are its hyper-parameter dataclass's. What a model needs on top of
them lives in one table, `models.yaml`: an entry per model, matched by exact name, by hub id
or by config (family, depth, width, MLP width), with per method group the values and their
source. A model without an entry for the method gets the layers of the nearest entry of its
family scaled to its depth (`relative_layers`) and, once per model and method, a notice that
they are untuned. The statistics corpus comes from the model (`kedit.stats.default_corpus`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from kedit.lm import LM
from kedit.stats import DEFAULT_CORPUS, default_corpus

DEFAULT = "default"  # the source of a dataclass default
OVERRIDE = "override"  # the source of a value the user gave
REFERENCE_ENTRY = "gpt2-xl"  # whose layers a family without entries scales (ROME's model)
logger = logging.getLogger("kedit")
_noticed: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Setting:
    """A default value and where it comes from."""

    value: Any
    source: str


@dataclass(frozen=True)
class ModelShape:
    """What config matching compares: architecture family, depth, width and MLP width."""

    family: str
    layers: int
    width: int
    mlp_width: int

    @classmethod
    def of(cls, lm: LM) -> ModelShape:
        out = lm.model.get_submodule(lm.layout.mlp_out_name(0)).weight
        mlp_width = lm.layout.in_out(out)[0]
        return cls(lm.layout.family, lm.n_layers, lm.model.config.hidden_size, mlp_width)

    def describe(self) -> str:
        return f"{self.family}, {self.layers} layers, width {self.width}, MLP {self.mlp_width}"


@functools.cache
def model_table() -> dict[str, dict[str, Any]]:
    """The parsed `models.yaml`, once per process."""
    return yaml.safe_load(resources.files("kedit").joinpath("hparams/models.yaml").read_text())


def match_model(lm: LM) -> tuple[str, str] | None:
    """`(entry, how it matched)` of the model table for `lm`: by exact name (a bundled model's
    name, or the recipe a zoo model folder was trained with), by hub id (any case), or by
    config (family, depth, width, MLP width); None where no entry matches."""
    table = model_table()
    for name in (lm.name, lm.recipe):
        if name in table:
            return name, "name"
    wanted = lm.name.lower()
    for entry, spec in table.items():
        if wanted in (hub.lower() for hub in spec.get("hub", [])):
            return entry, f"hub id {lm.name}"
    shape = ModelShape.of(lm)
    for entry, spec in table.items():
        if "config" in spec and ModelShape(**spec["config"]) == shape:
            return entry, f"config ({shape.describe()})"
    return None


def model_settings(method: str, group: str, lm: LM, check: str | None = None) -> dict[str, Setting]:
    """The values `lm` needs for `method` (of table group `group`) beyond its dataclass, with
    their sources: the matching table entry's, else layers by relative depth and a notice that
    names where to `check` them (default: `kedit methods METHOD -m MODEL`)."""
    matched = match_model(lm)
    settings: dict[str, Setting] = {}
    block = model_table()[matched[0]]["methods"].get(group) if matched else None
    if block is not None:
        entry, how = matched
        source = f"model table: {entry}, matched by {how}; {block['source']}"
        settings = {key: Setting(value, source) for key, value in block.items() if key != "source"}
    else:
        reference = _reference_entry(group, ModelShape.of(lm))
        if reference is not None:
            settings["layers"] = relative_layers(group, reference, lm.n_layers)
        _notice_untuned(method, lm, settings.get("layers"), check)
    return settings


def corpus_setting(lm: LM) -> Setting:
    """The statistics corpus a model implies (`kedit.stats.default_corpus`), with its reason."""
    corpus = default_corpus(lm)
    why = (
        "bundled model, trained on it"
        if corpus == DEFAULT_CORPUS
        else "not a bundled model: real text, as ROME/MEMIT/EasyEdit use Wikipedia"
    )
    return Setting(corpus, f"the model's default corpus ({why})")


def relative_layers(group: str, reference: str, depth: int) -> Setting:
    """The reference entry's layers for a method group moved to a model of `depth` layers: the
    first and last scaled by depth / the reference's depth and rounded, the range between."""
    spec = model_table()[reference]
    their_depth = spec["config"]["layers"]
    layers = spec["methods"][group]["layers"]
    first, last = (
        min(depth - 1, int(layer * depth / their_depth + 0.5))
        for layer in (min(layers), max(layers))
    )
    source = (
        f"relative depth: {reference}'s layers {layers} of {their_depth}, scaled to {depth} "
        "(untuned)"
    )
    return Setting(list(range(first, last + 1)), source)


def _reference_entry(group: str, shape: ModelShape) -> str | None:
    """The table entry whose layers for a method group an unmatched model scales: the nearest in
    depth of its family, else GPT-2 XL, else the nearest in depth of any family (None where no
    entry has layers for the group)."""
    having = {
        entry: spec["config"]
        for entry, spec in model_table().items()
        if "config" in spec and "layers" in spec["methods"].get(group, {})
    }

    def nearest(entries: list[str]) -> str | None:
        return min(
            entries, key=lambda e: (abs(having[e]["layers"] - shape.layers), e), default=None
        )

    family = [entry for entry, config in having.items() if config["family"] == shape.family]
    if family:
        return nearest(family)
    return REFERENCE_ENTRY if REFERENCE_ENTRY in having else nearest(list(having))


def _notice_untuned(method: str, lm: LM, layers: Setting | None, check: str | None) -> None:
    """Say once per model and method that its defaults are untuned."""
    if (lm.name, method) in _noticed:
        return
    _noticed.add((lm.name, method))
    where = f"layers {layers.value} by relative depth" if layers else "the method's defaults"
    logger.warning(
        "kedit: no tuned %s settings for %s (%s); using %s, untuned: check them with %s",
        method,
        lm.name,
        ModelShape.of(lm).describe(),
        where,
        check or f"`kedit methods {method} -m {lm.name}`",
    )
