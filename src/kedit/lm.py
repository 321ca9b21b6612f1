"""`LM`: a transformers causal LM, its tokenizer and its `Layout`, plus tokenisation helpers."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextvars import ContextVar
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
_CHOSEN_THREADS: ContextVar[int | None] = ContextVar("kedit_threads", default=None)
HUB_PROBE_TIMEOUT_S = 3.0
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
ENCODED_TEXTS = 2**16  # texts whose token ids an LM keeps


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
    # text -> its token ids, for the tokenizer and vocabulary size in `_encoded_by` (adding
    # tokens changes what a text encodes to); an edit encodes each prompt several times.
    _encoded: dict = field(default_factory=dict, init=False, repr=False)
    _encoded_by: tuple = field(default=(None, 0), init=False, repr=False)

    def __post_init__(self) -> None:
        self.layout = layout_for(self.model)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model.eval()

    @property
    def context_length(self) -> int | None:
        """How many positions the model reads (None where its config does not say)."""
        config = self.model.config
        return getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )

    def new_token_budget(self, prompt_length: int, wanted: int) -> int:
        """How many tokens may follow a prompt of `prompt_length`: `wanted`, cut where the
        model's context ends (0 or less: none)."""
        context = self.context_length
        return wanted if context is None else min(wanted, context - prompt_length)

    @property
    def device(self) -> torch.device:
        """Where the model takes its inputs: its first parameter's device (the embeddings' on a
        model split over devices by `device_map`)."""
        return next(self.model.parameters()).device

    def device_of(self, module: str) -> torch.device:
        """Where the named module's parameters live: on a model split over devices, a layer's
        keys, statistics and updates belong there."""
        return next(self.model.get_submodule(module).parameters()).device

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
        return self.encode_many([text])[0]

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text; those not encoded before in one call of the tokenizer."""
        by, size = self._encoded_by
        if by is not self.tokenizer or size != len(self.tokenizer):
            self._encoded.clear()
            self._encoded_by = (self.tokenizer, len(self.tokenizer))
        missing = list(dict.fromkeys(text for text in texts if text not in self._encoded))
        if missing:
            if len(self._encoded) + len(missing) > ENCODED_TEXTS:
                self._encoded.clear()
            encoded = self.tokenizer(missing, add_special_tokens=False)["input_ids"]
            self._encoded.update(zip(missing, map(tuple, encoded), strict=True))
        return [list(self._encoded[text]) for text in texts]

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a text that starts a sequence, with the tokenizer's start tokens."""
        return self.start_ids + self.encode(text)

    def pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad token id lists into `(input_ids, attention_mask)` on the model's device."""
        width = max(len(s) for s in sequences)
        pad_id = self.tokenizer.pad_token_id
        device = self.device
        ids = [list(s) + [pad_id] * (width - len(s)) for s in sequences]
        mask = [[1] * len(s) + [0] * (width - len(s)) for s in sequences]
        return (
            torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(mask, dtype=torch.long, device=device),
        )


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


@contextlib.contextmanager
def using_threads(count: int) -> Iterator[None]:
    """Torch CPU threads `count` from now on, and for every model loaded inside the block
    whatever $KEDIT_THREADS and its size say (`kedit --threads`: for the whole command). Like
    torch's own setting, the thread count stays after the block; only loads after it choose
    again."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"threads: expected a positive integer, got {count!r}")
    token = _CHOSEN_THREADS.set(count)
    torch.set_num_threads(count)
    try:
        yield
    finally:
        _CHOSEN_THREADS.reset(token)


def configure_threads(model: nn.Module) -> int:
    """Set torch's CPU thread count for `model` and return it: the count of an enclosing
    `using_threads` block, else $KEDIT_THREADS where set, else one thread for a model under
    SINGLE_THREAD_MAX_PARAMS parameters on the CPU (torch's default otherwise). The setting is
    process-wide, as torch's is."""
    chosen = _CHOSEN_THREADS.get()
    given = os.environ.get(THREADS_VARIABLE)
    if chosen is not None:
        torch.set_num_threads(chosen)
    elif given is not None:
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
def no_progress_bar() -> Iterator[None]:
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
    device_map: str | dict[str, str | int | torch.device] | None = None,
) -> LM:
    """Load a bundled model (`kedit zoo list`), a local Hugging Face folder or a hub id.

    `dtype` is the weights' dtype (float32 by default; 'bfloat16' or 'float16' halve a big
    model's memory: methods still solve and optimise in float32/float64 and write back in this
    dtype). `device` puts the whole model on one device. `device_map` splits it over devices
    with accelerate (`pip install accelerate`): 'auto', 'balanced', 'balanced_low_0' or
    'sequential' let transformers spread it over the GPUs; a {module: device} dict places each
    module as `split_over_devices` does, the CPU included. Every weight must stay resident on a
    device, since edits change weights in place: a map that offloads weights is refused.
    Small models on the CPU run single-threaded afterwards unless `using_threads` or
    $KEDIT_THREADS says otherwise (`configure_threads`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kedit import zoo

    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"model: expected a model name, folder or hub id, got {name_or_path!r}")
    torch_dtype = _check_dtype(dtype)
    if device is not None and device_map is not None:
        raise ValueError(
            f"device_map: give either device ({device!r}) or device_map ({device_map!r}), not both"
        )
    target = None if device is None else check_device(device)
    if device_map is not None:
        _check_device_map(device_map)
    placement = {"device_map": device_map} if isinstance(device_map, str) else {}
    source = resolve_model_path(name_or_path)
    # A hub id with the hub out of reach is looked up in the local cache only.
    local_only = not Path(source).is_dir() and not hub_reachable()
    try:
        # A bundled model loads in a blink: its "Loading weights" bar would only be noise.
        bundled = Path(source).parent == zoo.MODELS_DIR
        with no_progress_bar() if bundled else contextlib.nullcontext():
            # With peft installed, transformers looks for an adapter config on the hub unless
            # its own kwargs say local only, whatever `local_files_only` says.
            model = AutoModelForCausalLM.from_pretrained(
                source,
                dtype=torch_dtype,
                local_files_only=local_only,
                adapter_kwargs={"local_files_only": local_only},
                **placement,
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
    if isinstance(device_map, dict):
        split_over_devices(model, device_map)
    _check_resident(model, device_map)
    configure_threads(model)
    lm = LM(model=model, tokenizer=tokenizer, name=name_or_path, recipe=_zoo_recipe(source))
    _ = lm.fingerprint
    return lm


def _check_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """`dtype` as a torch floating dtype (float32 when None); a ValueError naming the choices."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")


