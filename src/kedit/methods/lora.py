"""LoRA (Hu et al., 2021) and AdaLoRA (Zhang et al., 2023) edits, trained with peft.

Each adapted module W (the Layout's roles `modules` at `layers`) gets a low-rank update
ΔW = B A (A: r × in, B: out × r, scaled by α / r; Eq. 3 of LoRA), B starting at zero so that
the edit starts from the unedited model. AdaLoRA writes ΔW = P Λ Q in SVD form (its Eq. 3),
prunes the singular values of least importance (sensitivity smoothed by β₁, uncertainty by β₂;
its Eqs. 7-9) from rank `rank` towards an average of `target_rank` on a cubic schedule, and keeps
P and Q near-orthogonal with R(P, Q) = ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F (its Eq. 4).

peft builds the adaptors, initialises them and (AdaLoRA) allocates the ranks; the objective is
FT-M's (the target tokens teacher-forced after the prompt). The trained update is kept as
`up @ down` beside the weight, in a `LowRankAdaptor` attached to the module (an `AdaptorDelta`:
undone by detaching it), or with `merge=True` folded into the weight as a low-rank
`WeightDelta`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kedit.edits import Adaptor, AdaptorDelta, WeightDelta, register_adaptor
from kedit.lm import LM
from kedit.methods._train import ROLES, check_positive, module_path, train_to_targets
from kedit.methods.registry import HyperParams, MethodResult, hp, register
from kedit.requests import EditRequest

# peft's SVDLinear divides its update by (ranknum + this); the adaptor does the same.
ADALORA_RANK_EPS = 1e-5


@register_adaptor
class LowRankAdaptor(Adaptor):
    """Adds `(x downᵀ) upᵀ` to its host's output: the update `up @ down` of a (Ada)LoRA edit."""

    kind = "low-rank"

    def adapt(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        update = (inputs.to(self.down.dtype) @ self.down.T) @ self.up.T
        return output + update.to(output.dtype)


@dataclass
class LoRAHyperParams(HyperParams):
    layers: list[int] = hp([5], "Layers whose modules get an adaptor.")
    modules: list[str] = hp(
        ["mlp_out"], "Layout roles adapted in each layer: mlp_in, mlp_out, attn_out."
    )
    rank: int = hp(8, "Rank r of each adaptor.")
    alpha: float = hp(32.0, "α: the update B A is scaled by α / r.")
    steps: int = hp(70, "Maximum optimisation steps.")
    lr: float = hp(5e-3, "Adam learning rate.")
    stop_nll: float = hp(0.05, "Stop once every request's mean target NLL is below this.")
    merge: bool = hp(False, "Fold the trained update into the weights (a WeightDelta).")
    seed: int = hp(0, "Seed of the adaptors' random initialisation (the same for every edit).")

    ALIASES = {"num_steps": "steps", "lora_alpha": "alpha"}
    # The Layout names the modules (`target_modules`); kedit trains without dropout or KL term.
    IGNORED = HyperParams.IGNORED | {
        "lora_type",
        "target_modules",
        "lora_dropout",
        "kl_factor",
        "norm_constraint",
        "batch_size",
        "weight_decay",
    }

    def validate(self) -> None:
        if not self.layers:
            raise ValueError("layers: expected at least one layer, got []")
        unknown = [role for role in self.modules if role not in ROLES]
        if not self.modules or unknown:
            raise ValueError(f"modules: expected some of {', '.join(ROLES)}, got {self.modules!r}")
        check_positive(self, ("rank", "steps"), ("alpha", "lr"))


@dataclass
class AdaLoRAHyperParams(LoRAHyperParams):
    rank: int = hp(12, "Initial rank of each adaptor (AdaLoRA's init_r), pruned during training.")
    target_rank: int = hp(8, "Average rank the pruning ends at (target_r).")
    warmup_steps: int = hp(0, "Steps before pruning starts (tinit).")
    final_steps: int = hp(20, "Steps after pruning ends, at the final ranks (tfinal).")
    allocation_interval: int = hp(1, "Steps between two rank allocations (deltaT).")
    beta1: float = hp(0.85, "β₁: smoothing of the sensitivity (Eq. 8).")
    beta2: float = hp(0.85, "β₂: smoothing of its uncertainty (Eq. 9).")
    orth_reg_weight: float = hp(0.5, "Weight of the orthogonality regulariser R(P, Q) (Eq. 4).")

    ALIASES = {
        **LoRAHyperParams.ALIASES,
        "init_r": "rank",
        "target_r": "target_rank",
        "tinit": "warmup_steps",
        "tfinal": "final_steps",
        "deltaT": "allocation_interval",
    }

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.target_rank <= self.rank:
            raise ValueError(
                f"target_rank: expected 1..rank ({self.rank}), got {self.target_rank!r}"
            )
        if not 0 <= self.warmup_steps < self.steps - self.final_steps:
            raise ValueError(
                f"warmup_steps, final_steps: pruning needs warmup_steps ({self.warmup_steps}) < "
                f"steps - final_steps ({self.steps} - {self.final_steps})"
            )


def adapted_paths(lm: LM, hparams: LoRAHyperParams) -> list[str]:
    """The module paths the adaptors go to, layer by layer."""
    return [
        module_path(lm, role, layer) for layer in sorted(hparams.layers) for role in hparams.modules
    ]


def _peft_config(hparams: LoRAHyperParams, keys: list[str], conv1d: bool) -> Any:
    from peft import AdaLoraConfig, LoraConfig

    common = {
        "target_modules": keys,
        "lora_alpha": hparams.alpha,
        "lora_dropout": 0.0,
        "fan_in_fan_out": conv1d,
        "bias": "none",
    }
    if not isinstance(hparams, AdaLoRAHyperParams):
        return LoraConfig(r=hparams.rank, **common)
    return AdaLoraConfig(
        init_r=hparams.rank,
        target_r=hparams.target_rank,
        tinit=hparams.warmup_steps,
        tfinal=hparams.final_steps,
        deltaT=hparams.allocation_interval,
        beta1=hparams.beta1,
        beta2=hparams.beta2,
        orth_reg_weight=hparams.orth_reg_weight,
        total_step=hparams.steps,
        **common,
    )


@contextmanager
def peft_layers(
    lm: LM, paths: list[str], hparams: LoRAHyperParams
) -> Iterator[tuple[Any, list[nn.Module]]]:
    """peft's (Ada)LoRA layers around the modules at `paths`, in the model for the block: the
    peft tuner and the layers. Afterwards the model holds its own modules again, untouched.

    peft sees only a holder of those modules, never the model, so it changes nothing else.
    """
    from peft import AdaLoraModel, LoraModel

    model = lm.model
    hosts = [model.get_submodule(path) for path in paths]
    holder = nn.ModuleDict({f"m{index}": host for index, host in enumerate(hosts)})
    trainable = {p: p.requires_grad for host in hosts for p in host.parameters()}
    tuner_class = AdaLoraModel if isinstance(hparams, AdaLoRAHyperParams) else LoraModel
    config = _peft_config(hparams, list(holder.keys()), lm.layout.conv1d)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hparams.seed)
            tuner = tuner_class(holder, config, "default")
        layers = list(holder.values())
        for layer in layers:  # train in float32 (peft's own autocast does the same): a float16
            for name, p in layer.named_parameters():  # adaptor overflows in Adam
                if "lora_" in name:
                    p.data = p.data.float()
        for path, layer in zip(paths, layers, strict=True):
            model.set_submodule(path, layer)
        yield tuner, layers
    finally:
        for path, host in zip(paths, hosts, strict=True):
            model.set_submodule(path, host)
        for p, was in trainable.items():
            p.requires_grad_(was)


