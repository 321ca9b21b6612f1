"""`kedit.evaluate_unlearning` against values computed here with one forward pass per item."""

from __future__ import annotations

import math

import pytest
import torch

import kedit
from kedit.data.unlearn_items import UnlearnItem
from kedit.zoo import build_world
from kedit.zoo.forget_task import perturbed_answers
from kedit.zoo.world import FactPrompt

GENERAL = ["Mira Olsen lives in Lisbon. Tomas Berg works as a pilot.", "Oslo is a city in Norway."]


@pytest.fixture(scope="module")
def sets():
    world = build_world()
    person, other = world.people[11], world.people[12]

    def items(subject, relation, wrong: bool = True):
        out = []
        for template in world.templates(subject, relation)[:2]:
            fact = FactPrompt(subject, relation, template, world.answer(subject, relation))
            wrong_answers = tuple(perturbed_answers(world, fact)) if wrong else ()
            out.append(UnlearnItem(fact.prompt, fact.answer, wrong_answers))
        return out

    # A wrong "fact" too, so that the forget set's accuracy is not all ones.
    wrong = UnlearnItem(
        f"{person} works for",
        " Zenith" if world.facts[(person, "employer")] != "Zenith" else " Helix",
        (" Corvex",),
    )
    forget = items(person, "lives_in") + [wrong]
    retain = {"public": items(person, "profession"), "others": items(other, "language", False)}
    return forget, retain


@torch.no_grad()
def _answer_nlls(lm, prompt: str, answer: str) -> torch.Tensor:
    prompt_ids, answer_ids = lm.encode_prompt(prompt), lm.encode(answer)
    logits = lm.model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0]
    logp = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], -1)
    return -logp[torch.arange(len(answer_ids)), torch.tensor(answer_ids)]


@torch.no_grad()
def _accuracy(lm, item: UnlearnItem) -> float:
    prompt_ids, answer_ids = lm.encode_prompt(item.prompt), lm.encode(item.answer)
    logits = lm.model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0]
    predicted = logits[len(prompt_ids) - 1 : -1].argmax(-1).tolist()
    return sum(p == a for p, a in zip(predicted, answer_ids, strict=True)) / len(answer_ids)


def test_scores_are_those_of_one_pass_per_item(tiny_gpt2, sets):
    lm = tiny_gpt2
    forget, retain = sets
    result = kedit.evaluate_unlearning(lm, forget, retain, general=GENERAL, generation=False)
    accuracy = sum(_accuracy(lm, item) for item in forget) / len(forget)
    scores = result["sets"]["forget"]
    assert 0 < accuracy < 1
    assert scores["teacher_forced"]["token_accuracy"] == pytest.approx(accuracy)
    assert scores["teacher_forced"]["unlearn_success"] == pytest.approx(1 - accuracy)
    public = result["sets"]["public"]["teacher_forced"]["retention_success"]
    assert public == pytest.approx(sum(_accuracy(lm, i) for i in retain["public"]) / 2)

    statistics = []
    for item in forget:
        true = _answer_nlls(lm, item.prompt, item.answer).mean()
        wrong = torch.stack([_answer_nlls(lm, item.prompt, a).mean() for a in item.perturbed])
        statistics.append(math.exp(wrong.mean() - true))
    assert result["truth_ratio_statistics"] == pytest.approx(statistics, rel=1e-4)
    expected_ratio = sum(min(r, 1 / r) for r in statistics) / len(statistics)
    assert scores["probability"]["truth_ratio"] == pytest.approx(expected_ratio, rel=1e-4)
    assert "truth_ratio" not in result["sets"]["others"]["probability"]  # no wrong answers

    total = count = 0
    for text in GENERAL:
        ids = lm.encode_prompt(text)
        nll = _answer_nlls(lm, lm.tokenizer.decode(ids[:1]), lm.tokenizer.decode(ids[1:]))
        total, count = total + nll.sum().item(), count + len(nll)
    perplexity = result["general"]["probability"]["perplexity"]
    assert perplexity == pytest.approx(math.exp(total / count), rel=1e-4)


def test_the_model_against_itself_is_indistinguishable(tiny_gpt2, sets):
    forget, retain = sets
    result = kedit.evaluate_unlearning(
        tiny_gpt2, forget, retain, baseline=tiny_gpt2, generation=False
    )
    versus = result["vs_baseline"]
    assert versus["forget_quality"] == 1.0 and versus["ks_statistic"] == 0.0
    assert set(versus["token_accuracy_gap"].values()) == {0.0}
    again = kedit.evaluate_unlearning(
        tiny_gpt2, forget, retain, baseline=result["baseline"], generation=False
    )
    assert again["vs_baseline"] == versus


