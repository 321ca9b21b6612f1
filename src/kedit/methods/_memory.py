"""How many tokens one pass with gradients may hold, and batches cut to that budget.

The value optimisation of the locate-then-edit methods and FT's training run the blocks from
the edited layer up to the logits with gradients; what they keep for the backward pass grows
with the tokens in a batch. Unless the user sets a budget (`v_batch_tokens`, FT's
`batch_tokens`), it is what fits: half the free memory of the GPUs that run those blocks
(CPU_BUDGET_BYTES on the CPU), divided by an estimate of the bytes kept per token,

    per block:  (8 · hidden + 4 · intermediate) values in the model's dtype (the attention's
                input, queries, keys, values and output; the MLP's input, output and its
                intermediate activations around the nonlinearity and the gate)
    logits:     vocabulary × (dtype bytes + 12) (the logits, their float32 copy, the
                log-softmax and its gradient)

and at most MAX_BATCH_TOKENS (enough to fill a GPU; the bundled models always get it). A
7B LLaMA in bfloat16 edited at layer 8 keeps about 4 MB per token, so 4096 tokens need about
16 GB: they fit an 80 GB GPU, not a 24 GB one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch

from kedit.lm import LM

MAX_BATCH_TOKENS = 4096
MIN_BATCH_TOKENS = 64
CPU_BUDGET_BYTES = 4 * 2**30
GPU_FREE_SHARE = 0.5

T = TypeVar("T")


def bytes_per_token(lm: LM, first_layer: int) -> int:
    """Estimated bytes a pass with gradients keeps per token from block `first_layer` up
    (see the module's docstring); kept on `lm.cache`, as it depends on shapes only."""
    key = ("bytes_per_token", first_layer)
    if key not in lm.cache:
        lm.cache[key] = _bytes_per_token(lm, first_layer)
    return lm.cache[key]


def _bytes_per_token(lm: LM, first_layer: int) -> int:
    layout = lm.layout
    projection = lm.model.get_submodule(layout.mlp_out_name(first_layer)).weight
    intermediate, hidden = layout.in_out(projection)
    vocabulary = lm.model.get_submodule(layout.unembed).weight.shape[0]
    size = projection.element_size()
    blocks = lm.n_layers - first_layer
    return blocks * (8 * hidden + 4 * intermediate) * size + vocabulary * (size + 12)


def backward_tokens(lm: LM, first_layer: int) -> int:
    """The token budget of one pass with gradients from block `first_layer` to the logits."""
    key = ("backward_devices", first_layer, lm.device)
    if key not in lm.cache:
        layout = lm.layout
        modules = [layout.block(i) for i in range(first_layer, lm.n_layers)] + [layout.unembed]
        lm.cache[key] = {lm.device_of(module) for module in modules}
    devices = lm.cache[key]
    budgets = [
        GPU_FREE_SHARE * torch.cuda.mem_get_info(device)[0]
        if device.type == "cuda"
        else CPU_BUDGET_BYTES
        for device in devices
    ]
    tokens = int(min(budgets) // bytes_per_token(lm, first_layer))
    return max(MIN_BATCH_TOKENS, min(MAX_BATCH_TOKENS, tokens))


def token_chunks(items: Sequence[T], tokens: Sequence[int], budget: int) -> Iterator[list[T]]:
    """Consecutive chunks of `items` whose `tokens` add up to at most `budget` (a single item
    over the budget makes a chunk of its own)."""
    chunk: list[T] = []
    total = 0
    for item, count in zip(items, tokens, strict=True):
        if chunk and total + count > budget:
            yield chunk
            chunk, total = [], 0
        chunk.append(item)
        total += count
    if chunk:
        yield chunk
