import pytest
import torch

import kedit
from kedit.methods._locate import layer_second_moment
from kedit.methods.registry import resolve_hparams
from kedit.methods.ultraedit import NORM_EPS, UltraEditHyperParams, UltraEditState

PATH = "transformer.h.5.mlp.c_proj"
PARAMS = {"layers": [5], "lr": 3e-3, "ridge": 1.0}


def _requests(n, start=0):
    from kedit.data import load_requests
    from kedit.zoo import DATA_DIR

    return load_requests(DATA_DIR / "tinyworld_knowedit.json", n=start + n)[start:]


def test_lifelong_statistics_are_those_of_every_feature_seen_so_far():
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 4, generator=generator) * 3 + 1 for n in (1, 5, 3, 7)]
    state = UltraEditState()
    for index, batch in enumerate(batches):
        state.update({"m": state.merged("m", batch)})
        seen = torch.cat(batches[: index + 1]).double()
        stats = state.statistics["m"]
        assert float(stats["count"]) == len(seen)
        torch.testing.assert_close(stats["mean"], seen.mean(0))
        if len(seen) > 1:
            torch.testing.assert_close(stats["m2"] / (len(seen) - 1), seen.var(0))


def _features(lm, requests):
    """The module's inputs and the gradients of Σ_requests mean target NLL w.r.t. its outputs at
    every token of each prompt + target, one request at a time, through plain autograd."""
    keys, grads, seen = [], [], {}
    module = lm.model.get_submodule(PATH)

    def hook(module, args, output):
        seen["input"] = args[0].detach()
        output.retain_grad()
        seen["output"] = output

    for request in requests:
        prompt, target = lm.encode_prompt(request.text), lm.encode(request.target_new)

        handle = module.register_forward_hook(hook)
        try:
            logits = lm.model(input_ids=torch.tensor([prompt + target[:-1]])).logits[0]
        finally:
            handle.remove()
        logp = torch.log_softmax(logits[len(prompt) - 1 :], dim=-1)
        nll = -logp[torch.arange(len(target)), torch.tensor(target)].mean()
        nll.backward()
        keys.append(seen["input"][0])
        grads.append(seen["output"].grad[0])
    lm.model.zero_grad(set_to_none=True)
    return torch.cat(keys).double(), torch.cat(grads).double()


def _values(seen: list[torch.Tensor], keys: torch.Tensor, grads: torch.Tensor, lr: float):
    """V = −η ‖k̂‖² ĝ of a batch, normalised with the statistics of every feature row seen."""
    features = torch.cat(seen)
    mean, std = features.mean(0), torch.sqrt(features.var(0) + NORM_EPS)
    normal = (torch.cat([keys, grads], 1) - mean) / std
    normal_keys, normal_grads = normal.split([keys.shape[1], grads.shape[1]], 1)
    return -lr * (normal_keys**2).sum(1, keepdim=True) * normal_grads


def _two_batches(lm, params):
    """Edit two batches in sequence; the test's own keys and gradients of both (each on the
    model as its edit finds it) and the second edit's update (Conv1D: in × out)."""
    first, second = _requests(3), _requests(2, start=3)
    state = UltraEditState()
    keys_a, grads_a = _features(lm, first)
    with kedit.edit(lm, first, "ultraedit", params, state=state):
        keys_b, grads_b = _features(lm, second)
        with kedit.edit(lm, second, "ultraedit", params, state=state) as edit:
            (delta,) = edit.deltas
            update = delta.tensor().double()  # Conv1D: (in, out), x ↦ x ΔW
    return (keys_a, grads_a), (keys_b, grads_b), update


def test_the_update_solves_the_ridge_equations_on_lifelong_normalised_features(tiny_gpt2):
    (keys_a, grads_a), (keys_b, grads_b), update = _two_batches(tiny_gpt2, PARAMS)
    seen = [torch.cat([keys_a, grads_a], 1), torch.cat([keys_b, grads_b], 1)]
    values = _values(seen, keys_b, grads_b, PARAMS["lr"])
    lhs = (keys_b.T @ keys_b + PARAMS["ridge"] * torch.eye(keys_b.shape[1], dtype=torch.double)) @ (
        update
    )
    torch.testing.assert_close(lhs, keys_b.T @ values, rtol=2e-3, atol=2e-5)
    assert float(update.norm()) > 0


