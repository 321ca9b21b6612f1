"""GRACE: a discrete key-value codebook at one layer (Hartvigsen et al., 2023).

The codebook sits at one module of one layer (the MLP's output projection by default; EasyEdit
puts it at GPT-2 XL's MLP input projection): its keys are inputs of that module, its values
outputs. Where an input lies within the deferral radius ε_i of its nearest key K_i,
the layer's output is replaced by that key's value V_i; elsewhere the layer runs as before
(the paper's deferral rule). kedit applies the rule at every token position: the edit prompt's
last token matches its key exactly, wherever the prompt sits in a longer text.

Editing a request (x, y) takes h, the projection's input at x's last token, and its nearest
key K_i at distance d (the paper's codebook maintenance):
- d > ε_i + ε_init, or an empty codebook: add (h, v, ε_init) with a new value v;
- otherwise, and the key's label is y: expand ε_i to d, so that h is covered (nothing to do
  where it already is);
- otherwise (another label): split, ε_i = d / 2, and add (h, v, d / 2).
A new value starts at the layer's output there and is trained until y is the model's answer.
The weights never change; the codebook is a memory attached to the projection, growing edit by
edit (`MemoryDelta`), so GRACE edits one request after another.
"""

from __future__ import annotations

import zlib
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
from kedit.hooks import capture
from kedit.lm import LM
from kedit.methods._train import (
    check_positive,
    check_site,
    edit_one_by_one,
    module_path,
    train_at_module,
)
from kedit.methods.registry import HyperParams, MethodResult, hp, register
from kedit.requests import EditRequest

TENSORS = ("keys", "values", "radii", "labels")


