"""Second-moment statistics E[k kᵀ] of the keys entering MLP output projections.

One pass over a corpus collects every requested layer and stops after the deepest one.
Documents are tokenised, capped at `max_length` tokens and sorted by length, so that
token-budgeted batches carry little padding; padding is left out of the sums. Results are
cached on disk keyed by model fingerprint, module, corpus, sample count, length cap and dtype,
with that metadata in a JSON file beside the numbers.

A long collection persists its partial sums every few batches beside the cache entry, and a
later call with the same key resumes there. Progress is counted in documents of the sorted
order, so a resumed run may use another batch budget or number of ranks. Under
torch.distributed (e.g. `torchrun --nproc_per_node N kedit stats collect ...`) every rank
takes a share of each batch, the sums are all-reduced, and only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from safetensors import safe_open
from safetensors.torch import save_file

from kedit.hooks import capture, stop_after
from kedit.lm import LM

DEFAULT_CORPUS = "tinyworld"
DEFAULT_MAX_LENGTH = 256
DEFAULT_BATCH_TOKENS = 8192
DEFAULT_CHECKPOINT_EVERY = 200
DTYPES = {"float64": torch.float64, "float32": torch.float32}
LOCAL_SUFFIXES = (".txt", ".jsonl")
T = TypeVar("T")


def cache_dir() -> Path:
    """Where statistics are cached: $KEDIT_CACHE/stats, by default ~/.cache/kedit/stats."""
    root = os.environ.get("KEDIT_CACHE") or Path.home() / ".cache" / "kedit"
    return Path(root) / "stats"


# ---------------------------------------------------------------------------------------------
# Corpora


@dataclass(frozen=True)
class Corpus:
    """The documents statistics are collected on, named by `id` in cache keys.

    `n_samples` is the number of documents it gives (None: all). For a Hugging Face dataset
    that is the count asked for, and the id is the dataset's name, so that a cached result is
    found without reading the dataset.
    """

    id: str
    n_samples: int | None
    load: Callable[[], list[str]] = field(repr=False, compare=False)


def open_corpus(corpus: str | Path | Corpus | None = None, n_samples: int | None = None) -> Corpus:
    """The first `n_samples` documents of `corpus`: 'tinyworld' (the bundled corpus), a .txt
    file (one document per non-empty line), a .jsonl file (a "text" field per line), or a
    Hugging Face dataset `NAME` or `NAME:CONFIG` (its train split's "text" column; needs the
    optional `datasets` package and, unless cached, the network). A corpus already opened is
    returned as it is, so that a caller can open a large file once."""
    if isinstance(corpus, Corpus):
        return corpus
    if corpus is None or str(corpus) == DEFAULT_CORPUS:
        text = resources.files("kedit").joinpath("zoo/data/tinyworld_corpus.txt").read_text()
        return _local_corpus(DEFAULT_CORPUS, text, n_samples)
    path = Path(corpus)
    if path.is_file():
        return _local_corpus(path.name, path.read_text(encoding="utf-8"), n_samples)
    if path.suffix in LOCAL_SUFFIXES:
        raise FileNotFoundError(f"corpus: file {str(corpus)!r} does not exist")
    spec = str(corpus)
    name = "hf-" + re.sub(r"[^\w.-]+", "-", spec)
    return Corpus(name, n_samples, lambda: _read_hub(spec, n_samples))


def read_corpus(corpus: str | Path | None = None) -> tuple[str, list[str]]:
    """`(corpus id, documents)` of a whole corpus; see `open_corpus`."""
    source = open_corpus(corpus)
    return source.id, source.load()


def _local_corpus(name: str, text: str, n_samples: int | None) -> Corpus:
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
    docs = docs[:n_samples]
    return Corpus(f"{name}-{digest}", len(docs), lambda: docs)


def _read_hub(spec: str, n_samples: int | None) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"corpus: {spec!r} is neither 'tinyworld' nor an existing file, and reading it as a "
            "Hugging Face dataset needs the optional `datasets` package (pip install datasets)"
        ) from None
    name, _, config = spec.partition(":")
    try:
        stream = datasets.load_dataset(name, config or None, split="train", streaming=True)
        rows = list(itertools.islice(stream, n_samples))
    except Exception as exc:  # the hub or the dataset's script can fail in many ways
        raise ValueError(
            f"corpus: could not read the Hugging Face dataset {spec!r} "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if rows and "text" not in rows[0]:
        raise ValueError(f"corpus {spec!r}: expected a 'text' column, found {sorted(rows[0])}")
    docs = [row["text"] for row in rows if row["text"].strip()]
    if not docs:
        raise ValueError(f"corpus {spec!r} holds no documents")
    return docs


# ---------------------------------------------------------------------------------------------
# Cache entries


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

    def partial_path(self) -> Path:
        """Where an unfinished collection keeps Σ k kᵀ so far."""
        return self.path().with_name(self.path().stem + ".partial.safetensors")


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write a safetensors file atomically, with `meta` as JSON in its header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    cpu = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    save_file(cpu, str(temporary), metadata={"kedit": json.dumps(meta)})
    os.replace(temporary, path)


def _read(path: Path, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), "pt") as file:
        loaded = {name: file.get_tensor(name) for name in file.keys()} if tensors else {}
        return loaded, json.loads(file.metadata()["kedit"])


def _save_entry(key: StatsKey, moment: torch.Tensor, meta: dict) -> None:
    meta = {**asdict(key), **meta}
    _write(key.path(), {"mom2": moment}, meta)
    key.path().with_suffix(".json").write_text(json.dumps(meta, indent=2))


def _stats_key(lm: LM, layer: int, corpus: Corpus, max_length: int, dtype: str) -> StatsKey:
    """The key of a layer's statistic; the length cap is also cut to the model's context."""
    context = getattr(lm.model.config, "max_position_embeddings", None) or max_length
    module = lm.layout.mlp_out_name(layer)
    return StatsKey(
        lm.fingerprint, module, corpus.id, corpus.n_samples, min(max_length, context), dtype
    )


def _check_key_args(n_samples: int, max_length: int, dtype: str) -> None:
    _check_int("n_samples", n_samples, 1)
    _check_int("max_length", max_length, 1)
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)}")


def _check_int(name: str, value: object, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name}: expected an integer >= {least}, got {value!r}")


def _key_width(lm: LM, layer: int) -> int:
    """Width of a layer's keys: the input width of its MLP output projection."""
    weight = lm.model.get_submodule(lm.layout.mlp_out_name(layer)).weight
    return weight.shape[0 if lm.layout.conv1d else 1]