def low_rank_factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """`(down, up)` of a trained peft layer, its update being `up @ down` (scaling included);
    AdaLoRA's pruned ranks are left out."""

    def tensor(store: Any) -> torch.Tensor:
        value = store["default"]
        return getattr(value, "weight", value).detach().float()

    down, up, scaling = tensor(layer.lora_A), tensor(layer.lora_B), layer.scaling["default"]
    if not hasattr(layer, "lora_E"):
        return down, up * scaling
    singular = tensor(layer.lora_E)  # Λ, (r, 1)
    kept = singular[:, 0] != 0
    ranknum = float(layer.ranknum["default"].detach())
    return (down * singular)[kept], (up * scaling / (ranknum + ADALORA_RANK_EPS))[:, kept]


def orthogonality(layers: list[nn.Module]) -> torch.Tensor:
    """AdaLoRA's R(P, Q) = ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F summed over the layers (Eq. 4)."""
    terms = []
    for layer in layers:
        q, p = layer.lora_A["default"], layer.lora_B["default"]  # Q: r × in, P: out × r
        eye = torch.eye(q.shape[0], device=q.device)
        terms.append(((p.T @ p - eye) ** 2).sum() + ((q @ q.T - eye) ** 2).sum())
    return torch.stack(terms).sum()


