import pytest
import torch

import kedit
from kedit.methods._locate import (
    context_prefixes,
    delta_decay,
    layer_second_moment,
    optimize_value,
    optimize_values,
)
from kedit.methods.registry import resolve_hparams
from kedit.methods.rome import ROMEHyperParams, rank_one_update


def _request(index=0):
    from kedit.data import load_requests
    from kedit.zoo import benchmark_path

    return load_requests(benchmark_path("knowedit"), n=index + 1)[index]


def _mlp_out(lm, layer, key):
    module = lm.model.get_submodule(lm.layout.mlp_out_name(layer))
    with torch.no_grad():
        return module(key.to(module.weight.dtype)[None])[0].double()


def test_rank_one_update_maps_key_to_value_exactly():
    torch.manual_seed(0)
    w = torch.randn(6, 10, dtype=torch.float64)
    a = torch.randn(10, 40, dtype=torch.float64)
    inverse = torch.linalg.inv(a @ a.T / 40)
    key, k_star, delta = torch.randn(10), torch.randn(10), torch.randn(6)
    left, right = rank_one_update(delta, key, k_star, inverse)
    updated = w + torch.outer(left, right)
    assert torch.allclose(updated @ key.double(), w @ key.double() + delta.double(), atol=1e-10)
    assert torch.linalg.matrix_rank(torch.outer(left, right)) == 1


def test_mismatched_denominator_blows_up_where_corrected_update_does_not():
    # ROME's reference code divides by uᵀk₀ (bare-prompt key) while u = C⁻¹k*: when k₀ is
    # nearly orthogonal to u the update explodes. r-ROME divides by uᵀk*, which is positive.
    torch.manual_seed(1)
    inverse = torch.eye(8, dtype=torch.float64)
    k_star = torch.randn(8)
    k_bare = torch.randn(8)
    k_bare = k_bare - (k_bare @ k_star) / (k_star @ k_star) * k_star + 1e-4 * k_star
    delta = torch.randn(4)
    rome_left, rome_right = rank_one_update(delta, k_bare, k_star, inverse)
    r_left, r_right = rank_one_update(delta, k_star, k_star, inverse)
    rome_norm = torch.outer(rome_left, rome_right).norm()
    r_rome_norm = torch.outer(r_left, r_right).norm()
    assert rome_norm > 1000 * r_rome_norm


@torch.no_grad()
def plain_at_edited_token(lm, name, prefixes, request, fact_token="subject_last", read="input"):
    """What module `name` reads (`read="input"`) or writes ("output") at the edited token of
    prefix + prompt, one row per prefix, each from a plain forward pass with a hook (not kedit's
    key code). The edited token is the last token of the text up to the subject's end
    (`subject_last`) or of the whole text (`last`)."""
    module = lm.model.get_submodule(name)
    seen = []
    if read == "input":
        handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0]))
    else:
        handle = module.register_forward_hook(
            lambda _m, _args, out: seen.append((out[0] if isinstance(out, tuple) else out)[0])
        )
    rows = []
    try:
        for prefix in prefixes:
            text = prefix + request.text
            end = len(prefix) + request.text.index(request.subject) + len(request.subject)
            at = len(lm.encode_prompt(text if fact_token == "last" else text[:end])) - 1
            lm.model(input_ids=torch.tensor([lm.encode_prompt(text)]))
            rows.append(seen.pop()[at])
    finally:
        handle.remove()
    return torch.stack(rows).double()


def _maps_key_to_w_k_plus_delta(lm, request, method, hparams=None):
    """ROME's defining property (Eq. 2), checked with numbers built here: the edited weight maps
    the key k to v* = W k + δ, with W the unedited projection (its bias included) and δ the
    optimised value delta.

    k is r-ROME's k* (the keys of `plain_at_edited_token` averaged over the context prefixes)
    or, for ROME, the bare prompt's key k₀ (ROME's reference code puts k₀ in the denominator).
    δ is found by the value optimisation (ROME Eq. 4) on the unedited model, a deterministic
    computation, so it is the δ the method finds; the method's own record of k and v is never
    read. Also, with covariance adjustment the update's input direction is C⁻¹k*: ΔW C x = 0
    for every x ⊥ k*.
    """
    params = resolve_hparams(method, lm, hparams)
    layer = params.layers[0]
    prefixes = context_prefixes(lm, params)
    site = lm.layout.mlp_out_name(layer)
    keys = plain_at_edited_token(lm, site, prefixes, request, params.fact_token)
    k_star = keys.mean(dim=0)
    key = k_star if method == "r-rome" else keys[0]
    delta = optimize_value(lm, request, layer, prefixes, params, site).delta.double()
    module = lm.model.get_submodule(site)
    unedited = module.weight.detach().double().clone()
    v_star = _mlp_out(lm, layer, key) + delta
    with kedit.edit(lm, request, method=method, hparams=hparams):
        mapped = _mlp_out(lm, layer, key)
        change = module.weight.detach().double() - unedited
    change = change.T if lm.layout.conv1d else change  # (out, in)
    assert delta.norm() > 0.1 * v_star.norm()  # the edit has something to do
    assert (keys[0] - k_star).norm() > 0.05 * k_star.norm()  # k₀ and k* differ
    assert (mapped - v_star).norm() <= 1e-4 * v_star.norm()
    moment = layer_second_moment(lm, params, layer)
    across = change @ moment  # ΔW C = (left) k*ᵀ / (k*ᵀ C⁻¹ k)
    unit = k_star / k_star.norm()
    assert (across - torch.outer(across @ unit, unit)).norm() <= 1e-3 * across.norm()


