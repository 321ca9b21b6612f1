"""PersonalityEdit: the loader, the metrics' golden values, and the measuring loop."""

from __future__ import annotations

import json
import math

import pytest
import torch

import kedit
from kedit.data.personalityedit import TRAITS, load_personalityedit
from kedit.eval.judges import get_judge
from kedit.eval.personality import (
    PersonalityRun,
    drawdown,
    edit_success,
    evaluate_personality,
    target_cross_entropy,
)
from kedit.zoo import DATA_DIR

PERSONALITY = DATA_DIR / "tinyworld2_personality.json"
FT_M = {"layers": [4], "lr": 1e-2}


def test_tinyworld_file_loads_as_easyedit_reads_it():
    raw = json.loads(PERSONALITY.read_text())
    cases = load_personalityedit(PERSONALITY)
    assert cases.format == "personalityedit" and len(cases) == len(raw)
    for record, case in zip(raw, cases, strict=True):
        assert case.topic == record["ent"] and case.target == record["target_per"]
        assert {trait: list(texts) for trait, texts in case.texts.items()} == {
            trait: record[trait] for trait in TRAITS
        }


def test_a_missing_target_is_drawn_from_the_seed_the_same_whatever_n(tmp_path):
    records = json.loads(PERSONALITY.read_text())[:6]
    for record in records:
        del record["target_per"]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(records))
    all_six = [case.target for case in load_personalityedit(path, seed=3)]
    assert [case.target for case in load_personalityedit(path, n=2, seed=3)] == all_six[:2]
    assert set(all_six) <= set(TRAITS)


def test_bad_records_name_the_field(tmp_path):
    record = json.loads(PERSONALITY.read_text())[0]
    for field, value, message in [
        ("target_per", "openness", "target_per: expected one of extraversion"),
        ("neuroticism", [], "neuroticism: expected a non-empty list"),
    ]:
        path = tmp_path / f"{field}.json"
        path.write_text(json.dumps([{**record, field: value}]))
        with pytest.raises(ValueError, match=f"record 0: {message}"):
            load_personalityedit(path)


def test_metric_golden_values():
    assert edit_success(
        {"extraversion": 0.2, "agreeableness": 0.5, "neuroticism": 0.3}, "extraversion"
    )
    assert not edit_success(
        {"extraversion": 0.4, "agreeableness": 0.5, "neuroticism": 0.3}, "extraversion"
    )
    assert target_cross_entropy([0.25, 0.5, 0.25], TRAITS, "neuroticism") == pytest.approx(
        math.log(4)
    )
    pre = [torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))]
    post = [torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75]]))]
    expected = (0.0 + 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)) / 2
    assert drawdown(pre, post) == pytest.approx(expected, rel=1e-6)


def test_trait_nll_is_the_mean_text_nll_from_full_forwards(tiny_gpt2):
    lm = tiny_gpt2
    case = load_personalityedit(PERSONALITY, n=1)[0]
    judge = get_judge("personality", lambda texts: ["agreeableness"] * len(texts))
    nll = PersonalityRun(lm, judge).trait_nll(case)
    prompt = lm.encode_prompt(f"What do you think of {case.topic}?")
    for trait in TRAITS:
        per_text = []
        for text in case.texts[trait]:
            answer = lm.encode(" " + text)
            with torch.no_grad():
                logits = lm.model(input_ids=torch.tensor([prompt + answer])).logits[0]
            loss = torch.nn.functional.cross_entropy(
                logits[len(prompt) - 1 : -1], torch.tensor(answer)
            )
            per_text.append(loss.item())
        assert nll[trait] == pytest.approx(sum(per_text) / len(per_text), rel=1e-4)


def test_the_loop_edits_each_case_and_undoes(tiny_gpt2):
    lm = tiny_gpt2
    cases = list(load_personalityedit(PERSONALITY, n=2))
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    judge = get_judge("personality", lambda texts: ["extraversion"] * len(texts))
    result = evaluate_personality(
        lm,
        cases,
        judge,
        lambda requests: kedit.edit(lm, requests, "ft-m", hparams=FT_M),
        max_new_tokens=6,
    )
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    for record, case in zip(result["cases"], cases, strict=True):
        assert record["post"]["DD"] > 0 and "TPEI" not in record["post"]
        assert record["post"]["ES"] == edit_success(record["post"]["trait_nll"], case.target)
    acc = sum(case.target == "extraversion" for case in cases) / 2
    assert result["summary"]["post"]["Acc"] == {
        "value": acc,
        "protocol": "generation",
        "n": 2,
        "judge": "<lambda>",
    }
    with pytest.raises(ValueError, match="judge: expected a personality judge"):
        evaluate_personality(lm, cases, get_judge("safety", lambda t: ["safe"] * len(t)))


def test_kedit_persona_writes_its_results_and_names_a_missing_method(tmp_path):
    from typer.testing import CliRunner

    from kedit.cli import app
    from kedit.zoo.judges import NgramClassifier

    folder = tmp_path / "judge"
    NgramClassifier(
        name="love",
        labels=list(TRAITS),
        vocabulary={"love": 0},
        weights=[[3.0], [0.0], [0.0]],
        bias=[0.0, 0.5, 0.0],
    ).save(folder / "judges" / "personality.json")
    args = ["persona", "--model", "tiny-gpt2", "--data", str(PERSONALITY), "--n", "2"]
    args += ["--out", str(tmp_path / "run"), "--judge", str(folder), "--max-new-tokens", "4"]
    done = CliRunner().invoke(app, [*args, "--method", "ft-m", "-p", "layers=[4]"])
    assert done.exit_code == 0, done.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["judge"].endswith(":love") and set(summary["summary"]["post"]) == {
        "ES",
        "Acc",
        "DD",
        "TPEI",
    }
    missing = CliRunner().invoke(app, [*args, "--method", "no-such-method"])
    assert missing.exit_code == 2 and "unknown method 'no-such-method'" in missing.output


def test_kedit_persona_has_ike_state_the_shortest_text_where_all_do_not_fit(tmp_path):
    from typer.testing import CliRunner

    from kedit.cli import app

    args = ["persona", "--model", "tiny-chat", "--data", str(PERSONALITY), "--n", "1"]
    args += ["--method", "ike", "--max-new-tokens", "4", "--n-other", "1"]
    done = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["ike_texts"] == "shortest"
    # all four texts, the question and the reply take 137 of tiny-chat's 128 positions
    every = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "all"), "--ike-texts", "all"])
    assert every.exit_code == 2 and "do not fit the model's 128 positions" in every.output
    bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "bad"), "--ike-texts", "some"])
    assert bad.exit_code == 2
    assert "ike_texts: expected one of shortest, all, got 'some'" in bad.output
    assert not (tmp_path / "bad").exists()
