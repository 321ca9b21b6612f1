import pytest
import torch

import kedit
from kedit.methods import _spread
from kedit.methods._locate import layer_second_moment
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