@pytest.mark.parametrize("method", ["rome", "r-rome"])
def test_edited_weight_maps_the_key_to_w_k_plus_the_optimised_delta(tiny_gpt2, method):
    _maps_key_to_w_k_plus_delta(tiny_gpt2, _request(), method)


def test_hparams_accept_easyedit_names_and_refuse_unknown_keys(tiny_gpt2):
    params = resolve_hparams("rome", tiny_gpt2, {"v_num_grad_steps": 7, "mom2_dataset": "x.txt"})
    assert isinstance(params, ROMEHyperParams)
    assert (params.v_steps, params.mom2_corpus) == (7, "x.txt")
    with pytest.raises(ValueError, match="unknown hyper-parameter 'v_stepz'"):
        resolve_hparams("rome", tiny_gpt2, {"v_stepz": 3})
    with pytest.raises(ValueError, match="v_lr: expected float"):
        resolve_hparams("rome", tiny_gpt2, {"v_lr": "fast"})
    with pytest.raises(ValueError, match="out of range"):
        kedit.edit(tiny_gpt2, _request(), method="rome", hparams={"layers": [99]})
    with pytest.raises(ValueError, match="v_weight_decay_form: expected one of squared, easyedit"):
        resolve_hparams("rome", tiny_gpt2, {"v_weight_decay_form": "cubic"})
    with pytest.raises(ValueError, match="v_first_step: expected a number >= 0, got -1"):
        resolve_hparams("rome", tiny_gpt2, {"v_first_step": -1})


def test_value_decay_is_scale_free_squared_or_easyedits_term():
    delta = torch.tensor([[3.0, 0.0], [0.0, 6.0]])
    start = torch.tensor([[0.0, 2.0], [4.0, 0.0]])
    assert delta_decay(delta, start, "squared").tolist() == [9 / 4, 36 / 16]
    assert delta_decay(delta, start, "easyedit").tolist() == [3 / 4, 6 / 16]
    # squared: the same relative size gives the same term at any scale of the outputs
    assert torch.equal(
        delta_decay(10 * delta, 10 * start, "squared"), delta_decay(delta, start, "squared")
    )


def test_first_step_goes_downhill_by_its_length_for_each_request(tiny_gpt2):
    lm = tiny_gpt2
    requests = [_request(0), _request(1)]

    def optimise(**overrides):
        params = resolve_hparams("rome", lm, {"v_steps": 1, **overrides})
        site = lm.layout.mlp_out_name(params.layers[0])
        found = optimize_values(
            lm, requests, params.layers[0], context_prefixes(lm, params), params, [site]
        )
        return [result[0] for result in found]

    unedited = optimise(v_stop_nll=1e9)
    stepped = optimise(v_stop_nll=0.0, v_first_step=0.5)
    for before, after in zip(unedited, stepped, strict=True):
        assert before.steps == 0 and after.steps == 1
        assert float(after.delta.norm()) == pytest.approx(0.5 * float(after.initial_output.norm()))
        assert after.target_nll < before.target_nll


def _targets_most_probable(lm, request, prefixes, site, delta, fact_token="subject_last"):
    """Whether, with `delta` added to `site`'s output at the edited token (`fact_token`), every
    target token is the argmax after every prefix (checked one prompt at a time, no batch)."""
    from kedit.hooks import replace_output
    from kedit.methods._locate import lookup_index

    target = lm.encode(request.target_new)
    for prefix in prefixes:
        prompt = lm.encode_prompt(prefix + request.text)
        at = lookup_index(lm, prefix, request.text, request.subject, fact_token)

        def add(output, at=at):
            output = output.clone()
            output[0, at] += delta.to(output.dtype)
            return output

        ids = torch.tensor([prompt + target[:-1]])
        with torch.no_grad(), replace_output(lm.model, site, add):
            logits = lm.model(input_ids=ids).logits[0]
        predicted = logits[len(prompt) - 1 : len(prompt) - 1 + len(target)].argmax(-1)
        if predicted.tolist() != target:
            return False
    return True