def within_radius(memory: Adaptor, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For inputs `[m, in]` and a memory's `keys` and `radii`: which inputs lie within the
    radius of their nearest key (the deferral rule), and that key's index."""
    nearest, index = torch.cdist(inputs.float(), memory.keys).min(-1)
    return nearest <= memory.radii[index], index


@register_adaptor
class Codebook(Adaptor):
    """GRACE's codebook: keys `[n, in]`, values `[n, out]`, radii `[n]`, labels `[n]`."""

    kind = "grace"

    def adapt(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        covered, index = within_radius(self, inputs.reshape(-1, inputs.shape[-1]))
        if not covered.any():
            return output
        replaced = output.reshape(-1, output.shape[-1]).clone()
        replaced[covered] = self.values[index[covered]].to(replaced.dtype)
        return replaced.reshape(output.shape)


@dataclass
class GRACEHyperParams(HyperParams):
    layers: list[int] = hp([35], "The one layer whose module holds the codebook.")
    module: str = hp("mlp_out", "The Layout role of that module: mlp_in, mlp_out or attn_out.")
    eps_init: float = hp(1.0, "ε_init: the deferral radius of a new key (Euclidean distance).")
    steps: int = hp(100, "Maximum optimisation steps of a new value.")
    lr: float = hp(1.0, "Adam learning rate of a new value.")
    stop_nll: float = hp(0.05, "Stop once the target's mean NLL is below this.")

    ALIASES = {"edit_lr": "lr", "n_iter": "steps", "eps": "eps_init"}
    # EasyEdit's choices that kedit makes one way: Euclidean distance, the paper's coverage
    # expansion, values started at the layer's output and trained with Adam; `inner_params`
    # names the layer, which `layers` and the Layout give here.
    IGNORED = HyperParams.IGNORED | {
        "inner_params",
        "dist_fn",
        "val_init",
        "val_train",
        "val_reg",
        "reg",
        "replacement",
        "eps_expand",
        "num_pert",
        "dropout",
        "batch_size",
    }

    def validate(self) -> None:
        check_site(self.layers, self.module, "GRACE's codebook")
        check_positive(self, ("steps",), ("eps_init", "lr"))


def label_of(request: EditRequest) -> int:
    """The request's label: its target as a number (equal targets, equal labels)."""
    return zlib.crc32(request.target_new.encode())


def last_token_input(lm: LM, path: str, prompt: str) -> tuple[torch.Tensor, int]:
    """The input of module `path` at the prompt's last token, and that token's position."""
    ids = lm.encode_prompt(prompt)
    with torch.no_grad(), capture(lm.model, [path], "input") as seen:
        lm.model(input_ids=torch.tensor([ids], device=lm.device), use_cache=False)
    return seen[path][0, len(ids) - 1].float(), len(ids) - 1


def train_value(
    lm: LM, request: EditRequest, path: str, position: int, hparams: GRACEHyperParams
) -> tuple[torch.Tensor, dict[str, Any]]:
    """A value for the module's output at the prompt's last token that makes the target the
    model's answer, started at the output there now."""
    ids = torch.tensor([lm.encode_prompt(request.text)], device=lm.device)
    with torch.no_grad(), capture(lm.model, [path]) as seen:
        lm.model(input_ids=ids, use_cache=False)
    value = seen[path][0, position].detach().float().clone().requires_grad_(True)

    def put(inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        replaced = output.clone()
        replaced[:, position] = value.to(output.dtype)
        return replaced

    trained = train_at_module(lm, request, [value], hparams, path, put)
    return value.detach(), {"steps": trained.steps, "final_nll": trained.nll}


def _rows_before(memory: Adaptor | None) -> dict[str, int]:
    return {name: 0 if memory is None else memory.rows(name) for name in TENSORS}


@dataclass
class Placement:
    """Where a new key goes by the paper's codebook rules: `rule` ("add", "expand", "split" or
    "covered"), the nearest key and its distance (None with an empty codebook), the radius of
    the new key ("add", "split") or the nearest key's new radius ("expand", "split")."""

    rule: str
    nearest: int | None = None
    distance: float | None = None
    radius: float = 0.0
    nearest_radius: float | None = None

    def describe(self) -> dict[str, Any]:
        """The rule, and the distance to the nearest key where there is one (an edit's info)."""
        if self.distance is None:
            return {"rule": self.rule}
        return {"rule": self.rule, "distance": self.distance}


def place_key(memory: Adaptor | None, key: torch.Tensor, label: int, eps_init: float) -> Placement:
    """GRACE's codebook maintenance for a new key with its label, in a memory with buffers
    `keys [n, in]`, `radii [n]` and `labels [n]` (or none yet)."""
    if memory is None or not memory.rows("keys"):
        return Placement("add", radius=eps_init)
    distances = (memory.keys - key.to(memory.keys.device)).norm(dim=-1)
    nearest = int(distances.argmin())
    distance, own = float(distances[nearest]), float(memory.radii[nearest])
    if distance > own + eps_init:
        return Placement("add", nearest, distance, eps_init)
    if int(memory.labels[nearest]) == label:
        rule = "covered" if distance <= own else "expand"
        return Placement(rule, nearest, distance, nearest_radius=max(own, distance))
    return Placement("split", nearest, distance, distance / 2, distance / 2)


def edit_one(lm: LM, request: EditRequest, hparams: GRACEHyperParams) -> tuple[list[Change], dict]:
    """The codebook change for one request (none where its key is covered with its label)."""
    path = module_path(lm, hparams.module, hparams.layers[0])
    memory = find_memory(lm.model.get_submodule(path), Codebook.kind)
    key, position = last_token_input(lm, path, request.text)
    label = label_of(request)
    place = place_key(memory, key, label, hparams.eps_init)
    info = place.describe()
    if place.rule == "covered":
        return [], info
    changed = {}
    if place.nearest_radius is not None:
        changed = {"radii": (torch.tensor([place.nearest]), torch.tensor([place.nearest_radius]))}
    if place.rule == "expand":
        return [MemoryDelta(path, Codebook.kind, {}, _rows_before(memory), changed=changed)], info
    value, trained = train_value(lm, request, path, position, hparams)
    appended = {
        "keys": key[None].cpu(),
        "values": value[None].cpu(),
        "radii": torch.tensor([place.radius]),
        "labels": torch.tensor([label], dtype=torch.long),
    }
    delta = MemoryDelta(path, Codebook.kind, {}, _rows_before(memory), appended, changed)
    return [delta], {**info, **trained}


@register("grace", GRACEHyperParams, "A discrete key-value codebook at one layer (GRACE)")
def grace(lm: LM, requests: list[EditRequest], hparams: GRACEHyperParams) -> MethodResult:
    return edit_one_by_one(lm, requests, hparams, edit_one)
