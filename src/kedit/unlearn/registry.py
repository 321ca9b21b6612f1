"""Unlearning methods registered by name, and the hyper-parameters they share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kedit.data.unlearn_items import UnlearnItem
from kedit.edits import WeightDelta
from kedit.hparams import model_settings
from kedit.lm import LM
from kedit.methods.registry import HyperParams, hp, resolve_with_defaults

PARTS = ("all", "mlp", "attn")
TUNING_DOC = "docs/unlearning.md#tuning"  # where the model table's unlearning values come from


@dataclass
class UnlearnHyperParams(HyperParams):
    """What every unlearning method's optimisation shares (a method's dataclass extends it)."""

    steps: int = hp(100, "Maximum optimisation steps.")
    lr: float = hp(1e-5, "Adam learning rate (TOFU's and NPO's for full fine-tuning of 7B models).")
    batch_size: int = hp(32, "Forget items per step (and as many retain items).")
    retain_weight: float = hp(0.0, "Weight of the retain term (0: the retain set is not used).")
    parts: str = hp("all", "Weights that train: 'all' (attention and MLP matrices), 'mlp', 'attn'.")
    layers: list[int] | None = hp(None, "Blocks whose weights train (None: every block).")
    lora_rank: int = hp(0, "0: train the weights themselves; r > 0: rank-r LoRA adapters (peft).")
    lora_alpha: float = hp(16.0, "LoRA's scale numerator: updates are alpha / rank · B A.")
    stop_forget_acc: float | None = hp(
        0.0,
        "Stop once the forget set's mean token accuracy is at or below this (None: run every"
        " step).",
    )
    eval_every: int = hp(5, "Steps between measurements (the curves and the early stop).")
    seed: int = hp(0, "Seed of the batch order, random labels and LoRA initialisation.")

    def validate(self) -> None:
        for name in ("steps", "batch_size", "eval_every"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")
        if self.retain_weight < 0:
            raise ValueError(f"retain_weight: expected a number >= 0, got {self.retain_weight!r}")
        if self.parts not in PARTS:
            raise ValueError(f"parts: expected one of {list(PARTS)}, got {self.parts!r}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank: expected 0 or a positive integer, got {self.lora_rank}")
        if self.layers is not None and not self.layers:
            raise ValueError("layers: expected at least one layer or None, got []")
        if self.stop_forget_acc is not None and not 0 <= self.stop_forget_acc <= 1:
            raise ValueError(
                "stop_forget_acc: expected a number in [0, 1] or None, got "
                f"{self.stop_forget_acc!r}"
            )


@dataclass
class UnlearnResult:
    """What an unlearning method computed; `kedit.unlearn` turns it into an `Edit`."""

    deltas: list[WeightDelta]
    info: dict[str, Any]


UnlearnFn = Callable[
    [LM, list[UnlearnItem], list[UnlearnItem], UnlearnHyperParams, bool], UnlearnResult
]


@dataclass(frozen=True)
class UnlearnSpec:
    name: str
    fn: UnlearnFn
    hparams: type[UnlearnHyperParams]
    summary: str
    needs_retain: bool


_METHODS: dict[str, UnlearnSpec] = {}


def register_unlearning(
    name: str, hparams: type[UnlearnHyperParams], summary: str, needs_retain: bool = False
) -> Callable[[UnlearnFn], UnlearnFn]:
    """Register `fn(lm, forget, retain, hparams, progress)` as unlearning method `name`;
    `needs_retain` methods refuse to run without a retain set."""

    def decorator(fn: UnlearnFn) -> UnlearnFn:
        _METHODS[name] = UnlearnSpec(name, fn, hparams, summary, needs_retain)
        return fn

    return decorator


def _load_builtin_methods() -> None:
    from kedit.unlearn import (  # noqa: F401  (registration happens on import)
        ga,
        ga_kl,
        grad_diff,
        memflex,
        npo,
        random_label,
        rmu,
        simnpo,
    )


def list_unlearning_methods() -> list[str]:
    """Names of the registered unlearning methods."""
    _load_builtin_methods()
    return sorted(_METHODS)


def get_unlearning_method(name: str) -> UnlearnSpec:
    """The method registered as `name` (case and '-'/'_' do not matter)."""
    _load_builtin_methods()
    key = name.lower().replace("-", "_") if isinstance(name, str) else name
    if key not in _METHODS:
        raise ValueError(
            f"method: unknown unlearning method {name!r}; available: "
            f"{', '.join(list_unlearning_methods())}"
        )
    return _METHODS[key]


def resolve_unlearning_hparams(
    spec: UnlearnSpec, lm: LM, overrides: dict[str, Any] | UnlearnHyperParams | None
) -> UnlearnHyperParams:
    """The method's dataclass defaults, updated by the model table's values for `lm` (group:
    the method's name) and then by `overrides`, validated."""

    def table() -> dict[str, Any]:
        settings = model_settings(spec.name, spec.name, lm, check=TUNING_DOC)
        return {key: setting.value for key, setting in settings.items()}

    return resolve_with_defaults(spec.hparams, spec.name, overrides, table)
