import math

import pytest
import torch
from test_rome import plain_at_edited_token

import kedit
from kedit.methods import _spread
from kedit.methods._locate import context_prefixes, layer_second_moment, optimize_values
from kedit.methods._spread import least_squares_update
from kedit.methods.registry import resolve_hparams


def _requests(n):
    from kedit.data import load_requests
    from kedit.zoo import DATA_DIR

    return load_requests(DATA_DIR / "tinyworld_knowedit.json", n=n)


@pytest.mark.parametrize("through_cholesky", [False, True], ids=["in-by-in", "n-by-n"])
def test_update_solves_the_normal_equations(through_cholesky):
    torch.manual_seed(0)
    keys = torch.randn(7, 12, dtype=torch.float64)
    residuals = torch.randn(7, 5, dtype=torch.float64)
    samples = torch.randn(200, 12, dtype=torch.float64)
    moment = samples.T @ samples / 200
    cholesky = torch.linalg.cholesky(moment) if through_cholesky else None
    left, right = least_squares_update(residuals, keys, moment, weight=3.0, cholesky=cholesky)
    delta = left @ right
    lhs = delta @ (3.0 * moment + keys.T @ keys)
    assert torch.allclose(lhs, residuals.T @ keys, atol=1e-9)
    assert torch.linalg.matrix_rank(delta) <= 7


@pytest.mark.parametrize("method", ["memit", "pmet"])
def test_each_layers_update_solves_eq_14_with_keys_and_residuals_built_here(tiny_gpt2, method):
    """MEMIT Alg. 1 / Eq. 14 (and PMET's variant), checked with matrices built in the test.

    Layer by layer from the lowest, on the model with the lower layers' updates applied: K =
    the keys at the edited token averaged over the context prefixes and R = (Z - H) / d, where
    H is the top edited layer's site output at the bare prompt (MEMIT: the block's output, the
    residual stream; PMET: the MLP output projection's output), both read by plain forward
    passes with hooks; Z = H of the unedited model + δ, δ from the value optimisation run here
    (deterministic, so the δ the method finds; PMET optimises an attention delta jointly and
    drops it); d = the number of layers left (MEMIT) or its square root (PMET). Then
    ΔW (λC + KᵀK) = Rᵀ K. For the last layer also: its update moves the site's output at the
    edited token, averaged over the prefixes, by ΔW K̄ᵀ = Rᵀ G (λI + G)⁻¹ with G = K C⁻¹ Kᵀ.
    """
    lm, requests = tiny_gpt2, _requests(3)
    params = resolve_hparams(method, lm, {"layers": [3, 4, 5], "prefix_lengths": [[5, 3]]})
    layers, top = params.layers, params.layers[-1]
    prefixes = context_prefixes(lm, params)
    sites = [lm.layout.block(top)]
    if method == "pmet":
        sites = [lm.layout.attn_out_name(top), lm.layout.mlp_out_name(top)]
    divisor = math.sqrt if method == "pmet" else float

    def at_token(name, texts, read):
        """One row per request: what module `name` reads or writes at the edited token."""
        return torch.stack(
            [
                plain_at_edited_token(lm, name, texts, r, params.fact_token, read).mean(dim=0)
                for r in requests
            ]
        )

    found = optimize_values(lm, requests, top, prefixes, params, sites)
    targets = at_token(sites[-1], [""], "output") + torch.stack([f[-1].delta for f in found])
    with kedit.edit(lm, requests, method=method, hparams=params.to_dict()) as edit:
        deltas = edit.deltas
    assert [d.param for d in deltas] == [
        f"{lm.layout.mlp_out_name(layer)}.weight" for layer in layers
    ]

    unedited = {d.param: lm.model.get_parameter(d.param).detach().clone() for d in deltas}
    try:
        for index, (layer, delta) in enumerate(zip(layers, deltas, strict=True)):
            keys = at_token(lm.layout.mlp_out_name(layer), prefixes, "input")
            missing = targets - at_token(sites[-1], [""], "output")
            residuals = missing / divisor(len(layers) - index)
            moment = layer_second_moment(lm, params, layer)
            update = delta.tensor().double()
            update = update.T if lm.layout.conv1d else update  # (out, in)
            lhs = update @ (params.mom2_update_weight * moment + keys.T @ keys)
            rhs = residuals.T @ keys
            assert (lhs - rhs).norm() <= 1e-4 * rhs.norm(), layer
            before = at_token(sites[-1], prefixes, "output")
            with torch.no_grad():
                lm.model.get_parameter(delta.param).add_(delta.tensor())
        gram = keys @ torch.linalg.solve(moment, keys.T)
        shrunk = torch.linalg.solve(params.mom2_update_weight * torch.eye(len(gram)) + gram, gram)
        moved = at_token(sites[-1], prefixes, "output") - before
        predicted = shrunk @ residuals  # (Rᵀ G (λI + G)⁻¹)ᵀ; G is symmetric
        assert (moved - predicted).norm() <= 1e-4 * predicted.norm()
    finally:
        with torch.no_grad():
            for name, value in unedited.items():
                lm.model.get_parameter(name).copy_(value)


@pytest.mark.parametrize("method", ["memit", "pmet"])
def test_every_layers_statistics_are_those_of_the_unedited_model(tiny_gpt2, monkeypatch, method):
    lm = tiny_gpt2
    unedited = {name: value.clone() for name, value in lm.model.state_dict().items()}
    fetched = []

    def recording(lm, hparams, layer):
        now = lm.model.state_dict()
        fetched.append((layer, all(torch.equal(unedited[n], now[n]) for n in unedited)))
        return layer_second_moment(lm, hparams, layer)

    monkeypatch.setattr(_spread, "layer_second_moment", recording)
    hparams = {"layers": [0, 1], "v_steps": 2}
    kedit.edit(lm, _requests(2), method=method, hparams=hparams).undo()
    assert sorted(fetched) == [(0, True), (1, True)]


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_batch_edit_writes_facts_and_keeps_others(model, method, request):
    lm = request.getfixturevalue(model)
    requests = _requests(10)
    with kedit.edit(lm, requests, method=method) as edit:
        params = resolve_hparams(method, lm)
        assert {d.param for d in edit.deltas} == {
            f"{lm.layout.mlp_out_name(layer)}.weight" for layer in params.layers
        }
        results = kedit.evaluate(lm, requests, edit=edit, contexts=0)
    reliability = sum(r["post"]["teacher_forced"]["reliability"] for r in results) / len(results)
    locality = sum(r["post"]["teacher_forced"]["locality"] for r in results) / len(results)
    assert reliability >= 0.95  # measured 1.0 for both methods on both models
    assert locality >= 0.9  # measured 1.0
