"""DPO: its loss (eq. 7) against log-probabilities computed here with a plain forward pass, its
gradient at the start, the fixed reference, the requests it refuses, and an edit that works."""

from __future__ import annotations

import math

import pytest
import torch

import kedit
from kedit.data import load_requests
from kedit.methods.dpo import DPOHyperParams, PreferenceObjective
from kedit.requests import EditRequest
from kedit.zoo import DATA_DIR

LAYER = 4
BETA = 0.1


@pytest.fixture(scope="module")
def cases():
    return list(load_requests(DATA_DIR / "tinyworld_knowedit.json", n=4))


def _logp(lm, prompt: str, answer: str) -> torch.Tensor:
    """log π(answer | prompt): the sum of the answer's token log-probabilities after the prompt,
    from one forward pass of the whole model (with the gradient, where the weights take one)."""
    prompt_ids, answer_ids = lm.encode_prompt(prompt), lm.encode(answer)
    ids = torch.tensor([prompt_ids + answer_ids], device=lm.device)
    logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), dim=-1)
    first = len(prompt_ids) - 1
    return sum(logp[first + k, token] for k, token in enumerate(answer_ids))


def _pair(lm, request) -> tuple[float, float]:
    with torch.no_grad():
        return tuple(
            float(_logp(lm, request.text, answer))
            for answer in (request.target_new, request.target_true)
        )


def _hparams(**values) -> DPOHyperParams:
    return DPOHyperParams(**{"layers": [LAYER], "beta": BETA, "lr": 1e-2, **values})


def _weight(lm):
    return lm.model.get_parameter(f"{lm.layout.mlp_out_name(LAYER)}.weight")


def test_the_loss_is_eq_7_of_log_probabilities_computed_here(tiny_gpt2, cases):
    lm, requests = tiny_gpt2, cases[:2]
    reference = [_pair(lm, request) for request in requests]
    objective = PreferenceObjective(lm, requests, _hparams())
    weight = _weight(lm)
    original = weight.detach().clone()
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            weight.add_(0.05 * noise)
            policy = [_pair(lm, request) for request in requests]
            loss = objective(objective.tuning.logits(0), 0).loss.item()
    finally:
        with torch.no_grad():
            weight.copy_(original)
    expected = []
    for (chosen, rejected), (chosen_ref, rejected_ref) in zip(policy, reference, strict=True):
        margin = BETA * ((chosen - chosen_ref) - (rejected - rejected_ref))
        expected.append(-math.log(1 / (1 + math.exp(-margin))))
    assert abs(policy[0][0] - reference[0][0]) > 0.05  # the noise moved the answers
    assert loss == pytest.approx(sum(expected) / 2, rel=1e-4)


def test_at_the_start_the_loss_is_log_2_and_its_gradient_prefers_the_chosen(tiny_gpt2, cases):
    lm, request = tiny_gpt2, cases[0]
    weight = _weight(lm)
    objective = PreferenceObjective(lm, [request], _hparams())
    scored = objective(objective.tuning.logits(0), 0)
    assert scored.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    (grad,) = torch.autograd.grad(scored.loss, weight)
    # d/dθ −log σ(β·Δ) at Δ = 0 is −(β/2)·(∇log π(y_w|x) − ∇log π(y_l|x)).
    chosen, rejected = (
        torch.autograd.grad(_logp(lm, request.text, answer), weight)[0]
        for answer in (request.target_new, request.target_true)
    )
    torch.testing.assert_close(grad, -BETA / 2 * (chosen - rejected), atol=1e-6, rtol=1e-4)
    before = _pair(lm, request)
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.sub_(1e-2 * grad / grad.norm())
            after = _pair(lm, request)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert after[0] > before[0] and after[1] < before[1], (before, after)


def test_the_reference_stays_the_unedited_model(tiny_gpt2, cases):
    """The margins the edit reports are the edited model's log-ratios to the unedited one (a
    reference that followed the training would leave them at 0)."""
    lm, request = tiny_gpt2, cases[1]
    unedited = _pair(lm, request)
    hparams = {"layers": [LAYER], "lr": 1e-2, "steps": 6, "stop_loss": 0.0}
    edit = kedit.edit(lm, request, "dpo", hparams=hparams)
    try:
        edited = _pair(lm, request)
    finally:
        edit.undo()
    margin = BETA * ((edited[0] - unedited[0]) - (edited[1] - unedited[1]))
    assert edit.info["steps"] == 6
    assert edit.info["margins"] == [pytest.approx(margin, rel=1e-3, abs=1e-4)]
    assert margin > 1.0
    assert edit.info["final_loss"] == pytest.approx(math.log1p(math.exp(-margin)), rel=1e-3)


