"""The contract every registered unlearning method keeps, on both narrow bundled models.

It runs for each name in `list_unlearning_methods()` (their own registry: they take forget and
retain sets, not EditRequests, so tests/test_contract.py does not run them):

1. forgetting: at the method's defaults for the model, the forget items' mean token accuracy
   (teacher-forced) falls from 1 to at most FORGET_CEILING;
2. undo restores every tensor of `state_dict()` bit-exactly, also over repeated apply/undo;
3. save, a fresh load of the model, apply: the unlearned weights bit for bit; the other model
   refuses the file;
4. an exception inside the optimisation, or a non-finite loss, leaves the model as it was:
   every tensor, every module (no adapter left), every `requires_grad` flag, no gradient;
5. the same clauses with LoRA adapters (`lora_rank`), whose edit is low-rank.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import kedit
from kedit.edits import ModelMismatchError
from kedit.unlearn import _train
from kedit.unlearn.registry import get_unlearning_method, list_unlearning_methods
from kedit.zoo import build_world
from kedit.zoo.forget_task import PRIVATE_RELATIONS, PUBLIC_RELATIONS
from kedit.zoo.world import PERSON_RELATIONS

MODELS = ("tiny-gpt2", "tiny-llama")
FORGET_CEILING = 0.25
LORA = {"lora_rank": 4}


def _facts(world, person, relations):
    return [
        (template.format(person), world.answer(person, relation))
        for relation in relations
        for template in world.templates(person, relation, "train")
    ]


@pytest.fixture(scope="module")
def task():
    """One person's private facts to forget; their public facts and two others' to keep."""
    world = build_world()
    person, *others = world.people[7:10]
    forget = _facts(world, person, PRIVATE_RELATIONS)
    retain = _facts(world, person, PUBLIC_RELATIONS)
    retain += [fact for other in others for fact in _facts(world, other, PERSON_RELATIONS)]
    return forget, retain


@pytest.fixture(scope="module")
def lms(tiny_gpt2, tiny_llama):
    return {"tiny-gpt2": tiny_gpt2, "tiny-llama": tiny_llama}


def _snapshot(lm) -> dict:
    model = lm.model
    return {
        "weights": {name: value.clone() for name, value in model.state_dict().items()},
        "modules": [(name, type(module)) for name, module in model.named_modules()],
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
    }


def _assert_as_before(lm, before: dict) -> None:
    model = lm.model
    after = model.state_dict()
    assert after.keys() == before["weights"].keys()
    assert [n for n in after if not torch.equal(after[n], before["weights"][n])] == []
    assert [(n, type(m)) for n, m in model.named_modules()] == before["modules"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before["requires_grad"]
    assert all(p.grad is None for p in model.parameters())


@torch.no_grad()
def _forget_accuracy(lm, items) -> float:
    shares = []
    for prompt, answer in items:
        prompt_ids, answer_ids = lm.encode_prompt(prompt), lm.encode(answer)
        ids = torch.tensor([prompt_ids + answer_ids], device=lm.device)
        logits = lm.model(input_ids=ids).logits[0]
        predicted = logits[len(prompt_ids) - 1 : len(prompt_ids) + len(answer_ids) - 1].argmax(-1)
        shares.append(
            sum(p == a for p, a in zip(predicted.tolist(), answer_ids, strict=True))
            / len(answer_ids)
        )
    return sum(shares) / len(shares)


@pytest.fixture(scope="module")
def runs(lms, task, tmp_path_factory) -> Iterator:
    """`get(method, model, lora)`: one unlearning at the defaults, checked and saved while
    applied, then undone; made on first use."""
    made = {}
    folder = tmp_path_factory.mktemp("unlearn-contract")

    def get(method: str, model: str, lora: bool = False):
        key = (method, model, lora)
        if key not in made:
            lm = lms[model]
            before = _snapshot(lm)
            forget, retain = task
            assert _forget_accuracy(lm, forget) == 1.0
            edit = kedit.unlearn(lm, forget, retain, method, hparams=LORA if lora else None)
            accuracy = _forget_accuracy(lm, forget)
            edited = {name: value.clone() for name, value in lm.model.state_dict().items()}
            saved = edit.save(folder / f"{method}-{model}-{lora}.kedit")
            edit.undo()
            made[key] = dict(
                edit=edit, before=before, accuracy=accuracy, edited=edited, saved=saved
            )
        return made[key]

    yield get
    made.clear()


def _pairs(lora_methods: tuple[str, ...] | None = None) -> list:
    methods = lora_methods or list_unlearning_methods()
    return [pytest.param(m, model, id=f"{m}-{model}") for m in methods for model in MODELS]


LORA_METHODS = ("grad_diff", "npo", "memflex", "rmu")


@pytest.mark.parametrize(("method", "model"), _pairs())
def test_unlearning_forgets(runs, method, model):
    run = runs(method, model)
    assert run["accuracy"] <= FORGET_CEILING, (
        f"{method} on {model}: forget accuracy {run['accuracy']:.3f} after "
        f"{run['edit'].info['steps']} steps (ceiling {FORGET_CEILING})"
    )


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize(("method", "model"), _pairs())
def test_undo_restores_every_tensor_bit_exactly(runs, lms, method, model, lora):
    if lora and method not in LORA_METHODS:
        pytest.skip("LoRA clauses run for " + ", ".join(LORA_METHODS))
    run = runs(method, model, lora)
    lm = lms[model]
    changed = [
        n for n in run["edited"] if not torch.equal(run["edited"][n], run["before"]["weights"][n])
    ]
    assert changed, "the unlearning changed nothing"
    _assert_as_before(lm, run["before"])
    for _ in range(5):
        run["edit"].apply()
        assert all(torch.equal(lm.model.state_dict()[n], run["edited"][n]) for n in changed)
        run["edit"].undo()
        _assert_as_before(lm, run["before"])
    if lora:
        assert all(delta.rank == LORA["lora_rank"] for delta in run["edit"].deltas)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize(("method", "model"), _pairs())
def test_a_saved_unlearning_reapplies_bit_exactly_to_a_fresh_load_only(
    runs, lms, method, model, lora
):
    if lora and method not in LORA_METHODS:
        pytest.skip("LoRA clauses run for " + ", ".join(LORA_METHODS))
    run = runs(method, model, lora)
    fresh = kedit.load(model)
    again = kedit.apply(fresh, run["saved"])
    assert again.method == get_unlearning_method(method).name
    state = fresh.model.state_dict()
    assert all(torch.equal(state[n], run["edited"][n]) for n in run["edited"])
    again.undo()
    other = lms[next(name for name in MODELS if name != model)]
    untouched = _snapshot(other)
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        kedit.apply(other, run["saved"])
    _assert_as_before(other, untouched)


class InjectedFailure(RuntimeError):
    """Raised by the contract inside an unlearning run."""


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize(("method", "model"), _pairs())
def test_a_failure_leaves_the_model_as_it_was(lms, task, monkeypatch, method, model, lora):
    if lora and method not in LORA_METHODS:
        pytest.skip("LoRA clauses run for " + ", ".join(LORA_METHODS))
    lm = lms[model]
    before = _snapshot(lm)
    forget, retain = task
    hparams = {**(LORA if lora else {}), "stop_forget_acc": None, "steps": 4}
    # Every loss reads the model through the step's log-probabilities or activations.
    originals = {name: getattr(_train.Step, name) for name in ("logprobs", "activations")}

    def failing(original):
        def patched(self, *args):
            if self.number == 2:
                raise InjectedFailure("inside the optimisation")
            return original(self, *args)

        return patched

    def not_finite(original):
        def patched(self, *args):
            value = original(self, *args)
            return value * float("nan") if self.number == 2 else value

        return patched

    for patch, error in ((failing, InjectedFailure), (not_finite, FloatingPointError)):
        for name, original in originals.items():
            monkeypatch.setattr(_train.Step, name, patch(original))
        with pytest.raises(error):
            kedit.unlearn(lm, forget, retain, method, hparams=hparams)
        _assert_as_before(lm, before)
