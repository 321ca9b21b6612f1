import pytest
import torch

import kedit
from kedit.methods.memit import least_squares_update
from kedit.methods.registry import resolve_hparams


def _requests(n):
    from kedit.data import load_requests
    from kedit.zoo import DATA_DIR

    return load_requests(DATA_DIR / "tinyworld_knowedit.json", n=n)


def test_update_solves_the_normal_equations():
    torch.manual_seed(0)
    keys = torch.randn(7, 12, dtype=torch.float64)
    residuals = torch.randn(7, 5, dtype=torch.float64)
    samples = torch.randn(200, 12, dtype=torch.float64)
    moment = samples.T @ samples / 200
    left, right = least_squares_update(residuals, keys, moment, weight=3.0)
    delta = left @ right
    lhs = delta @ (3.0 * moment + keys.T @ keys)
    assert torch.allclose(lhs, residuals.T @ keys, atol=1e-9)
    assert torch.linalg.matrix_rank(delta) <= 7


@pytest.mark.xfail(
    reason="MEMIT's tiny-model defaults are not tuned for the retrained models: a colleague "
    "measured reliability 0.0 with layers [1, 2]; layers [0, 1], lambda 100 gave 0.85 / 0.67",
    strict=False,
)
def test_memit_batch_edit_writes_facts_and_keeps_others(tiny_gpt2):
    requests = _requests(10)
    with kedit.edit(tiny_gpt2, requests, method="memit") as edit:
        params = resolve_hparams("memit", tiny_gpt2)
        assert {d.param for d in edit.deltas} == {
            f"{tiny_gpt2.layout.mlp_out_name(layer)}.weight" for layer in params.layers
        }
        results = kedit.evaluate(tiny_gpt2, requests, edit=edit, contexts=0)
    reliability = sum(r["post"]["teacher_forced"]["reliability"] for r in results) / len(results)
    locality = sum(r["post"]["teacher_forced"]["locality"] for r in results) / len(results)
    assert reliability >= 0.9
    assert locality >= 0.85
