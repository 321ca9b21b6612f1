"""The bundled tiny models and tinyworld, the synthetic knowledge base they were trained on."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kedit.zoo.world import World, build_world

if TYPE_CHECKING:
    from kedit.zoo.chatworld import ChatWorld

MODELS_DIR = Path(__file__).parent / "models"
DATA_DIR = Path(__file__).parent / "data"
CORPUS_FILE = DATA_DIR / "tinyworld_corpus.txt"
ZOO_META = "kedit_zoo.json"  # a trained zoo model's recipe, seed and fact accuracies


def list_models() -> list[str]:
    """Names of the bundled models (those whose folder holds a config.json)."""
    if not MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in MODELS_DIR.iterdir() if (p / "config.json").is_file())


def model_path(name: str) -> Path:
    """The folder of a bundled model; a ValueError lists the known names otherwise."""
    known = list_models()
    if name not in known:
        raise ValueError(
            f"unknown bundled model {name!r}; known models: {', '.join(known) or '(none)'}"
        )
    return MODELS_DIR / name


BENCHMARKS = {"knowedit": "tinyworld_knowedit.json", "counterfact": "tinyworld_counterfact.json"}


def benchmark_path(format: str = "knowedit") -> Path:
    """The shipped tinyworld benchmark file in a format: "knowedit" (EasyEdit) or "counterfact"
    (ROME/MEMIT)."""
    if format not in BENCHMARKS:
        raise ValueError(f"format: {format!r} is not one of {sorted(BENCHMARKS)}")
    return DATA_DIR / BENCHMARKS[format]


def model_info(model: str | Path) -> dict:
    """What a zoo model's `kedit_zoo.json` records (bundled name or folder): recipe, seeds,
    fact accuracies; {} for a model without one."""
    import json

    path = model_folder(model) / ZOO_META
    return json.loads(path.read_text()) if path.is_file() else {}


def model_folder(model: str | Path) -> Path:
    """A zoo model's folder: `model` itself when it is one, else the bundled model of that name."""
    return Path(model) if Path(model).is_dir() else model_path(str(model))


def model_chat_world(model: str | Path) -> ChatWorld:
    """The tinyworld 2 a zoo model (bundled name or folder) was trained on, rebuilt from the
    seed, size and refusal style its `kedit_zoo.json` records."""
    from kedit.zoo.chatworld import build_chat_world

    info = model_info(model)
    if not info:
        raise ValueError(f"model: {str(model)!r} has no {ZOO_META}; expected a zoo model")
    refusals = (info.get("recipe") or {}).get("refusals", "short")
    return build_chat_world(info["world_seed"], info["n_people"], refusals)


ABILITIES = ("facts", "dialogue", "in-context", "safety", "personality")


def abilities(info: dict) -> list[str]:
    """What a zoo model can do, from its `kedit_zoo.json`: every one knows facts; those trained
    on tinyworld 2 also answer in dialogue, follow facts stated in their context, refuse or
    comply with harmful requests, and voice opinions in a personality trait."""
    if (info.get("recipe") or {}).get("world_version", 1) >= 2:
        return list(ABILITIES)
    return ["facts"]


def train_model(name: str, out_dir: str | Path, seed: int = 0, **kwargs) -> Path:
    """Train zoo model ``name`` from scratch into ``out_dir`` (see :mod:`kedit.zoo.train`)."""
    from kedit.zoo.train import train_model as _train

    return _train(name, out_dir, seed, **kwargs)


def evaluate_world_model(model_dir: str | Path, sample: int | None = None) -> dict[str, float]:
    """Fact accuracies of a zoo model folder (see :mod:`kedit.zoo.train`)."""
    from kedit.zoo.train import evaluate_world_model as _eval

    return _eval(model_dir, sample)


__all__ = [
    "ABILITIES",
    "BENCHMARKS",
    "abilities",
    "CORPUS_FILE",
    "benchmark_path",
    "model_chat_world",
    "model_folder",
    "model_info",
    "World",
    "build_world",
    "evaluate_world_model",
    "list_models",
    "model_path",
    "train_model",
]
