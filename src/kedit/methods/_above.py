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
    each call (inside `ready()`, which leaves the blocks below `first` out of the model).

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
        self.runs_blocks = first < lm.n_layers  # read now: inside `ready()` blocks are left out
        self.base = lm.model.base_model
        self.cache_argument = cache_argument(self.base)
        self._hidden: torch.Tensor | None = None
        blocks = lm.model.get_submodule(lm.layout.blocks)
        self._blocks = list(blocks)[first:]
        self._norm = lm.model.get_submodule(lm.layout.final_norm)
        # (ids, mask, positions) -> each block's recorded (args, kwargs) but the hidden states
        self._recorded: list[tuple[tuple, list[tuple[tuple, dict]]]] = []

    @contextmanager
    def ready(self) -> Iterator[None]:
        if not self.runs_blocks:
            yield
            return
        lm = self.lm
        with start_at_block(lm.model, lm.layout.blocks, self.first, lambda: self._hidden):
            yield

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
        self._hidden = hidden
        inputs = (ids, mask, positions)
        for seen, arguments in self._recorded:
            if all(a is b for a, b in zip(seen, inputs, strict=True)):
                return self._replay(hidden, arguments, cache)
        key = ("above_replay", self.first, cache is not None)
        if self.lm.cache.get(key) is False:
            return self._run_base(ids, mask, positions, cache)
        if key not in self.lm.cache and cache is not None:
            spare = copy.deepcopy(cache)  # the replay check needs the cache as it was
        with self._recording(cache) as arguments:
            out = self._run_base(ids, mask, positions, cache)
        if key not in self.lm.cache:
            with torch.no_grad():
                again = self._replay(hidden, arguments, spare if cache is not None else None)
            self.lm.cache[key] = bool(torch.allclose(again, out, rtol=1e-5, atol=1e-6))
            if not self.lm.cache[key]:
                return out
        self._recorded.append((inputs, arguments))
        return out

    def _final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._norm(hidden.to(self.lm.device_of(self.lm.layout.final_norm)))

    def _run_base(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None, cache: Any
    ) -> torch.Tensor:
        extra = {} if cache is None else {self.cache_argument: cache}
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

        def stand_in(value: Any) -> Any:
            return _Cache if cache is not None and value is cache else value

        def record(_: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            rest = {key: stand_in(value) for key, value in kwargs.items()}
            rest.pop("hidden_states", None)
            arguments.append((tuple(stand_in(value) for value in args[1:]), rest))

        handles = [
            block.register_forward_pre_hook(record, with_kwargs=True) for block in self._blocks
        ]
        try:
            yield arguments
        finally:
            for handle in handles:
                handle.remove()

    def _replay(
        self, hidden: torch.Tensor, arguments: list[tuple[tuple, dict]], cache: Any
    ) -> torch.Tensor:
        """The blocks and the final norm called with recorded arguments (the hook of
        `ready()` feeds block `first` the caller's hidden states)."""

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


def read_logits(
    lm: LM, normed: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Logits (float32) at the positions `(rows, cols)` of final-norm outputs `normed`."""
    head = lm.model.get_submodule(lm.layout.unembed)
    picked = normed[rows.to(normed.device), cols.to(normed.device)]
    return head(picked.to(head.weight.device)).float()
