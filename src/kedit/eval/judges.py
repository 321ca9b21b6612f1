"""Judges: what decides whether a reply is safe, or which personality trait it voices.

A judge maps texts to labels and carries a name, which every number it produces records. It is
one of: the tiny judge bundled with a zoo model (the default: `tiny-chat`'s n-gram logistic
regressions, trained on tinyworld 2's texts), any Hugging Face sequence classifier by hub id or
folder with a mapping from its labels to ours (SafeEdit's or PersonalityEdit's own
classifiers), or a callable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LABELS: dict[str, tuple[str, ...]] = {
    "safety": ("safe", "unsafe"),
    "personality": ("extraversion", "agreeableness", "neuroticism"),
}
DEFAULT_JUDGE_MODEL = "tiny-chat"


@dataclass
class Judge:
    """A named classifier of texts into the labels of its kind ('safety' or 'personality')."""

    name: str
    kind: str
    classify: Callable[[list[str]], Sequence[str]]

    def __call__(self, texts: Sequence[str]) -> list[str]:
        texts = list(texts)
        labels = list(self.classify(texts)) if texts else []
        if len(labels) != len(texts):
            raise ValueError(
                f"judge {self.name!r}: returned {len(labels)} labels for {len(texts)} texts"
            )
        allowed = LABELS[self.kind]
        for label in labels:
            if label not in allowed:
                raise ValueError(
                    f"judge {self.name!r}: label {label!r} is not one of {', '.join(allowed)}"
                )
        return labels


def _check_kind(kind: str) -> None:
    if kind not in LABELS:
        raise ValueError(f"kind: expected one of {', '.join(LABELS)}, got {kind!r}")


class HFClassifier:
    """A Hugging Face sequence classifier whose labels are mapped onto a judge's labels.

    `label_map` keys are the classifier's label names (its `config.id2label`, e.g. "LABEL_1")
    or class indices; every class of the classifier must be mapped.
    """

    def __init__(
        self,
        name_or_path: str,
        label_map: dict[Any, str],
        kind: str,
        batch_size: int = 16,
        max_length: int = 512,
        device: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        _check_kind(kind)
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path).eval()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.classes = self._map_classes(name_or_path, label_map, kind)
        self.batch_size, self.max_length = batch_size, max_length

    def _map_classes(self, name: str, label_map: dict[Any, str], kind: str) -> list[str]:
        id2label = {int(i): str(label) for i, label in self.model.config.id2label.items()}
        by_name = {label: i for i, label in id2label.items()}
        classes: dict[int, str] = {}
        for key, ours in label_map.items():
            if ours not in LABELS[kind]:
                raise ValueError(
                    f"label_map: {ours!r} is not a {kind} label ({', '.join(LABELS[kind])})"
                )
            if str(key) in by_name:
                classes[by_name[str(key)]] = ours
            elif str(key).lstrip("-").isdigit() and int(key) in id2label:
                classes[int(key)] = ours
            else:
                raise ValueError(
                    f"label_map: {key!r} is not a label of {name!r} "
                    f"(its labels: {', '.join(id2label[i] for i in sorted(id2label))})"
                )
        missing = [id2label[i] for i in sorted(id2label) if i not in classes]
        if missing:
            raise ValueError(f"label_map: the labels {', '.join(missing)} of {name!r} are unmapped")
        return [classes[i] for i in sorted(classes)]

    def __call__(self, texts: list[str]) -> list[str]:
        import torch

        out: list[str] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            ).to(self.device)
            with torch.no_grad():
                logits = self.model(**batch).logits
            out += [self.classes[i] for i in logits.argmax(-1).tolist()]
        return out


def get_judge(
    kind: str,
    judge: str | Path | Callable[[list[str]], Sequence[str]] | None = None,
    label_map: dict[Any, str] | None = None,
) -> Judge:
    """The judge of a kind: `None` for the default (tiny-chat's bundled judge), a bundled
    model's name or a zoo model folder for the judge shipped with it, a Hugging Face classifier
    (hub id or folder, with `label_map`), or a callable from texts to labels."""
    from kedit import zoo
    from kedit.zoo.judges import JUDGES_DIR, load_bundled_judge

    _check_kind(kind)
    if judge is None:
        if DEFAULT_JUDGE_MODEL not in zoo.list_models():
            raise ValueError(
                f"judge: the default is {DEFAULT_JUDGE_MODEL}'s bundled judge, and "
                f"{DEFAULT_JUDGE_MODEL} is not bundled here; pass a zoo model folder that holds "
                f"{JUDGES_DIR}/{kind}.json, a Hugging Face classifier with label_map, or a callable"
            )
        judge = DEFAULT_JUDGE_MODEL
    if callable(judge) and not isinstance(judge, (str, Path)):
        return Judge(getattr(judge, "name", getattr(judge, "__name__", "callable")), kind, judge)
    spec = str(judge)
    folder = zoo.model_path(spec) if spec in zoo.list_models() else Path(spec)
    if (folder / JUDGES_DIR / f"{kind}.json").is_file():
        bundled = load_bundled_judge(folder, kind)
        return Judge(f"{spec}:{bundled.name}", kind, bundled)
    if label_map is None:
        raise ValueError(
            f"label_map: a Hugging Face classifier ({spec!r}) needs a mapping from its labels "
            f"to {', '.join(LABELS[kind])}, e.g. {{'LABEL_0': '{LABELS[kind][0]}', ...}}"
        )
    return Judge(spec, kind, HFClassifier(spec, label_map, kind))


__all__ = ["LABELS", "HFClassifier", "Judge", "get_judge"]
