"""AlphaEdit (Fang et al., 2024): MEMIT with each update projected onto the null space of the
preserved knowledge.

Targets and the spreading over layers are MEMIT's (`memit_targets`, `spread_over_layers`).
Per layer, with C = E[k kᵀ] the second moment of the preserved keys K₀, P projects onto the
eigenvectors of C whose eigenvalues are (near) zero (AlphaEdit Sec. 3.1), so ΔW P K₀ ≈ 0 and the
preserved keys' outputs do not move. The update solves (AlphaEdit Sec. 3.2, sequential form)

    min ‖(W + ΔP) K₁ − V₁‖² + α‖ΔP‖² + ‖ΔP K_p‖²
    ΔW = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + α I)⁻¹          (column-per-fact notation)

with K₁ the keys of this batch, R the residuals, and K_p the keys of the earlier edits of the
same session, which keeps later updates off them. In the row-per-fact notation of MEMIT
(K: n × in, R: n × out) this is ΔW = Rᵀ · K P ((KᵀK + K_pᵀK_p) P + α I)⁻¹, stored as those two
factors. For α > 0 the right factor lies in the range of P, which is why ΔW K₀ ≈ 0.

The threshold on the eigenvalues is relative to the largest one, not absolute as in the
reference code: the keys' scale differs between models and layers (the largest eigenvalue is
30-60 on tiny-gpt2's layers 0-2 and 60-9000 on tiny-llama's), and a relative cut means the
same thing everywhere. On the tiny models the projection helped little at the subject's last
token, where only layers 0-1 take an edit: there the edited subjects' keys put only 1.5-4x as
large a share of their energy into the null space as the corpus keys do, so keeping the
preserved keys also muted the edit. Their defaults edit the prompt's last token at layers 4-5
(`fact_token: last`, hparams/alphaedit.yaml); there too edited and unedited prompts put the
same share into the null space, which 300 edits fill (`benchmarks/nullspace_overlap.py`).
The earlier edits live in an `AlphaEditState` (held by a `kedit.Session` or passed to
`kedit.edit(state=...)`) as their Gram matrix K_pᵀK_p per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kedit.lm import LM
from kedit.methods._locate import LocateHyperParams, note_statistics
from kedit.methods._spread import memit_targets, spread_over_layers
from kedit.methods.registry import MethodResult, MethodState, hp, register
from kedit.requests import EditRequest
from kedit.stats import second_moment_eigh


@dataclass
class AlphaEditHyperParams(LocateHyperParams):
    layers: list[int] = hp([4, 5, 6, 7, 8], "Layers whose MLP output projections are edited.")
    clamp_norm_factor: float = hp(0.75, "Clamp ‖δ‖ to this multiple of the residual's norm.")
    nullspace_threshold: float = hp(
        1e-3, "Eigenvalues of C below this fraction of the largest span the null space."
    )
    ridge: float = hp(10.0, "α: weight of ‖ΔP‖² (keeps the solve well-posed; must be > 0).")

    ALIASES = {**LocateHyperParams.ALIASES, "L2": "ridge"}
    # EasyEdit's AlphaEdit files carry MEMIT's keys; these have no meaning here.
    IGNORED = LocateHyperParams.IGNORED | {
        "mom2_update_weight",
        "mom2_adjustment",
        "layer_selection",
    }

    def validate(self) -> None:
        super().validate()
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers: repeated layer in {self.layers!r}")
        if not 0 < self.nullspace_threshold < 1:
            raise ValueError(
                f"nullspace_threshold: expected a fraction in (0, 1), got "
                f"{self.nullspace_threshold!r}"
            )
        if not self.ridge > 0:
            raise ValueError(f"ridge: expected a positive number, got {self.ridge!r}")


@dataclass
class AlphaEditState(MethodState):
    """The keys of the earlier edits of a session: K_pᵀK_p per layer (`grams`), and how many
    there are. A batch's keys join the Gram matrices when an edit first reads them, not when
    the batch is done (an edit made on a fresh state never pays for them)."""

    folded: dict[int, torch.Tensor] = field(default_factory=dict)
    pending: tuple[dict[int, torch.Tensor], ...] = ()
    n_keys: int = 0
    model_fingerprint: str | None = None

    @property
    def grams(self) -> dict[int, torch.Tensor]:
        """K_pᵀK_p per layer (empty before the first edit)."""
        if self.pending:
            grams = dict(self.folded)
            for keys in self.pending:
                for layer, layer_keys in keys.items():
                    grams[layer] = grams.get(layer, 0) + layer_keys.T @ layer_keys
            self.folded, self.pending = grams, ()
        return self.folded

    def reset(self) -> None:
        self.folded, self.pending, self.n_keys, self.model_fingerprint = {}, (), 0, None

    def earlier(self, lm: LM, layers: list[int]) -> dict[int, torch.Tensor]:
        """K_pᵀK_p per layer (empty before the first edit).

        Refuses the state of another model or of other layers."""
        if self.model_fingerprint not in (None, lm.fingerprint):
            raise ValueError(
                f"state: it holds keys of model {self.model_fingerprint}, not of {lm.name!r} "
                f"({lm.fingerprint}); use a fresh AlphaEditState or reset() it"
            )
        grams = self.grams
        if grams and set(grams) != set(layers):
            raise ValueError(
                f"state: it holds keys of layers {sorted(grams)}, not of layers "
                f"{sorted(layers)}; keep the layers of a session fixed or reset() the state"
            )
        return grams

    def add(self, lm: LM, keys: dict[int, torch.Tensor]) -> None:
        """Remember one batch's keys (n × in per layer)."""
        self.pending = (*self.pending, keys)
        self.n_keys += len(next(iter(keys.values())))
        self.model_fingerprint = lm.fingerprint


