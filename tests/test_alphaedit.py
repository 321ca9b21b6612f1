import pytest
import torch

import kedit
from kedit.hooks import capture, stop_after
from kedit.methods import alphaedit as alphaedit_module
from kedit.methods._locate import context_prefixes, layer_second_moment, lookup_activations
from kedit.methods.alphaedit import AlphaEditState, null_space_projection, null_space_update
from kedit.methods.registry import resolve_hparams
from kedit.zoo import CORPUS_FILE


def _requests(n):
    from kedit.data import load_requests
    from kedit.zoo import DATA_DIR

    return load_requests(DATA_DIR / "tinyworld_knowedit.json", n=n)


@torch.no_grad()
def _corpus_keys(lm, layer, n_docs=300):
    """Keys K₀ (tokens × in) at every real token of some corpus documents."""
    docs = [line for line in CORPUS_FILE.read_text().splitlines() if line.strip()][-n_docs:]
    ids, mask = lm.pad([lm.encode_prompt(doc) for doc in docs])
    name = lm.layout.mlp_out_name(layer)
    with capture(lm.model, [name], "input") as seen, stop_after(lm.model, name):
        lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    return seen[name][mask.bool()].double()


def _dense(lm, delta):
    """A delta as an (out × in) matrix, whatever the parameter's storage orientation."""
    dense = delta.tensor().double()
    return dense.T if lm.layout.conv1d else dense


def _leak(update, keys):
    """‖ΔW K₀‖ / (‖ΔW‖ ‖K₀‖): how much of the update reaches the preserved keys' outputs."""
    return float((keys @ update.T).norm() / (update.norm() * keys.norm()))


@pytest.mark.parametrize("with_earlier", [False, True], ids=["n-by-n", "in-by-in"])
def test_update_solves_alphaedits_normal_equations(with_earlier):
    """AlphaEdit's update (Fang et al., 2024, Eq. 9, in row-per-fact notation) minimises
    ‖ΔW P Kᵀ − Rᵀ‖² + ‖ΔW P K_pᵀ‖² + α ‖ΔW P‖²; so ΔW ((KᵀK + K_pᵀK_p) P + α I) = Rᵀ K P, and
    ΔW = ΔW P. Checked on matrices built here: a random orthogonal projector P of rank 8 in 12
    dimensions, random keys and residuals, K_pᵀK_p from random earlier keys (or none)."""
    torch.manual_seed(0)
    dim, ridge = 12, 0.5
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))
    projection = basis[:, :8] @ basis[:, :8].T
    keys = torch.randn(4, dim, dtype=torch.float64)
    residuals = torch.randn(4, 5, dtype=torch.float64)
    earlier_keys = torch.randn(6, dim, dtype=torch.float64)
    earlier = earlier_keys.T @ earlier_keys if with_earlier else None
    left, right = null_space_update(residuals, keys, projection, earlier, ridge)
    update = left @ right
    gram = keys.T @ keys + (earlier if with_earlier else 0)
    lhs = update @ (gram @ projection + ridge * torch.eye(dim, dtype=torch.float64))
    assert torch.allclose(lhs, residuals.T @ keys @ projection, atol=1e-10)
    assert torch.allclose(update @ projection, update, atol=1e-10)


def test_projected_update_leaves_preserved_keys_outputs_unchanged(tiny_gpt2):
    lm = tiny_gpt2
    # At layer 0 (the subject's last token) the unprojected update leaks most into the
    # preserved keys, so this is where the projection has the most to show.
    params = resolve_hparams("alphaedit", lm, {"layers": [0], "fact_token": "subject_last"})
    layer = params.layers[0]
    prefixes = context_prefixes(lm, params)
    seen, _ = lookup_activations(lm, _requests(8), prefixes, params.fact_token, [layer])
    keys = seen[layer].mean(dim=1).double()
    torch.manual_seed(0)
    residuals = torch.randn(len(keys), lm.model.config.hidden_size, dtype=torch.float64)
    projection = null_space_projection(lm, params, layer)
    earlier = torch.zeros_like(projection)
    left, right = null_space_update(residuals, keys, projection, earlier, params.ridge)
    alpha = left @ right
    # With no earlier keys the n × n solve gives the same update.
    left, right = null_space_update(residuals, keys, projection, None, params.ridge)
    assert torch.allclose(left @ right, alpha, atol=1e-10 * alpha.abs().max())
    # The same solve without the projection (P = I), to see what the projection buys.
    left, right = null_space_update(
        residuals, keys, torch.eye(len(projection), dtype=torch.float64), earlier, params.ridge
    )
    unprojected = left @ right
    moment = layer_second_moment(lm, params, layer)

    preserved = _corpus_keys(lm, layer)
    # Every direction ΔW reads lies in range(P), where C's eigenvalues are below t·λ_max, so
    # ‖ΔW K₀‖² ≤ ‖ΔW‖² · N · t·λ_max while ‖K₀‖² = N · tr(C).
    eigenvalues = torch.linalg.eigvalsh(moment)
    bound = (params.nullspace_threshold * eigenvalues.max() / eigenvalues.sum()).sqrt()
    assert torch.allclose(alpha @ projection, alpha, atol=1e-8 * alpha.norm())
    assert _leak(alpha, preserved) <= float(bound)
    assert _leak(alpha, preserved) < 0.1 * _leak(unprojected, preserved)
    # ...and the update still acts on the edited keys.
    assert float((keys @ alpha.T).norm()) > 0.1 * float(residuals.norm())


