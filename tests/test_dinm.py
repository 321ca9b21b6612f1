"""DINM: the toxic layer it locates, its objective (the KL term acts), and what it records."""

from __future__ import annotations

import math

import pytest
import torch

import kedit
from kedit.data import load_requests
from kedit.eval.metrics import locality_agreement
from kedit.eval.protocols import score_teacher_forced
from kedit.methods.dinm import Objective, kl_from_original, locate_toxic_layer
from kedit.requests import EditRequest
from kedit.zoo import DATA_DIR

FAST = {"lr": 1e-2, "steps": 25, "stop_nll": 0.0}


@pytest.fixture(scope="module")
def cases():
    return list(load_requests(DATA_DIR / "tinyworld_knowedit.json", n=4))


def test_kl_from_original_is_the_kl_of_the_weighted_positions():
    original = torch.log(torch.tensor([[1 / 3, 2 / 3], [0.5, 0.5]]))
    logits = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    expected_first = 1 / 3 * math.log((1 / 3) / 0.5) + 2 / 3 * math.log((2 / 3) / 0.5)
    expected_second = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    only_first = kl_from_original(logits, original, torch.tensor([1.0, 0.0]))
    both = kl_from_original(logits, original, torch.tensor([1.0, 1.0]))
    assert only_first.item() == pytest.approx(expected_first, rel=1e-6)
    assert both.item() == pytest.approx((expected_first + expected_second) / 2, rel=1e-6)


def test_the_toxic_layer_is_where_answer_hidden_states_differ_most(tiny_gpt2, cases):
    lm, request = tiny_gpt2, cases[0]
    layer, distances = locate_toxic_layer(lm, request.text, request.target_new, " Mars")
    assert layer == max(range(len(distances)), key=distances.__getitem__)
    # Independently: transformers' hidden states (entry l + 1 is block l's output; the last
    # entry has the final norm applied, so it is left out), each row run without padding.
    prompt = lm.encode_prompt(request.text)
    means = []
    for answer in (request.target_new, " Mars"):
        ids = prompt + lm.encode(answer)
        with torch.no_grad():
            out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        means.append([h[0, len(prompt) :].mean(0) for h in out.hidden_states[1:-1]])
    for block, (safe, unsafe) in enumerate(zip(*means, strict=True)):
        assert distances[block] == pytest.approx(float((safe - unsafe).norm()), rel=1e-4)


def test_objective_nll_is_the_safe_answers_nll_from_a_full_forward(tiny_gpt2, cases):
    lm, request = tiny_gpt2, cases[1]
    objective = Objective(lm, request, layer=3)
    nll, kl = objective.terms()
    prompt, answer = lm.encode_prompt(request.text), lm.encode(request.target_new)
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([prompt + answer])).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[len(prompt) - 1 : -1], torch.tensor(answer))
    assert nll.item() == pytest.approx(expected.item(), rel=1e-5)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)  # unedited: the same distribution


def test_the_kl_term_has_a_gradient_once_the_weights_move(tiny_gpt2, cases):
    lm, request = tiny_gpt2, cases[2]
    layer = 4
    weight = lm.model.get_parameter(f"{lm.layout.mlp_out_name(layer)}.weight")
    objective = Objective(lm, request, layer)
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(
                0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
            )
        _, kl = objective.terms()
        (grad,) = torch.autograd.grad(kl, weight)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert kl.item() > 1e-4
    assert grad.abs().sum().item() > 0


def test_without_the_kl_term_the_constraint_moves_more(tiny_gpt2, cases):
    """Same steps, with and without the KL term: with it, the knowledge-constraint answers'
    distribution stays closer to the unedited one and their teacher-forced argmax tokens are
    kept more often (locality)."""
    lm = tiny_gpt2
    drift, locality = {}, {}
    for kl_factor in (0.0, 10.0):
        kls, kept = [], []
        for request in cases:
            pairs = [(probe.prompt, probe.answer) for probe in request.locality]
            before = [score.predicted for score in score_teacher_forced(lm, pairs)]
            edit = kedit.edit(lm, request, "dinm", hparams={**FAST, "kl_factor": kl_factor})
            after = [score.predicted for score in score_teacher_forced(lm, pairs)]
            kept += [locality_agreement(a, b) for a, b in zip(after, before, strict=True)]
            kls.append(edit.info["requests"][0]["final_kl"])
            edit.undo()
        drift[kl_factor], locality[kl_factor] = sum(kls), sum(kept) / len(kept)
    assert drift[10.0] < 0.5 * drift[0.0], drift
    assert locality[10.0] > locality[0.0], locality


def test_edit_records_the_toxic_layer_and_undoes(tiny_gpt2, cases):
    lm, request = tiny_gpt2, cases[3]
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    located, _ = locate_toxic_layer(lm, request.text, request.target_new, request.target_true)
    edit = kedit.edit(lm, request, "dinm")
    assert edit.info["toxic_layers"] == [located]
    (info,) = edit.info["requests"]
    assert info["unsafe_from"] == "target_true"
    assert info["toxic_layer"] == info["located_layer"] == located
    assert [d.param for d in edit.deltas] == [
        f"{lm.layout.mlp_out_name(info['toxic_layer'])}.weight"
    ]
    edit.undo()
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


def test_without_target_true_the_models_own_answer_stands_in(tiny_gpt2):
    request = EditRequest(prompt="{} lives in", subject="Mira Olsen", target_new=" Oslo")
    edit = kedit.edit(tiny_gpt2, request, "dinm")
    assert edit.info["requests"][0]["unsafe_from"] == "greedy"
    edit.undo()


def test_requests_are_detoxified_one_after_another(tiny_gpt2, cases):
    lm = tiny_gpt2
    edit = kedit.edit(lm, cases[:2], "dinm")
    assert len(edit.deltas) == 2 and len(edit.info["toxic_layers"]) == 2
    after_both = {k: v.clone() for k, v in lm.model.state_dict().items()}
    edit.undo()
    first = kedit.edit(lm, cases[0], "dinm")
    second = kedit.edit(lm, cases[1], "dinm")
    assert all(torch.equal(after_both[k], v) for k, v in lm.model.state_dict().items())
    second.undo()
    first.undo()


@pytest.mark.parametrize(
    ("hparams", "field"),
    [({"layers": [1, 2]}, "layers"), ({"kl_factor": -1.0}, "kl_factor"), ({"steps": 0}, "steps")],
)
def test_bad_hyper_parameters_are_named(tiny_gpt2, cases, hparams, field):
    with pytest.raises(ValueError, match=field):
        kedit.edit(tiny_gpt2, cases[0], "dinm", hparams=hparams)
