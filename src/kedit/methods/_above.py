"""Running a model from an edited layer up, computing only what the edit can change.

The searches behind an edit (the value optimisation of the locate-then-edit methods, FT's
training) change one block's output, or a weight inside it, and read the logits at a few
positions. At every step they run only the blocks above that block (`Above`) on the positions
the change reaches, start from that block's output computed once where the change adds to it
(`adds_to_block_output`), and unembed only the positions a loss reads (`read_logits`).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from kedit.hooks import capture, replace_output, start_at_block, stop_after
from kedit.lm import LM

# A delta at a site adds to the block's output when the change there is this close to it,
# relative to its norm; rounding in half precision stays near 1% of a delta as long as the
# block's output, while a norm after the residual sum (a post-norm block) moves it entirely.
ADDITIVE_TOLERANCE = 0.05


def adds_to_block_output(lm: LM, layer: int, site: str) -> bool:
    """Whether adding δ to the output of module `site` (in block `layer`) at a token changes the
    block's output there by δ, as where the module's output joins the residual stream through
    a plain sum (the MLP output projection of a pre-norm block). Measured once per model, site
    and layer on a short text, and kept on `lm.cache`."""
    block = lm.layout.block(layer)
    if site == block:
        return True
    key = ("adds_to_block_output", layer, site)
    if key not in lm.cache:
        model = lm.model
        ids = torch.tensor([lm.encode_prompt("The sum of a block's parts")], device=lm.device)
        with torch.no_grad():
            with capture(model, [block]) as plain, stop_after(model, block):
                model(input_ids=ids, use_cache=False)
            out = plain[block][0, -1]
            generator = torch.Generator().manual_seed(0)
            delta = torch.randn(out.shape, generator=generator).to(out.device, out.dtype)
            delta = delta * (out.float().norm() / delta.float().norm()).to(out.dtype)

            def add(output: torch.Tensor) -> torch.Tensor:
                output = output.clone()
                output[0, -1] += delta
                return output

            with capture(model, [block]) as moved, replace_output(model, site, add):
                with stop_after(model, block):
                    model(input_ids=ids, use_cache=False)
        change = moved[block][0, -1].float() - out.float()
        miss = (change - delta.float()).norm() / delta.float().norm()
        lm.cache[key] = bool(miss <= ADDITIVE_TOLERANCE)
    return lm.cache[key]


def cache_argument(model: Any) -> str:
    """The name under which this transformers version takes a KV cache (`cache` from 5.2x,
    `past_key_values` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _Cache:
    """Stands for the KV cache in recorded block arguments: each replay passes its own."""


class Above:
    """Blocks `first`.. and the final norm of `lm`, run on hidden states that a caller hands to
    each call (where the base runs, the blocks below `first` are left out of it meanwhile).

    The first call for a set of inputs (the same `ids`, `mask` and `positions` tensor objects,
    which callers do not change in place) runs the model's base and records what it hands each
    block besides the hidden states (the attention mask, position embeddings, cache positions);
    later calls with those inputs call the blocks and the final norm directly with the recorded
    arguments, which skips the base's per-call work (embeddings whose output is discarded, mask
    building: 0.2-0.4 ms a call on tiny-gpt2 at one thread, 3-7% of an edit). Once per model,
    layer and cache use the replay is checked against the base on the same inputs, and a model
    whose base does more between or after its blocks keeps the base.
    """

    def __init__(self, lm: LM, first: int) -> None:
        self.lm, self.first = lm, first
        self.runs_blocks = first < lm.n_layers
        self.base = lm.model.base_model
        if "cache_argument" not in lm.cache:
            lm.cache["cache_argument"] = cache_argument(self.base)
        self.cache_argument = lm.cache["cache_argument"]
        blocks = lm.model.get_submodule(lm.layout.blocks)
        self._blocks = list(blocks)[first:]
        self._norm = lm.model.get_submodule(lm.layout.final_norm)
        self._norm_device = lm.device_of(lm.layout.final_norm)
        # (ids, mask, positions) -> each block's recorded (args, kwargs) but the hidden states
        self._recorded: list[tuple[tuple, list[tuple[tuple, dict]]]] = []

    @contextmanager
    def primed(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Around a pass of the whole model over `ids` (without a KV cache) that the caller runs
        anyway: record what it hands block 0, so that the first call on the same inputs replays
        the blocks instead of running the base. Only where replays are known to match the base
        on this model and every block gets the same arguments (`uniform_block_arguments`)."""
        key = ("above_replay", self.first, False)
        if not self.runs_blocks or self.lm.cache.get(key) is not True:
            yield
            return
        if not uniform_block_arguments(self.lm):
            yield
            return
        seen: list[tuple[tuple, dict]] = []
        with _recording_blocks([self.lm.model.get_submodule(self.lm.layout.block(0))], seen):
            yield
        if seen:
            self._recorded.append(((ids, mask, positions), seen[:1] * len(self._blocks)))

    def __call__(
        self,
        hidden: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: Any = None,
    ) -> torch.Tensor:
        """The final norm's output for rows whose input of block `first` is `hidden` (token ids
        `ids` of the same shape; `mask` covers the cached positions, then these), after the
        cached keys and values `cache` if given."""
        if not self.runs_blocks:
            return self._final_norm(hidden)
        inputs = (ids, mask, positions)
        for seen, arguments in self._recorded:
            if all(a is b for a, b in zip(seen, inputs, strict=True)):
                return self._replay(hidden, arguments, cache)
        key = ("above_replay", self.first, cache is not None)
        if self.lm.cache.get(key) is False:
            return self._run_base(hidden, ids, mask, positions, cache)
        if key not in self.lm.cache and cache is not None:
            spare = copy.deepcopy(cache)  # the replay check needs the cache as it was
        with self._recording(cache) as arguments:
            out = self._run_base(hidden, ids, mask, positions, cache)
        if key not in self.lm.cache:
            with torch.no_grad():
                again = self._replay(hidden, arguments, spare if cache is not None else None)
            self.lm.cache[key] = bool(torch.allclose(again, out, rtol=1e-5, atol=1e-6))
            if not self.lm.cache[key]:
                return out
        self._recorded.append((inputs, arguments))
        return out

    def _final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._norm(hidden.to(self._norm_device))

    def _run_base(
        self,
        hidden: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor | None,
        cache: Any,
    ) -> torch.Tensor:
        """The base without its blocks below `first`, `hidden` fed to block `first`."""
        extra = {} if cache is None else {self.cache_argument: cache}
        with start_at_block(self.lm.model, self.lm.layout.blocks, self.first, hidden):
            out = self.base(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=cache is not None,
                **extra,
            )
        return out.last_hidden_state

    @contextmanager
    def _recording(self, cache: Any) -> Iterator[list[tuple[tuple, dict]]]:
        """Record each block's arguments but its hidden states, the cache as a stand-in."""
        arguments: list[tuple[tuple, dict]] = []
        with _recording_blocks(self._blocks, arguments, cache):
            yield arguments

    def _replay(
        self, hidden: torch.Tensor, arguments: list[tuple[tuple, dict]], cache: Any
    ) -> torch.Tensor:
        """The blocks and the final norm called with recorded arguments."""

        def real(value: Any) -> Any:
            return cache if value is _Cache else value

        for block, (args, kwargs) in zip(self._blocks, arguments, strict=True):
            out = block(
                hidden,
                *(real(value) for value in args),
                **{key: real(value) for key, value in kwargs.items()},
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return self._final_norm(hidden)


@contextmanager
def _recording_blocks(
    blocks: list[torch.nn.Module], arguments: list[tuple[tuple, dict]], cache: Any = None
) -> Iterator[None]:
    """Append to `arguments` what each of `blocks` is called with but its hidden states (the
    KV cache `cache` as a stand-in), in call order."""

    def stand_in(value: Any) -> Any:
        return _Cache if cache is not None and value is cache else value

    def record(_: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        rest = {key: stand_in(value) for key, value in kwargs.items()}
        rest.pop("hidden_states", None)
        arguments.append((tuple(stand_in(value) for value in args[1:]), rest))

    handles = [block.register_forward_pre_hook(record, with_kwargs=True) for block in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def uniform_block_arguments(lm: LM) -> bool:
    """Whether the model's base hands every block the same arguments besides the hidden states
    (the same objects: one mask, one set of position embeddings), as GPT-2's and LLaMA's do; a
    model with layers of several kinds (sliding-window and full attention: `layer_types`) does
    not. Checked once per model on a padded batch of two short texts (so that masks are built,
    not left out), kept on `lm.cache`."""
    key = "uniform_block_arguments"
    if key not in lm.cache:
        model = lm.model
        config = getattr(model, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        kinds = getattr(text_config, "layer_types", None)
        blocks = list(model.get_submodule(lm.layout.blocks))
        ids, mask = lm.pad([lm.encode_prompt("The same for every block"), lm.encode_prompt("A")])
        seen: list[tuple[tuple, dict]] = []
        with torch.no_grad(), _recording_blocks(blocks, seen):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        (args, kwargs), rest = seen[0], seen[1:]
        lm.cache[key] = (
            not (isinstance(kinds, list) and len(set(kinds)) > 1)
            and len(seen) == len(blocks)
            and all(
                len(other_args) == len(args)
                and all(a is b for a, b in zip(other_args, args, strict=True))
                and other_kwargs.keys() == kwargs.keys()
                and all(other_kwargs[name] is kwargs[name] for name in kwargs)
                for other_args, other_kwargs in rest
            )
        )
    return lm.cache[key]


def read_logits(
    lm: LM, normed: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Logits (float32) at the positions `(rows, cols)` of final-norm outputs `normed`."""
    head = lm.model.get_submodule(lm.layout.unembed)
    picked = normed[rows.to(normed.device), cols.to(normed.device)]
    return head(picked.to(head.weight.device)).float()
