"""MELO: LoRA blocks selected by a key database (Yu et al., 2024; "neuron-indexed dynamic LoRA").

A dynamic LoRA at one module of one layer: blocks of rank `rank` (A_b: in × r, B_b: r × out,
the update x A_b B_b scaled by α / r), one per cluster of edits, and a vector database of keys
(the module's inputs at the positions that predict an edit's target) with a radius, a label
(the edit's target) and a block each. A token whose input lies within the radius of its nearest
key gets that key's block, output + (α / r) x A_b B_b; any other token passes unchanged, so the
model answers as before outside the edits' clusters (the paper's inference-time block search).

The database follows GRACE's rules (`kedit.methods.grace.place_key`) on the key of the edit
prompt's last token: far from every key, the edit opens a cluster with a new block (A_b random,
B_b zero, so that it starts from the unedited model); near a key of the same target, it joins
that key's cluster, whose radius expands to cover it, and trains that block further; near a key
of another target, the two split the distance. The edit's keys (every position predicting its
target, so that a multi-token target reads its block at each step) join the database, and the
block trains until the target is the answer. The paper attaches blocks to several layers and
indexes them at one; kedit keeps index and blocks at one module. Like GRACE, MELO edits one
request after another into a memory (`MemoryDelta`); the weights never change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from kedit.edits import (
    Adaptor,
    Change,
    MemoryDelta,
    find_memory,
    register_adaptor,
)
from kedit.lm import LM
from kedit.methods._train import (
    check_positive,
    check_site,
    edit_one_by_one,
    memory_tensors,
    module_inputs,
    module_path,
    request_row,
    train_at_module,
)
from kedit.methods.grace import label_of, place_key, within_radius
from kedit.methods.registry import HyperParams, MethodResult, hp, register
from kedit.requests import EditRequest


@register_adaptor
class LoRABlocks(Adaptor):
    """MELO's memory: keys `[n, in]`, their radii, labels and blocks `[n]`; the blocks' factors
    `down [B, in, r]` (A) and `up [B, r, out]` (B); config `scale` (α / r)."""

    kind = "melo"

    def adapt(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        flat = inputs.reshape(-1, inputs.shape[-1]).float()
        covered, index = within_radius(self, flat)
        if not covered.any():
            return output
        blocks = self.blocks[index[covered]]
        low = torch.einsum("mi,mir->mr", flat[covered], self.down[blocks])
        update = torch.einsum("mr,mro->mo", low, self.up[blocks]) * self.config["scale"]
        adapted = output.reshape(-1, output.shape[-1]).clone()
        adapted[covered] += update.to(adapted.dtype)
        return adapted.reshape(output.shape)


@dataclass
class MELOHyperParams(HyperParams):
    layers: list[int] = hp([35], "The one layer whose module holds the blocks and the keys.")
    module: str = hp("mlp_out", "The Layout role of that module: mlp_in, mlp_out or attn_out.")
    rank: int = hp(4, "Rank r of each block (num_rank_per_block).")
    alpha: float = hp(4.0, "α: a block's update is scaled by α / r.")
    eps_init: float = hp(1.0, "Radius of a new key (init_radius; Euclidean distance).")
    steps: int = hp(50, "Maximum optimisation steps of a block per edit.")
    lr: float = hp(5e-2, "Adam learning rate of the block.")
    stop_nll: float = hp(0.05, "Stop once the target's mean NLL is below this.")
    seed: int = hp(0, "Seed of the new blocks' random A.")

    ALIASES = {"num_rank_per_block": "rank", "init_radius": "eps_init", "edit_lr": "lr"}
    # EasyEdit's switches of what kedit does one way: one module holds the blocks and the keys,
    # the database keys are the module's inputs (Euclidean), blocks are assigned per cluster.
    IGNORED = HyperParams.IGNORED | {
        "inner_params",
        "grace_layer",
        "num_block",
        "lora_dropout",
        "lora_type",
        "fan_in_fan_out",
        "dist_fn",
        "val_init",
        "batch_size",
    }

    def validate(self) -> None:
        check_site(self.layers, self.module, "MELO's key database")
        check_positive(self, ("rank", "steps"), ("alpha", "eps_init", "lr"))


def new_block(shape: tuple[int, int], rank: int, seed: int, block: int) -> dict[str, torch.Tensor]:
    """Block `block`'s starting factors: A uniform in ±1/√in (LoRA's usual start), B zero."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
    bound = 1 / math.sqrt(shape[0])
    down = (torch.rand((shape[0], rank), generator=generator) * 2 - 1) * bound
    return {"down": down, "up": torch.zeros((rank, shape[1]))}