def _check_device_map(device_map: str | dict[str, str | int | torch.device]) -> None:
    """`device_map` checked: a strategy name or a {module: device} dict of devices this machine
    has; accelerate must be installed."""
    import importlib.util

    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise ValueError(
                f"device_map: expected one of {', '.join(DEVICE_MAP_STRATEGIES)} or a "
                f"{{module: device}} dict, got {device_map!r}"
            )
    elif isinstance(device_map, dict) and device_map:
        for module, place in device_map.items():
            if not isinstance(module, str):
                raise ValueError(f"device_map: module names must be strings, got {module!r}")
            if isinstance(place, str) and place == "disk":
                raise ValueError(
                    f"device_map: {module!r} is mapped to 'disk'; kedit edits weights in place, "
                    "so every weight must live on a device (cpu or a GPU)"
                )
            try:
                check_device(f"cuda:{place}" if isinstance(place, int) else place)
            except ValueError as error:
                raise ValueError(
                    f"device_map: module {module!r} mapped to {place!r}: "
                    f"{str(error).removeprefix('device: ')}"
                ) from error
    else:
        raise ValueError(
            f"device_map: expected one of {', '.join(DEVICE_MAP_STRATEGIES)} or a non-empty "
            f"{{module: device}} dict, got {device_map!r}"
        )
    if importlib.util.find_spec("accelerate") is None:
        raise ImportError(
            "device_map: splitting a model over devices needs accelerate; "
            "run `pip install accelerate` (or `pip install 'kedit[big]'`)"
        )


def split_over_devices(
    model: nn.Module, device_map: dict[str, str | int | torch.device]
) -> nn.Module:
    """Put each module named in `device_map` on its device and add accelerate's hooks, which
    move activations from device to device (a forward pass returns on its inputs' device).

    Modules mapped to 'cpu' run on the CPU with their weights there, also next to GPUs (loading
    with transformers' device_map would offload them, out of an edit's reach). Returns `model`.
    """
    if not isinstance(device_map, dict):
        raise ValueError(f"device_map: expected a {{module: device}} dict, got {device_map!r}")
    _check_device_map(device_map)
    from accelerate import dispatch_model

    # accelerate warns of weights "offloaded to the cpu" whenever the map names the CPU; with
    # the CPU as main device nothing is offloaded (`_check_resident` checks it).
    accelerate_log = logging.getLogger("accelerate.big_modeling")
    level = accelerate_log.level
    accelerate_log.setLevel(logging.ERROR)
    # The KV cache stays where each layer keeps it (transformers names it in the skip keys).
    skip_keys = getattr(model, "_skip_keys_device_placement", None)
    try:
        dispatch_model(model, device_map, main_device="cpu", skip_keys=skip_keys, force_hooks=True)
    except ValueError as error:
        raise ValueError(f"device_map: {error}") from error
    finally:
        accelerate_log.setLevel(level)
    _check_resident(model, device_map)
    return model


def _check_resident(model: nn.Module, device_map: object) -> None:
    """Refuse a model whose weights accelerate offloaded (left on the meta device and loaded
    per forward pass): an edit could not change them."""
    offloaded = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise ValueError(
            f"device_map: {device_map!r} offloads {len(offloaded)} weights (e.g. "
            f"{offloaded[0]!r}) to the CPU or disk, which kedit cannot edit in place; give the "
            "GPUs more room (a device_map over GPUs only, or transformers' max_memory) or load "
            "on one device"
        )


@torch.no_grad()
def top_next_tokens(lm: LM, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    """The `k` most likely next tokens after `prompt`, with their probabilities."""
    ids = torch.tensor([lm.encode_prompt(prompt)], device=lm.device)
    probs = torch.softmax(lm.model(input_ids=ids, use_cache=False).logits[0, -1].float(), dim=-1)
    values, indices = probs.topk(k)
    return [(lm.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, indices, strict=True)]
