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

Two terms that keep other inputs' outputs (kedit's, not the paper's; both off by default) add
an in × in matrix P to the ridge system,

    ΔW = (KᵀK + λI + P)⁻¹ KᵀV,   P = μ C + ν K_pᵀK_p:

`preserve` μ weighs C = E[k kᵀ], the second moment of the unedited model's keys over the
statistics corpus (MEMIT's term: ΔW then also keeps ‖C^½ ΔW‖ small, the change of an average
input's output, so μ counts corpus keys against the batch's rows), and `keep_earlier` ν weighs
the Gram matrix K_pᵀK_p of the keys of every earlier batch, kept in the state, so that a later
batch moves earlier edits' outputs less (the soft form of AlphaEdit's projection away from
earlier keys; Fang et al., 2024). With B = λI + P = LLᵀ (Cholesky), the push-through identity
(KᵀK + B)⁻¹Kᵀ = B⁻¹Kᵀ (K B⁻¹Kᵀ + I)⁻¹ leaves one in × in factorisation (cached per model and
statistics while ν K_pᵀK_p is absent) and a batch-sized solve.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kedit.edits import WeightDelta
from kedit.lm import LM
from kedit.methods._locate import StatisticsHyperParams, layer_second_moment, note_statistics
from kedit.methods._rows import target_batch
from kedit.methods._train import ROLES, module_path, output_gradients
from kedit.methods.registry import HyperParams, MethodResult, MethodState, hp, register
from kedit.requests import EditRequest

TOKENS = ("mask", "ans")
NORM_EPS = 1e-8  # ε inside σ's square root: a feature constant so far normalises to zero


