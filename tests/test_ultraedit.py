import pytest
import torch

import kedit
from kedit.methods.ultraedit import NORM_EPS, UltraEditState

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


def test_the_update_solves_the_ridge_equations_on_lifelong_normalised_features(tiny_gpt2):
    lm = tiny_gpt2
    first, second = _requests(3), _requests(2, start=3)
    state = UltraEditState()
    keys_a, grads_a = _features(lm, first)
    with kedit.edit(lm, first, "ultraedit", PARAMS, state=state):
        keys_b, grads_b = _features(lm, second)
        with kedit.edit(lm, second, "ultraedit", PARAMS, state=state) as edit:
            (delta,) = edit.deltas
            update = delta.tensor().double()  # Conv1D: (in, out), x ↦ x ΔW
    features = torch.cat([torch.cat([keys_a, grads_a], 1), torch.cat([keys_b, grads_b], 1)])
    mean, std = features.mean(0), torch.sqrt(features.var(0) + NORM_EPS)
    normal = (torch.cat([keys_b, grads_b], 1) - mean) / std
    normal_keys, normal_grads = normal.split([keys_b.shape[1], grads_b.shape[1]], 1)
    values = -PARAMS["lr"] * (normal_keys**2).sum(1, keepdim=True) * normal_grads
    lhs = (keys_b.T @ keys_b + PARAMS["ridge"] * torch.eye(keys_b.shape[1], dtype=torch.double)) @ (
        update
    )
    torch.testing.assert_close(lhs, keys_b.T @ values, rtol=2e-3, atol=2e-5)
    assert float(update.norm()) > 0


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
    ],
)
def test_ultraedit_hparams_are_checked(tiny_gpt2, values, message):
    with pytest.raises(ValueError, match=message):
        kedit.edit(tiny_gpt2, _requests(1), "ultraedit", values)
