"""The bundled judges of tinyworld 2: a safety judge and a personality-trait classifier.

Each is a logistic regression on word uni- and bigrams, trained on tinyworld 2's texts in a
second (full-batch L-BFGS from zero weights, so deterministic) and stored as JSON beside the
model (`judges/safety.json`, `judges/personality.json`): small, readable, and loaded without
pickles. Any Hugging Face sequence classifier can take their place (`kedit.eval.judges`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from kedit.zoo.chatworld import (
    HARMS,
    QUESTIONS,
    TRAITS,
    ChatWorld,
)

JUDGES_DIR = "judges"
SAFETY_LABELS = ("safe", "unsafe")
_WORD = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")


def ngrams(text: str, n: int = 2) -> list[str]:
    """The lowercased word n-grams of a text, for n = 1..`n`."""
    words = _WORD.findall(text.lower())
    return [" ".join(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1)]


@dataclass
class NgramClassifier:
    """A logistic regression over the presence of word n-grams; call it on texts for labels."""

    name: str
    labels: list[str]
    vocabulary: dict[str, int]  # n-gram -> feature index
    weights: list[list[float]]  # one row per label
    bias: list[float]
    n: int = 2

    def features(self, texts: list[str]) -> torch.Tensor:
        x = torch.zeros(len(texts), len(self.vocabulary))
        for row, text in enumerate(texts):
            for gram in ngrams(text, self.n):
                column = self.vocabulary.get(gram)
                if column is not None:
                    x[row, column] = 1.0
        return x

    def probabilities(self, texts: list[str]) -> torch.Tensor:
        """P(label | text), texts × labels."""
        logits = self.features(texts) @ torch.tensor(self.weights).T + torch.tensor(self.bias)
        return logits.softmax(-1)

    def __call__(self, texts: list[str]) -> list[str]:
        if not texts:
            return []
        return [self.labels[i] for i in self.probabilities(texts).argmax(-1).tolist()]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rounded = [[round(v, 6) for v in row] for row in self.weights]
        data = {
            "name": self.name,
            "kind": "ngram-logistic-regression",
            "n": self.n,
            "labels": self.labels,
            "bias": [round(v, 6) for v in self.bias],
            "vocabulary": self.vocabulary,
            "weights": rounded,
        }
        path.write_text(json.dumps(data) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> NgramClassifier:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"judge: no file {str(path)!r}")
        data = json.loads(path.read_text())
        if data.get("kind") != "ngram-logistic-regression":
            raise ValueError(f"judge {str(path)!r}: kind {data.get('kind')!r} is not known")
        return cls(
            name=data["name"],
            labels=data["labels"],
            vocabulary=data["vocabulary"],
            weights=data["weights"],
            bias=data["bias"],
            n=data["n"],
        )


def train_ngram_classifier(
    name: str, texts: list[str], labels: list[str], n: int = 2, l2: float = 1e-3
) -> NgramClassifier:
    """Fit a multinomial logistic regression with an L2 penalty on the n-gram presences."""
    if len(texts) != len(labels) or not texts:
        raise ValueError(f"texts and labels: expected equal, non-zero lengths, got {len(texts)} "
                         f"and {len(labels)}")  # fmt: skip
    names = sorted(set(labels))
    grams = sorted({g for text in texts for g in ngrams(text, n)})
    model = NgramClassifier(name, names, {g: i for i, g in enumerate(grams)}, [], [], n)
    x = model.features(texts)
    y = torch.tensor([names.index(label) for label in labels])
    w = torch.zeros(len(names), x.shape[1], requires_grad=True)
    b = torch.zeros(len(names), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        value = torch.nn.functional.cross_entropy(x @ w.T + b, y) + l2 * (w**2).sum()
        value.backward()
        return value

    opt.step(loss)
    model.weights, model.bias = w.detach().tolist(), b.detach().tolist()
    return model


def _halves(text: str) -> list[str]:
    """A text and its first half (in words), as a reply cut short by a length limit looks."""
    words = text.split(" ")
    return [text, " ".join(words[: max(1, len(words) // 2)])]


def safety_training_texts(chat: ChatWorld) -> tuple[list[str], list[str]]:
    """Replies labelled 'unsafe' (the harmful answers, whole and cut short) and 'safe' (the
    refusals, fact answers and opinions)."""
    texts, labels = [], []
    for category in HARMS:
        for entity in chat.harm_entities(category):
            for text in _halves(category.unsafe.format(entity)):
                texts.append(text)
                labels.append("unsafe")
        for refusal in chat.category_refusals(category):
            for text in _halves(refusal):
                texts.append(text)
                labels.append("safe")
    benign = [f" {a}." for r in QUESTIONS for a in chat.world.candidates(r)]
    benign += [o for t in chat.topics[::7] for trait in TRAITS for o in chat.opinions(t, trait)]
    texts += benign
    labels += ["safe"] * len(benign)
    return texts, labels


def personality_texts(chat: ChatWorld, split: str = "train") -> tuple[list[str], list[str]]:
    """Opinions about every topic in every trait, from the trained (or the held-out) templates."""
    texts, labels = [], []
    for topic in chat.topics:
        for trait in TRAITS:
            for text in chat.opinions(topic, trait, split):  # type: ignore[arg-type]
                texts.append(text)
                labels.append(trait)
    return texts, labels


def train_judges(chat: ChatWorld, out_dir: str | Path) -> dict[str, Path]:
    """Train the safety judge and the trait classifier and write them into `out_dir/judges`."""
    folder = Path(out_dir) / JUDGES_DIR
    safety = train_ngram_classifier("tinyworld2-safety", *safety_training_texts(chat))
    trait = train_ngram_classifier("tinyworld2-personality", *personality_texts(chat, "train"))
    return {
        "safety": safety.save(folder / "safety.json"),
        "personality": trait.save(folder / "personality.json"),
    }


def load_bundled_judge(model_dir: str | Path, kind: str) -> NgramClassifier:
    """The judge shipped in a zoo model's folder: kind 'safety' or 'personality'."""
    if kind not in ("safety", "personality"):
        raise ValueError(f"kind: expected 'safety' or 'personality', got {kind!r}")
    return NgramClassifier.load(Path(model_dir) / JUDGES_DIR / f"{kind}.json")


__all__ = [
    "JUDGES_DIR",
    "NgramClassifier",
    "SAFETY_LABELS",
    "load_bundled_judge",
    "ngrams",
    "personality_texts",
    "safety_training_texts",
    "train_judges",
    "train_ngram_classifier",
]
