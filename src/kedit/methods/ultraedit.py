"""UltraEdit: training-free lifelong editing with lifelong normalisation (Gu et al., 2025).

For a batch of requests, one forward and backward pass on the model as it is gives, at each
edited module and at every token of the prompts and targets (UltraEdit's `token: mask`; with
`token: ans`, only where a target token is predicted), the module's input k (the hidden state)
and the gradient g of the target NLL with respect to its output. Their
concatenation z = [k ‖ g] is normalised with running statistics over every batch edited so
far (lifelong normalisation: the batch's mean and squared deviations merged into the running
count N, mean μ and sum of squares s², σ = √(s² / (N − 1) + ε); ẑ = (z − μ) / σ), split back
into k̂ and ĝ, and each row asks for the output change v = −η ‖k̂‖² ĝ. The update is the ridge
solution that maps the raw keys K (one row per position) to those changes V,

    ΔW = argmin ‖K ΔW − V‖² + λ ‖ΔW‖² = (KᵀK + λI)⁻¹ KᵀV = Kᵀ (KKᵀ + λI)⁻¹ V,

computed in the last form, whose solve is only as large as the batch, and kept as a low-rank
`WeightDelta` (rank: the batch's rows). No training; every edited module's update comes from
the same pass. The running statistics are the method's state (`UltraEditState`), held by a
`kedit.Session`; a fresh state and a batch of one row normalise that row to zero, so a first
edit changes nothing unless it holds several target tokens (UltraEdit edits in batches).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kedit.edits import WeightDelta
from kedit.lm import LM
from kedit.methods._rows import target_batch
from kedit.methods._train import ROLES, module_path, output_gradients
from kedit.methods.registry import HyperParams, MethodResult, MethodState, hp, register
from kedit.requests import EditRequest

TOKENS = ("mask", "ans")
NORM_EPS = 1e-8  # ε inside σ's square root: a feature constant so far normalises to zero


@dataclass
class UltraEditHyperParams(HyperParams):
    layers: list[int] = hp([29, 30], "Layers whose module is edited.")
    module: str = hp("mlp_out", "The Layout role of the edited module: mlp_in, mlp_out, attn_out.")
    lr: float = hp(1e-6, "η: the value changes are v = −η ‖k̂‖² ĝ.")
    ridge: float = hp(1.0, "λ of the ridge solve (KᵀK + λI)⁻¹ KᵀV.")
    token: str = hp(
        "mask",
        "Where keys and gradients are taken: mask (every token of prompt and target) or ans "
        "(the positions that predict a target token).",
    )

    # EasyEdit's module paths (the Layout and `layers` give them), batching and precision
    # switches.
    IGNORED = HyperParams.IGNORED | {
        "inner_params",
        "dropout",
        "no_grad_layers",
        "batch_size",
        "batch_size_once",
        "editor_batch_size",
        "silent",
        "half",
        "results_dir",
        "model_class",
        "class_name",
        "tokenizer_class",
        "tokenizer_name",
    }

    def validate(self) -> None:
        if not self.layers:
            raise ValueError("layers: expected at least one layer, got []")
        if self.module not in ROLES:
            raise ValueError(f"module: expected one of {', '.join(ROLES)}, got {self.module!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")
        if not self.ridge > 0:
            raise ValueError(f"ridge: expected a positive number, got {self.ridge!r}")
        if self.token not in TOKENS:
            raise ValueError(f"token: expected one of {', '.join(TOKENS)}, got {self.token!r}")


@dataclass
class UltraEditState(MethodState):
    """The running statistics of the editing features z = [k ‖ g] per edited module: count N,
    mean μ and sum of squared deviations s² (float64)."""

    statistics: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def reset(self) -> None:
        self.statistics = {}

    def merged(self, path: str, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """The statistics of `path` with a batch of features `[n, D]` merged in (Chan et al.'s
        parallel update of the mean and the sum of squares); the state is not changed."""
        features = features.double()
        n = features.shape[0]
        batch_mean = features.mean(0)
        batch_squares = ((features - batch_mean) ** 2).sum(0)
        old = self.statistics.get(path)
        if old is None:
            return {"count": torch.tensor(float(n)), "mean": batch_mean, "m2": batch_squares}
        count = old["count"] + n
        delta = batch_mean - old["mean"].to(features.device)
        return {
            "count": count,
            "mean": old["mean"].to(features.device) + delta * n / count,
            "m2": old["m2"].to(features.device)
            + batch_squares
            + delta**2 * old["count"] * n / count,
        }

    def update(self, statistics: dict[str, dict[str, torch.Tensor]]) -> None:
        """Take merged statistics (a new dict, so that a shallow copy of the state stays a
        snapshot)."""
        self.statistics = {**self.statistics, **statistics}


def normalised(features: torch.Tensor, statistics: dict[str, torch.Tensor]) -> torch.Tensor:
    """ẑ = (z − μ) / σ with σ = √(s² / (N − 1) + ε) (zero variance while N = 1)."""
    count = float(statistics["count"])
    variance = statistics["m2"] / (count - 1) if count > 1 else torch.zeros_like(statistics["m2"])
    return (features.double() - statistics["mean"]) / torch.sqrt(variance + NORM_EPS)


def editing_features(
    lm: LM, requests: list[EditRequest], paths: list[str], token: str = "mask"
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module: its inputs K and the gradients G of the summed per-request target NLL with
    respect to its outputs (`[m, in]`, `[m, out]`, float32), at every token of each prompt and
    target (`token="mask"`) or where a target token is predicted ("ans"). One forward and one
    backward pass; the model's parameters get no gradient."""
    batch = target_batch(lm, requests)
    if token == "mask":
        rows, positions = torch.nonzero(batch.mask, as_tuple=True)
    else:
        rows = torch.arange(len(batch.ids), device=batch.positions.device)[:, None]
        rows = rows.expand_as(batch.positions)[batch.valid]
        positions = batch.positions[batch.valid]
    inputs, grads = output_gradients(lm, batch, paths, torch.sum)
    return {
        path: (
            inputs[path][rows, positions].float(),
            grad[rows.to(grad.device), positions.to(grad.device)].float(),
        )
        for path, grad in zip(paths, grads, strict=True)
    }