@dataclass
class UltraEditHyperParams(StatisticsHyperParams):
    layers: list[int] = hp([29, 30], "Layers whose module is edited.")
    module: str = hp("mlp_out", "The Layout role of the edited module: mlp_in, mlp_out, attn_out.")
    lr: float = hp(1e-6, "η: the value changes are v = −η ‖k̂‖² ĝ.")
    ridge: float = hp(1.0, "λ of the ridge solve (KᵀK + λI)⁻¹ KᵀV.")
    token: str = hp(
        "mask",
        "Where keys and gradients are taken: mask (every token of prompt and target) or ans "
        "(the positions that predict a target token).",
    )
    preserve: float = hp(
        0.0,
        "μ (kedit's, not the paper's): add μ·C, the unedited keys' second moment over the"
        " statistics corpus, to the ridge system, so other inputs' outputs move less (module"
        " mlp_out only; 0: off, as in the paper).",
    )
    keep_earlier: float = hp(
        0.0,
        "ν (kedit's, not the paper's): add ν·K_pᵀK_p, the Gram matrix of every earlier batch's"
        " keys (kept in the state), to the ridge system, so later batches move earlier edits"
        " less (0: off, as in the paper).",
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
        super().validate()
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
        for name in ("preserve", "keep_earlier"):
            value = getattr(self, name)
            if not 0 <= value < float("inf"):
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
        if self.preserve and self.module != "mlp_out":
            raise ValueError(
                f"preserve: the second moment is that of mlp_out's keys; expected 0 with module "
                f"{self.module!r}, got {self.preserve!r}"
            )


@dataclass
class UltraEditState(MethodState):
    """The running statistics of the editing features z = [k ‖ g] per edited module: count N,
    mean μ and sum of squared deviations s² (float64); with `keep_earlier`, also the Gram
    matrix K_pᵀK_p of every earlier batch's keys per module (`grams`, float64)."""

    statistics: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    grams: dict[str, torch.Tensor] = field(default_factory=dict)

    def reset(self) -> None:
        self.statistics, self.grams = {}, {}

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

    def add_keys(self, keys: dict[str, torch.Tensor]) -> None:
        """Add each module's batch keys `[m, in]` to its Gram matrix (a new dict and new
        tensors, so that a shallow copy of the state stays a snapshot)."""
        grams = dict(self.grams)
        for path, batch in keys.items():
            batch = batch.double()
            grams[path] = grams.get(path, 0) + batch.T @ batch
        self.grams = grams


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


def ridge_update(
    keys: torch.Tensor, ridge: float, factor: torch.Tensor | None = None
) -> torch.Tensor:
    """The left factor L of ΔW = L V (`[in, m]`, float64): L = Kᵀ (KKᵀ + λI)⁻¹, or, given the
    lower Cholesky factor of B = λI + P, L = (KᵀK + B)⁻¹Kᵀ = B⁻¹Kᵀ (K B⁻¹Kᵀ + I)⁻¹."""
    keys = keys.double()
    eye = torch.eye(len(keys), dtype=keys.dtype, device=keys.device)
    if factor is None:
        return torch.linalg.solve(keys @ keys.T + ridge * eye, keys).T
    spread = torch.cholesky_solve(keys.T.contiguous(), factor)  # B⁻¹Kᵀ
    return torch.linalg.solve(keys @ spread + eye, spread.T).T  # K B⁻¹Kᵀ + I is symmetric


def ridge_system(
    lm: LM, hparams: UltraEditHyperParams, layer: int, keys: torch.Tensor
) -> torch.Tensor:
    """λI + μC for one layer (`[in, in]`, float64, on the keys' device)."""
    eye = torch.eye(keys.shape[1], dtype=torch.float64, device=keys.device)
    if not hparams.preserve:
        return hparams.ridge * eye
    return hparams.ridge * eye + hparams.preserve * layer_second_moment(lm, hparams, layer)


def protection_factor(
    lm: LM,
    hparams: UltraEditHyperParams,
    layer: int,
    keys: torch.Tensor,
    earlier: torch.Tensor | None,
) -> torch.Tensor | None:
    """The lower Cholesky factor of B = λI + μC + νK_pᵀK_p for one layer (`earlier`: K_pᵀK_p,
    None before the first batch), None when neither term is on. Without K_pᵀK_p the factor
    is computed once per model and statistics and kept on `lm.cache`."""
    if hparams.keep_earlier and earlier is not None:
        system = ridge_system(lm, hparams, layer, keys)
        return torch.linalg.cholesky(system + hparams.keep_earlier * earlier.to(system.device))
    if not hparams.preserve:
        return None
    key = ("ultraedit_factor", layer, hparams.stats_key(), hparams.ridge, hparams.preserve)
    if key not in lm.cache:
        lm.cache[key] = torch.linalg.cholesky(ridge_system(lm, hparams, layer, keys))
    note_statistics(lm, hparams, layer)
    return lm.cache[key]


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
    layers = sorted(hparams.layers)
    paths = [module_path(lm, hparams.module, layer) for layer in layers]
    features = editing_features(lm, requests, paths, hparams.token)
    deltas, statistics = [], {}
    for layer, (path, (keys, grads)) in zip(layers, features.items(), strict=True):
        statistics[path] = state.merged(path, torch.cat([keys, grads], dim=1))
        normal_keys, normal_grads = normalised(
            torch.cat([keys, grads], dim=1), statistics[path]
        ).split([keys.shape[1], grads.shape[1]], dim=1)
        values = -hparams.lr * (normal_keys**2).sum(1, keepdim=True) * normal_grads
        factor = protection_factor(lm, hparams, layer, keys, state.grams.get(path))
        left = ridge_update(keys, hparams.ridge, factor)
        # ΔW = left @ values maps inputs to outputs (in × out): GPT-2's Conv1D layout; nn.Linear
        # stores (out × in).
        factors = (left, values) if lm.layout.conv1d else (values.T, left.T)
        deltas.append(WeightDelta.low_rank(f"{path}.weight", *factors))
    state.update(statistics)
    if hparams.keep_earlier:
        state.add_keys({path: keys for path, (keys, _) in features.items()})
    return MethodResult(deltas, {"rows": len(next(iter(features.values()))[0])})
