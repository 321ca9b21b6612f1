"""Running a model from an edited layer up, computing only what the edit can change.

The searches behind an edit (the value optimisation of the locate-then-edit methods, FT's
training) change one block's output, or a weight inside it, and read the logits at a few
positions. At every step they run only the blocks above that block (`Above`) on the positions
the change reaches, start from that block's output computed once where the change adds to it
(`adds_to_block_output`), and unembed only the positions a loss reads (`read_logits`).
"""

from __future__ import annotations

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


class Above:
    """Blocks `first`.. and the final norm of `lm`, run on hidden states that a caller hands to
    each call (inside `ready()`, which leaves the blocks below `first` out of the model)."""

    def __init__(self, lm: LM, first: int) -> None:
        self.lm, self.first = lm, first
        self.runs_blocks = first < lm.n_layers  # read now: inside `ready()` blocks are left out
        self.base = lm.model.base_model
        self.cache_argument = cache_argument(self.base)
        self._hidden: torch.Tensor | None = None

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
            norm = self.lm.model.get_submodule(self.lm.layout.final_norm)
            return norm(hidden.to(self.lm.device_of(self.lm.layout.final_norm)))
        self._hidden = hidden
        extra = {} if cache is None else {self.cache_argument: cache}
        out = self.base(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=cache is not None,
            **extra,
        )
        return out.last_hidden_state


def read_logits(
    lm: LM, normed: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Logits (float32) at the positions `(rows, cols)` of final-norm outputs `normed`."""
    head = lm.model.get_submodule(lm.layout.unembed)
    picked = normed[rows.to(normed.device), cols.to(normed.device)]
    return head(picked.to(head.weight.device)).float()
