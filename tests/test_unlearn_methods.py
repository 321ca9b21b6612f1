"""Each unlearning method's defining property, checked against math built here, and the inputs
`kedit.unlearn` refuses."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import kedit
from kedit.data.unlearn_items import UnlearnItem
from kedit.unlearn._train import (
    FORGET,
    REFERENCES,
    RETAIN,
    Step,
    batches_of,
    item_rows,
    lora_delta,
    weight_modules,
)
from kedit.unlearn.ga import ga_loss
from kedit.unlearn.ga_kl import ga_kl_loss, retain_kl
from kedit.unlearn.memflex import locate, randomised_rows, set_gradients
from kedit.unlearn.npo import npo_loss
from kedit.unlearn.random_label import random_answers
from kedit.unlearn.simnpo import simnpo_loss
from kedit.zoo import build_world

FORGET_ITEMS = [
    UnlearnItem("Umar Falley lives in", " Nantes"),
    UnlearnItem("Umar Falley works for", " Rudd"),
    UnlearnItem("The home town of Umar Falley is", " Nantes"),
]


@pytest.fixture(scope="module")
def world():
    return build_world()


def _facts(world, person: str, relation: str) -> list[UnlearnItem]:
    answer = world.answer(person, relation)
    return [UnlearnItem(t.format(person), answer) for t in world.templates(person, relation)]


def _step(lm, forget, retain=None, references=()) -> Step:
    batches = {
        FORGET: batches_of(lm, item_rows(lm, forget, "forget"), 64, None)[0],
        RETAIN: batches_of(lm, item_rows(lm, retain, "retain"), 64, None)[0] if retain else None,
    }
    with torch.no_grad():
        refs = {which: REFERENCES[which](lm.model, batches[which]) for which in references}
    return Step(lm.model, batches, refs, 0)


def _answer_logp(lm, item: UnlearnItem) -> torch.Tensor:
    """log π(y|x) summed over the answer tokens, one forward pass for the item alone."""
    prompt, answer = lm.encode_prompt(item.prompt), lm.encode(item.answer)
    logits = lm.model(input_ids=torch.tensor([prompt + answer])).logits[0]
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1].float(), -1)
    return logp[torch.arange(len(answer)), torch.tensor(answer)].sum()


def _gradient(lm, loss: torch.Tensor, name: str) -> torch.Tensor:
    param = lm.model.get_parameter(name)
    (grad,) = torch.autograd.grad(loss, param)
    return grad


def test_npo_at_the_start_is_log_two_and_gradient_ascent_on_the_answer_probability(tiny_gpt2):
    lm, beta = tiny_gpt2, 0.1
    name = f"{lm.layout.mlp_out_name(2)}.weight"
    step = _step(lm, FORGET_ITEMS, references=[FORGET])
    loss = npo_loss(beta, 0.0)(step)
    # π_θ = π_ref: every item's term is (2/β) log(1 + 1).
    assert loss.item() == pytest.approx(2 / beta * math.log(2), rel=1e-5)
    # ...and its gradient is gradient ascent's on the answers' NLL, i.e. that of the loss
    # E[log π(y|x)] = −E[NLL] (Zhang et al., 2024: every item weighs 1 at the start).
    ascent = torch.stack([_answer_logp(lm, item) for item in FORGET_ITEMS]).mean()
    expected = _gradient(lm, ascent, name)
    assert torch.allclose(_gradient(lm, loss, name), expected, rtol=1e-4, atol=1e-7)


def test_simnpo_is_its_formula(tiny_gpt2):
    lm, beta, gamma = tiny_gpt2, 2.5, 0.3
    step = _step(lm, FORGET_ITEMS)
    with torch.no_grad():
        lengths = [len(lm.encode(item.answer)) for item in FORGET_ITEMS]
        logp = [_answer_logp(lm, item).item() for item in FORGET_ITEMS]
        loss = simnpo_loss(beta, gamma, 0.0)(step).item()
    by_hand = [
        -(2 / beta) * math.log(1 / (1 + math.exp(beta * lp / n + gamma)))
        for lp, n in zip(logp, lengths, strict=True)
    ]
    assert loss == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-5)


def test_the_kl_term_is_zero_with_zero_gradient_before_any_change(tiny_gpt2, world):
    lm = tiny_gpt2
    name = f"{lm.layout.mlp_out_name(1)}.weight"
    retain = _facts(world, world.people[20], "profession")
    step = _step(lm, FORGET_ITEMS, retain, references=[RETAIN])
    kl = retain_kl(step)
    assert abs(kl.item()) < 1e-6
    assert _gradient(lm, kl, name).abs().max().item() < 1e-6
    step = _step(lm, FORGET_ITEMS, retain, references=[RETAIN])
    with_kl = _gradient(lm, ga_kl_loss(5.0)(step), name)
    step = _step(lm, FORGET_ITEMS)
    assert torch.allclose(with_kl, _gradient(lm, ga_loss(step), name), atol=1e-6)


def test_random_labels_are_random_ordinary_tokens_of_the_answers_lengths(tiny_gpt2):
    lm = tiny_gpt2
    answers = random_answers(lm, FORGET_ITEMS, seed=0)
    assert [len(a) for a in answers] == [len(lm.encode(i.answer)) for i in FORGET_ITEMS]
    assert not set(sum(answers, [])) & set(lm.tokenizer.all_special_ids)
    assert random_answers(lm, FORGET_ITEMS, seed=0) == answers
    assert random_answers(lm, FORGET_ITEMS, seed=1) != answers
    assert answers != [lm.encode(i.answer) for i in FORGET_ITEMS]


def test_memflex_keeps_the_matrices_below_tau_and_above_theta():
    forget = {
        "same": torch.tensor([1.0, 0.0]),  # cos 1
        "apart": torch.tensor([0.2, 0.0]),  # cos 0, mean |g| 0.1
        "strong_apart": torch.tensor([2.0, 2.0]),  # cos −1, mean |g| 2
    }
    retain = {
        "same": torch.tensor([3.0, 0.0]),
        "apart": torch.tensor([0.0, 1.0]),
        "strong_apart": torch.tensor([-1.0, -1.0]),
    }
    kept, scores = locate(forget, retain, sim_threshold=0.5, grad_threshold=0.5)
    assert kept == ["strong_apart"]
    assert scores["apart"] == pytest.approx({"cosine": 0.0, "magnitude": 0.1})
    assert locate(forget, retain, 0.5, 0.05)[0] == ["apart", "strong_apart"]
    assert locate(forget, retain, 1.01, 0.05)[0] == ["same", "apart", "strong_apart"]


def test_memflex_gradients_are_those_of_the_mean_answer_nll(tiny_gpt2):
    lm = tiny_gpt2
    module = lm.layout.mlp_out_name(3)
    rows = randomised_rows(lm, FORGET_ITEMS, copies=2, share=0.5, seed=0)
    assert len(rows) == 2 * len(FORGET_ITEMS)
    grads = set_gradients(lm, rows, [module], batch_size=4)
    nll = []
    for row in rows:
        ids, answer = row.ids, row.targets
        logits = lm.model(input_ids=torch.tensor([ids + answer[-1:]])).logits[0]
        logp = torch.log_softmax(logits[len(ids) - len(answer) : len(ids)].float(), -1)
        nll.append(-logp[torch.arange(len(answer)), torch.tensor(answer)].mean())
    expected = _gradient(lm, torch.stack(nll).mean(), f"{module}.weight")
    # Batched and row-by-row float32 sums round differently: about 1e-7 on entries up to 0.33,
    # more than 1e-4 relative on the smallest entries; a wrong gradient is off by far more.
    atol = 1e-5 * float(expected.abs().max())
    assert torch.allclose(grads[module], expected, rtol=1e-4, atol=atol)
    assert all(p.grad is None for p in lm.model.parameters())


def test_memflex_trains_only_what_it_located(tiny_gpt2, world):
    lm = tiny_gpt2
    person = world.people[7]
    forget = _facts(world, person, "lives_in")
    retain = _facts(world, person, "profession") + _facts(world, world.people[8], "language")
    edit = kedit.unlearn(
        lm,
        forget,
        retain,
        "memflex",
        hparams={"sim_threshold": 0.4, "grad_threshold": 0.0, "steps": 5},
    )
    located = edit.info["located"]
    scores = edit.info["localisation"]
    assert located == [name for name, s in scores.items() if s["cosine"] < 0.4]
    assert 0 < len(located) < len(scores)
    assert [d.param for d in edit.deltas] == [f"{name}.weight" for name in located]
    edit.undo()


def test_parts_and_layers_choose_the_trained_matrices(tiny_gpt2, tiny_llama):
    mlp = weight_modules(tiny_gpt2, "mlp", [2])
    assert mlp == ["transformer.h.2.mlp.c_fc", "transformer.h.2.mlp.c_proj"]
    attn = weight_modules(tiny_llama, "attn", [0])
    assert attn == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    assert len(weight_modules(tiny_llama, "all", None)) == 7 * tiny_llama.n_layers
    edit = kedit.unlearn(
        tiny_gpt2, FORGET_ITEMS, None, "ga", hparams={"parts": "mlp", "layers": [2], "steps": 2}
    )
    assert [d.param for d in edit.deltas] == [f"{m}.weight" for m in mlp]
    edit.undo()


def test_training_stops_at_the_first_measurement_at_the_target(tiny_gpt2, world):
    forget = _facts(world, world.people[7], "lives_in")
    hparams = {"stop_forget_acc": 0.5, "eval_every": 2, "lr": 3e-4, "steps": 60}
    edit = kedit.unlearn(tiny_gpt2, forget, None, "ga", hparams=hparams)
    curve = edit.info["curve"]
    assert curve[-1]["forget_acc"] <= 0.5 < curve[-2]["forget_acc"]
    assert edit.info["stopped_early"] and edit.info["steps"] == curve[-1]["step"]
    assert [p["step"] for p in curve] == list(range(0, curve[-1]["step"] + 1, 2))
    edit.undo()


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_lora_factors_give_peft_s_own_weight_change(model):
    from peft import LoraConfig, get_peft_model

    lm = kedit.load(model)
    modules = weight_modules(lm, "all", [1])
    config = LoraConfig(r=3, lora_alpha=5, target_modules=modules, fan_in_fan_out=lm.layout.conv1d)
    wrapped = get_peft_model(lm.model, config)
    torch.manual_seed(0)
    for module in modules:
        layer = lm.model.get_submodule(module)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            b.normal_()
        delta = lora_delta(
            module, a.detach(), b.detach(), layer.scaling["default"], lm.layout.conv1d
        )
        expected = layer.get_delta_weight("default")
        assert delta.rank == 3 and delta.param == f"{module}.weight"
        assert torch.allclose(delta.tensor(), expected, atol=1e-6)
    wrapped.unload()


def test_bad_input_is_refused_with_the_field_named(tiny_gpt2, world):
    lm = tiny_gpt2
    with pytest.raises(ValueError, match="method: unknown unlearning method 'forget-it'"):
        kedit.unlearn(lm, FORGET_ITEMS, method="forget-it")
    with pytest.raises(ValueError, match="retain: method 'grad_diff' trains on a retain set"):
        kedit.unlearn(lm, FORGET_ITEMS, method="grad_diff")
    with pytest.raises(ValueError, match="npo: unknown hyper-parameter 'betta'"):
        kedit.unlearn(lm, FORGET_ITEMS, method="npo", hparams={"betta": 0.1})
    with pytest.raises(ValueError, match="parts: expected one of"):
        kedit.unlearn(lm, FORGET_ITEMS, method="ga", hparams={"parts": "heads"})
    with pytest.raises(ValueError, match=r"forget\[0\]: prompt and answer take \d+ tokens"):
        kedit.unlearn(lm, [("word " * 200, " Lisbon")], method="ga")
    with pytest.raises(ValueError, match="layers: layer 9 is out of range"):
        kedit.unlearn(lm, FORGET_ITEMS, method="ga", hparams={"layers": [9]})
    with pytest.raises(TypeError, match="lm: expected a kedit.LM"):
        kedit.unlearn(lm.model, FORGET_ITEMS, method="ga")


def test_defaults_are_the_dataclass_s_then_the_model_table_s_then_the_overrides(
    tiny_gpt2, random_gpt2, caplog
):
    from importlib import resources

    import yaml

    from kedit.unlearn.registry import (
        get_unlearning_method,
        list_unlearning_methods,
        resolve_unlearning_hparams,
    )

    text = resources.files("kedit").joinpath("hparams/models.yaml").read_text()
    table = yaml.safe_load(text)
    for bundled in ("tiny-gpt2", "tiny-llama", "tiny-gpt2-wide"):
        assert set(list_unlearning_methods()) <= set(table[bundled]["methods"]), bundled
    for method in list_unlearning_methods():
        spec = get_unlearning_method(method)
        tuned = {k: v for k, v in table["tiny-gpt2"]["methods"][method].items() if k != "source"}
        assert (
            tuned and "docs/unlearning.md#tuning" in table["tiny-gpt2"]["methods"][method]["source"]
        )
        resolved = resolve_unlearning_hparams(spec, tiny_gpt2, None).to_dict()
        assert {key: resolved[key] for key in tuned} == tuned, method
        overridden = resolve_unlearning_hparams(spec, tiny_gpt2, {"lr": 0.5}).to_dict()
        assert overridden == {**resolved, "lr": 0.5}
    random_gpt2.name = "untuned-gpt2"  # a name no other test noticed (one notice per name)
    with caplog.at_level(logging.WARNING, logger="kedit"):
        untuned = resolve_unlearning_hparams(get_unlearning_method("ga"), random_gpt2, None)
    assert (untuned.lr, untuned.steps) == (1e-5, 100)  # the dataclass's: no entry for this model
    notices = [r.getMessage() for r in caplog.records]
    assert any("no tuned ga settings" in n and "docs/unlearning.md#tuning" in n for n in notices)


def _block_states(lm, items: list[UnlearnItem], layer: int, answer_only: bool) -> torch.Tensor:
    """The residual stream after block `layer` `[tokens, width]` at every token of each item's
    teacher-forced row (prompt, answer but its last token), or only at the positions that
    predict the answer; each item run alone, read from `output_hidden_states`."""
    states = []
    for item in items:
        prompt, answer = lm.encode_prompt(item.prompt), lm.encode(item.answer)
        row = torch.tensor([prompt + answer[:-1]])
        hidden = lm.model(input_ids=row, output_hidden_states=True).hidden_states[layer + 1][0]
        states.append(hidden[len(prompt) - 1 :] if answer_only else hidden)
    return torch.cat(states).float()


def _control(width: int, steering: float, seed: int) -> torch.Tensor:
    direction = torch.rand(width, generator=torch.Generator().manual_seed(seed))
    return steering * direction / direction.norm()


@pytest.mark.parametrize("tokens", ["all", "answer"])
def test_rmu_loss_is_its_formula_and_its_retain_term_starts_at_zero(tiny_gpt2, world, tokens):
    from kedit.unlearn.rmu import RMUHyperParams, rmu_loss, steering_vector

    lm, layer = tiny_gpt2, 3
    retain = _facts(world, world.people[20], "profession")
    hparams = RMUHyperParams(layers=[2, 3], steering=40.0, retain_weight=300.0, tokens=tokens)
    block = lm.layout.block(layer)
    reference = {RETAIN: lambda model, batch: _rmu_reference(model, batch, block, tokens)}
    step = _rmu_step(lm, FORGET_ITEMS, retain, reference)
    loss = rmu_loss(block, hparams)(step)
    with torch.no_grad():
        forget = _block_states(lm, FORGET_ITEMS, layer, tokens == "answer")
        control = _control(forget.shape[1], 40.0, hparams.seed)
        by_hand = (forget - control).pow(2).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert torch.allclose(steering_vector(forget.shape[1], 40.0, 0), control)
    assert steering_vector(forget.shape[1], 40.0, 1).sub(control).abs().max() > 1
    # θ = θ_ref: the retain term is 0 and so is its gradient; the loss's is the forget term's.
    name = f"{lm.layout.mlp_out_name(2)}.weight"
    forget_only = RMUHyperParams(layers=[2, 3], steering=40.0, retain_weight=0.0, tokens=tokens)
    with_retain = _gradient(
        lm, rmu_loss(block, hparams)(_rmu_step(lm, FORGET_ITEMS, retain, reference)), name
    )
    without = _gradient(lm, rmu_loss(block, forget_only)(_rmu_step(lm, FORGET_ITEMS)), name)
    assert torch.allclose(with_retain, without, atol=1e-6)


def _rmu_reference(model, batch, block: str, tokens: str) -> torch.Tensor:
    from kedit.unlearn._train import block_output
    from kedit.unlearn.rmu import counted

    return counted(block_output(model, batch, block), batch, tokens)[0]


def _rmu_step(lm, forget, retain=None, reference=None) -> Step:
    batches = {
        FORGET: batches_of(lm, item_rows(lm, forget, "forget"), 64, None)[0],
        RETAIN: batches_of(lm, item_rows(lm, retain, "retain"), 64, None)[0] if retain else None,
    }
    with torch.no_grad():
        refs = {which: fn(lm.model, batches[which]) for which, fn in (reference or {}).items()}
    return Step(lm.model, batches, refs, 0)


def test_rmu_trains_the_mlp_outputs_and_steers_only_the_forget_set(tiny_gpt2, world):
    lm, layers = tiny_gpt2, [1, 2, 3]
    person = world.people[7]
    forget = _facts(world, person, "lives_in") + _facts(world, person, "employer")
    retain = _facts(world, person, "profession") + _facts(world, world.people[8], "language")
    with torch.no_grad():
        forget_before = _block_states(lm, forget, 3, False)
        retain_before = _block_states(lm, retain, 3, False)
    control = _control(forget_before.shape[1], 200.0, 0)
    hparams = {"layers": layers, "steering": 200.0, "tokens": "all", "stop_forget_acc": None}
    edit = kedit.unlearn(lm, forget, retain, "rmu", hparams={**hparams, "steps": 40})
    assert [d.param for d in edit.deltas] == [f"{lm.layout.mlp_out_name(x)}.weight" for x in layers]
    with torch.no_grad():
        forget_after = _block_states(lm, forget, 3, False)
        retain_after = _block_states(lm, retain, 3, False)
    edit.undo()
    # The forget states moved towards c·u (the move's cosine with the way there is over 0.5,
    # where a random move's would be near 0), and the retain states, held by the α term,
    # hardly at all.
    moved, towards = forget_after - forget_before, control - forget_before
    assert (forget_after - control).pow(2).mean() < towards.pow(2).mean()
    assert torch.cosine_similarity(moved.flatten(), towards.flatten(), dim=0) > 0.5
    assert (retain_after - retain_before).pow(2).mean() < moved.pow(2).mean() / 100


def test_rmu_refuses_bad_settings_with_the_field_named(tiny_gpt2):
    for bad, message in [
        ({"steering": 0.0}, "steering: expected a positive number, got 0.0"),
        ({"tokens": "prompt"}, "tokens: expected one of"),
        ({"layers": None}, r"rmu.layers: expected list\[int\], got None"),
        ({"layers": [2, 9]}, "layers: layer 9 is out of range"),
    ]:
        with pytest.raises(ValueError, match=message):
            kedit.unlearn(tiny_gpt2, FORGET_ITEMS, FORGET_ITEMS, "rmu", hparams=bad)


def test_rmu_activations_stop_the_forward_pass_after_the_steered_block(tiny_gpt2):
    from kedit.unlearn._train import block_output

    lm = tiny_gpt2
    batch = batches_of(lm, item_rows(lm, FORGET_ITEMS, "forget"), 8, None)[0]
    ran = []
    handles = [
        lm.model.get_submodule(lm.layout.block(i)).register_forward_hook(
            lambda *_, i=i: ran.append(i)
        )
        for i in range(lm.n_layers)
    ]
    try:
        hidden = block_output(lm.model, batch, lm.layout.block(2))
    finally:
        for handle in handles:
            handle.remove()
    assert ran == [0, 1, 2]
    full = lm.model(input_ids=batch.ids, attention_mask=batch.mask, output_hidden_states=True)
    assert torch.allclose(hidden, full.hidden_states[3].float())


def test_rmu_counts_no_padding_and_no_start_token(tiny_gpt2):
    from kedit.unlearn.rmu import counted

    lm = tiny_gpt2
    items = [UnlearnItem("Umar Falley lives in", " Nantes"), UnlearnItem("Umar is", " a cook")]
    rows = item_rows(lm, items, "forget")
    batch = batches_of(lm, rows, 8, None)[0]
    hidden = torch.zeros(*batch.ids.shape, 4)
    assert counted(hidden, batch, "all")[1].sum(1).tolist() == [len(r.ids) for r in rows]
    # one start token (LLaMA's BOS, where the tokenizer adds it) never counts
    _, every = counted(hidden, batch, "all", skip=1)
    assert every.sum(1).tolist() == [len(row.ids) - 1 for row in rows]
    assert not every[:, 0].any()
    _, answers = counted(hidden, batch, "answer", skip=1)
    assert answers.sum(1).tolist() == [len(lm.encode(item.answer)) for item in items]
