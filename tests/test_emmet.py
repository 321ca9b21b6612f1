import pytest
import torch
from test_rome import plain_at_edited_token

import kedit
from kedit.eval.runner import summarize
from kedit.methods._locate import context_prefixes, layer_second_moment, optimize_values
from kedit.methods.emmet import EMMETHyperParams, equality_constrained_factor
from kedit.methods.registry import resolve_hparams


def _requests(n):
    from kedit.data import load_requests
    from kedit.zoo import DATA_DIR

    return load_requests(DATA_DIR / "tinyworld_knowedit.json", n=n)


def _moment(dim, seed=0):
    torch.manual_seed(seed)
    samples = torch.randn(dim, 4 * dim, dtype=torch.float64)
    return samples @ samples.T / samples.shape[1]


def test_equality_constrained_update_maps_every_key_to_its_value():
    torch.manual_seed(1)
    w = torch.randn(7, 16, dtype=torch.float64)
    keys, deltas = torch.randn(5, 16, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    right = equality_constrained_factor(keys, torch.linalg.inv(_moment(16)))
    updated = w + deltas.T @ right
    assert torch.allclose(keys @ updated.T, keys @ w.T + deltas, atol=1e-10)
    assert torch.linalg.matrix_rank(deltas.T @ right) == 5


def test_repeated_key_needs_a_ridge_and_the_ridge_makes_a_compromise():
    torch.manual_seed(2)
    key = torch.randn(1, 16, dtype=torch.float64)
    keys = torch.cat([key, key, torch.randn(1, 16, dtype=torch.float64)])
    inverse = torch.linalg.inv(_moment(16))
    with pytest.raises(ValueError, match="ridge: the batch's keys are"):
        equality_constrained_factor(keys, inverse)
    deltas = torch.tensor([[1.0], [3.0], [5.0]], dtype=torch.float64)
    mapped = keys @ (deltas.T @ equality_constrained_factor(keys, inverse, ridge=1e-6)).T
    # Two facts with one key get the mean of their values; the third still holds.
    assert torch.allclose(
        mapped, torch.tensor([[2.0], [2.0], [5.0]], dtype=torch.float64), atol=1e-4
    )


def test_edited_weight_maps_every_key_of_the_batch_to_w_k_plus_its_delta(tiny_gpt2):
    """EMMET's constraints, (W + ΔW) k_i = W k_i + δ_i for every fact of the batch, checked with
    numbers built here: k_i by plain forward passes with a hook, averaged over the context
    prefixes; δ_i from the value optimisation on the unedited model (deterministic, so the δ the
    method finds), never the method's own record. And ΔW moves preserved keys as little as
    possible (min ‖ΔW‖ in the C metric): ΔW C x = 0 for every x orthogonal to all k_i."""
    lm = tiny_gpt2
    params = resolve_hparams("emmet", lm, {"ridge": 0.0})
    requests = _requests(4)
    layer = params.layers[0]
    site = lm.layout.mlp_out_name(layer)
    prefixes = context_prefixes(lm, params)
    keys = torch.stack(
        [plain_at_edited_token(lm, site, prefixes, r, params.fact_token).mean(0) for r in requests]
    )
    found = optimize_values(lm, requests, layer, prefixes, params, [site])
    deltas = torch.stack([f[0].delta.double() for f in found])
    module = lm.model.get_submodule(site)
    unedited = module.weight.detach().double().clone()
    with torch.no_grad():
        values = module(keys.float()).double() + deltas
    with kedit.edit(lm, requests, method="emmet", hparams=params.to_dict()), torch.no_grad():
        mapped = module(keys.float()).double()
        change = module.weight.detach().double() - unedited
    scale = values.norm(dim=1, keepdim=True)
    assert (deltas.norm(dim=1, keepdim=True) > 0.1 * scale).all()
    assert ((mapped - values).abs() <= 1e-4 * scale).all()
    change = change.T if lm.layout.conv1d else change  # (out, in)
    across = change @ layer_second_moment(lm, params, layer)
    basis, _ = torch.linalg.qr(keys.T)  # orthonormal basis of the keys' span
    assert (across - across @ basis @ basis.T).norm() <= 1e-3 * across.norm()


def test_emmet_edit_writes_the_facts_and_undoes_bit_exactly(tiny_gpt2):
    lm = tiny_gpt2
    requests = _requests(4)
    before = {name: value.clone() for name, value in lm.model.state_dict().items()}
    with kedit.edit(lm, requests, method="emmet") as edit:
        assert edit.deltas[0].rank == 4
        scores = kedit.evaluate(lm, requests, edit=edit)
    post = summarize(scores)["post"]["teacher_forced"]
    assert post["reliability"] >= 0.75 and post["locality"] >= 0.8
    assert all(torch.equal(before[n], v) for n, v in lm.model.state_dict().items())


def test_hparams_validation(tiny_gpt2):
    with pytest.raises(ValueError, match="layers: EMMET edits exactly one layer"):
        resolve_hparams("emmet", tiny_gpt2, {"layers": [1, 2]})
    with pytest.raises(ValueError, match="ridge: expected a number >= 0"):
        resolve_hparams("emmet", tiny_gpt2, {"ridge": -1})
    assert isinstance(resolve_hparams("emmet", tiny_gpt2), EMMETHyperParams)