def _empty(shape: tuple[int, int], rank: int) -> dict[str, torch.Tensor]:
    """The memory's buffers before the first edit."""
    return {
        "keys": torch.zeros((0, shape[0])),
        "radii": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.long),
        "blocks": torch.zeros(0, dtype=torch.long),
        "down": torch.zeros((0, shape[0], rank)),
        "up": torch.zeros((0, rank, shape[1])),
    }


def train_block(
    lm: LM,
    request: EditRequest,
    path: str,
    factors: dict[str, torch.Tensor],
    scale: float,
    hparams: MELOHyperParams,
) -> dict[str, Any]:
    """Train a block's factors (in place) so that the target is the answer, the block acting
    at the positions that predict it."""
    device = lm.device
    down, up = (factors[name].to(device).requires_grad_(True) for name in ("down", "up"))
    positions = torch.tensor(request_row(lm, request)[1], device=device)
    memory = find_memory(lm.model.get_submodule(path), LoRABlocks.kind)

    def through_block(inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        update = (inputs[:, positions].float() @ down) @ up * scale
        adapted = output.clone()
        adapted[:, positions] += update.to(output.dtype)
        return adapted

    trained = train_at_module(lm, request, [down, up], hparams, path, through_block, memory)
    factors["down"], factors["up"] = down.detach().cpu(), up.detach().cpu()
    return {"steps": trained.steps, "final_nll": trained.nll}


def edit_one(lm: LM, request: EditRequest, hparams: MELOHyperParams) -> tuple[list[Change], dict]:
    """The memory change for one request: its keys placed by GRACE's rules and its cluster's
    block trained (none where its prompt's key is covered with its target)."""
    path = module_path(lm, hparams.module, hparams.layers[0])
    weight = lm.model.get_submodule(path).weight
    shape = lm.layout.in_out(weight)
    memory = find_memory(lm.model.get_submodule(path), LoRABlocks.kind)
    row = request_row(lm, request)
    keys = module_inputs(lm, path, [row[0]], [row[1]]).cpu()
    label = label_of(request)
    place = place_key(memory, keys[0], label, hparams.eps_init)
    info = place.describe()
    if place.rule == "covered":
        return [], info
    after = memory_tensors(memory, _empty(shape, hparams.rank))
    if place.nearest_radius is not None:
        after["radii"][place.nearest] = place.nearest_radius
    if place.rule == "expand":
        block, radius = int(after["blocks"][place.nearest]), hparams.eps_init
        factors = {name: after[name][block] for name in ("down", "up")}
    else:
        block, radius = len(after["down"]), place.radius
        factors = new_block(shape, hparams.rank, hparams.seed, block)
    scale = hparams.alpha / hparams.rank
    info.update(block=block, **train_block(lm, request, path, factors, scale, hparams))
    for name in ("down", "up"):
        if block == len(after[name]):
            after[name] = torch.cat([after[name], factors[name][None]])
        after[name][block] = factors[name]
    added = {
        "keys": keys,
        "radii": torch.full((len(keys),), radius),
        "labels": torch.full((len(keys),), label, dtype=torch.long),
        "blocks": torch.full((len(keys),), block, dtype=torch.long),
    }
    for name, rows in added.items():
        after[name] = torch.cat([after[name], rows])
    config = {"scale": scale}
    return [MemoryDelta.to_reach(path, LoRABlocks.kind, config, memory, after)], info


@register("melo", MELOHyperParams, "LoRA blocks selected by a key database (MELO)")
def melo(lm: LM, requests: list[EditRequest], hparams: MELOHyperParams) -> MethodResult:
    return edit_one_by_one(lm, requests, hparams, edit_one)