def test_preserve_and_keep_earlier_solve_the_stacked_least_squares(tiny_gpt2):
    """With μ and ν, ΔW = argmin ‖K ΔW − V‖² + λ‖ΔW‖² + μ tr(ΔWᵀ C ΔW) + ν ‖K_a ΔW‖²: the
    least-squares solution of the rows [K; √λ I; √μ Rᵀ; √ν K_a] against [V; 0; 0; 0], where
    C = R Rᵀ and K_a are the first batch's keys."""
    params = {**PARAMS, "preserve": 100.0, "keep_earlier": 1.0}
    (keys_a, grads_a), (keys_b, grads_b), update = _two_batches(tiny_gpt2, params)
    seen = [torch.cat([keys_a, grads_a], 1), torch.cat([keys_b, grads_b], 1)]
    values = _values(seen, keys_b, grads_b, params["lr"])
    hparams = resolve_hparams("ultraedit", tiny_gpt2, params)
    root = torch.linalg.cholesky(layer_second_moment(tiny_gpt2, hparams, 5).double().cpu())
    width = keys_b.shape[1]
    plain_rows = [keys_b, params["ridge"] ** 0.5 * torch.eye(width, dtype=torch.double)]
    rows = plain_rows + [params["preserve"] ** 0.5 * root.T, params["keep_earlier"] ** 0.5 * keys_a]
    zeros = torch.zeros(sum(len(r) for r in rows) - len(keys_b), values.shape[1]).double()
    expected = torch.linalg.lstsq(torch.cat(rows), torch.cat([values, zeros])).solution
    plain = torch.linalg.lstsq(torch.cat(plain_rows), torch.cat([values, zeros[:width]])).solution
    error = float((update - expected).norm() / expected.norm())
    assert error < 1e-4
    assert float((plain - expected).norm() / expected.norm()) > 10 * error


def test_the_protecting_terms_are_off_by_default(tiny_gpt2):
    params = resolve_hparams("ultraedit", tiny_gpt2)
    assert params.preserve == UltraEditHyperParams.preserve == 0
    assert params.keep_earlier == UltraEditHyperParams.keep_earlier == 0
    state = UltraEditState()
    with kedit.edit(tiny_gpt2, _requests(3), "ultraedit", PARAMS, state=state) as edit:
        assert "statistics" not in edit.info  # C was not read
        assert state.grams == {} and PATH in state.statistics


def test_keep_earlier_keys_are_saved_restored_and_reset_with_the_statistics(tiny_gpt2, tmp_path):
    """The state holds K_aᵀK_a + K_bᵀK_b of the edited batches; `save_state`/`load_state` bring
    it back (the next edit is then bit-identical), and undo forgets it with the statistics."""
    params = {**PARAMS, "keep_earlier": 1.0}
    batches = [_requests(3), _requests(2, start=3), _requests(2, start=5)]
    session = kedit.Session(tiny_gpt2, "ultraedit", params)
    keys = []
    for batch in batches[:2]:
        keys.append(_features(tiny_gpt2, batch)[0])
        session.edit(batch)
    gram = sum(k.T @ k for k in keys)
    torch.testing.assert_close(session.state.grams[PATH].cpu(), gram, rtol=1e-4, atol=1e-6)
    session.save_state(tmp_path / "state.pt")
    after = session.edit(batches[2])
    third = after.deltas[0].tensor().clone()
    after.undo()
    session.reset_state()
    assert session.state.grams == {} and session.state.statistics == {}
    session.load_state(tmp_path / "state.pt")
    torch.testing.assert_close(session.state.grams[PATH].cpu(), gram, rtol=1e-4, atol=1e-6)
    again = session.edit(batches[2])
    assert torch.equal(again.deltas[0].tensor(), third)
    session.undo()
    assert session.state.grams == {} and session.state.statistics == {}


def test_a_first_edit_of_one_row_normalises_it_to_zero_and_changes_nothing(tiny_gpt2):
    (request,) = _requests(1)
    assert len(tiny_gpt2.encode(request.target_new)) == 1
    with kedit.edit(tiny_gpt2, request, "ultraedit", {**PARAMS, "token": "ans"}) as edit:
        assert edit.info["rows"] == 1
        assert float(edit.deltas[0].tensor().abs().max()) == 0.0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"token": "all"}, "token: expected one of mask, ans, got 'all'"),
        ({"ridge": 0}, "ridge: expected a positive number, got 0"),
        ({"module": "mlp"}, "module: expected one of mlp_in, mlp_out, attn_out, got 'mlp'"),
        ({"preserve": -1}, "preserve: expected a finite number >= 0, got -1.0"),
        ({"keep_earlier": float("nan")}, "keep_earlier: expected a finite number >= 0, got nan"),
        (
            {"module": "attn_out", "preserve": 10},
            "preserve: the second moment is that of mlp_out's keys; expected 0 with module "
            "'attn_out', got 10.0",
        ),
    ],
)
def test_ultraedit_hparams_are_checked(tiny_gpt2, values, message):
    with pytest.raises(ValueError, match=message):
        kedit.edit(tiny_gpt2, _requests(1), "ultraedit", values)