def test_projection_is_cached_and_an_orthogonal_projector(tiny_gpt2):
    params = resolve_hparams("alphaedit", tiny_gpt2)
    projection = null_space_projection(tiny_gpt2, params, params.layers[0])
    assert null_space_projection(tiny_gpt2, params, params.layers[0]) is projection
    assert torch.allclose(projection @ projection, projection, atol=1e-10)
    assert torch.allclose(projection, projection.T)
    assert 0 < int(torch.trace(projection).round()) < len(projection)


def test_sequential_edits_accumulate_keys_and_spare_earlier_edits(tiny_gpt2):
    lm = tiny_gpt2
    requests, fast = _requests(6), {"v_steps": 20}
    state = AlphaEditState()
    first = kedit.edit(lm, requests[:3], method="alphaedit", hparams=fast, state=state)
    assert state.n_keys == 3 and first.info["earlier_keys"] == 0
    grams = dict(state.grams)
    second = kedit.edit(lm, requests[3:], method="alphaedit", hparams=fast, state=state)
    assert state.n_keys == 6 and second.info["earlier_keys"] == 3
    assert all(not torch.equal(grams[layer], state.grams[layer]) for layer in grams)
    second.undo()
    alone = kedit.edit(lm, requests[3:], method="alphaedit", hparams=fast)
    alone.undo()
    first.undo()

    # ‖ΔW₂ K_p‖² = tr(ΔW₂ K_pᵀK_p ΔW₂ᵀ): the second edit reaches the first edit's keys less when
    # it knows them than when it is computed without the session's state.
    def reach(edit):
        return sum(
            float(torch.trace(d @ grams[layer] @ d.T)) / float(d.norm() ** 2)
            for layer, d in zip(sorted(grams), (_dense(lm, x) for x in edit.deltas), strict=True)
        )

    assert reach(second) < 0.5 * reach(alone)
    state.reset()
    assert (state.n_keys, state.grams) == (0, {})


def test_failed_edit_leaves_state_unchanged(tiny_gpt2, monkeypatch):
    lm = tiny_gpt2
    requests = _requests(2)
    state = AlphaEditState()
    kedit.edit(lm, requests[:1], method="alphaedit", hparams={"v_steps": 2}, state=state).undo()
    saved = {layer: gram.clone() for layer, gram in state.grams.items()}
    before = {name: value.clone() for name, value in lm.model.state_dict().items()}

    def broken(*args):
        left, right = null_space_update(*args)
        return left * float("nan"), right

    monkeypatch.setattr(alphaedit_module, "null_space_update", broken)
    with pytest.raises(FloatingPointError):
        kedit.edit(lm, requests[1:], method="alphaedit", hparams={"v_steps": 2}, state=state)
    assert state.n_keys == 1
    assert all(torch.equal(saved[layer], state.grams[layer]) for layer in saved)
    assert all(torch.equal(before[n], v) for n, v in lm.model.state_dict().items())


def test_state_is_checked(tiny_gpt2):
    request = _requests(1)
    with pytest.raises(ValueError, match="state: method 'rome' keeps no state"):
        kedit.edit(tiny_gpt2, request, method="rome", state=AlphaEditState())
    with pytest.raises(
        ValueError, match="state: method 'alphaedit' expects a state of type AlphaEditState"
    ):
        kedit.edit(tiny_gpt2, request, method="alphaedit", state={})
    stale = AlphaEditState(model_fingerprint="0123456789abcdef")
    with pytest.raises(ValueError, match="state: it holds keys of model 0123456789abcdef"):
        kedit.edit(tiny_gpt2, request, method="alphaedit", state=stale)
    other_layers = AlphaEditState(
        folded={5: torch.zeros(1, 1)}, n_keys=1, model_fingerprint=tiny_gpt2.fingerprint
    )
    with pytest.raises(ValueError, match=r"state: it holds keys of layers \[5\], not of layers"):
        kedit.edit(tiny_gpt2, request, method="alphaedit", state=other_layers)


def test_hparams_validation_and_easyedit_names(tiny_gpt2):
    params = resolve_hparams("alphaedit", tiny_gpt2, {"L2": 3, "mom2_update_weight": 15000})
    assert params.ridge == 3.0
    with pytest.raises(ValueError, match="nullspace_threshold: expected a fraction in"):
        resolve_hparams("alphaedit", tiny_gpt2, {"nullspace_threshold": 2})
    with pytest.raises(ValueError, match="ridge: expected a positive number"):
        resolve_hparams("alphaedit", tiny_gpt2, {"ridge": 0})
    with pytest.raises(ValueError, match="layers: repeated layer"):
        resolve_hparams("alphaedit", tiny_gpt2, {"layers": [1, 1]})
