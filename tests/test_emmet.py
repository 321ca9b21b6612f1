import pytest
import torch

import kedit
from kedit.edits import Edit, WeightDelta
from kedit.eval.runner import summarize
from kedit.methods._locate import as_param_factors, mlp_out_param
from kedit.methods.emmet import EMMETHyperParams, compute_emmet, equality_constrained_factor
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


def test_edited_weight_maps_every_key_of_the_batch_to_its_value(tiny_gpt2):
    lm = tiny_gpt2
    params = resolve_hparams("emmet", lm, {"ridge": 0.0})
    requests = _requests(4)
    update = compute_emmet(lm, requests, params)
    layer = params.layers[0]
    delta = WeightDelta.low_rank(
        mlp_out_param(lm, layer), *as_param_factors(lm, update.left, update.right)
    )
    module = lm.model.get_submodule(lm.layout.mlp_out_name(layer))
    with Edit(lm, "emmet", params.to_dict(), requests, [delta]).apply(), torch.no_grad():
        mapped = module(update.keys.float()).double()
    scale = update.values.norm(dim=1, keepdim=True)
    assert ((mapped - update.values).abs() <= 1e-4 * scale).all()


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
