"""Second-moment statistics E[k kᵀ] of the keys entering MLP output projections.

Collected for every requested layer in one pass that stops after the deepest one, with
padding excluded and sequence length capped, then cached on disk keyed by model fingerprint,
module, corpus, sample count, length cap and dtype, with that metadata stored beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kedit.hooks import capture, stop_after
from kedit.lm import LM

DEFAULT_CORPUS = "tinyworld"
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def cache_dir() -> Path:
    """Where statistics are cached: $KEDIT_CACHE/stats, by default ~/.cache/kedit/stats."""
    root = os.environ.get("KEDIT_CACHE") or Path.home() / ".cache" / "kedit"
    return Path(root) / "stats"


def read_corpus(corpus: str | Path | None = None) -> tuple[str, list[str]]:
    """`(corpus_id, documents)` from the bundled tinyworld corpus, a .txt file (one document
    per non-empty line) or a .jsonl file (a "text" field per line)."""
    if corpus is None or str(corpus) == DEFAULT_CORPUS:
        text = resources.files("kedit").joinpath("zoo/data/tinyworld_corpus.txt").read_text()
        name = DEFAULT_CORPUS
    else:
        path = Path(corpus)
        if not path.is_file():
            raise FileNotFoundError(
                f"corpus: {str(corpus)!r} is neither 'tinyworld' nor an existing file"
            )
        text, name = path.read_text(encoding="utf-8"), path.name
    if name.endswith(".jsonl"):
        docs = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"corpus {name} line {number}: expected an object with 'text'")
            docs.append(record["text"])
    else:
        docs = [line for line in text.splitlines() if line.strip()]
    if not docs:
        raise ValueError(f"corpus {name!r} holds no documents")
    digest = hashlib.sha256("\n".join(docs).encode()).hexdigest()[:12]
    return f"{name}-{digest}", docs


@dataclass(frozen=True)
class StatsKey:
    """Everything that determines a statistic; stored as JSON beside it."""

    model_fingerprint: str
    module: str
    corpus: str
    n_samples: int
    max_length: int
    dtype: str

    def path(self) -> Path:
        stem = (
            f"{self.module}__{self.corpus}__n{self.n_samples}__len{self.max_length}__{self.dtype}"
        )
        return cache_dir() / self.model_fingerprint / f"{stem}.safetensors"


def second_moments(
    lm: LM,
    layers: list[int],
    corpus: str | Path | None = None,
    n_samples: int = 100_000,
    max_length: int = 256,
    dtype: str = "float64",
    batch_tokens: int = 8192,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """E[k kᵀ] of the inputs of each layer's MLP output projection, from cache or computed."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    for layer in layers:
        lm.check_layer(layer)
    corpus_id, docs = read_corpus(corpus)
    docs = docs[:n_samples]
    keys = {
        layer: StatsKey(
            lm.fingerprint, lm.layout.mlp_out_name(layer), corpus_id, len(docs), max_length, dtype
        )
        for layer in layers
    }
    result = {
        layer: load_file(str(k.path()))["mom2"] for layer, k in keys.items() if k.path().exists()
    }
    missing = [layer for layer in layers if layer not in result]
    if missing:
        computed = _collect(lm, missing, docs, max_length, DTYPES[dtype], batch_tokens, progress)
        for layer, (moment, count) in computed.items():
            key = keys[layer]
            key.path().parent.mkdir(parents=True, exist_ok=True)
            meta = {**asdict(key), "tokens": count, "model": lm.name}
            save_file({"mom2": moment}, str(key.path()), metadata={"kedit": json.dumps(meta)})
            key.path().with_suffix(".json").write_text(json.dumps(meta, indent=2))
            result[layer] = moment
    return result


def second_moment(lm: LM, layer: int, **kwargs: object) -> torch.Tensor:
    """E[k kᵀ] for one layer; see `second_moments`."""
    return second_moments(lm, [layer], **kwargs)[layer]


@torch.no_grad()
def _collect(
    lm: LM,
    layers: list[int],
    docs: list[str],
    max_length: int,
    dtype: torch.dtype,
    batch_tokens: int,
    progress: bool,
) -> dict[int, tuple[torch.Tensor, int]]:
    from rich.progress import Progress

    names = {layer: lm.layout.mlp_out_name(layer) for layer in layers}
    deepest = names[max(layers)]
    encoded = [lm.encode_prompt(doc)[:max_length] for doc in docs]
    encoded = [ids for ids in encoded if ids]
    sums: dict[int, torch.Tensor] = {}
    count = 0
    batch_size = max(1, batch_tokens // max_length)
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("second moments", total=len(encoded))
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            ids, mask = lm.pad(chunk)
            with capture(lm.model, names.values(), "input") as seen, stop_after(lm.model, deepest):
                lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
            real = mask.bool()
            for layer, name in names.items():
                keys = seen[name][real].to(dtype)
                sums[layer] = sums.get(layer, 0) + keys.T @ keys
            count += int(real.sum())
            bar.advance(task, len(chunk))
    return {layer: (total / count, count) for layer, total in sums.items()}
