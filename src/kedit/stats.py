"""Second-moment statistics E[k kᵀ] of the keys entering MLP output projections.

One pass over a corpus collects every requested layer and stops after the deepest one.
Documents are tokenised, capped at `max_length` tokens and sorted by length, so that
token-budgeted batches carry little padding; padding is left out of the sums. Results are
cached on disk keyed by model fingerprint, module, corpus, sample count, length cap and dtype,
with that metadata in a JSON file beside the numbers. Unless told, a bundled model's statistics
come from tinyworld and every other model's from Wikitext-103 (`default_corpus`), never
silently from the synthetic corpus. `recording_use` tells which statistics an edit used.

A long collection persists its partial sums every few batches beside the cache entry, and a
later call with the same key resumes there. Progress is counted in documents of the sorted
order, so a resumed run may use another batch budget or number of ranks. Under
torch.distributed (e.g. `torchrun --nproc_per_node N kedit stats collect ...`) every rank
takes a share of each batch, the sums are all-reduced, and only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

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

DEFAULT_CORPUS = "tinyworld"  # the bundled models'
REAL_TEXT_CORPUS = "Salesforce/wikitext:wikitext-103-raw-v1"  # every other model's
CORPUS_INSTALL = "pip install 'kedit[corpus]' (or pip install datasets)"
HUB_CHECK_SECONDS = 3.0
DEFAULT_MAX_LENGTH = 256
DEFAULT_BATCH_TOKENS = 8192
DEFAULT_CHECKPOINT_EVERY = 200
DTYPES = {"float64": torch.float64, "float32": torch.float32}
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
T = TypeVar("T")


def _cache_root() -> Path:
    return Path(os.environ.get("KEDIT_CACHE") or Path.home() / ".cache" / "kedit")


def cache_dir() -> Path:
    """Where statistics are cached: $KEDIT_CACHE/stats, by default ~/.cache/kedit/stats."""
    return _cache_root() / "stats"


# ---------------------------------------------------------------------------------------------
# Corpora


class CorpusUnavailable(ValueError):
    """A corpus that cannot be read here (offline, or a package missing); says how to go on."""


@dataclass(frozen=True)
class Corpus:
    """The documents statistics are collected on, named by `id` in cache keys.

    `n_samples` is the number of documents it gives (None: all). For a `datasets` dataset
    (on the hub or saved on disk) that is the count asked for, and the id names the dataset,
    so that a cached result is found without reading the dataset.
    """

    id: str
    n_samples: int | None
    load: Callable[[], list[str]] = field(repr=False, compare=False)


def default_corpus(lm: LM) -> str:
    """The corpus of a model's statistics unless one is given: tinyworld for the bundled models
    (and models trained from their recipes), which learnt from it; Wikitext-103 for every other
    model, as ROME, MEMIT and EasyEdit whiten with Wikipedia text."""
    return DEFAULT_CORPUS if lm.recipe else REAL_TEXT_CORPUS


def open_corpus(corpus: str | Path | Corpus | None = None, n_samples: int | None = None) -> Corpus:
    """The first `n_samples` documents of `corpus`, which is one of:

    - 'tinyworld' (the bundled corpus; also None);
    - a .txt file (one document per non-empty line), a .jsonl file (a "text" field per line) or
      a .parquet file (a "text" column), or a folder of such files (all, in path order);
    - a folder written by `datasets`' `save_to_disk` (its "train" split's "text" column);
    - a Hugging Face hub dataset `NAME` or `NAME:CONFIG` (its train split's "text" column),
      downloaded once into kedit's cache (`corpora_dir()`); offline and not there, reading it
      raises `CorpusUnavailable` at once, without the hub client's retries.

    Parquet files and datasets need the optional `datasets` package (`pip install
    'kedit[corpus]'`). A corpus already opened is returned as it is.
    """
    if isinstance(corpus, Corpus):
        return corpus
    if corpus is None or str(corpus) == DEFAULT_CORPUS:
        text = resources.files("kedit").joinpath("zoo/data/tinyworld_corpus.txt").read_text()
        return _documents_corpus(DEFAULT_CORPUS, _text_documents(text), n_samples)
    path = Path(corpus).expanduser()
    if path.is_dir():
        if _saved_dataset_state(path) is not None:
            return _saved_dataset_corpus(path, n_samples)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise ValueError(
                f"corpus: folder {str(corpus)!r} holds no {'/'.join(LOCAL_SUFFIXES)} files and is "
                "not a dataset saved with save_to_disk"
            )
        docs = [doc for file in files for doc in _file_documents(file)]
        return _documents_corpus(path.name, docs, n_samples)
    if path.is_file():
        return _documents_corpus(path.name, _file_documents(path), n_samples)
    if path.suffix in LOCAL_SUFFIXES or str(corpus).startswith((".", "/", "~")):
        raise FileNotFoundError(f"corpus: {str(corpus)!r} does not exist")
    spec = str(corpus)
    name = "hf-" + re.sub(r"[^\w.-]+", "-", spec)
    return Corpus(name, n_samples, lambda: _hub_documents(spec, name, n_samples))


def _open_for(lm: LM, corpus: str | Path | Corpus | None, n_samples: int | None) -> Corpus:
    """`open_corpus`, with None meaning the model's `default_corpus`."""
    return open_corpus(default_corpus(lm) if corpus is None else corpus, n_samples)


def read_corpus(corpus: str | Path | None = None) -> tuple[str, list[str]]:
    """`(corpus id, documents)` of a whole corpus; see `open_corpus`."""
    source = open_corpus(corpus)
    return source.id, source.load()


def corpora_dir() -> Path:
    """Where hub datasets are kept once downloaded: $KEDIT_CACHE/corpora."""
    return _cache_root() / "corpora"


def _documents_corpus(name: str, docs: list[str], n_samples: int | None) -> Corpus:
    if not docs:
        raise ValueError(f"corpus {name!r} holds no documents")
    digest = hashlib.sha256("\n".join(docs).encode()).hexdigest()[:12]
    docs = docs[:n_samples]
    return Corpus(f"{name}-{digest}", len(docs), lambda: docs)


def _text_documents(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _file_documents(path: Path) -> list[str]:
    """The documents of one local file, by its suffix (.jsonl, .parquet, else plain text)."""
    if path.suffix == ".parquet":
        return _parquet_documents(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        return _text_documents(text)
    docs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"corpus {path.name} line {number}: expected an object with 'text'")
        docs.append(record["text"])
    return docs


def _parquet_documents(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise CorpusUnavailable(
            f"corpus: reading {path.name} needs pyarrow, which the optional `datasets` package "
            f"brings: {CORPUS_INSTALL}"
        ) from None
    columns = parquet.read_schema(path).names
    if "text" not in columns:
        raise ValueError(f"corpus {path.name}: expected a 'text' column, found {columns}")
    texts = parquet.read_table(path, columns=["text"]).column("text").to_pylist()
    return [text for text in texts if isinstance(text, str) and text.strip()]


def _import_datasets(what: str) -> ModuleType:
    try:
        import datasets
    except ImportError:
        raise CorpusUnavailable(
            f"corpus: reading {what} needs the optional `datasets` package: {CORPUS_INSTALL}"
        ) from None
    return datasets


def _saved_dataset_state(path: Path) -> Path | None:
    """The file that identifies a folder written by `save_to_disk`: a Dataset's `state.json`, a
    DatasetDict's "train" split's (or its `dataset_dict.json` where it has no such split); None
    for any other folder."""
    if (path / "state.json").is_file():
        return path / "state.json"
    if (path / "dataset_dict.json").is_file():
        train = path / "train" / "state.json"
        return train if train.is_file() else path / "dataset_dict.json"
    return None


def _saved_dataset_corpus(path: Path, n_samples: int | None) -> Corpus:
    """A dataset saved with `save_to_disk`, named by its folder and a digest of its state (which
    records its fingerprint and files), so its statistics are found without reading it."""
    state = _saved_dataset_state(path)
    digest = hashlib.sha256(state.read_bytes()).hexdigest()[:12]
    return Corpus(
        f"{path.name}-{digest}",
        n_samples,
        lambda: _dataset_documents(_load_saved(path), path.name, n_samples),
    )


def _load_saved(path: Path) -> Any:
    datasets = _import_datasets(f"the saved dataset {str(path)!r}")
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(
                f"corpus {str(path)!r}: expected a 'train' split, found {list(loaded)}"
            )
        loaded = loaded["train"]
    return loaded


def _dataset_documents(dataset: Any, where: str, n_samples: int | None) -> list[str]:
    """The first `n_samples` non-empty texts of a `datasets.Dataset`'s "text" column."""
    if "text" not in dataset.column_names:
        raise ValueError(f"corpus {where}: expected a 'text' column, found {dataset.column_names}")
    docs: list[str] = []
    for batch in dataset.select_columns(["text"]).iter(batch_size=4096):
        docs.extend(text for text in batch["text"] if isinstance(text, str) and text.strip())
        if n_samples is not None and len(docs) >= n_samples:
            break
    if not docs:
        raise ValueError(f"corpus {where} holds no documents")
    return docs[:n_samples]


def _hub_documents(spec: str, name: str, n_samples: int | None) -> list[str]:
    """A hub dataset's documents, from kedit's copy, downloaded first where there is none."""
    datasets = _import_datasets(f"the Hugging Face dataset {spec!r}")
    saved = corpora_dir() / name
    if not saved.is_dir():
        if not _hub_reachable():
            raise CorpusUnavailable(
                f"corpus: the Hugging Face dataset {spec!r} is not in kedit's cache and the hub "
                "cannot be reached; give a local corpus with mom2_corpus=PATH or `kedit stats "
                "collect --corpus PATH` (a .txt/.jsonl/.parquet file, a folder of them, or a "
                "dataset saved with save_to_disk), or import statistics with `kedit stats "
                "import FILE.npz --layer N`"
            )
        _download(datasets, spec, saved)
    return _dataset_documents(datasets.load_from_disk(str(saved)), spec, n_samples)


def _hub_reachable() -> bool:
    """Whether the hub answers within a few seconds; False at once in offline mode. An offline
    machine thus gets its answer at once instead of after the hub client's retries."""
    from huggingface_hub import constants, get_session

    flags = (os.environ.get(name, "").upper() for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if constants.is_offline_mode() or any(flag in {"1", "ON", "YES", "TRUE"} for flag in flags):
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_CHECK_SECONDS)
    except Exception:  # whatever stops the request (DNS, refused, timeout, proxy): not reachable
        return False
    return True


def _download(datasets: ModuleType, spec: str, target: Path) -> None:
    """Download a hub dataset's train split and keep it under `target` (`save_to_disk`)."""
    dataset_name, _, config = spec.partition(":")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as scratch:
        try:
            dataset = datasets.load_dataset(
                dataset_name, config or None, split="train", cache_dir=scratch
            )
        except Exception as exc:  # the hub or the dataset's files can fail in many ways
            raise ValueError(
                f"corpus: could not read the Hugging Face dataset {spec!r} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from exc
        staged = Path(scratch) / "saved"
        dataset.save_to_disk(str(staged))
        try:
            os.replace(staged, target)
        except OSError:
            if not target.is_dir():  # else another process saved it first
                raise


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
    context = lm.context_length or max_length
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


def _layer_device(lm: LM, layer: int) -> torch.device:
    """Where a layer's keys and statistics live (its MLP output projection's device)."""
    return lm.device_of(lm.layout.mlp_out_name(layer))


def _key_width(lm: LM, layer: int) -> int:
    """Width of a layer's keys: the input width of its MLP output projection."""
    weight = lm.model.get_submodule(lm.layout.mlp_out_name(layer)).weight
    return lm.layout.in_out(weight)[0]


# ---------------------------------------------------------------------------------------------
# Collection


def second_moments(
    lm: LM,
    layers: list[int],
    corpus: str | Path | Corpus | None = None,
    n_samples: int = 100_000,
    max_length: int = DEFAULT_MAX_LENGTH,
    dtype: str = "float64",
    batch_tokens: int | None = None,
    progress: bool = True,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[int, torch.Tensor]:
    """E[k kᵀ] of the inputs of each layer's MLP output projection, from cache or computed.

    Sums accumulate in `dtype` over the first `n_samples` documents of `corpus` (see
    `open_corpus`; None: `default_corpus(lm)`), each capped at `max_length` tokens (and at the
    model's context); each batch's own Σ k kᵀ is computed in float32. A batch holds about
    `batch_tokens` tokens per rank (None: `fitting_batch_tokens`). Every `checkpoint_every`
    batches (0: never) the partial sums are saved; an interrupted call resumes there when
    called again. `on_batch(documents_done, documents_total)` runs after each batch.
    """
    if not isinstance(layers, list | tuple) or not layers:
        raise ValueError(f"layers: expected a non-empty list of layer indices, got {layers!r}")
    layers = sorted({lm.check_layer(layer) for layer in layers})
    _check_key_args(n_samples, max_length, dtype)
    if batch_tokens is not None:
        _check_int("batch_tokens", batch_tokens, 1)
    _check_int("checkpoint_every", checkpoint_every, 0)
    source = _open_for(lm, corpus, n_samples)
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
    return {layer: result[layer].to(_layer_device(lm, layer)) for layer in layers}


def second_moment(lm: LM, layer: int, **kwargs: object) -> torch.Tensor:
    """E[k kᵀ] for one layer; see `second_moments`."""
    return second_moments(lm, [layer], **kwargs)[layer]


def fitting_batch_tokens(lm: LM, layers: list[int], max_length: int) -> int:
    """Tokens per statistics batch and rank that fit the model's devices.

    On a CPU, DEFAULT_BATCH_TOKENS (8192: larger batches gain little there). On GPUs, as many as
    half the free memory of the fullest GPU the model uses holds at `token_bytes` per token,
    between one document of `max_length` tokens and 8 x DEFAULT_BATCH_TOKENS. E.g. a 7B LLaMA in
    float16 on an 80 GB GPU gets the upper cap; on a 24 GB GPU, with its 14 GB of weights and
    the sums of five layers (4.8 GB), about 7,000.
    """
    devices = {p.device for p in lm.model.parameters() if p.device.type == "cuda"}
    if not devices:
        return DEFAULT_BATCH_TOKENS
    free = min(torch.cuda.mem_get_info(device)[0] for device in devices)
    fitting = int(free // 2 // token_bytes(lm, layers, max_length))
    return max(max_length, min(fitting, 8 * DEFAULT_BATCH_TOKENS))


def token_bytes(lm: LM, layers: list[int], max_length: int) -> int:
    """An upper estimate of the memory one token of a statistics batch takes: in the model's
    dtype its residual and attention states (6 × width), its MLP states (3 × MLP width), its
    attention scores (heads × `max_length`) and its captured keys (MLP width per layer); and
    one layer's keys in float32 at a time for Σ k kᵀ."""
    config = lm.model.config
    width = config.hidden_size
    heads = getattr(config, "num_attention_heads", 1)
    mlp_width = max(_key_width(lm, layer) for layer in layers)
    item = next(lm.model.parameters()).element_size()
    per_token = 6 * width + 3 * mlp_width + heads * max_length + len(layers) * mlp_width
    return item * per_token + 4 * mlp_width


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
    source = _open_for(lm, corpus, n_samples)
    settings = {"n_samples": n_samples, "max_length": max_length, "dtype": dtype}
    moment = second_moment(lm, layer, corpus=source, **settings, **kwargs)
    key = _stats_key(lm, layer, source, max_length, dtype)
    digest = hashlib.sha256(moment.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    path = key.path().with_name(key.path().stem + ".eigh.safetensors")
    if path.exists():
        tensors, meta = _read(path)
        if meta.get("moment_sha256") == digest:
            device = _layer_device(lm, layer)
            return tensors["values"].to(device), tensors["vectors"].to(device)
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
    batch_tokens: int | None,
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
        # On a model split over devices each layer's sums stay where its keys arrive.
        sums[layer] = partial.get(layer, torch.zeros(width, width)).to(
            _layer_device(lm, layer), dtype
        )
    count = torch.tensor(tokens, dtype=torch.int64, device=lm.device)
    lengths = [len(ids) for ids in encoded]
    if batch_tokens is None:  # measured now, with the sums already in memory
        batch_tokens = _from_rank0(fitting_batch_tokens(lm, list(keys), max(lengths, default=1)))
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
                    k = seen[name][real.to(seen[name].device)]
                    k = k.to(torch.promote_types(k.dtype, torch.float32))
                    sums[layer] += (k.T @ k).to(dtype)
                count += real.sum().to(count.device)
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
        # A rank that tears down its connections while a peer is still finishing (rank 0 writes
        # the files after the last reduction) makes gloo abort that peer at exit.
        dist.barrier()
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
    stands for, so that `second_moments` with those arguments finds it (`corpus` None: the
    model's `default_corpus`, which an edit asks for unless told). `dtype` defaults to the
    file's ('float32' or 'float64').
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
    key = _stats_key(lm, layer, _open_for(lm, corpus, n_samples), max_length, dtype)
    if key.path().exists() and not overwrite:
        raise ValueError(
            f"overwrite: statistics for {key.module} of {lm.name} with these settings are already "
            f"cached ({key.path()}); pass overwrite (--overwrite) to replace them"
        )
    moment = (total.double() / count).to(DTYPES[dtype])
    _save_entry(key, moment, {"tokens": count, "model": lm.name, "source": str(path.resolve())})
    return key


# ---------------------------------------------------------------------------------------------
# Which statistics an edit used

_IN_USE: ContextVar[list[dict] | None] = ContextVar("kedit_statistics_in_use", default=None)


@contextmanager
def recording_use() -> Iterator[list[dict]]:
    """The records (`statistics_record`) of the statistics noted inside the block, each once,
    in order of first use: what `kedit.edit` stores in an edit's `info["statistics"]`."""
    records: list[dict] = []
    token = _IN_USE.set(records)
    try:
        yield records
    finally:
        _IN_USE.reset(token)


def note_use(record: dict) -> None:
    """Add a statistic's record to the innermost `recording_use` block, if there is one."""
    records = _IN_USE.get()
    if records is not None and record not in records:
        records.append(record)


def statistics_record(
    lm: LM,
    layer: int,
    corpus: str | Path | Corpus | None = None,
    n_samples: int = 100_000,
    max_length: int = DEFAULT_MAX_LENGTH,
    dtype: str = "float64",
) -> dict:
    """What a layer's statistic under these settings is: layer, module, corpus id, documents,
    tokens, length cap, dtype and cache file (and, for an imported one, the file it came from).
    `tokens` is None where nothing is cached under these settings."""
    source = _open_for(lm, corpus, n_samples)
    key = _stats_key(lm, layer, source, max_length, dtype)
    beside = key.path().with_suffix(".json")
    meta = json.loads(beside.read_text()) if beside.is_file() else {}
    record = {
        "layer": layer,
        "module": key.module,
        "corpus": key.corpus,
        "n_samples": key.n_samples,
        "tokens": meta.get("tokens"),
        "max_length": key.max_length,
        "dtype": key.dtype,
        "path": str(key.path()),
    }
    return {**record, "source": meta["source"]} if "source" in meta else record