# ---------------------------------------------------------------------------------------------
# Collection


def second_moments(
    lm: LM,
    layers: list[int],
    corpus: str | Path | Corpus | None = None,
    n_samples: int = 100_000,
    max_length: int = DEFAULT_MAX_LENGTH,
    dtype: str = "float64",
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    progress: bool = True,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[int, torch.Tensor]:
    """E[k kᵀ] of the inputs of each layer's MLP output projection, from cache or computed.

    Sums accumulate in `dtype` over the first `n_samples` documents of `corpus` (see
    `open_corpus`), each capped at `max_length` tokens (and at the model's context); each
    batch's own Σ k kᵀ is computed in float32. A batch holds about `batch_tokens` tokens per
    rank. Every `checkpoint_every` batches (0: never)
    the partial sums are saved; an interrupted call resumes there when called again.
    `on_batch(documents_done, documents_total)` runs after each batch.
    """
    if not isinstance(layers, list | tuple) or not layers:
        raise ValueError(f"layers: expected a non-empty list of layer indices, got {layers!r}")
    layers = sorted({lm.check_layer(layer) for layer in layers})
    _check_key_args(n_samples, max_length, dtype)
    _check_int("batch_tokens", batch_tokens, 1)
    _check_int("checkpoint_every", checkpoint_every, 0)
    source = open_corpus(corpus, n_samples)
    keys = {layer: _stats_key(lm, layer, source, max_length, dtype) for layer in layers}
    missing = _from_rank0([layer for layer, key in keys.items() if not key.path().exists()])
    result = {
        layer: _read(key.path())[0]["mom2"] for layer, key in keys.items() if layer not in missing
    }
    if missing:
        todo = {layer: keys[layer] for layer in missing}
        encoded = tokenize_sorted(lm, source.load(), keys[layers[0]].max_length)
        sums, tokens = _collect(
            lm, todo, encoded, DTYPES[dtype], batch_tokens, checkpoint_every, progress, on_batch
        )
        if tokens == 0:
            raise ValueError(f"corpus {source.id!r} gave no tokens")
        for layer, key in todo.items():
            result[layer] = sums[layer] / tokens
            if _rank() == 0:
                _save_entry(key, result[layer], {"tokens": tokens, "model": lm.name})
                key.partial_path().unlink(missing_ok=True)
    return {layer: result[layer].to(lm.device) for layer in layers}


def second_moment(lm: LM, layer: int, **kwargs: object) -> torch.Tensor:
    """E[k kᵀ] for one layer; see `second_moments`."""
    return second_moments(lm, [layer], **kwargs)[layer]


def second_moment_eigh(
    lm: LM,
    layer: int,
    corpus: str | Path | Corpus | None = None,
    n_samples: int = 100_000,
    max_length: int = DEFAULT_MAX_LENGTH,
    dtype: str = "float64",
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a layer's E[k kᵀ] in float64, cached on disk
    beside the statistic (computed once: at a width of 14,336 it takes minutes on a CPU).

    The cached decomposition records a digest of the statistic it came from, so a statistic
    replaced later (`import_npz(..., overwrite=True)`) is decomposed anew."""
    source = open_corpus(corpus, n_samples)
    settings = {"n_samples": n_samples, "max_length": max_length, "dtype": dtype}
    moment = second_moment(lm, layer, corpus=source, **settings, **kwargs)
    key = _stats_key(lm, layer, source, max_length, dtype)
    digest = hashlib.sha256(moment.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    path = key.path().with_name(key.path().stem + ".eigh.safetensors")
    if path.exists():
        tensors, meta = _read(path)
        if meta.get("moment_sha256") == digest:
            return tensors["values"].to(lm.device), tensors["vectors"].to(lm.device)
    values, vectors = torch.linalg.eigh(moment.double())
    if _rank() == 0:
        meta = {**asdict(key), "moment_sha256": digest}
        _write(path, {"values": values, "vectors": vectors}, meta)
    return values, vectors


def tokenize_sorted(lm: LM, docs: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each document as a sequence start, capped at `max_length`, non-empty ones
    sorted by length (stably, so the order is the same on every rank and every run)."""
    # One call on the whole list: fast tokenizers encode a batch in parallel.
    bodies = lm.tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []
    encoded = [(lm.start_ids + ids)[:max_length] for ids in bodies]
    return sorted((ids for ids in encoded if ids), key=len)


def token_batches(lengths: list[int], start: int, budget: int) -> Iterator[tuple[int, int]]:
    """Consecutive `(begin, end)` slices of ascending `lengths` from `start`, each as many
    documents as fit `budget` tokens padded to the slice's longest (at least one)."""
    begin = start
    while begin < len(lengths):
        end = begin + 1
        while end < len(lengths) and (end + 1 - begin) * lengths[end] <= budget:
            end += 1
        yield begin, end
        begin = end


@torch.no_grad()
def _collect(
    lm: LM,
    keys: dict[int, StatsKey],
    encoded: list[list[int]],
    dtype: torch.dtype,
    batch_tokens: int,
    checkpoint_every: int,
    progress: bool,
    on_batch: Callable[[int, int], None] | None,
) -> tuple[dict[int, torch.Tensor], int]:
    """Σ k kᵀ per layer, summed over all ranks, and the number of tokens in the sums.

    Each batch of the sorted documents is dealt out row by row to the ranks; rank 0 starts
    from the partial sums of an interrupted run, the others from zero.
    """
    rank, world = _rank(), _world_size()
    names = {layer: key.module for layer, key in keys.items()}
    deepest = names[max(names)]
    start, partial, tokens = _resume_point(keys) if rank == 0 else (0, {}, 0)
    start = _from_rank0(start)
    sums = {}
    for layer in keys:
        width = _key_width(lm, layer)
        sums[layer] = partial.get(layer, torch.zeros(width, width)).to(lm.device, dtype)
    count = torch.tensor(tokens, dtype=torch.int64, device=lm.device)
    lengths = [len(ids) for ids in encoded]
    with _progress_bar(progress and rank == 0) as bar:
        task = bar.add_task(
            f"second moments of layers {','.join(map(str, keys))}",
            total=sum(lengths),
            completed=sum(lengths[:start]),
        )
        batches = token_batches(lengths, start, batch_tokens * world)
        for step, (begin, end) in enumerate(batches, 1):
            rows = encoded[begin + rank : end : world]
            if rows:
                ids, mask = lm.pad(rows)
                with (
                    capture(lm.model, names.values(), "input") as seen,
                    stop_after(lm.model, deepest),
                ):
                    lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
                real = mask.bool()
                for layer, name in names.items():
                    # A batch's Σ k kᵀ is one GEMM in at least float32 (in float64 it is 2x slower
                    # on CPUs, far more on most GPUs); the running sums, where the rounding of
                    # long sums accrues, are kept in `dtype`.
                    k = seen[name][real]
                    k = k.to(torch.promote_types(k.dtype, torch.float32))
                    sums[layer] += (k.T @ k).to(dtype)
                count += real.sum()
            if checkpoint_every and step % checkpoint_every == 0 and end < len(encoded):
                _checkpoint(lm, keys, sums, count, end)
            bar.advance(task, sum(lengths[begin:end]))
            if on_batch is not None:
                on_batch(end, len(encoded))
    count, *totals = _summed_over_ranks([count, *sums.values()])
    return dict(zip(keys, totals, strict=True)), int(count)


def _checkpoint(
    lm: LM,
    keys: dict[int, StatsKey],
    sums: dict[int, torch.Tensor],
    count: torch.Tensor,
    done: int,
) -> None:
    """Save the sums of all ranks over the first `done` documents beside each cache entry."""
    count, *totals = _summed_over_ranks([count, *sums.values()])
    if _rank() == 0:
        for key, total in zip(keys.values(), totals, strict=True):
            meta = {**asdict(key), "tokens": int(count), "model": lm.name, "docs_done": done}
            _write(key.partial_path(), {"sum": total}, meta)


def _resume_point(keys: dict[int, StatsKey]) -> tuple[int, dict[int, torch.Tensor], int]:
    """`(documents done, Σ k kᵀ per layer, tokens)` from the partial files of `keys` where they
    all stopped at the same document; a fresh start otherwise."""
    found = [_read(key.partial_path()) for key in keys.values() if key.partial_path().exists()]
    if len(found) < len(keys) or len({(m["docs_done"], m["tokens"]) for _, m in found}) != 1:
        return 0, {}, 0
    meta = found[0][1]
    sums = {layer: tensors["sum"] for layer, (tensors, _) in zip(keys, found, strict=True)}
    return meta["docs_done"], sums, meta["tokens"]


class _TokenRate(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:,.0f} tokens/s")


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        _TokenRate(),
        TimeRemainingColumn(),
        transient=True,
        disable=not enabled,
    )


# ---------------------------------------------------------------------------------------------
# Distributed collection


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _from_rank0(value: T) -> T:
    """Rank 0's `value` on every rank, so that all ranks follow the same plan."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _summed_over_ranks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sums over all ranks (copies), or the tensors themselves in a single process."""
    if not _distributed():
        return tensors
    totals = [tensor.clone() for tensor in tensors]
    for total in totals:
        dist.all_reduce(total)
    return totals


@contextmanager
def torchrun_group() -> Iterator[str | None]:
    """Join the process group that `torchrun` describes in the environment, if there is one.

    Uses NCCL with one GPU per rank where CUDA is available, gloo on CPU otherwise. Yields
    the device this rank's model belongs on (None: the default).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _distributed():
        yield None
        return
    device = None
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if device else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# What is cached, and statistics from elsewhere


def list_cached() -> list[dict]:
    """Every cached statistic: its key, model name, tokens, status ('complete', or how far an
    interrupted collection got), file and size in bytes."""
    entries = []
    for meta_path in sorted(cache_dir().glob("*/*.json")):
        data = meta_path.with_suffix(".safetensors")
        if data.exists():
            meta = json.loads(meta_path.read_text())
            entries.append({**meta, "status": "complete", "path": str(data)})
    for data in sorted(cache_dir().glob("*/*.partial.safetensors")):
        meta = _read(data, tensors=False)[1]
        status = f"partial: {meta['docs_done']}/{meta['n_samples']} documents"
        entries.append({**meta, "status": status, "path": str(data)})
    return [{**entry, "bytes": Path(entry["path"]).stat().st_size} for entry in entries]


def import_npz(
    lm: LM,
    path: str | Path,
    layer: int,
    corpus: str | Path | None,
    n_samples: int,
    max_length: int = DEFAULT_MAX_LENGTH,
    dtype: str | None = None,
    overwrite: bool = False,
) -> StatsKey:
    """Cache a second moment from a ROME/MEMIT/EasyEdit `.npz` file as this model's `layer`
    (an entry already cached under the same key is replaced only with `overwrite`).

    Those files hold a running-statistics state: `mom2.mom2` is the sum Σ k kᵀ over all
    tokens and `mom2.count` the number of tokens, so E[k kᵀ] = mom2 / count. The file does
    not say how it was made: `corpus`, `n_samples` and `max_length` name the collection it
    stands for, so that `second_moments` with those arguments finds it. `dtype` defaults
    to the file's ('float32' or 'float64').
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: {str(path)!r} does not exist")
    lm.check_layer(layer, "layer")
    with np.load(path, allow_pickle=False) as data:
        if not {"mom2.mom2", "mom2.count"} <= set(data.files):
            raise ValueError(
                f"path: {str(path)!r} is not a second-moment file; expected arrays 'mom2.mom2' "
                f"and 'mom2.count', found {sorted(data.files)}"
            )
        total = torch.from_numpy(data["mom2.mom2"])
        count = int(data["mom2.count"])
    width = _key_width(lm, layer)
    if tuple(total.shape) != (width, width):
        raise ValueError(
            f"path: 'mom2.mom2' in {str(path)!r} has shape {tuple(total.shape)}; layer {layer} "
            f"of {lm.name} has keys of width {width}, so ({width}, {width}) was expected"
        )
    if count < 1:
        raise ValueError(f"path: 'mom2.count' in {str(path)!r} is {count}, expected >= 1")
    if not torch.isfinite(total).all():
        raise ValueError(f"path: 'mom2.mom2' in {str(path)!r} holds NaN or infinite values")
    dtype = dtype or ("float64" if total.dtype == torch.float64 else "float32")
    _check_key_args(n_samples, max_length, dtype)
    key = _stats_key(lm, layer, open_corpus(corpus, n_samples), max_length, dtype)
    if key.path().exists() and not overwrite:
        raise ValueError(
            f"overwrite: statistics for {key.module} of {lm.name} with these settings are already "
            f"cached ({key.path()}); pass overwrite (--overwrite) to replace them"
        )
    moment = (total.double() / count).to(DTYPES[dtype])
    _save_entry(key, moment, {"tokens": count, "model": lm.name, "source": str(path.resolve())})
    return key