def ridge_update(keys: torch.Tensor, values: torch.Tensor, ridge: float) -> torch.Tensor:
    """The left factor L = Kᵀ (KKᵀ + λI)⁻¹ of ΔW = L V (`[in, m]`, float64)."""
    keys = keys.double()
    gram = keys @ keys.T + ridge * torch.eye(len(keys), dtype=keys.dtype, device=keys.device)
    return torch.linalg.solve(gram, keys).T


@register(
    "ultraedit",
    UltraEditHyperParams,
    "Training-free closed-form edits with lifelong normalisation (UltraEdit)",
    batchable=True,
    state=UltraEditState,
)
def ultraedit(
    lm: LM, requests: list[EditRequest], hparams: UltraEditHyperParams, state: UltraEditState
) -> MethodResult:
    paths = [module_path(lm, hparams.module, layer) for layer in sorted(hparams.layers)]
    features = editing_features(lm, requests, paths, hparams.token)
    deltas, statistics = [], {}
    for path, (keys, grads) in features.items():
        statistics[path] = state.merged(path, torch.cat([keys, grads], dim=1))
        normal_keys, normal_grads = normalised(
            torch.cat([keys, grads], dim=1), statistics[path]
        ).split([keys.shape[1], grads.shape[1]], dim=1)
        values = -hparams.lr * (normal_keys**2).sum(1, keepdim=True) * normal_grads
        left = ridge_update(keys, values, hparams.ridge)
        # ΔW = left @ values maps inputs to outputs (in × out): GPT-2's Conv1D layout; nn.Linear
        # stores (out × in).
        factors = (left, values) if lm.layout.conv1d else (values.T, left.T)
        deltas.append(WeightDelta.low_rank(f"{path}.weight", *factors))
    state.update(statistics)
    return MethodResult(deltas, {"rows": len(next(iter(features.values()))[0])})