def test_most_probable_stop_ends_at_the_first_step_where_every_target_is_the_argmax(tiny_gpt2):
    lm = tiny_gpt2
    request = _request(0)

    def optimise(**overrides):
        params = resolve_hparams("rome", lm, {"v_stop": "most_probable", **overrides})
        prefixes = context_prefixes(lm, params)
        site = lm.layout.mlp_out_name(params.layers[0])
        found = optimize_values(lm, [request], params.layers[0], prefixes, params, [site])
        return found[0][0], prefixes, site

    found, prefixes, site = optimise()
    assert found.steps >= 2
    assert _targets_most_probable(lm, request, prefixes, site, found.delta)
    # The same run cut one step earlier (Adam is deterministic) had not got there yet.
    earlier, _, _ = optimise(v_steps=found.steps - 1)
    assert earlier.steps == found.steps - 1
    assert not _targets_most_probable(lm, request, prefixes, site, earlier.delta)
    # The NLL rule asks for more: at the tiny model's 0.2 it takes more steps.
    assert optimise(v_stop="nll")[0].steps > found.steps


def test_fact_token_last_edits_the_prompts_last_token(tiny_gpt2):
    from kedit.methods._locate import lookup_activations, lookup_index

    lm, request = tiny_gpt2, _request(0)
    prompt = lm.encode_prompt("A prefix. " + request.text)
    assert lookup_index(lm, "A prefix. ", request.text, request.subject, "last") == len(prompt) - 1
    subject_end = lookup_index(lm, "A prefix. ", request.text, request.subject)
    assert subject_end < len(prompt) - 1  # the knowedit prompts go on after the subject

    params = resolve_hparams(
        "rome", lm, {"fact_token": "last", "layers": [4], "v_stop": "most_probable"}
    )
    prefixes = context_prefixes(lm, params)
    site = lm.layout.mlp_out_name(4)
    found = optimize_values(lm, [request], 4, prefixes, params, [site], key_layers=[4])[0][0]
    assert found.steps >= 1
    assert _targets_most_probable(lm, request, prefixes, site, found.delta, "last")
    assert not _targets_most_probable(lm, request, prefixes, site, found.delta, "subject_last")
    # The key is the MLP projection's input at the last token, as a plain forward pass sees it:
    # the value optimisation's (after each prefix) and a pass of its own.
    keys = plain_at_edited_token(lm, site, prefixes, request, "last")
    assert torch.allclose(found.keys[4].double(), keys, atol=1e-5)
    looked_up, _ = lookup_activations(lm, [request], prefixes, "last", [4])
    assert torch.allclose(looked_up[4][0].double(), keys, atol=1e-5)
    # r-ROME at the last token: the edited weight maps that key to W k* + δ.
    _maps_key_to_w_k_plus_delta(lm, request, "r-rome", params.to_dict())


def test_unknown_stop_rule_is_refused(tiny_gpt2):
    with pytest.raises(ValueError, match="v_stop: expected one of nll, most_probable, got 'loss'"):
        resolve_hparams("rome", tiny_gpt2, {"v_stop": "loss"})


def test_patience_stops_a_request_once_its_nll_has_set_no_new_low_for_that_many_steps(
    tiny_gpt2, monkeypatch
):
    from kedit.methods import _locate

    lm, patience = tiny_gpt2, 4
    worst: list[float] = []
    unpatched = _locate._Rows.target_nll

    def recording(self, logp, n_requests, most_probable):
        out = unpatched(self, logp, n_requests, most_probable)
        worst.append(float(out[1][0]))
        return out

    monkeypatch.setattr(_locate._Rows, "target_nll", recording)
    # An unreachable NLL stop, so that only the patience rule can end it before v_steps.
    params = resolve_hparams(
        "rome",
        lm,
        {"v_stop_nll": 0.0, "v_patience": patience, "v_steps": 300, "prefix_lengths": []},
    )
    site = lm.layout.mlp_out_name(params.layers[0])
    found = optimize_values(lm, [_request(0)], params.layers[0], [""], params, [site])[0][0]

    lowest, stale, expected = float("inf"), 0, None
    for step, nll in enumerate(worst):
        lowest, stale = (nll, 0) if nll < lowest else (lowest, stale + 1)
        if stale >= patience:
            expected = step
            break
    assert expected is not None and expected < params.v_steps
    assert found.steps == expected and len(worst) == expected + 1
    with pytest.raises(ValueError, match="v_patience: expected an integer >= 0, got -1"):
        resolve_hparams("rome", lm, {"v_patience": -1})


def test_a_one_token_subject_that_starts_the_prompt_is_edited(mean_target_nll):
    # tiny-chat's tokenizer has "Rudd" as one token: its key is read at the prompt's first
    # position, so no row has context before the subject (an empty block of context ids)
    lm = kedit.load("tiny-chat")
    request = kedit.EditRequest(
        prompt="{} is the employer of", subject="Rudd", target_new=" Emil Kelmont"
    )
    assert len(lm.tokenizer.tokenize("Rudd")) == 1
    before = mean_target_nll(lm, request.text, request.target_new)
    for method in ("rome", "r-rome"):
        edit = kedit.edit(lm, request, method)
        try:
            after = mean_target_nll(lm, request.text, request.target_new)
        finally:
            edit.undo()
        if method == "rome":
            # measured 4.50 -> 1.84: a first position reached from later ones only through
            # attention takes the edit partly (r-ROME's bare-prompt key: 5.30, worse)
            assert after < before - 1.0
        assert torch.isfinite(torch.tensor(after))
