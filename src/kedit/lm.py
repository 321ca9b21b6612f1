"""`LM`: a transformers causal LM, its tokenizer and its `Layout`, plus tokenisation helpers."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from kedit.layout import Layout, layout_for

FULL_HASH_LIMIT_BYTES = 512 * 2**20
SAMPLED_BYTES_PER_TENSOR = 2**16
# Below this many parameters a model runs single-threaded on a CPU by default: its matrices are
# too small for threads to pay, and on a loaded 2-core machine torch's default thread count
# made one ROME edit of a bundled model 10-40x slower (15-65 s against 1.3-1.5 s).
SINGLE_THREAD_MAX_PARAMS = 50_000_000
THREADS_VARIABLE = "KEDIT_THREADS"
HUB_PROBE_TIMEOUT_S = 3.0


@dataclass(eq=False)
class LM:
    """A causal LM ready for editing: `.model`, `.tokenizer`, `.layout` and a `.name`.

    `.recipe` names the zoo recipe a model folder was trained with (its `kedit_zoo.json`), so a
    retrained or copied zoo model gets that recipe's hyper-parameters whatever its folder is called.
    `.cache` holds work derived from the unedited model that does not depend on any edit
    (context prefixes, inverse covariances), so it is computed once per model.
    """

    model: nn.Module
    tokenizer: object
    layout: Layout = field(init=False)
    name: str = "model"
    recipe: str | None = None
    cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.layout = layout_for(self.model)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_layers(self) -> int:
        return self.layout.n_layers(self.model)

    @cached_property
    def fingerprint(self) -> str:
        """Hash of the config and the weights as loaded; identifies the model in caches and edits.

        Computed on first use, so call it before editing (`load` does). Models above
        FULL_HASH_LIMIT_BYTES hash a strided sample of each tensor instead of every byte.
        """
        return model_fingerprint(self.model)

    def check_layer(self, layer: int, field_name: str = "layers") -> int:
        """Validate a layer index against the model's depth."""
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(
                f"{field_name}: layer {layer!r} is out of range; {self.name} has layers "
                f"0..{self.n_layers - 1}"
            )
        return layer

    @cached_property
    def start_ids(self) -> list[int]:
        """Special tokens the tokenizer puts before a text (LLaMA's BOS; none for GPT-2)."""
        return self.tokenizer("")["input_ids"]

    def encode(self, text: str) -> list[int]:
        """Token ids of a text that continues a sequence (no special tokens)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a text that starts a sequence, with the tokenizer's start tokens."""
        return self.start_ids + self.encode(text)

    def pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad token id lists into `(input_ids, attention_mask)` on the model's device."""
        width = max(len(s) for s in sequences)
        pad_id = self.tokenizer.pad_token_id
        ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return ids.to(self.device), mask.to(self.device)


def require_lm(value: object) -> LM:
    """`value` if it is a kedit `LM`; else a TypeError that says how to get one."""
    if not isinstance(value, LM):
        raise TypeError(f"lm: expected a kedit.LM (from kedit.load), got {type(value).__name__}")
    return value


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the config (without paths) and the parameters' bytes."""
    digest = hashlib.sha256()
    config = model.config.to_dict() if hasattr(model, "config") else {}
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    state = model.state_dict()
    total = sum(t.numel() * t.element_size() for t in state.values())
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.reshape(-1)
        if total > FULL_HASH_LIMIT_BYTES:
            step = max(1, flat.numel() * flat.element_size() // SAMPLED_BYTES_PER_TENSOR)
            flat = flat[::step]
        digest.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch device this machine has; a clear ValueError otherwise."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device: {device!r} is not a torch device (e.g. cpu, cuda:0)") from error
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (parsed.index or 0) >= count:
            raise ValueError(
                f"device: {device!r} asked for, but torch {torch.__version__} sees {count} CUDA "
                "device(s) here"
            )
    return parsed