def test_several_baselines_are_each_compared_and_their_forget_quality_spread_reported(
    tiny_gpt2, sets
):
    from kedit.bench.unlearning import unlearning_rows

    forget, retain = sets
    other = kedit.load("tiny-gpt2-wide")
    alone = {
        lm.name: kedit.evaluate_unlearning(tiny_gpt2, forget, retain, baseline=lm, generation=False)
        for lm in (tiny_gpt2, other)
    }
    both = kedit.evaluate_unlearning(
        tiny_gpt2, forget, retain, baseline=[tiny_gpt2, other], generation=False
    )
    assert both["vs_baselines"] == [alone[lm.name]["vs_baseline"] for lm in (tiny_gpt2, other)]
    assert both["vs_baseline"] == alone["tiny-gpt2"]["vs_baseline"]  # the first's, as before
    qualities = [alone[name]["vs_baseline"]["forget_quality"] for name in alone]
    assert both["forget_quality_range"] == [min(qualities), max(qualities)]
    header, rows = unlearning_rows([("run", both)])
    cell = rows[0][header.index("forget quality")]
    assert cell == f"{min(qualities):.4f}–{max(qualities):.4f}"
    with pytest.raises(ValueError, match=r"baseline: expected a retrained model or a list"):
        kedit.evaluate_unlearning(tiny_gpt2, forget, retain, baseline=[])


def test_generation_scores_and_model_utility(tiny_gpt2, sets):
    forget, retain = sets
    result = kedit.evaluate_unlearning(tiny_gpt2, forget[:2], retain)
    generated = result["sets"]["public"]["generation"]
    assert generated == {"rouge_l_recall": 1.0, "exact_match": 1.0}  # the model knows them
    parts = []
    for name in ("public", "others"):
        probability = result["sets"][name]["probability"]
        parts.append(probability.get("true_answer_share", probability["probability"]))
        parts += [probability["truth_ratio"]] if "truth_ratio" in probability else []
        parts.append(result["sets"][name]["generation"]["rouge_l_recall"])
    assert len(parts) == 5
    assert result["model_utility"] == pytest.approx(len(parts) / sum(1 / p for p in parts))


def test_bad_sets_are_refused(tiny_gpt2, sets):
    forget, retain = sets
    with pytest.raises(ValueError, match="retain: set names \\['forget'\\] are forget sets"):
        kedit.evaluate_unlearning(tiny_gpt2, forget, {"forget": forget})
    with pytest.raises(ValueError, match="general: expected at least one non-empty text"):
        kedit.evaluate_unlearning(tiny_gpt2, forget, general=["  "])
    with pytest.raises(ValueError, match="baseline: expected the retrained LM"):
        kedit.evaluate_unlearning(tiny_gpt2, forget, retain, baseline={"sets": {}})
    with pytest.raises(ValueError, match=r"retain\['public'\]\[0\]: expected a \(prompt"):
        kedit.evaluate_unlearning(tiny_gpt2, forget, {"public": ["just a prompt"]})


def test_the_report_table_puts_each_number_in_its_column():
    from kedit.bench.unlearning import unlearning_markdown, unlearning_rows

    def run(forget_acc, retain_acc, **extra):
        return {
            "sets": {
                "forget": {
                    "kind": "forget",
                    "teacher_forced": {"token_accuracy": forget_acc},
                    "probability": {"truth_ratio": 0.25},
                },
                "in_domain": {"kind": "retain", "teacher_forced": {"token_accuracy": retain_acc}},
            },
            "general": {"probability": {"perplexity": 3.5}},
            "model_utility": 0.75,
            **extra,
        }

    after = run(0.0, 0.9, vs_baseline={"forget_quality": 0.123456}, steps=40, seconds=12.34)
    header, rows = unlearning_rows([("before", run(1.0, 1.0)), ("ga", {**after, "cpu_seconds": 5})])
    assert header == [
        "run", "forget acc", "in_domain acc", "general ppl", "forget truth ratio", "utility",
        "forget quality", "steps", "s", "cpu s",
    ]  # fmt: skip
    assert rows == [
        ["before", "1.000", "1.000", "3.500", "0.250", "0.750", "–", "–", "–", "–"],
        ["ga", "0.000", "0.900", "3.500", "0.250", "0.750", "0.1235", "40", "12.3", "5.0"],
    ]
    table = unlearning_markdown("t", [("ga", after)]).splitlines()
    assert table[0] == "### t" and table[-1].startswith("| ga | 0.000 | 0.900 |")