def test_the_edit_makes_the_chosen_answer_the_argmax_and_undoes_bit_exactly(tiny_gpt2, cases):
    lm, request = tiny_gpt2, cases[2]
    before = {name: value.clone() for name, value in lm.model.state_dict().items()}
    prompt, answer = lm.encode_prompt(request.text), lm.encode(request.target_new)

    def chosen_is_argmax() -> bool:
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([prompt + answer])).logits[0]
        return logits[len(prompt) - 1 : -1].argmax(-1).tolist() == answer

    assert not chosen_is_argmax()
    edit = kedit.edit(lm, request, "dpo", hparams={"layers": [LAYER], "lr": 1e-2})
    assert chosen_is_argmax()
    assert edit.info["reached"] == [True] and 0 < edit.info["steps"] < 25
    assert [d.param for d in edit.deltas] == [f"{lm.layout.mlp_out_name(LAYER)}.weight"]
    edit.undo()
    assert all(torch.equal(before[name], value) for name, value in lm.model.state_dict().items())


def test_batches_that_split_the_requests_give_the_same_gradient(tiny_gpt2, cases):
    """A budget of one token puts each request (its chosen and rejected rows together) in a
    batch of its own; the batches' gradients add up to the one batch's."""
    lm, weight = tiny_gpt2, _weight(tiny_gpt2)
    original = weight.detach().clone()
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    gradients = {}
    for budget in (None, 1):
        objective = PreferenceObjective(lm, cases[:3], _hparams(batch_tokens=budget))
        try:
            with torch.no_grad():
                weight.add_(0.05 * noise)  # away from the reference, where the margins are 0
            batches = range(len(objective.tuning.batches))
            loss = sum(objective(objective.tuning.logits(index), index).loss for index in batches)
            gradients[budget] = torch.autograd.grad(loss, weight)[0]
        finally:
            with torch.no_grad():
                weight.copy_(original)
        assert len(batches) == (1 if budget is None else 3)
    assert gradients[None].abs().sum() > 0
    torch.testing.assert_close(gradients[1], gradients[None], atol=1e-7, rtol=1e-4)


def test_a_request_without_a_rejected_answer_is_refused(tiny_gpt2):
    before = {name: value.clone() for name, value in tiny_gpt2.model.state_dict().items()}
    fine = EditRequest(
        prompt="{} lives in", subject="Mira Olsen", target_new=" Oslo", target_true=" Lisbon"
    )
    missing = EditRequest(prompt="{} lives in", subject="Tomas Berg", target_new=" Oslo")
    with pytest.raises(ValueError, match=r"requests\[1\]\.target_true: DPO needs the rejected"):
        kedit.edit(tiny_gpt2, [fine, missing], "dpo")
    same = EditRequest(
        prompt="{} lives in", subject="Mira Olsen", target_new=" Oslo", target_true=" Oslo"
    )
    with pytest.raises(ValueError, match=r"requests\[0\]\.target_true: ' Oslo' is also"):
        kedit.edit(tiny_gpt2, same, "dpo")
    after = tiny_gpt2.model.state_dict()
    assert all(torch.equal(before[name], value) for name, value in after.items())


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"layers": []}, r"layers: expected at least one layer, got \[\]"),
        ({"beta": 0.0}, r"beta: expected a positive number, got 0\.0"),
        ({"lr": -1.0}, r"lr: expected a positive number, got -1\.0"),
        ({"steps": 0}, r"steps: expected a positive integer, got 0"),
        ({"stop_loss": -0.5}, r"stop_loss: expected a number >= 0, got -0\.5"),
        ({"weight_decay": -1.0}, r"weight_decay: expected a number >= 0, got -1\.0"),
        ({"batch_tokens": 0}, r"batch_tokens: expected a positive integer or None, got 0"),
        ({"beta": float("nan")}, r"beta: expected a positive number, got nan"),
        ({"temperature": 1.0}, r"dpo: unknown hyper-parameter 'temperature'"),
    ],
)
def test_bad_hyper_parameters_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        DPOHyperParams.from_dict(values, "dpo")