def null_space_projection(lm: LM, hparams: AlphaEditHyperParams, layer: int) -> torch.Tensor:
    """P = Û Ûᵀ over the eigenvectors Û of C with eigenvalue < threshold × the largest (in × in,
    float64, on the layer's device), cached on `lm.cache` per layer, statistics and threshold
    (AlphaEdit Sec. 3.1); C's decomposition is cached on disk beside C
    (`kedit.stats.second_moment_eigh`)."""
    threshold = hparams.nullspace_threshold
    key = ("alphaedit_projection", layer, hparams.stats_key(), threshold)
    if key not in lm.cache:
        values, vectors = second_moment_eigh(lm, layer, **hparams.stats_settings())
        kept = vectors[:, values < threshold * values.max()]
        if kept.shape[1] == 0:
            raise ValueError(
                f"nullspace_threshold: no eigenvalue of layer {layer}'s second moment is below "
                f"{threshold} × the largest, so the null space is empty; raise the threshold"
            )
        device = lm.device_of(lm.layout.mlp_out_name(layer))
        lm.cache[key] = (kept @ kept.T).to(device, torch.float64)
    note_statistics(lm, hparams, layer)
    return lm.cache[key]


def null_space_update(
    residuals: torch.Tensor,
    keys: torch.Tensor,
    projection: torch.Tensor,
    earlier: torch.Tensor | None,
    ridge: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(left, right)` with ΔW = left @ right = Rᵀ K P ((KᵀK + K_pᵀK_p) P + α I)⁻¹.

    Rows of `keys`/`residuals` are facts; `earlier` is K_pᵀK_p (None: no earlier edits). Solved
    transposed: rightᵀ = (P (KᵀK + K_pᵀK_p) + α I)⁻¹ P Kᵀ, as P and the Gram matrices are
    symmetric. Without earlier edits and with fewer facts than key dimensions, the push-through
    identity (P KᵀK + α I)⁻¹ P Kᵀ = P Kᵀ (K P Kᵀ + α I)⁻¹ leaves an n × n system.
    """
    keys, residuals = keys.to(projection.device, torch.float64), residuals.double()
    if earlier is None and len(keys) < projection.shape[0]:
        projected = keys @ projection
        gram = projected @ keys.T
        gram.diagonal().add_(ridge)
        return residuals.T, torch.linalg.solve(gram, projected)
    identity = torch.eye(projection.shape[0], dtype=torch.float64, device=projection.device)
    gram = keys.T @ keys if earlier is None else keys.T @ keys + earlier
    system = projection @ gram + ridge * identity
    right = torch.linalg.solve(system, projection @ keys.T).T
    return residuals.T, right


@register(
    "alphaedit",
    AlphaEditHyperParams,
    "MEMIT projected onto the preserved keys' null space (Fang et al., 2024)",
    True,
    state=AlphaEditState,
)
def alphaedit(
    lm: LM, requests: list[EditRequest], hparams: AlphaEditHyperParams, state: AlphaEditState
) -> MethodResult:
    layers = sorted(lm.check_layer(layer) for layer in hparams.layers)
    # Before any layer changes: the statistics must be those of the unedited layers.
    projections = {layer: null_space_projection(lm, hparams, layer) for layer in layers}
    earlier = state.earlier(lm, layers)
    targets = memit_targets(lm, requests, hparams)
    batch_keys: dict[int, torch.Tensor] = {}

    def solve(layer: int, residuals: torch.Tensor, keys: torch.Tensor):
        batch_keys[layer] = keys
        return null_space_update(
            residuals, keys, projections[layer], earlier.get(layer), hparams.ridge
        )

    deltas = spread_over_layers(lm, requests, hparams, targets, solve)
    info = {"value_steps": targets.steps, "earlier_keys": state.n_keys}
    state.add(lm, batch_keys)
    return MethodResult(deltas, info)