def train_low_rank(
    lm: LM, requests: list[EditRequest], hparams: LoRAHyperParams
) -> tuple[list[tuple[str, torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """Train (Ada)LoRA adaptors on the requests; their `(path, down, up)` and the training's
    record. The model is left as it was."""
    paths = adapted_paths(lm, hparams)
    first = min(hparams.layers)
    adaptive = isinstance(hparams, AdaLoRAHyperParams)
    with peft_layers(lm, paths, hparams) as (tuner, layers):
        params = [p for layer in layers for n, p in layer.named_parameters() if "lora_" in n]

        def extra() -> torch.Tensor:
            return hparams.orth_reg_weight * orthogonality(layers)

        trained = train_to_targets(
            lm,
            requests,
            params,
            first,
            hparams.steps,
            hparams.lr,
            hparams.stop_nll,
            extra_loss=extra if adaptive else None,
            after_step=tuner.update_and_allocate if adaptive else None,
            # AdaLoRA stops only once its ranks are final.
            min_steps=hparams.steps - hparams.final_steps if adaptive else 0,
        )
        factors = [
            (path, *low_rank_factors(layer)) for path, layer in zip(paths, layers, strict=True)
        ]
    info = {
        "steps": trained.steps,
        "final_nll": trained.nll,
        "ranks": {path: down.shape[0] for path, down, _ in factors},
    }
    return factors, info


def _edit(lm: LM, requests: list[EditRequest], hparams: LoRAHyperParams) -> MethodResult:
    factors, info = train_low_rank(lm, requests, hparams)
    if not hparams.merge:
        deltas = [
            AdaptorDelta(
                path, LowRankAdaptor.kind, {"rank": down.shape[0]}, {"down": down, "up": up}
            )
            for path, down, up in factors
        ]
        return MethodResult(deltas, info)
    # ΔW = up @ down in nn.Linear's (out, in) layout; GPT-2's Conv1D stores the transpose.
    deltas = [
        WeightDelta.low_rank(
            f"{path}.weight", *((down.T, up.T) if lm.layout.conv1d else (up, down))
        )
        for path, down, up in factors
    ]
    return MethodResult(deltas, info)


@register("lora", LoRAHyperParams, "Low-rank adaptors trained on the edits (LoRA, via peft)", True)
def lora(lm: LM, requests: list[EditRequest], hparams: LoRAHyperParams) -> MethodResult:
    return _edit(lm, requests, hparams)


@register(
    "adalora",
    AdaLoRAHyperParams,
    "Low-rank adaptors with adaptive rank allocation (AdaLoRA, via peft)",
    True,
)
def adalora(lm: LM, requests: list[EditRequest], hparams: AdaLoRAHyperParams) -> MethodResult:
    return _edit(lm, requests, hparams)