def resolve_model_path(name_or_path: str) -> str:
    """A bundled model's folder, a local folder, or the hub id unchanged."""
    from kedit import zoo

    if name_or_path in zoo.list_models():
        return str(zoo.model_path(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_file():
        raise ValueError(
            f"model: {name_or_path!r} is a file; give a model folder (with config.json), a "
            f"hub id or a bundled name ({_bundled_models()})"
        )
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {str(path)!r} has no config.json")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(
            f"model: {name_or_path!r} is a path that does not exist ({_bundled_models()})"
        )
    close = difflib.get_close_matches(name_or_path, zoo.list_models(), n=1, cutoff=0.8)
    if close and "/" not in name_or_path:
        raise ValueError(
            f"model: {name_or_path!r} is not a bundled model; did you mean {close[0]!r}? "
            f"({_bundled_models()})"
        )
    return name_or_path


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `timeout` seconds (False at
    once where HF_HUB_OFFLINE is set), so that an offline look-up fails fast instead of after
    half a minute of retries."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def configure_threads(model: nn.Module) -> int:
    """Set torch's CPU thread count for `model` and return it: $KEDIT_THREADS where set, else one
    thread for a model under SINGLE_THREAD_MAX_PARAMS parameters on the CPU (torch's default
    otherwise). The setting is process-wide, as torch's is."""
    given = os.environ.get(THREADS_VARIABLE)
    if given is not None:
        if not given.isdigit() or int(given) < 1:
            raise ValueError(f"{THREADS_VARIABLE}: expected a positive integer, got {given!r}")
        torch.set_num_threads(int(given))
    elif all(p.device.type == "cpu" for p in model.parameters()):
        if sum(p.numel() for p in model.parameters()) < SINGLE_THREAD_MAX_PARAMS:
            torch.set_num_threads(1)
    return torch.get_num_threads()


def _bundled_models() -> str:
    """The bundled models' names, for error messages."""
    from kedit import zoo

    return f"bundled models: {', '.join(zoo.list_models())}"


def _zoo_recipe(folder: str) -> str | None:
    """The recipe name in a zoo model folder's `kedit_zoo.json`; None elsewhere (or a hub id)."""
    from kedit.zoo import ZOO_META

    meta = Path(folder) / ZOO_META
    return json.loads(meta.read_text()).get("name") if meta.is_file() else None


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """transformers' progress bars off inside the block, as they were afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load(
    name_or_path: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> LM:
    """Load a bundled model (`kedit zoo list`), a local Hugging Face folder or a hub id.

    Small models on the CPU run single-threaded afterwards unless $KEDIT_THREADS says otherwise
    (`configure_threads`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kedit import zoo

    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"model: expected a model name, folder or hub id, got {name_or_path!r}")
    source = resolve_model_path(name_or_path)
    target = None if device is None else check_device(device)
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype: {dtype!r} is not a torch dtype (e.g. 'float32')")
        dtype = getattr(torch, dtype)
    # A hub id with the hub out of reach is looked up in the local cache only.
    local_only = not Path(source).is_dir() and not hub_reachable()
    try:
        # A bundled model loads in a blink: its "Loading weights" bar would only be noise.
        bundled = Path(source).parent == zoo.MODELS_DIR
        with _no_progress_bar() if bundled else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype or torch.float32, local_files_only=local_only
            )
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except OSError as error:
        reason = (
            "it is not in the local Hugging Face cache and the hub cannot be reached from here"
            if local_only
            else f"loading it as a hub id failed: {str(error).splitlines()[0]}"
        )
        raise ValueError(
            f"model: {name_or_path!r} is not a bundled model ({_bundled_models()}) or a local "
            f"folder, and {reason}"
        ) from error
    if target is not None:
        model.to(target)
    configure_threads(model)
    lm = LM(model=model, tokenizer=tokenizer, name=name_or_path, recipe=_zoo_recipe(source))
    _ = lm.fingerprint
    return lm


@torch.no_grad()
def top_next_tokens(lm: LM, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    """The `k` most likely next tokens after `prompt`, with their probabilities."""
    ids = torch.tensor([lm.encode_prompt(prompt)], device=lm.device)
    probs = torch.softmax(lm.model(input_ids=ids, use_cache=False).logits[0, -1].float(), dim=-1)
    values, indices = probs.topk(k)
    return [(lm.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, indices, strict=True)]
